r"""SRA-CL: semantic retrieval augmented contrastive learning on a SASRec backbone.

Reference
---------
Ziqiang Cui, Yunpeng Weng, Xing Tang, Xiaokun Zhang, Shiwei Li, Peiyang Liu, Bowei He,
Dugang Liu, Weihong Luo, Xiuqiang He and Chen Ma. "Semantic Retrieval Augmented Contrastive
Learning for Sequential Recommendation." NeurIPS 2025. https://arxiv.org/abs/2503.04162

``L = L_rec + alpha * L_user + beta * L_item`` (``research/sracl.md`` §6):

* inter-user: the positive of a sequence encoding ``h`` is ``h+ = sum_j a_j f(s_j)``, a mix of
  the encodings of the user's ``k`` semantically retrieved users' sequences, weighted by the
  learnable synthesizer ``a = softmax_j(LeakyReLU(w^T [W e_u || W e_j]))`` over the frozen
  semantic embeddings ``e`` (dropout on ``a`` while training); ``synthesizer = "top1"`` is the
  hard-rule ablation (``h+`` = the nearest user's encoding);
* intra-user: two views of the batch in which each item is replaced, with probability
  ``substitution_rate``, by one of its ``k`` semantic neighbours drawn uniformly.

Both terms are NT-Xent with dot-product similarity and temperature ``tau`` (the paper
code's ``info_nce``). Inference uses the backbone only, so scores are SASRec's. Neighbours
are users here, not prefixes (one LLM summary per user, :mod:`lumosrec.augment.semantic`): a
neighbour's sequence is its training sequence, so no validation or test item enters training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lumosrec.core.batching import pad_sequences
from lumosrec.models.losses import nt_xent
from lumosrec.models.sasrec import SASRec, SASRecConfig

SYNTHESIZERS = ("learnable", "top1")


@dataclass
class SRACLConfig(SASRecConfig):
    """SASRec's hyper-parameters plus SRA-CL's (paper-code defaults)."""

    alpha: float = 0.1  # weight of the inter-user term (0: off)
    beta: float = 0.1  # weight of the intra-user term (0: off)
    temperature: float = 1.0  # tau
    substitution_rate: float = 0.2
    synthesizer: str = "learnable"
    synthesizer_dropout: float = 0.5
    leaky_slope: float = 0.2
    semantic_size: int = 384  # width of the semantic embeddings (all-MiniLM-L6-v2: 384)
    seed: int = 2024

    def __post_init__(self) -> None:
        if self.synthesizer not in SYNTHESIZERS:
            raise ValueError(f"unknown synthesizer {self.synthesizer!r}; choose one of {', '.join(SYNTHESIZERS)}")


class SRACL(SASRec):
    """SASRec trained with SRA-CL's inter-user and intra-user contrastive terms."""

    def __init__(self, config: SRACLConfig) -> None:
        super().__init__(config)
        self.projection = nn.Linear(config.semantic_size, config.hidden_size, bias=False)  # W
        self.attention = nn.Parameter(torch.empty(2 * config.hidden_size, 1))  # w
        nn.init.xavier_uniform_(self.projection.weight, gain=1.414)
        nn.init.xavier_uniform_(self.attention, gain=1.414)
        self.generator = torch.Generator().manual_seed(config.seed)
        for name in ("user_semantics", "user_neighbours", "neighbour_items", "neighbour_lengths", "item_neighbours"):
            self.register_buffer(name, None, persistent=False)

    def set_semantics(
        self,
        user_vectors: np.ndarray,
        user_neighbours: np.ndarray,
        train_sequences: Sequence[np.ndarray],
        item_neighbours: np.ndarray,
    ) -> None:
        """The semantic side (:class:`lumosrec.augment.semantic.SemanticSide`) and each user's training
        sequence, the input of the user's encoding when it is someone's neighbour."""
        device = self.item_embedding.weight.device
        items, lengths = pad_sequences(train_sequences, self.config.max_len)
        self.user_semantics = torch.as_tensor(user_vectors, dtype=torch.float32, device=device)
        self.user_neighbours = torch.as_tensor(user_neighbours, dtype=torch.long, device=device)
        self.neighbour_items, self.neighbour_lengths = items.to(device), lengths.to(device)
        self.item_neighbours = torch.as_tensor(item_neighbours, dtype=torch.long, device=device)

    def synthesizer_weights(self, users: torch.Tensor) -> torch.Tensor:
        """``a``: each user's attention over its neighbours, shape ``(B, k)``."""
        anchor = self.projection(self.user_semantics[users])
        neighbours = self.projection(self.user_semantics[self.user_neighbours[users]])
        pairs = torch.cat([anchor[:, None, :].expand_as(neighbours), neighbours], dim=-1)
        scores = F.leaky_relu((pairs @ self.attention).squeeze(-1), self.config.leaky_slope)
        return F.dropout(scores.softmax(-1), self.config.synthesizer_dropout, self.training)

    def synthesized_positives(self, users: torch.Tensor) -> torch.Tensor:
        """``h+`` of every user of the batch; each distinct neighbour is encoded once."""
        neighbours = self.user_neighbours[users]
        if self.config.synthesizer == "top1":
            neighbours = neighbours[:, :1]
        distinct, position = torch.unique(neighbours, return_inverse=True)
        encoded = self.encode(self.neighbour_items[distinct], self.neighbour_lengths[distinct])[position]
        if self.config.synthesizer == "top1":
            return encoded[:, 0]
        return (self.synthesizer_weights(users)[..., None] * encoded).sum(1)

    def substitute(self, items: torch.Tensor) -> torch.Tensor:
        """Each real item replaced, with probability ``substitution_rate``, by a random one of
        its semantic neighbours."""
        draws = torch.rand(items.shape, generator=self.generator).to(items.device)
        choice = torch.randint(self.item_neighbours.shape[1], items.shape, generator=self.generator).to(items.device)
        replace = (draws < self.config.substitution_rate) & (items > 0)
        return torch.where(replace, self.item_neighbours[items, choice], items)

    def loss(
        self, items: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor, users: torch.Tensor | None = None
    ) -> torch.Tensor:
        config = self.config
        if self.user_neighbours is None or users is None:
            raise RuntimeError("SRA-CL trains with its semantic side: call set_semantics() and pass users")
        sequence = self.encode(items, lengths)
        loss = self.recommendation_loss(sequence, targets)
        if config.alpha > 0:
            loss = loss + config.alpha * nt_xent(sequence, self.synthesized_positives(users), config.temperature)
        if config.beta > 0:
            first = self.encode(self.substitute(items), lengths)
            second = self.encode(self.substitute(items), lengths)
            loss = loss + config.beta * nt_xent(first, second, config.temperature)
        return loss
