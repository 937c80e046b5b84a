"""Checks on every client reply before it counts: the server trusts no node.

A reply that fails a check is a counted failure of its round, logged with the node and the
reason, and never reaches the strategy: a wrong shape or an extra key would crash Flower's
aggregation, a NaN would poison the global model, an inflated example count would outweigh
every honest node, and an inflated rank histogram would fake the reported metrics.

The checks take what the server itself knows: the global model's arrays (keys, shapes,
dtypes) and bounds on what one node can hold (:class:`ReplyLimits`, from the run's data in a
simulation, from ``max-reply-examples`` / ``max-reply-users`` in a deployment). The aggregation
weight is then set by the server (:func:`weigh`), never read from the client.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from lumosrec.client.privacy import hides_history_length
from lumosrec.core.data import partition_users, run_data
from lumosrec.core.errors import ConfigError
from lumosrec.core.evaluation import MAX_CUTOFF, REPLY_METRICS
from lumosrec.core.runconfig import cohort_size

#: the metrics of a training reply (the ClientApp's ``train``)
TRAIN_METRICS = frozenset({"train-loss", "num-examples", "samples-seen"})
#: the metrics of an evaluation reply (:data:`lumosrec.core.evaluation.REPLY_METRICS`)
EVALUATE_METRICS = frozenset(REPLY_METRICS)
#: the metric the strategies weigh by; written by the server (:func:`weigh`)
WEIGHT_KEY = "aggregation-weight"
#: how replies are weighed: by their examples (FedAvg), equally, or by their examples up to ``weight-cap``
WEIGHTINGS = ("examples", "equal", "capped")
#: bounds of a deployment whose server has only the catalog, when the run config leaves them at 0
DEPLOYMENT_MAX_EXAMPLES = 100_000
DEPLOYMENT_MAX_USERS = 10_000


@dataclass(frozen=True)
class ReplyLimits:
    """What a valid reply may contain."""

    arrays: Mapping[str, tuple[tuple[int, ...], str]]  # the global model's key -> (shape, dtype)
    max_examples: int  # training samples one reply may claim
    max_users: int  # users one evaluation reply may claim

    @classmethod
    def for_run(cls, run: Mapping, arrays: ArrayRecord, num_nodes: int) -> ReplyLimits:
        """The limits of this run: set in the run config, or (0) derived from what a node can hold:
        in a simulation the most training samples and users any node holds; in a deployment, whose
        server does not see the nodes' data, :data:`DEPLOYMENT_MAX_EXAMPLES` / ``_USERS``."""
        shapes = {key: (tuple(array.shape), str(array.dtype)) for key, array in arrays.items()}
        max_examples, max_users = int(run["max-reply-examples"]), int(run["max-reply-users"])
        if max_examples < 0 or max_users < 0:
            raise ConfigError("max-reply-examples and max-reply-users must be positive (or 0: derived from the data)")
        if str(run["catalog"]):
            derived_examples, derived_users = DEPLOYMENT_MAX_EXAMPLES, DEPLOYMENT_MAX_USERS
        else:
            derived_examples, derived_users = _largest_node(run, num_nodes)
            if hides_history_length(run):  # each user's count rounded up: less than doubled
                derived_examples *= 2
        return cls(shapes, max_examples or derived_examples, max_users or derived_users)


def _largest_node(run: Mapping, num_nodes: int) -> tuple[int, int]:
    """The most training samples (prefixes of the training sequence) and users one node holds
    when the run's users are cut into ``num_nodes`` groups, as the nodes cut them."""
    dataset = run_data(run)
    # a user's training sequence leaves out the validation and test items; each of its items
    # but the first is the target of one sample
    samples = np.maximum(np.array([len(sequence) for sequence in dataset.sequences]) - 3, 0)
    groups = [partition_users(dataset.num_users, node, num_nodes) for node in range(num_nodes)]
    return max(int(samples[group].sum()) for group in groups), max(len(group) for group in groups)


def _count(metrics: MetricRecord, limit: int, allow_zero: bool) -> int:
    value = metrics["num-examples"]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"num-examples is {value!r}, not an integer")
    if value < (0 if allow_zero else 1) or value > limit:
        raise ValueError(f"num-examples {value} is outside 1..{limit}")
    return value


def _records(content: RecordDict, expected: Mapping[str, type]) -> None:
    found = {key: type(record) for key, record in content.items()}
    if found != dict(expected):
        raise ValueError(
            f"records {', '.join(sorted(found)) or 'none'}; expected {' and '.join(sorted(expected))} only"
        )


def check_train_reply(content: RecordDict, limits: ReplyLimits) -> int:
    """The reply's example count if it is a valid training reply (0: a cohort none of whose users
    was drawn, which sends no update); a ValueError saying what is wrong otherwise."""
    alone = content["metrics"] if set(content) == {"metrics"} else None
    if isinstance(alone, MetricRecord) and dict(alone) == {"num-examples": 0}:
        return 0
    _records(content, {"arrays": ArrayRecord, "metrics": MetricRecord})
    arrays, metrics = content["arrays"], content["metrics"]
    if set(metrics) != TRAIN_METRICS:
        raise ValueError(f"metrics {sorted(metrics)}, expected {sorted(TRAIN_METRICS)}")
    examples = _count(metrics, limits.max_examples, allow_zero=False)
    for key in ("train-loss", "samples-seen"):
        value = metrics[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{key} is {value!r}, not a finite non-negative number")
    if set(arrays) != set(limits.arrays):
        extra, missing = sorted(set(arrays) - set(limits.arrays)), sorted(set(limits.arrays) - set(arrays))
        raise ValueError(f"arrays differ from the global model's (extra {extra}, missing {missing})")
    for key, (shape, dtype) in limits.arrays.items():
        try:
            value = arrays[key].numpy()  # np.load without pickles: malformed bytes raise ValueError
        except Exception as error:
            raise ValueError(f"array {key} cannot be read: {error}") from None
        if value.shape != shape or str(value.dtype) != dtype:
            raise ValueError(f"array {key} is {value.dtype}{list(value.shape)}, expected {dtype}{list(shape)}")
        if not np.isfinite(value).all():
            raise ValueError(f"array {key} holds NaN or Inf")
    return examples


def as_global_model(aggregate: ArrayRecord, limits: ReplyLimits) -> ArrayRecord:
    """``aggregate`` in the global model's dtypes (Flower's FedAdam and FedYogi return float64); a
    ValueError when its keys or shapes differ or a value is not finite in those dtypes."""
    arrays = {}
    if set(aggregate) != set(limits.arrays):
        raise ValueError("the aggregate's arrays differ from the global model's")
    for key, (shape, dtype) in limits.arrays.items():
        with np.errstate(over="ignore"):  # an overflow is what the finiteness check reports
            value = aggregate[key].numpy().astype(dtype, copy=False)
        if value.shape != shape:
            raise ValueError(f"the aggregate's {key} is {list(value.shape)}, expected {list(shape)}")
        if not np.isfinite(value).all():
            raise ValueError(f"the aggregate's {key} holds NaN or Inf")
        arrays[key] = Array(value)
    return ArrayRecord(arrays)


def check_evaluate_reply(content: RecordDict, limits: ReplyLimits) -> int:
    """The reply's user count if ``content`` is a valid evaluation reply; a ValueError saying what
    is wrong otherwise: a user count within bounds and, per stage and protocol, a histogram of
    :data:`MAX_CUTOFF` non-negative counts adding up to at most that many users."""
    _records(content, {"metrics": MetricRecord})
    metrics = content["metrics"]
    if set(metrics) != EVALUATE_METRICS:
        raise ValueError(f"metrics {sorted(metrics)}, expected {sorted(EVALUATE_METRICS)}")
    users = _count(metrics, limits.max_users, allow_zero=False)
    for key in sorted(EVALUATE_METRICS - {"num-examples"}):
        counts = metrics[key]
        if not isinstance(counts, list) or len(counts) != MAX_CUTOFF:
            raise ValueError(f"{key} is not a list of {MAX_CUTOFF} counts")
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts) or sum(counts) > users:
            raise ValueError(f"{key} is not {MAX_CUTOFF} non-negative integers adding up to at most {users} users")
    return users


def weighting(run: Mapping) -> str:
    """How this run weighs replies; DP runs weigh them equally, as the noise calibration assumes."""
    name = str(run["aggregation-weights"])
    if name not in WEIGHTINGS:
        raise ConfigError(f"aggregation-weights={name!r}: choose one of {', '.join(WEIGHTINGS)}")
    if name == "capped" and int(run["weight-cap"]) < 1:
        raise ConfigError("aggregation-weights=capped needs weight-cap >= 1 (examples)")
    if float(run["dp-clipping-norm"]) > 0:
        if name == "capped":
            raise ConfigError(
                "DP runs weigh replies equally (the noise is calibrated for it): use aggregation-weights=equal"
            )
        return "equal"
    if name != "examples" and cohort_size(run):
        # a cohort replies with its users' example-weighted mean: only example weights undo it exactly
        raise ConfigError(f"aggregation-weights={name} weighs each user's update; use cohort-size=0 for it")
    return name


def weigh(content: RecordDict, examples: int, run: Mapping) -> RecordDict:
    """``content`` with the server's aggregation weight (:data:`WEIGHT_KEY`) for ``examples``."""
    weight = {"examples": examples, "equal": 1, "capped": min(examples, int(run["weight-cap"]))}[weighting(run)]
    return RecordDict(
        {"arrays": content["arrays"], "metrics": MetricRecord({**content["metrics"], WEIGHT_KEY: weight})}
    )
