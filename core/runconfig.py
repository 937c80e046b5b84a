"""The Flower app's run config as text and as model sizes.

Every knob of a federated run lives in ``[tool.flwr.app.config]`` of ``pyproject.toml``;
``flwr run --run-config`` and ``lumos ... --run-config`` take ``key=value`` pairs with TOML
values, parsed and written here.
"""

from __future__ import annotations

import json
import math
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


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _real(value: object) -> bool:
    return (_integer(value) or isinstance(value, float)) and math.isfinite(value)


#: the values a numeric run-config key accepts: (test, what the message says it must be)
_RANGES = {
    "positive integer": (lambda v: _integer(v) and v >= 1, "a positive integer"),
    "count": (lambda v: _integer(v) and v >= 0, "0 or a positive integer"),
    "positive": (lambda v: _real(v) and v > 0, "positive"),
    "non-negative": (lambda v: _real(v) and v >= 0, "0 or positive"),
    "share": (lambda v: _real(v) and 0 < v <= 1, "in (0, 1]"),
    "probability": (lambda v: _real(v) and 0 <= v <= 1, "in [0, 1]"),
    "below one": (lambda v: _real(v) and 0 <= v < 1, "in [0, 1)"),
    "below half": (lambda v: _real(v) and 0 <= v < 0.5, "in [0, 0.5)"),
    "nodes or auto": (lambda v: _integer(v) and v >= -1, "-1 (as many as the rule tolerates) or a count"),
    "switch or auto": (lambda v: isinstance(v, bool) or v == "auto", 'true, false or "auto"'),
}

#: run-config key -> its range in :data:`_RANGES`; a value outside it would fail only once the
#: federation runs (after Ray or a SuperLink started), or make the server wait forever
VALUE_RANGES = {
    **dict.fromkeys(
        (
            "num-server-rounds",
            "min-nodes",
            "local-epochs",
            "batch-size",
            "users-per-client",
            "max-len",
            "hidden-size",
            "num-layers",
            "num-heads",
            "inner-size",
            "views-items",
            "krum-select",
        ),
        "positive integer",
    ),
    **dict.fromkeys(
        (
            "sample-users",
            "sample-seed",
            "seed",
            "cohort-size",
            "eval-every",
            "client-threads",
            "aggregation-chunk",
            "max-reply-examples",
            "max-reply-users",
            "lumos-contrastive-rows",
            "lumos-future-horizon",
            "views-llm-users",
            "views-llm-seed",
            "promote-item",
            "secure-aggregation-shares",
        ),
        "count",
    ),
    **dict.fromkeys(
        ("learning-rate", "server-learning-rate", "cl-temperature", "lumos-tau", "round-timeout", "node-wait"),
        "positive",
    ),
    **dict.fromkeys(
        (
            "max-grad-norm",
            "proximal-mu",
            "cl-weight",
            "lumos-lambda-future",
            "lumos-lambda-paraphrase",
            "lumos-future-targets",
            "lumos-counterfactual-negatives",
            "dp-clipping-norm",
            "dp-noise-multiplier",
            "item-row-noise",
        ),
        "non-negative",
    ),
    **dict.fromkeys(
        ("fraction-train", "fraction-evaluate", "dp-delta", "local-dp-delta", "secure-aggregation-threshold"), "share"
    ),
    **dict.fromkeys(
        ("lumos-paraphrase-substitution", "local-dp-epsilon", "noise-share", "malicious-share"), "probability"
    ),
    **dict.fromkeys(("local-dp-clipping-norm", "malicious-scale", "secure-aggregation-clipping"), "positive"),
    **dict.fromkeys(("dropout", "server-momentum"), "below one"),
    "trimmed-beta": "below half",
    "num-malicious-nodes": "nodes or auto",
    "secure-aggregation": "switch or auto",
}


def check_values(run_config: Mapping) -> None:
    """Refuse, with one line, a run-config value no run can use: rounds, fractions, node counts,
    learning rates, model sizes out of range. Keys absent from ``run_config`` are not checked.

    Every entry point calls it before anything starts: the launchers (through
    ``lumosrec.launch.app.check_run_config``) and the ServerApp (for a bare ``flwr run``)."""
    for key, kind in VALUE_RANGES.items():
        if key not in run_config:
            continue
        accepts, expected = _RANGES[kind]
        if not accepts(run_config[key]):
            raise ConfigError(f"run config {key}={run_config[key]!r}: must be {expected}")
    # the attention heads split the hidden vector evenly (both are positive integers by now)
    if run_config.get("hidden-size", 1) % run_config.get("num-heads", 1):
        raise ConfigError(
            f"run config hidden-size={run_config['hidden-size']}: must be a multiple of num-heads={run_config['num-heads']}"
        )
