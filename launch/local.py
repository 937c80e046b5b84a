"""``local-sasrec``: every client trains its own SASRec on its own users, without federation.

The lower bound a federation must beat. Each node of the run's partition (one user by default)
starts from the same initial weights as the federation's global model, trains with the
client's local optimizer settings for ``epochs`` epochs (the budget a federated client gets
in expectation, see :class:`lumosrec.launch.experiment.Budget`), and ranks its users' validation and
test items with its own model. The rank histograms are summed over nodes, as a federated
evaluation does, and written in the ``result.json`` schema.

Nodes are independent (each starts from the same weights, with its own random stream), so the
run is checkpointed after every node (:data:`LOCAL_CHECKPOINT`: the nodes done and their summed
histograms): started again on the same folder with the same settings, it goes on with the next
node and ends as an uninterrupted run would. On all of Beauty that is 22,363 models.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from lumosrec.client.local import local_optimizer
from lumosrec.core.batching import PrefixSamples
from lumosrec.core.data import node_data, run_data
from lumosrec.core.errors import ConfigError
from lumosrec.core.evaluation import PROTOCOLS, STAGES, RankCounts, rank_counts
from lumosrec.core.progress import progress_bar
from lumosrec.core.results import RunDirectory, peak_rss_mb, write_json
from lumosrec.core.runconfig import MODEL_KEYS, model_sizes
from lumosrec.core.training import check_same_settings, pick_device, seed_everything, train_epochs
from lumosrec.launch.app import check_run_config, default_run_config
from lumosrec.models.factory import build_model

log = logging.getLogger(__name__)

METHOD = "local-sasrec"
#: the progress of an unfinished run, in its folder
LOCAL_CHECKPOINT = "local_progress.json"
#: the run-config keys a local run reads besides the data (hashed) and the model sizes: a checkpoint
#: resumes only with the same values
FINGERPRINT_KEYS = (
    "sample-users", "sample-seed", "seed", "users-per-client", "client-optimizer", "learning-rate",
    "batch-size", "max-grad-norm",
)  # fmt: skip


def run_local(overrides: Mapping[str, object], epochs: int, progress: bool = True) -> dict:
    """Train one model per node for ``epochs`` epochs and return the ``result.json`` payload.

    ``overrides`` are run-config values as for a federated run (``data``, ``out-dir``,
    ``users-per-client``, ``learning-rate``, ``client-optimizer``, ``seed``, ...).
    """
    run = check_run_config(overrides, default_run_config())
    dataset = run_data(run)
    run_dir = RunDirectory(Path(str(run["out-dir"])), overwrite=True)
    # every client alone: a user, or a silo of users-per-client users (cohorts are a federation's speed-up)
    num_nodes = math.ceil(dataset.num_users / int(run["users-per-client"]))
    fingerprint = {
        **{key: run[key] for key in (*FINGERPRINT_KEYS, *MODEL_KEYS)},
        "data-sha256": dataset.content_sha256(),
        "epochs": epochs,
    }
    done, counts, seconds_before = _resume(run_dir.path / LOCAL_CHECKPOINT, fingerprint)
    run_dir.write_config({"method": METHOD, "run_config": dict(run), "nodes": num_nodes, "epochs": epochs})
    device = pick_device(str(run["device"]))
    seed_everything(int(run["seed"]))
    model = build_model("sasrec", dataset.num_items, **model_sizes(run)).to(device)
    initial = copy.deepcopy(model.state_dict())
    if done:
        log.info("%s: resumed after %d of %d nodes", METHOD, done, num_nodes)
    started = time.perf_counter() - seconds_before  # a resumed run goes on counting its earlier nodes' time
    nodes = progress_bar(
        range(done, num_nodes), desc="local models", unit="node", disable=not progress, initial=done, total=num_nodes
    )
    for node in nodes:
        data = node_data(run, {"partition-id": node, "num-partitions": num_nodes})
        model.load_state_dict(initial)
        rng = np.random.default_rng([int(run["seed"]), node])
        torch.manual_seed(int(rng.integers(2**31)))
        samples = PrefixSamples(data.split.train, int(run["max-len"]))
        train_epochs(
            model,
            local_optimizer(model, run),
            samples,
            epochs,
            int(run["batch-size"]),
            rng,
            device,
            max_grad_norm=float(run["max-grad-norm"]),
        )
        for stage in STAGES:
            for protocol, count in rank_counts(model, data.split, stage, int(run["max-len"]), device=device).items():
                counts[stage, protocol] = counts[stage, protocol] + count
        _save(run_dir.path / LOCAL_CHECKPOINT, fingerprint, node + 1, counts, time.perf_counter() - started)
    seconds = time.perf_counter() - started
    metrics = {stage: {protocol: counts[stage, protocol].metrics() for protocol in PROTOCOLS} for stage in STAGES}
    run_dir.log_metrics({"round": 1, "epochs": epochs, "round_seconds": seconds, **metrics})
    log.info("%s: %d nodes, %d epochs each, %.0f s", METHOD, num_nodes, epochs, seconds)
    result = run_dir.write_result(
        {
            "method": METHOD,
            "dataset": dataset.name,
            "seed": int(run["seed"]),
            "epochs": epochs,
            "best_epoch": epochs,
            "seconds_per_epoch": seconds / max(epochs, 1),
            "peak_rss_mb": peak_rss_mb(),
            "valid": metrics["valid"],
            "test": metrics["test"],
            "final_test": metrics["test"],
        }
    )
    (run_dir.path / LOCAL_CHECKPOINT).unlink()  # the result holds all of it
    return result


Counts = dict[tuple[str, str], RankCounts]


def _resume(path: Path, fingerprint: Mapping) -> tuple[int, Counts, float]:
    """The nodes done, their summed histograms and seconds, from the checkpoint at ``path`` (none:
    a fresh start); a checkpoint of other settings is refused."""
    if not path.is_file():
        return 0, {(stage, protocol): RankCounts.empty() for stage in STAGES for protocol in PROTOCOLS}, 0.0
    try:
        saved = json.loads(path.read_text())
        counts = {
            (stage, protocol): RankCounts(
                np.asarray(saved["counts"][stage][protocol], dtype=np.int64), int(saved["users"][stage][protocol])
            )
            for stage in STAGES
            for protocol in PROTOCOLS
        }
        done, seconds, stored = int(saved["nodes_done"]), float(saved["seconds"]), dict(saved["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(
            f"{path} cannot be read as a local run's progress ({type(error).__name__}); delete it to start afresh"
        ) from None
    check_same_settings(path, stored, fingerprint, "use another output folder, or delete it to start afresh")
    return done, counts, seconds


def _save(path: Path, fingerprint: Mapping, done: int, counts: Counts, seconds: float) -> None:
    write_json(
        path,
        {
            "fingerprint": dict(fingerprint),
            "nodes_done": done,
            "seconds": seconds,
            "counts": {s: {p: counts[s, p].at_rank.tolist() for p in PROTOCOLS} for s in STAGES},
            "users": {s: {p: counts[s, p].users for p in PROTOCOLS} for s in STAGES},
        },
    )
