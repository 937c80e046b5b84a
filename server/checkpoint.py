"""Round checkpoints: the global model, the strategy's state and the metrics so far.

Written atomically after every completed round, so a server killed at any moment restarts
from the last completed round with the same global model and the same server-optimizer
state (FedAdam/FedYogi moments, FedAvgM momentum), and its per-round history intact.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.serverapp.strategy import Strategy

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class RoundState:
    """Everything a restarted server needs."""

    completed_rounds: int
    state_dict: dict[str, torch.Tensor]
    history: list[dict] = field(default_factory=list)
    strategy_state: dict = field(default_factory=dict)
    fingerprint: dict = field(default_factory=dict)


def _strategy_state(strategy: Strategy) -> dict:
    # Hyper-parameters are rebuilt from the run config; only learned state is kept.
    return {k: v for k, v in vars(strategy).items() if not callable(v) and not isinstance(v, Strategy)}


def save(directory: Path, state: RoundState, strategy: Strategy) -> None:
    state.strategy_state = _strategy_state(strategy)
    inner = getattr(strategy, "strategy", None)
    if isinstance(inner, Strategy):
        state.strategy_state["inner"] = _strategy_state(inner)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / CHECKPOINT_FILE
    temporary = target.with_suffix(".tmp")
    torch.save(vars(state), temporary)
    os.replace(temporary, target)


def load(
    directory: Path, fingerprint: dict, optional: Collection[str] = (), ignored: Collection[str] = ()
) -> RoundState | None:
    """The last completed round's state, if a checkpoint of the same run exists. ``optional``
    keys count only when on: a checkpoint that recorded one as off (0, false) matches a
    fingerprint without it. ``ignored`` keys recorded by the checkpoint do not count."""
    path = directory / CHECKPOINT_FILE
    if not path.is_file():
        return None
    state = RoundState(**torch.load(path, weights_only=False))
    stored = {
        key: value for key, value in state.fingerprint.items() if key not in ignored and (key not in optional or value)
    }
    if stored != fingerprint:
        changed = sorted(k for k in {*fingerprint, *stored} if stored.get(k) != fingerprint.get(k))
        raise ValueError(
            f"{path} belongs to a run with different settings ({', '.join(changed)}); "
            "use another out-dir or set resume=false"
        )
    return state


def restore_strategy(strategy: Strategy, state: RoundState) -> None:
    saved = dict(state.strategy_state)
    inner = saved.pop("inner", None)
    vars(strategy).update(saved)
    if inner is not None:
        vars(strategy.strategy).update(inner)
