"""The registry of local objectives: the one place the app looks an objective up.

Adding an objective: one module beside these (an :class:`~lumosrec.client.objectives.base.Objective`),
one entry in :data:`OBJECTIVES`, and its run-config keys with their defaults in
``[tool.flwr.app.config]`` of ``pyproject.toml``.
"""

from __future__ import annotations

from collections.abc import Mapping

from lumosrec.client.objectives.base import Objective
from lumosrec.client.objectives.cl4srec import CL4SRecObjective
from lumosrec.client.objectives.lumos import LUMOSObjective
from lumosrec.client.objectives.sasrec import SASRecObjective
from lumosrec.core.errors import ConfigError

#: run-config value of ``objective`` -> the objective
OBJECTIVES: dict[str, Objective] = {
    objective.name: objective for objective in (SASRecObjective(), CL4SRecObjective(), LUMOSObjective())
}


def objective_for(run_config: Mapping) -> Objective:
    """The run's objective (``objective`` in its config, ``sasrec`` when absent)."""
    name = str(run_config.get("objective", "sasrec"))
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def method_name(run_config: Mapping) -> str:
    """The name a federated run's results carry: ``lumos``, ``fed-cl4srec``, ``fedavg-sasrec``
    under FedAvg, the aggregation strategy's name with the objective's otherwise."""
    return objective_for(run_config).method_name(str(run_config["strategy"]))


def foreign_keys(run_config: Mapping) -> frozenset[str]:
    """The other objectives' result-changing keys: they do not change what this run trains. A
    checkpoint written when fingerprints held every objective's keys still resumes."""
    own = set(objective_for(run_config).fingerprint_keys)
    return frozenset(key for o in OBJECTIVES.values() for key in o.fingerprint_keys if key not in own)


def later_keys() -> frozenset[str]:
    """Every objective's keys that enter the fingerprint only when on (:attr:`Objective.later_keys`)."""
    return frozenset(key for objective in OBJECTIVES.values() for key in objective.later_keys)


def choices() -> dict[str, tuple[str, ...]]:
    """Allowed values of the objectives' keys that take one of a fixed set, and of ``objective``."""
    allowed = {"objective": tuple(OBJECTIVES)}
    for objective in OBJECTIVES.values():
        allowed.update(objective.choices)
    return allowed


#: federated method name under FedAvg -> its objective (``fedavg-sasrec`` -> ``sasrec``, ...)
FEDERATED_METHODS = {objective.method_name("fedavg"): name for name, objective in OBJECTIVES.items()}
