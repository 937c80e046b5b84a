"""Flower ServerApp: the federated round loop with checkpoints, failure accounting, results.

The loop is :meth:`flwr.serverapp.strategy.Strategy.start`'s (configure → send → aggregate,
for training then evaluation), written out so that every completed round is checkpointed
(:mod:`lumosrec.server.checkpoint`), client failures are counted per round, and the run ends with the
same ``result.json`` schema as centralized runs (:mod:`lumosrec.core.results`).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords, aggregate_metricrecords

from lumosrec.client.objectives import foreign_keys, later_keys, method_name, objective_for
from lumosrec.core.data import run_data
from lumosrec.core.dataset import catalog_size, sample_users
from lumosrec.core.errors import ConfigError
from lumosrec.core.evaluation import PROTOCOLS, STAGES, RankCounts
from lumosrec.core.results import RunDirectory, peak_rss_mb
from lumosrec.core.runconfig import cohort_size, model_sizes
from lumosrec.core.training import EARLY_STOPPING_METRIC, seed_everything
from lumosrec.models.factory import build_model
from lumosrec.server import checkpoint
from lumosrec.server.strategies import build_strategy, cohort_refusal, strategy_is_linear, sum_metric_records

app = ServerApp()
log = logging.getLogger("lumos.server")

#: Shared settings that must match for a checkpoint to be resumed (each objective adds its own).
FINGERPRINT_KEYS = (
    "data",
    "strategy",
    "seed",
    "max-len",
    "hidden-size",
    "num-layers",
    "num-heads",
    "inner-size",
    "fraction-train",
    "local-epochs",
    "learning-rate",
    "batch-size",
    "client-optimizer",
    "max-grad-norm",
    "sample-users",
    "sample-seed",
    "objective",
)


def fingerprint(run: Mapping) -> dict:
    """The run's settings that a checkpoint must have been written with to be resumed: the shared
    ones and the run's objective's (its later knobs only when on)."""
    optional = later_keys()
    found = {
        key: run[key]
        for key in (*FINGERPRINT_KEYS, *objective_for(run).fingerprint_keys)
        if key in run and not (key in optional and not run[key])
    }
    if cohort_size(run):  # only when on: checkpoints from before cohorts existed still resume
        found["cohort-size"] = cohort_size(run)
    return found


def load_checkpoint(out: Path, run: Mapping) -> checkpoint.RoundState | None:
    """The checkpoint in ``out`` if it was written by a run with ``run``'s settings (a ValueError
    naming the settings that differ otherwise); checkpoints written before a knob existed, or
    when fingerprints held every objective's keys, still resume."""
    return checkpoint.load(out, fingerprint(run), later_keys(), foreign_keys(run))


def metrics_from_histograms(aggregated: Mapping) -> dict[str, dict[str, dict[str, float]]]:
    """``{stage: {protocol: metrics}}`` from summed rank histograms."""
    users = int(aggregated["num-examples"])
    return {
        stage: {
            protocol: RankCounts(np.asarray(aggregated[f"{stage}-{protocol}-at-rank"]), users).metrics()
            for protocol in PROTOCOLS
        }
        for stage in STAGES
    }


def _chunks(messages, size: int):
    messages = list(messages)
    size = size if size > 0 else max(len(messages), 1)
    for start in range(0, len(messages), size):
        yield messages[start : start + size]


def round_users(run: Mapping, server_round: int, num_users: int) -> list[int]:
    """The users a cohort round trains: ``fraction-train`` of them (rounded, at least one), drawn
    without replacement by a generator seeded with the run's seed and the round, so each user
    trains with probability ``fraction-train`` whichever node holds it."""
    count = max(1, round(float(run["fraction-train"]) * num_users))
    return sample_users(num_users, count, [int(run["seed"]), server_round]).tolist()


def _train(grid: Grid, strategy: Strategy, server_round: int, arrays: ArrayRecord, run: Mapping, config: ConfigRecord):
    """One training exchange; with linear strategies, in chunks of bounded memory.

    A weighted average of chunk averages (weighted by their example counts) is the weighted
    average of all updates, so chunking is exact for FedAvg-style aggregation while at most
    ``aggregation-chunk`` model replies are in memory at once (22k Beauty clients x 3.5 MB
    would not fit). Robust and DP strategies need every update and get them all at once.
    A reply that trained nothing (a cohort none of whose users was drawn) carries no weight and
    is left out.
    """
    messages = list(strategy.configure_train(server_round, arrays, config, grid))
    size = int(run["aggregation-chunk"]) if strategy_is_linear(strategy) else 0
    replies, failures, aggregating = [], 0, 0.0
    for chunk in _chunks(messages, size):
        received = list(grid.send_and_receive(chunk, timeout=float(run["round-timeout"])))
        failures += sum(reply.has_error() for reply in received)
        valid = [r for r in received if not r.has_error() and int(r.content["metrics"]["num-examples"]) > 0]
        started = time.perf_counter()
        replies.extend(valid if size == 0 or len(valid) <= 1 else [_pre_average(valid)])
        aggregating += time.perf_counter() - started
    started = time.perf_counter()
    aggregated, metrics = strategy.aggregate_train(server_round, replies) if replies else (None, None)
    return aggregated, metrics, failures, len(messages), aggregating + time.perf_counter() - started


def _pre_average(replies: list[Message]) -> Message:
    contents = [reply.content for reply in replies]
    metrics = aggregate_metricrecords(contents, "num-examples")
    metrics["num-examples"] = sum(int(c["metrics"]["num-examples"]) for c in contents)
    content = RecordDict({"arrays": aggregate_arrayrecords(contents, "num-examples"), "metrics": metrics})
    return Message(content, reply_to=replies[0])


def _evaluate(grid: Grid, strategy: Strategy, server_round: int, arrays: ArrayRecord, run: Mapping):
    """One evaluation exchange, in chunks: rank histograms are summed, so chunking is exact."""
    messages = strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid)
    summed, failures, replied = None, 0, 0
    for chunk in _chunks(messages, int(run["aggregation-chunk"])):
        received = list(grid.send_and_receive(chunk, timeout=float(run["round-timeout"])))
        failures += sum(reply.has_error() for reply in received)
        replied += len(received)
        partial = strategy.aggregate_evaluate(server_round, received)
        if partial is not None:
            summed = (
                partial
                if summed is None
                else sum_metric_records(
                    [RecordDict({"metrics": summed}), RecordDict({"metrics": partial})], "num-examples"
                )
            )
    return summed, failures, replied


def run_rounds(grid: Grid, context: Context) -> dict:
    """Run (or resume) the federation and return the ``result.json`` payload."""
    run = context.run_config
    out = Path(str(run["out-dir"]))
    if str(run["catalog"]):
        dataset_name, num_items = Path(str(run["catalog"])).name, catalog_size(str(run["catalog"]))
    else:
        dataset = run_data(run)
        dataset_name, num_items = dataset.name, dataset.num_items
    refusal = cohort_refusal(run)
    if refusal:
        raise ConfigError(refusal)
    seed_everything(int(run["seed"]))
    model = build_model("sasrec", num_items, **model_sizes(run))
    num_nodes = len(list(grid.get_node_ids()))
    strategy = build_strategy(run, max(1, round(float(run["fraction-train"]) * num_nodes)))
    state = load_checkpoint(out, run) if bool(run["resume"]) else None
    run_dir = RunDirectory(out, overwrite=True)
    if state is None:
        state = checkpoint.RoundState(0, model.state_dict(), fingerprint=fingerprint(run))
        run_dir.write_config(
            {"method": method_name(run), "strategy": str(run["strategy"]), "run_config": dict(run), "nodes": num_nodes}
        )
    else:
        checkpoint.restore_strategy(strategy, state)
        log.info("resuming from %s after round %d", out / checkpoint.CHECKPOINT_FILE, state.completed_rounds)
    run_dir.history = state.history
    arrays = ArrayRecord(state.state_dict)
    num_rounds = int(run["num-server-rounds"])
    for server_round in range(state.completed_rounds + 1, num_rounds + 1):
        started = time.perf_counter()
        config, users = ConfigRecord(), None
        if cohort_size(run):
            users = round_users(run, server_round, run_data(run).num_users)
            config["train-users"] = users
        aggregated, train_metrics, train_failures, sampled, aggregate_seconds = _train(
            grid, strategy, server_round, arrays, run, config
        )
        if aggregated is None:
            raise RuntimeError(f"round {server_round}: no client returned an update ({train_failures} failures)")
        arrays = aggregated
        row = {
            "round": server_round,
            "train_nodes": sampled,
            **({"train_users": len(users)} if users is not None else {}),
            "train_failures": train_failures,
            "train_loss": float(train_metrics["train-loss"]) if train_metrics else None,
            "train_seconds": time.perf_counter() - started,
            "aggregate_seconds": aggregate_seconds,
        }
        eval_every = int(run["eval-every"])
        if eval_every > 0 and (server_round % eval_every == 0 or server_round == num_rounds):
            eval_started = time.perf_counter()
            summed, eval_failures, eval_nodes = _evaluate(grid, strategy, server_round, arrays, run)
            if summed is None:
                raise RuntimeError(f"round {server_round}: no client returned an evaluation ({eval_failures} failures)")
            row.update(eval_nodes=eval_nodes, eval_failures=eval_failures, eval_users=int(summed["num-examples"]))
            row.update(metrics_from_histograms(summed), eval_seconds=time.perf_counter() - eval_started)
            log.info(
                "round %d: loss %.4f, test HR@20 %.4f NDCG@20 %.4f (%d failures)",
                server_round,
                row["train_loss"] or float("nan"),
                row["test"]["unmasked"]["HR@20"],
                row["test"]["unmasked"]["NDCG@20"],
                train_failures + eval_failures,
            )
        row["round_seconds"] = time.perf_counter() - started
        run_dir.log_metrics(row)
        state.completed_rounds, state.state_dict = server_round, arrays.to_torch_state_dict()
        checkpoint.save(out, state, strategy)
        if _is_best(row, run_dir.history):
            run_dir.save_model(state.state_dict, model.config.to_dict())
    return _result(run, dataset_name, run_dir)


def _is_best(row: dict, history: list[dict]) -> bool:
    if "valid" not in row:
        return False
    scores = [r["valid"]["unmasked"][EARLY_STOPPING_METRIC] for r in history if "valid" in r]
    return row["valid"]["unmasked"][EARLY_STOPPING_METRIC] >= max(scores)


def _result(run: Mapping, dataset_name: str, run_dir: RunDirectory) -> dict:
    evaluated = [r for r in run_dir.history if "valid" in r]
    # the latest of equally good rounds, as _is_best saves it; no evaluation at all (eval-every=0,
    # e.g. for timing) leaves the metrics empty
    best = max(reversed(evaluated), key=lambda r: r["valid"]["unmasked"][EARLY_STOPPING_METRIC], default={})
    result = {
        "method": method_name(run),
        "dataset": dataset_name,
        "seed": int(run["seed"]),
        "epochs": len(run_dir.history),
        "best_epoch": best.get("round", 0),
        "seconds_per_epoch": statistics.median(r["round_seconds"] for r in run_dir.history),
        "peak_rss_mb": peak_rss_mb(),
        "valid": best.get("valid", {}),
        "test": best.get("test", {}),
        "final_test": evaluated[-1]["test"] if evaluated else {},
        "failures": sum(r["train_failures"] + r.get("eval_failures", 0) for r in run_dir.history),
    }
    return run_dir.write_result(result)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of ``flwr run``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = run_rounds(grid, context)
    log.info("finished: best round %d, results in %s", result["best_epoch"], context.run_config["out-dir"])
