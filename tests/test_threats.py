"""Simulated noisy and malicious clients (robustness experiments): what each threat does to a
client's training and reply, and cohorts whose users misbehave as their own nodes would."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.bench_privacy import client_reply
from experiments.robustness import read_earlier, target_exposure
from lumosrec.client.objectives import OBJECTIVES
from lumosrec.client.threats import cold_item, malicious_users, training_data
from lumosrec.core.data import load_data, node_data
from lumosrec.core.errors import ConfigError, LumosError
from lumosrec.core.synthetic import SyntheticConfig, generate, write_folder
from lumosrec.launch.app import check_run_config, default_run_config
from lumosrec.launch.experiment import Budget, run_method
from tests.test_cohort import _global_weights

pytestmark = pytest.mark.usefixtures("task_identity")


def _everyone(run_config: dict):
    return node_data(run_config, {"partition-id": 0, "num-partitions": 1})


def test_noise_replaces_the_stated_share_of_each_users_training_items(bare_run_config: dict) -> None:
    clean = _everyone(bare_run_config)
    noisy = training_data(clean, {**bare_run_config, "noise-share": 0.3})
    changed, total = 0, 0
    for before, after in zip(clean.split.train, noisy.split.train):
        assert len(before) == len(after)
        changed += int((before != after).sum())
        total += len(before)
    # round(0.3 * len) positions per user get a random item, rarely the one that was there
    assert 0.25 * total < changed <= 0.31 * total
    assert np.array_equal(clean.split.valid, noisy.split.valid) and np.array_equal(clean.split.test, noisy.split.test)


def test_promoters_train_on_histories_that_push_the_target(bare_run_config: dict) -> None:
    run = {**bare_run_config, "malicious-share": 0.2, "malicious-attack": "promote"}
    clean, dataset = _everyone(run), load_data(run["data"])
    attacked = training_data(clean, run)
    attackers = malicious_users(int(run["seed"]), 0.2, dataset.num_users)
    target = cold_item(dataset, int(run["seed"]))
    assert len(attackers) == round(0.2 * dataset.num_users)
    for user, (before, after) in enumerate(zip(clean.split.train, attacked.split.train)):
        if user in attackers:
            assert np.array_equal(after[::2], before) and (after[1::2] == target).all()
        else:
            assert np.array_equal(after, before)


@pytest.mark.parametrize("attack, factor", [("scale", 10.0), ("sign-flip", -10.0)])
def test_a_poisoning_user_sends_its_update_times_the_factor(bare_run_config: dict, attack: str, factor: float) -> None:
    torch.manual_seed(0)
    dataset = load_data(bare_run_config["data"])
    state = OBJECTIVES["sasrec"].build_model(bare_run_config, dataset.num_items).state_dict()
    run = {**bare_run_config, "malicious-share": 0.5, "malicious-attack": attack}
    attackers = malicious_users(int(run["seed"]), 0.5, dataset.num_users)
    for user in (min(attackers), min(set(range(dataset.num_users)) - attackers)):
        honest = client_reply("train", state, bare_run_config, user, dataset.num_users).content["arrays"]
        sent = client_reply("train", state, run, user, dataset.num_users).content["arrays"]
        expected = factor if user in attackers else 1.0
        for key, start in state.items():
            update = honest[key].numpy() - start.numpy()
            np.testing.assert_allclose(sent[key].numpy() - start.numpy(), expected * update, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["batched", "loop"])
def test_cohorts_misbehave_as_their_users_own_nodes_would(small_catalog: Path, tmp_path: Path, engine: str) -> None:
    threats = {"noise-share": 0.2, "malicious-share": 0.2, "malicious-attack": "sign-flip", "malicious-scale": 3.0}
    alone = _global_weights(small_catalog, tmp_path / "alone", **threats)
    cohorts = _global_weights(
        small_catalog, tmp_path / "cohorts", **threats, **{"cohort-size": 10, "cohort-engine": engine}
    )
    clean = _global_weights(small_catalog, tmp_path / "clean")
    for key, value in alone.items():
        scale = float(value.abs().max())
        assert float((cohorts[key] - value).abs().max()) <= 1e-5 * scale, key
    assert max(float((alone[key] - clean[key]).abs().max()) for key in clean) > 1e-3  # the threats act


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"malicious-share": 0.1, "malicious-attack": "replace"}, "malicious-attack='replace': choose one of"),
        ({"noise-share": 1.5}, "noise-share=1.5: must be in [0, 1]"),
        ({"malicious-share": 0.1, "users-per-client": 4}, "simulated per user"),
    ],
)
def test_threat_settings_no_run_can_use_are_refused(small_catalog: Path, settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_run_config({"data": str(small_catalog), **settings}, default_run_config())


@pytest.mark.slow
def test_promoters_push_the_target_into_other_users_top_20(small_catalog: Path, tmp_path: Path) -> None:
    dataset = load_data(str(small_catalog))
    target = cold_item(dataset, 2024)
    budget = Budget(rounds=5, fraction_train=1.0, local_epochs=3)
    # a deployment's bound on a reply's samples: the simulated one (the most a node holds of the
    # real data) rejects a cohort whose attackers add their fabricated sequences
    small = {"hidden-size": 16, "inner-size": 32, "cohort-size": 20, "eval-every": 5, "max-reply-examples": 100000}
    exposure = {}
    for name, threat in {"clean": {}, "promoted": {"malicious-share": 0.3, "malicious-attack": "promote"}}.items():
        result = run_method(
            "fedavg-sasrec", str(small_catalog), tmp_path / name, 2024, budget, {**small, **threat}, progress=False
        )
        assert result["failures"] == 0 and result["skipped_rounds"] == 0  # every update counted
        exposure[name] = target_exposure(tmp_path / name / "model.pt", dataset, target)
    assert exposure["clean"] < 0.1 and exposure["promoted"] > exposure["clean"] + 0.15


def test_the_robustness_study_completes_an_earlier_report(tmp_path: Path) -> None:
    # named as a dataset of the study; its clean runs come from an earlier report, not from runs here.
    # Promoters in whole-node cohorts add fabricated samples beyond the most a node holds of the
    # real data, the simulated bound on a reply: the report counts the replies the server refused
    write_folder(generate(SyntheticConfig(num_users=60, items_per_category=10, seed=5)), tmp_path / "data" / "ml-100k")
    earlier = tmp_path / "robustness.json"
    clean = {"dataset": "ml-100k", "aggregator": "fedavg", "threat": "clean", "level": 0.0, "seed": 2024}
    clean_rows = [
        {**clean, "method": method, "hr20": 0.5, "ndcg20": 0.25, "target_exposure": 0.0, "versions": {"source": "x"}}
        for method in ("fedavg-sasrec", "lumos")
    ]
    earlier.write_text(json.dumps(clean_rows))
    out, report_dir = tmp_path / "runs", tmp_path / "report"
    command = [
        sys.executable, str(Path(__file__).resolve().parents[1] / "experiments" / "robustness.py"),
        "--data-root", str(tmp_path / "data"), "--out", str(out), "--report-dir", str(report_dir),
        "--datasets", "ml-100k", "--aggregators", "fedavg", "--threats", "promote", "--levels", "highest",
        "--rounds", "1", "--fraction-train", "1", "--local-epochs", "1", "--earlier", str(earlier), "--quiet",
        "--run-config", "hidden-size=16 inner-size=32 cohort-size=20",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((report_dir / "robustness.json").read_text())
    assert [(row["method"], row["threat"], bool(row.get("earlier"))) for row in rows] == [
        ("fedavg-sasrec", "clean", True),
        ("fedavg-sasrec", "promote", False),
        ("lumos", "clean", True),
        ("lumos", "promote", False),
    ]
    assert not (out / "ml-100k" / "fedavg-sasrec" / "fedavg" / "clean").exists()  # not made again
    for row in rows[1::2]:  # made here, and its drop is against the earlier clean run
        assert row["hr20_drop"] == pytest.approx(1 - row["hr20"] / 0.5) and row["versions"] != {"source": "x"}
        assert row["rejected"] == json.loads((Path(row["folder"]) / "result.json").read_text())["rejected"] > 0
    text = (report_dir / "report.md").read_text()
    assert "| ml-100k | lumos (earlier) | fedavg | clean |" in text and "/ml-100k/lumos/fedavg/promote-0.2/" not in text
    assert f"| {rows[3]['target_exposure']:.4f} | {rows[3]['rejected']} |" in text and "| 0.0000 | - |" in text
    # a report written later gives each row the versions its run recorded, not the reporter's
    config_path = Path(rows[3]["folder"]) / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "versions": {**config["versions"], "source": "an older commit"}}))
    done = subprocess.run([*command, "--report-only"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((report_dir / "robustness.json").read_text())
    assert rows[3]["versions"]["source"] == "an older commit" != rows[1]["versions"]["source"]


@pytest.mark.parametrize(
    "content, message",
    [(None, "cannot read the earlier report"), ('{"main": {}}', "is not a robustness.json"), ("[{}]", "rows without")],
)
def test_an_unreadable_earlier_report_is_a_clear_error(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "robustness.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(LumosError, match=message):
        read_earlier(path)
