"""Aggregation strategies chosen by name, all Flower's own implementations.

``strategy`` in the run config picks one of :data:`STRATEGIES`; a positive
``dp-clipping-norm`` wraps it in Flower's server-side fixed-clipping DP wrapper
(McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018).
Evaluation replies carry rank histograms, which are summed (never averaged) so that the
federated metrics equal the centralized ones exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from lumosrec.core.errors import ConfigError
from lumosrec.core.runconfig import cohort_size


def sum_metric_records(contents: list[RecordDict], weight_key: str) -> MetricRecord:
    """Sum every metric (scalars and integer histograms) over the replies."""
    total: dict[str, int | float | list[int]] = {}
    for content in contents:
        for key, value in content["metrics"].items():
            if isinstance(value, list):
                previous = total.get(key, [0] * len(value))
                total[key] = [a + b for a, b in zip(previous, value)]
            else:
                total[key] = total.get(key, 0) + value
    return MetricRecord(total)


def _common(run_config: Mapping) -> dict:
    return {
        # cohort nodes: every node gets the round's sampled users, the sampling is per user
        "fraction_train": 1.0 if cohort_size(run_config) else float(run_config["fraction-train"]),
        "fraction_evaluate": float(run_config["fraction-evaluate"]),
        "min_train_nodes": int(run_config["min-nodes"]),
        "min_evaluate_nodes": int(run_config["min-nodes"]),
        "min_available_nodes": int(run_config["min-nodes"]),
        "evaluate_metrics_aggr_fn": sum_metric_records,
    }


def _malicious(run_config: Mapping) -> dict:
    return {"num_malicious_nodes": int(run_config["num-malicious-nodes"])}


STRATEGIES: dict[str, Callable[[Mapping], Strategy]] = {
    "fedavg": lambda c: FedAvg(**_common(c)),
    "fedprox": lambda c: FedProx(**_common(c), proximal_mu=float(c["proximal-mu"])),
    "fedavgm": lambda c: FedAvgM(
        **_common(c), server_learning_rate=float(c["server-learning-rate"]), server_momentum=float(c["server-momentum"])
    ),
    "fedadam": lambda c: FedAdam(**_common(c), eta=float(c["server-learning-rate"])),
    "fedyogi": lambda c: FedYogi(**_common(c), eta=float(c["server-learning-rate"])),
    "fedmedian": lambda c: FedMedian(**_common(c)),
    "fedtrimmedavg": lambda c: FedTrimmedAvg(**_common(c), beta=float(c["trimmed-beta"])),
    "krum": lambda c: Krum(**_common(c), **_malicious(c)),
    "multikrum": lambda c: MultiKrum(**_common(c), **_malicious(c), num_nodes_to_select=int(c["krum-select"])),
    "bulyan": lambda c: Bulyan(**_common(c), **_malicious(c)),
}


#: strategies whose aggregation is a weighted average of the updates (plus a server step)
LINEAR = {"fedavg": FedAvg, "fedprox": FedProx, "fedavgm": FedAvgM, "fedadam": FedAdam, "fedyogi": FedYogi}


def cohort_refusal(run_config: Mapping) -> str | None:
    """Why the run cannot use cohort nodes, or None when it can.

    A cohort replies with the example-weighted mean of its users' models: exactly what a weighted
    average over users needs, but robust rules and DP clipping act on each user's update."""
    if not cohort_size(run_config):
        return None
    if int(run_config["users-per-client"]) != 1:
        return "cohort-size and users-per-client > 1 (silos) exclude each other: choose one"
    if str(run_config.get("catalog", "")):
        return "cohort nodes are a simulation mode; a deployment's nodes hold their own users"
    name = str(run_config["strategy"]).lower()
    if name not in LINEAR or float(run_config["dp-clipping-norm"]) > 0:
        return (
            f"strategy {name}{' with DP clipping' if float(run_config['dp-clipping-norm']) > 0 else ''} needs "
            f"each user's update, and a cohort sends its users' mean: use cohort-size=0 or one of "
            f"{', '.join(LINEAR)} without DP"
        )
    return None


def strategy_is_linear(strategy: Strategy) -> bool:
    """Aggregation is a weighted average of the updates (plus a server step), so updates may
    be pre-averaged in chunks without changing the result. DP wrappers and robust rules are not."""
    return type(strategy) in LINEAR.values()


def build_strategy(run_config: Mapping, num_train_nodes: int) -> Strategy:
    """The strategy named by ``run_config["strategy"]``, DP-wrapped when asked for."""
    name = str(run_config["strategy"]).lower()
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    strategy = STRATEGIES[name](run_config)
    clipping_norm = float(run_config["dp-clipping-norm"])
    if clipping_norm > 0:
        strategy = DifferentialPrivacyServerSideFixedClipping(
            strategy,
            noise_multiplier=float(run_config["dp-noise-multiplier"]),
            clipping_norm=clipping_norm,
            num_sampled_clients=num_train_nodes,
        )
    return strategy
