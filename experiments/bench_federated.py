"""Benchmark: FedAvg-SASRec on Flower's simulation runtime, and the cost of the federation.

0. ``visits``: what one user-visit costs, per dataset (``ml-100k``, all of ``amazon-beauty``) and
   objective (``sasrec``, ``lumos`` with retrieval views), 10 % of the users per round: one-user
   nodes against cohort nodes (``--cohort-nodes`` of them; their users trained one after the
   other, and together where ``cohort-engine = "auto"`` does so) on Flower's simulation, the
   second round of two (warm actors). Reports ms per user-visit, the speedup, the peak memory of all
   Flower and Ray processes, and the compute floor of a user-visit (transformer and softmax FLOPs
   over a measured matmul rate, ``bench_cohort_engine.py``).

1. ``ml-100k`` with one client per user (943): test HR@20 / NDCG@20 per round and wall time
   per round, and the best round as a fraction of centralized SASRec on the same split.
2. One training round of ``amazon-beauty`` with every user as a client (22,363): wall time,
   and the **overhead ratio** = that round's training wall time / the wall time of exactly
   the same local training steps run in a bare torch loop in one process. The rest is split
   into server-side aggregation and Flower/Ray messaging (the round loop records both).

::

    python experiments/bench_federated.py --data-root ../shared/data --out results/bench_federated
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from bench_cohort_engine import compute_floor_ms, matmul_gflops

from lumosrec.client.cohort import use_batched
from lumosrec.client.local import local_optimizer
from lumosrec.client.objectives import objective_for
from lumosrec.core.batching import PrefixSamples
from lumosrec.core.dataset import load_dataset
from lumosrec.core.evaluation import leave_one_out
from lumosrec.core.runconfig import model_sizes, parse_run_config
from lumosrec.core.training import pick_device, train_epochs
from lumosrec.launch.app import default_run_config
from lumosrec.launch.simulate import simulate
from lumosrec.models.factory import build_model
from lumosrec.models.sasrec import SASRecConfig


def per_round(out: Path) -> list[dict]:
    rows = []
    for row in json.loads((out / "metrics.json").read_text()):
        entry = {
            "round": row["round"],
            "round_seconds": row["round_seconds"],
            "train_seconds": row["train_seconds"],
            "aggregate_seconds": row["aggregate_seconds"],
            "train_nodes": row["train_nodes"],
        }
        if "test" in row:
            entry.update({f"test_{m}": row["test"]["unmasked"][m] for m in ("HR@20", "NDCG@20")})
            entry["eval_seconds"] = row["eval_seconds"]
        rows.append(entry)
    return rows


def bare_local_training(data: Path, run_config: dict, sample: int = 0) -> tuple[float, int]:
    """The same local steps as one full round (every user, local epochs, batch size), no Flower.

    With ``sample > 0`` only a fixed random sample of that many users is trained and the time
    is scaled to all users (the per-user cost does not depend on the order). Returns the
    (extrapolated) seconds and the number of users actually trained.
    """
    dataset = load_dataset(data)
    split = leave_one_out(dataset.sequences, dataset.num_items)
    users = np.arange(dataset.num_users)
    if 0 < sample < len(users):
        users = np.sort(np.random.default_rng(0).choice(users, sample, replace=False))
    device = pick_device("cpu")
    model = build_model("sasrec", dataset.num_items, **model_sizes(run_config))
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    started = time.perf_counter()
    for user in users:
        model.load_state_dict(global_state)
        optimizer = local_optimizer(model, run_config)
        rng = np.random.default_rng([int(run_config["seed"]), int(user)])
        train_epochs(
            model,
            optimizer,
            PrefixSamples([split.train[user]], int(run_config["max-len"])),
            int(run_config["local-epochs"]),
            int(run_config["batch-size"]),
            rng,
            device,
            max_grad_norm=float(run_config["max-grad-norm"]),
        )
    return (time.perf_counter() - started) * dataset.num_users / len(users), len(users)


class FederationMemory:
    """Peak summed resident memory of every Flower and Ray process, sampled each second."""

    MARKERS = (b"flwr", b"flower", b"ray::", b"raylet", b"gcs_server")

    def __enter__(self) -> FederationMemory:
        self.peak_mb, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(1.0):
            total = 0
            for proc in Path("/proc").iterdir():
                try:
                    if proc.name.isdigit() and any(m in (proc / "cmdline").read_bytes() for m in self.MARKERS):
                        total += int(
                            next(
                                line for line in (proc / "status").read_text().splitlines() if line.startswith("VmRSS:")
                            ).split()[1]
                        )
                except (OSError, StopIteration, ValueError):
                    continue
            self.peak_mb = max(self.peak_mb, total / 1024)


def visit_cost(data: Path, objective: str, cohort_size: int, engine: str, out: Path, client_cpus: int | None) -> dict:
    """ms per user-visit in the second of two rounds of 10 % of the users."""
    overrides = {
        "data": str(data),
        "out-dir": str(out),
        "num-server-rounds": 2,
        "fraction-train": 0.1,
        "eval-every": 0,
        "resume": False,
        "objective": objective,
        "views": "retrieval",
        "views-dir": str(out.parent / "views"),
        "cohort-size": cohort_size,
        "cohort-engine": engine,
    }
    started = time.perf_counter()
    with FederationMemory() as memory:
        simulate(overrides, client_cpus=client_cpus, timeout=6 * 3600, progress=False)
    row = json.loads((out / "metrics.json").read_text())[-1]
    users = row.get("train_users", row["train_nodes"])
    return {
        "nodes_trained": row["train_nodes"],
        "users_trained": users,
        "train_seconds": row["train_seconds"],
        "ms_per_user_visit": 1000 * row["train_seconds"] / users,
        "peak_federation_rss_mb": memory.peak_mb,
        "wall_seconds": time.perf_counter() - started,
    }


def visits(args: argparse.Namespace, report: dict, report_path: Path) -> None:
    gflops = matmul_gflops()
    report.setdefault("visits", {})["matmul_gflops"] = gflops
    for name in args.visit_datasets:
        dataset = load_dataset(args.data_root / name)
        split = leave_one_out(dataset.sequences, dataset.num_items)
        sizes = model_sizes(default_run_config())
        floor = compute_floor_ms(
            split.train,
            SASRecConfig(num_items=dataset.num_items, **sizes),
            int(default_run_config()["local-epochs"]),
            gflops,
        )
        for objective in args.visit_objectives:
            cohort_size = math.ceil(dataset.num_users / args.cohort_nodes)
            entry = {"compute_floor_ms_per_user_visit": floor, "cohort_size": cohort_size}
            modes = {"one_user_nodes": (0, "loop"), "cohorts_loop": (cohort_size, "loop")}
            run = {**default_run_config(), "objective": objective}
            if use_batched(run, objective_for(run).batched_refusal(run), split.train):
                modes["cohorts_batched"] = (cohort_size, "batched")
            for mode, (size, engine) in modes.items():
                entry[mode] = visit_cost(
                    args.data_root / name,
                    objective,
                    size,
                    engine,
                    args.out / "visits" / name / objective / mode,
                    args.client_cpus,
                )
                print(
                    f"{name} {objective} {mode}: {entry[mode]['ms_per_user_visit']:.1f} ms per user-visit", flush=True
                )
            # cohort mode as `cohort-engine = "auto"` runs it: batched where it applies, else the loop
            entry["cohorts"] = entry.get("cohorts_batched", entry["cohorts_loop"])
            entry["speedup"] = entry["one_user_nodes"]["ms_per_user_visit"] / entry["cohorts"]["ms_per_user_visit"]
            report["visits"][f"{name}/{objective}"] = entry
            report_path.write_text(json.dumps(report, indent=2) + "\n")
            print(f"{name} {objective}: speedup {entry['speedup']:.2f}, floor {floor:.1f} ms", flush=True)


#: processes of a Flower simulation, by a part of their command line
FLOWER_PROCESSES = {
    "superlink": "flower-superlink",
    "serverapp": "flwr-serverapp",
    "simulation-engine": "flwr-simulation",
    "client-actor": "ClientAppActor",
}


def _pids(marker: str) -> list[int]:
    found = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found]


def profile_federation(out: Path, delay: float, duration: float) -> threading.Thread:
    """Sample every Flower process with py-spy for ``duration`` s, ``delay`` s from now.

    Writes ``profile.json``: per process kind, the busy samples and the innermost functions
    taking most of them (py-spy skips idle threads, so the counts are CPU time at 20 Hz).
    """

    def record() -> None:
        time.sleep(delay)
        jobs = []
        for kind, marker in FLOWER_PROCESSES.items():
            for pid in _pids(marker):
                path = out / f"{kind}-{pid}.txt"
                jobs.append(
                    (
                        kind,
                        path,
                        subprocess.Popen(
                            [
                                py_spy,
                                "record",
                                "--pid",
                                str(pid),
                                "--duration",
                                str(int(duration)),
                                "--rate",
                                "20",
                                "--nonblocking",
                                "--format",
                                "raw",
                                "--output",
                                str(path),
                            ],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                        ),
                    )
                )
        summary: dict = {}
        for kind, path, job in jobs:
            job.wait()
            entry = summary.setdefault(kind, {"processes": 0, "samples": 0, "top": collections.Counter()})
            entry["processes"] += 1
            for line in path.read_text().splitlines() if path.is_file() else []:
                stack, _, count = line.rpartition(" ")
                entry["samples"] += int(count)
                entry["top"][stack.split(";")[-1]] += int(count)
        for entry in summary.values():
            entry["top"] = entry["top"].most_common(12)
        (out / "profile.json").write_text(json.dumps({"seconds": duration, "rate_hz": 20, **summary}, indent=2) + "\n")

    py_spy = shutil.which("py-spy", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if py_spy is None:
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    out.mkdir(parents=True, exist_ok=True)
    thread = threading.Thread(target=record, daemon=True)
    thread.start()
    return thread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("results/bench_federated"))
    parser.add_argument("--rounds", type=int, default=30, help="ml-100k rounds")
    parser.add_argument(
        "--run-config",
        default="fraction-train=0.2 eval-every=5",
        help="ml-100k overrides, TOML-typed (strategy, learning-rate, local-epochs, ...)",
    )
    parser.add_argument("--centralized", type=Path, default=Path("results/bench_centralized/ml-100k/result.json"))
    parser.add_argument("--skip", nargs="*", default=[], choices=["visits", "ml-100k", "beauty-round"])
    parser.add_argument("--visit-datasets", nargs="*", default=["ml-100k", "amazon-beauty"])
    parser.add_argument("--visit-objectives", nargs="*", default=["sasrec", "lumos"])
    parser.add_argument(
        "--cohort-nodes",
        type=int,
        default=16,
        help="cohort nodes per dataset in the visits part (cohort-size = users / this): batching pays from "
        "about 64 drawn users per cohort and round",
    )
    parser.add_argument(
        "--bare-sample",
        type=int,
        default=0,
        help="time the bare loop on this many random Beauty users and scale (0: all)",
    )
    parser.add_argument("--beauty-run-config", default="", help="run-config overrides of the Beauty round")
    parser.add_argument("--client-cpus", type=int, help="CPUs per virtual client (Flower's default: 2)")
    parser.add_argument(
        "--profile",
        type=float,
        nargs=2,
        metavar=("DELAY", "SECONDS"),
        help="py-spy every Flower process of the Beauty round for SECONDS, DELAY s after its start",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report_path = args.out / "bench_federated.json"
    # parts skipped in this call keep their earlier results
    report: dict = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report["config"] = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    if "visits" not in args.skip:
        visits(args, report, report_path)
    if "ml-100k" not in args.skip:
        out = args.out / "ml-100k"
        overrides = {
            "data": str(args.data_root / "ml-100k"),
            "out-dir": str(out),
            "num-server-rounds": args.rounds,
            "resume": False,
            **parse_run_config(args.run_config),
        }
        started = time.perf_counter()
        result = simulate(overrides, client_cpus=args.client_cpus)
        rounds = per_round(out)
        entry = {
            "overrides": overrides,
            "wall_seconds": time.perf_counter() - started,
            "rounds": rounds,
            "best_round": result["best_epoch"],
            "test": result["test"],
        }
        if args.centralized.is_file():
            central = json.loads(args.centralized.read_text())["test"]["unmasked"]
            entry["fraction_of_centralized"] = {
                m: result["test"]["unmasked"][m] / central[m] for m in ("HR@20", "NDCG@20")
            }
        report["ml-100k"] = entry
        report_path.write_text(json.dumps(report, indent=2) + "\n")
        print("\nml-100k FedAvg-SASRec (943 clients):")
        for row in rounds:
            metrics = (
                f"  HR@20 {row['test_HR@20']:.4f}  NDCG@20 {row['test_NDCG@20']:.4f}" if "test_HR@20" in row else ""
            )
            print(f"  round {row['round']:>3}  {row['round_seconds']:6.1f} s{metrics}")
        print(f"  best round {result['best_epoch']}: {entry.get('fraction_of_centralized', 'no centralized result')}")

    if "beauty-round" not in args.skip:
        data = args.data_root / "amazon-beauty"
        out = args.out / "beauty-round"
        overrides = {
            "data": str(data),
            "out-dir": str(out),
            "num-server-rounds": 1,
            "fraction-train": 1.0,
            "eval-every": 0,
            "resume": False,
            **parse_run_config(args.beauty_run_config),
        }
        profiler = profile_federation(args.out / "profile", *args.profile) if args.profile else None
        result = simulate(overrides, client_cpus=args.client_cpus, timeout=6 * 3600)
        if profiler is not None:
            profiler.join()
        row = per_round(out)[0]
        bare, bare_users = bare_local_training(data, {**default_run_config(), **overrides}, args.bare_sample)
        entry = {
            "clients": row["train_nodes"],
            "round_train_seconds": row["train_seconds"],
            "aggregate_seconds": row["aggregate_seconds"],
            "bare_torch_seconds": bare,
            "bare_torch_users_timed": bare_users,
            "overhead_ratio": row["train_seconds"] / bare,
            "messaging_seconds": row["train_seconds"] - row["aggregate_seconds"] - bare,
            "peak_rss_mb_server": result["peak_rss_mb"],
        }
        report["beauty-round"] = entry
        report_path.write_text(json.dumps(report, indent=2) + "\n")
        print(
            f"\namazon-beauty, one round, {entry['clients']} clients: {entry['round_train_seconds']:.0f} s "
            f"(bare torch {bare:.0f} s, aggregation {entry['aggregate_seconds']:.0f} s, "
            f"messaging and the rest {entry['messaging_seconds']:.0f} s) -> overhead ratio {entry['overhead_ratio']:.2f}"
        )
    print(f"\nwritten: {args.out / 'bench_federated.json'}")


if __name__ == "__main__":
    main()
