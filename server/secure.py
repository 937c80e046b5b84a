"""Secure aggregation: the server sees only the sum of a round's replies (Flower's SecAgg+).

With ``secure-aggregation = true`` each training and evaluation exchange runs Flower's
:class:`~flwr.server.workflow.SecAggPlusWorkflow` (Bell et al., "Secure Single-Server Aggregation
with (Poly)Logarithmic Overhead", CCS 2020) over the round's messages: four exchanges (keys,
encrypted key shares, masked vectors, unmasking) after which the server holds the weighted mean of
the replies and nothing of any single one, as long as fewer than the reconstruction threshold of a
node's neighbours collude with it. Nodes that drop out after sending their masked vector are
unmasked from their neighbours' shares.

The workflow speaks Flower's legacy ``FitIns``/``FitRes``; :class:`_RoundCapture` is the legacy
strategy it drives, holding this round's messages and catching the unmasked mean. The nodes'
side is :func:`lumosrec.client.secure.secure_aggregation_mod`.

* Training: a node masks its update (its model minus the received one) weighted by its example
  count; the server adds the unmasked weighted mean update to the global model and hands the
  result to the run's (linear) strategy as one reply, so FedAdam's or FedAvgM's server step
  applies as usual. Each value of a node's update is clipped to ``secure-aggregation-clipping``.
* Evaluation: the rank histograms are scaled by a power of two so that quantization is exact;
  their sum equals the plaintext sum bit for bit.

What the server still sees per node: the example count (the weight; ``hide-history-length``
rounds it), the training loss, and that the node took part. What it gives up: checking single
replies (:mod:`lumosrec.server.validation` sees only the round's mean), robust rules and
server-side DP clipping, which need each update.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import FitIns, FitRes, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from lumosrec.client.secure import NAMES_KEY, SCALE_KEY, SECURE_KEY, secure_metric_names
from lumosrec.core.errors import ConfigError
from lumosrec.server.validation import WEIGHT_KEY

log = logging.getLogger("lumos.server")

#: the modulus of SecAgg+'s masked sums (Flower's default and largest)
MODULUS = 2**32


def use_secure_aggregation(run: Mapping, linear: bool, sampled_nodes: int) -> bool:
    """Whether this run aggregates securely: ``secure-aggregation = true`` (a ConfigError when the
    run cannot), ``false``, or ``"auto"``: in a deployment whenever the run allows it (a warning
    says why not otherwise), never in a simulation, whose simulator holds every user's data anyway."""
    asked = run.get("secure-aggregation", "auto")
    refusal = secure_refusal(run, linear, sampled_nodes)
    if asked is True and refusal:
        raise ConfigError(refusal)
    if asked == "auto" and str(run["catalog"]):
        if refusal:
            log.warning("secure aggregation is off (secure-aggregation=auto): %s", refusal)
        return refusal is None
    return asked is True


def secure_refusal(run: Mapping, linear: bool, sampled_nodes: int) -> str | None:
    """Why this run cannot aggregate securely, or None when it can."""
    if not linear or float(run["dp-clipping-norm"]) > 0:
        return (
            f"secure-aggregation shows the server only a round's sum: strategy {run['strategy']}"
            f"{' with DP clipping' if float(run['dp-clipping-norm']) > 0 else ''} needs each update; "
            "use fedavg, fedprox, fedavgm, fedadam or fedyogi without dp-clipping-norm"
        )
    if str(run["aggregation-weights"]) != "examples":
        return (
            "secure-aggregation weighs replies by their examples (the nodes weigh their own updates): "
            "use aggregation-weights=examples"
        )
    if sampled_nodes < 3:
        return (
            f"secure-aggregation needs at least 3 nodes per round (this run samples {sampled_nodes}): "
            "with fewer, the sum is a node's own update"
        )
    if int(run["secure-aggregation-shares"]) < 3:
        return "secure-aggregation-shares must be at least 3"
    return None


def quantization_range(replies: int) -> int:
    """The largest power-of-two range whose sum over ``replies`` fits SecAgg+'s modulus (2**30 for
    3 replies, 2**20 for 2,236). Flower's default, 2**22, is coarse for small weights: a node masks
    its update times its examples over ``max_weight``, which in a deployment is a loose bound
    (100,000 examples), and at 2**22 the rounding noise then exceeds the update."""
    return MODULUS >> max(2, replies.bit_length())


class _Workflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, forgetting the nodes that left before sharing their keys.

    Flower 1.41 keeps every sampled node in the set it unmasks: a node that never answered the setup
    or the key sharing then counts as dropped after masking, and the unmasking asks its neighbours for
    shares of keys it never sent, which fails the whole round (an offline node the SuperLink still
    lists as online does exactly that). Nothing was masked with such a node, so the round goes on
    without it."""

    def setup_stage(self, grid, context, state) -> bool:
        return super().setup_stage(grid, context, state) and self._keep_responders(state)

    def share_keys_stage(self, grid, context, state) -> bool:
        return super().share_keys_stage(grid, context, state) and self._keep_responders(state)

    def _keep_responders(self, state) -> bool:
        kept = set(state.active_node_ids)
        state.sampled_node_ids = kept
        state.nid_to_neighbours = {nid: near & kept for nid, near in state.nid_to_neighbours.items() if nid in kept}
        return self._check_threshold(state)


class _RoundCapture(LegacyStrategy):
    """The legacy strategy SecAgg+'s workflow drives: it hands out this exchange's instructions
    and keeps the unmasked mean the workflow passes to ``aggregate_fit``."""

    def __init__(self, instructions: list[tuple[ClientProxy, FitIns]]) -> None:
        self.instructions = instructions
        self.mean: list[np.ndarray] | None = None
        self.results: list[FitRes] = []

    def configure_fit(self, server_round, parameters, client_manager):
        return self.instructions

    def aggregate_fit(self, server_round, results, failures):
        self.results = [fit_res for _, fit_res in results]
        if self.results:
            self.mean = parameters_to_ndarrays(self.results[0].parameters)
        return None, {}

    # the workflow calls none of these: it runs one training exchange
    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def _secure_exchange(
    grid: Grid,
    context: Context,
    messages: list[Message],
    run: Mapping,
    server_round: int,
    extra: dict,
    max_weight: float,
    clipping_range: float,
) -> _RoundCapture:
    """Run SecAgg+ over ``messages`` (each node's content: ``arrays`` and ``config``)."""
    instructions = []
    for message in messages:
        arrays = message.content["arrays"]
        config = {**dict(message.content["config"]), **extra, NAMES_KEY: list(arrays.keys())}
        parameters = compat.arrayrecord_to_parameters(arrays, keep_input=True)
        proxy = GridClientProxy(message.metadata.dst_node_id, grid, context.run_id)
        instructions.append((proxy, FitIns(parameters, config)))
    capture = _RoundCapture(instructions)
    state = RecordDict(
        {
            MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
            MAIN_PARAMS_RECORD: ArrayRecord(),
        }
    )
    # the workflow's own context: its scratch records stay out of the server's state
    scratch = Context(context.run_id, context.node_id, context.node_config, state, context.run_config)
    shares = min(int(run["secure-aggregation-shares"]), len(messages))
    workflow = _Workflow(
        num_shares=1.0 if shares == len(messages) else shares,  # 1.0: every node is every node's neighbour
        reconstruction_threshold=float(run["secure-aggregation-threshold"]),
        max_weight=max_weight,
        clipping_range=clipping_range,
        quantization_range=quantization_range(len(messages)),
        modulus_range=MODULUS,
        timeout=float(run["round-timeout"]),
    )
    nodes = SimpleClientManager()  # the round's nodes, for the workflow's log
    for proxy, _ in instructions:
        nodes.register(proxy)
    try:
        workflow(grid, LegacyContext(scratch, strategy=capture, client_manager=nodes))
    except Exception as problem:  # a node's malformed share or vector breaks the sum, never the server
        log.warning("round %d: secure aggregation failed, the round's sum is lost: %r", server_round, problem)
        return _RoundCapture([])
    return capture


def secure_train(
    grid: Grid,
    context: Context,
    messages: list[Message],
    arrays: ArrayRecord,
    run: Mapping,
    server_round: int,
    max_examples: int,
) -> tuple[Message | None, int]:
    """One training exchange under SecAgg+ from the global model ``arrays``: (the round's mean as
    a single weighted reply for the strategy, or None when nothing was unmasked; the nodes whose
    masked update is in the sum)."""
    capture = _secure_exchange(
        grid,
        context,
        messages,
        run,
        server_round,
        {SECURE_KEY: "train"},
        max_weight=float(max_examples),
        clipping_range=float(run["secure-aggregation-clipping"]),
    )
    examples = sum(result.num_examples for result in capture.results)
    if capture.mean is None or examples == 0:
        return None, len(capture.results)
    updated = ArrayRecord(
        {
            name: Array((start.numpy() + change).astype(start.numpy().dtype))
            for (name, start), change in zip(arrays.items(), capture.mean, strict=True)
        }
    )
    loss = sum(float(r.metrics.get("train-loss", 0.0)) * r.num_examples for r in capture.results) / examples
    seen = sum(int(r.metrics.get("samples-seen", 0)) for r in capture.results)
    metrics = {"train-loss": loss, "num-examples": examples, "samples-seen": seen, WEIGHT_KEY: examples}
    content = RecordDict({"arrays": updated, "metrics": MetricRecord(metrics)})
    return Message(content, dst_node_id=0, message_type=MessageType.TRAIN), len(capture.results)


def histogram_scale(max_users: int) -> int:
    """The power of two at or above ``max_users``: histogram counts divided by it quantize exactly."""
    return 1 << max(0, math.ceil(math.log2(max(max_users, 1))))


def secure_evaluate(
    grid: Grid, context: Context, messages: list[Message], run: Mapping, server_round: int, max_users: int
) -> tuple[MetricRecord | None, int]:
    """One evaluation exchange under SecAgg+: (the summed rank histograms and user count, or None;
    the nodes whose histograms are in the sum)."""
    scale = histogram_scale(max_users)
    if scale > quantization_range(len(messages)) // 2:
        raise ConfigError(
            f"secure evaluation of {len(messages)} nodes of up to {max_users} users each does not fit SecAgg+'s "
            "32-bit sums: set max-reply-users lower or use more, smaller nodes"
        )
    # weight 1 of 1 and values in [0, 1] at a power-of-two scale: every count quantizes exactly
    capture = _secure_exchange(
        grid, context, messages, run, server_round, {SECURE_KEY: "evaluate", SCALE_KEY: scale}, 1.0, 1.0
    )
    if capture.mean is None:
        return None, 0
    nodes = len(capture.results)
    sums = [np.rint(mean * nodes * scale).astype(np.int64) for mean in capture.mean]
    metrics: dict[str, int | list[int]] = {}
    for name, total in zip(secure_metric_names(), sums, strict=True):
        metrics[name] = int(total[0]) if name == "num-examples" else total.tolist()
    return MetricRecord(metrics), nodes
