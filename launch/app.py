"""The Flower app seen from the launchers: its folder, its run config checked, Flower's commands.

Every knob lives in ``[tool.flwr.app.config]`` of ``pyproject.toml`` (so ``flwr run .
--run-config "..."`` overrides it); :func:`default_run_config` reads the same table for code
that runs the app outside ``flwr run`` (``lumos simulate``, ``lumos run``, the tests).
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path

from lumosrec.client.cohort import ENGINES, batched_refusal
from lumosrec.client.local import OPTIMIZERS
from lumosrec.client.objectives import choices as objective_choices
from lumosrec.client.objectives import objective_for
from lumosrec.client.threats import ATTACKS, threat_refusal
from lumosrec.core.data import run_data
from lumosrec.core.errors import ConfigError
from lumosrec.core.runconfig import check_values, cohort_size
from lumosrec.server.server_app import ITEM_INITS, load_checkpoint
from lumosrec.server.strategies import STRATEGIES, build_strategy, cohort_refusal
from lumosrec.server.validation import weighting

#: the Flower app's folder: the source checkout that holds its ``pyproject.toml``
APP_DIR = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def flower_env(**extra: str) -> dict[str, str]:
    """Environment for Flower's commands: this Python's scripts first on ``PATH`` (Flower
    starts ``flower-superlink`` & co. by name), no telemetry, no run-time dependency installs."""
    scripts = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": os.pathsep.join([scripts, os.environ.get("PATH", "")]),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        **extra,
    }
    if shutil.which("flwr", path=env["PATH"]) is None:
        raise ConfigError("flwr not found; install Flower: pip install 'flwr[simulation]==1.41.0'")
    return env


def default_run_config(app_dir: Path = APP_DIR) -> dict:
    """The ``[tool.flwr.app.config]`` table of the app's ``pyproject.toml``."""
    pyproject = app_dir / "pyproject.toml"
    if not pyproject.is_file():
        raise ConfigError(f"{pyproject} not found: the Flower app needs the Lumos source checkout")
    return dict(tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"])


def check_run_config(run_config: Mapping, defaults: Mapping) -> dict:
    """``defaults`` updated with ``run_config``; unknown keys and values out of range
    (:func:`~lumosrec.core.runconfig.check_values`) are one-line errors."""
    unknown = sorted(set(run_config) - set(defaults))
    if unknown:
        raise ConfigError(
            f"unknown run-config key(s) {', '.join(unknown)}; see [tool.flwr.app.config] in pyproject.toml"
        )
    merged = {**defaults, **run_config}
    check_values(merged)
    choices = {
        "client-optimizer": OPTIMIZERS,
        "cohort-engine": ENGINES,
        "item-init": ITEM_INITS,
        "malicious-attack": ATTACKS,
        **objective_choices(),
    }
    for key, allowed in choices.items():
        if merged[key] not in allowed:
            raise ConfigError(f"run config {key}={merged[key]!r}: choose one of {', '.join(allowed)}")
    if str(merged["strategy"]).lower() not in STRATEGIES:
        raise ConfigError(f"unknown strategy {merged['strategy']!r}; choose one of {', '.join(STRATEGIES)}")
    weighting(merged)
    refusal = cohort_refusal(merged) or threat_refusal(merged)
    if not refusal and cohort_size(merged) and merged["cohort-engine"] == "batched":
        refusal = batched_refusal(merged, objective_for(merged).batched_refusal(merged))
        if refusal:
            refusal += '; use cohort-engine="auto", which trains such users one after the other'
    if refusal:
        raise ConfigError(refusal)
    return merged


def check_node_count(run_config: Mapping, num_nodes: int) -> None:
    """Fewer nodes than ``min-nodes`` would leave the server waiting for them forever, and a robust
    rule needs enough sampled nodes for the malicious ones it assumes: both refused before launch."""
    if num_nodes < int(run_config["min-nodes"]):
        raise ConfigError(
            f"{num_nodes} node(s) for min-nodes={run_config['min-nodes']}: the server would wait forever; "
            "lower min-nodes, cohort-size or users-per-client"
        )
    build_strategy(run_config, num_nodes)


def default_num_nodes(run_config: Mapping) -> int:
    """One node per cohort (``cohort-size`` users) or per silo (``users-per-client`` users)."""
    return math.ceil(run_data(run_config).num_users / (cohort_size(run_config) or int(run_config["users-per-client"])))


def check_resume(run_config: Mapping) -> int:
    """The rounds a resumed run skips: those of the checkpoint in ``out-dir`` (0 without one, or
    with ``resume`` off). A checkpoint written with other settings is refused here, with one line,
    before anything starts."""
    if not run_config["resume"]:
        return 0
    try:
        state = load_checkpoint(Path(str(run_config["out-dir"])), run_config)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return state.completed_rounds if state is not None else 0
