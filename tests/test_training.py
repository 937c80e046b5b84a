"""End-to-end: the embedded default dataset, the training loop and the run directory."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lumosrec.core.dataset import load_dataset
from lumosrec.core.errors import ConfigError
from lumosrec.core.results import RESULT_KEYS, read_result, source_revision
from lumosrec.core.synthetic import SyntheticConfig, generate, write_folder
from lumosrec.core.training import TrainConfig
from lumosrec.launch.centralized import run_centralized
from lumosrec.launch.cli import main
from lumosrec.launch.experiment import run_method

SMALL = SyntheticConfig(num_users=500, seed=7)


def test_synthetic_is_deterministic_and_readable() -> None:
    first, second = generate(SMALL), generate(SMALL)
    assert all(np.array_equal(a, b) for a, b in zip(first.sequences, second.sequences))
    other = generate(SyntheticConfig(num_users=500, seed=8))
    assert not all(np.array_equal(a, b) for a, b in zip(first.sequences, other.sequences))
    assert len(set(first.titles[1:])) == first.num_items  # unique, readable titles
    assert all(first.categories[1:]) and " " in first.titles[1]


def test_synthetic_round_trips_through_the_folder_format(tmp_path: Path) -> None:
    dataset = generate(SMALL)
    loaded = load_dataset(write_folder(dataset, tmp_path / "syn"))
    assert loaded.num_users == dataset.num_users and loaded.num_items == dataset.num_items
    assert all(np.array_equal(a, b) for a, b in zip(loaded.sequences, dataset.sequences))
    assert loaded.titles == dataset.titles


@pytest.fixture(scope="module")
def sasrec_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run")
    result = run_centralized("centralized-sasrec", generate(SMALL), out, TrainConfig(epochs=12, seed=1), progress=False)
    return out, result


@pytest.mark.slow
def test_sasrec_beats_popularity_on_synthetic(sasrec_run: tuple[Path, dict]) -> None:
    _, result = sasrec_run
    for protocol in ("unmasked", "masked"):
        sasrec = result["test"][protocol]
        popularity = result["baselines"]["popularity"]["test"][protocol]
        assert sasrec["HR@10"] > 2 * popularity["HR@10"]
        assert sasrec["NDCG@10"] > 2 * popularity["NDCG@10"]


@pytest.mark.slow
def test_run_directory_schema(sasrec_run: tuple[Path, dict]) -> None:
    out, result = sasrec_run
    on_disk = json.loads((out / "result.json").read_text())
    assert set(RESULT_KEYS) <= set(on_disk)
    assert on_disk["test"] == result["test"]
    assert set(on_disk["test"]) == {"unmasked", "masked"}
    assert set(on_disk["test"]["masked"]) == {"HR@10", "HR@20", "NDCG@10", "NDCG@20", "MRR@10"}
    history = json.loads((out / "metrics.json").read_text())
    assert len(history) == on_disk["epochs"]
    assert on_disk["valid"] == history[on_disk["best_epoch"] - 1]["valid"]
    best_mrr = max(row["valid"]["unmasked"]["MRR@10"] for row in history)
    assert on_disk["valid"]["unmasked"]["MRR@10"] == best_mrr
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["seed"] == 1 and config["versions"]["torch"]
    assert config["versions"]["source"] == source_revision()
    assert (out / "model.pt").stat().st_size > 0


def test_results_name_the_commit_of_the_code_that_ran(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    (checkout / "core").mkdir(parents=True)
    (checkout / "core" / "results.py").write_text("first\n")
    (checkout / "report.md").write_text("first\n")

    def git(*args: str) -> str:
        command = ["git", "-C", str(checkout), "-c", "user.name=t", "-c", "user.email=t@t", *args]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "first")
    commit = git("rev-parse", "--short=12", "HEAD")
    assert source_revision(checkout) == commit
    (checkout / "report.md").write_text("a result written since\n")
    source_revision.cache_clear()
    assert source_revision(checkout) == commit  # results and reports are not the code
    (checkout / "core" / "results.py").write_text("changed\n")
    (checkout / "untracked.json").write_text("{}")  # run outputs beside the code are not changes to it
    source_revision.cache_clear()
    assert source_revision(checkout) == commit + "+dirty"
    assert source_revision(checkout / "core") == "unknown"  # a copy inside another checkout is not that checkout
    assert source_revision(tmp_path) == "unknown"  # an installed package, a container


def test_cli_train_cl4srec_and_refuse_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_folder(generate(SyntheticConfig(num_users=120, seed=3)), tmp_path / "data")
    out = tmp_path / "run"
    args = [
        "train",
        "--method",
        "centralized-cl4srec",
        "--data",
        str(data),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--quiet",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "centralized-cl4srec" in printed and "popularity" in printed
    assert json.loads((out / "result.json").read_text())["method"] == "centralized-cl4srec"
    assert main(args) == 2
    assert "already holds a finished run" in capsys.readouterr().err


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "interactions.csv").write_text("user_id,item,timestamp\n1,2,3\n")
    assert main(["data", "stats", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lumos: error:") and "missing column(s) item_id" in err and "\n" not in err
    assert main(["train", "--data", "ml-1m", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "lumos data download ml-1m" in capsys.readouterr().err


@pytest.mark.slow
def test_real_data_stats_when_available() -> None:
    from tests.conftest import SHARED_DATA

    if not (SHARED_DATA / "ml-100k").is_dir():
        pytest.skip("../shared/data is not beside the checkout")
    stats = load_dataset(SHARED_DATA / "ml-100k").stats()
    assert (stats["users"], stats["items"], stats["interactions"]) == (943, 1682, 100000)


def test_malformed_run_config_is_one_line(capsys: pytest.CaptureFixture) -> None:
    assert main(["simulate", "--run-config", 'data="unterminated']) == 2
    assert "cannot read 'data=\"unterminated'" in capsys.readouterr().err
    assert main(["simulate", "--run-config", "rounds"]) == 2
    assert "expected key=value" in capsys.readouterr().err


@pytest.mark.parametrize("max_grad_norm", [0.0, 1e-3])
def test_gradient_clipping_bounds_each_local_step(max_grad_norm: float) -> None:
    import torch

    from lumosrec.core.batching import PrefixSamples
    from lumosrec.core.evaluation import leave_one_out
    from lumosrec.core.training import train_epochs
    from lumosrec.models.sasrec import SASRec, SASRecConfig

    dataset = generate(SyntheticConfig(num_users=8, items_per_category=5, seed=2))
    split = leave_one_out(dataset.sequences, dataset.num_items)
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_items=dataset.num_items, hidden_size=16, inner_size=32, dropout=0.0))
    before = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    rate = 0.5
    optimizer = torch.optim.SGD(model.parameters(), lr=rate)
    samples = PrefixSamples([split.train[0]], 50)
    train_epochs(
        model, optimizer, samples, 1, 512, np.random.default_rng(0), torch.device("cpu"), max_grad_norm=max_grad_norm
    )
    step = float((torch.nn.utils.parameters_to_vector(model.parameters()).detach() - before).norm())
    if max_grad_norm:
        assert step <= rate * max_grad_norm * 1.0001  # one batch, one SGD step of a clipped gradient
    else:
        assert step > rate * 1e-3 * 10


def test_the_old_strategy_flag_still_trains_with_a_deprecation_line(tmp_path: Path, capsys) -> None:
    data = write_folder(generate(SyntheticConfig(num_users=40, seed=3)), tmp_path / "data")
    common = ["train", "--data", str(data), "--epochs", "1", "--hidden-size", "16", "--inner-size", "32", "--quiet"]
    assert main([*common, "--strategy", "centralized-sasrec", "--out", str(tmp_path / "old")]) == 0
    assert "`lumos train --strategy` is deprecated, use --method" in capsys.readouterr().err
    assert read_result(tmp_path / "old" / "result.json")["method"] == "centralized-sasrec"
    assert main([*common, "--strategy", "sracl", "--method", "centralized-sasrec", "--out", str(tmp_path / "x")]) == 2
    assert "disagree" in capsys.readouterr().err


def test_a_result_written_before_methods_had_their_name_is_reused(tmp_path: Path) -> None:
    legacy = {"strategy": "fedavg-sasrec", "dataset": "synthetic", "seed": 1, "test": {}}
    (tmp_path / "result.json").write_text(json.dumps(legacy))
    assert read_result(tmp_path / "result.json") == {
        "method": "fedavg-sasrec",
        **{k: v for k, v in legacy.items() if k != "strategy"},
    }
    # a finished run is reused by the method runner, whatever its age
    assert run_method("fedavg-sasrec", "synthetic", tmp_path, seed=1)["method"] == "fedavg-sasrec"


def test_an_interrupted_training_resumes_where_it_stopped(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from lumosrec.core.evaluation import leave_one_out
    from lumosrec.core.training import FIT_CHECKPOINT, fit, seed_everything
    from lumosrec.models.factory import build_model

    dataset = generate(SyntheticConfig(num_users=120, seed=7))
    split = leave_one_out(dataset.sequences, dataset.num_items)
    config = TrainConfig(epochs=3, batch_size=64, seed=3)

    def trained(epochs: int, checkpoint: Path | None) -> tuple[list[dict], dict]:
        # cl4srec: its augmentations draw from the model's own generator, which must resume too
        seed_everything(3)  # as run_centralized does: dropout draws from torch's global stream
        model = build_model("cl4srec", dataset.num_items, seed=3, hidden_size=16, inner_size=32)
        rows: list[dict] = []
        fitted = fit(model, split, replace(config, epochs=epochs), rows.append, False, checkpoint, {"data": "x"})
        return [{k: v for k, v in row.items() if "seconds" not in k} for row in rows], fitted.best_state

    uninterrupted, model = trained(3, None)
    trained(2, tmp_path / FIT_CHECKPOINT)  # stopped after epoch 2
    resumed, resumed_model = trained(3, tmp_path / FIT_CHECKPOINT)
    assert resumed == uninterrupted  # every epoch's loss and metrics, the restored ones included
    assert all(torch.equal(model[key], resumed_model[key]) for key in model)

    with pytest.raises(ConfigError, match=r"other settings \(learning_rate\)"):
        fit(
            build_model("cl4srec", dataset.num_items, seed=3, hidden_size=16, inner_size=32),
            split,
            replace(config, learning_rate=0.01),
            progress=False,
            checkpoint=tmp_path / FIT_CHECKPOINT,
            fingerprint={"data": "x"},
        )
    assert main(["train", "--data", "synthetic", "--out", str(tmp_path / "r"), "--lr", "-1", "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == "lumos: error: learning_rate must be positive, not -1.0"


def test_the_method_runner_resumes_a_centralized_run(tmp_path: Path) -> None:
    from lumosrec.launch.experiment import Budget

    data = str(write_folder(generate(SyntheticConfig(num_users=120, seed=7)), tmp_path / "data"))
    sizes, budget = {"hidden-size": 16, "inner-size": 32}, Budget(3, 1.0, 1)
    first = run_method("centralized-sasrec", data, tmp_path / "run", 3, budget, sizes, progress=False)
    (tmp_path / "run" / "result.json").unlink()  # as a run stopped before it wrote its result leaves its folder
    before = json.loads((tmp_path / "run" / "metrics.json").read_text())
    resumed = run_method("centralized-sasrec", data, tmp_path / "run", 3, budget, sizes, progress=False)
    # every epoch restored from the checkpoint (their timings too), none trained again
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == before
    assert resumed["test"] == first["test"] and resumed["epochs"] == 3


@pytest.mark.slow
def test_a_killed_local_only_run_resumes_with_the_next_node(
    tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    from lumosrec.launch.local import LOCAL_CHECKPOINT

    data = str(write_folder(generate(SyntheticConfig(num_users=100, seed=7)), tmp_path / "data"))

    def command(out: Path, run_config: str = "hidden-size=16 inner-size=32") -> list[str]:
        return [
            *("lumos", "run", "--method", "local-sasrec", "--data", data, "--out", str(out), "--quiet"),
            *("--rounds", "20", "--run-config", run_config),
        ]

    process = subprocess.Popen([sys.executable, "-m", "lumosrec.launch.cli", *command(tmp_path / "run")[1:]])
    progress, deadline = tmp_path / "run" / LOCAL_CHECKPOINT, time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if progress.is_file() and json.loads(progress.read_text())["nodes_done"] >= 10:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = json.loads(progress.read_text())["nodes_done"]
    assert 10 <= done < 100 and not (tmp_path / "run" / "result.json").exists()

    # another learning rate on the stopped folder: refused, naming the setting
    assert main(command(tmp_path / "run", "hidden-size=16 inner-size=32 learning-rate=0.2")[1:]) == 2
    assert "other settings (learning-rate)" in capsys.readouterr().err
    caplog.set_level(logging.INFO, logger="lumosrec.launch.local")
    assert main(command(tmp_path / "run")[1:]) == 0
    assert f"resumed after {done} of 100 nodes" in caplog.text  # trains only the nodes after the checkpoint's
    assert main(command(tmp_path / "whole")[1:]) == 0
    resumed, whole = (read_result(tmp_path / name / "result.json") for name in ("run", "whole"))
    assert resumed["test"] == whole["test"] and resumed["valid"] == whole["valid"]
    assert not progress.exists()
