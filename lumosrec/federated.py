"""What the Flower ServerApp and ClientApp share: run-config parsing, the model, node data.

Every knob lives in ``[tool.flwr.app.config]`` of ``pyproject.toml`` (so ``flwr run .
--run-config "..."`` overrides it); :func:`default_run_config` reads the same table for
code that runs outside Flower (tests, ``lumos simulate``).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import socket
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lumosrec.dataset import Dataset, sample_users
from lumosrec.errors import ConfigError
from lumosrec.evaluation import LeaveOneOut, leave_one_out
from models.cl4srec import CL4SRec, CL4SRecConfig
from models.lumos import LUMOS, LUMOSConfig
from models.sasrec import SASRec, SASRecConfig

APP_DIR = Path(__file__).resolve().parents[1]

#: run-config key -> SASRecConfig field
MODEL_KEYS = {
    "hidden-size": "hidden_size",
    "num-layers": "num_layers",
    "num-heads": "num_heads",
    "inner-size": "inner_size",
    "dropout": "dropout",
    "max-len": "max_len",
}

#: the client's local objective -> (model, config, run-config key -> config field)
OBJECTIVES = {
    "sasrec": (SASRec, SASRecConfig, {}),
    "cl4srec": (CL4SRec, CL4SRecConfig, {"cl-weight": "cl_weight", "cl-temperature": "temperature"}),
    "lumos": (LUMOS, LUMOSConfig, {
        "lumos-lambda-future": "lambda_future", "lumos-lambda-paraphrase": "lambda_paraphrase",
        "lumos-tau": "tau", "lumos-counterfactual": "use_counterfactual",
        "lumos-contrastive-rows": "contrastive_rows",
    }),
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def flower_env(**extra: str) -> dict[str, str]:
    """Environment for Flower's commands: this Python's scripts first on ``PATH`` (Flower
    starts ``flower-superlink`` & co. by name), no telemetry, no run-time dependency installs."""
    scripts = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": os.pathsep.join([scripts, os.environ.get("PATH", "")]),
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", **extra}
    if shutil.which("flwr", path=env["PATH"]) is None:
        raise ConfigError("flwr not found; install Flower: pip install 'flwr[simulation]==1.41.0'")
    return env


#: one ``key=value`` of a run config; the value is quoted (TOML string) or runs to a space
RUN_CONFIG_PAIR = re.compile(r"""\s*([^\s=]+)=('[^']*'|"(?:[^"\\]|\\.)*"|[^\s'"]\S*)(?:\s+|$)""")


def parse_run_config(text: str) -> dict:
    """``'key=value key2="text"'`` (TOML-typed values, as ``flwr run --run-config``) to a dict."""
    values, position, text = {}, 0, text.strip()
    while position < len(text):
        match = RUN_CONFIG_PAIR.match(text, position)
        if match is None:
            raise ConfigError(f"run config: cannot read {text[position:]!r}; expected key=value pairs "
                              "with TOML values, strings in quotes (key=\"text\")")
        key, value = match.groups()
        try:
            values.update(tomllib.loads(f'"{key}" = {value}'))
        except tomllib.TOMLDecodeError:
            raise ConfigError(f"run config: cannot read {match.group(0).strip()!r}; expected key=value with a "
                              "TOML value, strings in quotes (key=\"text\")") from None
        position = match.end()
    return values


def format_run_config(values: Mapping) -> str:
    """The inverse of :func:`parse_run_config`, for ``flwr run --run-config``."""
    return " ".join(f"{key}={json.dumps(value)}" for key, value in values.items())


def default_run_config(app_dir: Path = APP_DIR) -> dict:
    """The ``[tool.flwr.app.config]`` table of the app's ``pyproject.toml``."""
    pyproject = app_dir / "pyproject.toml"
    if not pyproject.is_file():
        raise ConfigError(f"{pyproject} not found: the Flower app needs the Lumos source checkout")
    return dict(tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"])


#: run-config keys with a fixed set of values (``strategy`` is checked by the server's registry)
CHOICES = {"client-optimizer": ("adam", "sgd"), "objective": tuple(OBJECTIVES), "views": ("llm", "retrieval")}


def check_run_config(run_config: Mapping, defaults: Mapping) -> dict:
    """``defaults`` updated with ``run_config``; unknown keys and values are one-line errors."""
    unknown = sorted(set(run_config) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown run-config key(s) {', '.join(unknown)}; see [tool.flwr.app.config] in pyproject.toml")
    merged = {**defaults, **run_config}
    for key, allowed in CHOICES.items():
        if merged[key] not in allowed:
            raise ConfigError(f"run config {key}={merged[key]!r}: choose one of {', '.join(allowed)}")
    from server.strategies import STRATEGIES

    if str(merged["strategy"]).lower() not in STRATEGIES:
        raise ConfigError(f"unknown strategy {merged['strategy']!r}; choose one of {', '.join(STRATEGIES)}")
    return merged


def default_num_nodes(run_config: Mapping) -> int:
    """One node per ``users-per-client`` users of the run's dataset."""
    return math.ceil(run_data(run_config).num_users / int(run_config["users-per-client"]))


def method_name(run_config: Mapping) -> str:
    """The name a run's results carry: ``lumos``, ``fed-cl4srec`` or ``fedavg-sasrec`` with
    FedAvg; the aggregation strategy's name in front otherwise (``lumos-fedprox``, ...)."""
    strategy, objective = str(run_config["strategy"]), str(run_config.get("objective", "sasrec"))
    if objective == "lumos":
        return "lumos" if strategy == "fedavg" else f"lumos-{strategy}"
    if objective == "cl4srec":
        return "fed-cl4srec" if strategy == "fedavg" else f"{strategy}-cl4srec"
    return f"{strategy}-sasrec"


def build_model(run_config: Mapping, num_items: int) -> SASRec:
    """The shared backbone with the run's model sizes (what the server holds and aggregates)."""
    sizes = {field: run_config[key] for key, field in MODEL_KEYS.items() if key in run_config}
    return SASRec(SASRecConfig(num_items=num_items, **sizes))


def build_client_model(run_config: Mapping, num_items: int) -> SASRec:
    """The model a client trains: the backbone plus its objective's terms and private parts."""
    model_class, config_class, keys = OBJECTIVES[str(run_config.get("objective", "sasrec"))]
    sizes = {field: run_config[key] for key, field in MODEL_KEYS.items() if key in run_config}
    hyper = {field: run_config[key] for key, field in keys.items() if key in run_config}
    return model_class(config_class(num_items=num_items, **sizes, **hyper))


@functools.lru_cache(maxsize=4)
def load_data(spec: str, sample: int = 0, seed: int = 0) -> Dataset:
    """Load a dataset once per process (a Ray actor serves many virtual clients); ``sample > 0``
    keeps a fixed random subset of that many users (the same for every method and seed)."""
    from lumosrec.cli import resolve_data

    dataset = resolve_data(spec)
    return dataset.subset(sample_users(dataset.num_users, sample, seed)) if sample else dataset


def run_data(run_config: Mapping) -> Dataset:
    """The run's dataset: ``data``, sampled to ``sample-users`` users with ``sample-seed``."""
    return load_data(str(run_config["data"]), int(run_config.get("sample-users", 0)),
                     int(run_config.get("sample-seed", 0)))


@dataclass
class NodeData:
    """The users a node holds (indices into ``dataset``), with their leave-one-out split."""

    dataset: Dataset
    users: np.ndarray
    split: LeaveOneOut

    @property
    def num_items(self) -> int:
        return self.dataset.num_items


def partition_users(num_users: int, partition: int, partitions: int) -> np.ndarray:
    """Users of group ``partition`` when ``num_users`` are cut into ``partitions`` contiguous,
    near-equal groups (``numpy.array_split``'s groups, without building all of them: with one
    user per client that would cost a 22k-array list per message)."""
    size, larger = divmod(num_users, partitions)
    start = partition * size + min(partition, larger)
    return np.arange(start, start + size + (partition < larger))


@functools.lru_cache(maxsize=8)
def _split(spec: str, sample: int = 0, seed: int = 0) -> tuple[Dataset, LeaveOneOut]:
    dataset = load_data(spec, sample, seed)
    return dataset, leave_one_out(dataset.sequences, dataset.num_items)


def node_data(run_config: Mapping, node_config: Mapping) -> NodeData:
    """The users of this node.

    Simulation: the run's dataset is cut into ``num-partitions`` contiguous, near-equal groups
    of users and the node takes group ``partition-id``. Deployment: the node reads its own
    folder from ``node_config["data-path"]`` (its users' interactions plus the shared catalog)
    and holds every user in it.
    """
    if "data-path" in node_config:
        dataset, split = _split(str(node_config["data-path"]))
        users = np.arange(dataset.num_users)
    else:
        dataset, split = _split(str(run_config["data"]), int(run_config.get("sample-users", 0)),
                                int(run_config.get("sample-seed", 0)))
        partition, partitions = int(node_config["partition-id"]), int(node_config["num-partitions"])
        users = partition_users(dataset.num_users, partition, partitions)
    return NodeData(dataset, users, split.subset(users))
