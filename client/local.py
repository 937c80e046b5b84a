"""Local training and full-ranking evaluation on a node's own users: what the ClientApp
(:mod:`lumosrec.client.client_app`) runs for a training or an evaluation message.

The local objective is the run's ``objective``, looked up in the registry of
:mod:`lumosrec.client.objectives` (SASRec's next-item loss, CL4SRec's random augmentation
contrast, LUMOS's tri-view contrast over the node's own LLM views): it builds the model and
prepares the node's inputs to its loss. Only the
shared backbone's arrays and scalar metrics (a loss, counts, and a histogram of target
ranks) leave the node; the interaction history stays in the node's data folder, the views
in its view cache, and client-private parameters (LUMOS's projection head) in
``context.state``.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from lumosrec.client.cohort import TABLE, CohortUpdate, train_batched, use_batched
from lumosrec.client.objectives import OBJECTIVES, Objective, objective_for
from lumosrec.client.privacy import (
    defend_item_rows,
    item_row_noise,
    local_dp_on,
    privatise_user_update,
    reported_examples,
)
from lumosrec.client.threats import training_data, update_factor
from lumosrec.core.batching import PrefixSamples
from lumosrec.core.data import NodeData, node_data
from lumosrec.core.evaluation import PROTOCOLS, STAGES, rank_counts
from lumosrec.core.runconfig import MODEL_KEYS, cohort_size
from lumosrec.core.training import pick_device, train_epochs
from lumosrec.models.sasrec import SASRec

STATE_KEY = "lumos-client"
#: the local optimizers a client can use (``client-optimizer``)
OPTIMIZERS = ("adam", "sgd")


def _node(context: Context) -> NodeData:
    data = node_data(context.run_config, context.node_config)
    if len(data.users) == 0:
        raise ValueError(
            f"node {context.node_config.get('partition-id')} holds no user: "
            "the federation has more SuperNodes than the dataset has users"
        )
    return data


@functools.lru_cache(maxsize=4)
def _cached_model(objective: str, settings: tuple, num_items: int) -> SASRec:
    # A Ray actor serves thousands of virtual clients: building (and randomly initialising)
    # the model once per process and overwriting its weights per message is much cheaper.
    return OBJECTIVES[objective].build_model(dict(settings), num_items)


def _device(run_config) -> torch.device:
    device = pick_device(str(run_config.get("device", "auto")))
    threads = int(run_config["client-threads"])
    if device.type == "cpu" and threads > 0:
        # In a simulation the engine, the ServerApp and the client actors share the cores; a
        # 2-thread torch whose threads spin-wait stalls whenever another process holds a core.
        torch.set_num_threads(threads)
    return device


def _received_model(
    received: dict[str, torch.Tensor], context: Context, num_items: int, device: torch.device, objective: Objective
) -> SASRec:
    """The ``received`` backbone inside ``objective``'s model (plain SASRec to evaluate)."""
    run = context.run_config
    keys = [*MODEL_KEYS, *objective.hyper_keys]
    model = _cached_model(objective.name, tuple(sorted((k, run[k]) for k in keys if k in run)), num_items)
    model.load_shared_state_dict(received)
    return model.to(device)


def _client_state(context: Context) -> ConfigRecord:
    """Per-node private bookkeeping that persists across rounds, never sent."""
    if STATE_KEY not in context.state.config_records:
        context.state.config_records[STATE_KEY] = ConfigRecord({"rounds-trained": 0})
    return context.state.config_records[STATE_KEY]


def _proximal_term(model: torch.nn.Module, mu: float):
    """FedProx's ``mu / 2 * ||w - w_global||^2`` around the received weights (Li et al., MLSys 2020)."""
    global_params = [p.detach().clone() for p in model.parameters()]

    def term() -> torch.Tensor:
        return 0.5 * mu * sum(((p - g) ** 2).sum() for p, g in zip(model.parameters(), global_params))

    return term


def local_optimizer(model: torch.nn.Module, run) -> torch.optim.Optimizer:
    """A fresh optimizer per round: optimizer state is never aggregated, and keeping it across
    rounds would tie it to weights the server has since replaced."""
    name, rate = str(run["client-optimizer"]), float(run["learning-rate"])
    if name == "sgd":
        # scales each step with the gradient: the tiny softmax gradients of items a user never
        # touched stay tiny, where Adam's first steps move every parameter by the full rate
        return torch.optim.SGD(model.parameters(), lr=rate, foreach=True)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=rate, foreach=True)
    raise ValueError(f"unknown client-optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def _stream(context: Context) -> int:
    """The node's random stream: its partition's number in a simulation (so that a run repeats
    whatever ids Flower gives its nodes; with one user per node, the user's number), its node id
    in a deployment."""
    if "partition-id" in context.node_config:
        return int(context.node_config["partition-id"]) + 1
    return int(context.node_id) % 2**32


def _round_rng(run, stream: int, config: ConfigRecord, *purpose: int) -> np.random.Generator:
    """The generator of ``stream`` (a node's or a user's) in this round: shuffling, draws, dropout
    seed; ``purpose`` names a stream apart from those (the item-row defence's noise: 1)."""
    return np.random.default_rng([int(run["seed"]), stream, int(config.get("server-round", 0)), *purpose])


def _defence_rng(run, stream: int, config: ConfigRecord) -> torch.Generator:
    """The generator of the item-row defence's noise: apart from the stream training draws from."""
    return torch.Generator().manual_seed(int(_round_rng(run, stream, config, 1).integers(2**63)))


def _defended_table(
    model: SASRec, received: dict[str, torch.Tensor], own_items: np.ndarray, context: Context, rng: torch.Generator
) -> None:
    """Replace ``model``'s item table by the received one plus the defended change (item-row defence)."""
    table = model.item_embedding.weight
    with torch.no_grad():
        start = received[TABLE].to(table.device)
        table.copy_(start + defend_item_rows(table - start, own_items, item_row_noise(context.run_config), rng))


def _scale_update(model: SASRec, received: dict[str, torch.Tensor], factor: float) -> None:
    """A simulated attacker's update: ``model``'s change from the received weights times ``factor``."""
    if factor == 1.0:
        return
    with torch.no_grad():
        for name, value in model.shared_state_dict().items():
            start = received[name].to(value.device)
            value.copy_(start + factor * (value - start))


def _training_metrics(loss: float, examples: int, seen: int, run) -> MetricRecord:
    """A training reply's metrics; under ``hide-history-length`` the counts are rounded up to a
    power of two (samples seen: that times the local epochs)."""
    reported = reported_examples(examples, run)
    if reported != examples:
        seen = reported * int(run["local-epochs"])
    return MetricRecord({"train-loss": loss, "num-examples": reported, "samples-seen": seen})


def _local_training(
    model: SASRec,
    objective: Objective,
    data: NodeData,
    context: Context,
    config: ConfigRecord,
    stream: int,
    owner: str = "",
) -> tuple[float, int, int]:
    """Train ``model`` (holding the received weights) on ``data``'s users for ``local-epochs``
    epochs with a fresh optimizer; returns (mean loss, examples, samples seen). ``stream`` seeds
    the shuffling, the objective's draws and dropout; ``owner`` names whose private parameters
    the objective restores and keeps ("" for the node's own)."""
    run = context.run_config
    rng = _round_rng(run, stream, config)
    torch.manual_seed(int(rng.integers(2**31)))
    loss_inputs = objective.prepare(model, data, context, rng, owner)
    samples = PrefixSamples(data.split.train, int(run["max-len"]))
    mu = float(config.get("proximal-mu", 0.0))
    loss, seen = train_epochs(
        model,
        local_optimizer(model, run),
        samples,
        int(run["local-epochs"]),
        int(run["batch-size"]),
        rng,
        next(model.parameters()).device,
        regularizer=_proximal_term(model, mu) if mu > 0 else None,
        max_grad_norm=float(run["max-grad-norm"]),
        loss_inputs=loss_inputs,
    )
    objective.keep_private(model, context, owner)
    return loss, len(samples), seen


def _train_cohort(
    model: SASRec,
    objective: Objective,
    data: NodeData,
    context: Context,
    config: ConfigRecord,
    received: dict[str, torch.Tensor],
) -> RecordDict:
    """Train each of the round's users that this cohort holds on its own, from the received
    weights, exactly as a one-user node would, and reply with their example-weighted mean:
    together (:mod:`lumosrec.client.cohort`) or one after the other (``cohort-engine``)."""
    run, chosen = context.run_config, set(int(user) for user in config["train-users"])
    drawn = [(position, user) for position, user in enumerate(data.users.tolist()) if user in chosen]
    trainable = [(position, user) for position, user in drawn if len(data.split.train[position]) > 1]
    sequences = [data.split.train[position] for position, _ in trainable]
    if use_batched(run, objective.batched_refusal(run), sequences):
        together = data.subset([position for position, _ in trainable])
        inputs = objective.batched_inputs(model, together, context)
        users = [user for _, user in trainable]
        update = _train_batched(model, context, config, users, sequences, inputs, data.dataset.num_users)
        objective.keep_batched_private(update.private, together, context)
    else:
        update = _train_loop(model, objective, data, context, config, received, drawn)
    if update.examples == 0:  # no user of this cohort was drawn (or none has a training sample)
        return RecordDict({"metrics": MetricRecord({"num-examples": 0})})
    metrics = {"train-loss": update.loss, "num-examples": update.examples, "samples-seen": update.seen}
    mean = {key: value.cpu() for key, value in update.mean.items()}
    return RecordDict({"arrays": ArrayRecord(mean), "metrics": MetricRecord(metrics)})


def _train_batched(
    model: SASRec,
    context: Context,
    config: ConfigRecord,
    users: list[int],
    sequences: list[np.ndarray],
    inputs: dict[str, object],
    num_users: int,
) -> CohortUpdate:
    run = context.run_config
    rngs = [_round_rng(run, user + 1, config) for user in users]
    # the draw that seeds a lone user's torch stream: both paths then shuffle alike, and a user's
    # first private head is the one its own node would draw
    seeds = [int(rng.integers(2**31)) for rng in rngs]
    # dropout masks: one stream per cohort and round
    torch.manual_seed(int(_round_rng(run, _stream(context), config).integers(2**31)))
    model.train()
    row_defence = None
    if item_row_noise(run) > 0:
        multiplier = item_row_noise(run)

        def row_defence(k: int, change: torch.Tensor) -> torch.Tensor:
            rng = _defence_rng(run, users[k] + 1, config)
            return defend_item_rows(change, np.unique(sequences[k]), multiplier, rng)

    return train_batched(
        model,
        sequences,
        rngs,
        int(run["local-epochs"]),
        int(run["batch-size"]),
        float(run["learning-rate"]),
        float(run["max-grad-norm"]),
        **inputs,
        head_seeds=seeds,
        weights=[reported_examples(len(sequence) - 1, run) for sequence in sequences],
        row_defence=row_defence,
        update_factors=[update_factor(run, user, num_users) for user in users],
    )


def _train_loop(
    model: SASRec,
    objective: Objective,
    data: NodeData,
    context: Context,
    config: ConfigRecord,
    received: dict[str, torch.Tensor],
    drawn: list[tuple[int, int]],
) -> CohortUpdate:
    run = context.run_config
    total: dict[str, torch.Tensor] = {}
    loss_sum, examples, seen = 0.0, 0, 0
    for position, user in drawn:
        model.load_shared_state_dict(received)
        alone = data.subset([position])
        loss, count, visited = _local_training(
            model, objective, alone, context, config, user + 1, str(data.dataset.user_ids[user])
        )
        if count == 0:
            continue
        # what this user's own node would send: a simulated attacker's update, the defences, the count it states
        _scale_update(model, received, update_factor(run, user, data.dataset.num_users))
        if item_row_noise(run) > 0:
            own = np.unique(alone.split.train[0])
            _defended_table(model, received, own, context, _defence_rng(run, user + 1, config))
        shared = {key: value.detach() for key, value in model.shared_state_dict().items()}
        if local_dp_on(run):
            privatise_user_update(shared, received, run)
        count = reported_examples(count, run)
        for key, value in shared.items():
            total[key] = total[key] + count * value if key in total else count * value.clone()
        loss_sum, examples, seen = loss_sum + loss * count, examples + count, seen + visited
    mean = {key: value / examples for key, value in total.items()}
    return CohortUpdate(mean, loss_sum / max(examples, 1), examples, seen)


def rank_histograms(content: RecordDict, context: Context) -> RecordDict:
    """Rank each user's validation and test item against all items with the received model.

    Integer histograms of target ranks below ``MAX_CUTOFF`` per stage and protocol; summed over
    nodes they give exactly the centralized metrics.
    """
    run = context.run_config
    data = _node(context)
    device = _device(run)
    received = content["arrays"].to_torch_state_dict()
    model = _received_model(received, context, data.num_items, device, OBJECTIVES["sasrec"])
    metrics: dict[str, int | list[int]] = {"num-examples": len(data.users)}
    for stage in STAGES:
        counts = rank_counts(model, data.split, stage, int(run["max-len"]), PROTOCOLS, device=device)
        for protocol, count in counts.items():
            metrics[f"{stage}-{protocol}-at-rank"] = count.at_rank.tolist()
    return RecordDict({"metrics": MetricRecord(metrics)})


def train_reply(content: RecordDict, context: Context) -> RecordDict:
    """Train the received global model on this node's users for ``local-epochs`` epochs: jointly
    (a silo, one user by default), or each of the round's drawn users on its own (a cohort);
    the reply's content (the trained backbone or the cohort's mean, and the metrics)."""
    config, run = content["config"], context.run_config
    data = training_data(_node(context), run)
    device = _device(run)
    objective = objective_for(run)
    received = content["arrays"].to_torch_state_dict()
    model = _received_model(received, context, data.num_items, device, objective)
    state = _client_state(context)
    if cohort_size(run):
        reply = _train_cohort(model, objective, data, context, config, received)
    else:
        loss, examples, seen = _local_training(model, objective, data, context, config, _stream(context))
        if len(data.users) == 1:  # a simulated attacker (threats are refused for silos)
            _scale_update(model, received, update_factor(run, int(data.users[0]), data.dataset.num_users))
        if item_row_noise(run) > 0 and examples:
            own = np.unique(np.concatenate(data.split.train))
            _defended_table(model, received, own, context, _defence_rng(run, _stream(context), config))
        metrics = _training_metrics(loss, examples, seen, run)
        reply = RecordDict({"arrays": ArrayRecord(model.shared_state_dict()), "metrics": metrics})
    state["rounds-trained"] = int(state["rounds-trained"]) + 1
    return reply
