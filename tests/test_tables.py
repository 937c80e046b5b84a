"""Results tables: summaries of seeds run in different sessions combine exactly."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.table_main import ROWS, rows_of
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


def test_each_dataset_plans_only_the_rows_that_mean_something_there() -> None:
    every = list(ROWS)
    # ml-100k has titles but its LLM writes every user's views: the subset row would repeat its twin
    assert "lumos-llm-text-init" not in rows_of("ml-100k", every) and "lumos-llm-all-text-init" in rows_of(
        "ml-100k", every
    )
    assert "lumos-llm-text-init" in rows_of("amazon-beauty", every)
    # without item text: no text-initialised table and no LLM views
    assert all("text" not in row and "llm" not in row for row in rows_of("amazon-baby", every))
    assert {"fedavg-sasrec", "lumos"} <= set(rows_of("amazon-baby", every))
