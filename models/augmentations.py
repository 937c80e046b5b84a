"""CL4SRec's random sequence augmentations: crop, mask, reorder.

Reference
---------
Xu Xie et al. "Contrastive Learning for Sequential Recommendation." ICDE 2022.
https://arxiv.org/abs/2010.14395

Sequences are left-aligned rows of a padded matrix (see :mod:`lumosrec.core.batching`). Masked
items become the padding item ``0``, whose embedding is never trained (its initial random row):
a mask token that needs no extra row in the item table, so CL4SRec keeps SASRec's parameter
shapes (which a federation shares).
"""

from __future__ import annotations

import numpy as np
import torch


def crop(sequence: np.ndarray, eta: float, rng: np.random.Generator) -> np.ndarray:
    """A random contiguous sub-sequence keeping a fraction ``eta`` of the items."""
    keep = max(1, int(eta * len(sequence)))
    start = rng.integers(0, len(sequence) - keep + 1)
    return sequence[start : start + keep]


def mask(sequence: np.ndarray, gamma: float, rng: np.random.Generator) -> np.ndarray:
    """Replace a fraction ``gamma`` of the items by the mask (padding) item."""
    masked = sequence.copy()
    masked[rng.choice(len(sequence), int(gamma * len(sequence)), replace=False)] = 0
    return masked


def reorder(sequence: np.ndarray, beta: float, rng: np.random.Generator) -> np.ndarray:
    """Shuffle a random contiguous sub-sequence covering a fraction ``beta`` of the items."""
    span = int(beta * len(sequence))
    reordered = sequence.copy()
    if span > 1:
        start = rng.integers(0, len(sequence) - span + 1)
        reordered[start : start + span] = rng.permutation(reordered[start : start + span])
    return reordered


def augment_batch(
    items: torch.Tensor,
    lengths: torch.Tensor,
    rng: np.random.Generator,
    eta: float = 0.6,
    gamma: float = 0.3,
    beta: float = 0.6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented view per row, each by an operator drawn uniformly at random."""
    rows = items.cpu().numpy()
    views = []
    for row, length in zip(rows, lengths.tolist()):
        sequence = row[:length]
        operator = rng.integers(3)
        if operator == 0:
            views.append(crop(sequence, eta, rng))
        elif operator == 1:
            views.append(mask(sequence, gamma, rng))
        else:
            views.append(reorder(sequence, beta, rng))
    view_lengths = np.array([len(v) for v in views], dtype=np.int64)
    padded = np.zeros((len(views), int(view_lengths.max())), dtype=np.int64)
    for i, view in enumerate(views):
        padded[i, : len(view)] = view
    return torch.from_numpy(padded).to(items.device), torch.from_numpy(view_lengths).to(items.device)
