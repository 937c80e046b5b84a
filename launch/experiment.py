"""One entry point for every named method (DESIGN.md §5): ``lumos run --method NAME``.

* ``centralized-sasrec``: one SASRec on every user's data (:mod:`lumosrec.launch.centralized`);
* ``centralized-cl4srec``: the same with CL4SRec's augmentation contrast;
* ``sracl``: the same with SRA-CL's semantic-retrieval contrast (:mod:`lumosrec.models.sracl`);
* ``local-sasrec``: one SASRec per client, no federation (:mod:`lumosrec.launch.local`);
* ``fedavg-sasrec``: the Flower app with ``objective = "sasrec"``;
* ``fed-cl4srec``: the Flower app with ``objective = "cl4srec"`` (random crop/mask/reorder views);
* ``lumos``: the Flower app with ``objective = "lumos"`` (on-device LLM views).

Every method of a comparison gets the same :class:`Budget`, the same split, model sizes and
evaluation. Federated methods run the real ServerApp and ClientApp, in this process
(:mod:`lumosrec.launch.inprocess`, the default: same arithmetic, no Ray) or on Flower's Ray
simulation (``engine="flower"``). A run whose folder already holds ``result.json`` is not run
again, and an interrupted federated run resumes from its checkpoint. A simulated client fails only
for a cause to fix, so a run with failed replies is an error here, not a result.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lumosrec.augment.runtime import RuntimeConfig
from lumosrec.augment.semantic import SemanticConfig
from lumosrec.client.objectives import FEDERATED_METHODS, OBJECTIVES, objective_for
from lumosrec.core.data import run_data
from lumosrec.core.errors import ConfigError
from lumosrec.core.results import read_result, write_json
from lumosrec.core.runconfig import MODEL_KEYS
from lumosrec.core.training import TrainConfig
from lumosrec.launch.app import check_run_config, default_run_config
from lumosrec.launch.centralized import CENTRALIZED_METHODS, run_centralized
from lumosrec.launch.inprocess import run_in_process
from lumosrec.launch.local import METHOD as LOCAL
from lumosrec.launch.local import run_local
from lumosrec.launch.simulate import simulate
from lumosrec.launch.supervise import RunError

log = logging.getLogger(__name__)

METHODS = (*CENTRALIZED_METHODS, LOCAL, *FEDERATED_METHODS)
ENGINES = ("inprocess", "flower")


@dataclass(frozen=True)
class SRACLSettings:
    """``sracl``'s model hyper-parameters (``alpha``, ``beta``, ``synthesizer``, ...), semantic side and LLM."""

    hyper: Mapping[str, object] = field(default_factory=dict)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


@dataclass(frozen=True)
class Budget:
    """The training budget of a comparison, stated as a federation's.

    A federation of ``rounds`` rounds that samples ``fraction_train`` of the clients per round
    and trains ``local_epochs`` epochs per participation passes over each user's data
    ``rounds * fraction_train * local_epochs`` times in expectation: :attr:`epochs`, the
    epochs a centralized model (at most, early stopping may end it sooner) and each
    local-only model get.
    """

    rounds: int = 30
    fraction_train: float = 0.1
    local_epochs: int = 3

    @property
    def epochs(self) -> int:
        return max(1, round(self.rounds * self.fraction_train * self.local_epochs))


def run_method(
    method: str,
    data: str,
    out: str | Path,
    seed: int = 2024,
    budget: Budget = Budget(),
    run_config: Mapping[str, object] | None = None,
    engine: str = "inprocess",
    progress: bool = True,
    sracl: SRACLSettings | None = None,
) -> dict:
    """Run ``method`` on ``data`` into ``out`` and return its ``result.json`` payload.

    ``run_config`` holds further ``[tool.flwr.app.config]`` values (``sample-users``, model
    sizes, LUMOS's weights, ``views``, ...); centralized methods use its model sizes and
    sample, and train with their own optimizer (Adam, as in :mod:`lumosrec.launch.centralized`).
    ``sracl`` configures the ``sracl`` method (its defaults otherwise).
    """
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    out = Path(out).resolve()
    if (out / "result.json").is_file():
        log.info("%s: already finished, reusing %s", method, out / "result.json")
        return _counted(read_result(out / "result.json"), out)
    return _counted(_run(method, data, out, seed, budget, run_config, engine, progress, sracl), out)


def failed_replies(result: Mapping) -> str | None:
    """What went wrong in a finished federated run, or None: client replies that were errors or
    never came. Replies the server's checks rejected are its defence at work (a simulated
    attacker's), part of what a run measures."""
    failed = int(result.get("failures", 0)) - int(result.get("rejected", 0))
    if failed <= 0:
        return None
    return (
        f"{failed} client replies failed (raised or never came), {int(result.get('skipped_rounds', 0))} rounds skipped"
    )


def finished_result(folder: str | Path) -> dict | None:
    """The ``result.json`` of the run in ``folder`` if it finished without failed replies (see
    :func:`failed_replies`; such a run is none of a table's results), else None."""
    path = Path(folder) / "result.json"
    if not path.is_file():
        return None
    result = read_result(path)
    return None if failed_replies(result) else result


def _counted(result: dict, out: Path) -> dict:
    problem = failed_replies(result)
    if problem:
        raise RunError(
            f"{out}: {problem}; the log and metrics.json say which and why. Not a result to compare: fix the "
            "cause, remove the folder and run again"
        )
    return result


def _run(
    method: str,
    data: str,
    out: Path,
    seed: int,
    budget: Budget,
    run_config: Mapping[str, object] | None,
    engine: str,
    progress: bool,
    sracl: SRACLSettings | None,
) -> dict:
    config = {**(run_config or {}), "data": data, "seed": seed, "out-dir": str(out)}
    if method in CENTRALIZED_METHODS:
        return _centralized(method, config, budget, progress, sracl or SRACLSettings())
    if method == LOCAL:
        return run_local(config, budget.epochs, progress)
    config.update(
        {
            "objective": FEDERATED_METHODS[method],
            "num-server-rounds": budget.rounds,
            "fraction-train": budget.fraction_train,
            "local-epochs": budget.local_epochs,
            "resume": True,
        }
    )
    merged = check_run_config(config, default_run_config())
    objective = objective_for(merged)
    if engine == "flower":
        result = simulate(config, progress=progress)  # makes the views ahead itself
    else:
        objective.prepare_ahead(merged, progress)
        result = run_in_process(config)
    details = objective.result_details(merged)
    if details:
        result.update(details)
        write_json(out / "result.json", result)
    return result


def _centralized(method: str, config: Mapping, budget: Budget, progress: bool, sracl: SRACLSettings) -> dict:
    run = check_run_config(config, default_run_config())
    hyper = {field: run[key] for key, field in MODEL_KEYS.items() if key != "max-len"}
    model = CENTRALIZED_METHODS[method]
    if model in OBJECTIVES:  # the same hyper-parameters as its federated objective (cl-weight, ...)
        hyper.update(OBJECTIVES[model].hyper(run))
    if method == "sracl":
        hyper.update(sracl.hyper)
    train = TrainConfig(
        epochs=budget.epochs,
        patience=budget.epochs,
        max_len=int(run["max-len"]),
        seed=int(run["seed"]),
        device=str(run["device"]),
    )
    return run_centralized(
        method,
        run_data(run),
        str(run["out-dir"]),
        train,
        hyper,
        progress=progress,
        semantic=sracl.semantic,
        runtime=sracl.runtime,
    )
