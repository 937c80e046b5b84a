"""Leave-one-out split and full-ranking evaluation (DESIGN.md §1).

The same code scores centralized and federated models. A user's contribution is the rank
of its target among all ``N`` items; ranks are accumulated into :class:`RankCounts`, an
integer histogram that sums exactly across clients, so a federated evaluation equals the
centralized one bit for bit.

Protocols
---------
``unmasked``
    Every item competes with the target (the SRA-CL code's protocol, the default).
``masked``
    Items of the user's history before the target are removed from the ranking (for the
    test item this includes the validation item), as PTF-FedSeqRec does. The target itself
    is never removed, even when the user consumed it before.

Ties are counted against the target, so a model that scores every item alike ranks the
target last instead of first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from lumosrec.core.batching import pad_sequences

CUTOFFS = (10, 20)
MRR_CUTOFF = 10
MAX_CUTOFF = max(CUTOFFS)
PROTOCOLS = ("unmasked", "masked")
STAGES = ("valid", "test")
METRIC_NAMES = (*tuple(f"{m}@{k}" for m in ("HR", "NDCG") for k in CUTOFFS), f"MRR@{MRR_CUTOFF}")
#: the metrics of an evaluation reply: the node's user count and one rank histogram per stage and protocol
REPLY_METRICS = ("num-examples", *(f"{stage}-{protocol}-at-rank" for stage in STAGES for protocol in PROTOCOLS))


class Scorer(Protocol):
    """Anything that scores all items for a batch of left-aligned sequences."""

    def score(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Return scores of shape ``(B, num_items + 1)``; column 0 is padding."""
        ...


@dataclass
class LeaveOneOut:
    """Per user: training prefix, validation target (second-to-last), test target (last)."""

    train: list[np.ndarray]
    valid: np.ndarray
    test: np.ndarray
    num_items: int

    def histories(self, stage: str) -> list[np.ndarray]:
        """What the model sees before predicting ``stage``'s target."""
        if stage == "valid":
            return self.train
        return [np.append(t, v) for t, v in zip(self.train, self.valid)]

    def targets(self, stage: str) -> np.ndarray:
        return self.valid if stage == "valid" else self.test

    def subset(self, users: Sequence[int]) -> LeaveOneOut:
        """The split restricted to some users (a federated client's share)."""
        users = list(users)
        return LeaveOneOut([self.train[u] for u in users], self.valid[users], self.test[users], self.num_items)


def leave_one_out(sequences: Sequence[np.ndarray], num_items: int) -> LeaveOneOut:
    """Split every sequence into training prefix, validation item and test item."""
    too_short = [i for i, s in enumerate(sequences) if len(s) < 3]
    if too_short:
        raise ValueError(f"{len(too_short)} sequence(s) shorter than 3 cannot be split")
    return LeaveOneOut(
        train=[s[:-2] for s in sequences],
        valid=np.array([s[-2] for s in sequences], dtype=np.int64),
        test=np.array([s[-1] for s in sequences], dtype=np.int64),
        num_items=num_items,
    )


@dataclass
class RankCounts:
    """How many targets landed at each rank ``0..MAX_CUTOFF-1``, and out of how many users."""

    at_rank: np.ndarray
    users: int

    @classmethod
    def empty(cls) -> RankCounts:
        return cls(np.zeros(MAX_CUTOFF, dtype=np.int64), 0)

    @classmethod
    def from_ranks(cls, ranks: np.ndarray) -> RankCounts:
        ranks = np.asarray(ranks, dtype=np.int64)
        at_rank = np.bincount(ranks[ranks < MAX_CUTOFF], minlength=MAX_CUTOFF).astype(np.int64)
        return cls(at_rank, int(ranks.size))

    def __add__(self, other: RankCounts) -> RankCounts:
        return RankCounts(self.at_rank + other.at_rank, self.users + other.users)

    def metrics(self) -> dict[str, float]:
        """HR@k, NDCG@k (one relevant item: ``1 / log2(rank + 2)``) and MRR@10."""
        if self.users == 0:
            return {name: 0.0 for name in METRIC_NAMES}
        ranks = np.arange(MAX_CUTOFF)
        gains = 1.0 / np.log2(ranks + 2.0)
        out = {}
        for k in CUTOFFS:
            out[f"HR@{k}"] = float(self.at_rank[:k].sum() / self.users)
        for k in CUTOFFS:
            out[f"NDCG@{k}"] = float((self.at_rank[:k] * gains[:k]).sum() / self.users)
        out[f"MRR@{MRR_CUTOFF}"] = float((self.at_rank[:MRR_CUTOFF] / (ranks[:MRR_CUTOFF] + 1.0)).sum() / self.users)
        return out


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of each target among items ``1..N``; ties count against the target.

    Parameters
    ----------
    scores : Tensor, shape (B, N + 1)
    targets : LongTensor, shape (B,)
    exclude : BoolTensor, shape (B, N + 1), optional
        Items removed from the ranking (the ``masked`` protocol). Never the target.
    """
    scores = scores.float().clone()
    scores[:, 0] = -torch.inf
    if exclude is not None:
        scores = scores.masked_fill(exclude, -torch.inf)
    target_scores = scores.gather(1, targets[:, None])
    higher = (scores > target_scores).sum(1)
    tied = (scores == target_scores).sum(1) - 1
    return higher + tied


def history_mask(histories: Sequence[np.ndarray], targets: torch.Tensor, num_items: int) -> torch.Tensor:
    """Boolean ``(B, N + 1)`` mask of each user's full history, the target left out."""
    mask = torch.zeros(len(histories), num_items + 1, dtype=torch.bool)
    rows = np.repeat(np.arange(len(histories)), [len(h) for h in histories])
    mask[torch.from_numpy(rows), torch.from_numpy(np.concatenate(histories))] = True
    mask[torch.arange(len(histories)), targets] = False
    return mask


@torch.no_grad()
def rank_counts(
    model: Scorer,
    split: LeaveOneOut,
    stage: str,
    max_len: int,
    protocols: Sequence[str] = PROTOCOLS,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
) -> dict[str, RankCounts]:
    """Rank every user's ``stage`` target against all items, per protocol."""
    histories, targets = split.histories(stage), split.targets(stage)
    counts = {protocol: RankCounts.empty() for protocol in protocols}
    if isinstance(model, torch.nn.Module):
        model.eval()
    for start in range(0, len(histories), batch_size):
        batch_histories = histories[start : start + batch_size]
        batch_targets = torch.from_numpy(targets[start : start + batch_size])
        items, lengths = pad_sequences(batch_histories, max_len)
        scores = model.score(items.to(device), lengths.to(device)).cpu()
        for protocol in protocols:
            exclude = history_mask(batch_histories, batch_targets, split.num_items) if protocol == "masked" else None
            ranks = target_ranks(scores, batch_targets, exclude).numpy()
            counts[protocol] = counts[protocol] + RankCounts.from_ranks(ranks)
    return counts


def evaluate(
    model: Scorer,
    split: LeaveOneOut,
    stage: str,
    max_len: int,
    protocols: Sequence[str] = PROTOCOLS,
    device: torch.device | str = "cpu",
) -> dict[str, dict[str, float]]:
    """Metrics of ``model`` on ``stage`` (``valid`` or ``test``), one dict per protocol."""
    counts = rank_counts(model, split, stage, max_len, protocols, device=device)
    return {protocol: c.metrics() for protocol, c in counts.items()}
