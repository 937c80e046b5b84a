"""A cohort's users trained together: independent local SGD of many users from the same SASRec.

What a cohort node computes each round (``cohort-size``): every drawn user trains its own copy
of the received model with a fresh SGD optimizer, exactly as a one-user node would, and the
node replies with the example-weighted mean of those models. The loop (one user after the
other through :func:`lumosrec.core.training.train_epochs`) pays Python and dispatch costs per
user and per step, and writes a dense item table per user. :func:`train_batched` computes the
same models together:

* the transformer's weights are stacked per user (``(K, ...)``), and users whose batches have a
  similar shape are padded into one group that runs as one batched forward and backward;
* the item table is never copied per user. A user's table after ``s`` SGD steps is
  ``E0 + sum_t c_t Q_t^T H_t + S``: the softmax gradient of a step is ``Q^T H`` (``Q`` =
  softmax - one-hot over all items, ``H`` = the batch's sequence encodings, rank at most the
  batch's rows), and the input-side gradient ``S`` touches only the user's own items, kept as
  a small exact table. Logits, the gradient into the encoder and the clipping norm (through
  ``Q Q^T`` and ``H H^T``) come out of these factors, and the cohort's mean table is one
  matrix product at the end.

The arithmetic is the loop's (float64: equal to rounding, ``tests/test_cohort.py``); each user
draws its batches from its own generator, as in the loop. Dropout masks come from one stream per
cohort and round instead of one per user, so with dropout on, the two paths give different (equally
distributed) models. The low-rank table pays where histories are short and the catalog large
(Amazon: about one batch per local epoch); on long histories (ml-100k) its factors grow with
every step and the loop is faster, so ``cohort-engine = "auto"`` picks per cohort and round.
Supports the ``sasrec`` objective, and ``lumos`` with its item-level view terms (future items as
extra targets, counterfactual items' unlikelihood: per-row terms on the same softmax, so their
gradient is one more ``Q``) and its tri-view InfoNCE terms (each user's views encoded with its
stacked weights, projected by its own private head; the views' items join the user's exact own
rows), and ``cl4srec`` (each user's two augmentations per batch drawn from its own stream in the
loop's order), with SGD, clipping, any epochs and batch size; the others train in the loop
(:func:`batched_refusal`). The InfoNCE terms' random choice of a batch's contrastive rows, when a
batch has more, draws from the cohort's stream, like dropout. What each user's own node would do
to its update before sending it (the item-row defence, rounded example counts, a simulated attacker's
scaling) is done per user here too, so that a cohort still replies what its users' nodes would.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from lumosrec.client.privacy import local_dp_on
from lumosrec.core.batching import PrefixSamples
from lumosrec.models.cl4srec import CL4SRec
from lumosrec.models.lumos import LUMOS, UserViews
from lumosrec.models.sasrec import SASRec, SASRecConfig

#: run-config values of ``cohort-engine``
ENGINES = ("auto", "batched", "loop")
TABLE = "item_embedding.weight"
LAYER_WEIGHTS = (
    "qkv.weight",
    "qkv.bias",
    "out.weight",
    "out.bias",
    "inner.weight",
    "inner.bias",
    "outer.weight",
    "outer.bias",
    "attention_norm.weight",
    "attention_norm.bias",
    "ffn_norm.weight",
    "ffn_norm.bias",
)


def batched_refusal(run_config: Mapping, objective_refusal: str | None) -> str | None:
    """Why a cohort's users cannot train batched under ``run_config``, None when they can;
    ``objective_refusal`` is the objective's own reason (:meth:`Objective.batched_refusal`)."""
    if objective_refusal:
        return objective_refusal
    if str(run_config["client-optimizer"]) != "sgd":
        return "the batched cohort engine trains with SGD only (Adam's per-element steps make each user's item table dense)"
    if str(run_config["strategy"]).lower() == "fedprox":
        return "the batched cohort engine has no FedProx proximal term"
    if local_dp_on(run_config):
        return "local DP clips each user's whole update, which the batched cohort engine never holds"
    return None


def use_batched(run_config: Mapping, objective_refusal: str | None, sequences: list[np.ndarray]) -> bool:
    """Whether to train these users batched: ``cohort-engine`` says so, or it is ``auto`` and the
    users' histories are short (on average at most one batch per local epoch), where it is faster."""
    engine = str(run_config.get("cohort-engine", "auto"))
    refusal = batched_refusal(run_config, objective_refusal)
    if engine == "loop" or not sequences:
        return False
    if engine == "batched":
        if refusal:
            raise ValueError(refusal)
        return True
    return refusal is None and np.mean([len(s) - 1 for s in sequences]) <= int(run_config["batch-size"])


@dataclass
class CohortUpdate:
    """What a cohort replies: the example-weighted mean model and the users' training loss."""

    mean: dict[str, torch.Tensor]
    loss: float  # example-weighted mean of the users' mean training losses
    examples: int  # training samples of the users (the weight of the reply)
    seen: int  # samples seen in training (examples x local epochs)
    #: each user's private parameters after training (LUMOS's projection head), kept by its node
    private: list[dict[str, torch.Tensor]] = field(default_factory=list)


def train_batched(
    model: SASRec,
    sequences: list[np.ndarray],
    rngs: list[np.random.Generator],
    epochs: int,
    batch_size: int,
    learning_rate: float,
    max_grad_norm: float,
    views: UserViews | None = None,
    heads: list[dict[str, torch.Tensor] | None] | None = None,
    head_seeds: list[int] | None = None,
    weights: list[int] | None = None,
    row_defence: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    update_factors: list[float] | None = None,
) -> CohortUpdate:
    """Train each user (training sequence ``sequences[k]``, shuffled by ``rngs[k]``) on its own
    from ``model``'s weights with SGD for ``epochs`` epochs; return the example-weighted mean of
    the users' models. ``model`` is left unchanged; dropout is on when ``model.training``.
    ``views`` (row ``k`` for user ``k``) add LUMOS's item-level view terms
    (:meth:`lumosrec.models.lumos.LUMOS.view_item_terms`) to each user's loss; ``model`` is then
    a LUMOS model whose paraphrase substitution is off; with its InfoNCE terms on, user ``k``
    trains its own projection head ``heads[k]`` (a private state dict; None: a fresh one drawn
    from torch's stream seeded with ``head_seeds[k]``, as a lone user's node draws it), returned
    in :attr:`CohortUpdate.private`. ``weights`` are the users' weights in the mean (default:
    their training samples); ``row_defence(k, change)`` returns what user ``k`` sends of its change of the item table (the item-row defence, per user as on its own
    node; default: the change itself). ``update_factors`` multiply each user's update (a
    simulated attacker's, :func:`lumosrec.client.threats.update_factor`; default: all 1)."""
    item_terms = None
    # with no item-level term on, the terms are a constant zero that autograd cannot differentiate
    if views is not None and model.config.item_level:

        def item_terms(log_probs: torch.Tensor, users: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return model.view_item_terms(log_probs, users, targets, views)

    contrastive = views is not None and isinstance(model, LUMOS) and model.config.contrastive
    if contrastive:
        heads = [
            head if head is not None else _fresh_head(model, None if head_seeds is None else head_seeds[k])
            for k, head in enumerate(heads or [None] * len(sequences))
        ]
    samples = [PrefixSamples([sequence], model.config.max_len) for sequence in sequences]
    # CL4SRec's augmentations come from the user's stream, drawn after each epoch's shuffle as in the loop
    draw = model.augmented_views if isinstance(model, CL4SRec) else None
    plans, drawn = zip(*(_plan(s, rng, epochs, batch_size, draw) for s, rng in zip(samples, rngs)))
    # a user's InfoNCE terms input its views' items too: their rows are kept exactly, like its own
    inputs = [np.concatenate([s, views.row_items(k)]) if contrastive else s for k, s in enumerate(sequences)]
    state = _CohortState.start(model, sequences, list(plans), inputs, heads if contrastive else None)
    contrast = None
    if contrastive:
        contrast = _ViewContrast(model, views, state.own)
    elif draw is not None:
        contrast = _AugmentContrast(model, state.own)
    # a user whose every prefix fits in max-len is encoded in one pass over its sequence
    one_pass = [len(sequence) - 1 <= model.config.max_len for sequence in sequences]
    for step in range(max(map(len, plans))):
        batches = {u: samples[u].batch(plans[u][step]) for u in range(len(samples)) if step < len(plans[u])}
        now = {u: drawn[u][step] for u in batches} if draw is not None else {}
        for whole in (True, False):
            shapes = [
                (u, len(b[2]), len(sequences[u]) - 1 if whole else b[0].shape[1])
                for u, b in batches.items()
                if one_pass[u] == whole
            ]
            for group in _shape_groups(shapes):
                state.step(
                    group,
                    batches,
                    model.config,
                    learning_rate,
                    max_grad_norm,
                    model.training,
                    whole,
                    item_terms,
                    contrast,
                    now,
                )
    for user, factor in enumerate(update_factors or []):
        if factor != 1.0:
            state.scale_update(user, factor)
    counts = weights or [len(s) for s in samples]
    shares = torch.tensor(counts, dtype=state.table0.dtype, device=state.table0.device) / sum(counts)
    seen = [sum(map(len, plan)) for plan in plans]
    loss = sum(count * total / max(n, 1) for count, total, n in zip(counts, state.loss_sums, seen)) / sum(counts)
    return CohortUpdate(state.mean(shares, row_defence), float(loss), sum(counts), sum(seen), state.private())


def _plan(
    samples: PrefixSamples,
    rng: np.random.Generator,
    epochs: int,
    batch_size: int,
    draw: Callable[[torch.Tensor, torch.Tensor, np.random.Generator], object] | None,
) -> tuple[list[np.ndarray], list[object]]:
    """A user's batches of every epoch and, with ``draw``, what it draws for each batch from
    ``rng``, in the loop's order (:func:`lumosrec.core.training.train_epochs`)."""
    plan, drawn = [], []
    for _ in range(epochs):
        for indices in list(samples.epoch(batch_size, rng)):
            plan.append(indices)
            if draw is not None:
                drawn.append(draw(*samples.batch(indices)[:2], rng))
    return plan, drawn


def _fresh_head(model: LUMOS, seed: int | None) -> dict[str, torch.Tensor]:
    """A fresh projection head, drawn from torch's stream seeded with ``seed`` (the current one: None)."""
    if seed is None:
        return model.fresh_private_state_dict()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model.fresh_private_state_dict()


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


def _norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=eps) * weight.unsqueeze(1) + bias.unsqueeze(1)


#: per layer, the keys and values of an encoded sequence's positions, ``(G*B, heads, L, head size)``
KeysValues = list[tuple[torch.Tensor, torch.Tensor]]
#: one layer's attention: (layer, queries, keys, values) -> attended values, each (rows, heads, L, size)
Attention = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _layers(
    p: dict, config: SASRecConfig, hidden: torch.Tensor, rows: int, training: bool, attend: Attention
) -> torch.Tensor:
    """SASRec's input norm and transformer layers over ``hidden`` ``(G, rows * L, d)`` (input
    embeddings plus positions), ``attend`` combining each layer's queries, keys and values."""
    groups, tokens, width = hidden.shape
    length, drop, eps = tokens // rows, config.dropout if training else 0.0, config.layer_norm_eps
    hidden = F.dropout(_norm(hidden, p["input_norm.weight"], p["input_norm.bias"], eps), drop, training)
    for layer in range(config.num_layers):
        w = {name: p[f"layers.{layer}.{name}"] for name in LAYER_WEIGHTS}
        qkv = _linear(hidden, w["qkv.weight"], w["qkv.bias"])
        q, k, v = qkv.view(groups * rows, length, 3, config.num_heads, -1).permute(2, 0, 3, 1, 4)
        attended = attend(layer, q, k, v).transpose(1, 2).reshape(groups, tokens, width)
        out = F.dropout(_linear(attended, w["out.weight"], w["out.bias"]), drop, training)
        hidden = _norm(hidden + out, w["attention_norm.weight"], w["attention_norm.bias"], eps)
        inner = _linear(F.gelu(_linear(hidden, w["inner.weight"], w["inner.bias"])), w["outer.weight"], w["outer.bias"])
        hidden = _norm(hidden + F.dropout(inner, drop, training), w["ffn_norm.weight"], w["ffn_norm.bias"], eps)
    return hidden


def _encode_positions(
    p: dict, config: SASRecConfig, emb: torch.Tensor, training: bool, kept: KeysValues | None = None
) -> torch.Tensor:
    """SASRec's encoder (:meth:`SASRec.encode_positions`) with per-user weights ``p`` (each
    ``(G, ...)``): input embeddings ``emb`` ``(G, B, L, d)`` -> hidden states ``(G, B, L, d)``;
    each layer's keys and values are appended to ``kept`` when given."""
    groups, rows, length, width = emb.shape
    drop = config.dropout if training else 0.0

    def causal(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if kept is not None:
            kept.append((k, v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)

    hidden = (emb + p["position_embedding.weight"][:, None, :length]).reshape(groups, rows * length, width)
    return _layers(p, config, hidden, rows, training, causal).view(groups, rows, length, width)


def _encode_continuations(
    p: dict,
    config: SASRecConfig,
    emb: torch.Tensor,
    start: torch.Tensor,
    context: KeysValues,
    context_rows: torch.Tensor,
    training: bool,
) -> torch.Tensor:
    """Tokens ``emb`` ``(G, N, T, d)`` that continue the first ``start`` ``(G, N)`` positions of
    rows ``context_rows`` ``(G, N)`` of an encoded sequence (``context``, from
    :func:`_encode_positions`): they sit at positions ``start`` onwards and attend to those
    positions and causally to each other, at every layer. Causal attention makes this the encoding
    of the whole continued sequence at its new positions, without encoding its prefix again;
    with dropout on, the prefix keeps the masks of the pass that encoded it."""
    groups, rows, length, width = emb.shape
    drop, device = config.dropout if training else 0.0, emb.device
    positions = (start[:, :, None] + torch.arange(length, device=device)).clamp(max=config.max_len - 1)
    table = p["position_embedding.weight"]
    hidden = emb + table[torch.arange(groups, device=device)[:, None, None], positions]
    context_length = context[0][0].shape[2]
    source = (torch.arange(groups, device=device)[:, None] * (context[0][0].shape[0] // groups) + context_rows).view(-1)
    seen = torch.arange(context_length, device=device)[None, :] < start.view(-1, 1)  # (G*N, context)
    mask = torch.cat(
        [
            seen[:, None, None, :].expand(-1, 1, length, -1),
            torch.ones(length, length, dtype=torch.bool, device=device).tril().expand(groups * rows, 1, -1, -1),
        ],
        dim=3,
    )

    def continued(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        before_k, before_v = context[layer]
        keys, values = torch.cat([before_k[source], k], dim=2), torch.cat([before_v[source], v], dim=2)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=drop)

    hidden = _layers(p, config, hidden.reshape(groups, rows * length, width), rows, training, continued)
    return hidden.view(groups, rows, length, width)


def _shape_groups(shapes: list[tuple[int, int, int]], slack: float = 1.5) -> list[list[int]]:
    """Users ``(user, rows, length)`` in groups, by length then rows; a group closes when padding
    it to its largest batch would cost more than ``slack`` times its real tokens."""
    groups, current, real = [], [], 0
    for user, rows, length in sorted(shapes, key=lambda shape: (shape[2], shape[1])):
        if current:
            widest = max(max(r for _, r, _ in current), rows)
            if (len(current) + 1) * widest * length > slack * (real + rows * length):
                groups.append([u for u, _, _ in current])
                current, real = [], 0
        current.append((user, rows, length))
        real += rows * length
    return [*groups, [u for u, _, _ in current]] if current else groups


def _project(head: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """LUMOS's projection head (``Linear, ReLU, Linear``, :class:`lumosrec.models.lumos.LUMOS`) with
    per-user weights ``head`` (each ``(G, ...)``), unit-normalised: ``(G, N, d)`` -> ``(G, N, p)``."""
    hidden = torch.relu(_linear(x, head["0.weight"], head["0.bias"]))
    return F.normalize(_linear(hidden, head["2.weight"], head["2.bias"]), dim=-1)


@dataclass
class _GroupPass:
    """A step's group of users as a contrast term sees it: their batches and what was drawn for
    them, their stacked weights and private heads, their exact own rows, the batch rows'
    encodings (``anchors``, ``(G, rows, d)``) and the keys and values of the pass that made them
    (``context``; ``whole``: one row per user)."""

    group: list[int]
    batches: dict
    drawn: dict
    p: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]
    rows_now: torch.Tensor
    padding_row: torch.Tensor  # the padding item's row (CL4SRec's mask): never trained
    anchors: torch.Tensor
    context: KeysValues
    whole: bool
    config: SASRecConfig
    training: bool

    def embed(self, own: list[np.ndarray], tokens: list[list[np.ndarray]]) -> tuple[torch.Tensor, ...]:
        """Rows of items per user (``tokens[g]``, item 0 the mask) as positions in the users' own
        items ``(G, rows, width)``, lengths ``(G, rows)``, their embeddings (a leaf of the graph)
        and those embeddings as the encoder takes them (the mask item's is the padding row)."""
        size, device = len(self.group), self.anchors.device
        rows, width = max(map(len, tokens)), max(max(len(row) for row in rows_) for rows_ in tokens)
        local = torch.zeros(size, rows, max(width, 1), dtype=torch.long)
        real = torch.zeros(size, rows, max(width, 1), dtype=torch.bool)
        lengths = torch.ones(size, rows, dtype=torch.long)
        for g, (u, rows_) in enumerate(zip(self.group, tokens)):
            for r, row in enumerate(rows_):
                local[g, r, : len(row)] = torch.from_numpy(np.searchsorted(own[u], row))
                real[g, r, : len(row)] = torch.from_numpy(row > 0)
                lengths[g, r] = max(len(row), 1)
        local = local.clamp(max=self.rows_now.shape[1] - 1).to(device)
        emb = self.rows_now[torch.arange(size, device=device)[:, None, None], local].requires_grad_(True)
        return local, lengths.to(device), emb, torch.where(real.to(device)[..., None], emb, self.padding_row)

    def last(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Each row's hidden state at its last token: ``(G, rows, L, d)`` -> ``(G, rows, d)``."""
        device = hidden.device
        return hidden[
            torch.arange(hidden.shape[0], device=device)[:, None],
            torch.arange(hidden.shape[1], device=device)[None, :],
            (lengths - 1).clamp(min=0),
        ]


def _info_nce(
    anchor: torch.Tensor, positive: torch.Tensor, keep: torch.Tensor, tau: float, hard: torch.Tensor | None = None
) -> torch.Tensor:
    """Per user, :func:`lumosrec.models.losses.info_nce` over its kept rows ``(G, rows)`` of
    ``anchor`` and ``positive`` ``(G, rows, d)`` (the other kept rows' positives are the
    negatives, ``hard`` one more per row): ``(G,)``, 0 for a user without a kept row."""
    logits = torch.bmm(anchor, positive.transpose(1, 2)).masked_fill(~keep[:, None, :], -1e9 * tau)
    if hard is not None:
        logits = torch.cat([logits, (anchor * hard).sum(-1, keepdim=True)], dim=2)
    log_p = torch.log_softmax(logits / tau, -1).diagonal(dim1=1, dim2=2)
    return -(log_p * keep).sum(1) / keep.sum(1).clamp(min=1)


class _ViewContrast:
    """LUMOS's tri-view InfoNCE terms (:meth:`lumosrec.models.lumos.LUMOS.contrastive_loss`) for a
    group of users with stacked weights: each user's contrastive rows against its own batch's
    views, with its own head; the same view sequences (:meth:`LUMOS.view_sequences`) and loss.

    A view sequence is its row's prefix up to a point, then the view's items: the future view
    appends them, the others replace the prefix's tail. Where no view sequence is cut at
    ``max-len`` (a future view past it is), only the view's items are encoded, attending to the
    batch's own encoding of the prefix (:func:`_encode_continuations`): a view costs its
    items' tokens, not the prefix's again."""

    def __init__(self, model: LUMOS, views: UserViews, own: list[np.ndarray]) -> None:
        self.model, self.views, self.own = model, views, own  # own: each user's input items, sorted

    def loss(self, step: _GroupPass) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each user's weighted InfoNCE terms ``(G,)``, and the views' inputs: positions in the
        users' own items and their embeddings (a leaf of the graph, for the input-side gradient)."""
        model, views, device = self.model, self.views, step.anchors.device
        chosen, sequences, prefixes = [], [], []
        for u in step.group:
            items, lengths, _, _ = step.batches[u]
            picked = torch.arange(len(lengths))
            if 0 < model.config.contrastive_rows < len(lengths):
                picked = torch.randperm(len(lengths))[: model.config.contrastive_rows]
            chosen.append(picked)
            prefixes.append(lengths[picked])
            users = torch.full((len(picked),), u, dtype=torch.long)
            sequences.append(model.view_sequences(items[picked], lengths[picked], users, views))
        names, size, rows = list(sequences[0]), len(step.group), max(map(len, chosen))
        # a future view cut at max-len shifts its prefix's positions: encoded whole
        continued = "future" not in names or all(
            bool((row_views["future"][1] == prefix + int(views.lengths["future"][u])).all())
            for u, prefix, row_views in zip(step.group, prefixes, sequences)
        )
        # per user, view after view, each contrastive row's tokens to encode (padded to ``rows``), from
        # where its view sequence departs from its prefix: the future view after it, the others where
        # their items replace its tail (when continued; from the start otherwise)
        tokens, starts = [], []
        present = torch.zeros(size, len(names), rows, dtype=torch.bool)  # the row is real and has the view
        empty = np.zeros(0, dtype=np.int64)
        for g, (u, prefix, row_views) in enumerate(zip(step.group, prefixes, sequences)):
            user_tokens, user_starts = [], []
            for v, (name, (seq, seq_lengths, has)) in enumerate(row_views.items()):
                begin = prefix if name == "future" else prefix - prefix.clamp(max=int(views.lengths[name][u]))
                begin = begin.tolist() if continued else [0] * len(prefix)
                user_tokens += [seq[r, begin[r] : int(seq_lengths[r])].numpy() for r in range(len(prefix))]
                user_tokens += [empty] * (rows - len(prefix))
                user_starts += begin + [0] * (rows - len(prefix))
                present[g, v, : len(prefix)] = has
            tokens.append(user_tokens)
            starts.append(user_starts)
        anchor_rows = torch.tensor([picked.tolist() + [0] * (rows - len(picked)) for picked in chosen], device=device)
        local, lengths, emb, used = step.embed(self.own, tokens)
        if continued:
            context_rows = (torch.zeros_like(anchor_rows) if step.whole else anchor_rows).repeat(1, len(names))
            start = torch.tensor(starts, device=device)
            hidden = _encode_continuations(step.p, step.config, used, start, step.context, context_rows, step.training)
        else:
            hidden = _encode_positions(step.p, step.config, used, step.training)
        encoded = _project(step.head, step.last(hidden, lengths))
        z = dict(zip(names, encoded.view(size, len(names), rows, -1).unbind(1)))
        has = dict(zip(names, present.to(device).unbind(1)))
        anchor = _project(step.head, step.anchors[torch.arange(size, device=device)[:, None], anchor_rows])
        total = step.anchors.new_zeros(size)
        hard = z.get("counterfactual")
        for name, weight in (("future", model.config.lambda_future), ("paraphrase", model.config.lambda_paraphrase)):
            if name in z:
                keep = has[name] & has["counterfactual"] if hard is not None else has[name]
                total = total + weight * _info_nce(anchor, z[name], keep, model.config.tau, hard)
        return total, local, emb


class _AugmentContrast:
    """CL4SRec's contrast of two augmented views of each batch row (:meth:`lumosrec.models.cl4srec.
    CL4SRec.loss`: symmetric InfoNCE, in-batch negatives) for a group of users with stacked weights;
    the augmentations are those the user's own stream drew for the step (:meth:`CL4SRec.augmented_views`)."""

    def __init__(self, model: CL4SRec, own: list[np.ndarray]) -> None:
        self.model, self.own = model, own

    def loss(self, step: _GroupPass) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each user's weighted contrast ``(G,)``, the views' positions in its own items and their
        embeddings (a leaf of the graph)."""
        rows = max(len(step.batches[u][2]) for u in step.group)
        tokens = []
        for u in step.group:
            both = []
            for items, lengths in step.drawn[u]:
                view = [items[r, : int(n)].numpy() for r, n in enumerate(lengths)]
                both += view + [np.zeros(0, dtype=np.int64)] * (rows - len(view))
            tokens.append(both)
        local, lengths, emb, used = step.embed(self.own, tokens)
        encoded = step.last(_encode_positions(step.p, step.config, used, step.training), lengths)
        first, second = encoded[:, :rows], encoded[:, rows:]
        keep = torch.zeros(len(step.group), rows, dtype=torch.bool, device=encoded.device)
        for g, u in enumerate(step.group):
            keep[g, : len(step.batches[u][2])] = True
        tau = self.model.config.temperature
        symmetric = 0.5 * (_info_nce(first, second, keep, tau) + _info_nce(second, first, keep, tau))
        return self.model.config.cl_weight * symmetric, local, emb


@dataclass
class _CohortState:
    """Every user's model during local training: stacked transformer weights, and the item table
    as the shared start ``table0`` plus low-rank softmax factors and exact own rows."""

    table0: torch.Tensor
    sequences: list[np.ndarray]  # each user's training sequence
    theta: dict[str, torch.Tensor]  # name -> (users, ...) weights
    heads: dict[str, torch.Tensor]  # name -> (users, ...) private projection heads (LUMOS's InfoNCE terms)
    theta0: dict[str, torch.Tensor]  # name -> the received weights every user started from
    own: list[np.ndarray]  # the only items a user ever inputs (its sequence, its views), sorted
    own_rows: list[torch.Tensor]  # their current rows, exact
    own_sparse: list[torch.Tensor]  # their input-side updates
    all_q: torch.Tensor  # c * Q of every user's every step, one buffer: (all plan rows, items)
    all_h: torch.Tensor  # H of every step, (all plan rows, d)
    factor_q: list[torch.Tensor]  # a user's part of all_q (epochs x samples rows)
    factor_h: list[torch.Tensor]  # a user's part of all_h
    filled: list[int]  # rows of the factors used so far
    loss_sums: list[float]  # each user's summed per-sample training loss

    @classmethod
    def start(
        cls,
        model: SASRec,
        sequences: list[np.ndarray],
        plans: list[list[np.ndarray]],
        inputs: list[np.ndarray],
        heads: list[dict[str, torch.Tensor]] | None = None,
    ) -> _CohortState:
        """``inputs[k]``: every item user ``k`` ever inputs; ``heads``: each user's private head."""
        table0, shared = model.item_embedding.weight.detach(), model.shared_state_dict()
        users, (items_total, width), dtype, device = len(sequences), table0.shape, table0.dtype, table0.device
        own = [np.unique(items[items > 0]) for items in inputs]
        sizes = [sum(map(len, plan)) for plan in plans]
        all_q = torch.zeros(sum(sizes), items_total, dtype=dtype, device=device)
        all_h = torch.zeros(sum(sizes), width, dtype=dtype, device=device)
        return cls(
            table0=table0,
            sequences=sequences,
            # the backbone only: a model's private parameters (LUMOS's head) are neither trained here nor sent
            theta={
                name: p.detach().unsqueeze(0).repeat(users, *([1] * p.dim()))
                for name, p in model.named_parameters()
                if name != TABLE and name in shared
            },
            heads={name: torch.stack([head[name] for head in heads]).to(device) for name in heads[0]} if heads else {},
            theta0={
                name: p.detach().clone() for name, p in model.named_parameters() if name != TABLE and name in shared
            },
            own=own,
            own_rows=[table0[torch.from_numpy(items).to(device)].clone() for items in own],
            own_sparse=[torch.zeros(len(items), width, dtype=dtype, device=device) for items in own],
            all_q=all_q,
            all_h=all_h,
            factor_q=list(all_q.split(sizes)),
            factor_h=list(all_h.split(sizes)),
            filled=[0] * users,
            loss_sums=[0.0] * users,
        )

    def mean(
        self, weights: torch.Tensor, row_defence: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """The ``weights``-weighted mean of the users' models, as a state dict; ``row_defence``
        (see :func:`train_batched`) needs each user's whole change of the table, one at a time."""
        with torch.no_grad():
            if row_defence is None:
                # every plan row is filled by the end of training; each user's rows weighted by its weight
                rows = torch.tensor([len(h) for h in self.factor_h], device=weights.device)
                row_weights = torch.repeat_interleave(weights, rows)
                table = self.table0 + self.all_q.T @ (self.all_h * row_weights[:, None])
                for w, items, sparse in zip(weights, self.own, self.own_sparse):
                    table.index_add_(0, torch.from_numpy(items).to(table.device), w * sparse)
            else:
                table = self.table0.clone()
                for user, (w, items, sparse) in enumerate(zip(weights, self.own, self.own_sparse)):
                    change = (self.factor_q[user].T @ self.factor_h[user]).index_add_(
                        0, torch.from_numpy(items).to(table.device), sparse
                    )
                    table += w * row_defence(user, change)
            mean = {name: torch.einsum("k,k...->...", weights, stacked) for name, stacked in self.theta.items()}
        return {TABLE: table, **mean}

    def private(self) -> list[dict[str, torch.Tensor]]:
        """Each user's private parameters (none without the InfoNCE terms)."""
        users = len(self.sequences) if self.heads else 0
        return [{name: stacked[k].detach().clone() for name, stacked in self.heads.items()} for k in range(users)]

    def scale_update(self, user: int, factor: float) -> None:
        """Multiply ``user``'s update (its model minus the start) by ``factor``, after training."""
        with torch.no_grad():
            self.factor_q[user].mul_(factor)
            self.own_sparse[user].mul_(factor)
            for name, stacked in self.theta.items():
                start = self.theta0[name]
                stacked[user] = start + factor * (stacked[user] - start)

    def _filled_factors(self, user: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``user``'s softmax factors (c * Q, H) of the steps taken so far."""
        return self.factor_q[user][: self.filled[user]], self.factor_h[user][: self.filled[user]]

    def step(
        self,
        group: list[int],
        batches: dict,
        config: SASRecConfig,
        lr: float,
        max_grad_norm: float,
        training: bool,
        whole: bool,
        item_terms: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        contrast: _ViewContrast | _AugmentContrast | None = None,
        drawn: dict | None = None,
    ) -> None:
        """One SGD step of a group of users whose batches are padded to one shape. ``whole``: every
        prefix of these users fits in max-len, so one causal pass over each user's sequence (all
        but its last item) encodes all of its batch's prefixes: the hidden state at position
        ``k`` is prefix ``k + 1``'s. Without dropout that is the per-sample arithmetic exactly;
        with dropout, a step's prefixes share the masks of the positions they share (each
        prefix's masks are still drawn as in the loop, the prefixes are no longer independent).
        ``item_terms(log_probs, users, targets)``: extra per-row losses over the rows' log-softmax
        (``users`` = the rows' users' indices), whose gradient joins the softmax's. ``contrast``:
        a contrastive term over other sequences (LUMOS's views with the users' heads, CL4SRec's
        augmentations ``drawn`` for the users' batches)."""
        table0, own, device = self.table0, self.own, self.table0.device
        size, dtype = len(group), table0.dtype
        rows = max(len(batches[u][2]) for u in group)
        inputs = 1 if whole else rows
        length = max(len(self.sequences[u]) - 1 if whole else batches[u][0].shape[1] for u in group)
        owned = max(len(own[u]) for u in group)
        local = torch.zeros(size, inputs, length, dtype=torch.long)
        lengths = torch.ones(size, rows, dtype=torch.long)
        targets = torch.zeros(size, rows, dtype=torch.long)
        weight = torch.zeros(size, rows, dtype=dtype)
        own_items = torch.zeros(size, owned, dtype=torch.long)
        for g, u in enumerate(group):
            items, n_lengths, n_targets, _ = batches[u]
            n = len(n_targets)
            # positions in the user's own items; padding maps to one of them, which a causal encoder
            # never lets reach the last real position
            if whole:
                sequence = self.sequences[u][:-1]
                local[g, 0, : len(sequence)] = torch.from_numpy(np.searchsorted(own[u], sequence))
            else:
                local[g, :n, : items.shape[1]] = torch.from_numpy(np.searchsorted(own[u], items.numpy()))
            lengths[g, :n], targets[g, :n], weight[g, :n] = n_lengths, n_targets, 1.0 / n
            own_items[g, : len(own[u])] = torch.from_numpy(own[u])
        local, lengths, targets = local.clamp(max=owned - 1).to(device), lengths.to(device), targets.to(device)
        weight, own_items = weight.to(device), own_items.to(device)
        rows_now = torch.zeros(size, owned, table0.shape[1], dtype=dtype, device=device)
        sparse = torch.zeros_like(rows_now)
        for g, u in enumerate(group):
            rows_now[g, : len(own[u])], sparse[g, : len(own[u])] = self.own_rows[u], self.own_sparse[u]
        index = torch.tensor(group, device=device)
        p = {name: stacked[index].requires_grad_(True) for name, stacked in self.theta.items()}
        emb = rows_now[torch.arange(size, device=device)[:, None, None], local].requires_grad_(True)
        context: KeysValues | None = [] if contrast is not None else None
        hidden = _encode_positions(p, config, emb, training, context)
        last = (lengths - 1).clamp(min=0)
        h = hidden[torch.arange(size)[:, None], 0 if whole else torch.arange(rows)[None, :], last]
        contrastive = None
        if contrast is not None:
            head = {name: stacked[index].requires_grad_(True) for name, stacked in self.heads.items()}
            contrastive, view_local, view_emb = contrast.loss(
                _GroupPass(
                    group, batches, drawn or {}, p, head, rows_now, table0[0], h, context, whole, config, training
                )
            )
        spread = own_items[:, None, :].expand(size, rows, owned)
        with torch.no_grad():
            logits = torch.matmul(h, table0.T)
            for g, u in enumerate(group):
                if self.filled[u]:
                    used_q, used_h = self._filled_factors(u)
                    logits[g] += (h[g] @ used_h.T) @ used_q
            logits.scatter_add_(2, spread, torch.bmm(h, sparse.transpose(1, 2)))
            logits[:, :, 0] = -torch.inf
            log_q = torch.log_softmax(logits, -1)
            # each row's share of its user's mean loss (padded rows, whose target is padding, give 0)
            row_loss = torch.where(weight > 0, -log_q.gather(2, targets[:, :, None]).squeeze(2), 0.0) * weight
            q = log_q.exp_()
            q[torch.arange(size)[:, None], torch.arange(rows)[None, :], targets] -= 1.0
            q *= weight[:, :, None]  # d(mean loss)/d logits; zero on padded rows
            if item_terms is not None:
                with torch.enable_grad():
                    free = logits.requires_grad_(True)
                    users = index[:, None].expand(size, rows)
                    extra = item_terms(torch.log_softmax(free, -1), users, targets) * weight
                    q += torch.autograd.grad(extra.sum(), free)[0]
                row_loss = row_loss + extra.detach()
            q_own = q.gather(2, spread)
            grad_h = torch.matmul(q, table0) + torch.bmm(q_own, sparse)
            for g, u in enumerate(group):
                if self.filled[u]:
                    used_q, used_h = self._filled_factors(u)
                    grad_h[g] += (q[g] @ used_q.T) @ used_h
        names = list(p)
        leaves, outputs, grad_outputs = [p[name] for name in names] + [emb], [h], [grad_h]
        if contrastive is not None:
            leaves += [*head.values(), view_emb]
            outputs.append(contrastive.sum())
            grad_outputs.append(torch.ones((), dtype=dtype, device=device))
        found = list(torch.autograd.grad(outputs, leaves, grad_outputs=grad_outputs))
        grads, grad_emb, head_grads = found[: len(names)], found[len(names)], found[len(names) + 1 : -1]
        with torch.no_grad():
            input_side = torch.zeros_like(sparse)
            embedded = [(local, grad_emb)] if contrastive is None else [(local, grad_emb), (view_local, found[-1])]
            for positions, grad in embedded:
                input_side.scatter_add_(
                    1,
                    positions.reshape(size, -1, 1).expand(-1, -1, sparse.shape[2]),
                    grad.reshape(size, -1, sparse.shape[2]),
                )
            hd = h.detach()
            output_own = torch.bmm(q_own.transpose(1, 2), hd)  # the softmax gradient on the user's own rows
            square = sum(grad.pow(2).flatten(1).sum(1) for grad in grads + head_grads)
            square = square + (torch.bmm(q, q.transpose(1, 2)) * torch.bmm(hd, hd.transpose(1, 2))).sum((1, 2))
            square = square + 2 * (output_own * input_side).sum((1, 2)) + input_side.pow(2).sum((1, 2))
            if max_grad_norm > 0:  # clip_grad_norm_'s factor, per user
                scale = (max_grad_norm / (square.sqrt() + 1e-6)).clamp(max=1.0)
            else:
                scale = torch.ones_like(square)
            for stacked, grad in zip([*(self.theta[name] for name in names), *self.heads.values()], grads + head_grads):
                stacked[index] -= lr * scale.view(-1, *([1] * (grad.dim() - 1))) * grad
            step = (-lr * scale)[:, None, None]
            per_user = row_loss.sum(1) if contrastive is None else row_loss.sum(1) + contrastive.detach()
            losses = (per_user * torch.tensor([len(batches[u][2]) for u in group], device=device)).tolist()
            for g, u in enumerate(group):
                n, mine = len(batches[u][2]), len(own[u])
                self.own_rows[u] += (step[g] * (output_own[g] + input_side[g]))[:mine]
                self.own_sparse[u] += (step[g] * input_side[g])[:mine]
                self.factor_q[u][self.filled[u] : self.filled[u] + n] = step[g] * q[g, :n]
                self.factor_h[u][self.filled[u] : self.filled[u] + n] = hd[g, :n]
                self.filled[u] += n
                self.loss_sums[u] += losses[g]
