"""Centralized methods: one model trained on every user's training prefixes.

``lumos train --method centralized-sasrec|centralized-cl4srec|sracl`` lands here; federated
methods write the same :mod:`lumosrec.core.results` schema from the Flower server. ``sracl``
first builds its semantic side (:mod:`lumosrec.augment.semantic`: LLM texts, embeddings, neighbours).
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from pathlib import Path

from lumosrec.augment.runtime import RuntimeConfig
from lumosrec.augment.semantic import SemanticConfig, build_semantic_side
from lumosrec.core.dataset import Dataset
from lumosrec.core.errors import ConfigError
from lumosrec.core.evaluation import METRIC_NAMES, evaluate, leave_one_out
from lumosrec.core.results import RunDirectory, format_table, peak_rss_mb
from lumosrec.core.training import FIT_CHECKPOINT, TrainConfig, fit, pick_device, seed_everything
from lumosrec.models.factory import build_model
from lumosrec.models.popularity import Popularity

log = logging.getLogger(__name__)

#: centralized method -> the model it trains (a name of the model factory)
CENTRALIZED_METHODS = {"centralized-sasrec": "sasrec", "centralized-cl4srec": "cl4srec", "sracl": "sracl"}


def run_centralized(
    method: str,
    dataset: Dataset,
    out: str | Path,
    train: TrainConfig,
    hyper: dict | None = None,
    overwrite: bool = False,
    progress: bool = True,
    semantic: SemanticConfig | None = None,
    runtime: RuntimeConfig | None = None,
) -> dict:
    """Train, evaluate on test with both protocols, and write the run directory.

    Returns the ``result.json`` payload, which also carries the popularity baseline's test
    metrics under ``baselines`` so every run shows what a non-personalised ranking gets.
    ``semantic`` and ``runtime`` configure ``sracl``'s semantic side and its LLM.
    """
    if method not in CENTRALIZED_METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(CENTRALIZED_METHODS)}")
    run = RunDirectory(out, overwrite=overwrite)
    if overwrite:  # start afresh rather than resume
        (run.path / FIT_CHECKPOINT).unlink(missing_ok=True)
    seed_everything(train.seed)
    split = leave_one_out(dataset.sequences, dataset.num_items)
    hyper, side = dict(hyper or {}), None
    if method == "sracl":
        semantic = semantic or SemanticConfig()
        side = build_semantic_side(dataset, split, semantic, runtime, progress)
        hyper["semantic_size"] = side.dimension
    model = build_model(CENTRALIZED_METHODS[method], dataset.num_items, seed=train.seed, max_len=train.max_len, **hyper)
    if side is not None:
        model.set_semantics(side.user_vectors, side.user_neighbours, split.train, side.item_neighbours)
    run.write_config(
        {
            "method": method,
            "dataset": dataset.name,
            "dataset_stats": dataset.stats(),
            "train": dataclasses.asdict(train),
            "model": model.config.to_dict(),
            **({"semantic": dataclasses.asdict(semantic)} if side is not None else {}),
        }
    )
    started = time.perf_counter()
    fitted = fit(
        model,
        split,
        train,
        on_epoch=run.log_metrics,
        progress=progress,
        checkpoint=run.path / FIT_CHECKPOINT,
        fingerprint={"method": method, "data-sha256": dataset.content_sha256(), "model": model.config.to_dict()},
    )
    device = pick_device(train.device)
    run.save_model(fitted.best_state, model.config.to_dict())
    popularity = Popularity(split.train, dataset.num_items)
    result = {
        "method": method,
        "dataset": dataset.name,
        "seed": train.seed,
        "epochs": len(fitted.history),
        "best_epoch": fitted.best_epoch,
        "seconds_per_epoch": statistics.median(fitted.seconds_per_epoch),
        "total_seconds": time.perf_counter() - started,
        "peak_rss_mb": peak_rss_mb(),
        "valid": fitted.history[fitted.best_epoch - 1]["valid"],
        "test": evaluate(model, split, "test", train.max_len, device=device),
        "baselines": {"popularity": {"test": evaluate(popularity, split, "test", train.max_len)}},
        **({"semantic": side.report} if side is not None else {}),
    }
    return run.write_result(result)


def result_table(result: dict) -> str:
    """Test metrics of the run next to the popularity baseline, under a title that says what they are."""
    rows = {result["method"]: result["test"]}
    for name, baseline in result.get("baselines", {}).items():
        rows[name] = baseline["test"]
    unit = "round" if "failures" in result else "epoch"  # federated results count failures
    chosen = (
        f"; the model of {unit} {result['best_epoch']}, chosen by validation MRR@10" if result.get("best_epoch") else ""
    )
    title = f"Test metrics on {result['dataset']}: each user's last item ranked against all items{chosen}"
    return title + "\n" + format_table(rows, METRIC_NAMES)
