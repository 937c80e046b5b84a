"""Benchmark: centralized SASRec on real data against the RecBole 1.2.1 reference.

Runs ``lumos train --method centralized-sasrec`` with the DESIGN.md defaults on each
dataset (one subprocess per dataset, so peak memory is per run), then prints and writes
test metrics in both protocols, epochs to the best, median seconds per training epoch,
peak memory, and the ratio of test HR@20 / NDCG@20 to RecBole's SASRec on the same split
(``../shared/research/recbole_reference.md``)::

    python experiments/bench_centralized.py --data-root ../shared/data --out results/bench_centralized
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# RecBole 1.2.1 SASRec, same split, max length 50, DESIGN.md defaults, measured on this
# machine (recbole_reference.md). Its "masked" row removes every item before the target.
RECBOLE_TEST = {
    "ml-100k": {
        "unmasked": {"HR@10": 0.1241, "HR@20": 0.2036, "NDCG@10": 0.0600, "NDCG@20": 0.0800},
        "masked": {"HR@10": 0.1835, "HR@20": 0.2768, "NDCG@10": 0.0962, "NDCG@20": 0.1196},
        "seconds_per_epoch": 180.0,
    },
}
REPORTED = ("HR@10", "HR@20", "NDCG@10", "NDCG@20")


def run_one(dataset: str, data_root: Path, out: Path, seed: int, epochs: int) -> dict:
    run_dir = out / dataset
    command = [
        sys.executable,
        "-m",
        "lumosrec.launch.cli",
        "train",
        "--method",
        "centralized-sasrec",
        "--data",
        str(data_root / dataset),
        "--out",
        str(run_dir),
        "--overwrite",
        "--seed",
        str(seed),
        "--epochs",
        str(epochs),
        "--quiet",
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    result = json.loads((run_dir / "result.json").read_text())
    result["wall_seconds"] = time.perf_counter() - started
    return result


def summarize(dataset: str, result: dict) -> dict:
    row = {
        "dataset": dataset,
        "epochs": result["epochs"],
        "best_epoch": result["best_epoch"],
        "median_seconds_per_epoch": result["seconds_per_epoch"],
        "peak_rss_mb": result["peak_rss_mb"],
        "wall_seconds": result["wall_seconds"],
        "test": {p: {m: result["test"][p][m] for m in REPORTED} for p in result["test"]},
    }
    reference = RECBOLE_TEST.get(dataset)
    if reference:
        row["ratio_to_recbole"] = {
            p: {m: row["test"][p][m] / reference[p][m] for m in ("HR@20", "NDCG@20")} for p in ("unmasked", "masked")
        }
        row["epoch_time_ratio_to_recbole"] = row["median_seconds_per_epoch"] / reference["seconds_per_epoch"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--datasets", nargs="+", default=["ml-100k", "amazon-beauty"])
    parser.add_argument("--out", type=Path, default=Path("results/bench_centralized"))
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--epochs", type=int, default=200)
    args = parser.parse_args()
    rows = []
    for dataset in args.datasets:
        rows.append(summarize(dataset, run_one(dataset, args.data_root, args.out, args.seed, args.epochs)))
        (args.out / "bench_centralized.json").write_text(json.dumps(rows, indent=2) + "\n")
    for row in rows:
        print(
            f"\n{row['dataset']}: best epoch {row['best_epoch']}/{row['epochs']}, "
            f"median {row['median_seconds_per_epoch']:.1f} s/epoch, peak {row['peak_rss_mb']:.0f} MB"
        )
        for protocol, metrics in row["test"].items():
            print(f"  test {protocol:<9} " + "  ".join(f"{m} {v:.4f}" for m, v in metrics.items()))
        for protocol, ratios in row.get("ratio_to_recbole", {}).items():
            print(f"  vs RecBole {protocol:<9} " + "  ".join(f"{m} {v:.3f}" for m, v in ratios.items()))
        if "epoch_time_ratio_to_recbole" in row:
            print(f"  epoch time / RecBole's 180 s: {row['epoch_time_ratio_to_recbole']:.2f}")
    print(f"\nwritten: {args.out / 'bench_centralized.json'}")


if __name__ == "__main__":
    main()
