from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lumosrec.core.evaluation import RankCounts, evaluate, history_mask, leave_one_out, target_ranks


def test_leave_one_out() -> None:
    split = leave_one_out([np.array([1, 2, 3, 4]), np.array([5, 6, 7])], num_items=7)
    np.testing.assert_array_equal(split.train[0], [1, 2])
    assert split.valid.tolist() == [3, 6] and split.test.tolist() == [4, 7]
    np.testing.assert_array_equal(split.histories("test")[0], [1, 2, 3])
    np.testing.assert_array_equal(split.histories("valid")[1], [5])


def test_ranks_count_ties_against_the_target() -> None:
    # items 1..5; padding column 0 has the highest score and must be ignored
    scores = torch.tensor(
        [
            [9.0, 0.5, 0.9, 0.1, 0.9, 0.2],  # target 2: tied with item 4 -> rank 1
            [9.0, 0.5, 0.9, 0.1, 0.9, 0.2],  # target 5: items 1, 2, 4 above -> rank 3
            [9.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # all tied: target ranked last -> rank 4
        ]
    )
    ranks = target_ranks(scores, torch.tensor([2, 5, 3]))
    assert ranks.tolist() == [1, 3, 4]


def test_masked_protocol_removes_history_but_not_the_target() -> None:
    scores = torch.tensor([[0.0, 0.9, 0.8, 0.7, 0.6]])
    histories = [np.array([1, 2, 4])]  # item 4 is the target and was seen before
    mask = history_mask(histories, torch.tensor([4]), num_items=4)
    assert mask.tolist() == [[False, True, True, False, False]]
    assert target_ranks(scores, torch.tensor([4]), mask).tolist() == [1]  # only item 3 is above
    assert target_ranks(scores, torch.tensor([4])).tolist() == [3]


def test_metrics_by_hand() -> None:
    counts = RankCounts.from_ranks(np.array([0, 3, 12, 25]))
    metrics = counts.metrics()
    assert metrics["HR@10"] == pytest.approx(2 / 4)
    assert metrics["HR@20"] == pytest.approx(3 / 4)
    assert metrics["NDCG@10"] == pytest.approx((1 + 1 / math.log2(5)) / 4)
    assert metrics["NDCG@20"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(14)) / 4)
    assert metrics["MRR@10"] == pytest.approx((1 + 1 / 4) / 4)


def test_rank_counts_sum_exactly() -> None:
    ranks = np.random.default_rng(0).integers(0, 40, size=101)
    whole = RankCounts.from_ranks(ranks)
    parts = RankCounts.from_ranks(ranks[:30]) + RankCounts.from_ranks(ranks[30:77]) + RankCounts.from_ranks(ranks[77:])
    assert parts.users == whole.users and (parts.at_rank == whole.at_rank).all()
    assert parts.metrics() == whole.metrics()


class _FixedScores:
    """Scores item i by -i: item 1 is always ranked first."""

    def __init__(self, num_items: int) -> None:
        self.row = -torch.arange(num_items + 1, dtype=torch.float32)

    def score(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.row.expand(items.shape[0], -1)


def test_evaluate_both_protocols() -> None:
    split = leave_one_out([np.array([1, 2, 3, 4]), np.array([1, 3, 5, 2])], num_items=6)
    result = evaluate(_FixedScores(6), split, "test", max_len=50)
    # user 0: target 4, rank 3 unmasked; masked removes 1, 2, 3 -> rank 0
    # user 1: target 2, rank 1 unmasked; masked removes 1 (and 3, 5) -> rank 0
    assert result["unmasked"]["MRR@10"] == pytest.approx((1 / 4 + 1 / 2) / 2)
    assert result["masked"]["MRR@10"] == pytest.approx(1.0)
