"""Turning item sequences into padded tensors and training batches.

Sequences are *left-aligned*: item ``k`` of a (possibly truncated) sequence sits at
position ``k`` and padding (item ``0``) fills the tail. With a causal encoder every real
position then attends only to real items, so no padding mask is needed, and a batch can be
cut to its longest sequence without changing any output.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch


def pad_sequences(sequences: Sequence[np.ndarray], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-align the last ``max_len`` items of each sequence into a padded matrix.

    Returns
    -------
    items : torch.LongTensor, shape (B, L)
        ``L`` is the longest kept length in the batch (at most ``max_len``).
    lengths : torch.LongTensor, shape (B,)
    """
    lengths = np.array([min(len(s), max_len) for s in sequences], dtype=np.int64)
    items = np.zeros((len(sequences), max(int(lengths.max(initial=1)), 1)), dtype=np.int64)
    for row, (sequence, length) in enumerate(zip(sequences, lengths)):
        if length:
            items[row, :length] = sequence[-length:]
    return torch.from_numpy(items), torch.from_numpy(lengths)


def shared_prefix_rows(items: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which rows of a left-aligned batch need their own encoder pass.

    A row whose items begin another, at least as long row (a user's shorter prefix next to a
    longer one) has, under causal attention, the hidden states of that row's first positions.
    Returns ``roots``, the rows no other row extends (sorted), and ``source``, for every row the
    index into ``roots`` of the longest row it begins (the lowest among equals).
    """
    beyond = torch.arange(items.shape[1], device=items.device)[None, :] >= lengths[:, None]
    # begins[a, b]: row b holds row a's items at row a's positions
    begins = ((items[:, None, :] == items[None, :, :]) | beyond[:, None, :]).all(-1)
    begins &= lengths[None, :] >= lengths[:, None]
    rows = torch.arange(len(items), device=items.device)
    preference = torch.where(begins, lengths[None, :] * len(items) - rows[None, :], -1)
    roots, source = torch.unique(preference.argmax(1), return_inverse=True)
    return roots, source


class PrefixSamples:
    """Every prefix of every training sequence as one (input, next item) sample.

    DESIGN.md §1: "training samples are all prefixes of the training sequence" — a user
    with ``n`` training items yields ``n - 1`` samples, each truncated to its last
    ``max_len`` items (as RecBole does).
    """

    def __init__(self, sequences: Sequence[np.ndarray], max_len: int) -> None:
        users, ends = [], []
        for user, sequence in enumerate(sequences):
            count = len(sequence) - 1
            users.append(np.full(count, user, dtype=np.int64))
            ends.append(np.arange(1, len(sequence), dtype=np.int64))
        self.user = np.concatenate(users) if users else np.zeros(0, dtype=np.int64)
        self.end = np.concatenate(ends) if ends else np.zeros(0, dtype=np.int64)
        self.max_len = max_len
        self.lengths = np.minimum(self.end, max_len)
        # One flat buffer so that a batch is assembled with vectorised indexing.
        self._offsets = np.concatenate([[0], np.cumsum([len(s) for s in sequences])]).astype(np.int64)
        self._flat = np.concatenate(list(sequences)) if len(sequences) else np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.end)

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(items, lengths, targets, users)`` for the given sample indices."""
        lengths = self.lengths[indices]
        width = int(lengths.max())
        stop = self._offsets[self.user[indices]] + self.end[indices]
        positions = stop[:, None] - lengths[:, None] + np.arange(width)[None, :]
        valid = np.arange(width)[None, :] < lengths[:, None]
        items = np.where(valid, self._flat[np.where(valid, positions, 0)], 0)
        targets = self._flat[stop]
        return (
            torch.from_numpy(items),
            torch.from_numpy(lengths),
            torch.from_numpy(targets),
            torch.from_numpy(self.user[indices]),
        )

    def epoch(self, batch_size: int, rng: np.random.Generator, bucket_batches: int = 32) -> Iterator[np.ndarray]:
        """Shuffled batches of sample indices, grouped by similar length.

        Samples are shuffled, then sorted by length inside windows of ``bucket_batches``
        batches, and the resulting batches are shuffled again: batches stay random but
        carry little padding, which is most of the cost on short-sequence data.
        """
        order = rng.permutation(len(self))
        window = batch_size * bucket_batches
        batches = []
        for start in range(0, len(order), window):
            chunk = order[start : start + window]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
        for index in rng.permutation(len(batches)):
            yield batches[index]
