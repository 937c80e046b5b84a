"""Noisy and malicious clients: how much FedAvg-SASRec and LUMOS lose, with and without robust rules.

Issue 21's robustness study. The LUMOS paper claims robustness to noisy and adversarial clients
"even without dedicated server-side protection modules"; the claim holds here if ``lumos`` loses
less than ``fedavg-sasrec`` under FedAvg. Each run is a federation whose own clients misbehave
(``client/threats.py``):

* ``noise``: that share of every user's training items replaced by random items;
* ``scale`` / ``sign-flip``: that share of the users sends its update times 10 / times -10;
* ``promote``: that share of the users trains on fabricated histories in which one cold item
  (the same for every run of a seed) follows each of their items; the report gives the item's
  exposure (the share of all users whose top 20, on their test input, holds it).

Methods per dataset: the table's ``fedavg-sasrec`` and ``lumos`` rows (``experiments/table_main.py``);
on Beauty their text-initialised forms, since from a random table neither learns enough at this
budget for a drop to mean anything. FedAvg runs in cohorts. The robust rules (median, trimmed
mean, Krum) need each user's update, so their runs use one-user nodes (``cohort-size = 0``) and
run on ml-100k only: 2,236 Beauty updates of 3.5 MB a round do not fit a median here. Every user
is scored (attackers' true histories included). The budget is smaller than the table's (default
20 rounds x 10 % x 3 local epochs) and stated in the report; runs are reused and resume::

    python experiments/robustness.py --data-root ../shared/data --out results/robustness \\
        --datasets ml-100k amazon-beauty

writes ``docs/results/robustness/report.md`` and ``robustness.json`` over every finished run of the
study, whichever invocation made it (rows with ``dataset``,
``method``, ``aggregator``, ``threat``, ``level``, ``hr20``, ``hr20_drop``, ``ndcg20``,
``ndcg20_drop``, ``target_exposure``, ``rejected``: replies the server's checks refused). Run folders are not kept with the code (they are large and
hold data): ``--earlier docs/results/robustness/robustness.json`` takes the runs that have no folder
here from an earlier report's rows (marked "earlier" and keeping their own versions) and does not
make them again, so the study is completed on another machine (runs are deterministic per seed on
CPU); a run folder here is resumed instead and, once finished, replaces its earlier row.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch

from lumosrec.client.threats import target_item
from lumosrec.core.batching import pad_sequences
from lumosrec.core.data import load_data
from lumosrec.core.dataset import Dataset
from lumosrec.core.errors import LumosError
from lumosrec.core.results import write_json
from lumosrec.launch.experiment import Budget, finished_result, run_method
from lumosrec.launch.tables import PROTOCOL, read_earlier_report, slug
from lumosrec.models.factory import build_model

if __package__ in (None, ""):  # run as a script: the table's rows come from the sibling script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments.table_main import overrides_of

#: per dataset, the table rows compared: (FedAvg-SASRec's, LUMOS's)
PAIRS = {
    "ml-100k": ("fedavg-sasrec", "lumos"),
    "amazon-beauty": ("fedavg-sasrec-text-init", "lumos-text-init"),
}
#: threat -> its run-config settings at ``level``
THREATS = {
    "noise": lambda level: {"noise-share": level},
    "scale": lambda level: {"malicious-share": level, "malicious-attack": "scale"},
    "sign-flip": lambda level: {"malicious-share": level, "malicious-attack": "sign-flip"},
    "promote": lambda level: {"malicious-share": level, "malicious-attack": "promote"},
}
LEVELS = {
    "noise": (0.1, 0.2, 0.3),
    "scale": (0.05, 0.1, 0.2),
    "sign-flip": (0.05, 0.1, 0.2),
    "promote": (0.05, 0.1, 0.2),
}
#: aggregator -> its run-config settings; robust rules run per user, on :data:`ROBUST_DATASETS`
AGGREGATORS = {
    "fedavg": {},
    "fedmedian": {"strategy": "fedmedian", "cohort-size": 0},
    "fedtrimmedavg": {"strategy": "fedtrimmedavg", "trimmed-beta": 0.2, "cohort-size": 0},
    "krum": {"strategy": "krum", "cohort-size": 0},
}
ROBUST_DATASETS = ("ml-100k",)
#: the threats robust rules face (at the highest level), besides the clean run
ROBUST_THREATS = ("scale", "sign-flip", "promote")
TOP = 20


def plan(args: argparse.Namespace) -> list[tuple[str, str, str, str, float]]:
    """``(dataset, method, aggregator, threat, level)`` of every run, clean runs first."""
    runs = []
    for dataset in args.datasets:
        for aggregator in args.aggregators:
            if aggregator != "fedavg" and dataset not in ROBUST_DATASETS:
                continue
            for method in PAIRS[dataset]:
                runs.append((dataset, method, aggregator, "clean", 0.0))
                for threat in args.threats:
                    if aggregator != "fedavg" and threat not in ROBUST_THREATS:
                        continue
                    levels = LEVELS[threat] if aggregator == "fedavg" and args.levels == "all" else LEVELS[threat][-1:]
                    runs.extend((dataset, method, aggregator, threat, level) for level in levels)
    return runs


def run_dir(args: argparse.Namespace, dataset: str, method: str, aggregator: str, threat: str, level: float) -> Path:
    label = "clean" if threat == "clean" else f"{threat}-{level:g}"
    return args.out / dataset / slug(method) / aggregator / label / f"seed{args.seed}"


def config_of(args: argparse.Namespace, dataset: str, method: str, aggregator: str, threat: str, level: float):
    """The method and run config of one run."""
    table_args = types.SimpleNamespace(run_config=args.run_config, llm_users=0, llm_seed=0, views_root=args.views_root)
    name, config = overrides_of(dataset, method, table_args)
    config.update(AGGREGATORS[aggregator])
    if threat != "clean":
        config.update(THREATS[threat](level))
    return name, config


def target_exposure(model_file: Path, dataset: Dataset, target: int, batch_size: int = 1024) -> float:
    """The share of all users whose top :data:`TOP` items, on their test input (every item before
    the test item), hold ``target``."""
    saved = torch.load(model_file, map_location="cpu", weights_only=True)
    sizes = {key: value for key, value in saved["config"].items() if key != "num_items"}
    model = build_model("sasrec", int(saved["config"]["num_items"]), **sizes)
    model.load_state_dict(saved["state_dict"], strict=False)
    model.eval()
    histories = [sequence[:-1] for sequence in dataset.sequences]
    exposed = 0
    with torch.no_grad():
        for start in range(0, len(histories), batch_size):
            items, lengths = pad_sequences(histories[start : start + batch_size], model.config.max_len)
            scores = model.score(items, lengths)
            scores[:, 0] = -torch.inf  # padding is never recommended
            exposed += int((scores.topk(TOP, dim=1).indices == target).any(dim=1).sum())
    return exposed / len(histories)


#: what identifies one run of the study in a row
RUN_KEYS = ("dataset", "method", "aggregator", "threat", "level", "seed")


def read_earlier(path: Path | None) -> dict[tuple, dict]:
    """The rows of an earlier ``robustness.json`` by run (empty without ``--earlier``)."""
    if path is None:
        return {}
    rows = read_earlier_report(path, list, "robustness.json (a list of rows)")
    if not all(isinstance(row, dict) and all(key in row for key in (*RUN_KEYS, "hr20", "ndcg20")) for row in rows):
        raise LumosError(f"{path} is not a robustness.json (rows without {', '.join(RUN_KEYS)}, hr20, ndcg20)")
    return {tuple(row[key] for key in RUN_KEYS): {**row, "earlier": str(path)} for row in rows}


def collect(args: argparse.Namespace, earlier: dict[tuple, dict] | None = None) -> list[dict]:
    """One row per finished run, or per run of ``earlier`` without a folder here, with its drop
    against the clean run of its method and aggregator."""
    rows, clean = [], {}
    targets: dict[str, tuple[Dataset, int]] = {}
    for dataset, method, aggregator, threat, level in plan(args):
        folder = run_dir(args, dataset, method, aggregator, threat, level)
        key = (dataset, method, aggregator, threat, level, args.seed)
        result = finished_result(folder)
        if result is not None:
            if dataset not in targets:
                data = load_data(str(args.data_root / dataset))
                targets[dataset] = (data, target_item({"seed": args.seed}, data))
            data, target = targets[dataset]
            test = result["test"][PROTOCOL]
            row = {
                "dataset": dataset,
                "method": method,
                "aggregator": aggregator,
                "threat": threat,
                "level": level,
                "seed": args.seed,
                "hr20": test["HR@20"],
                "ndcg20": test["NDCG@20"],
                "target_item": target,
                "target_exposure": target_exposure(folder / "model.pt", data, target),
                # replies the server's checks refused: a simulated attacker's can exceed the bound on
                # a node's examples that the server derives from the honest data
                "rejected": int(result.get("rejected", 0)),
                "folder": str(folder),
                # the run's own (a run made by an older commit keeps that commit's), not the reporter's
                "versions": json.loads((folder / "config.json").read_text())["versions"],
            }
        elif key in (earlier or {}):
            row = dict(earlier[key])
        else:
            continue
        if threat == "clean":
            clean[(dataset, method, aggregator)] = row
        base = clean.get((dataset, method, aggregator))
        for metric in ("hr20", "ndcg20"):
            row[f"{metric}_drop"] = 1 - row[metric] / base[metric] if base and base[metric] else None
        rows.append(row)
    return rows


def _drop(value: float | None) -> str:
    return "-" if value is None else f"{0.0 - value:+.1%}"


def report(args: argparse.Namespace, rows: list[dict], budget: Budget, command: str) -> str:
    reported = {tuple(row[key] for key in RUN_KEYS[:-1]) for row in rows}
    missing = [str(run_dir(args, *run)) for run in plan(args) if run not in reported]
    lines = [
        "# Noisy and malicious clients: FedAvg-SASRec against LUMOS",
        "",
        f"Issue 21's robustness study: every finished run under `{args.out}`, whichever invocation made it; "
        f"last written by `{command}` (without `--report-only` it makes the runs it asks for first). "
        f"Budget: {budget.rounds} rounds x "
        f"{budget.fraction_train:g} of the clients x {budget.local_epochs} local epochs, seed {args.seed}. "
        "Test HR@20 / NDCG@20 (unmasked, all users, at the round of the best validation MRR@10), their change "
        "against the clean run of the same method and aggregator, and the promoted item's exposure (share of "
        f"users whose top {TOP} holds it). 'rejected': client replies the server's checks refused "
        "(`server/validation.py`; '-' for rows recorded before the count was)."
        + (
            f" Rows marked 'earlier' come from `{args.earlier}` (their run folders are not on this machine)."
            if args.earlier
            else ""
        ),
        "",
        "| dataset | method | aggregator | threat | level | HR@20 | change | NDCG@20 | change | target exposure "
        "| rejected |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        method = row["method"] + (" (earlier)" if row.get("earlier") else "")
        lines.append(
            f"| {row['dataset']} | {method} | {row['aggregator']} | {row['threat']} | {row['level']:g} | "
            f"{row['hr20']:.4f} | {_drop(row['hr20_drop'])} | {row['ndcg20']:.4f} | {_drop(row['ndcg20_drop'])} | "
            f"{row['target_exposure']:.4f} | {row.get('rejected', '-')} |"
        )
    lines += ["", "## The paper's claim: LUMOS loses less than FedAvg-SASRec under FedAvg", ""]
    lines += claim_lines(rows)
    if missing:
        lines += ["", f"## Not yet run ({len(missing)})", "", *(f"- `{folder}`" for folder in missing)]
    return "\n".join(lines) + "\n"


def claim_lines(rows: list[dict]) -> list[str]:
    """Per dataset, threat and level under FedAvg: LUMOS's HR@20 drop against FedAvg-SASRec's."""
    lines = ["| dataset | threat | level | FedAvg-SASRec HR@20 change | LUMOS HR@20 change | LUMOS loses less |"]
    lines.append("|---|---|---|---|---|---|")
    found = {(r["dataset"], r["method"], r["threat"], r["level"]): r for r in rows if r["aggregator"] == "fedavg"}
    for (dataset, method, threat, level), row in found.items():
        baseline_name, lumos_name = PAIRS[dataset]
        if method != baseline_name or threat == "clean":
            continue
        other = found.get((dataset, lumos_name, threat, level))
        if other is None or row["hr20_drop"] is None or other["hr20_drop"] is None:
            continue
        lines.append(
            f"| {dataset} | {threat} | {level:g} | {_drop(row['hr20_drop'])} | {_drop(other['hr20_drop'])} | "
            f"{'yes' if other['hr20_drop'] < row['hr20_drop'] else 'no'} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("results/robustness"))
    parser.add_argument("--report-dir", type=Path, default=Path("docs/results/robustness"))
    parser.add_argument("--datasets", nargs="*", choices=list(PAIRS), default=list(PAIRS))
    parser.add_argument("--aggregators", nargs="*", choices=list(AGGREGATORS), default=list(AGGREGATORS))
    parser.add_argument("--threats", nargs="*", choices=list(THREATS), default=list(THREATS))
    parser.add_argument(
        "--levels", choices=("all", "highest"), default="all", help="every level of each threat, or its highest only"
    )
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--fraction-train", type=float, default=0.1)
    parser.add_argument("--local-epochs", type=int, default=3)
    parser.add_argument(
        "--views-root", type=Path, help="view caches as <root>/<dataset> (default: ~/.cache/lumos/views)"
    )
    parser.add_argument("--run-config", default="", help="run-config overrides of every run (TOML-typed)")
    parser.add_argument("--report-only", action="store_true", help="only write the report from finished runs")
    parser.add_argument(
        "--earlier",
        type=Path,
        help="an earlier robustness.json: its rows fill in the runs without a folder under --out",
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    absent = sorted(d for d in args.datasets if not (args.data_root / d).is_dir())
    if absent:
        parser.error(f"no dataset folder {', '.join(absent)} under {args.data_root} (--data-root, --datasets)")
    budget = Budget(args.rounds, args.fraction_train, args.local_epochs)
    command = "python experiments/robustness.py " + " ".join(sys.argv[1:])
    try:
        earlier = read_earlier(args.earlier)
        if not args.report_only:
            for dataset, method, aggregator, threat, level in plan(args):
                name, config = config_of(args, dataset, method, aggregator, threat, level)
                print(f"== {dataset} / {method} / {aggregator} / {threat} {level:g}", flush=True)
                folder = run_dir(args, dataset, method, aggregator, threat, level)
                if not folder.is_dir() and (dataset, method, aggregator, threat, level, args.seed) in earlier:
                    print(f"   finished earlier: its row in {args.earlier}", flush=True)
                    continue
                run_method(
                    name, str(args.data_root / dataset), folder, args.seed, budget, config, progress=not args.quiet
                )
        # the report covers the whole study's finished runs, whatever part this invocation ran
        whole = {"datasets": list(PAIRS), "aggregators": list(AGGREGATORS), "threats": list(THREATS), "levels": "all"}
        study = argparse.Namespace(**{**vars(args), **whole})
        rows = collect(study, earlier)
    except LumosError as error:  # finished runs stay; the command resumes once the cause is fixed
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    args.report_dir.mkdir(parents=True, exist_ok=True)
    (args.report_dir / "report.md").write_text(report(study, rows, budget, command))
    write_json(args.report_dir / "robustness.json", rows)
    print(f"written: {args.report_dir / 'report.md'}")


if __name__ == "__main__":
    main()
