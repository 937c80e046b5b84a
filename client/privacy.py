"""Client-side defences of a user's update: local differential privacy (issue 21).

Server-side DP (``dp-clipping-norm``) noises the aggregate after the server has seen every reply,
so it protects users from whoever receives the model, not from the server. With
``local-dp-epsilon`` > 0 each training reply is clipped and noised on the node, before it leaves:
Flower's :class:`~flwr.clientapp.mod.LocalDpMod` clips the update (reply minus the model received)
to L2 norm ``local-dp-clipping-norm`` and adds Gaussian noise of standard deviation
``sensitivity * sqrt(2 ln(1.25 / delta)) / epsilon`` to every value, one (epsilon, delta)-DP
release per participation. The sensitivity is twice the clipping norm: under local DP any two
histories are neighbours, and two clipped updates differ by at most that. The Gaussian
mechanism's bound holds for epsilon <= 1, the range the run config accepts.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping

from flwr.app import Context, Message, MessageType
from flwr.clientapp.mod import LocalDpMod
from flwr.clientapp.typing import ClientAppCallable

log = logging.getLogger(__name__)


class _WithoutPerReplyLines(logging.Filter):
    """Drops ``LocalDpMod``'s two INFO lines per reply (thousands a round); the settings are
    logged once per process instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("LocalDpMod:")


logging.getLogger("flwr").addFilter(_WithoutPerReplyLines())


@functools.lru_cache(maxsize=8)
def _announce(clipping_norm: float, epsilon: float, delta: float, noise_std: float) -> None:
    log.info(
        "local DP: every training reply clipped to L2 %.4g and noised with std %.4g (epsilon %.3g, delta %.2g per reply)",
        clipping_norm,
        noise_std,
        epsilon,
        delta,
    )


def local_dp_on(run_config: Mapping) -> bool:
    return float(run_config.get("local-dp-epsilon", 0.0)) > 0


def local_dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A ClientApp mod: Flower's ``LocalDpMod`` on training replies when the run asks for it
    (evaluation replies carry no arrays and are left as they are)."""
    run = context.run_config
    if not local_dp_on(run) or msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    clipping_norm = float(run["local-dp-clipping-norm"])
    _announce(clipping_norm, float(run["local-dp-epsilon"]), float(run["local-dp-delta"]), local_dp_noise_std(run))
    mod = LocalDpMod(
        clipping_norm=clipping_norm,
        sensitivity=2 * clipping_norm,
        epsilon=float(run["local-dp-epsilon"]),
        delta=float(run["local-dp-delta"]),
    )
    return mod(msg, context, call_next)


def local_dp_noise_std(run_config: Mapping) -> float:
    """The standard deviation of the noise each value of a training reply gets."""
    sensitivity = 2 * float(run_config["local-dp-clipping-norm"])
    return (
        sensitivity
        * math.sqrt(2 * math.log(1.25 / float(run_config["local-dp-delta"])))
        / float(run_config["local-dp-epsilon"])
    )


def local_dp_spent(run_config: Mapping, rounds: int) -> dict[str, float]:
    """What a user has spent after ``rounds`` rounds: per reply (epsilon, delta), and their basic
    composition (epsilon and delta add up, the bound a user can check alone) over the replies a
    user sends in expectation (``fraction-train`` of the rounds) and at most (every round)."""
    epsilon, delta = float(run_config["local-dp-epsilon"]), float(run_config["local-dp-delta"])
    expected = rounds * float(run_config["fraction-train"])
    return {
        "epsilon_per_reply": epsilon,
        "delta_per_reply": delta,
        "noise_std": local_dp_noise_std(run_config),
        "clipping_norm": float(run_config["local-dp-clipping-norm"]),
        "rounds": rounds,
        "epsilon_expected": epsilon * expected,
        "delta_expected": delta * expected,
        "epsilon_at_most": epsilon * rounds,
        "delta_at_most": delta * rounds,
    }
