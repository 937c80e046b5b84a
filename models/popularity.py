"""Most-popular baseline: every user gets the items ranked by training-set frequency."""

from __future__ import annotations

import numpy as np
import torch


class Popularity:
    """Scores every item by its interaction count in the training prefixes."""

    def __init__(self, train_sequences: list[np.ndarray], num_items: int) -> None:
        counts = np.bincount(np.concatenate(train_sequences), minlength=num_items + 1).astype(np.float32)
        counts[0] = 0.0
        self.counts = torch.from_numpy(counts)

    def score(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.counts.to(items.device).expand(items.shape[0], -1)
