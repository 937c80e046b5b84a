"""Client-side defences of a user's update: local DP on the real ClientApp, and what it does to the leak."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.bench_privacy import attack, client_reply
from lumosrec.client.objectives import OBJECTIVES
from lumosrec.client.privacy import local_dp_noise_std
from lumosrec.core.data import load_data
from lumosrec.core.errors import ConfigError
from lumosrec.core.synthetic import SyntheticConfig, generate, write_folder
from lumosrec.launch.app import check_run_config, default_run_config
from lumosrec.launch.inprocess import run_in_process
from tests.conftest import SMALL_FEDERATION

pytestmark = pytest.mark.usefixtures("task_identity")

LOCAL_DP = {"local-dp-epsilon": 1.0, "local-dp-clipping-norm": 0.5, "local-dp-delta": 1e-5}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(
        generate(SyntheticConfig(num_users=40, items_per_category=10, seed=3)), tmp_path_factory.mktemp("dp")
    )


@pytest.fixture
def run_config(data_dir: Path) -> dict:
    return {**default_run_config(), "data": str(data_dir), "hidden-size": 16, "inner-size": 32}


def _model_state(run_config: dict) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return OBJECTIVES["sasrec"].build_model(run_config, load_data(run_config["data"]).num_items).state_dict()


def _flat(arrays: dict[str, torch.Tensor]) -> np.ndarray:
    return np.concatenate([value.double().numpy().ravel() for value in arrays.values()])


def test_local_dp_sends_the_clipped_update_plus_gaussian_noise_of_the_stated_size(run_config: dict) -> None:
    state = _model_state(run_config)
    users = load_data(run_config["data"]).num_users
    sent = _flat(state)
    clean = _flat(client_reply("train", state, run_config, 3, users).content["arrays"].to_torch_state_dict())
    private = {**run_config, **LOCAL_DP}
    noised = _flat(client_reply("train", state, private, 3, users).content["arrays"].to_torch_state_dict())
    update = clean - sent
    assert np.linalg.norm(update) > LOCAL_DP["local-dp-clipping-norm"]  # so the clip acts
    clipped = update * LOCAL_DP["local-dp-clipping-norm"] / np.linalg.norm(update)
    noise = noised - sent - clipped
    assert abs(noise.mean()) < 0.05 * local_dp_noise_std(private)
    assert noise.std() == pytest.approx(local_dp_noise_std(private), rel=0.02)


def test_local_dp_leaves_evaluation_replies_alone(run_config: dict) -> None:
    state, users = _model_state(run_config), load_data(run_config["data"]).num_users
    plain = client_reply("evaluate", state, run_config, 3, users).content["metrics"]
    private = client_reply("evaluate", state, {**run_config, **LOCAL_DP}, 3, users).content["metrics"]
    assert dict(plain) == dict(private)


def test_under_local_dp_the_row_change_attack_guesses(run_config: dict) -> None:
    state = _model_state(run_config)
    clean = {row["attack"]: row for row in attack(run_config, "fresh", state, np.arange(6), round_size=3)}
    private = {row["attack"]: row for row in attack({**run_config, **LOCAL_DP}, "fresh", state, np.arange(6), 3)}
    assert clean["row-change"]["auc"] > 0.95
    assert abs(private["row-change"]["auc"] - 0.5) < 0.1


def test_a_federation_with_local_dp_reports_what_each_user_spent(run_config: dict, tmp_path: Path) -> None:
    run = {**run_config, **SMALL_FEDERATION, **LOCAL_DP, "users-per-client": 1, "fraction-train": 0.5}
    result = run_in_process({**run, "out-dir": str(tmp_path / "run")})
    spent = result["local_dp"]
    assert spent["epsilon_per_reply"] == 1.0 and spent["rounds"] == 2
    assert spent["epsilon_expected"] == pytest.approx(1.0) and spent["epsilon_at_most"] == pytest.approx(2.0)
    assert json.loads((tmp_path / "run" / "result.json").read_text())["local_dp"] == spent


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"local-dp-epsilon": 2.0}, "local-dp-epsilon=2.0: must be in [0, 1]"),
        ({"local-dp-epsilon": 0.5, "cohort-size": 10}, "local DP noises each user's own update"),
    ],
)
def test_local_dp_settings_no_run_can_use_are_refused(data_dir: Path, settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_run_config({"data": str(data_dir), **settings}, default_run_config())
