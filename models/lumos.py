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

    lambda_future: float = 0.02  # lambda_f; 0.02 beat 0.1 on ml-100k validation (docs/decisions.md)
    lambda_paraphrase: float = 0.02  # lambda_p
    tau: float = 0.2
    use_counterfactual: bool = True
    projection_size: int = 64
    #: samples of a batch that enter the InfoNCE terms (0: all); every view costs one more
    #: encoder pass over them, so this bounds the objective's cost at training time
    contrastive_rows: int = 16


class UserViews:
    """The views of the users of one node as padded item tables, row ``u`` for user ``u``.

    Parameters
    ----------
    views : sequence of mapping
        Per user (in the node's user order), ``{view name: item indices}``; a missing or empty
        view switches that user's term off (its mask row is false).
    """

    def __init__(self, views: Sequence[Mapping[str, Sequence[int]]]) -> None:
        self.items: dict[str, torch.Tensor] = {}
        self.lengths: dict[str, torch.Tensor] = {}
        for name in VIEW_NAMES:
            rows = [np.asarray(user.get(name, ()), dtype=np.int64) for user in views]
            self.items[name], self.lengths[name] = pad_sequences(rows, max((len(row) for row in rows), default=1))

    def __len__(self) -> int:
        return len(self.lengths[VIEW_NAMES[0]])


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
        for layer in self.projection:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()

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

    def loss(
        self,
        items: torch.Tensor,
        lengths: torch.Tensor,
        targets: torch.Tensor,
        users: torch.Tensor | None = None,
        views: UserViews | None = None,
    ) -> torch.Tensor:
        """Next-item cross-entropy plus the tri-view terms over ``views`` (the node's users'
        views, indexed by ``users``); without views, SASRec's loss alone."""
        anchors = self.encode(items, lengths)
        loss = self.recommendation_loss(anchors, targets)
        if views is None or users is None or not self._active_views():
            return loss
        rows = self.config.contrastive_rows
        if 0 < rows < len(items):
            chosen = torch.randperm(len(items), device=items.device)[:rows]
            anchors, items, lengths, users = anchors[chosen], items[chosen], lengths[chosen], users[chosen]
        return loss + self.contrastive_loss(anchors, items, lengths, users, views)
