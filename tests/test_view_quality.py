"""View quality metrics on a case with known answers, and the llm-rank views with the real SmolLM2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lumosrec.augment.cache import ViewCache, history_hash
from lumosrec.augment.grounding import ItemSpace, TextEncoder
from lumosrec.augment.hf import TransformersGenerator
from lumosrec.augment.quality import Users, view_metrics
from lumosrec.augment.runtime import resolve_model
from lumosrec.augment.views import ViewConfig, ViewMaker
from lumosrec.core.errors import ConfigError
from lumosrec.core.evaluation import leave_one_out
from lumosrec.core.synthetic import SyntheticConfig, generate


def test_quality_metrics_on_a_hand_built_case() -> None:
    # items 1..6 on the axes of a 3-d space: 1, 2 along x; 3, 4 along y; 5, 6 along z
    vectors = np.zeros((7, 3), dtype=np.float32)
    vectors[[1, 2], 0] = vectors[[3, 4], 1] = vectors[[5, 6], 2] = 1
    space = ItemSpace(vectors, "hand")
    categories = [(), ("A",), ("A",), ("B",), ("B",), ("C",), ("C",)]
    # user 0: history [1], validation 2, test 3; user 1: history [3], validation 4, test 5
    users = Users(["u0", "u1"], [[1], [3]], np.array([2, 4]), np.array([3, 5]))
    views = [[2, 5, 6], [6, 1, 2, 5, 6, 4]]  # user 0 has its validation item 1st, user 1 6th
    found = view_metrics(views, users, space, categories)
    assert found["hit_at_5"] == 0.5 and found["hit_at_length"] == 1.0
    assert found["length"] == 4.5 and found["coverage"] == 1.0
    # user 0: 1 of 3 items shares category A; user 1: 1 of 6 shares category B
    assert found["category_overlap"] == pytest.approx((1 / 3 + 1 / 6) / 2)
    assert found["similarity_to_recent"] == pytest.approx((1 / 3 + 1 / 6) / 2)
    # counterfactual views: user 0's names its test item, user 1's names nothing it chose later
    counterfactual = view_metrics([[3, 6], [2]], users, space, categories)
    assert counterfactual["false_negative_rate"] == 0.5 and counterfactual["hit_at_length"] == 0.0
    empty = view_metrics([[], [2]], users, space, categories)
    assert empty["coverage"] == 0.5


def test_a_label_that_is_not_one_token_is_refused(tiny_model_dir: Path) -> None:
    generator = TransformersGenerator.load(resolve_model(str(tiny_model_dir)), device="cpu")
    prompt = [{"role": "user", "content": "Pick one. A. tea B. coffee"}]
    logprobs = generator.label_logprobs([prompt, prompt], ["A", "B"])
    assert logprobs.shape == (2, 2) and (logprobs < 0).all()
    # the tiny byte-level tokenizer has no merges: "AB" is two tokens
    with pytest.raises(ConfigError, match="not single tokens"):
        generator.label_logprobs([prompt], ["A", "AB"])


@pytest.mark.slow
def test_llm_rank_views_with_the_real_model(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    dataset = generate(SyntheticConfig(num_users=24, items_per_category=10, seed=3))
    split = leave_one_out(dataset.sequences, dataset.num_items)
    encoder = TextEncoder()
    space = ItemSpace.from_text(dataset.titles, encoder)
    generator = TransformersGenerator.load(resolve_model("smollm2-135m"), device="cpu", threads=1, batch_size=9)
    config = ViewConfig(mode="llm-rank", history_len=6, candidates=12)
    cache = ViewCache(tmp_path / "views.sqlite")
    maker = ViewMaker(dataset.titles, dataset.categories, space, config, generator, encoder, cache)
    histories = {dataset.user_ids[u]: split.train[u].tolist() for u in range(6)}
    views, stats = maker.make(histories, progress=False)
    for user, history in histories.items():
        # the candidates are drawn again as the maker drew them: per user, view after view
        rng = np.random.default_rng([config.seed, int(history_hash(history), 16) % 2**32])
        candidates = {view: set(maker.candidates(view, history, rng)) for view in config.views}
        centre, own = space.profile(history)
        ceiling = np.quantile(own, config.counterfactual_quantile)
        for view, record in views[user].items():
            assert len(record.items) == config.items_per_view and not set(record.items) & set(history)
            ranked = record.items if record.source == "llm" else record.items[: record.grounding.count(1.0)]
            assert record.source != "retrieval" and len(ranked) >= config.min_grounded
            assert set(ranked) <= candidates[view]
            if view == "counterfactual":
                assert all(space.vectors[item] @ centre < ceiling for item in ranked)
    for counters in stats.summary()["views"].values():
        assert counters["asked_llm"] == len(histories)
    calls = generator.stats.calls
    again, stats = maker.make(histories, progress=False)
    assert stats.from_cache == len(histories) and generator.stats.calls == calls
    assert {user: {v: r.items for v, r in made.items()} for user, made in again.items()} == {
        user: {v: r.items for v, r in made.items()} for user, made in views.items()
    }
    cache.close()
