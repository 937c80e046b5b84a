"""Secure aggregation's round time: Flower's SecAgg+ against plain replies on a loopback deployment.

Issue 21. The hardened topology on 127.0.0.1 (:class:`~lumosrec.launch.deployment.LoopbackDeployment`:
TLS SuperLink, Fleet gateway, registered SuperNodes with their ClientApp executors) runs the same
federation twice per (dataset, node count), plainly and with ``secure-aggregation = true``, and
reports the median training and evaluation time per round. The protocol's cost grows with the
model (every node masks its whole update once per neighbour) and with the nodes (the neighbours),
not with the users, so each dataset is a fixed sample of ``--users`` users over its whole catalog::

    python experiments/bench_secure.py --data-root ../shared/data --datasets ml-100k amazon-beauty --nodes 3 5

writes ``docs/results/secure_aggregation/report.md`` and ``secure_aggregation.json``. Every
process of the deployment shares this machine's cores: the numbers are a loopback's, without
network latency, which adds four round trips per exchange under SecAgg+ against one.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from lumosrec.core.data import load_data
from lumosrec.core.dataset import sample_users
from lumosrec.core.errors import LumosError
from lumosrec.core.results import environment, source_revision, write_json
from lumosrec.core.synthetic import write_folder
from lumosrec.launch.app import APP_DIR, default_run_config
from lumosrec.launch.deployment import LoopbackDeployment, split_nodes
from lumosrec.launch.inprocess import run_in_process
from lumosrec.launch.supervise import RunFollower
from lumosrec.models.factory import build_model

REPORT_DIR = Path("docs/results/secure_aggregation")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, required=True, help="folder holding the datasets")
    parser.add_argument("--datasets", nargs="+", default=["ml-100k", "amazon-beauty"])
    parser.add_argument("--users", type=int, default=300, help="users sampled per dataset (seed 0), whole catalog")
    parser.add_argument("--nodes", type=int, nargs="+", default=[3, 5], help="SuperNodes per deployment (3 or more)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES))
    parser.add_argument("--out", type=Path, default=REPORT_DIR, help="where report.md and the JSON go")
    return parser.parse_args(argv)


def _settings(nodes: int, secure: bool, out: Path, args: argparse.Namespace) -> dict:
    return {
        **default_run_config(),
        "out-dir": str(out),
        "num-server-rounds": args.rounds,
        "fraction-train": 1.0,
        "min-nodes": nodes,
        "local-epochs": args.local_epochs,
        "eval-every": 1,
        "round-timeout": 600.0,
        "secure-aggregation": secure,
        "resume": False,
    }


def _row(dataset_name: str, data, nodes: int, engine: str, secure: bool, out: Path, result: dict) -> dict:
    history = json.loads((out / "metrics.json").read_text())
    row = {
        "dataset": dataset_name,
        "engine": engine,
        "nodes": nodes,
        "users": data.num_users,
        "items": data.num_items,
        "secure": secure,
        "rounds": len(history),
        "failures": result["failures"],
        "train_seconds": statistics.median(r["train_seconds"] for r in history),
        "eval_seconds": statistics.median(r["eval_seconds"] for r in history),
        "round_seconds": statistics.median(r["round_seconds"] for r in history),
        "test_hr20": result["test"]["unmasked"]["HR@20"],
        "source": source_revision(),  # rows of several invocations share the report
    }
    print(json.dumps(row), flush=True)
    return row


def run_deployment(dataset_name: str, data, nodes: int, args: argparse.Namespace, work: Path) -> list[dict]:
    """The plain and the secure run of one loopback deployment of ``nodes`` SuperNodes."""
    folders = split_nodes(data, nodes, work / "data")
    rows = []
    with LoopbackDeployment(folders, work / "p") as running:
        for secure in (False, True):
            out = work / ("secure" if secure else "plain")
            run_config = {**_settings(nodes, secure, out, args), "catalog": str(work / "data" / "catalog")}
            follower = RunFollower(out, rounds=args.rounds, total_users=data.num_users, progress=False)
            result = running.run(APP_DIR, run_config, follower, timeout=3600)
            rows.append(_row(dataset_name, data, nodes, "deployment", secure, out, result))
    return rows


def run_in_one_process(dataset_name: str, data, nodes: int, args: argparse.Namespace, work: Path) -> list[dict]:
    """The same federation with no messaging (:mod:`lumosrec.launch.inprocess`): the protocol's
    computation alone, without a process start per message."""
    folder = write_folder(data, work / "all")
    rows = []
    for secure in (False, True):
        out = work / ("inprocess-secure" if secure else "inprocess-plain")
        run_config = {
            **_settings(nodes, secure, out, args),
            "data": str(folder),
            "users-per-client": math.ceil(data.num_users / nodes),
        }
        result = run_in_process(run_config)
        rows.append(_row(dataset_name, data, nodes, "in-process", secure, out, result))
    return rows


ENGINES = {"deployment": run_deployment, "in-process": run_in_one_process}


def model_values(num_items: int) -> int:
    """The values a node masks: its model's (the default sizes)."""
    model = build_model("sasrec", num_items, hidden_size=int(default_run_config()["hidden-size"]))
    return sum(p.numel() for p in model.parameters())


def report(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "# Secure aggregation (SecAgg+) against plain replies: round time on a loopback deployment",
        "",
        "`python experiments/bench_secure.py " + " ".join(sys.argv[1:]) + "` (rows of other datasets or node "
        "counts: earlier invocations with the same settings)",
        "",
        f"{args.rounds} rounds, every node trains ({args.local_epochs} local epoch) and evaluates every round; "
        f"{args.users} users sampled per dataset (seed 0) over its whole catalog; median seconds per round. "
        "Every process (SuperLink, gateway, SuperNodes, executors) shares this machine's cores.",
        "",
        "| dataset | items | values masked per node | nodes | engine | train s (plain) | train s (SecAgg+) | x | "
        "evaluate s (plain) | evaluate s (SecAgg+) | x | test HR@20 plain / SecAgg+ | code |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    pairs: dict[tuple[str, int, str], dict[bool, dict]] = {}
    for row in rows:
        pairs.setdefault((row["dataset"], row["nodes"], row.get("engine", "deployment")), {})[row["secure"]] = row
    for (dataset, nodes, engine), pair in sorted(pairs.items()):
        if len(pair) < 2:
            continue
        plain, secure = pair[False], pair[True]
        lines.append(
            f"| {dataset} | {plain['items']:,} | {plain['values']:,} | {nodes} | {engine} | "
            f"{plain['train_seconds']:.1f} | {secure['train_seconds']:.1f} | "
            f"{secure['train_seconds'] / plain['train_seconds']:.2f} | {plain['eval_seconds']:.1f} | "
            f"{secure['eval_seconds']:.1f} | {secure['eval_seconds'] / plain['eval_seconds']:.2f} | "
            f"{plain['test_hr20']:.4f} / {secure['test_hr20']:.4f} | {secure.get('source', '-')} |"
        )
    lines += [
        "",
        "*deployment*: the loopback topology, where Flower 1.41 starts a fresh ClientApp process for every message "
        "(process isolation): SecAgg+'s three extra exchanges per training and per evaluation each pay that start "
        "(Python and Flower; torch too before the ClientApp module stopped importing it, commit 889ab01). "
        "*code*: the commit measured ('-': measured before rows recorded it, all before 889ab01). *in-process*: the same federation in one process with no messaging, "
        "so the difference is the protocol's own computation (keys, shares, masks).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if min(args.nodes) < 3:
        print("bench_secure: secure aggregation needs at least 3 nodes (--nodes)", file=sys.stderr)
        return 2
    # pairs measured before (another dataset, node count or engine) stay in the report; those asked again are redone
    asked = {(d, n, e) for d in args.datasets for n in args.nodes for e in args.engines}
    rows = [
        row
        for row in _earlier_rows(args)
        if (row["dataset"], row["nodes"], row.get("engine", "deployment")) not in asked
    ]
    try:
        for name in args.datasets:
            full = load_data(str(args.data_root / name))
            data = full.subset(sample_users(full.num_users, min(args.users, full.num_users), 0))
            values = model_values(data.num_items)
            for nodes in args.nodes:
                for engine in args.engines:
                    # short paths: Flower puts sockets under its working folders
                    work = Path(tempfile.mkdtemp(prefix="lumos-sec-"))
                    try:
                        rows.extend({**row, "values": values} for row in ENGINES[engine](name, data, nodes, args, work))
                    finally:
                        shutil.rmtree(work, ignore_errors=True)
                    write(rows, args)  # each finished pair is kept, whatever happens to the next
    except LumosError as problem:
        print(f"bench_secure: {problem}", file=sys.stderr)
        return 1
    print(report(rows, args))
    return 0


def _earlier_rows(args: argparse.Namespace) -> list[dict]:
    path = args.out / "secure_aggregation.json"
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def write(rows: list[dict], args: argparse.Namespace) -> None:
    settings = {**vars(args), "data_root": str(args.data_root), "out": str(args.out)}
    write_json(args.out / "secure_aggregation.json", {"environment": environment(), "args": settings, "rows": rows})
    (args.out / "report.md").write_text(report(rows, args), encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
