"""Aggregation strategies chosen by name, all Flower's own implementations.

``strategy`` in the run config picks one of :data:`STRATEGIES`; a positive
``dp-clipping-norm`` wraps it in Flower's server-side fixed-clipping DP wrapper
(McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018).
Evaluation replies carry rank histograms, which are summed (never averaged) so that the
federated metrics equal the centralized ones exactly.
"""

from __future__ import annotations

import logging
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
from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from lumosrec.core.errors import ConfigError
from lumosrec.core.runconfig import cohort_size
from lumosrec.server.validation import WEIGHT_KEY, weighting

log = logging.getLogger("lumos.server")


def sum_metric_records(contents: list[RecordDict]) -> MetricRecord:
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
        "weighted_by_key": WEIGHT_KEY,  # set by the server from what it accepts, never the client's count
    }


#: the fewest replies each rule needs for ``f`` assumed malicious nodes: Krum's and MultiKrum's
#: guarantee (Blanchard et al. 2017, n >= 2f + 3) and Bulyan's (El Mhamdi et al. 2018, n >= 4f + 3,
#: which Flower enforces by aggregating nothing)
NEEDED_REPLIES: dict[str, Callable[[int], int]] = {
    "krum": lambda f: 2 * f + 3,
    "multikrum": lambda f: 2 * f + 3,
    "bulyan": lambda f: 4 * f + 3,
}


def sampled_train_nodes(run_config: Mapping, num_nodes: int) -> int:
    """How many nodes a round samples for training, as Flower's strategies count them."""
    fraction = 1.0 if cohort_size(run_config) else float(run_config["fraction-train"])
    return max(int(num_nodes * fraction), int(run_config["min-nodes"]))


def malicious_nodes(run_config: Mapping, num_nodes: int) -> int:
    """The malicious nodes a robust rule assumes: ``num-malicious-nodes``, or (-1) the most the rule
    tolerates among the round's sampled nodes; a ConfigError when the sample is too small for it."""
    name, sampled = str(run_config["strategy"]).lower(), sampled_train_nodes(run_config, num_nodes)
    needed, assumed = NEEDED_REPLIES[name], int(run_config["num-malicious-nodes"])
    if assumed < 0:
        assumed = max(0, next(f for f in range(sampled + 1) if needed(f + 1) > sampled))
    if needed(assumed) > sampled:
        raise ConfigError(
            f"{name} with {assumed} malicious node(s) needs at least {needed(assumed)} sampled nodes per round, "
            f"and this run samples {sampled} ({num_nodes} nodes x fraction-train, at least min-nodes): "
            "raise fraction-train or min-nodes, add nodes, or lower num-malicious-nodes"
        )
    return assumed


STRATEGIES: dict[str, Callable[[Mapping, int], Strategy]] = {
    "fedavg": lambda c, n: FedAvg(**_common(c)),
    "fedprox": lambda c, n: FedProx(**_common(c), proximal_mu=float(c["proximal-mu"])),
    "fedavgm": lambda c, n: FedAvgM(
        **_common(c), server_learning_rate=float(c["server-learning-rate"]), server_momentum=float(c["server-momentum"])
    ),
    "fedadam": lambda c, n: FedAdam(**_common(c), eta=float(c["server-learning-rate"])),
    "fedyogi": lambda c, n: FedYogi(**_common(c), eta=float(c["server-learning-rate"])),
    "fedmedian": lambda c, n: FedMedian(**_common(c)),
    "fedtrimmedavg": lambda c, n: FedTrimmedAvg(**_common(c), beta=float(c["trimmed-beta"])),
    "krum": lambda c, n: Krum(**_common(c), num_malicious_nodes=malicious_nodes(c, n)),
    "multikrum": lambda c, n: MultiKrum(
        **_common(c), num_malicious_nodes=malicious_nodes(c, n), num_nodes_to_select=int(c["krum-select"])
    ),
    "bulyan": lambda c, n: Bulyan(**_common(c), num_malicious_nodes=malicious_nodes(c, n)),
}


#: each strategy's own settings: they change the model, so a checkpoint records them
STRATEGY_KEYS: dict[str, tuple[str, ...]] = {
    "fedprox": ("proximal-mu",),
    "fedavgm": ("server-learning-rate", "server-momentum"),
    "fedadam": ("server-learning-rate",),
    "fedyogi": ("server-learning-rate",),
    "fedtrimmedavg": ("trimmed-beta",),
    "krum": ("num-malicious-nodes",),
    "multikrum": ("num-malicious-nodes", "krum-select"),
    "bulyan": ("num-malicious-nodes",),
}


def strategy_keys(run_config: Mapping) -> tuple[str, ...]:
    """The run-config keys of the run's strategy and weighting."""
    capped = ("weight-cap",) if str(run_config.get("aggregation-weights")) == "capped" else ()
    return STRATEGY_KEYS.get(str(run_config["strategy"]).lower(), ()) + capped


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


def build_strategy(run_config: Mapping, num_nodes: int) -> Strategy:
    """The strategy named by ``run_config["strategy"]`` for ``num_nodes`` nodes, DP-wrapped when
    asked for; with noise on a FedAvg-style rule the wrapper accounts the privacy spent (ε at
    ``dp-delta``) with Flower's RDP accountant."""
    name = str(run_config["strategy"]).lower()
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    weighting(run_config)  # a bad weighting is refused before any round
    strategy = STRATEGIES[name](run_config, num_nodes)
    clipping_norm = float(run_config["dp-clipping-norm"])
    if clipping_norm <= 0:
        return strategy
    noise = float(run_config["dp-noise-multiplier"])
    accountant = None
    if noise > 0 and type(strategy).aggregate_train is FedAvg.aggregate_train:
        accountant = RdpAccountant(
            PrivacyConfig(
                target_delta=float(run_config["dp-delta"]),
                population_size=num_nodes,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
            )
        )
    elif noise > 0:
        log.warning("the privacy spent is not accounted for %s: Flower's accountant covers FedAvg and FedProx", name)
    return DifferentialPrivacyServerSideFixedClipping(
        strategy,
        noise_multiplier=noise,
        clipping_norm=clipping_norm,
        num_sampled_clients=sampled_train_nodes(run_config, num_nodes),
        accountant=accountant,
    )


def privacy_spent(strategy: Strategy) -> dict[str, float] | None:
    """``{"epsilon", "delta"}`` spent so far by a DP run with an accountant, else None."""
    spent = strategy.privacy_spent() if isinstance(strategy, DifferentialPrivacyServerSideFixedClipping) else None
    return None if spent is None else {"epsilon": float(spent.epsilon), "delta": float(spent.delta)}
