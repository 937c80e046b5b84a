"""CL4SRec: SASRec plus a contrastive loss between two random augmentations.

Reference
---------
Xu Xie, Fei Sun, Zhaoyang Liu, Shiwen Wu, Jinyang Gao, Jiandong Zhang, Bolin Ding and Bin
Cui. "Contrastive Learning for Sequential Recommendation." ICDE 2022.
https://arxiv.org/abs/2010.14395

``L = L_rec + lambda * InfoNCE(h(aug_1(s)), h(aug_2(s)))`` with in-batch negatives and
temperature ``tau``; augmentations are crop (ratio ``eta``), mask (``gamma``) and reorder
(``beta``). The encoder and item table are SASRec's, so checkpoints are interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lumosrec.models.augmentations import augment_batch
from lumosrec.models.losses import symmetric_info_nce
from lumosrec.models.sasrec import SASRec, SASRecConfig


@dataclass
class CL4SRecConfig(SASRecConfig):
    """SASRec's hyper-parameters plus CL4SRec's."""

    cl_weight: float = 0.1  # lambda
    temperature: float = 1.0  # tau
    eta: float = 0.6
    gamma: float = 0.3
    beta: float = 0.6
    seed: int = 2024


class CL4SRec(SASRec):
    """SASRec trained with an extra augmentation-contrastive term."""

    def __init__(self, config: CL4SRecConfig) -> None:
        super().__init__(config)
        #: draws the augmentations of centralized training (a federated client passes its own)
        self.rng = np.random.default_rng(config.seed)

    def loss(
        self,
        items: torch.Tensor,
        lengths: torch.Tensor,
        targets: torch.Tensor,
        users: torch.Tensor | None = None,
        rng: np.random.Generator | None = None,
    ) -> torch.Tensor:
        """Next-item cross-entropy plus the augmentation contrast; ``rng`` draws the
        augmentations (the model's own generator when None)."""
        rec_loss = self.recommendation_loss(self.encode(items, lengths), targets)
        first, second = self.augmented_views(items, lengths, rng if rng is not None else self.rng)
        return rec_loss + self.config.cl_weight * symmetric_info_nce(
            self.encode(*first), self.encode(*second), self.config.temperature
        )

    def augmented_views(
        self, items: torch.Tensor, lengths: torch.Tensor, rng: np.random.Generator
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """The two augmented views ``(items, lengths)`` of a batch, drawn from ``rng`` (the batched
        cohort engine draws them here too, in the same order)."""
        config = self.config
        return tuple(augment_batch(items, lengths, rng, config.eta, config.gamma, config.beta) for _ in range(2))
