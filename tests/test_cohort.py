"""Cohort nodes: a node hosts many users and trains each drawn one on its own, so that FedAvg over
cohorts is per-user FedAvg over the same users."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lumosrec.core.errors import ConfigError
from lumosrec.core.synthetic import SyntheticConfig, generate, write_folder
from lumosrec.launch.app import check_run_config, default_run_config
from lumosrec.launch.inprocess import run_in_process
from lumosrec.server import checkpoint
from lumosrec.server.server_app import fingerprint, round_users

SMALL = dict(num_users=60, items_per_category=10, seed=5)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(generate(SyntheticConfig(**SMALL)), tmp_path_factory.mktemp("cohort") / "data")


def _global_weights(data_dir: Path, out: Path, **settings) -> dict[str, torch.Tensor]:
    run = {
        "data": str(data_dir),
        "out-dir": str(out),
        "num-server-rounds": 2,
        "fraction-train": 1.0,
        "hidden-size": 16,
        "inner-size": 32,
        "dropout": 0.0,  # dropout's masks are drawn in another order when users train in a cohort
        "batch-size": 4,  # several steps per user and epoch: the order of a user's samples counts
        "eval-every": 0,
        "resume": False,
        **settings,
    }
    run_in_process(run)
    merged = check_run_config(run, default_run_config())
    return checkpoint.load(out, fingerprint(merged)).state_dict


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["sasrec", "lumos"])
def test_cohorts_give_the_global_model_of_one_user_nodes(data_dir: Path, tmp_path: Path, objective: str) -> None:
    settings = {"objective": objective, "views": "retrieval", "views-dir": str(tmp_path / "views")}
    alone = _global_weights(data_dir, tmp_path / "alone", **settings)
    cohorts = _global_weights(data_dir, tmp_path / "cohorts", **settings, **{"cohort-size": 10})
    assert set(alone) == set(cohorts)
    for key, value in alone.items():
        scale = float(value.abs().max())
        assert float((cohorts[key] - value).abs().max()) <= 1e-5 * scale, key


def test_each_user_is_drawn_with_probability_fraction_train() -> None:
    run = {"seed": 7, "fraction-train": 0.1}
    rounds, users = 3000, 50
    counts = np.zeros(users)
    for server_round in range(1, rounds + 1):
        drawn = round_users(run, server_round, users)
        assert len(drawn) == len(set(drawn)) == 5
        counts[drawn] += 1
    sigma = np.sqrt(rounds * 0.1 * 0.9)
    assert np.abs(counts - rounds * 0.1).max() < 5 * sigma
    assert round_users(run, 4, users) == round_users(dict(run), 4, users)  # seeded: the same draw again


@pytest.mark.slow
def test_cohorts_none_of_whose_users_is_drawn_do_not_count(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sparse"
    result = run_in_process(
        {
            "data": str(data_dir),
            "out-dir": str(out),
            "num-server-rounds": 2,
            "fraction-train": 0.02,
            "cohort-size": 10,
            "hidden-size": 16,
            "inner-size": 32,
            "eval-every": 2,
        }
    )
    assert result["failures"] == 0 and result["epochs"] == 2
    rows = json.loads((out / "metrics.json").read_text())
    assert [row["train_users"] for row in rows] == [1, 1] and all(row["train_nodes"] == 6 for row in rows)


@pytest.mark.parametrize(
    "settings, reason",
    [
        ({"strategy": "fedmedian"}, "needs each user's update"),
        ({"strategy": "krum"}, "needs each user's update"),
        ({"dp-clipping-norm": 1.0}, "with DP clipping"),
        ({"users-per-client": 5}, "exclude each other"),
        ({"cohort-size": -1}, "must be 0"),
    ],
)
def test_cohort_mode_refuses_what_it_cannot_do(settings: dict, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        check_run_config({"cohort-size": 10, **settings}, default_run_config())


def test_too_few_nodes_for_min_nodes_is_an_error_not_a_hang(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="wait forever"):
        run_in_process({"data": str(data_dir), "out-dir": str(tmp_path / "one"), "cohort-size": 100})
