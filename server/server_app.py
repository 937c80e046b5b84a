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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords, aggregate_metricrecords

from lumosrec.augment.grounding import text_item_table
from lumosrec.client.objectives import foreign_keys, later_keys, method_name, objective_for
from lumosrec.client.privacy import local_dp_on, local_dp_spent
from lumosrec.client.threats import any_threat, threat_refusal
from lumosrec.core.data import run_data
from lumosrec.core.dataset import catalog_name, catalog_sha256, catalog_size, catalog_titles, sample_users
from lumosrec.core.errors import ConfigError, FederationError
from lumosrec.core.evaluation import PROTOCOLS, STAGES, RankCounts
from lumosrec.core.paths import cache_dir
from lumosrec.core.results import RunDirectory, peak_rss_mb
from lumosrec.core.runconfig import check_values, cohort_size, model_sizes
from lumosrec.core.training import EARLY_STOPPING_METRIC, seed_everything
from lumosrec.models.factory import build_model
from lumosrec.server import checkpoint, validation
from lumosrec.server.secure import secure_evaluate, secure_train, use_secure_aggregation
from lumosrec.server.strategies import (
    build_strategy,
    cohort_refusal,
    privacy_spent,
    sampled_train_nodes,
    strategy_is_linear,
    strategy_keys,
    sum_metric_records,
)

app = ServerApp()
log = logging.getLogger("lumos.server")

#: Shared settings that must match for a checkpoint to be resumed (each objective adds its own).
FINGERPRINT_KEYS = (
    "data",
    "catalog",
    "strategy",
    "aggregation-weights",
    "dp-clipping-norm",
    "dp-noise-multiplier",
    "seed",
    "max-len",
    "hidden-size",
    "num-layers",
    "num-heads",
    "inner-size",
    "dropout",
    "users-per-client",
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


#: the client-side DP settings (``client/privacy.py``), in the fingerprint when on
LOCAL_DP_KEYS = ("local-dp-epsilon", "local-dp-clipping-norm", "local-dp-delta")
#: the other client-side defences (``client/privacy.py``), in the fingerprint when on
DEFENCE_KEYS = ("item-row-noise", "hide-history-length")
#: a simulation's noisy and malicious clients (``client/threats.py``), in the fingerprint when on
THREAT_KEYS = ("noise-share", "malicious-share", "malicious-attack", "malicious-scale", "promote-item")
#: how the server initialises the item table (``item-init``)
ITEM_INITS = ("random", "text")


def fingerprint(run: Mapping) -> dict:
    """The run's settings that a checkpoint must have been written with to be resumed: the shared
    ones, its strategy's and its objective's (their later knobs only when on), and a hash of the
    data's contents (a path may name other data later: a checkpoint of other data must not resume)."""
    optional = later_keys()
    found = {
        key: run[key]
        for key in (*FINGERPRINT_KEYS, *strategy_keys(run), *objective_for(run).fingerprint_keys)
        if key in run and not (key in optional and not run[key])
    }
    if cohort_size(run):  # only when on: checkpoints from before cohorts existed still resume
        found["cohort-size"] = cohort_size(run)
    if str(run.get("item-init", "random")) != "random":  # likewise
        found["item-init"] = str(run["item-init"])
    if local_dp_on(run):  # likewise
        found.update({key: run[key] for key in LOCAL_DP_KEYS})
    for key in DEFENCE_KEYS:  # likewise
        if run.get(key):
            found[key] = run[key]
    if any_threat(run):  # likewise: a simulation's noisy or malicious clients
        found.update({key: run[key] for key in THREAT_KEYS if key in run})
    catalog = str(run["catalog"])
    found["data-sha256"] = catalog_sha256(catalog) if catalog else run_data(run).content_sha256()
    return found


def load_checkpoint(out: Path, run: Mapping) -> checkpoint.RoundState | None:
    """The checkpoint in ``out`` if it was written by a run with ``run``'s settings (a ValueError
    naming the settings that differ otherwise); checkpoints written before a knob existed, or
    when fingerprints held every objective's keys, still resume."""
    if not (out / checkpoint.CHECKPOINT_FILE).is_file():  # a fresh start: no need to hash the data here
        return None
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


@dataclass
class Exchange:
    """What one round's training or evaluation exchange brought back."""

    sampled: int = 0  # messages sent
    missing: int = 0  # no reply within round-timeout (under SecAgg+: no share delivered, for whatever reason)
    errors: int = 0  # error replies: the node's ClientApp raised
    rejected: int = 0  # replies that failed a check (:mod:`lumosrec.server.validation`)
    accepted: int = 0  # replies that passed every check
    first_error: str = ""  # the first error reply's reason
    seconds: float = 0.0  # aggregation time

    @property
    def failures(self) -> int:
        """Sampled nodes whose reply did not count."""
        return self.missing + self.errors + self.rejected

    def refuse(self, reply: Message) -> None:
        """Count a reply that did not pass :func:`_accept`."""
        if reply.has_error():
            self.errors += 1
            self.first_error = self.first_error or reply.error.reason
        else:
            self.rejected += 1


def _accept(reply: Message, stage: str, server_round: int, check: Callable[[RecordDict], int]) -> int | None:
    """``check(reply.content)``'s count when the reply passes; None (logged) otherwise."""
    node = reply.metadata.src_node_id
    if reply.has_error():
        log.warning("round %d: node %d's %s reply is an error: %s", server_round, node, stage, reply.error.reason)
        return None
    try:
        return check(reply.content)
    except Exception as problem:  # a reply that breaks a check is the node's failure, never the server's
        log.warning("round %d: node %d's %s reply rejected: %s", server_round, node, stage, problem)
        return None


def wait_for_nodes(grid: Grid, needed: int, seconds: float, server_round: int) -> None:
    """Return once ``needed`` nodes are connected; a FederationError after ``seconds`` without them
    (Flower's strategies would wait for them forever)."""
    deadline, said = time.monotonic() + seconds, False
    while (connected := len(list(grid.get_node_ids()))) < needed:
        if time.monotonic() >= deadline:
            raise FederationError(
                f"round {server_round}: {connected} node(s) connected after waiting {seconds:g} s (node-wait) "
                f"and min-nodes={needed}; the run stopped after round {server_round - 1} and resumes from its "
                "checkpoint when started again with enough nodes"
            )
        if not said:
            log.warning("round %d: %d node(s) connected, waiting for min-nodes=%d", server_round, connected, needed)
            said = True
        time.sleep(1.0)


def _exchange(
    grid: Grid, chunk: list[Message], run: Mapping, server_round: int, stage: str, exchange: Exchange
) -> list[Message]:
    """Send ``chunk`` and return the replies that arrived within ``round-timeout``; the others
    count as failures of the round."""
    received = list(grid.send_and_receive(chunk, timeout=float(run["round-timeout"])))
    missing = len(chunk) - len(received)
    if missing:
        log.warning(
            "round %d: %d node(s) sent no %s reply within round-timeout=%ss",
            server_round,
            missing,
            stage,
            run["round-timeout"],
        )
        exchange.missing += missing
    return received


def _train(
    grid: Grid,
    context: Context,
    strategy: Strategy,
    server_round: int,
    arrays: ArrayRecord,
    config: ConfigRecord,
    limits: validation.ReplyLimits,
    secure: bool,
):
    """One training exchange; with linear strategies, in chunks of bounded memory.

    Every reply is checked before it counts (:mod:`lumosrec.server.validation`) and weighed by
    the server. A weighted average of chunk averages (weighted by their summed weights) is the
    weighted average of all updates, so chunking is exact for FedAvg-style aggregation while at
    most ``aggregation-chunk`` model replies are in memory at once (22k Beauty clients x 3.5 MB
    would not fit). Robust and DP strategies need every update and get them all at once. A
    reply that trained nothing (a cohort none of whose users was drawn) carries no weight and is
    left out. Under secure aggregation the server gets only the round's mean (:mod:`lumosrec.server.secure`).
    """
    run = context.run_config
    messages = list(strategy.configure_train(server_round, arrays, config, grid))
    if secure:
        return _secure_train(grid, context, strategy, server_round, arrays, messages, limits)
    size = int(run["aggregation-chunk"]) if strategy_is_linear(strategy) else 0
    replies, exchange = [], Exchange(sampled=len(messages))
    for chunk in _chunks(messages, size):
        weighed = []
        for reply in _exchange(grid, chunk, run, server_round, "train", exchange):
            examples = _accept(reply, "train", server_round, lambda c: validation.check_train_reply(c, limits))
            if examples is None:
                exchange.refuse(reply)
                continue
            exchange.accepted += 1
            if examples > 0:  # 0: a cohort none of whose users was drawn
                weighed.append(Message(validation.weigh(reply.content, examples, run), reply_to=reply))
        started = time.perf_counter()
        replies.extend(weighed if size == 0 or len(weighed) <= 1 else [_pre_average(weighed)])
        exchange.seconds += time.perf_counter() - started
    if not replies or exchange.accepted < int(run["min-nodes"]):
        return None, None, exchange
    started = time.perf_counter()
    aggregated, metrics = strategy.aggregate_train(server_round, replies)
    exchange.seconds += time.perf_counter() - started
    return aggregated, metrics, exchange


def _secure_train(
    grid: Grid,
    context: Context,
    strategy: Strategy,
    server_round: int,
    arrays: ArrayRecord,
    messages: list[Message],
    limits: validation.ReplyLimits,
):
    exchange = Exchange(sampled=len(messages))
    started = time.perf_counter()
    mean, delivered = secure_train(
        grid, context, messages, arrays, context.run_config, server_round, limits.max_examples
    )
    exchange.accepted, exchange.missing = delivered, len(messages) - delivered
    if mean is None or delivered < int(context.run_config["min-nodes"]):
        exchange.seconds = time.perf_counter() - started
        return None, None, exchange
    aggregated, metrics = strategy.aggregate_train(server_round, [mean])
    exchange.seconds = time.perf_counter() - started  # the protocol's four exchanges included
    return aggregated, metrics, exchange


def _pre_average(replies: list[Message]) -> Message:
    contents = [reply.content for reply in replies]
    metrics = aggregate_metricrecords(contents, validation.WEIGHT_KEY)
    for key in ("num-examples", validation.WEIGHT_KEY):
        metrics[key] = sum(int(c["metrics"][key]) for c in contents)
    content = RecordDict({"arrays": aggregate_arrayrecords(contents, validation.WEIGHT_KEY), "metrics": metrics})
    return Message(content, reply_to=replies[0])


def _evaluate(
    grid: Grid,
    context: Context,
    strategy: Strategy,
    server_round: int,
    arrays: ArrayRecord,
    limits: validation.ReplyLimits,
    secure: bool,
):
    """One evaluation exchange, in chunks: the checked replies' rank histograms are summed (never
    averaged or weighed), so chunking is exact and the metrics equal the centralized ones. Under
    secure aggregation the server gets only their sum."""
    run = context.run_config
    messages = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid))
    summed, exchange = None, Exchange(sampled=len(messages))
    if secure:
        summed, exchange.accepted = secure_evaluate(grid, context, messages, run, server_round, limits.max_users)
        exchange.missing = len(messages) - exchange.accepted
        return summed, exchange
    for chunk in _chunks(messages, int(run["aggregation-chunk"])):
        valid = []
        for reply in _exchange(grid, chunk, run, server_round, "evaluate", exchange):
            if _accept(reply, "evaluate", server_round, lambda c: validation.check_evaluate_reply(c, limits)) is None:
                exchange.refuse(reply)
            else:
                valid.append(reply)
        exchange.accepted += len(valid)
        contents = [reply.content for reply in valid] + ([RecordDict({"metrics": summed})] if summed else [])
        summed = sum_metric_records(contents) if contents else None
    return summed, exchange


def run_rounds(grid: Grid, context: Context) -> dict:
    """Run (or resume) the federation and return the ``result.json`` payload."""
    run = context.run_config
    check_values(run)  # a bare `flwr run .` has had no launcher to check them
    if str(run["item-init"]) not in ITEM_INITS:
        raise ConfigError(f"run config item-init={run['item-init']!r}: choose one of {', '.join(ITEM_INITS)}")
    out = Path(str(run["out-dir"]))
    if str(run["catalog"]):
        dataset_name, num_items = catalog_name(str(run["catalog"])), catalog_size(str(run["catalog"]))
    else:
        dataset = run_data(run)
        dataset_name, num_items = dataset.name, dataset.num_items
    refusal = cohort_refusal(run) or threat_refusal(run)
    if refusal:
        raise ConfigError(refusal)
    seed_everything(int(run["seed"]))
    model = build_model("sasrec", num_items, **model_sizes(run))
    num_nodes = len(list(grid.get_node_ids()))
    strategy = build_strategy(run, num_nodes)
    secure = use_secure_aggregation(run, strategy_is_linear(strategy), sampled_train_nodes(run, num_nodes))
    state = load_checkpoint(out, run) if bool(run["resume"]) else None
    run_dir = RunDirectory(out, overwrite=True)
    asked = {
        "method": method_name(run),
        "strategy": str(run["strategy"]),
        "run_config": dict(run),
        "nodes": num_nodes,
        "secure_aggregation": secure,
    }
    if state is None:
        if str(run["item-init"]) == "text":
            _init_items_from_text(model, run)
        state = checkpoint.RoundState(0, model.state_dict(), fingerprint=fingerprint(run))
    else:
        checkpoint.restore_strategy(strategy, state)
        log.info("resuming from %s after round %d", out / checkpoint.CHECKPOINT_FILE, state.completed_rounds)
        # what this invocation asked (a resumed run may go on for more rounds than the first)
        asked["resumed_after_round"] = state.completed_rounds
    run_dir.write_config(asked)
    run_dir.history = state.history
    arrays = ArrayRecord(state.state_dict)
    limits = validation.ReplyLimits.for_run(run, arrays, num_nodes)
    if secure:
        log.info("secure aggregation (SecAgg+): the server sees only each round's sums, and checks those")
    log.info(
        "replies are checked against the global model's %d arrays, at most %d training samples and %d users each",
        len(limits.arrays),
        limits.max_examples,
        limits.max_users,
    )
    num_rounds = int(run["num-server-rounds"])
    for server_round in range(state.completed_rounds + 1, num_rounds + 1):
        started = time.perf_counter()
        config, users = ConfigRecord(), None
        if cohort_size(run):
            users = round_users(run, server_round, run_data(run).num_users)
            config["train-users"] = users
        wait_for_nodes(grid, int(run["min-nodes"]), float(run["node-wait"]), server_round)
        before = checkpoint.snapshot(strategy)  # a round that yields no new model leaves no trace
        aggregated, train_metrics, trained = _train(
            grid, context, strategy, server_round, arrays, config, limits, secure
        )
        if trained.sampled and trained.errors == trained.sampled:
            # the same code raising on every node is a cause to fix, not a round to skip (a
            # network's losses are missing replies, and a few failing nodes still leave a round)
            raise FederationError(
                f"round {server_round}: all {trained.sampled} sampled nodes raised in training, the first with "
                f"{trained.first_error}; the run stopped after round {server_round - 1} and resumes from its "
                "checkpoint once the cause is fixed"
            )
        updated, skipped = _next_model(aggregated, trained, int(run["min-nodes"]), limits)
        if skipped:
            log.warning("round %d skipped, the global model is unchanged: %s", server_round, skipped)
            checkpoint.restore(strategy, before)
        else:
            arrays = updated
        row = {
            "round": server_round,
            "train_nodes": trained.sampled,
            **({"train_users": len(users)} if users is not None else {}),
            "train_failures": trained.failures,
            "train_rejected": trained.rejected,
            "skipped": skipped,
            "train_loss": float(train_metrics["train-loss"]) if train_metrics and not skipped else None,
            "train_seconds": time.perf_counter() - started,
            "aggregate_seconds": trained.seconds,
        }
        spent = privacy_spent(strategy)
        if spent is not None:
            row["dp_epsilon"] = spent["epsilon"]
        eval_every = int(run["eval-every"])
        if eval_every > 0 and (server_round % eval_every == 0 or server_round == num_rounds):
            eval_started = time.perf_counter()
            wait_for_nodes(grid, int(run["min-nodes"]), float(run["node-wait"]), server_round)
            summed, evaluated = _evaluate(grid, context, strategy, server_round, arrays, limits, secure)
            row.update(eval_nodes=evaluated.sampled, eval_failures=evaluated.failures, eval_rejected=evaluated.rejected)
            if summed is None:
                log.warning(
                    "round %d: no node returned a valid evaluation (%d failures)", server_round, evaluated.failures
                )
            else:
                row.update(eval_users=int(summed["num-examples"]), **metrics_from_histograms(summed))
                log.info(
                    "round %d: loss %.4f, test HR@20 %.4f NDCG@20 %.4f (%d failures)",
                    server_round,
                    row["train_loss"] or float("nan"),
                    row["test"]["unmasked"]["HR@20"],
                    row["test"]["unmasked"]["NDCG@20"],
                    trained.failures + evaluated.failures,
                )
            row["eval_seconds"] = time.perf_counter() - eval_started
        row["round_seconds"] = time.perf_counter() - started
        run_dir.history.append(row)
        state.completed_rounds, state.state_dict = server_round, arrays.to_torch_state_dict()
        # best model, then checkpoint, then metrics.json: a server killed in between redoes the
        # round, and metrics.json never lists a round the checkpoint does not hold
        if _is_best(row, run_dir.history):
            run_dir.save_model(state.state_dict, model.config.to_dict())
        checkpoint.save(out, state, strategy)
        run_dir.write_metrics()
    return _result(run, dataset_name, run_dir, privacy_spent(strategy))


def _init_items_from_text(model: torch.nn.Module, run: Mapping) -> None:
    """The item table from the catalog's public text (:func:`text_item_table`), built here, on the
    server: no client's data is involved."""
    catalog = str(run["catalog"])
    titles = catalog_titles(catalog) if catalog else run_data(run).titles
    if not any(titles[1:]):
        raise ConfigError('item-init="text" needs item titles, and this catalog has none')
    table = text_item_table(
        titles, model.config.hidden_size, model.config.initializer_range, int(run["seed"]), cache_dir("embeddings")
    )
    with torch.no_grad():
        model.item_embedding.weight.copy_(torch.from_numpy(table))
    log.info("item table initialised from the text of %d titled items", sum(bool(t) for t in titles[1:]))


def _next_model(
    aggregated: ArrayRecord | None, trained: Exchange, min_nodes: int, limits: validation.ReplyLimits
) -> tuple[ArrayRecord | None, str | None]:
    """The round's new global model, or None and why the round yields none."""
    if trained.accepted < min_nodes:
        return None, f"{trained.accepted} valid replies of {trained.sampled}, fewer than min-nodes={min_nodes}"
    if aggregated is None:
        return None, f"the strategy aggregated nothing from {trained.accepted} valid replies"
    try:
        return validation.as_global_model(aggregated, limits), None
    except ValueError as problem:
        return None, str(problem)


def _is_best(row: dict, history: list[dict]) -> bool:
    if "valid" not in row:
        return False
    scores = [r["valid"]["unmasked"][EARLY_STOPPING_METRIC] for r in history if "valid" in r]
    return row["valid"]["unmasked"][EARLY_STOPPING_METRIC] >= max(scores)


def _result(run: Mapping, dataset_name: str, run_dir: RunDirectory, privacy: dict | None) -> dict:
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
        "rejected": sum(r["train_rejected"] + r.get("eval_rejected", 0) for r in run_dir.history),
        "skipped_rounds": sum(bool(r.get("skipped")) for r in run_dir.history),
        **({"dp": privacy} if privacy is not None else {}),
        **({"local_dp": local_dp_spent(run, len(run_dir.history))} if local_dp_on(run) else {}),
    }
    return run_dir.write_result(result)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of ``flwr run``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Flower's logger prints through its own handler (propagated, each line came twice), and httpx
    # logs every request the app makes to the SuperLink (most lines of `flwr log`)
    logging.getLogger("flwr").propagate = False
    logging.getLogger("httpx").setLevel(logging.WARNING)
    result = run_rounds(grid, context)
    # a relative out-dir resolves against the SuperLink's working directory: say where it is
    log.info(
        "finished: best round %d, results in %s",
        result["best_epoch"],
        Path(str(context.run_config["out-dir"])).resolve(),
    )
