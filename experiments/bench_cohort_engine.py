"""Benchmark: a cohort's users trained together (:mod:`lumosrec.client.cohort`) against the loop.

What a cohort node computes each round: every drawn user trains its own copy of the received
model (fresh SGD, gradient clipping), and the node replies with their example-weighted mean.
This times :func:`lumosrec.client.cohort.train_batched` (stacked transformer weights, low-rank
item table) against the loop (:func:`lumosrec.core.training.train_epochs` per user, what a
one-user client runs) on random cohorts of ``amazon-beauty`` and ``ml-100k`` users, without
Flower, checks that both give the same mean model (float64), and estimates each dataset's
compute floor (transformer and softmax FLOPs of a user-visit over a measured matmul rate).
The same on Beauty for LUMOS with every view term on (item-level and tri-view InfoNCE, as the
table's ablation base "all views, both levels"), over random 5-item views (what a view costs is
its length, not its items), and for CL4SRec (Fed-CL4SRec's local objective). The loop is also
timed with one encoder pass per prefix (``SASRec.encode_each_row``, the loop before 2026-12-05), against
its reading a user's prefixes off one pass::

    python experiments/bench_cohort_engine.py --data-root ../shared/data --out results/cohort_engine
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lumosrec.client.cohort import train_batched
from lumosrec.client.objectives import OBJECTIVES
from lumosrec.core.batching import PrefixSamples
from lumosrec.core.data import load_data
from lumosrec.core.evaluation import leave_one_out
from lumosrec.core.results import environment, peak_rss_mb, write_json
from lumosrec.core.training import train_epochs
from lumosrec.models.cl4srec import CL4SRec, CL4SRecConfig
from lumosrec.models.lumos import LUMOS, VIEW_NAMES, LUMOSConfig, UserViews
from lumosrec.models.sasrec import SASRec, SASRecConfig

if __package__ in (None, ""):  # run as a script: the ablation base's terms come from the sibling script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments.table_main import ALL_TERMS

VIEW_LENGTH = 5


def train_loop(
    model: SASRec,
    sequences,
    rngs,
    epochs: int,
    batch_size: int,
    lr: float,
    max_grad_norm: float,
    views: list[UserViews] | None = None,
    per_prefix: bool = False,
) -> dict[str, torch.Tensor]:
    """The baseline: each user trained alone from the same weights, as a one-user client does
    (``views[k]``: user ``k``'s LUMOS views); ``per_prefix``: as the loop did before 2026-12-05,
    one encoder pass per prefix instead of reading a user's prefixes off one pass."""
    initial, local = copy.deepcopy(model.state_dict()), copy.deepcopy(model)
    if per_prefix:
        local.encode = local.encode_each_row
    weights = np.array([len(s) - 1 for s in sequences], dtype=float)
    weights /= weights.sum()
    mean = {name: torch.zeros_like(value) for name, value in initial.items()}
    for user, (sequence, rng, weight) in enumerate(zip(sequences, rngs, weights)):
        local.load_state_dict(initial)
        optimizer = torch.optim.SGD(local.parameters(), lr=lr, foreach=True)
        train_epochs(
            local,
            optimizer,
            PrefixSamples([sequence], model.config.max_len),
            epochs,
            batch_size,
            rng,
            torch.device("cpu"),
            max_grad_norm=max_grad_norm,
            loss_inputs=({"views": views[user]} if views else {"rng": rng} if isinstance(model, CL4SRec) else None),
        )
        for name, value in local.state_dict().items():
            mean[name] += float(weight) * value
    return mean


def difference(cohort: dict, loop: dict, initial: dict) -> float:
    """Largest difference of the two means, relative to the largest change of that tensor."""
    worst = 0.0
    for name, value in loop.items():
        change = float((value - initial[name]).abs().max())
        if change > 0:
            worst = max(worst, float((cohort[name] - value).abs().max()) / change)
    return worst


def exactness(data_root: Path) -> dict:
    """Mean model of 8 ml-100k users, 2 epochs, batch 16 (several steps each), against the loop."""
    dataset = load_data(str(data_root / "ml-100k"))
    split = leave_one_out(dataset.sequences, dataset.num_items)
    sequences = [split.train[u][:60] for u in range(8)]
    found = {}
    for dtype in (torch.float64, torch.float32):
        torch.set_default_dtype(dtype)
        torch.manual_seed(0)
        model = SASRec(SASRecConfig(num_items=dataset.num_items, hidden_size=32, inner_size=64, dropout=0.0))
        initial = copy.deepcopy(model.state_dict())
        for clip in (1.0, 0.0):
            args = (2, 16, 0.5, clip)
            cohort = train_batched(model, sequences, [np.random.default_rng([1, u]) for u in range(8)], *args).mean
            loop = train_loop(model, sequences, [np.random.default_rng([1, u]) for u in range(8)], *args)
            found[f"{str(dtype).split('.')[-1]}, clip {clip}"] = difference(cohort, loop, initial)
    torch.set_default_dtype(torch.float32)
    return found


def matmul_gflops() -> float:
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    started, repeats = time.perf_counter(), 50
    for _ in range(repeats):
        a @ b
    return 2 * 512**3 * repeats / (time.perf_counter() - started) / 1e9


def compute_floor_ms(sequences: list[np.ndarray], config: SASRecConfig, epochs: int, gflops: float) -> float:
    """Forward and backward FLOPs of one user-visit (transformer and full softmax) over the matmul rate."""
    d, inner = config.hidden_size, config.inner_size
    per_token = 2 * config.num_layers * (3 * d * d + d * d + 2 * d * inner)  # multiply-adds x 2
    flops = 0.0
    for sequence in sequences:
        tokens = sum(min(end, config.max_len) for end in range(1, len(sequence)))
        flops += 3 * (tokens * per_token + (len(sequence) - 1) * 2 * d * (config.num_items + 1))
    return 1000 * epochs * flops / len(sequences) / (gflops * 1e9)


def random_views(sequences: list[np.ndarray], num_items: int) -> list[dict[str, list[int]]]:
    """Per user, three views of :data:`VIEW_LENGTH` random catalog items (timing only)."""
    rng = np.random.default_rng(0)
    return [{name: rng.integers(1, num_items + 1, VIEW_LENGTH).tolist() for name in VIEW_NAMES} for _ in sequences]


def timing(data_root: Path, dataset_name: str, users: int, loop_users: int, gflops: float, objective: str) -> dict:
    dataset = load_data(str(data_root / dataset_name))
    split = leave_one_out(dataset.sequences, dataset.num_items)
    torch.manual_seed(0)
    lumos = objective == "lumos-all-terms"
    if lumos:
        config = LUMOSConfig(num_items=dataset.num_items, **OBJECTIVES["lumos"].hyper(ALL_TERMS))
        model = LUMOS(config)
    elif objective == "cl4srec":
        config = CL4SRecConfig(num_items=dataset.num_items)
        model = CL4SRec(config)
    else:
        config = SASRecConfig(num_items=dataset.num_items)
        model = SASRec(config)
    chosen = np.random.default_rng(0).choice(dataset.num_users, users, replace=False)
    sequences = [split.train[u] for u in chosen]
    rngs = [np.random.default_rng([1, int(u)]) for u in chosen]
    batched_views, loop_views = None, None
    if lumos:
        views, recent = random_views(sequences, dataset.num_items), [s[-config.future_horizon :] for s in sequences]
        batched_views = UserViews(views, recent)
        loop_views = [UserViews([v], [r]) for v, r in zip(views, recent)]
    args = (3, 64, 0.5, 1.0)  # the app's defaults: 3 local epochs, batch 64, SGD 0.5, clipping 1.0
    started = time.perf_counter()
    model.train()
    train_batched(model, sequences, rngs, *args, views=batched_views)
    cohort_ms = 1000 * (time.perf_counter() - started) / users
    started = time.perf_counter()
    train_loop(model, sequences[:loop_users], rngs[:loop_users], *args, views=loop_views)
    loop_ms = 1000 * (time.perf_counter() - started) / loop_users
    started = time.perf_counter()
    train_loop(model, sequences[:loop_users], rngs[:loop_users], *args, views=loop_views, per_prefix=True)
    per_prefix_ms = 1000 * (time.perf_counter() - started) / loop_users
    return {
        "users": users,
        "loop_users": loop_users,
        "cohort_ms_per_user_visit": cohort_ms,
        "loop_ms_per_user_visit": loop_ms,
        "speedup": loop_ms / cohort_ms,
        "loop_per_prefix_ms_per_user_visit": per_prefix_ms,
        "one_pass_speedup_of_the_loop": per_prefix_ms / loop_ms,
        "compute_floor_ms_per_user_visit": compute_floor_ms(sequences, config, 3, gflops),
        "mean_training_items": float(np.mean([len(s) for s in sequences])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("results/cohort_engine"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {"exactness": exactness(args.data_root)}
    print("largest difference to the loop, relative to the update:", report["exactness"])
    gflops = matmul_gflops()
    report["matmul_gflops"] = gflops
    for name, users, loop_users, objective in (
        ("amazon-beauty", 256, 64, "sasrec"),
        ("ml-100k", 94, 16, "sasrec"),
        ("amazon-beauty", 256, 64, "lumos-all-terms"),
        ("amazon-beauty", 256, 64, "cl4srec"),
    ):
        key = name if objective == "sasrec" else f"{name} {objective}"
        report[key] = timing(args.data_root, name, users, loop_users, gflops, objective)
        print(key, {k: round(v, 2) if isinstance(v, float) else v for k, v in report[key].items()})
    report.update(peak_rss_mb=peak_rss_mb(), threads=args.threads, versions=environment())
    write_json(args.out / "bench_cohort_engine.json", report)
    print(f"written: {args.out / 'bench_cohort_engine.json'}")


if __name__ == "__main__":
    main()
