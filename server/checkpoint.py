"""Round checkpoints: the global model, the strategy's state and the metrics so far.

Written atomically after every completed round, so a server killed at any moment restarts
from the last completed round with the same global model and the same server-optimizer
state (FedAdam/FedYogi moments, FedAvgM momentum, a DP wrapper's privacy ledger), and its
per-round history intact.

``checkpoint.pt`` is resumed by default, so whoever can write into the out-dir chooses what
the server loads: the file holds only tensors and plain values (``None``, ``bool``, ``int``,
``float``, ``str`` and lists, tuples and dicts of them) and is read with
``torch.load(weights_only=True)``, which rebuilds nothing else and so cannot run code. Other
objects of a strategy's state are stored as tagged dicts of those and rebuilt here by type;
a type this module does not know fails at save, naming the attribute, rather than being
dropped or pickled.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp import GaussianPrivacyEvent, RdpAccountant
from flwr.serverapp.strategy import Strategy

from lumosrec.core.errors import ConfigError

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = "lumos-checkpoint"
#: 1 was the pickled ``vars(RoundState)`` that needed ``weights_only=False``; it is refused.
VERSION = 2
#: The key that marks a dict as an encoded object rather than a plain dict.
KIND = "lumos-kind"
_PLAIN = (type(None), bool, int, float, str)


@dataclass
class RoundState:
    """Everything a restarted server needs."""

    completed_rounds: int
    state_dict: dict[str, torch.Tensor]
    history: list[dict] = field(default_factory=list)
    strategy_state: dict = field(default_factory=dict)
    fingerprint: dict = field(default_factory=dict)


@dataclass(frozen=True)
class AccountantState:
    """A privacy accountant's ledger as read from a checkpoint: loaded into the accountant the
    run built from its own settings (never replacing it), so a ledger cannot change them."""

    state: dict


class _Unreadable(Exception):
    """The file loaded safely but is not a checkpoint this version wrote."""


def _tensor(array: np.ndarray, where: str) -> torch.Tensor:
    # A C-ordered copy: torch cannot wrap every numpy layout (negative strides, read-only
    # buffers), and the checkpoint must not alias the live strategy's arrays.
    try:
        return torch.from_numpy(np.array(array, order="C", copy=True))
    except TypeError as exc:
        raise TypeError(f"cannot checkpoint {where}: numpy dtype {array.dtype} has no torch equivalent") from exc


def _encode(value: object, where: str) -> object:
    """``value`` as tensors and plain values that ``weights_only=True`` loads back."""
    # Exact types: subclasses of the plain types (numpy's float64, str enums) would be
    # pickled as their class and then refused by the safe load.
    if type(value) in _PLAIN:
        return value
    if type(value) is list:
        return [_encode(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if type(value) is tuple:
        return tuple(_encode(item, f"{where}[{i}]") for i, item in enumerate(value))
    if type(value) is dict:
        if KIND in value:
            raise TypeError(f"cannot checkpoint {where}: a dict key is {KIND!r}, which marks encoded objects")
        bad = [key for key in value if type(key) not in (str, int)]
        if bad:
            raise TypeError(f"cannot checkpoint {where}: dict key {bad[0]!r} is not a str or int")
        return {key: _encode(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        return {KIND: "numpy", "tensor": _tensor(value, where)}
    if isinstance(value, np.generic):
        return {KIND: "numpy-scalar", "tensor": _tensor(np.asarray(value), where)}
    if isinstance(value, ArrayRecord):
        return {KIND: "ArrayRecord", "arrays": {key: _tensor(array.numpy(), where) for key, array in value.items()}}
    if isinstance(value, RdpAccountant):
        return {KIND: "accountant", "state": _encode(value.state_dict(), f"{where}.state_dict()")}
    if isinstance(value, GaussianPrivacyEvent):
        return {KIND: "privacy-event", "fields": dataclasses.asdict(value)}
    raise TypeError(
        f"cannot checkpoint {where}: {type(value).__module__}.{type(value).__qualname__} is not a type "
        "lumosrec.server.checkpoint knows how to store without pickling code"
    )


def _decode(value: object, where: str) -> object:
    """The inverse of :func:`_encode`; anything it could not have written is :class:`_Unreadable`."""
    if type(value) in _PLAIN or isinstance(value, torch.Tensor):
        return value
    if type(value) is list:
        return [_decode(item, where) for item in value]
    if type(value) is tuple:
        return tuple(_decode(item, where) for item in value)
    if type(value) is not dict:
        raise _Unreadable(f"{where} holds a {type(value).__name__}")
    if KIND not in value:
        return {key: _decode(item, where) for key, item in value.items()}
    kind = value[KIND]
    try:
        if kind == "numpy":
            return _only_tensor(value["tensor"], where).numpy()
        if kind == "numpy-scalar":
            return _only_tensor(value["tensor"], where).numpy()[()]
        if kind == "ArrayRecord":
            arrays = value["arrays"]
            if type(arrays) is not dict:
                raise _Unreadable(f"{where} has a malformed ArrayRecord")
            return ArrayRecord({key: Array(_only_tensor(t, where).numpy()) for key, t in arrays.items()})
        if kind == "accountant":
            state = _decode(value["state"], where)
            if type(state) is not dict:
                raise _Unreadable(f"{where} has a malformed accountant state")
            return AccountantState(state)
        if kind == "privacy-event":
            return GaussianPrivacyEvent(**value["fields"])
    except (KeyError, TypeError, ValueError) as exc:
        raise _Unreadable(f"{where} has a malformed {kind}") from exc
    raise _Unreadable(f"{where} holds an unknown kind {_shown(kind)}")


def _shown(value: object) -> str:
    # a tampered file's value in an error message: a str's or int's repr is one short line, a
    # tensor's may span many, so anything else is named by its type
    return repr(value)[:80] if type(value) in (str, int) else type(value).__name__


def _only_tensor(value: object, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise _Unreadable(f"{where} has a {type(value).__name__} where a tensor belongs")
    return value


def _strategy_state(strategy: Strategy) -> dict:
    # Callables (metric aggregation and selection functions) are rebuilt from the run config
    # with the strategy; a wrapped strategy is stored on its own, under "inner".
    return {k: v for k, v in vars(strategy).items() if not callable(v) and not isinstance(v, Strategy)}


def _encoded_strategy(strategy: Strategy) -> dict:
    name = type(strategy).__name__
    encoded = {key: _encode(value, f"{name}.{key}") for key, value in _strategy_state(strategy).items()}
    inner = getattr(strategy, "strategy", None)
    if isinstance(inner, Strategy):
        encoded["inner"] = {
            key: _encode(value, f"{name}.strategy.{key}") for key, value in _strategy_state(inner).items()
        }
    return encoded


def snapshot(strategy: Strategy) -> dict:
    """A copy of ``strategy``'s state as a checkpoint stores it; :func:`restore` puts it back
    (the server undoes a round that yields no new model with it)."""
    return _decode(_encoded_strategy(strategy), "strategy")


def save(directory: Path, state: RoundState, strategy: Strategy) -> None:
    """Write ``state`` and ``strategy``'s state to ``directory/checkpoint.pt`` atomically.

    Raises TypeError, naming the attribute, when the strategy holds a type that cannot be stored
    without pickling code; the previous checkpoint is then left as it was."""
    # Encoded before the file is opened: a state that cannot be stored leaves the last
    # checkpoint in place.
    strategy_state = _encoded_strategy(strategy)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "completed_rounds": int(state.completed_rounds),
        "state_dict": {key: tensor.detach().cpu() for key, tensor in state.state_dict.items()},
        "history": _encode(state.history, "history"),
        "strategy_state": strategy_state,
        "fingerprint": _encode(state.fingerprint, "fingerprint"),
    }
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / CHECKPOINT_FILE
    temporary = target.with_suffix(".tmp")
    torch.save(payload, temporary)
    os.replace(temporary, target)


def _read(path: Path) -> RoundState:
    """The checkpoint at ``path``, loaded without running any code it might carry."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    # The safe loader refuses a pickled object (an older Lumos checkpoint, or a planted one)
    # with the same error as garbage, and torch's text spans many lines and suggests the
    # unsafe load: whatever it raises, say one thing, in one line.
    except Exception as exc:
        raise _Unreadable(
            "it does not load as plain tensors and values: written by an older Lumos, damaged, or not by Lumos"
        ) from exc
    if type(payload) is not dict or payload.get("format") != FORMAT:
        raise _Unreadable("it is not in the Lumos checkpoint format (written by an older Lumos, or not by Lumos)")
    if payload.get("version") != VERSION:
        raise _Unreadable(f"format version {_shown(payload.get('version'))}, this Lumos reads {VERSION}")
    state_dict = payload.get("state_dict")
    if type(state_dict) is not dict or not all(
        type(k) is str and isinstance(t, torch.Tensor) for k, t in state_dict.items()
    ):
        raise _Unreadable("its model is not a dict of named tensors")
    fields = {key: _decode(payload.get(key), key) for key in ("completed_rounds", "history", "strategy_state")}
    fingerprint = _decode(payload.get("fingerprint"), "fingerprint")
    if (
        type(fields["completed_rounds"]) is not int
        or type(fields["history"]) is not list
        or type(fields["strategy_state"]) is not dict
        or type(fingerprint) is not dict
    ):
        raise _Unreadable("its round, history, strategy state or fingerprint has the wrong type")
    return RoundState(state_dict=state_dict, fingerprint=fingerprint, **fields)


def load(
    directory: Path, fingerprint: dict, optional: Collection[str] = (), ignored: Collection[str] = ()
) -> RoundState | None:
    """The last completed round's state, if a checkpoint of the same run exists. ``optional``
    keys count only when on: a checkpoint that recorded one as off (0, false) matches a
    fingerprint without it. ``ignored`` keys recorded by the checkpoint do not count.

    Raises ConfigError when the file is not a code-free checkpoint of this format (it is not
    loaded), ValueError when it belongs to a run with different settings."""
    path = directory / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        state = _read(path)
    except _Unreadable as exc:
        raise ConfigError(
            f"{path} is not a safe Lumos checkpoint ({exc}); it was not loaded: "
            "move it away or set resume=false to start afresh"
        ) from exc
    stored = {
        key: value for key, value in state.fingerprint.items() if key not in ignored and (key not in optional or value)
    }
    if stored != fingerprint:
        changed = sorted(k for k in {*fingerprint, *stored} if k in stored and stored[k] != fingerprint.get(k))
        unrecorded = sorted(k for k in fingerprint if k not in stored)
        reasons = [f"different settings ({', '.join(changed)})"] if changed else []
        if unrecorded:
            reasons.append(f"no record of {', '.join(unrecorded)} (an older Lumos wrote it)")
        raise ValueError(
            f"{path} belongs to a run with {' and '.join(reasons)}; use another out-dir or set resume=false"
        )
    return state


def _restore(strategy: Strategy, saved: dict) -> None:
    for key, value in saved.items():
        if isinstance(value, AccountantState):
            accountant = getattr(strategy, key, None)
            if not isinstance(accountant, RdpAccountant):
                raise ConfigError(
                    f"the checkpoint holds a privacy ledger for {type(strategy).__name__}.{key} but this run "
                    "accounts no privacy: use the checkpoint's DP settings or set resume=false"
                )
            try:
                accountant.load_state_dict(value.state)
            except ValueError as exc:
                raise ConfigError(f"the checkpoint's privacy ledger does not fit this run: {exc}") from exc
        else:
            setattr(strategy, key, value)


def restore(strategy: Strategy, saved: dict) -> None:
    """Put a strategy state (a checkpoint's, or a :func:`snapshot`) back in place, a DP wrapper's
    inner strategy's included."""
    saved = dict(saved)
    inner = saved.pop("inner", None)
    _restore(strategy, saved)
    if inner is not None:
        _restore(strategy.strategy, inner)


def restore_strategy(strategy: Strategy, state: RoundState) -> None:
    """Put the checkpoint's strategy state back in place."""
    restore(strategy, state.strategy_state)
