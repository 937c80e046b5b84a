"""What an honest-but-curious server learns of a user's items from what the user's client sends.

Issue 21's leak benchmark: the attacks against the real ClientApp with one user per client (what a
deployment of phones is), under each client-side defence (``client/privacy.py``).

* **Row change** (``row-change``): the server ranks the item-embedding rows of one client's
  reply by how far they moved from the model it sent; the user's training items are the rows
  that move most (SGD: their rows get the full next-item and input gradients), or least
  (``row-change-least``; local Adam moves every other row by about the learning rate).
* **Round sum** (``round-sum``): the same ranking against the sum of a round's replies (the most a
  server learns under secure aggregation), scored for each user of the round.
* **Shadow model** (``shadow``, ``shadow-round-sum``): a stronger server that holds the histories
  of other users (``--shadow-users``, disjoint from the attacked ones) runs their clients on the
  same model, learns from their replies what a member row looks like (a logistic regression on
  row features: the change's norm within the reply, its alignment with the received row and with
  the reply's main direction of change), and scores the attacked replies (or round sums) with it.
* **Linked replies** (``row-change-linked``): the server knows which replies come from the same
  node, and averages a user's replies over its rounds before ranking, so that a defence's
  independent noise shrinks (``--linked-replies``; the model is held fixed).
* **Popularity** (``popularity (no reply)``): no reply at all, the items ranked by how many other
  users hold them in training (what a server learns from aggregates over time): the floor a
  per-user AUC is read against, rather than 0.5.
* **History length** (``history-length``): the share of users whose reply states their exact
  training history length (``num-examples``).
* **Evaluation histogram** (``eval-histogram``): an evaluation reply of one user is a one-hot
  histogram, so it tells the rank of the user's held-out item whenever it is in the top 50.

Each attack is scored per user by precision and recall at the user's number of training items
and by the AUC of the row scores (the user's items against every other item), mean over users,
with a random guess as the floor. It attacks a fresh model and, given ``DATASET=PATH``, a trained
one (a table run's ``model.pt``). ``--cost DATASET/DEFENCE=RUN_DIR`` names a run of the same
method and budget with that defence (``none``: without any), whose test HR@20 the table reports
next to the attacks, with its cost against ``none``. Prints each row and writes ``report.md`` and
``privacy.json`` (a list of rows)::

    python experiments/bench_privacy.py --data-root ../shared/data --datasets ml-100k amazon-beauty \\
        --users 50 --trained ml-100k=results/table_budget/ml-100k/fedavg-sasrec/seed2024/model.pt \\
        --item-row-noise 5 --hide-history-length --local-dp 1.0
"""

from __future__ import annotations

import argparse
import itertools
import json
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
from lumosrec.client.cohort import TABLE, train_batched
from lumosrec.client.objectives import OBJECTIVES
from lumosrec.client.privacy import hides_history_length, item_row_noise, local_dp_on
from lumosrec.core.data import load_data, node_data
from lumosrec.core.dataset import sample_users
from lumosrec.core.errors import ConfigError
from lumosrec.core.results import environment, write_json
from lumosrec.core.runconfig import parse_run_config
from lumosrec.launch.app import default_run_config
from lumosrec.server.server_app import round_users

#: histogram bins an evaluation reply carries (ranks 0..49)
HISTOGRAM_BINS = 50
#: the reply's main directions of change whose projection the shadow attack looks at
MAIN_DIRECTIONS = 3


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


def client_reply(
    kind: str, state: Mapping[str, torch.Tensor], run_config: Mapping, user: int, users: int, server_round: int = 1
) -> Message:
    """The real ClientApp's reply for ``user`` alone, as a one-user node of ``users`` nodes."""
    context = Context(
        run_id=1,
        node_id=1 + user,
        node_config={"partition-id": user, "num-partitions": users},
        state=RecordDict(),
        run_config=dict(run_config),
    )
    content = RecordDict({"arrays": ArrayRecord(dict(state)), "config": ConfigRecord({"server-round": server_round})})
    message_type = MessageType.TRAIN if kind == "train" else MessageType.EVALUATE
    return client_app(Message(content, dst_node_id=1 + user, message_type=message_type), context)


def exposed_ranks(reply: Message) -> dict[str, bool]:
    """Whether each stage's evaluation histogram pins the user's held-out item to one rank."""
    metrics = reply.content["metrics"]
    return {stage: bool(np.asarray(metrics[f"{stage}-unmasked-at-rank"]).sum() == 1) for stage in ("valid", "test")}


def defence_of(run_config: Mapping) -> str:
    """The row label of the defences ``run_config`` turns on (``--cost`` names runs by it)."""
    found = []
    if local_dp_on(run_config):
        found.append(f"local-dp eps={run_config['local-dp-epsilon']} clip={run_config['local-dp-clipping-norm']}")
    if item_row_noise(run_config) > 0:
        found.append(f"item-row-noise {run_config['item-row-noise']:g}")
    if hides_history_length(run_config):
        found.append("hide-history-length")
    return " + ".join(found) or "none"


def row_features(change: np.ndarray, sent: np.ndarray) -> np.ndarray:
    """What the shadow attack sees of each item row of one reply (or round sum): the change's
    norm (log, standardised within the reply), its cosine with the received row, and its
    projection on the reply's main directions of change (log norm standardised, and as a share)."""
    norms = np.linalg.norm(change, axis=1) + 1e-12
    _, _, directions = np.linalg.svd(change - change.mean(axis=0), full_matrices=False)
    projected = np.linalg.norm(change @ directions[:MAIN_DIRECTIONS].T, axis=1) + 1e-12
    cosine = (change * sent).sum(axis=1) / (norms * (np.linalg.norm(sent, axis=1) + 1e-12))

    def standard(values: np.ndarray) -> np.ndarray:
        logs = np.log(values)
        return (logs - logs.mean()) / (logs.std() + 1e-12)

    base = np.stack([standard(norms), cosine, standard(projected), projected / norms], axis=1)
    return np.concatenate([base, base**2], axis=1)


def fit_logistic(features: np.ndarray, members: np.ndarray, steps: int = 500) -> np.ndarray:
    """Class-balanced logistic regression by gradient descent: weights (features + bias)."""
    x = np.concatenate([features, np.ones((len(features), 1))], axis=1)
    balance = np.where(members, 0.5 / members.mean(), 0.5 / (1 - members.mean()))
    weights = np.zeros(x.shape[1])
    for _ in range(steps):
        probability = 1 / (1 + np.exp(-np.clip(x @ weights, -30, 30)))
        weights -= 0.5 * x.T @ (balance * (probability - members)) / len(x)
    return weights


def shadow_scores(weights: np.ndarray, features: np.ndarray) -> np.ndarray:
    return features @ weights[:-1] + weights[-1]


def _replies(
    run_config: Mapping, state: Mapping[str, torch.Tensor], users: np.ndarray, num_users: int, server_round: int = 1
):
    """Each user's change of the item rows 1..n and the example count its reply states."""
    sent = state["item_embedding.weight"][1:].numpy()
    for user in users.tolist():
        reply = client_reply("train", state, run_config, user, num_users, server_round)
        yield (
            reply.content["arrays"]["item_embedding.weight"].numpy()[1:] - sent,
            reply.content["metrics"]["num-examples"],
        )


def _membership(items: np.ndarray, num_items: int) -> np.ndarray:
    members = np.zeros(num_items, dtype=bool)
    members[items - 1] = True
    return members


def attack(
    run_config: Mapping,
    model_name: str,
    state: Mapping[str, torch.Tensor],
    users: np.ndarray,
    round_size: int,
    shadow_users: np.ndarray | None = None,
    linked_replies: int = 1,
) -> list[dict]:
    """Every attack's row for one dataset (``run_config["data"]``), one global model and the
    defences ``run_config`` turns on; ``shadow_users`` (none: no shadow attack) are the users
    whose histories the shadow attacker holds. With ``linked_replies`` > 1 and a noising defence,
    also ``row-change-linked``: the server averages that many replies of the same node (from as
    many rounds; the model is held fixed here), so independent noise shrinks by its square root."""
    everyone = node_data(run_config, {"partition-id": 0, "num-partitions": 1})  # cached, as the clients' own
    dataset, split = everyone.dataset, everyone.split
    items = {user: np.unique(split.train[user]) for user in users.tolist()}
    per_attack: dict[str, list[dict[str, float]]] = {"row-change": [], "row-change-least": [], "round-sum": []}
    exposed = {"valid": 0, "test": 0, "length": 0}
    changes, started = [], time.perf_counter()
    for user, (change, stated) in zip(users.tolist(), _replies(run_config, state, users, dataset.num_users)):
        norms = np.linalg.norm(change, axis=1)
        per_attack["row-change"].append(leak_scores(norms, items[user], dataset.num_items))
        per_attack["row-change-least"].append(leak_scores(-norms, items[user], dataset.num_items))
        changes.append(change)
        exposed["length"] += stated == len(split.train[user]) - 1
        for stage, pinned in exposed_ranks(
            client_reply("evaluate", state, run_config, user, dataset.num_users)
        ).items():
            exposed[stage] += pinned
    rounds = [
        (np.sum(changes[i : i + round_size], axis=0), users[i : i + round_size])
        for i in range(0, len(changes), round_size)
    ]
    if defence_of(run_config) == "none":
        # the floor every AUC is read against: no reply at all, only the items' popularity among
        # the other users (what a server learns from aggregates over time)
        counts = np.bincount(np.concatenate(split.train), minlength=dataset.num_items + 1)[1:].astype(float)
        per_attack["popularity (no reply)"] = [
            # everyone else's counts: the user's own interactions are what the attack must not see
            leak_scores(
                counts - np.bincount(split.train[user] - 1, minlength=dataset.num_items), items[user], dataset.num_items
            )
            for user in users.tolist()
        ]
    # a round's replies summed: each user's items against the sum of its round's changes
    for summed, members in rounds:
        norms = np.linalg.norm(summed, axis=1)
        for user in members.tolist():
            per_attack["round-sum"].append(leak_scores(norms, items[user], dataset.num_items))
    if linked_replies > 1 and (item_row_noise(run_config) > 0 or local_dp_on(run_config)):
        linked = [change.copy() for change in changes]
        for server_round in range(2, linked_replies + 1):
            for total, (change, _) in zip(linked, _replies(run_config, state, users, dataset.num_users, server_round)):
                total += change
        per_attack["row-change-linked"] = [
            leak_scores(np.linalg.norm(total, axis=1), items[user], dataset.num_items)
            for user, total in zip(users.tolist(), linked)
        ]
    if shadow_users is not None and len(shadow_users):
        per_attack.update(
            _shadow_attack(
                run_config, state, shadow_users, split, dataset.num_items, changes, rounds, items, round_size
            )
        )
    seconds = time.perf_counter() - started
    defence, random_precision = (
        defence_of(run_config),
        statistics.fmean(len(held) / dataset.num_items for held in items.values()),
    )
    rows = [
        {
            "dataset": dataset.name,
            "model": model_name,
            "defence": defence,
            "attack": name,
            "users": len(scores),
            "precision": statistics.fmean(s["precision"] for s in scores),
            "recall": statistics.fmean(s["precision"] for s in scores),  # at the user's item count
            "auc": statistics.fmean(s["auc"] for s in scores),
            "random_precision": random_precision,
            "round_size": round_size if "round-sum" in name else 1,
            "replies": linked_replies if name.endswith("linked") else 1,
        }
        for name, scores in per_attack.items()
    ]
    rows += [
        {
            "dataset": dataset.name,
            "model": model_name,
            "defence": defence,
            "attack": "history-length" if stage == "length" else f"eval-histogram-{stage}",
            "users": len(users),
            "exposed_share": count / len(users),
        }
        for stage, count in exposed.items()
    ]
    for row in rows:
        row["seconds"] = seconds
    return rows


def real_round_sum(run_config: Mapping, state: Mapping[str, torch.Tensor], chunk: int = 400) -> dict:
    """What secure aggregation leaves the server at the real round size: a whole round's
    example-weighted mean update (``fraction-train`` of all users, drawn as a cohort run draws its
    first round), trained as the run's cohorts train them (batched SGD, no defence), and the
    row-change attack on it for every user of the round."""
    everyone = node_data(run_config, {"partition-id": 0, "num-partitions": 1})
    dataset, split = everyone.dataset, everyone.split
    users = [u for u in round_users(run_config, 1, dataset.num_users) if len(split.train[u]) > 1]
    model = OBJECTIVES["sasrec"].build_model(run_config, dataset.num_items)
    model.load_state_dict(dict(state))
    model.train()
    total, weight = torch.zeros_like(state[TABLE]), 0
    for start in range(0, len(users), chunk):
        part = users[start : start + chunk]
        rngs = [np.random.default_rng([int(run_config["seed"]), u + 1, 1]) for u in part]
        update = train_batched(
            model,
            [split.train[u] for u in part],
            rngs,
            int(run_config["local-epochs"]),
            int(run_config["batch-size"]),
            float(run_config["learning-rate"]),
            float(run_config["max-grad-norm"]),
        )
        total += update.examples * (update.mean[TABLE] - state[TABLE])
        weight += update.examples
    norms = np.linalg.norm((total / weight)[1:].numpy(), axis=1)
    scores = [leak_scores(norms, np.unique(split.train[u]), dataset.num_items) for u in users]
    return {
        "dataset": dataset.name,
        "defence": "secure aggregation (the round's sum only)",
        "attack": "round-sum",
        "users": len(scores),
        "precision": statistics.fmean(s["precision"] for s in scores),
        "recall": statistics.fmean(s["precision"] for s in scores),
        "auc": statistics.fmean(s["auc"] for s in scores),
        "random_precision": statistics.fmean(len(np.unique(split.train[u])) / dataset.num_items for u in users),
        "round_size": len(users),
        "replies": 1,
    }


def _shadow_attack(
    run_config: Mapping,
    state: Mapping[str, torch.Tensor],
    shadow_users: np.ndarray,
    split,
    num_items: int,
    changes: list[np.ndarray],
    rounds: list[tuple[np.ndarray, np.ndarray]],
    items: Mapping[int, np.ndarray],
    round_size: int,
) -> dict[str, list[dict[str, float]]]:
    """The shadow attack on single replies and on round sums, trained on ``shadow_users``' own."""
    sent = state["item_embedding.weight"][1:].numpy()
    shadow = [change for change, _ in _replies(run_config, state, shadow_users, len(split.train))]
    shadow_items = [np.unique(split.train[user]) for user in shadow_users.tolist()]
    single = fit_logistic(
        np.concatenate([row_features(change, sent) for change in shadow]),
        np.concatenate([_membership(held, num_items) for held in shadow_items]),
    )
    shadow_rounds = [
        (np.sum(shadow[i : i + round_size], axis=0), np.unique(np.concatenate(shadow_items[i : i + round_size])))
        for i in range(0, len(shadow), round_size)
    ]
    summed = fit_logistic(
        np.concatenate([row_features(total, sent) for total, _ in shadow_rounds]),
        np.concatenate([_membership(held, num_items) for _, held in shadow_rounds]),
    )
    found: dict[str, list[dict[str, float]]] = {"shadow": [], "shadow-round-sum": []}
    for user, change in zip(items, changes):
        found["shadow"].append(leak_scores(shadow_scores(single, row_features(change, sent)), items[user], num_items))
    for total, members in rounds:
        scores = shadow_scores(summed, row_features(total, sent))
        for user in members.tolist():
            found["shadow-round-sum"].append(leak_scores(scores, items[user], num_items))
    return found


def run_hr20(run_dir: Path) -> float:
    """A finished run's test HR@20 (unmasked, at its selected round)."""
    result = run_dir / "result.json"
    if not result.is_file():
        raise SystemExit(f"--cost: {run_dir} holds no result.json (not a finished run)")
    return float(json.loads(result.read_text())["test"]["unmasked"]["HR@20"])


def add_costs(rows: list[dict], costs: Mapping[tuple[str, str], Path]) -> None:
    """Each row's ``hr20`` (the test HR@20 of a run with its defence) and ``hr20_cost`` (its
    relative loss against the run without), where ``costs`` names those runs."""
    for row in rows:
        key, base = (row["dataset"], row["defence"]), (row["dataset"], "none")
        if key in costs:
            row["hr20"] = run_hr20(costs[key])
            row["hr20_cost"] = 1 - row["hr20"] / run_hr20(costs[base]) if base in costs else None


def _cost_cell(row: dict) -> str:
    if "hr20" not in row:
        return "not run"
    cost = row.get("hr20_cost")
    return f"{row['hr20']:.4f}" + ("" if cost is None else f" ({0.0 - cost:+.1%})")


def report(rows: list[dict], command: str) -> str:
    """The leak table as markdown."""
    lines = [
        "# What the server learns of a user's items from its client's replies",
        "",
        "Issue 21's leak benchmark: every attack under every client-side defence, and the test HR@20 a "
        "run with the defence reaches (its change against the same run without any defence, at the same "
        "budget: the runs the `--cost` lines name, each with its `config.json`). Made by:",
        "",
        f"    {command}",
        "",
        "| dataset | model | defence | attack | users | precision = recall at the user's item count | AUC "
        "| random precision | test HR@20 with the defence |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in (r for r in rows if "auc" in r):
        attack_name = row["attack"]
        if "round-sum" in attack_name:
            attack_name += f" ({row['round_size']} replies)"
        if attack_name.endswith("linked"):
            attack_name += f" ({row['replies']} replies of one node)"
        lines.append(
            f"| {row['dataset']} | {row['model']} | {row['defence']} | {attack_name} | {row['users']} | "
            f"{row['precision']:.3f} | {row['auc']:.3f} | {row['random_precision']:.4f} | {_cost_cell(row)} |"
        )
    lines += [
        "",
        "| dataset | model | defence | attack | users | share of users the replies expose |",
        "|---|---|---|---|---|---|",
    ]
    for row in (r for r in rows if "exposed_share" in r):
        lines.append(
            f"| {row['dataset']} | {row['model']} | {row['defence']} | {row['attack']} | {row['users']} | "
            f"{row['exposed_share']:.2f} |"
        )
    lines += [
        "",
        "`history-length`: the reply states the user's exact training history length. "
        "`eval-histogram-*`: it pins the rank of the user's held-out item.",
    ]
    return "\n".join(lines) + "\n"


#: every client-side defence off, whatever the run config's defaults
NO_DEFENCE = {"local-dp-epsilon": 0.0, "item-row-noise": 0.0, "hide-history-length": False}


def _defences(args: argparse.Namespace) -> list[dict]:
    """The run-config settings of every defence asked for, none first."""
    found = [{}]
    found += [
        {"local-dp-epsilon": epsilon, "local-dp-clipping-norm": args.local_dp_clipping_norm}
        for epsilon in args.local_dp
    ]
    hide = {"hide-history-length": True} if args.hide_history_length else {}
    if hide:
        found.append(hide)
    # with the length hidden too: what a deployment would turn on (one acts on arrays, one on counts)
    found += [{"item-row-noise": multiplier, **hide} for multiplier in args.item_row_noise]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--datasets", nargs="*", default=["ml-100k", "amazon-beauty"])
    parser.add_argument("--users", type=int, default=50, help="attacked users per dataset (a fixed random sample)")
    parser.add_argument(
        "--shadow-users", type=int, default=50, help="users the shadow attacker holds (0: no shadow attack)"
    )
    parser.add_argument("--round-size", type=int, default=10, help="replies summed per round for round-sum")
    parser.add_argument(
        "--linked-replies",
        type=int,
        default=7,
        help="replies of one node averaged (a user's rounds at the budget: 6.7)",
    )
    parser.add_argument("--trained", nargs="*", default=[], help="DATASET=model.pt: also attack a trained model")
    parser.add_argument("--run-config", default="", help='the clients\' run config over the defaults ("key=value ...")')
    parser.add_argument(
        "--local-dp", nargs="*", type=float, default=[], help="also attack under local DP at these per-reply epsilons"
    )
    parser.add_argument("--local-dp-clipping-norm", type=float, default=1.0)
    parser.add_argument(
        "--item-row-noise",
        nargs="*",
        type=float,
        default=[],
        help="also attack under the item-row defence at these multipliers",
    )
    parser.add_argument(
        "--hide-history-length",
        action="store_true",
        help="also attack replies with rounded counts, alone and with each --item-row-noise",
    )
    parser.add_argument(
        "--models",
        nargs="*",
        choices=("fresh", "trained"),
        default=["fresh", "trained"],
        help="global models to attack",
    )
    parser.add_argument(
        "--real-round", action="store_true", help="also the round-sum attack on a whole round of the trained model"
    )
    parser.add_argument(
        "--cost", nargs="*", default=[], help="DATASET/DEFENCE=RUN_DIR: a run's HR@20 with that defence"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/results/privacy"))
    parser.add_argument(
        "--report-only", action="store_true", help="attach --cost runs to the rows in --out/privacy.json and rewrite"
    )
    args = parser.parse_args()
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # messages outside a Flower process
    trained = dict(entry.split("=", 1) for entry in args.trained)
    # the run folder follows the last "=": defence labels hold some ("local-dp eps=1.0 clip=1.0")
    costs = {tuple(key.split("/", 1)): Path(value) for key, value in (entry.rsplit("=", 1) for entry in args.cost)}
    try:
        base = {**default_run_config(), **parse_run_config(args.run_config)}
    except ConfigError as error:
        raise SystemExit(f"--run-config: {error}") from None
    if args.report_only:
        saved = args.out / "privacy.json"
        if not saved.is_file():
            raise SystemExit(f"--report-only: no {saved} to report")
        rows = json.loads(saved.read_text())
        add_costs([row for row in rows if row["model"] == "trained"], costs)
        attacks = rows[0].get("command", "?") if rows else "?"
        costs_command = "python experiments/bench_privacy.py " + " ".join(sys.argv[1:])
        (args.out / "report.md").write_text(report(rows, f"{attacks}\n    {costs_command}"))
        write_json(saved, rows)
        return
    rows = []
    for name in args.datasets:
        path = str(args.data_root / name)
        if not Path(path).is_dir():
            raise SystemExit(f"no dataset folder {path}")
        dataset = load_data(path)
        users = sample_users(dataset.num_users, args.users, args.seed)
        rest = np.setdiff1d(np.arange(dataset.num_users), users)
        shadow = np.sort(
            np.random.default_rng(args.seed + 1).choice(rest, min(args.shadow_users, len(rest)), replace=False)
        )
        torch.manual_seed(args.seed)
        fresh = OBJECTIVES["sasrec"].build_model(base, dataset.num_items).state_dict()
        models = {"fresh": fresh} if "fresh" in args.models else {}
        if name in trained and "trained" in args.models:
            models["trained"] = torch.load(trained[name], map_location="cpu", weights_only=True)["state_dict"]
        for (model_name, state), defence in itertools.product(models.items(), _defences(args)):
            run = {**base, **NO_DEFENCE, "data": path, **defence}
            found = attack(run, model_name, state, users, args.round_size, shadow, args.linked_replies)
            if model_name == "trained" and not defence and args.real_round:
                found.append({"model": model_name, **real_round_sum(run, state)})
            if model_name == "trained":
                add_costs(found, costs)
            for row in found:
                print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
            rows += found
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python experiments/bench_privacy.py " + " ".join(sys.argv[1:])
    (args.out / "report.md").write_text(report(rows, command))
    versions = environment()
    write_json(args.out / "privacy.json", [{**row, "versions": versions, "command": command} for row in rows])


if __name__ == "__main__":
    main()
