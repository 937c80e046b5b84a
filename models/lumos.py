r"""LUMOS: SASRec trained with a tri-view contrastive objective over on-device LLM views.

Reference
---------
Thi Minh Chau Nguyen, Minh Hieu Nguyen, Duc Anh Nguyen, Xuan Huong Tran, Thanh Trung Huynh
and Quoc Viet Hung Nguyen. "Empowering Contrastive Federated Sequential Recommendation with
LLMs." arXiv 2602.09306, 2026. https://arxiv.org/abs/2602.09306

.. math::

    L = L_{rec} + \lambda_f \, \mathrm{InfoNCE}(z, z_f; z_{cf}) + \lambda_p \, \mathrm{InfoNCE}(z, z_p; z_{cf})

``z = g(h)`` is a client-private projection head ``g`` over the SASRec representation ``h``
of a training prefix; ``z_f``, ``z_p`` and ``z_{cf}`` are the projections of the prefix's
*future*, *paraphrase* and *counterfactual* sequences, built from the user's views
(:mod:`lumosrec.augment.views`). Other rows' positives are in-batch negatives and the counterfactual
is an extra hard negative in both denominators; similarity is the cosine over ``tau``. The
contrastive terms use a random subset of ``contrastive_rows`` samples of each batch: every view
costs one more encoder pass over the rows it covers.

Beside the contrast, the views can act on the item table directly (issue 17; each a weight, 0 = off):

* the *future* items as extra, down-weighted next-item targets: ``w_f`` times the mean of their
  cross-entropy (``future_target_weight``), on the user's last ``future_horizon`` prefixes (the
  view continues the end of the history; 0: on every prefix);
* the *counterfactual* items as explicit negatives: ``w_c`` times the mean unlikelihood
  ``-log(1 - p(c | h))`` of the user's representation (``counterfactual_negative_weight``);
* the *paraphrase* items as input substitutions: each of the most recent items is replaced by its
  paraphrase item with probability ``paraphrase_substitution`` (a semantic augmentation).

The contrastive terms move the shared item embeddings only through the encoder; these terms put the
views' items into the softmax, where FedAvg learns the table.

The paper's formulas and weights are not public (``research/lumos.md``); how the views become
sequences is this project's reading, recorded in ``docs/decisions.md``:

* *future*: the prefix followed by the future items (a plausible continuation);
* *paraphrase*: the prefix with its most recent items replaced by the paraphrase items (same
  intent, other items);
* *counterfactual*: the prefix with its most recent items replaced by the counterfactual
  items, so that it differs from the paraphrase only in intent: a hard negative.

Only the backbone (:meth:`LUMOS.shared_state_dict`, SASRec's keys) is ever aggregated; the
projection head stays on the client.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lumosrec.core.batching import pad_sequences
from lumosrec.models.losses import info_nce
from lumosrec.models.sasrec import SASRec, SASRecConfig

VIEW_NAMES = ("future", "paraphrase", "counterfactual")


@dataclass
class LUMOSConfig(SASRecConfig):
    """SASRec's hyper-parameters plus the tri-view objective's."""

    # the InfoNCE terms are off by default: level with FedAvg at 2-6x its cost in the issue-17 sweep,
    # where the future targets on the last 5 prefixes won on both datasets (docs/decisions.md)
    lambda_future: float = 0.0  # lambda_f (0.02 was the default before the sweep)
    lambda_paraphrase: float = 0.0  # lambda_p
    tau: float = 0.2
    use_counterfactual: bool = True
    projection_size: int = 64
    #: samples of a batch that enter the InfoNCE terms (0: all); every view costs one more
    #: encoder pass over them, so this bounds the objective's cost at training time
    contrastive_rows: int = 16
    #: weight of the future items as extra next-item targets (0: off)
    future_target_weight: float = 1.0
    #: the future items are extra targets of the user's last this many prefixes (0: of every prefix)
    future_horizon: int = 5
    #: weight of the counterfactual items' unlikelihood (0: off)
    counterfactual_negative_weight: float = 0.0
    #: chance that each recent input item is replaced by its paraphrase item (0: off)
    paraphrase_substitution: float = 0.0

    @property
    def contrastive(self) -> bool:
        """Whether any InfoNCE term is on (each costs encoder passes over the views)."""
        return self.lambda_future > 0 or self.lambda_paraphrase > 0

    @property
    def item_level(self) -> bool:
        """Whether any item-level view term is on (future targets, counterfactual unlikelihood)."""
        return self.future_target_weight > 0 or self.counterfactual_negative_weight > 0


class UserViews:
    """The views of the users of one node as padded item tables, row ``u`` for user ``u``.

    Parameters
    ----------
    views : sequence of mapping
        Per user (in the node's user order), ``{view name: item indices}``; a missing or empty
        view switches that user's term off (its mask row is false).
    recent : sequence of sequence of int, optional
        Per user, the last training items whose prefixes take the future items as extra targets
        (``future_horizon``); None: every prefix does.
    """

    def __init__(
        self, views: Sequence[Mapping[str, Sequence[int]]], recent: Sequence[Sequence[int]] | None = None
    ) -> None:
        self.items: dict[str, torch.Tensor] = {}
        self.lengths: dict[str, torch.Tensor] = {}
        for name in VIEW_NAMES:
            rows = [np.asarray(user.get(name, ()), dtype=np.int64) for user in views]
            self.items[name], self.lengths[name] = pad_sequences(rows, max((len(row) for row in rows), default=1))
        self.recent = None
        if recent is not None:
            rows = [np.asarray(items, dtype=np.int64) for items in recent]
            self.recent, _ = pad_sequences(rows, max((len(row) for row in rows), default=1))

    def __len__(self) -> int:
        return len(self.lengths[VIEW_NAMES[0]])

    def row_items(self, user: int) -> np.ndarray:
        """Every item of row ``user``'s views."""
        return np.concatenate([self.items[name][user, : self.lengths[name][user]].numpy() for name in VIEW_NAMES])


def _append(
    items: np.ndarray, lengths: np.ndarray, extra: np.ndarray, extra_lengths: np.ndarray, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's sequence followed by its extra items, keeping the last ``max_len``."""
    rows = [np.concatenate([row[:n], more[:m]]) for row, n, more, m in zip(items, lengths, extra, extra_lengths)]
    return pad_sequences(rows, max_len)


def _replace_tail(
    items: np.ndarray, lengths: np.ndarray, extra: np.ndarray, extra_lengths: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's most recent ``min(n, m)`` items replaced by the first of its extra items."""
    rows = [
        np.concatenate([row[: n - min(n, m)], more[: min(n, m)]])
        for row, n, more, m in zip(items, lengths, extra, extra_lengths)
    ]
    return pad_sequences(rows, items.shape[1])


class LUMOS(SASRec):
    """SASRec with a private projection head and the tri-view contrastive loss."""

    PRIVATE_PREFIX = "projection."

    def __init__(self, config: LUMOSConfig) -> None:
        super().__init__(config)
        self.projection = nn.Sequential(
            nn.Linear(config.hidden_size, config.hidden_size),
            nn.ReLU(),
            nn.Linear(config.hidden_size, config.projection_size),
        )

    def shared_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone's arrays: exactly SASRec's keys, what a client sends."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(self.PRIVATE_PREFIX)}

    def private_state_dict(self) -> dict[str, torch.Tensor]:
        """The projection head's arrays: kept by the client, never sent."""
        return {
            k[len(self.PRIVATE_PREFIX) :]: v for k, v in self.state_dict().items() if k.startswith(self.PRIVATE_PREFIX)
        }

    def reset_private_parameters(self) -> None:
        """A freshly initialised projection head (from torch's current random state)."""
        _reset(self.projection)

    def fresh_private_state_dict(self) -> dict[str, torch.Tensor]:
        """The arrays of a freshly initialised projection head (from torch's current random state,
        as :meth:`reset_private_parameters` draws them); the model's own head is left as it is."""
        head = copy.deepcopy(self.projection)
        _reset(head)
        return {key: value.detach() for key, value in head.state_dict().items()}

    def load_shared_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load received backbone arrays; the projection head is left as it is."""
        missing, unexpected = self.load_state_dict(dict(state), strict=False)
        if unexpected or any(not key.startswith(self.PRIVATE_PREFIX) for key in missing):
            raise ValueError(f"backbone arrays do not match LUMOS: missing {missing}, unexpected {unexpected}")

    def view_sequences(
        self, items: torch.Tensor, lengths: torch.Tensor, users: torch.Tensor, views: UserViews
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per view, ``(items, lengths, has_view)`` of every sample's view sequence; ``users``
        index the rows of ``views``."""
        rows, counts, users = items.cpu().numpy(), lengths.cpu().numpy(), users.cpu()
        sequences = {}
        for name in self._active_views():
            extra = views.items[name][users].numpy()
            extra_lengths = views.lengths[name][users].numpy()
            if name == "future":
                seq, seq_lengths = _append(rows, counts, extra, extra_lengths, self.config.max_len)
            else:
                seq, seq_lengths = _replace_tail(rows, counts, extra, extra_lengths)
            sequences[name] = (
                seq.to(items.device),
                seq_lengths.to(items.device),
                torch.from_numpy(extra_lengths > 0).to(items.device),
            )
        return sequences

    def _active_views(self) -> list[str]:
        config = self.config
        active = [
            name
            for name, weight in (("future", config.lambda_future), ("paraphrase", config.lambda_paraphrase))
            if weight > 0
        ]
        if active and config.use_counterfactual:
            active.append("counterfactual")
        return active

    def contrastive_loss(
        self, anchors: torch.Tensor, items: torch.Tensor, lengths: torch.Tensor, users: torch.Tensor, views: UserViews
    ) -> torch.Tensor:
        """The weighted InfoNCE terms for a batch whose prefix representations are ``anchors``."""
        sequences = self.view_sequences(items, lengths, users, views)
        names = list(sequences)
        # one encoder pass for every view: the batch rows of each view stacked
        width = max(seq.shape[1] for seq, _, _ in sequences.values())
        stacked = torch.cat([F.pad(seq, (0, width - seq.shape[1])) for seq, _, _ in sequences.values()])
        encoded = self.encode(stacked, torch.cat([n for _, n, _ in sequences.values()]))
        projected = F.normalize(self.projection(encoded), dim=-1).split(len(items))
        z = dict(zip(names, projected))
        anchor = F.normalize(self.projection(anchors), dim=-1)
        negative, has_negative = None, None
        if "counterfactual" in z:
            negative, has_negative = z["counterfactual"], sequences["counterfactual"][2]
        total = anchors.new_zeros(())
        for name, weight in (("future", self.config.lambda_future), ("paraphrase", self.config.lambda_paraphrase)):
            if name not in z:
                continue
            keep = sequences[name][2]
            if negative is not None:
                keep = keep & has_negative
            if int(keep.sum()) == 0:
                continue
            hard = negative[keep] if negative is not None else None
            total = total + weight * info_nce(anchor[keep], z[name][keep], self.config.tau, hard_negatives=hard)
        return total

    def view_item_terms(
        self, log_probs: torch.Tensor, users: torch.Tensor, targets: torch.Tensor, views: UserViews
    ) -> torch.Tensor:
        """Each row's item-level view loss: the future items' mean cross-entropy times
        ``future_target_weight`` (on the rows of the user's last ``future_horizon`` prefixes: those
        whose target is one of ``views.recent``) plus the counterfactual items' mean unlikelihood
        times ``counterfactual_negative_weight``. ``log_probs`` (..., items) are the rows'
        log-softmax over the items, ``users`` (...) index the rows of ``views``, ``targets`` (...)
        are the rows' next items; a user without a view adds nothing. The batched cohort engine
        calls this too, so that both train the same loss."""
        config, total = self.config, log_probs.new_zeros(log_probs.shape[:-1])
        if config.future_target_weight > 0:
            future = views.items["future"].to(log_probs.device)[users]
            term = _masked_mean(-log_probs.gather(-1, future), future > 0)
            if views.recent is not None:
                recent = views.recent.to(log_probs.device)[users]
                near_end = ((recent == targets[..., None]) & (recent > 0)).any(-1)
                term = torch.where(near_end, term, torch.zeros((), dtype=term.dtype, device=term.device))
            total = total + config.future_target_weight * term
        if config.counterfactual_negative_weight > 0:
            negatives = views.items["counterfactual"].to(log_probs.device)[users]
            # clamped so that a certain negative gives a large finite loss, not inf
            chosen = log_probs.gather(-1, negatives).exp().clamp(max=1 - 1e-6)
            total = total + config.counterfactual_negative_weight * _masked_mean(-torch.log1p(-chosen), negatives > 0)
        return total

    def substitute_paraphrases(
        self, items: torch.Tensor, lengths: torch.Tensor, users: torch.Tensor, views: UserViews
    ) -> torch.Tensor:
        """``items`` with each of a row's most recent ``m = min(n, |paraphrase|)`` items replaced,
        with probability ``paraphrase_substitution``, by the paraphrase item in its place (the
        alignment of the paraphrase sequence: the ``i``-th of the last ``m`` items by item ``i``).
        Draws from torch's generator, which the client seeds per user and round."""
        paraphrase = views.items["paraphrase"].to(items.device)[users]
        m = torch.minimum(lengths, views.lengths["paraphrase"].to(items.device)[users])
        index = torch.arange(items.shape[1], device=items.device)[None, :] - (lengths - m)[:, None]
        inside = (index >= 0) & (index < m[:, None])
        replacement = paraphrase.gather(1, index.clamp(0, max(paraphrase.shape[1] - 1, 0)))
        swap = (
            inside
            & (replacement > 0)
            & (torch.rand(items.shape, device=items.device) < self.config.paraphrase_substitution)
        )
        return torch.where(swap, replacement, items)

    def loss(
        self,
        items: torch.Tensor,
        lengths: torch.Tensor,
        targets: torch.Tensor,
        users: torch.Tensor | None = None,
        views: UserViews | None = None,
    ) -> torch.Tensor:
        """Next-item cross-entropy plus the view terms over ``views`` (the node's users' views,
        indexed by ``users``): item-level, then tri-view; without views, SASRec's loss alone."""
        config = self.config
        if views is None or users is None:
            return super().loss(items, lengths, targets)
        if config.paraphrase_substitution > 0:
            items = self.substitute_paraphrases(items, lengths, users, views)
        anchors = self.encode(items, lengths)
        logits = self.item_logits(anchors)
        logits[:, 0] = -torch.inf
        log_probs = torch.log_softmax(logits, -1)
        loss = F.nll_loss(log_probs, targets)
        if config.item_level:
            loss = loss + self.view_item_terms(log_probs, users, targets, views).mean()
        if not self._active_views():
            return loss
        rows = config.contrastive_rows
        if 0 < rows < len(items):
            chosen = torch.randperm(len(items), device=items.device)[:rows]
            anchors, items, lengths, users = anchors[chosen], items[chosen], lengths[chosen], users[chosen]
        return loss + self.contrastive_loss(anchors, items, lengths, users, views)


def _reset(head: nn.Sequential) -> None:
    for layer in head:
        if isinstance(layer, nn.Linear):
            layer.reset_parameters()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over the last axis where ``mask`` holds (0 where it never does);
    masked-out values (inf for padding) reach neither the result nor the gradient."""
    kept = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return kept.sum(-1) / mask.sum(-1).clamp(min=1)
