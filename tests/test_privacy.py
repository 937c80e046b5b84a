"""Client-side defences of a user's update on the real ClientApp (local DP, the item-row defence, rounded
example counts), what they do to the leak, and cohorts that defend each user as its own node would."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.bench_privacy import NO_DEFENCE, attack, client_reply
from lumosrec.client.objectives import OBJECTIVES
from lumosrec.client.privacy import defend_item_rows, local_dp_noise_std
from lumosrec.core.data import load_data
from lumosrec.core.errors import ConfigError
from lumosrec.core.runconfig import model_sizes
from lumosrec.core.training import seed_everything
from lumosrec.launch.app import check_run_config, default_run_config
from lumosrec.launch.inprocess import run_in_process
from lumosrec.models.factory import build_model
from tests.conftest import SMALL_FEDERATION
from tests.test_cohort import _global_weights

pytestmark = pytest.mark.usefixtures("task_identity")

LOCAL_DP = {"local-dp-epsilon": 1.0, "local-dp-clipping-norm": 0.5, "local-dp-delta": 1e-5}


def _model_state(run_config: dict) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return OBJECTIVES["sasrec"].build_model(run_config, load_data(run_config["data"]).num_items).state_dict()


def _flat(arrays: dict[str, torch.Tensor]) -> np.ndarray:
    return np.concatenate([value.double().numpy().ravel() for value in arrays.values()])


def test_local_dp_sends_the_clipped_update_plus_gaussian_noise_of_the_stated_size(bare_run_config: dict) -> None:
    state = _model_state(bare_run_config)
    users = load_data(bare_run_config["data"]).num_users
    sent = _flat(state)
    clean = _flat(client_reply("train", state, bare_run_config, 3, users).content["arrays"].to_torch_state_dict())
    private = {**bare_run_config, **LOCAL_DP}
    noised = _flat(client_reply("train", state, private, 3, users).content["arrays"].to_torch_state_dict())
    update = clean - sent
    assert np.linalg.norm(update) > LOCAL_DP["local-dp-clipping-norm"]  # so the clip acts
    clipped = update * LOCAL_DP["local-dp-clipping-norm"] / np.linalg.norm(update)
    noise = noised - sent - clipped
    assert abs(noise.mean()) < 0.05 * local_dp_noise_std(private)
    assert noise.std() == pytest.approx(local_dp_noise_std(private), rel=0.02)


def test_local_dp_leaves_evaluation_replies_alone(bare_run_config: dict) -> None:
    state, users = _model_state(bare_run_config), load_data(bare_run_config["data"]).num_users
    plain = client_reply("evaluate", state, bare_run_config, 3, users).content["metrics"]
    private = client_reply("evaluate", state, {**bare_run_config, **LOCAL_DP}, 3, users).content["metrics"]
    assert dict(plain) == dict(private)


def test_under_local_dp_the_row_change_attack_guesses(bare_run_config: dict) -> None:
    state = _model_state(bare_run_config)
    clean = {row["attack"]: row for row in attack(bare_run_config, "fresh", state, np.arange(6), round_size=3)}
    private = {row["attack"]: row for row in attack({**bare_run_config, **LOCAL_DP}, "fresh", state, np.arange(6), 3)}
    assert clean["row-change"]["auc"] > 0.95
    assert abs(private["row-change"]["auc"] - 0.5) < 0.1


def test_a_federation_with_local_dp_reports_what_each_user_spent(bare_run_config: dict, tmp_path: Path) -> None:
    run = {**bare_run_config, **SMALL_FEDERATION, **LOCAL_DP, "users-per-client": 1, "fraction-train": 0.5}
    result = run_in_process({**run, "out-dir": str(tmp_path / "run")})
    spent = result["local_dp"]
    assert spent["epsilon_per_reply"] == 1.0 and spent["rounds"] == 2
    assert spent["epsilon_expected"] == pytest.approx(1.0) and spent["epsilon_at_most"] == pytest.approx(2.0)
    assert json.loads((tmp_path / "run" / "result.json").read_text())["local_dp"] == spent


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"local-dp-epsilon": 2.0}, "local-dp-epsilon=2.0: must be in [0, 1]"),
        (
            {"local-dp-epsilon": 0.5, "cohort-size": 10, "cohort-engine": "batched"},
            "local DP clips each user's whole update",
        ),
        ({"item-row-noise": -1.0}, "item-row-noise=-1.0: must be"),
    ],
)
def test_local_dp_settings_no_run_can_use_are_refused(small_catalog: Path, settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_run_config({"data": str(small_catalog), **settings}, default_run_config())


def _distance(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    return float(np.linalg.norm(_flat(first) - _flat(second)))


def _start(small_catalog: Path) -> dict[str, torch.Tensor]:
    """The global model a run of :func:`_global_weights` starts from."""
    run = {**default_run_config(), "hidden-size": 16, "inner-size": 32, "dropout": 0.0}
    seed_everything(int(run["seed"]))
    return build_model("sasrec", load_data(str(small_catalog)).num_items, **model_sizes(run)).state_dict()


def test_a_cohort_clips_each_users_update_as_its_own_node_would(small_catalog: Path, tmp_path: Path) -> None:
    # a clip so small that the noise is too: each user's update all but vanishes, and so does
    # their mean; a cohort that clipped only its mean, or nothing, would move the model as far as
    # without local DP (clipping the mean of ten users at 1e-7 would also leave noise of 2x)
    tiny = {**LOCAL_DP, "local-dp-clipping-norm": 1e-7}
    settings = {"cohort-size": 10, "learning-rate": 0.5, "num-server-rounds": 1}
    start = _start(small_catalog)
    moved = _distance(_global_weights(small_catalog, tmp_path / "clean", **settings), start)
    private = _distance(_global_weights(small_catalog, tmp_path / "private", **settings, **tiny), start)
    noise = local_dp_noise_std({**LOCAL_DP, **tiny}) * np.sqrt(len(_flat(start)))  # one user's noise norm
    assert moved > 0.1
    assert private < 1e-7 + noise


def test_the_item_row_defence_clips_rows_at_the_users_median_and_noises_every_row() -> None:
    rng = np.random.default_rng(0)
    change = torch.from_numpy(rng.normal(size=(2001, 32)) * rng.uniform(0.01, 3.0, size=(2001, 1)))
    change[0] = 0.0  # padding
    own = np.arange(1, 41)
    clip = float(change[1:41].norm(dim=1).median())
    clipped = defend_item_rows(change, own, 0.0, torch.Generator().manual_seed(1))
    norms, before = clipped.norm(dim=1), change.norm(dim=1)
    assert float(norms.max()) == pytest.approx(clip)
    kept = before <= clip  # rows below the clip are sent as they are, the others scaled onto it
    assert torch.equal(clipped[kept], change[kept])
    assert torch.allclose(clipped[~kept] / norms[~kept, None], change[~kept] / before[~kept, None])
    noised = defend_item_rows(change, own, 4.0, torch.Generator().manual_seed(1))
    noise = (noised - clipped)[1:]
    assert torch.equal(noised[0], change[0])
    assert float(noise.std()) == pytest.approx(4.0 * clip / np.sqrt(32), rel=0.02)
    assert float(noise.norm(dim=1).mean()) == pytest.approx(4.0 * clip, rel=0.05)


def test_under_the_item_row_defence_the_row_change_and_shadow_attacks_guess(bare_run_config: dict) -> None:
    state = _model_state(bare_run_config)
    users, shadow = np.arange(8), np.arange(20, 36)
    clean = {row["attack"]: row for row in attack(bare_run_config, "fresh", state, users, 4, shadow)}
    defended = {
        row["attack"]: row
        for row in attack({**bare_run_config, "item-row-noise": 5.0}, "fresh", state, users, 4, shadow)
    }
    assert clean["row-change"]["auc"] > 0.95 and clean["shadow"]["auc"] > 0.95
    for name in ("row-change", "row-change-least", "shadow"):
        assert abs(defended[name]["auc"] - 0.5) < 0.1, name


def test_a_reply_hiding_the_history_length_states_a_power_of_two(bare_run_config: dict) -> None:
    state, dataset = _model_state(bare_run_config), load_data(bare_run_config["data"])
    hidden = {**bare_run_config, "hide-history-length": True}
    for user in range(5):
        exact = client_reply("train", state, bare_run_config, user, dataset.num_users).content["metrics"][
            "num-examples"
        ]
        stated = client_reply("train", state, hidden, user, dataset.num_users).content["metrics"]["num-examples"]
        assert exact == len(dataset.sequences[user]) - 3  # the leak: the history length minus three
        assert stated & (stated - 1) == 0 and exact <= stated < 2 * exact


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["batched", "loop"])
def test_cohorts_defend_each_user_as_its_own_node_would(small_catalog: Path, tmp_path: Path, engine: str) -> None:
    """One-user nodes whose replies the server checks and weighs by their rounded counts, against
    cohorts that defend and weigh each user alike: the same global model, noise included."""
    defences = {"item-row-noise": 2.0, "hide-history-length": True, "learning-rate": 0.5}
    alone = _global_weights(small_catalog, tmp_path / "alone", **defences)
    cohorts = _global_weights(
        small_catalog, tmp_path / "cohorts", **defences, **{"cohort-size": 10, "cohort-engine": engine}
    )
    plain = _global_weights(small_catalog, tmp_path / "plain", **{**NO_DEFENCE, "learning-rate": 0.5})
    for key, value in alone.items():
        scale = float(value.abs().max())
        assert float((cohorts[key] - value).abs().max()) <= 1e-5 * scale, key
    assert _distance(alone, plain) > 0.1  # the defences act
