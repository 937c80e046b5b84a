"""LUMOS's first results: main table, ablation table, learning curves, round-time ratio.

Runs every method (``lumosrec.launch.experiment.METHODS``) on every dataset for several seeds under
one :class:`lumosrec.launch.experiment.Budget`, then writes ``report.md`` (tables and plots),
``table_main.json`` and one PNG of test HR@20 per round per dataset into ``--out``. Runs are
folders ``<out>/<dataset>/<method>/seed<k>``; finished ones are reused and interrupted
federations resume, so the command can be stopped and started again.

* ``ml-100k``: all users; ``amazon-beauty``: a fixed random subset of ``--beauty-users``
  users (LLM time on CPU), the same for every method;
* ``amazon-baby`` / ``amazon-cellphones``: no item text, so LUMOS's views are retrieval views
  over the received global item embeddings (their rows say so), on ``--id-only-users`` users;
* ablations (``--ablation-datasets``): LUMOS without each view, and with retrieval-only views.

::

    python experiments/table_main.py --data-root ../shared/data --out results/table_main
    python experiments/table_main.py --report-only          # tables and plots from finished runs
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from lumosrec.client.objectives import FEDERATED_METHODS
from lumosrec.core.results import read_result, write_json
from lumosrec.core.runconfig import parse_run_config
from lumosrec.launch.experiment import METHODS, Budget, run_method
from lumosrec.launch.tables import MAIN_METRICS, PROTOCOL, SAMPLED_FOR_LLM, cell, gain, run_folder, summarize

#: the main table's methods (issue 5); centralized-cl4srec and sracl are the SRA-CL table's
MAIN_METHODS = ("centralized-sasrec", "local-sasrec", "fedavg-sasrec", "fed-cl4srec", "lumos")
#: 20 rounds (6 epochs' worth of data passes) is what 2 CPU cores allow for 3 seeds of every method
DEFAULT_BUDGET = Budget(rounds=20)
#: folders under --data-root; Beauty is sampled for LLM time, the ID-only ones (no item text) for CPU time
DATASETS = ("ml-100k", "amazon-beauty", "amazon-baby", "amazon-cellphones")
ID_ONLY = ("amazon-baby", "amazon-cellphones")
#: ablation label -> run-config overrides of ``lumos``
ABLATIONS = {
    "lumos w/o future": {"lumos-lambda-future": 0.0},
    "lumos w/o paraphrase": {"lumos-lambda-paraphrase": 0.0},
    "lumos w/o counterfactual": {"lumos-counterfactual": False},
    "lumos retrieval-only views": {"views": "retrieval"},
}
GAIN_METRICS = ("HR@20", "NDCG@20")


def sample_of(dataset: str, args: argparse.Namespace) -> int:
    if dataset in SAMPLED_FOR_LLM:
        return args.beauty_users
    return args.id_only_users if dataset in ID_ONLY else 0


def plan(args: argparse.Namespace) -> list[tuple[str, str, str, dict, int]]:
    """``(dataset, label, method, run-config overrides, seed)`` of every run, main table first."""
    runs = []
    for dataset in args.datasets:
        for method in args.methods:
            runs.extend((dataset, method, method, {}, seed) for seed in args.seeds)
    for dataset in args.ablation_datasets:
        for label, overrides in ABLATIONS.items():
            runs.extend((dataset, label, "lumos", overrides, seed) for seed in args.ablation_seeds)
    return runs


def execute(args: argparse.Namespace, budget: Budget) -> None:
    for dataset, label, method, overrides, seed in plan(args):
        views_dir = args.views_root / dataset if args.views_root else ""
        config = {
            **parse_run_config(args.run_config),
            "sample-users": sample_of(dataset, args),
            "sample-seed": args.sample_seed,
            "views-dir": str(views_dir),
            **overrides,
        }
        print(f"== {dataset} / {label} / seed {seed}", flush=True)
        run_method(
            method,
            str(args.data_root / dataset),
            run_folder(args.out, dataset, label, seed),
            seed,
            budget,
            config,
            args.engine,
            progress=not args.quiet,
        )


def load_runs(args: argparse.Namespace) -> dict[str, dict[str, list[dict]]]:
    """``{dataset: {label: [run, ...]}}`` of finished runs, each with its result and metrics."""
    found: dict[str, dict[str, list[dict]]] = {}
    for dataset, label, _, _, seed in plan(args):
        folder = run_folder(args.out, dataset, label, seed)
        if (folder / "result.json").is_file():
            found.setdefault(dataset, {}).setdefault(label, []).append(
                {
                    "seed": seed,
                    "result": read_result(folder / "result.json"),
                    "metrics": json.loads((folder / "metrics.json").read_text()),
                }
            )
    return found


def views_label(runs: list[dict]) -> str:
    sources = {run["result"].get("views") for run in runs} - {None}
    return ", ".join(sorted(sources))


def main_table(found: dict, datasets: list[str], labels: list[str], args: argparse.Namespace) -> tuple[str, dict]:
    lines = [
        "| dataset | method | seeds | " + " | ".join(MAIN_METRICS) + " | views |",
        "|---|---|---|" + "---|" * len(MAIN_METRICS) + "---|",
    ]
    payload: dict = {}
    for dataset in datasets:
        users = sample_of(dataset, args)
        name = dataset if not users else f"{dataset} ({users} users, seed {args.sample_seed})"
        for label in labels:
            runs = found.get(dataset, {}).get(label)
            if not runs:
                continue
            summary = summarize(runs)
            payload.setdefault(dataset, {})[label] = {"summary": summary, "views": views_label(runs)}
            lines.append(
                f"| {name} | {label} | {len(runs)} | "
                + " | ".join(cell(summary[m]) for m in MAIN_METRICS)
                + f" | {views_label(runs) or '-'} |"
            )
    return "\n".join(lines), payload


def gains_table(payload: dict) -> tuple[str, dict]:
    lines = [
        "| dataset | lumos vs | " + " | ".join(f"{m} gain" for m in GAIN_METRICS) + " |",
        "|---|---|" + "---|" * len(GAIN_METRICS),
    ]
    gains: dict = {}
    for dataset, rows in payload.items():
        if "lumos" not in rows:
            continue
        for label, row in rows.items():
            if label == "lumos":
                continue
            cells = {m: gain(rows["lumos"]["summary"][m], row["summary"][m]) for m in GAIN_METRICS}
            gains.setdefault(dataset, {})[label] = cells
            lines.append(
                f"| {dataset} | {label} | "
                + " | ".join(
                    f"{c['relative']:+.1%}{'' if c['beyond_noise'] else ' (within noise)'}" for c in cells.values()
                )
                + " |"
            )
    return "\n".join(lines), gains


def round_times(found: dict) -> dict[str, dict[str, float]]:
    """Median training seconds per round of ``lumos`` and ``fedavg-sasrec``, and their ratio."""
    times = {}
    for dataset, rows in found.items():
        medians = {
            label: statistics.median(r["train_seconds"] for run in rows[label] for r in run["metrics"])
            for label in ("lumos", "fedavg-sasrec")
            if label in rows
        }
        if len(medians) == 2:
            times[dataset] = {**medians, "ratio": medians["lumos"] / medians["fedavg-sasrec"]}
    return times


def plot_curves(found: dict, out: Path) -> list[Path]:
    """One PNG per dataset: mean test HR@20 per round of each federated run; centralized and
    local-only runs as horizontal lines at their final test HR@20."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for dataset, rows in found.items():
        figure, axis = plt.subplots(figsize=(7, 4.5))
        for index, (label, runs) in enumerate(rows.items()):
            color = f"C{index % 10}"
            curves = [
                [(r["round"], r["test"][PROTOCOL]["HR@20"]) for r in run["metrics"] if "test" in r and "round" in r]
                for run in runs
            ]
            if label in FEDERATED_METHODS or label.startswith("lumos"):
                rounds = sorted({point[0] for curve in curves for point in curve})
                means = [statistics.fmean(v for curve in curves for rnd, v in curve if rnd == r) for r in rounds]
                axis.plot(rounds, means, marker="o", markersize=3, label=label, color=color)
            else:
                value = statistics.fmean(run["result"]["test"][PROTOCOL]["HR@20"] for run in runs)
                axis.axhline(value, linestyle="--", linewidth=1, label=f"{label} (final)", color=color)
        axis.set(xlabel="round", ylabel=f"test HR@20 ({PROTOCOL})", title=dataset)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        path = out / f"curve_{dataset}.png"
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        plt.close(figure)
        paths.append(path)
    return paths


def report(args: argparse.Namespace, budget: Budget) -> Path:
    found = load_runs(args)
    main, payload = main_table(found, args.datasets, args.methods, args)
    gains_text, gains = gains_table(payload)
    ablation, ablation_payload = main_table(found, args.ablation_datasets, ["lumos", *ABLATIONS], args)
    times = round_times(found)
    plots = plot_curves(found, args.out)
    lines = [
        "# LUMOS: first results",
        "",
        f"Budget: {budget.rounds} rounds, {budget.fraction_train:.0%} of the clients per round, "
        f"{budget.local_epochs} local epochs (centralized and local-only: {budget.epochs} epochs); "
        f"test metrics, {PROTOCOL} full ranking, mean ± std over seeds.",
        "",
        "## Main table",
        "",
        main,
        "",
        "## Relative gain of lumos",
        "",
        "'within noise': the difference of the means is less than twice its standard error.",
        "",
        gains_text,
        "",
        "## Ablation",
        "",
        ablation,
        "",
        "## Round time (training, median seconds per round)",
        "",
        "| dataset | lumos | fedavg-sasrec | ratio |",
        "|---|---|---|---|",
        *[f"| {d} | {t['lumos']:.1f} | {t['fedavg-sasrec']:.1f} | {t['ratio']:.2f} |" for d, t in times.items()],
        "",
        "## Learning curves",
        "",
        *[f"![{p.stem}]({p.name})" for p in plots],
        "",
    ]
    path = args.out / "report.md"
    path.write_text("\n".join(lines))
    write_json(
        args.out / "table_main.json",
        {
            "budget": {
                "rounds": budget.rounds,
                "fraction_train": budget.fraction_train,
                "local_epochs": budget.local_epochs,
                "epochs": budget.epochs,
            },
            "seeds": args.seeds,
            "main": payload,
            "gains": gains,
            "ablation": ablation_payload,
            "round_times": times,
        },
    )
    print("\n".join(lines[: -len(plots) - 1]))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("results/table_main"))
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS), help="folders under --data-root")
    parser.add_argument("--methods", nargs="*", default=list(MAIN_METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[1, 2, 3])
    parser.add_argument("--ablation-datasets", nargs="*", default=["amazon-beauty"])
    parser.add_argument("--ablation-seeds", nargs="*", type=int, default=[1, 2, 3])
    parser.add_argument("--rounds", type=int, default=DEFAULT_BUDGET.rounds)
    parser.add_argument("--fraction-train", type=float, default=DEFAULT_BUDGET.fraction_train)
    parser.add_argument("--local-epochs", type=int, default=DEFAULT_BUDGET.local_epochs)
    parser.add_argument("--beauty-users", type=int, default=1000, help="fixed random subset of amazon-beauty")
    parser.add_argument("--id-only-users", type=int, default=1000, help="subset of amazon-baby / amazon-cellphones")
    parser.add_argument("--sample-seed", type=int, default=0, help="seed of the user subsets")
    parser.add_argument(
        "--views-root", type=Path, help="view caches as <root>/<dataset> (default: ~/.cache/lumos/views)"
    )
    parser.add_argument("--run-config", default="", help="run-config overrides of every run (TOML-typed)")
    parser.add_argument("--engine", default="inprocess", choices=("inprocess", "flower"))
    parser.add_argument("--report-only", action="store_true", help="only write the report from finished runs")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.rounds, args.fraction_train, args.local_epochs)
    if not args.report_only:
        execute(args, budget)
    print(f"\nwritten: {report(args, budget)}")


if __name__ == "__main__":
    main()
