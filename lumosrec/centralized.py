"""Centralized strategies: one model trained on every user's training prefixes.

``lumos train --strategy centralized-sasrec|centralized-cl4srec|sracl`` lands here; federated
strategies write the same :mod:`lumosrec.results` schema from the Flower server. ``sracl``
first builds its semantic side (:mod:`augment.semantic`: LLM texts, embeddings, neighbours).
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

from lumosrec.dataset import Dataset
from lumosrec.errors import ConfigError
from lumosrec.evaluation import METRIC_NAMES, evaluate, leave_one_out
from lumosrec.results import RunDirectory, format_table, peak_rss_mb
from lumosrec.training import TrainConfig, fit, pick_device, seed_everything
from models.cl4srec import CL4SRec, CL4SRecConfig
from models.popularity import Popularity
from models.sasrec import SASRec, SASRecConfig
from models.sracl import SRACL, SRACLConfig

if TYPE_CHECKING:
    from augment.runtime import RuntimeConfig
    from augment.semantic import SemanticConfig

log = logging.getLogger(__name__)

STRATEGIES = {
    "centralized-sasrec": (SASRec, SASRecConfig),
    "centralized-cl4srec": (CL4SRec, CL4SRecConfig),
    "sracl": (SRACL, SRACLConfig),
}


def build_model(strategy: str, num_items: int, train: TrainConfig, **hyper: float) -> SASRec:
    """Instantiate ``strategy``'s model; unknown hyper-parameters are rejected by name."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    model_class, config_class = STRATEGIES[strategy]
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(hyper) - known)
    if unknown:
        raise ConfigError(f"strategy {strategy} has no hyper-parameter(s) {', '.join(unknown)}")
    if "seed" in known:
        hyper = {**hyper, "seed": train.seed}
    return model_class(config_class(num_items=num_items, max_len=train.max_len, **hyper))


def run_centralized(
    strategy: str,
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
    run = RunDirectory(out, overwrite=overwrite)
    seed_everything(train.seed)
    split = leave_one_out(dataset.sequences, dataset.num_items)
    hyper, side = dict(hyper or {}), None
    if strategy == "sracl":
        from augment.semantic import SemanticConfig, build_semantic_side

        semantic = semantic or SemanticConfig()
        side = build_semantic_side(dataset, split, semantic, runtime, progress)
        hyper["semantic_size"] = side.dimension
    model = build_model(strategy, dataset.num_items, train, **hyper)
    if side is not None:
        model.set_semantics(side.user_vectors, side.user_neighbours, split.train, side.item_neighbours)
    run.write_config(
        {
            "strategy": strategy,
            "dataset": dataset.name,
            "dataset_stats": dataset.stats(),
            "train": dataclasses.asdict(train),
            "model": model.config.to_dict(),
            **({"semantic": dataclasses.asdict(semantic)} if side is not None else {}),
        }
    )
    started = time.perf_counter()
    fitted = fit(model, split, train, on_epoch=run.log_metrics, progress=progress)
    device = pick_device(train.device)
    run.save_model(fitted.best_state, model.config.to_dict())
    popularity = Popularity(split.train, dataset.num_items)
    result = {
        "strategy": strategy,
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
    """Test metrics of the run next to the popularity baseline."""
    rows = {result["strategy"]: result["test"]}
    for name, baseline in result.get("baselines", {}).items():
        rows[name] = baseline["test"]
    return format_table(rows, METRIC_NAMES)
