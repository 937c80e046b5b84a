r"""SASRec: self-attentive sequential recommendation.

Reference
---------
Wang-Cheng Kang and Julian McAuley. "Self-Attentive Sequential Recommendation."
ICDM 2018. https://arxiv.org/abs/1808.09781

Item and learned position embeddings feed a causal Transformer encoder; the output at a
sequence's last position is scored against every item embedding (shared input/output
table) and trained with full-softmax cross-entropy over all items. The layer layout
(post-norm, GELU, dropout on attention weights and on each sub-layer output, init
``N(0, 0.02)``, LayerNorm eps 1e-12) follows RecBole 1.2.1, the peer reference in
``../shared/research/recbole_reference.md``; the defaults are DESIGN.md §2's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lumosrec.core.batching import shared_prefix_rows


@dataclass
class SASRecConfig:
    """Hyper-parameters, named as in the paper / RecBole."""

    num_items: int
    max_len: int = 50
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    inner_size: int = 256
    dropout: float = 0.5
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02

    def to_dict(self) -> dict:
        return asdict(self)


class TransformerLayer(nn.Module):
    """Post-norm self-attention + position-wise feed-forward, causal."""

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        if config.hidden_size % config.num_heads:
            raise ValueError(f"hidden_size {config.hidden_size} is not divisible by num_heads {config.num_heads}")
        self.num_heads = config.num_heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.inner = nn.Linear(config.hidden_size, config.inner_size)
        self.outer = nn.Linear(config.inner_size, config.hidden_size)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden.shape
        q, k, v = self.qkv(hidden).view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        attended = attended.transpose(1, 2).reshape(batch, length, width)
        hidden = self.attention_norm(hidden + F.dropout(self.out(attended), self.dropout, self.training))
        inner = self.outer(F.gelu(self.inner(hidden)))
        return self.ffn_norm(hidden + F.dropout(inner, self.dropout, self.training))


class SASRec(nn.Module):
    """SASRec encoder with a full-softmax next-item loss.

    Inputs are left-aligned padded item matrices (see :mod:`lumosrec.core.batching`): item ``k``
    of a sequence at position ``k``, padding ``0`` after the last item. Because attention is
    causal, positions past a sequence's length never influence its last real position.
    """

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        self.item_embedding = nn.Embedding(config.num_items + 1, config.hidden_size, padding_idx=0)
        self.position_embedding = nn.Embedding(config.max_len, config.hidden_size)
        self.input_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.num_layers))
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()
        if isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    def shared_state_dict(self) -> dict[str, torch.Tensor]:
        """The arrays a federated client sends: all of them (subclasses keep private parts out)."""
        return self.state_dict()

    def load_shared_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load the arrays a federated client received."""
        self.load_state_dict(dict(state))

    def encode_positions(self, items: torch.Tensor) -> torch.Tensor:
        """Hidden state at every position, shape ``(B, L, hidden_size)``."""
        positions = torch.arange(items.shape[1], device=items.device)
        hidden = self.item_embedding(items) + self.position_embedding(positions)[None]
        hidden = F.dropout(self.input_norm(hidden), self.config.dropout, self.training)
        for layer in self.layers:
            hidden = layer(hidden)
        return hidden

    def encode(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Sequence representation: the hidden state at the last real position, ``(B, d)``.

        In training, a row that begins a longer row of the batch (a user's prefixes sit together
        in its batches) is read off that row's pass, as SASRec's paper trains every position of a
        sequence in one pass: causal attention makes it the same encoding, and with dropout the
        two share their masks on the positions they share, which keeps each row's expected
        gradient. Evaluation rows are distinct users and keep one pass each.
        """
        if self.training:
            roots, source = shared_prefix_rows(items, lengths)
            if len(roots) < len(items):
                hidden = self.encode_positions(items[roots, : int(lengths[roots].max())])
                return hidden[source, lengths - 1]
        return self.encode_each_row(items, lengths)

    def encode_each_row(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """:meth:`encode` with one pass per row, whatever the rows share."""
        hidden = self.encode_positions(items)
        return hidden[torch.arange(items.shape[0], device=items.device), lengths - 1]

    def item_logits(self, sequence_repr: torch.Tensor) -> torch.Tensor:
        """Dot product with every item embedding, ``(B, num_items + 1)``; column 0 is padding."""
        return sequence_repr @ self.item_embedding.weight.T

    def score(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.item_logits(self.encode(items, lengths))

    def recommendation_loss(self, sequence_repr: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over all real items (the padding column can never be predicted)."""
        logits = self.item_logits(sequence_repr)
        logits[:, 0] = -torch.inf
        return F.cross_entropy(logits, targets)

    def loss(
        self, items: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor, users: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Training loss of one batch of (sequence, next item) samples; ``users`` (each sample's
        user) serves models with per-user inputs such as LUMOS's views."""
        return self.recommendation_loss(self.encode(items, lengths), targets)
