"""Validation and test HR@20 per evaluated round of a few federated runs, side by side.

The record of a tuning choice (a learning rate, a server step, a view setting) made on short runs:
each ``--run NAME=FOLDER`` is a run folder (``lumos run --out FOLDER``); the table shows its
settings that differ between the runs and, per evaluated round, validation / test HR@20. Writes
``<out>/<name>.md`` and ``<out>/<name>.json``::

    python experiments/compare_runs.py --name tuning --out docs/results/table_main \\
        --run fedavg-text-lr0.5=results/scratch/beauty-text-lr0.5 --run fedavg-text-lr0.1=results/scratch/beauty-text-lr0.1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lumosrec.core.results import write_json

PROTOCOL = "unmasked"


def load(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    curve = {
        row["round"]: {stage: row[stage][PROTOCOL]["HR@20"] for stage in ("valid", "test")}
        for row in metrics
        if "test" in row and "round" in row
    }
    return {"run_config": config["run_config"], "curve": curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, help="NAME=FOLDER (repeat)")
    parser.add_argument("--name", default="compare_runs")
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--title", default="Runs compared")
    args = parser.parse_args()
    runs = {}
    for entry in args.run:
        name, _, folder = entry.partition("=")
        if not folder or not all((Path(folder) / f).is_file() for f in ("config.json", "metrics.json")):
            parser.error(f"--run {entry!r}: expected NAME=FOLDER, a run folder with config.json and metrics.json")
        runs[name] = load(Path(folder))
    keys = sorted({key for run in runs.values() for key in run["run_config"]})
    differing = [
        key
        for key in keys
        # keys a run predates count as equal: only values set differently are shown
        if key != "out-dir"
        and len({json.dumps(run["run_config"][key]) for run in runs.values() if key in run["run_config"]}) > 1
    ]
    rounds = sorted({r for run in runs.values() for r in run["curve"]})
    lines = [
        f"# {args.title}",
        "",
        f"Validation / test HR@20 ({PROTOCOL} full ranking) per evaluated round. Settings that differ:",
        "",
        "| run | " + " | ".join(differing) + " |",
        "|---|" + "---|" * len(differing),
        *[
            f"| {name} | " + " | ".join(str(run["run_config"].get(key)) for key in differing) + " |"
            for name, run in runs.items()
        ],
        "",
        "| round | " + " | ".join(runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    for r in rounds:
        cells = [
            f"{run['curve'][r]['valid']:.4f} / {run['curve'][r]['test']:.4f}" if r in run["curve"] else "-"
            for run in runs.values()
        ]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    write_json(
        args.out / f"{args.name}.json",
        [
            {"run": name, "settings": {key: run["run_config"].get(key) for key in differing}, "round": r, **values}
            for name, run in runs.items()
            for r, values in sorted(run["curve"].items())
        ],
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
