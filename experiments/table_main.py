"""LUMOS's results table: main rows, ablations, the LLM's own share, learning curves, round times.

Every row is one method with run-config overrides (:data:`ROWS`, :data:`ABLATIONS`), run on
all users of each dataset for several seeds under one :class:`lumosrec.launch.experiment.Budget`
(the literature's, 67 rounds x 10 % x 3 local epochs: about 20 local visits per user). The
command writes ``report.md`` (tables, plots, which rows are complete), ``table_main.json`` and one
PNG of test HR@20 per round per dataset into ``--out``. Runs are folders
``<out>/<dataset>/<row>/seed<k>``; finished ones are reused and interrupted ones resume, so the
table is completed over as many invocations as it takes (``--rows`` picks rows). Run folders are
not kept with the code (they are large and hold data): ``--earlier table_main.json`` takes the rows
that have no run folder here from an earlier report's JSON (summaries, round times, the LLM-subset
scores; marked "earlier"), so a table outlives the machine that ran it; a row run here replaces its
earlier summary whole.

* Views (:data:`LUMOS_SETTINGS`): per dataset the view source and future-target horizon that
  issue 17's validation sweep and view-quality report rank first; ``amazon-baby`` and
  ``amazon-cellphones`` have no item text, so their views come from the received model.
* The LLM (rows ``*-llm-*``): views by LLM ranking of catalog candidates; on the datasets of
  :data:`LLM_SUBSET` for a fixed random subset of ``--llm-users`` users (``--llm-seed``) and text
  retrieval for everyone else. Every run's saved model is then also scored on that subset alone,
  so the LLM's own contribution shows against the same row with retrieval for everyone. The
  ``*-llm-all-*`` rows give every user LLM views: make them ahead where a GPU is (``lumos views
  generate --views llm-rank --device cuda``, ~5,000 users/min on an H200) and copy the cache to
  the nodes, since on this CPU the LLM makes ~11 users/min.

::

    python experiments/table_main.py --data-root ../shared/data --out results/table_main
    python experiments/table_main.py --report-only          # tables and plots from finished runs
    python experiments/table_main.py --earlier docs/results/table_main/table_main.json ...
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Mapping
from pathlib import Path

from lumosrec.augment.views import LLM_MODES
from lumosrec.client.objectives import FEDERATED_METHODS
from lumosrec.core.data import load_data
from lumosrec.core.dataset import sample_users
from lumosrec.core.errors import LumosError
from lumosrec.core.results import write_json
from lumosrec.core.runconfig import parse_run_config
from lumosrec.launch.experiment import Budget, finished_result, run_method
from lumosrec.launch.tables import (
    MAIN_METRICS,
    PROTOCOL,
    cell,
    gain,
    gain_cell,
    paired_gain,
    pooled,
    read_earlier_report,
    run_folder,
    saved_model_metrics,
    slug,
    summary_of,
)

#: the literature's budget (``../shared/research/fedseqrec_anchors.md``): ~20 local visits per user
DEFAULT_BUDGET = Budget(rounds=67)
DATASETS = ("ml-100k", "amazon-beauty", "amazon-baby", "amazon-cellphones")
ID_ONLY = ("amazon-baby", "amazon-cellphones")
#: seeds per dataset (the first of ``--seeds``); datasets not named run every seed
SEED_COUNTS = {"amazon-beauty": 2, "amazon-baby": 1, "amazon-cellphones": 1}
#: rows with one seed whatever the dataset (a model per user: the floor, not the contest)
ONE_SEED_ROWS = ("local-sasrec",)
#: rows beyond the issue's list on a dataset, explored with one seed: on ml-100k the text table
#: hurts (``fedavg-sasrec-text-init`` below ``fedavg-sasrec``), so what is stacked on it, and the
#: LLM's views over it, are side questions there; on Beauty a random table does not learn
#: (``fedavg-sasrec``, ``lumos``), so LLM views over it are one too
ONE_SEED_ROWS_ON: dict[str, tuple[str, ...]] = {
    "ml-100k": ("fedadam-sasrec-text-init", "lumos-fedadam-text-init", "lumos-llm-all-text-init"),
    "amazon-beauty": ("lumos-llm",),
}
#: settings of every run on a dataset: users per simulated node (cohorts), evaluation cadence
DATASET_SETTINGS: dict[str, dict[str, object]] = {
    "ml-100k": {"cohort-size": 128, "eval-every": 5},
    "amazon-beauty": {"cohort-size": 1400, "eval-every": 5},
    "amazon-baby": {"cohort-size": 1400, "eval-every": 5},
    "amazon-cellphones": {"cohort-size": 1400, "eval-every": 5},
}
#: the table compares methods as published, without the client-side defences (their cost is
#: measured by experiments/bench_privacy.py), whatever the run config's defaults
NO_DEFENCES = {"item-row-noise": 0.0, "hide-history-length": False}
#: LUMOS's view source and future-target horizon per dataset (issue 17: text neighbours on every
#: prefix of Beauty's short histories; the received model's neighbours on the last 5 prefixes of
#: ml-100k's long ones, where text knows less than popularity); other datasets: the defaults
LUMOS_SETTINGS: dict[str, dict[str, object]] = {
    "ml-100k": {"views": "model"},
    "amazon-beauty": {"views": "retrieval", "lumos-future-horizon": 0},
    "amazon-baby": {"views": "model", "lumos-future-horizon": 0},
    "amazon-cellphones": {"views": "model", "lumos-future-horizon": 0},
}
#: the item table initialised from the catalog's text by the server; SGD at 0.1, not 0.5: the
#: larger step erodes the text table (Beauty validation, docs/results/table_main)
TEXT_INIT = {"item-init": "text", "learning-rate": 0.1}
#: LUMOS over a text-initialised table: future targets on the last 5 prefixes only; on every
#: prefix (Beauty's choice from a random table) they pull the model to a fixed text heuristic and
#: validation falls after round 45 (docs/results/table_main/tuning.md)
LUMOS_TEXT_INIT = {"lumos-future-horizon": 5}
#: FedAdam's server step per table (Flower's tau 1e-3): 0.02 tuned on ml-100k (issue 16), 0.01 over a
#: text-initialised table (Beauty validation; a larger step erodes it, docs/results/table_main)
FEDADAM = {"strategy": "fedadam", "server-learning-rate": 0.02}
FEDADAM_TEXT_INIT = {**TEXT_INIT, "strategy": "fedadam", "server-learning-rate": 0.01}
#: the LLM source of the ``*-llm-*`` rows, and the datasets where it writes for a subset only
LLM_VIEWS = {"views": "llm-rank"}
#: every user's views from the LLM, also on the datasets of :data:`LLM_SUBSET`
LLM_VIEWS_ALL = {**LLM_VIEWS, "views-llm-users": 0}
LLM_SUBSET = ("amazon-beauty",)

#: row label -> (method, run-config overrides); ``lumos`` rows add :data:`LUMOS_SETTINGS` first
ROWS: dict[str, tuple[str, dict[str, object]]] = {
    "centralized-sasrec": ("centralized-sasrec", {}),
    "local-sasrec": ("local-sasrec", {}),
    "fedavg-sasrec": ("fedavg-sasrec", {}),
    "fedadam-sasrec": ("fedavg-sasrec", FEDADAM),
    "fedavg-sasrec-text-init": ("fedavg-sasrec", TEXT_INIT),
    "fedadam-sasrec-text-init": ("fedavg-sasrec", FEDADAM_TEXT_INIT),
    "fed-cl4srec": ("fed-cl4srec", {}),
    "lumos": ("lumos", {}),
    "lumos-text-init": ("lumos", {**TEXT_INIT, **LUMOS_TEXT_INIT}),
    "lumos-fedadam-text-init": ("lumos", {**FEDADAM_TEXT_INIT, **LUMOS_TEXT_INIT}),
    "lumos-llm": ("lumos", LLM_VIEWS),
    "lumos-llm-fedadam": ("lumos", {**FEDADAM, **LLM_VIEWS}),
    "lumos-llm-text-init": ("lumos", {**TEXT_INIT, **LUMOS_TEXT_INIT, **LLM_VIEWS}),
    "lumos-llm-all-text-init": ("lumos", {**TEXT_INIT, **LUMOS_TEXT_INIT, **LLM_VIEWS_ALL}),
}
#: the rows run on datasets without item text (no text init, no LLM)
ID_ONLY_ROWS = ("fedavg-sasrec", "lumos")
#: rows run on the named datasets only: LUMOS under FedAdam over the table FedAdam learns best, a
#: random one on ml-100k (on Beauty that is the text-initialised one, ``lumos-fedadam-text-init``)
ROWS_ONLY_ON = {"lumos-llm-fedadam": ("ml-100k",)}
#: rows whose LLM writes for a subset of users on :data:`LLM_SUBSET` only
SUBSET_ROWS = ("lumos-llm-text-init",)
#: baselines each LUMOS row is compared against
BASELINES = (
    "centralized-sasrec",
    "local-sasrec",
    "fedavg-sasrec",
    "fedadam-sasrec",
    "fedavg-sasrec-text-init",
    "fedadam-sasrec-text-init",
    "fed-cl4srec",
)
#: the LUMOS row whose views the ablations take apart, per dataset: the LLM's views on ml-100k,
#: where every user has them and the text table hurts (docs/results/table_main); elsewhere the
#: views over the text-initialised table (Beauty's LLM views for every user need a GPU)
ABLATION_BASES = {"ml-100k": "lumos-llm"}
DEFAULT_ABLATION_BASE = "lumos-text-init"
#: every view's term on: the item-level ones (future targets, counterfactual unlikelihood) and
#: the sequence-level InfoNCE (future and paraphrase views, counterfactual in the denominators)
ALL_TERMS = {
    "lumos-future-targets": 1.0,
    "lumos-counterfactual-negatives": 1.0,
    "lumos-lambda-future": 0.02,
    "lumos-lambda-paraphrase": 0.02,
    "lumos-counterfactual": True,
}
#: ablation label -> overrides of :data:`ALL_TERMS` on top of the dataset's :func:`ablation_base`
ABLATIONS: dict[str, dict[str, object]] = {
    "all views, both levels": {},
    "w/o future": {"lumos-future-targets": 0.0, "lumos-lambda-future": 0.0},
    "w/o paraphrase": {"lumos-lambda-paraphrase": 0.0},
    "w/o counterfactual": {"lumos-counterfactual": False, "lumos-counterfactual-negatives": 0.0},
    "sequence-level only": {"lumos-future-targets": 0.0, "lumos-counterfactual-negatives": 0.0},
    "item-level only": {"lumos-lambda-future": 0.0, "lumos-lambda-paraphrase": 0.0},
}
GAIN_METRICS = ("HR@20", "NDCG@20")


def ablation_base(dataset: str) -> str:
    return ABLATION_BASES.get(dataset, DEFAULT_ABLATION_BASE)


def federated(row: str) -> bool:
    return row not in ROWS or ROWS[row][0] in FEDERATED_METHODS


def rows_of(dataset: str, asked: list[str]) -> list[str]:
    """The asked rows that mean something on ``dataset``: catalogs without text have no text or LLM
    rows, outside :data:`LLM_SUBSET` a subset row would repeat its ``*-llm-all-*`` twin, and a row of
    :data:`ROWS_ONLY_ON` runs where it names."""
    return [
        row
        for row in asked
        if (dataset not in ID_ONLY or row in ID_ONLY_ROWS)
        and (dataset in LLM_SUBSET or row not in SUBSET_ROWS)
        and dataset in ROWS_ONLY_ON.get(row, (dataset,))
    ]


def seeds_of(dataset: str, row: str, args: argparse.Namespace) -> list[int]:
    one_seed = row in ONE_SEED_ROWS or row in ONE_SEED_ROWS_ON.get(dataset, ())
    count = 1 if one_seed else SEED_COUNTS.get(dataset, len(args.seeds))
    return args.seeds[:count]


def overrides_of(dataset: str, row: str, args: argparse.Namespace) -> tuple[str, dict[str, object]]:
    """The method and run config of ``row`` on ``dataset`` (beyond the budget and the seed)."""
    if row in ROWS:
        method, overrides = ROWS[row]
    else:  # an ablation
        method, base = ROWS[ablation_base(dataset)]
        overrides = {**base, **ALL_TERMS, **ABLATIONS[row]}
    config = {**NO_DEFENCES, **DATASET_SETTINGS.get(dataset, {}), **parse_run_config(args.run_config)}
    if method == "lumos":
        config.update(LUMOS_SETTINGS.get(dataset, {}))
    # a row may pin its LLM users (``*-llm-all-*``); the others take ``--llm-users``
    if overrides.get("views", config.get("views")) in LLM_MODES and dataset in LLM_SUBSET:
        config.update({"views-llm-users": args.llm_users, "views-llm-seed": args.llm_seed})
    config.update(overrides)
    if args.views_root:
        config["views-dir"] = str(args.views_root / dataset)
    return method, config


def plan(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """``(dataset, row, seed)`` of every run: main rows first, seed by seed, then the ablations."""
    runs = []
    for dataset in args.datasets:
        rows = rows_of(dataset, args.rows)
        for seed in args.seeds:
            runs.extend((dataset, row, seed) for row in rows if seed in seeds_of(dataset, row, args))
    for dataset in args.ablation_datasets:
        runs.extend((dataset, row, seed) for row in args.ablations for seed in args.ablation_seeds)
    return runs


def execute(args: argparse.Namespace, budget: Budget) -> None:
    for dataset, row, seed in plan(args):
        method, config = overrides_of(dataset, row, args)
        print(f"== {dataset} / {row} / seed {seed}", flush=True)
        run_method(
            method,
            str(args.data_root / dataset),
            run_folder(args.out, dataset, row, seed),
            seed,
            budget,
            config,
            args.engine,
            progress=not args.quiet,
        )


def load_runs(args: argparse.Namespace) -> dict[str, dict[str, list[dict]]]:
    """``{dataset: {row: [run, ...]}}`` of finished runs, each with its result and metrics."""
    found: dict[str, dict[str, list[dict]]] = {}
    for dataset, row, seed in plan(args):
        folder = run_folder(args.out, dataset, row, seed)
        result = finished_result(folder)
        if result is not None:
            found.setdefault(dataset, {}).setdefault(row, []).append(
                {
                    "seed": seed,
                    "folder": folder,
                    "result": result,
                    "metrics": json.loads((folder / "metrics.json").read_text()),
                }
            )
    return found


def views_label(runs: list[dict]) -> str:
    sources = {run["result"].get("views") for run in runs} - {None}
    return ", ".join(sorted(sources))


def table(
    found: dict,
    datasets: list[str],
    rows_for: Callable[[str], list[str]],
    args: argparse.Namespace,
    last: bool = True,
    earlier: Mapping | None = None,
) -> tuple[str, dict]:
    """Mean ± std over seeds of each row with finished runs, and how many seeds of how many asked;
    with ``last``, also the federated rows' test HR@20 after the last round (model selection by
    validation MRR@10 can pick an early round where HR@20 still rises). Rows without runs here
    come from ``earlier`` (this table's payload in an earlier report) when it has them."""
    extra = ["HR@20 last round"] if last else []
    lines = [
        "| dataset | row | seeds | " + " | ".join([*MAIN_METRICS, *extra]) + " | views |",
        "|---|---|---|" + "---|" * (len(MAIN_METRICS) + len(extra)) + "---|",
    ]
    payload: dict = {}
    for dataset in datasets:
        for row in rows_for(dataset):
            runs = found.get(dataset, {}).get(row)
            asked = len(seeds_of(dataset, row, args)) if row in ROWS else len(args.ablation_seeds)
            previous = (earlier or {}).get(dataset, {}).get(row)
            if not runs:
                if previous:
                    payload.setdefault(dataset, {})[row] = {**previous, "earlier": True}
                    lines.append(_earlier_line(dataset, row, previous, asked, last))
                continue
            here = {str(run["seed"]): {m: run["result"]["test"][PROTOCOL][m] for m in MAIN_METRICS} for run in runs}
            kept = earlier_seeds_kept(previous, here) if previous else {}
            # without the earlier seeds' own values: seeds run here add to an earlier summary of
            # other seeds, and a seed run again replaces it whole
            added = kept is None and not set(previous["seeds"]) & {run["seed"] for run in runs}
            if kept is not None:
                values = {**kept, **here}
                summary = summary_of(list(values.values()))
            else:
                values = here
                summary = summary_of(list(here.values()))
                summary = pooled(previous["summary"], summary) if added else summary
            earlier_seeds = [int(seed) for seed in kept] if kept else previous["seeds"] if added else []
            seeds = [*earlier_seeds, *(run["seed"] for run in runs)]
            payload.setdefault(dataset, {})[row] = {
                "summary": summary,
                "per_seed": values,
                "views": views_label(runs),
                "seeds": seeds,
                "complete": len(seeds) >= asked,
            }
            if earlier_seeds:
                payload[dataset][row]["earlier_seeds"] = earlier_seeds
            cells = [cell(summary[m]) for m in MAIN_METRICS]
            if last:
                finals = {
                    str(run["seed"]): run["result"]["final_test"][PROTOCOL]["HR@20"]
                    for run in runs
                    if run["result"].get("final_test")
                }
                total, n = sum(finals.values()), len(finals)
                # the earlier seeds kept: the earlier mean's total less the seeds run again here
                earlier_final = previous.get("last_round_hr20") if earlier_seeds else None
                if earlier_final:
                    again = [finals[seed] for seed in map(str, previous["seeds"]) if seed in finals]
                    total += earlier_final["mean"] * earlier_final["n"] - sum(again)
                    n += earlier_final["n"] - len(again)
                final = {"mean": total / n, "n": n} if n else None
                if final:
                    payload[dataset][row]["last_round_hr20"] = final
                cells.append(f"{final['mean']:.4f}" if final else "-")
            done = f"{len(seeds)}/{asked}" + (f" ({len(earlier_seeds)} earlier)" if earlier_seeds else "")
            lines.append(f"| {dataset} | {row} | {done} | " + " | ".join(cells) + f" | {views_label(runs) or '-'} |")
    return "\n".join(lines), payload


def earlier_seeds_kept(previous: Mapping, here: Mapping[str, dict[str, float]]) -> dict[str, dict[str, float]] | None:
    """``{seed: {metric: value}}`` of the seeds of an earlier row that were not run here, or
    ``None`` where they cannot be told apart. Runs are deterministic per seed on CPU, so a seed run
    again here has the value it had in the earlier summary: with one earlier seed left, its values
    are the earlier total less those of the seeds run again."""
    known = per_seed(previous)
    others = [str(seed) for seed in previous["seeds"] if str(seed) not in here]
    if all(seed in known for seed in others):
        return {seed: known[seed] for seed in others}
    if len(others) == 1 and len(previous["seeds"]) == previous["summary"][MAIN_METRICS[0]]["n"]:
        again = [here[str(seed)] for seed in previous["seeds"] if str(seed) in here]
        return {
            others[0]: {
                m: previous["summary"][m]["n"] * previous["summary"][m]["mean"] - sum(v[m] for v in again)
                for m in MAIN_METRICS
            }
        }
    return None


def per_seed(entry: Mapping) -> dict[str, dict[str, float]]:
    """``{seed: {metric: test value}}`` of a table row, as far as it is known: a row from an earlier
    report without per-seed values has them only when it holds one seed (its mean)."""
    if "per_seed" in entry:
        return dict(entry["per_seed"])
    if len(entry["seeds"]) == 1:
        return {str(entry["seeds"][0]): {m: entry["summary"][m]["mean"] for m in MAIN_METRICS}}
    return {}


def _earlier_line(dataset: str, row: str, previous: Mapping, asked: int, last: bool) -> str:
    cells = [cell(previous["summary"][m]) for m in MAIN_METRICS]
    if last:
        final = previous.get("last_round_hr20")
        cells.append(f"{final['mean']:.4f}" if final else "-")
    seeds = f"{len(previous['seeds'])}/{asked} (earlier)"
    return f"| {dataset} | {row} | {seeds} | " + " | ".join(cells) + f" | {previous.get('views') or '-'} |"


def gains_table(payload: dict) -> tuple[str, dict]:
    """Each LUMOS row against each baseline row of its dataset."""
    lines = [
        "| dataset | row | vs | " + " | ".join(f"{m} gain" for m in GAIN_METRICS) + " |",
        "|---|---|---|" + "---|" * len(GAIN_METRICS),
    ]
    gains: dict = {}
    for dataset, rows in payload.items():
        for row in (r for r in rows if r.startswith("lumos")):
            for baseline in (b for b in (*BASELINES, *(r for r in rows if r.startswith("lumos"))) if b in rows):
                if baseline == row:
                    continue
                cells = {}
                for metric in GAIN_METRICS:
                    cells[metric] = gain(rows[row]["summary"][metric], rows[baseline]["summary"][metric])
                    paired = paired_gain(
                        {seed: values[metric] for seed, values in per_seed(rows[row]).items()},
                        {seed: values[metric] for seed, values in per_seed(rows[baseline]).items()},
                    )
                    if paired:
                        cells[metric]["paired"] = paired
                gains.setdefault(dataset, {}).setdefault(row, {})[baseline] = cells
                lines.append(
                    f"| {dataset} | {row} | {baseline} | " + " | ".join(gain_cell(c) for c in cells.values()) + " |"
                )
    return "\n".join(lines), gains


def round_times(found: dict, earlier: Mapping | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Median training seconds per round of each federated row, and its ratio to ``fedavg-sasrec``;
    rows without runs here keep their ``earlier`` seconds."""
    times: dict = {}
    for dataset in dict.fromkeys([*found, *(earlier or {})]):
        rows = found.get(dataset, {})
        medians = {row: entry["seconds"] for row, entry in (earlier or {}).get(dataset, {}).items() if row not in rows}
        medians.update(
            {
                row: statistics.median(r["train_seconds"] for run in runs for r in run["metrics"])
                for row, runs in rows.items()
                if federated(row)
            }
        )
        base = medians.get("fedavg-sasrec")
        for row, seconds in medians.items():
            times.setdefault(dataset, {})[row] = {"seconds": seconds, "ratio": seconds / base if base else None}
    return times


def subset_summaries(found: dict, args: argparse.Namespace) -> dict[str, dict[str, dict]]:
    """Per dataset of :data:`LLM_SUBSET`: each row's test metrics on the LLM's users alone,
    scored from every run's saved model (rows without one, local-only models, are left out)."""
    out: dict = {}
    for dataset in (d for d in found if d in LLM_SUBSET):
        data = load_data(str(args.data_root / dataset))
        users = sample_users(data.num_users, args.llm_users, args.llm_seed)
        for row in rows_of(dataset, args.rows):
            scored = []
            runs = found[dataset].get(row, [])
            for run in runs:
                model = run["folder"] / "model.pt"
                if row in ONE_SEED_ROWS or not model.is_file():
                    continue
                scored.append({**run, "result": {**run["result"], "test": saved_model_metrics(model, data, users)}})
            if scored:
                out.setdefault(dataset, {})[row] = scored
    return out


def plot_curves(found: dict, out: Path) -> list[Path]:
    """One PNG per dataset: mean test HR@20 per round of each federated row; centralized and
    local-only runs as horizontal lines at their final test HR@20."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for dataset, rows in found.items():
        figure, axis = plt.subplots(figsize=(8, 5))
        for index, (row, runs) in enumerate(rows.items()):
            color = f"C{index % 10}"
            curves = [
                [(r["round"], r["test"][PROTOCOL]["HR@20"]) for r in run["metrics"] if "test" in r and "round" in r]
                for run in runs
            ]
            if federated(row):
                rounds = sorted({point[0] for curve in curves for point in curve})
                means = [statistics.fmean(v for curve in curves for rnd, v in curve if rnd == r) for r in rounds]
                axis.plot(rounds, means, marker="o", markersize=3, label=row, color=color)
            else:
                value = statistics.fmean(run["result"]["test"][PROTOCOL]["HR@20"] for run in runs)
                axis.axhline(value, linestyle="--", linewidth=1, label=f"{row} (final)", color=color)
        axis.set(xlabel="round", ylabel=f"test HR@20 ({PROTOCOL})", title=f"{dataset} (mean over seeds)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
        path = out / f"curve_{dataset}.png"
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        plt.close(figure)
        paths.append(path)
    return paths


def missing_runs(args: argparse.Namespace, payloads: Mapping[str, Mapping]) -> list[str]:
    """Planned runs without a row (with that seed) in ``payloads``, which hold every run finished
    here (:func:`load_runs`) and every earlier one."""

    def reported(dataset: str, row: str, seed: int) -> bool:
        return any(seed in table.get(dataset, {}).get(row, {}).get("seeds", ()) for table in payloads.values())

    return [f"{dataset} / {row} / seed {seed}" for dataset, row, seed in plan(args) if not reported(dataset, row, seed)]


def read_earlier(path: Path | None) -> dict:
    """The payloads of an earlier ``table_main.json`` (empty without ``--earlier``)."""
    if path is None:
        return {}
    earlier = read_earlier_report(path, dict, "table_main.json")
    if "main" not in earlier:
        raise LumosError(f"{path} is not a table_main.json (no 'main' table)")
    return earlier


def report(args: argparse.Namespace, budget: Budget) -> Path:
    found = load_runs(args)
    earlier = read_earlier(args.earlier)
    main, payload = table(found, args.datasets, lambda d: rows_of(d, args.rows), args, earlier=earlier.get("main"))
    gains_text, gains = gains_table(payload)
    ablation, ablation_payload = table(
        found,
        args.ablation_datasets,
        lambda d: [ablation_base(d), *args.ablations],
        args,
        earlier=earlier.get("ablation"),
    )
    subsets = subset_summaries(found, args)
    earlier_subsets = earlier.get("llm_subset_main") or {}
    subset_datasets = sorted({*subsets, *earlier_subsets} & set(args.datasets))
    subset_text, subset_payload = table(
        subsets,
        subset_datasets,
        lambda d: [r for r in rows_of(d, args.rows) if r in subsets.get(d, {}) or r in earlier_subsets.get(d, {})],
        args,
        last=False,
        earlier=earlier_subsets,
    )
    subset_gains_text, subset_gains = gains_table(subset_payload)
    times = round_times(
        found, {d: rows for d, rows in (earlier.get("round_times") or {}).items() if d in args.datasets}
    )
    plots = plot_curves(found, args.out)
    missing = missing_runs(args, {"main": payload, "ablation": ablation_payload})
    visits = budget.rounds * budget.fraction_train * budget.local_epochs
    lines = [
        "# LUMOS: results table",
        "",
        f"Budget: {budget.rounds} rounds × {budget.fraction_train:.0%} of the users per round × "
        f"{budget.local_epochs} local epochs ({visits:.1f} local epochs per user in expectation; "
        f"centralized and local-only: {budget.epochs} epochs, early stopping on validation). All users "
        f"of each dataset; test metrics ({PROTOCOL} full ranking) of the round or epoch with the best "
        "validation MRR@10, mean ± std over seeds. 'seeds' says how many of the asked seeds are done; "
        + (
            f"'earlier': the row's summary from `{args.earlier}` (no run folder here; curves show the "
            "rows run here only)."
            if earlier
            else "every row was run here."
        ),
        "",
        "## Main table",
        "",
        main,
        "",
        "## Gains of the LUMOS rows",
        "",
        "'within noise': the difference of the means is less than twice its standard error; with one "
        "seed on either side the noise is not measured. 'seed by seed (k)': the same check on the "
        "differences of the k seeds both rows ran, seed by seed (a seed fixes the initial model and "
        "each round's clients for every method). With 2-3 seeds twice the standard error is a lenient "
        "bar: a 5 % t-test asks 4.3 times it for 3 paired seeds.",
        "",
        gains_text,
        "",
        f"## On the LLM's users ({args.llm_users} users of {', '.join(LLM_SUBSET)}, seed {args.llm_seed})",
        "",
        "The same runs' saved models, scored on the users whose views the LLM wrote in the `*-llm-*` rows.",
        "",
        subset_text,
        "",
        subset_gains_text,
        "",
        "## Ablation (on "
        + ", ".join(f"`{ablation_base(d)}` for {d}" for d in args.ablation_datasets)
        + "; every view's terms on, then each taken away)",
        "",
        ablation,
        "",
        "## Round time (training, median seconds per round)",
        "",
        "| dataset | row | seconds | vs fedavg-sasrec |",
        "|---|---|---|---|",
        *[
            f"| {d} | {row} | {t['seconds']:.1f} | {_times(t['ratio'])} |"
            for d, rows in times.items()
            for row, t in rows.items()
        ],
        "",
        "## Learning curves",
        "",
        *[f"![{p.stem}]({p.name})" for p in plots],
        "",
        f"## Not yet run ({len(missing)})",
        "",
        *[f"- {run}" for run in missing],
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
                "local_epochs_per_user": visits,
            },
            "seeds": args.seeds,
            "llm_subset": {"datasets": list(LLM_SUBSET), "users": args.llm_users, "seed": args.llm_seed},
            "main": payload,
            "gains": gains,
            "llm_subset_main": subset_payload,
            "llm_subset_gains": subset_gains,
            "ablation": ablation_payload,
            "round_times": times,
            "missing": missing,
            "earlier": str(args.earlier) if earlier else None,
        },
    )
    print("\n".join(lines))
    return path


def _times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}×"


def _named(labels: Mapping[str, object]) -> Callable[[str], str]:
    """An argparse type: a row by label or folder name."""
    known = {slug(label): label for label in labels}

    def parse(name: str) -> str:
        if name in labels or name in known:
            return known.get(name, name)
        raise argparse.ArgumentTypeError(f"unknown row {name!r}; choose from {', '.join(known)}")

    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("results/table_main"))
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS), help="folders under --data-root")
    parser.add_argument(
        "--rows", nargs="*", type=_named(ROWS), default=list(ROWS), help="main-table rows to run and report"
    )
    parser.add_argument(
        "--seeds",
        nargs="*",
        type=int,
        default=[2024, 2025, 2026],
        help="seeds (Beauty: the first 2; Amazon ID-only, local-only and side rows: 1)",
    )
    parser.add_argument("--ablation-datasets", nargs="*", default=["ml-100k", "amazon-beauty"])
    parser.add_argument("--ablations", nargs="*", type=_named(ABLATIONS), default=list(ABLATIONS))
    parser.add_argument("--ablation-seeds", nargs="*", type=int, default=[2024])
    parser.add_argument("--rounds", type=int, default=DEFAULT_BUDGET.rounds)
    parser.add_argument("--fraction-train", type=float, default=DEFAULT_BUDGET.fraction_train)
    parser.add_argument("--local-epochs", type=int, default=DEFAULT_BUDGET.local_epochs)
    parser.add_argument("--llm-users", type=int, default=1000, help=f"the LLM's users on {', '.join(LLM_SUBSET)}")
    parser.add_argument("--llm-seed", type=int, default=0, help="seed of the LLM's users")
    parser.add_argument(
        "--views-root", type=Path, help="view caches as <root>/<dataset> (default: ~/.cache/lumos/views)"
    )
    parser.add_argument("--run-config", default="", help="run-config overrides of every run (TOML-typed)")
    parser.add_argument("--engine", default="inprocess", choices=("inprocess", "flower"))
    parser.add_argument("--report-only", action="store_true", help="only write the report from finished runs")
    parser.add_argument(
        "--earlier",
        type=Path,
        help="an earlier table_main.json: its rows fill in those without a run folder under --out",
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    absent = sorted({d for d in (*args.datasets, *args.ablation_datasets) if not (args.data_root / d).is_dir()})
    if absent and not args.report_only:
        parser.error(f"no dataset folder {', '.join(absent)} under {args.data_root} (--data-root, --datasets)")
    args.out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.rounds, args.fraction_train, args.local_epochs)
    try:
        if not args.report_only:
            execute(args, budget)
        print(f"\nwritten: {report(args, budget)}")
    except LumosError as error:  # finished runs stay; the command resumes once the cause is fixed
        parser.exit(2, f"{parser.prog}: error: {error}\n")


if __name__ == "__main__":
    main()
