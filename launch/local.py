"""``local-sasrec``: every client trains its own SASRec on its own users, without federation.

The lower bound a federation must beat. Each node of the run's partition (one user by default)
starts from the same initial weights as the federation's global model, trains with the
client's local optimizer settings for ``epochs`` epochs (the budget a federated client gets
in expectation, see :class:`lumosrec.launch.experiment.Budget`), and ranks its users' validation and
test items with its own model. The rank histograms are summed over nodes, as a federated
evaluation does, and written in the ``result.json`` schema.
"""

from __future__ import annotations

import copy
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
from lumosrec.core.evaluation import PROTOCOLS, STAGES, RankCounts, rank_counts
from lumosrec.core.progress import progress_bar
from lumosrec.core.results import RunDirectory, peak_rss_mb
from lumosrec.core.runconfig import model_sizes
from lumosrec.core.training import pick_device, seed_everything, train_epochs
from lumosrec.launch.app import check_run_config, default_run_config
from lumosrec.models.factory import build_model

log = logging.getLogger(__name__)

METHOD = "local-sasrec"


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
    run_dir.write_config({"method": METHOD, "run_config": dict(run), "nodes": num_nodes, "epochs": epochs})
    device = pick_device(str(run["device"]))
    seed_everything(int(run["seed"]))
    model = build_model("sasrec", dataset.num_items, **model_sizes(run)).to(device)
    initial = copy.deepcopy(model.state_dict())
    counts = {(stage, protocol): RankCounts.empty() for stage in STAGES for protocol in PROTOCOLS}
    started = time.perf_counter()
    for node in progress_bar(range(num_nodes), desc="local models", unit="node", disable=not progress):
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
    seconds = time.perf_counter() - started
    metrics = {stage: {protocol: counts[stage, protocol].metrics() for protocol in PROTOCOLS} for stage in STAGES}
    run_dir.log_metrics({"round": 1, "epochs": epochs, "round_seconds": seconds, **metrics})
    log.info("%s: %d nodes, %d epochs each, %.0f s", METHOD, num_nodes, epochs, seconds)
    return run_dir.write_result(
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
