"""SRA-CL against the centralized baselines, its ablations, and the LLM cost of its semantic side.

``sracl``, ``centralized-sasrec`` and ``centralized-cl4srec`` on ``ml-100k`` and the same
``amazon-beauty`` user subset as the LUMOS table (``--beauty-users``, ``--sample-seed``), for
every seed; SRA-CL's ablations (``--ablation-datasets``). Every run trains with Adam and early
stopping on validation MRR@10, at the SRA-CL code's ``--max-len 20``. Runs are folders
``<out>/<dataset>/<label>/seed<k>``; a finished one is reused when the asked settings would
repeat it, and run again otherwise (see :func:`repeats`). Writes ``report.md`` and
``table_sracl.json``: HR/NDCG mean ± std, SRA-CL's relative gain over the best contrastive
baseline, the median training seconds per epoch, and per dataset the semantic side's LLM
cost (tokens, minutes, users and items per minute). The texts are made once per dataset and
cached, so only the first run pays; the cache records that cost for the runs that follow.

::

    python experiments/table_sracl.py --data-root ../shared/data --out results/table_sracl
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict
from pathlib import Path

from lumosrec.augment.runtime import RuntimeConfig
from lumosrec.augment.semantic import SemanticConfig
from lumosrec.core.data import load_data
from lumosrec.core.results import read_result, write_json
from lumosrec.core.training import TrainConfig
from lumosrec.launch.centralized import run_centralized
from lumosrec.launch.tables import (
    MAIN_METRICS,
    PROTOCOL,
    SAMPLED_FOR_LLM,
    cell,
    gain,
    gain_cell,
    run_folder,
    slug,
    summarize,
)

METHODS = ("centralized-sasrec", "centralized-cl4srec", "sracl")
#: ablation label -> (model hyper-parameters, semantic-side settings) of ``sracl``
ABLATIONS = {
    "sracl w/o user CL": ({"alpha": 0.0}, {}),
    "sracl w/o item CL": ({"beta": 0.0}, {}),
    "sracl hard-rule synthesizer": ({"synthesizer": "top1"}, {}),
    "sracl random retrieval": ({}, {"retrieval": "random"}),
    "sracl raw-text": ({}, {"source": "raw-text"}),  # the paper's "w/o LLM": titles embedded as they are
}


def plan(args: argparse.Namespace) -> list[tuple[str, str, str, dict, dict, int]]:
    """``(dataset, label, method, hyper, semantic settings, seed)`` of every run."""
    runs = [
        (dataset, method, method, {}, {}, seed)
        for dataset in args.datasets
        for method in args.methods
        for seed in args.seeds
    ]
    runs += [
        (dataset, label, "sracl", hyper, semantic, seed)
        for dataset in args.ablation_datasets
        for label, (hyper, semantic) in ABLATIONS.items()
        if slug(label) in args.ablations
        for seed in args.ablation_seeds
    ]
    return runs


def repeats(out: Path, train: TrainConfig) -> bool:
    """Whether the finished run in ``out`` is the run that ``train`` would make.

    The epoch cap is the one setting allowed to differ: nothing in training depends on it, so
    a run that early stopping ended at epoch ``E`` is the same run under any cap of at least
    ``E``. A run that reached its own cap is not, as it might have gone on improving.
    """
    if not (out / "result.json").is_file():
        return False
    done = json.loads((out / "config.json").read_text())["train"]
    epochs_run = read_result(out / "result.json")["epochs"]
    if {**done, "epochs": 0} != {**asdict(train), "epochs": 0}:
        return False
    stopped_early = epochs_run < done["epochs"]
    return train.epochs == done["epochs"] or (stopped_early and epochs_run <= train.epochs)


def train_config(args: argparse.Namespace, seed: int) -> TrainConfig:
    return TrainConfig(epochs=args.epochs, patience=args.patience, max_len=args.max_len, seed=seed)


def execute(args: argparse.Namespace) -> None:
    for dataset, label, method, hyper, semantic, seed in plan(args):
        out = run_folder(args.out, dataset, label, seed)
        train = train_config(args, seed)
        if repeats(out, train):
            continue
        print(f"== {dataset} / {label} / seed {seed}", flush=True)
        data = load_data(
            str(args.data_root / dataset), args.beauty_users if dataset in SAMPLED_FOR_LLM else 0, args.sample_seed
        )
        run_centralized(
            method,
            data,
            out,
            train,
            hyper,
            overwrite=True,
            progress=not args.quiet,
            semantic=SemanticConfig(**semantic),
            runtime=RuntimeConfig(model=args.llm_model),
        )


def report(args: argparse.Namespace) -> Path:
    found: dict[str, dict[str, list[dict]]] = {}
    for dataset, label, _, _, _, seed in plan(args):
        out = run_folder(args.out, dataset, label, seed)
        if repeats(out, train_config(args, seed)):
            found.setdefault(dataset, {}).setdefault(label, []).append(read_result(out / "result.json"))
    payload: dict = {}
    lines = [
        "# SRA-CL: first results",
        "",
        f"Centralized, Adam, early stopping on validation MRR@10 (patience {args.patience}, at most "
        f"{args.epochs} epochs), max length {args.max_len}; test metrics, {PROTOCOL} full ranking, "
        "mean ± std over seeds.",
        "",
        "| dataset | method | seeds | " + " | ".join(MAIN_METRICS) + " | s/epoch |",
        "|---|---|---|" + "---|" * (len(MAIN_METRICS) + 1),
    ]
    for dataset, rows in found.items():
        name = (
            f"{dataset} ({args.beauty_users} users, seed {args.sample_seed})" if dataset in SAMPLED_FOR_LLM else dataset
        )
        for label, results in rows.items():
            summary = summarize([{"result": result} for result in results])
            summary["seconds_per_epoch"] = statistics.median(result["seconds_per_epoch"] for result in results)
            summary["runs"] = [per_seed(result) for result in results]
            payload.setdefault(dataset, {})[label] = summary
            lines.append(
                f"| {name} | {label} | {len(results)} | "
                + " | ".join(cell(summary[m]) for m in MAIN_METRICS)
                + f" | {summary['seconds_per_epoch']:.0f} |"
            )
    lines += [
        "",
        "## Gain of sracl over the best contrastive baseline",
        "",
        "| dataset | baseline | HR@20 gain | NDCG@20 gain |",
        "|---|---|---|---|",
    ]
    gains = {}
    for dataset, rows in payload.items():
        if "sracl" in rows and "centralized-cl4srec" in rows:
            cells = {m: gain(rows["sracl"][m], rows["centralized-cl4srec"][m]) for m in ("HR@20", "NDCG@20")}
            gains[dataset] = cells
            lines.append(
                f"| {dataset} | centralized-cl4srec | " + " | ".join(gain_cell(c) for c in cells.values()) + " |"
            )
    costs = {dataset: _llm_cost(rows) for dataset, rows in found.items() if "sracl" in rows}
    lines += [
        "",
        "## LLM cost of the semantic side (first run; later runs read the cache)",
        "",
        "| dataset | texts | tokens | minutes | users/min | items/min |",
        "|---|---|---|---|---|---|",
    ]
    for dataset, cost in costs.items():
        if not cost["users"] + cost["items"]:
            lines.append(
                f"| {dataset} | no generation recorded in the text cache (texts from an older version) | | | | |"
            )
            continue
        lines.append(
            f"| {dataset} | {cost['users']} users, {cost['items']} items | {cost['tokens']} | "
            f"{cost['minutes']:.1f} | {cost['users_per_minute'] or 0:.1f} | {cost['items_per_minute'] or 0:.1f} |"
        )
    path = args.out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    write_json(
        args.out / "table_sracl.json",
        {
            "main": payload,
            "gains": gains,
            "llm_cost": costs,
            "epochs": args.epochs,
            "patience": args.patience,
            "max_len": args.max_len,
            "seeds": args.seeds,
        },
    )
    print("\n".join(lines))
    return path


def per_seed(result: dict) -> dict:
    """One run's seed, epochs and test metrics: kept in ``table_sracl.json`` so the table can be
    checked, or extended with more seeds, without the run folders."""
    return {
        "seed": result["seed"],
        "epochs": result["epochs"],
        "best_epoch": result["best_epoch"],
        **{metric: result["test"][PROTOCOL][metric] for metric in MAIN_METRICS},
    }


def _llm_cost(rows: dict[str, list[dict]]) -> dict:
    """What making a dataset's cached texts cost, as its ``sracl`` runs read it from the cache."""
    reports = [
        result["semantic"]["generation"]
        for label, results in rows.items()
        if label.startswith("sracl")
        for result in results
        if "generation" in result.get("semantic", {})
    ]
    if not reports:
        return {"users": 0, "items": 0, "tokens": 0, "minutes": 0.0, "users_per_minute": None, "items_per_minute": None}
    fullest = max(reports, key=lambda r: r["user"]["made"] + r["item"]["made"])
    user, item = fullest["user"], fullest["item"]
    return {
        "users": user["made"],
        "items": item["made"],
        "tokens": user["completion_tokens"] + item["completion_tokens"],
        "minutes": user["minutes"] + item["minutes"],
        "users_per_minute": user["per_minute"],
        "items_per_minute": item["per_minute"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("results/table_sracl"))
    parser.add_argument("--datasets", nargs="*", default=["ml-100k", "amazon-beauty"])
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="*", type=int, default=[1, 2, 3])
    parser.add_argument("--ablation-datasets", nargs="*", default=["amazon-beauty"])
    parser.add_argument(
        "--ablations",
        nargs="*",
        default=[slug(label) for label in ABLATIONS],
        choices=[slug(label) for label in ABLATIONS],
        metavar="ROW",
        help="ablation rows by folder name, e.g. sracl-raw-text (default: all)",
    )
    parser.add_argument("--ablation-seeds", nargs="*", type=int, default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=100, help="the SRA-CL code's epochs")
    parser.add_argument("--patience", type=int, default=10, help="the SRA-CL code's stopping_step")
    parser.add_argument("--max-len", type=int, default=20, help="the SRA-CL code's maxlen")
    parser.add_argument("--beauty-users", type=int, default=1000, help="the LUMOS table's Beauty subset")
    parser.add_argument("--sample-seed", type=int, default=0)
    parser.add_argument("--llm-model", default=RuntimeConfig.model)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        execute(args)
    print(f"\nwritten: {report(args)}")


if __name__ == "__main__":
    main()
