"""The Flower app's run config as text and as model sizes.

Every knob of a federated run lives in ``[tool.flwr.app.config]`` of ``pyproject.toml``;
``flwr run --run-config`` and ``lumos ... --run-config`` take ``key=value`` pairs with TOML
values, parsed and written here.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping

from lumosrec.core.errors import ConfigError

#: run-config key -> the backbone's hyper-parameter (SASRecConfig's field), shared by every objective
MODEL_KEYS = {
    "hidden-size": "hidden_size",
    "num-layers": "num_layers",
    "num-heads": "num_heads",
    "inner-size": "inner_size",
    "dropout": "dropout",
    "max-len": "max_len",
}

#: one ``key=value`` of a run config; the value is quoted (TOML string) or runs to a space
RUN_CONFIG_PAIR = re.compile(r"""\s*([^\s=]+)=('[^']*'|"(?:[^"\\]|\\.)*"|[^\s'"]\S*)(?:\s+|$)""")


def parse_run_config(text: str) -> dict:
    """``'key=value key2="text"'`` (TOML-typed values, as ``flwr run --run-config``) to a dict."""
    values, position, text = {}, 0, text.strip()
    while position < len(text):
        match = RUN_CONFIG_PAIR.match(text, position)
        if match is None:
            raise ConfigError(
                f"run config: cannot read {text[position:]!r}; expected key=value pairs "
                'with TOML values, strings in quotes (key="text")'
            )
        key, value = match.groups()
        try:
            values.update(tomllib.loads(f'"{key}" = {value}'))
        except tomllib.TOMLDecodeError:
            raise ConfigError(
                f"run config: cannot read {match.group(0).strip()!r}; expected key=value with a "
                'TOML value, strings in quotes (key="text")'
            ) from None
        position = match.end()
    return values


def format_run_config(values: Mapping) -> str:
    """The inverse of :func:`parse_run_config`, for ``flwr run --run-config``."""
    return " ".join(f"{key}={json.dumps(value)}" for key, value in values.items())


def cohort_size(run_config: Mapping) -> int:
    """Users per cohort node: each trained on its own, as a one-user node would (0: off, nodes are
    silos whose users train jointly, one user each by default)."""
    return int(run_config.get("cohort-size", 0))


def model_sizes(run_config: Mapping) -> dict:
    """The backbone's hyper-parameters set by the run config (the others keep their defaults)."""
    return {field: run_config[key] for key, field in MODEL_KEYS.items() if key in run_config}
