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
Supports the ``sasrec`` objective, and ``lumos`` when only its item-level view terms are on
(future items as extra targets, counterfactual items' unlikelihood: per-row terms on the same
softmax, so their gradient is one more ``Q``), with SGD, clipping, any epochs and batch size; the
others train in the loop (:func:`batched_refusal`). What each user's own node would do to its
update before sending it (the item-row defence, rounded example counts, a simulated attacker's
scaling) is done per user here too, so that a cohort still replies what its users' nodes would.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lumosrec.client.privacy import local_dp_on
from lumosrec.core.batching import PrefixSamples
from lumosrec.models.lumos import UserViews
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


def train_batched(
    model: SASRec,
    sequences: list[np.ndarray],
    rngs: list[np.random.Generator],
    epochs: int,
    batch_size: int,
    learning_rate: float,
    max_grad_norm: float,
    views: UserViews | None = None,
    weights: list[int] | None = None,
    row_defence: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    update_factors: list[float] | None = None,
) -> CohortUpdate:
    """Train each user (training sequence ``sequences[k]``, shuffled by ``rngs[k]``) on its own
    from ``model``'s weights with SGD for ``epochs`` epochs; return the example-weighted mean of
    the users' models. ``model`` is left unchanged; dropout is on when ``model.training``.
    ``views`` (row ``k`` for user ``k``) add LUMOS's item-level view terms
    (:meth:`lumosrec.models.lumos.LUMOS.view_item_terms`) to each user's loss; ``model`` is then
    a LUMOS model whose contrastive terms and substitution are off. ``weights`` are the users'
    weights in the mean (default: their training samples); ``row_defence(k, change)`` returns what
    user ``k`` sends of its change of the item table (the item-row defence, per user as on its own
    node; default: the change itself). ``update_factors`` multiply each user's update (a
    simulated attacker's, :func:`lumosrec.client.threats.update_factor`; default: all 1)."""
    item_terms = None
    if views is not None:

        def item_terms(log_probs: torch.Tensor, users: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return model.view_item_terms(log_probs, users, targets, views)

    samples = [PrefixSamples([sequence], model.config.max_len) for sequence in sequences]
    plans = [[b for _ in range(epochs) for b in s.epoch(batch_size, rng)] for s, rng in zip(samples, rngs)]
    state = _CohortState.start(model, sequences, plans)
    # a user whose every prefix fits in max-len is encoded in one pass over its sequence
    one_pass = [len(sequence) - 1 <= model.config.max_len for sequence in sequences]
    for step in range(max(map(len, plans))):
        batches = {u: samples[u].batch(plans[u][step]) for u in range(len(samples)) if step < len(plans[u])}
        for whole in (True, False):
            shapes = [
                (u, len(b[2]), len(sequences[u]) - 1 if whole else b[0].shape[1])
                for u, b in batches.items()
                if one_pass[u] == whole
            ]
            for group in _shape_groups(shapes):
                state.step(
                    group, batches, model.config, learning_rate, max_grad_norm, model.training, whole, item_terms
                )
    for user, factor in enumerate(update_factors or []):
        if factor != 1.0:
            state.scale_update(user, factor)
    counts = weights or [len(s) for s in samples]
    shares = torch.tensor(counts, dtype=state.table0.dtype, device=state.table0.device) / sum(counts)
    seen = [sum(map(len, plan)) for plan in plans]
    loss = sum(count * total / max(n, 1) for count, total, n in zip(counts, state.loss_sums, seen)) / sum(counts)
    return CohortUpdate(state.mean(shares, row_defence), float(loss), sum(counts), sum(seen))


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


def _norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=eps) * weight.unsqueeze(1) + bias.unsqueeze(1)


def _encode_positions(p: dict, config: SASRecConfig, emb: torch.Tensor, training: bool) -> torch.Tensor:
    """SASRec's encoder (:meth:`SASRec.encode_positions`) with per-user weights ``p`` (each
    ``(G, ...)``): input embeddings ``emb`` ``(G, B, L, d)`` -> hidden states ``(G, B, L, d)``."""
    groups, rows, length, width = emb.shape
    drop, eps = config.dropout if training else 0.0, config.layer_norm_eps
    hidden = (emb + p["position_embedding.weight"][:, None, :length]).reshape(groups, rows * length, width)
    hidden = F.dropout(_norm(hidden, p["input_norm.weight"], p["input_norm.bias"], eps), drop, training)
    for layer in range(config.num_layers):
        w = {name: p[f"layers.{layer}.{name}"] for name in LAYER_WEIGHTS}
        qkv = _linear(hidden, w["qkv.weight"], w["qkv.bias"])
        q, k, v = qkv.view(groups * rows, length, 3, config.num_heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        attended = attended.transpose(1, 2).reshape(groups, rows * length, width)
        out = F.dropout(_linear(attended, w["out.weight"], w["out.bias"]), drop, training)
        hidden = _norm(hidden + out, w["attention_norm.weight"], w["attention_norm.bias"], eps)
        inner = _linear(F.gelu(_linear(hidden, w["inner.weight"], w["inner.bias"])), w["outer.weight"], w["outer.bias"])
        hidden = _norm(hidden + F.dropout(inner, drop, training), w["ffn_norm.weight"], w["ffn_norm.bias"], eps)
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


@dataclass
class _CohortState:
    """Every user's model during local training: stacked transformer weights, and the item table
    as the shared start ``table0`` plus low-rank softmax factors and exact own rows."""

    table0: torch.Tensor
    sequences: list[np.ndarray]  # each user's training sequence
    theta: dict[str, torch.Tensor]  # name -> (users, ...) weights
    theta0: dict[str, torch.Tensor]  # name -> the received weights every user started from
    own: list[np.ndarray]  # the only items a user ever inputs, sorted
    own_rows: list[torch.Tensor]  # their current rows, exact
    own_sparse: list[torch.Tensor]  # their input-side updates
    all_q: torch.Tensor  # c * Q of every user's every step, one buffer: (all plan rows, items)
    all_h: torch.Tensor  # H of every step, (all plan rows, d)
    factor_q: list[torch.Tensor]  # a user's part of all_q (epochs x samples rows)
    factor_h: list[torch.Tensor]  # a user's part of all_h
    filled: list[int]  # rows of the factors used so far
    loss_sums: list[float]  # each user's summed per-sample training loss

    @classmethod
    def start(cls, model: SASRec, sequences: list[np.ndarray], plans: list[list[np.ndarray]]) -> _CohortState:
        table0, shared = model.item_embedding.weight.detach(), model.shared_state_dict()
        users, (items_total, width), dtype, device = len(sequences), table0.shape, table0.dtype, table0.device
        own = [np.unique(sequence) for sequence in sequences]
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
    ) -> None:
        """One SGD step of a group of users whose batches are padded to one shape. ``whole``: every
        prefix of these users fits in max-len, so one causal pass over each user's sequence (all
        but its last item) encodes all of its batch's prefixes: the hidden state at position
        ``k`` is prefix ``k + 1``'s. Without dropout that is the per-sample arithmetic exactly;
        with dropout, a step's prefixes share the masks of the positions they share (each
        prefix's masks are still drawn as in the loop, the prefixes are no longer independent).
        ``item_terms(log_probs, users, targets)``: extra per-row losses over the rows' log-softmax
        (``users`` = the rows' users' indices), whose gradient joins the softmax's."""
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
        hidden = _encode_positions(p, config, emb, training)
        last = (lengths - 1).clamp(min=0)
        h = hidden[torch.arange(size)[:, None], 0 if whole else torch.arange(rows)[None, :], last]
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
        *grads, grad_emb = torch.autograd.grad(h, [p[name] for name in names] + [emb], grad_outputs=grad_h)
        with torch.no_grad():
            input_side = torch.zeros_like(sparse)
            input_side.scatter_add_(
                1,
                local.reshape(size, -1, 1).expand(-1, -1, sparse.shape[2]),
                grad_emb.reshape(size, -1, sparse.shape[2]),
            )
            hd = h.detach()
            output_own = torch.bmm(q_own.transpose(1, 2), hd)  # the softmax gradient on the user's own rows
            square = sum(grad.pow(2).flatten(1).sum(1) for grad in grads)
            square = square + (torch.bmm(q, q.transpose(1, 2)) * torch.bmm(hd, hd.transpose(1, 2))).sum((1, 2))
            square = square + 2 * (output_own * input_side).sum((1, 2)) + input_side.pow(2).sum((1, 2))
            if max_grad_norm > 0:  # clip_grad_norm_'s factor, per user
                scale = (max_grad_norm / (square.sqrt() + 1e-6)).clamp(max=1.0)
            else:
                scale = torch.ones_like(square)
            for name, grad in zip(names, grads):
                self.theta[name][index] -= lr * scale.view(-1, *([1] * (grad.dim() - 1))) * grad
            step = (-lr * scale)[:, None, None]
            losses = (row_loss.sum(1) * torch.tensor([len(batches[u][2]) for u in group], device=device)).tolist()
            for g, u in enumerate(group):
                n, mine = len(batches[u][2]), len(own[u])
                self.own_rows[u] += (step[g] * (output_own[g] + input_side[g]))[:mine]
                self.own_sparse[u] += (step[g] * input_side[g])[:mine]
                self.factor_q[u][self.filled[u] : self.filled[u] + n] = step[g] * q[g, :n]
                self.factor_h[u][self.filled[u] : self.filled[u] + n] = hd[g, :n]
                self.filled[u] += n
                self.loss_sums[u] += losses[g]
