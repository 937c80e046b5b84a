"""Benchmark: on-device view generation, throughput and quality of the grounded views.

Each cell runs ``lumos views generate`` in a fresh process and a fresh cache folder (so peak
memory is the cell's own) and reads its ``report.json``: users/min, tokens/s, parse rate,
grounding rate, mean grounding similarity and fallback rate per view, peak RSS.

* **runtime cells** compare, on the same fixed user sample, a naive loop (batch 1, three
  separate calls per user, every prompt evaluated in full) with batched generation and
  prompt-prefix reuse, for each backend x model;
* **full cells** run the fastest setting on all ``ml-100k`` users and a fixed 1,000-user
  sample of ``amazon-beauty``.

::

    python experiments/bench_views.py --data-root ../shared/data --out results/bench_views
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

#: name -> extra ``lumos views generate`` flags
RUNTIME_CELLS = {
    "llamacpp smollm2 naive b1": ["--backend", "llamacpp", "--batch", "1", "--no-prefix-cache"],
    "llamacpp smollm2 b6+prefix": ["--backend", "llamacpp", "--batch", "6"],
    "transformers smollm2 b1": ["--backend", "transformers", "--batch", "1"],
    "transformers smollm2 b12": ["--backend", "transformers", "--batch", "12"],
    "llamacpp gemma3 b6+prefix": ["--backend", "llamacpp", "--batch", "6", "--model", "gemma3-270m"],
}
BEST_CELL = "transformers smollm2 b12"  # fastest on 2 CPU cores, see the runtime cells


def run_cell(data: Path, out: Path, flags: list[str], users: int, timeout: float, fresh: bool = True) -> dict:
    """One ``lumos views generate``, in a fresh cache folder unless ``fresh`` is false (the long
    full cells resume an interrupted run; their users/min counts the users made in this call)."""
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "lumosrec.launch.cli",
        "views",
        "generate",
        "--data",
        str(data),
        "--out",
        str(out),
        "--users",
        str(users),
        "--quiet",
        *flags,
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:], "command": command}
    report = json.loads((out / "report.json").read_text())
    return {"command": command, "wall_seconds": wall, **summarize(report)}


def summarize(report: dict) -> dict:
    stats, generation = report["stats"], report["generation"] or {}
    views = stats["views"]
    return {
        "users": stats["users"],
        "users_per_minute": stats["users_per_minute"],
        "tokens_per_second": generation.get("completion_tokens_per_second"),
        "completion_tokens": generation.get("completion_tokens"),
        "cached_prompt_tokens": generation.get("cached_prompt_tokens"),
        "prompt_tokens": generation.get("prompt_tokens"),
        "peak_rss_mb": report["peak_rss_mb"],
        "model": report["model"],
        "own_profile_similarity": stats["mean_own_profile_similarity"],
        "views": {
            view: {
                key: values[key]
                for key in (
                    "parse_rate",
                    "grounding_rate",
                    "mean_grounding_similarity",
                    "fallback_rate",
                    "padded",
                    "rejected_as_too_similar",
                    "mean_profile_similarity",
                )
            }
            for view, values in views.items()
        },
    }


def print_row(name: str, cell: dict) -> None:
    if "error" in cell:
        print(f"  {name:<30} failed: {cell['error']}")
        return
    views = cell["views"]
    quality = "  ".join(
        f"{view[:4]} parse {v['parse_rate'] or 0:.2f} ground {v['grounding_rate'] or 0:.2f} "
        f"sim {v['mean_grounding_similarity'] or 0:.2f} fallback {v['fallback_rate'] or 0:.2f}"
        for view, v in views.items()
    )
    print(
        f"  {name:<30} {cell['users_per_minute']:6.1f} users/min {cell['tokens_per_second'] or 0:6.1f} tok/s "
        f"{cell['peak_rss_mb']:6.0f} MB | {quality}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("results/bench_views"))
    parser.add_argument("--sample", type=int, default=48, help="users of the runtime comparison cells")
    parser.add_argument("--transformers-sample", type=int, default=24, help="users of the (slower) transformers cells")
    parser.add_argument("--beauty-users", type=int, default=1000)
    parser.add_argument("--skip", nargs="*", default=[], choices=["runtime", "full"])
    parser.add_argument("--datasets", nargs="*", default=["ml-100k", "amazon-beauty"])
    parser.add_argument(
        "--cells",
        nargs="*",
        default=list(RUNTIME_CELLS),
        choices=list(RUNTIME_CELLS),
        metavar="CELL",
        help=f"runtime cells to run (default: all of {', '.join(RUNTIME_CELLS)})",
    )
    parser.add_argument("--timeout", type=float, default=4 * 3600)
    args = parser.parse_args()
    report_path = args.out / "bench_views.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    datasets = {
        "ml-100k": (args.data_root / "ml-100k", 0),
        "amazon-beauty": (args.data_root / "amazon-beauty", args.beauty_users),
    }
    datasets = {name: spec for name, spec in datasets.items() if name in args.datasets}

    def save() -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(report, indent=2) + "\n")

    if "runtime" not in args.skip:
        for dataset, (path, _) in datasets.items():
            print(f"\n{dataset}: runtime cells (same users per pair)")
            for name in args.cells:
                flags = RUNTIME_CELLS[name]
                users = args.transformers_sample if "transformers" in name else args.sample
                cell = run_cell(path, args.out / dataset / name.replace(" ", "_"), flags, users, args.timeout)
                report.setdefault("runtime", {}).setdefault(dataset, {})[name] = cell
                save()
                print_row(f"{name} ({users} users)", cell)
            cells = report["runtime"][dataset]
            naive = cells.get("llamacpp smollm2 naive b1", {})
            for name in ("llamacpp smollm2 b6+prefix", BEST_CELL):
                cell = cells.get(name, {})
                if naive and cell and "error" not in naive and "error" not in cell:
                    speedup = cell["users_per_minute"] / naive["users_per_minute"]
                    cells[f"speedup {name} / naive"] = speedup
                    save()
                    print(f"  {name} / naive b1 users/min: {speedup:.2f}x")
    if "full" not in args.skip:
        for dataset, (path, users) in datasets.items():
            cell = run_cell(
                path, args.out / dataset / "full", RUNTIME_CELLS[BEST_CELL], users, args.timeout, fresh=False
            )
            report.setdefault("full", {})[dataset] = cell
            save()
            print(f"\n{dataset}: all {'users' if not users else f'{users} sampled users'}")
            print_row(BEST_CELL, cell)
    print(f"\nwritten: {report_path}")


if __name__ == "__main__":
    main()
