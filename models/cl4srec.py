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

from models.augmentations import augment_batch
from models.losses import symmetric_info_nce
from models.sasrec import SASRec, SASRecConfig


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
        #: draws the augmentations; a federated client replaces it with its own per round
        self.rng = np.random.default_rng(config.seed)

    def loss(self, items: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor,
             users: torch.Tensor | None = None) -> torch.Tensor:
        config = self.config
        rec_loss = self.recommendation_loss(self.encode(items, lengths), targets)
        first = self.encode(*augment_batch(items, lengths, self.rng, config.eta, config.gamma, config.beta))
        second = self.encode(*augment_batch(items, lengths, self.rng, config.eta, config.gamma, config.beta))
        return rec_loss + config.cl_weight * symmetric_info_nce(first, second, config.temperature)
