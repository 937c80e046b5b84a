from __future__ import annotations

import numpy as np

from lumosrec.core.batching import PrefixSamples, pad_sequences, shared_prefix_rows


def test_pad_sequences_keeps_the_last_items_left_aligned() -> None:
    items, lengths = pad_sequences([np.array([1, 2, 3, 4, 5]), np.array([7])], max_len=3)
    assert items.tolist() == [[3, 4, 5], [7, 0, 0]]
    assert lengths.tolist() == [3, 1]


def test_prefix_samples_are_every_prefix_truncated() -> None:
    samples = PrefixSamples([np.array([1, 2, 3, 4, 5]), np.array([6, 7])], max_len=3)
    assert len(samples) == 5
    items, lengths, targets, users = samples.batch(np.arange(5))
    assert targets.tolist() == [2, 3, 4, 5, 7]
    assert users.tolist() == [0, 0, 0, 0, 1]
    assert lengths.tolist() == [1, 2, 3, 3, 1]
    assert items.tolist() == [[1, 0, 0], [1, 2, 0], [1, 2, 3], [2, 3, 4], [6, 0, 0]]


def test_epoch_visits_every_sample_once_in_length_buckets() -> None:
    rng = np.random.default_rng(0)
    sequences = [np.arange(1, n + 2) for n in rng.integers(2, 60, size=200)]
    samples = PrefixSamples(sequences, max_len=50)
    batches = list(samples.epoch(32, np.random.default_rng(1), bucket_batches=8))
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(len(samples)))
    # bucketing: a batch's lengths span much less than the data's full range
    spreads = [np.ptp(samples.lengths[b]) for b in batches[:-1]]
    assert np.median(spreads) < 0.25 * np.ptp(samples.lengths)


def test_a_row_that_begins_a_longer_row_is_read_off_the_longest_one() -> None:
    samples = PrefixSamples([np.array([1, 2, 3, 4, 5]), np.array([1, 2, 9])], max_len=3)
    items, lengths, _, _ = samples.batch(np.arange(len(samples)))
    # rows: [1] [1 2] [1 2 3] [2 3 4] (a window, positions shifted) [1] [1 2] (the second user)
    roots, source = shared_prefix_rows(items, lengths)
    assert roots.tolist() == [2, 3]
    assert roots[source].tolist() == [2, 2, 2, 3, 2, 2]
