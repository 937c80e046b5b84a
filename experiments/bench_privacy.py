"""What an honest-but-curious server learns of a user's items from what the user's client sends.

Issue 21's leak benchmark, first part: the attacks, against the real ClientApp with one user per
client (what a deployment of phones is), no defence yet.

* **Row change** (``row-change``): the server ranks the item-embedding rows of one client's
  reply by how far they moved from the model it sent; the user's training items are the rows
  that move most (SGD: their rows get the full next-item and input gradients), or least
  (``row-change-least``; local Adam moves every other row by about the learning rate).
* **Round sum** (``round-sum``): the same ranking against the sum of a round's replies (the most a
  server learns under secure aggregation), scored for each user of the round.
* **Evaluation histogram** (``eval-histogram``): an evaluation reply of one user is a one-hot
  histogram, so it tells the rank of the user's held-out item whenever it is in the top 50.

Each attack is scored per user by precision and recall at the user's number of training items
and by the AUC of the row scores (the user's items against every other item), mean over users,
with a random guess as the floor. ``--models`` attacks a fresh model and, given ``DATASET=PATH``,
a trained one (a table run's ``model.pt``). Prints each row and writes ``report.md`` and
``privacy.json`` (a list of rows)::

    python experiments/bench_privacy.py --data-root ../shared/data --datasets ml-100k amazon-beauty \\
        --users 50 --trained ml-100k=results/table_budget/ml-100k/fedavg-sasrec/seed2024/model.pt
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from lumosrec.client.client_app import app as client_app
from lumosrec.client.objectives import OBJECTIVES
from lumosrec.client.privacy import local_dp_on
from lumosrec.core.data import load_data, node_data
from lumosrec.core.dataset import sample_users
from lumosrec.core.results import environment, write_json
from lumosrec.launch.app import default_run_config

#: histogram bins an evaluation reply carries (ranks 0..49)
HISTOGRAM_BINS = 50


def auc(scores: np.ndarray, members: np.ndarray) -> float:
    """The probability that a member scores above a non-member (ties count half): Mann-Whitney."""
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores, kind="stable")] = np.arange(1, len(scores) + 1)
    _, tie, count = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.bincount(tie, weights=ranks) / count)[tie]  # tied scores share their mean rank
    positives, negatives = int(members.sum()), int((~members).sum())
    return float((ranks[members].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def precision_at_members(scores: np.ndarray, members: np.ndarray) -> float:
    """Share of the user's items among the ``len(items)`` highest-scored rows (= recall there)."""
    count = int(members.sum())
    top = np.argpartition(-scores, count - 1)[:count]
    return float(members[top].mean())


def leak_scores(scores: np.ndarray, items: np.ndarray, num_items: int) -> dict[str, float]:
    """Precision/recall at the user's item count and AUC of ``scores`` over item rows 1..n."""
    members = np.zeros(num_items, dtype=bool)
    members[items - 1] = True
    return {"precision": precision_at_members(scores, members), "auc": auc(scores, members)}


def client_reply(kind: str, state: Mapping[str, torch.Tensor], run_config: Mapping, user: int, users: int) -> Message:
    """The real ClientApp's reply for ``user`` alone, as a one-user node of ``users`` nodes."""
    context = Context(
        run_id=1,
        node_id=1 + user,
        node_config={"partition-id": user, "num-partitions": users},
        state=RecordDict(),
        run_config=dict(run_config),
    )
    content = RecordDict({"arrays": ArrayRecord(dict(state)), "config": ConfigRecord({"server-round": 1})})
    message_type = MessageType.TRAIN if kind == "train" else MessageType.EVALUATE
    return client_app(Message(content, dst_node_id=1 + user, message_type=message_type), context)


def row_changes(sent: torch.Tensor, reply: Message) -> np.ndarray:
    """L2 change of each item row 1..n between the model sent and the one returned."""
    returned = reply.content["arrays"]["item_embedding.weight"].numpy()
    return np.linalg.norm(returned[1:] - sent[1:].numpy(), axis=1)


def exposed_ranks(reply: Message) -> dict[str, bool]:
    """Whether each stage's evaluation histogram pins the user's held-out item to one rank."""
    metrics = reply.content["metrics"]
    return {stage: bool(np.asarray(metrics[f"{stage}-unmasked-at-rank"]).sum() == 1) for stage in ("valid", "test")}


def defence_of(run_config: Mapping) -> str:
    """The row label of the defences ``run_config`` turns on."""
    if local_dp_on(run_config):
        return f"local DP (epsilon {run_config['local-dp-epsilon']} per reply, clip {run_config['local-dp-clipping-norm']})"
    return "none"


def attack(
    run_config: Mapping, model_name: str, state: Mapping[str, torch.Tensor], users: np.ndarray, round_size: int
) -> list[dict]:
    """Every attack's row for one dataset (``run_config["data"]``), one global model and the
    defences ``run_config`` turns on."""
    everyone = node_data(run_config, {"partition-id": 0, "num-partitions": 1})  # cached, as the clients' own
    dataset, split = everyone.dataset, everyone.split
    items = {user: np.unique(split.train[user]) for user in users.tolist()}
    sent = state["item_embedding.weight"]
    per_attack: dict[str, list[dict[str, float]]] = {"row-change": [], "row-change-least": [], "round-sum": []}
    exposed = {"valid": 0, "test": 0}
    changes, started = [], time.perf_counter()
    for user in users.tolist():
        change = row_changes(sent, client_reply("train", state, run_config, user, dataset.num_users))
        per_attack["row-change"].append(leak_scores(change, items[user], dataset.num_items))
        per_attack["row-change-least"].append(leak_scores(-change, items[user], dataset.num_items))
        changes.append(change)
        for stage, pinned in exposed_ranks(
            client_reply("evaluate", state, run_config, user, dataset.num_users)
        ).items():
            exposed[stage] += pinned
    # a round's replies summed: each user's items against the sum of its round's changes
    for start in range(0, len(changes), round_size):
        summed = np.sum(changes[start : start + round_size], axis=0)
        for user in users[start : start + round_size].tolist():
            per_attack["round-sum"].append(leak_scores(summed, items[user], dataset.num_items))
    seconds = time.perf_counter() - started
    rows = [
        {
            "dataset": dataset.name,
            "model": model_name,
            "defence": defence_of(run_config),
            "attack": name,
            "users": len(scores),
            "precision": statistics.fmean(s["precision"] for s in scores),
            "recall": statistics.fmean(s["precision"] for s in scores),  # at the user's item count
            "auc": statistics.fmean(s["auc"] for s in scores),
            "random_precision": statistics.fmean(len(held) / dataset.num_items for held in items.values()),
            "round_size": round_size if name == "round-sum" else 1,
        }
        for name, scores in per_attack.items()
    ]
    rows += [
        {
            "dataset": dataset.name,
            "model": model_name,
            "defence": defence_of(run_config),
            "attack": f"eval-histogram-{stage}",
            "users": len(users),
            "exposed_share": count / len(users),
        }
        for stage, count in exposed.items()
    ]
    for row in rows:
        row["seconds"] = seconds
    return rows


def report(rows: list[dict], command: str) -> str:
    """The leak table as markdown."""
    lines = [
        "# What the server learns of a user's items from its client's replies",
        "",
        "Issue 21's leak benchmark, first part: the attacks, and local DP as the first defence (its HR@20 "
        "cost not yet measured). Made by:",
        "",
        f"    {command}",
        "",
        "| dataset | model | defence | attack | users | precision = recall at the user's item count | AUC | random precision |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in (r for r in rows if "auc" in r):
        attack_name = row["attack"]
        if attack_name == "round-sum":
            attack_name += f" ({row['round_size']} replies)"
        lines.append(
            f"| {row['dataset']} | {row['model']} | {row['defence']} | {attack_name} | {row['users']} | "
            f"{row['precision']:.3f} | {row['auc']:.3f} | {row['random_precision']:.4f} |"
        )
    lines += [
        "",
        "| dataset | model | defence | attack | users | share whose held-out item's rank the reply pins |",
        "|---|---|---|---|---|---|",
    ]
    for row in (r for r in rows if "exposed_share" in r):
        lines.append(
            f"| {row['dataset']} | {row['model']} | {row['defence']} | {row['attack']} | {row['users']} | "
            f"{row['exposed_share']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--datasets", nargs="*", default=["ml-100k", "amazon-beauty"])
    parser.add_argument("--users", type=int, default=50, help="attacked users per dataset (a fixed random sample)")
    parser.add_argument("--round-size", type=int, default=10, help="replies summed per round for round-sum")
    parser.add_argument("--trained", nargs="*", default=[], help="DATASET=model.pt: also attack a trained model")
    parser.add_argument(
        "--local-dp", nargs="*", type=float, default=[], help="also attack under local DP at these per-reply epsilons"
    )
    parser.add_argument("--local-dp-clipping-norm", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/results/privacy"))
    args = parser.parse_args()
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # messages outside a Flower process
    trained = dict(entry.split("=", 1) for entry in args.trained)
    rows = []
    for name in args.datasets:
        path = str(args.data_root / name)
        dataset = load_data(path)
        users = sample_users(dataset.num_users, args.users, args.seed)
        torch.manual_seed(args.seed)
        fresh = OBJECTIVES["sasrec"].build_model(default_run_config(), dataset.num_items).state_dict()
        models = {"fresh": fresh}
        if name in trained:
            models["trained"] = torch.load(trained[name], map_location="cpu", weights_only=True)["state_dict"]
        defences = [{}] + [
            {"local-dp-epsilon": epsilon, "local-dp-clipping-norm": args.local_dp_clipping_norm}
            for epsilon in args.local_dp
        ]
        for (model_name, state), defence in itertools.product(models.items(), defences):
            found = attack({**default_run_config(), "data": path, **defence}, model_name, state, users, args.round_size)
            for row in found:
                print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
            rows += found
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(report(rows, "python experiments/bench_privacy.py " + " ".join(sys.argv[1:])))
    versions = environment()
    write_json(args.out / "privacy.json", [{**row, "versions": versions} for row in rows])


if __name__ == "__main__":
    main()
