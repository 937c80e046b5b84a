"""Results tables: summaries of seeds run in different sessions combine exactly, and gains are
checked against seed noise, also seed by seed."""

from __future__ import annotations

import types

import numpy as np
import pytest

from experiments.table_main import ROWS, earlier_seeds_kept, rows_of, seeds_of
from lumosrec.launch.tables import MAIN_METRICS, PROTOCOL, gain, paired_gain, pooled, summarize, summary_of


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
    # LUMOS under FedAdam over a random table: ml-100k's pairing; Beauty's is over the text table
    assert "lumos-llm-fedadam" in rows_of("ml-100k", every) and "lumos-llm-fedadam" not in rows_of(
        "amazon-beauty", every
    )
    # without item text: no text-initialised table and no LLM views
    assert all("text" not in row and "llm" not in row for row in rows_of("amazon-baby", every))
    assert {"fedavg-sasrec", "lumos"} <= set(rows_of("amazon-baby", every))


def test_the_issues_rows_get_every_seed_and_side_rows_one() -> None:
    args = types.SimpleNamespace(seeds=[2024, 2025, 2026])
    assert seeds_of("ml-100k", "lumos-text-init", args) == [2024, 2025, 2026]
    assert seeds_of("ml-100k", "fedadam-sasrec", args) == [2024, 2025, 2026]
    assert seeds_of("ml-100k", "lumos-llm-all-text-init", args) == [2024]
    # a row that is a side question on one dataset keeps the dataset's seeds on another
    assert seeds_of("amazon-beauty", "lumos-llm-all-text-init", args) == [2024, 2025]
    assert seeds_of("amazon-beauty", "lumos-llm", args) == [2024]
    assert seeds_of("amazon-beauty", "local-sasrec", args) == [2024]


def _seed(value: float) -> dict[str, float]:
    return dict.fromkeys(MAIN_METRICS, value)


def test_a_seed_run_again_leaves_the_other_earlier_seeds_as_they_were() -> None:
    values = {"2024": 0.0580, "2025": 0.0610, "2026": 0.0570}
    # an earlier report that holds only the summary of its seeds (no per-seed values)
    two = {"seeds": [2024, 2025], "summary": summary_of([_seed(values["2024"]), _seed(values["2025"])])}
    kept = earlier_seeds_kept(two, {"2025": _seed(values["2025"])})
    assert list(kept) == ["2024"] and kept["2024"]["HR@20"] == pytest.approx(values["2024"])
    # with per-seed values any seed is kept as it was; without them two unknown seeds cannot be split
    three = {"seeds": [2024, 2025, 2026], "summary": summary_of([_seed(v) for v in values.values()])}
    assert earlier_seeds_kept(three, {"2026": _seed(values["2026"])}) is None
    with_values = {**three, "per_seed": {seed: _seed(v) for seed, v in values.items()}}
    assert earlier_seeds_kept(with_values, {"2026": _seed(0.5)}) == {s: _seed(values[s]) for s in ("2024", "2025")}


def test_a_gain_every_seed_shows_is_beyond_noise_seed_by_seed() -> None:
    baseline = {2024: 0.10, 2025: 0.15, 2026: 0.20}  # the seeds differ far more than the methods do
    method = {seed: value + step for (seed, value), step in zip(baseline.items(), (0.010, 0.011, 0.009))}
    means = gain(
        summary_of([_seed(v) for v in method.values()])["HR@20"],
        summary_of([_seed(v) for v in baseline.values()])["HR@20"],
    )
    assert not means["beyond_noise"]
    paired = paired_gain(method, baseline)
    assert paired["beyond_noise"] and paired["seeds"] == 3 and paired["mean_difference"] == pytest.approx(0.010)
    # a gain that changes sign between seeds is not
    assert not paired_gain({**method, 2026: 0.18}, baseline)["beyond_noise"]
    assert paired_gain({2024: 0.2}, baseline) is None  # one shared seed: no noise to measure
