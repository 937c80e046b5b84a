"""Results tables: summaries of seeds run in different sessions combine exactly."""

from __future__ import annotations

import numpy as np
import pytest

from lumosrec.launch.tables import MAIN_METRICS, PROTOCOL, pooled, summarize


def _runs(values: np.ndarray) -> list[dict]:
    return [{"result": {"test": {PROTOCOL: dict.fromkeys(MAIN_METRICS, float(v))}}} for v in values]


@pytest.mark.parametrize("split", [1, 2, 3])
def test_an_earlier_summary_and_new_seeds_pool_to_the_summary_of_all_seeds(split: int) -> None:
    values = np.random.default_rng(split).uniform(0.04, 0.07, size=5)
    whole = summarize(_runs(values))
    combined = pooled(summarize(_runs(values[:split])), summarize(_runs(values[split:])))
    for metric in MAIN_METRICS:
        assert combined[metric]["n"] == 5
        assert combined[metric]["mean"] == pytest.approx(whole[metric]["mean"])
        assert combined[metric]["std"] == pytest.approx(whole[metric]["std"])
