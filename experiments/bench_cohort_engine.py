"""Prototype for issue 16: many users' independent local SGD from the same SASRec, in one process.

What a cohort node must compute each round: every sampled user trains its own copy of the
received model (fresh SGD, gradient clipping), and the node replies with their example-weighted
mean. This benchmark measures one way to do it without a Python loop over users and without a
dense item table per user, against that loop (:func:`lumosrec.core.training.train_epochs` per
user, as a one-user client runs it), in the same run:

* the transformer's weights are stacked per user (``(K, ...)``) and users of similar batch shape
  are padded into groups that run as one batched forward and backward (``torch.baddbmm``);
* the item table is never copied per user. A user's table after ``s`` steps is
  ``E0 + sum_t c_t Q_t^T H_t + S``: the softmax gradient of each step is ``Q^T H`` (rank at most the
  batch rows: ``Q`` = softmax - one-hot over all items, ``H`` = the batch's sequence encodings)
  and the input-side gradient ``S`` touches only the user's own items, kept as a small exact
  table. Logits, the gradient into the encoder and the clipping norm (through ``Q Q^T`` and
  ``H H^T``) come out of these factors; the cohort's mean table is one matrix product at the end.

It checks the mean model against the loop (float64: exact to rounding; float32: the loop's own
rounding), times both on a random cohort of ``amazon-beauty`` and ``ml-100k`` users, and estimates
each dataset's compute floor (transformer FLOPs of a user-visit over a measured matmul rate)::

    python experiments/bench_cohort_engine.py --data-root ../shared/data --out docs/results/cohort_engine_prototype

Not in the product yet: no dropout equivalence (the streams differ), SGD only (Adam's
per-element steps make the table update dense), SASRec's objective only.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lumosrec.core.batching import PrefixSamples
from lumosrec.core.data import load_data
from lumosrec.core.evaluation import leave_one_out
from lumosrec.core.results import environment, peak_rss_mb, write_json
from lumosrec.core.training import train_epochs
from lumosrec.models.sasrec import SASRec, SASRecConfig

TABLE = "item_embedding.weight"


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


def _norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=eps) * weight.unsqueeze(1) + bias.unsqueeze(1)


def encode(p: dict, config: SASRecConfig, emb: torch.Tensor, lengths: torch.Tensor, training: bool) -> torch.Tensor:
    """SASRec's encoder with per-user weights: ``emb`` (G, B, L, d) input embeddings -> (G, B, d)."""
    groups, rows, length, width = emb.shape
    drop, eps = config.dropout if training else 0.0, config.layer_norm_eps
    hidden = (emb + p["position_embedding.weight"][:, None, :length]).reshape(groups, rows * length, width)
    hidden = F.dropout(_norm(hidden, p["input_norm.weight"], p["input_norm.bias"], eps), drop, training)
    for layer in range(config.num_layers):
        w = {
            name: p[f"layers.{layer}.{name}"]
            for name in (
                "qkv.weight",
                "qkv.bias",
                "out.weight",
                "out.bias",
                "inner.weight",
                "inner.bias",
                "outer.weight",
                "outer.bias",
                "attention_norm.weight",
                "attention_norm.bias",
                "ffn_norm.weight",
                "ffn_norm.bias",
            )
        }
        qkv = _linear(hidden, w["qkv.weight"], w["qkv.bias"])
        q, k, v = qkv.view(groups * rows, length, 3, config.num_heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        attended = attended.transpose(1, 2).reshape(groups, rows * length, width)
        out = F.dropout(_linear(attended, w["out.weight"], w["out.bias"]), drop, training)
        hidden = _norm(hidden + out, w["attention_norm.weight"], w["attention_norm.bias"], eps)
        inner = _linear(F.gelu(_linear(hidden, w["inner.weight"], w["inner.bias"])), w["outer.weight"], w["outer.bias"])
        hidden = _norm(hidden + F.dropout(inner, drop, training), w["ffn_norm.weight"], w["ffn_norm.bias"], eps)
    hidden = hidden.view(groups, rows, length, width)
    return hidden[torch.arange(groups)[:, None], torch.arange(rows)[None, :], (lengths - 1).clamp(min=0)]


def shape_groups(shapes: list[tuple[int, int, int]], slack: float = 1.5) -> list[list[int]]:
    """Users ``(user, rows, length)`` in groups, by length then rows; a group closes when padding
    it to its largest batch would cost more than ``slack`` times its real tokens."""
    groups, current, real = [], [], 0
    for user, rows, length in sorted(shapes, key=lambda shape: (shape[2], shape[1])):
        if current:
            widest = max(max(r for _, r, _ in current), rows)
            if (len(current) + 1) * widest * length > slack * (real + rows * length):
                groups.append([u for u, _, _ in current])
                current, real = [], 0
        current.append((user, rows, length))
        real += rows * length
    return [*groups, [u for u, _, _ in current]] if current else groups


@dataclass
class CohortState:
    """Every user's model during local training: stacked transformer weights, and the item table
    as the shared start ``table0`` plus low-rank softmax factors and exact own rows."""

    table0: torch.Tensor
    theta: dict[str, torch.Tensor]  # name -> (users, ...) weights
    own: list[np.ndarray]  # the only items a user ever inputs, sorted
    own_rows: list[torch.Tensor]  # their current rows, exact
    own_sparse: list[torch.Tensor]  # their input-side updates
    factor_q: list[torch.Tensor]  # c * Q of every step, preallocated (epochs x samples rows)
    factor_h: list[torch.Tensor]  # H of every step
    filled: list[int]  # rows of the factors used so far

    @classmethod
    def start(cls, model: SASRec, sequences: list[np.ndarray], plans: list[list[np.ndarray]]) -> CohortState:
        table0 = model.item_embedding.weight.detach()
        users, (items_total, width), dtype = len(sequences), table0.shape, table0.dtype
        own = [np.unique(s) for s in sequences]
        return cls(
            table0=table0,
            theta={
                name: p.detach().unsqueeze(0).repeat(users, *([1] * p.dim()))
                for name, p in model.named_parameters()
                if name != TABLE
            },
            own=own,
            own_rows=[table0[torch.from_numpy(items)].clone() for items in own],
            own_sparse=[torch.zeros(len(items), width, dtype=dtype) for items in own],
            factor_q=[torch.zeros(sum(map(len, plan)), items_total, dtype=dtype) for plan in plans],
            factor_h=[torch.zeros(sum(map(len, plan)), width, dtype=dtype) for plan in plans],
            filled=[0] * users,
        )

    def mean(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """The ``weights``-weighted mean of the users' models, as a state dict."""
        with torch.no_grad():
            stacked_q = torch.cat([w * q[:n] for w, q, n in zip(weights, self.factor_q, self.filled)])
            table = self.table0 + stacked_q.T @ torch.cat([h[:n] for h, n in zip(self.factor_h, self.filled)])
            for w, items, sparse in zip(weights, self.own, self.own_sparse):
                table.index_add_(0, torch.from_numpy(items), w * sparse)
            mean = {name: torch.einsum("k,k...->...", weights, stacked) for name, stacked in self.theta.items()}
        return {TABLE: table, **mean}


def train_cohort(
    model: SASRec,
    sequences: list[np.ndarray],
    rngs: list[np.random.Generator],
    epochs: int,
    batch_size: int,
    lr: float,
    max_grad_norm: float,
    training: bool = True,
) -> dict[str, torch.Tensor]:
    """The example-weighted mean of the users' models after local SGD, as a state dict."""
    samples = [PrefixSamples([s], model.config.max_len) for s in sequences]
    plans = [[b for _ in range(epochs) for b in smp.epoch(batch_size, rng)] for smp, rng in zip(samples, rngs)]
    state = CohortState.start(model, sequences, plans)
    for step in range(max(map(len, plans))):
        batches = {u: samples[u].batch(plans[u][step]) for u in range(len(sequences)) if step < len(plans[u])}
        for group in shape_groups([(u, len(b[2]), b[0].shape[1]) for u, b in batches.items()]):
            _train_group(state, group, batches, model.config, lr, max_grad_norm, training)
    weights = torch.tensor([float(len(s) - 1) for s in sequences], dtype=state.table0.dtype)
    return state.mean(weights / weights.sum())


def _train_group(
    state: CohortState,
    group: list[int],
    batches: dict,
    config: SASRecConfig,
    lr: float,
    max_grad_norm: float,
    training: bool,
) -> None:
    """One SGD step of a group of users whose batches are padded to one shape."""
    table0, own = state.table0, state.own
    size, dtype = len(group), table0.dtype
    rows = max(len(batches[u][2]) for u in group)
    length = max(batches[u][0].shape[1] for u in group)
    owned = max(len(own[u]) for u in group)
    local = torch.zeros(size, rows, length, dtype=torch.long)
    lengths = torch.ones(size, rows, dtype=torch.long)
    targets = torch.zeros(size, rows, dtype=torch.long)
    weight = torch.zeros(size, rows, dtype=dtype)
    own_items = torch.zeros(size, owned, dtype=torch.long)
    rows_now = torch.zeros(size, owned, table0.shape[1], dtype=dtype)
    sparse = torch.zeros_like(rows_now)
    for g, u in enumerate(group):
        items, n_lengths, n_targets, _ = batches[u]
        n = len(n_targets)
        local[g, :n, : items.shape[1]] = torch.from_numpy(np.searchsorted(own[u], items.numpy()))
        lengths[g, :n], targets[g, :n], weight[g, :n] = n_lengths, n_targets, 1.0 / n
        own_items[g, : len(own[u])] = torch.from_numpy(own[u])
        rows_now[g, : len(own[u])], sparse[g, : len(own[u])] = state.own_rows[u], state.own_sparse[u]
    local = local.clamp(max=owned - 1)  # padding positions never reach the last real position
    index = torch.tensor(group)
    p = {name: stacked[index].requires_grad_(True) for name, stacked in state.theta.items()}
    emb = rows_now[torch.arange(size)[:, None, None], local].requires_grad_(True)
    h = encode(p, config, emb, lengths, training)
    spread = own_items[:, None, :].expand(size, rows, owned)
    with torch.no_grad():
        logits = torch.matmul(h, table0.T)
        for g, u in enumerate(group):
            if state.filled[u]:
                logits[g] += (h[g] @ state.factor_h[u][: state.filled[u]].T) @ state.factor_q[u][: state.filled[u]]
        logits.scatter_add_(2, spread, torch.bmm(h, sparse.transpose(1, 2)))
        logits[:, :, 0] = -torch.inf
        q = torch.softmax(logits, -1)
        q[torch.arange(size)[:, None], torch.arange(rows)[None, :], targets] -= 1.0
        q *= weight[:, :, None]  # d(mean loss)/d logits; zero on padded rows
        q_own = q.gather(2, spread)
        grad_h = torch.matmul(q, table0) + torch.bmm(q_own, sparse)
        for g, u in enumerate(group):
            if state.filled[u]:
                grad_h[g] += (q[g] @ state.factor_q[u][: state.filled[u]].T) @ state.factor_h[u][: state.filled[u]]
    names = list(p)
    *grads, grad_emb = torch.autograd.grad(h, [p[name] for name in names] + [emb], grad_outputs=grad_h)
    with torch.no_grad():
        input_side = torch.zeros_like(sparse)
        input_side.scatter_add_(
            1, local.reshape(size, -1, 1).expand(-1, -1, sparse.shape[2]), grad_emb.reshape(size, -1, sparse.shape[2])
        )
        hd = h.detach()
        output_own = torch.bmm(q_own.transpose(1, 2), hd)  # the softmax gradient on the user's own rows
        square = sum(grad.pow(2).flatten(1).sum(1) for grad in grads)
        square = square + (torch.bmm(q, q.transpose(1, 2)) * torch.bmm(hd, hd.transpose(1, 2))).sum((1, 2))
        square = square + 2 * (output_own * input_side).sum((1, 2)) + input_side.pow(2).sum((1, 2))
        scale = (
            (max_grad_norm / (square.sqrt() + 1e-6)).clamp(max=1.0) if max_grad_norm > 0 else torch.ones_like(square)
        )
        for name, grad in zip(names, grads):
            state.theta[name][index] -= lr * scale.view(-1, *([1] * (grad.dim() - 1))) * grad
        step = (-lr * scale)[:, None, None]
        for g, u in enumerate(group):
            n, mine = len(batches[u][2]), len(own[u])
            state.own_rows[u] += (step[g] * (output_own[g] + input_side[g]))[:mine]
            state.own_sparse[u] += (step[g] * input_side[g])[:mine]
            state.factor_q[u][state.filled[u] : state.filled[u] + n] = step[g] * q[g, :n]
            state.factor_h[u][state.filled[u] : state.filled[u] + n] = hd[g, :n]
            state.filled[u] += n


def train_loop(
    model: SASRec, sequences, rngs, epochs: int, batch_size: int, lr: float, max_grad_norm: float
) -> dict[str, torch.Tensor]:
    """The baseline: each user trained alone from the same weights, as a one-user client does."""
    initial, local = copy.deepcopy(model.state_dict()), copy.deepcopy(model)
    weights = np.array([len(s) - 1 for s in sequences], dtype=float)
    weights /= weights.sum()
    mean = {name: torch.zeros_like(value) for name, value in initial.items()}
    for sequence, rng, weight in zip(sequences, rngs, weights):
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
            cohort = train_cohort(model, sequences, [np.random.default_rng([1, u]) for u in range(8)], *args)
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


def timing(data_root: Path, dataset_name: str, users: int, loop_users: int, gflops: float) -> dict:
    dataset = load_data(str(data_root / dataset_name))
    split = leave_one_out(dataset.sequences, dataset.num_items)
    config = SASRecConfig(num_items=dataset.num_items)
    torch.manual_seed(0)
    model = SASRec(config)
    chosen = np.random.default_rng(0).choice(dataset.num_users, users, replace=False)
    sequences = [split.train[u] for u in chosen]
    rngs = [np.random.default_rng([1, int(u)]) for u in chosen]
    args = (3, 64, 0.5, 1.0)  # the app's defaults: 3 local epochs, batch 64, SGD 0.5, clipping 1.0
    started = time.perf_counter()
    train_cohort(model, sequences, rngs, *args)
    cohort_ms = 1000 * (time.perf_counter() - started) / users
    started = time.perf_counter()
    train_loop(model, sequences[:loop_users], rngs[:loop_users], *args)
    loop_ms = 1000 * (time.perf_counter() - started) / loop_users
    return {
        "users": users,
        "loop_users": loop_users,
        "cohort_ms_per_user_visit": cohort_ms,
        "loop_ms_per_user_visit": loop_ms,
        "speedup": loop_ms / cohort_ms,
        "compute_floor_ms_per_user_visit": compute_floor_ms(sequences, config, 3, gflops),
        "mean_training_items": float(np.mean([len(s) for s in sequences])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("results/cohort_engine_prototype"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {"exactness": exactness(args.data_root)}
    print("largest difference to the loop, relative to the update:", report["exactness"])
    gflops = matmul_gflops()
    report["matmul_gflops"] = gflops
    for name, users, loop_users in (("amazon-beauty", 256, 64), ("ml-100k", 94, 16)):
        report[name] = timing(args.data_root, name, users, loop_users, gflops)
        print(name, {k: round(v, 2) if isinstance(v, float) else v for k, v in report[name].items()})
    report.update(peak_rss_mb=peak_rss_mb(), threads=args.threads, versions=environment())
    write_json(args.out / "bench_cohort_engine.json", report)
    print(f"written: {args.out / 'bench_cohort_engine.json'}")


if __name__ == "__main__":
    main()
