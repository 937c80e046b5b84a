"""Client-side defences of a user's update (issue 21): local differential privacy, the item-row
defence, and example counts that hide the history length.

Server-side DP (``dp-clipping-norm``) noises the aggregate after the server has seen every reply,
so it protects users from whoever receives the model, not from the server. With
``local-dp-epsilon`` > 0 each training reply is clipped and noised on the node, before it leaves:
Flower's :class:`~flwr.clientapp.mod.LocalDpMod` clips the update (reply minus the model received)
to L2 norm ``local-dp-clipping-norm`` and adds Gaussian noise of standard deviation
``sensitivity * sqrt(2 ln(1.25 / delta)) / epsilon`` to every value, one (epsilon, delta)-DP
release per participation. The sensitivity is twice the clipping norm: under local DP any two
histories are neighbours, and two clipped updates differ by at most that. The Gaussian
mechanism's bound holds for epsilon <= 1, the range the run config accepts.

The item-row defence (``item-row-noise`` > 0) is cheaper and makes no formal promise. Without it
the rows of the item table that a reply moves most are the user's own items (SGD gives them the
full next-item and input gradients, every other row a tiny softmax share). With it the change
of the table is clipped row by row at the median change of the user's own rows, and every row
gets Gaussian noise of ``item-row-noise`` times that clip (as a row norm): a user's items no longer
stand out by how far they moved, while the noise of many users averages out in the aggregate.
``hide-history-length`` rounds the example counts of a reply up to a power of two, so they tell
the user's history length only to within a factor of two.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Context, Message, MessageType
from flwr.clientapp.mod import LocalDpMod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_clip_model_update

from lumosrec.core.runconfig import cohort_size

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


def _local_dp(run: Mapping) -> LocalDpMod:
    clipping_norm = float(run["local-dp-clipping-norm"])
    _announce(clipping_norm, float(run["local-dp-epsilon"]), float(run["local-dp-delta"]), local_dp_noise_std(run))
    return LocalDpMod(
        clipping_norm=clipping_norm,
        sensitivity=2 * clipping_norm,
        epsilon=float(run["local-dp-epsilon"]),
        delta=float(run["local-dp-delta"]),
    )


def local_dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A ClientApp mod: Flower's ``LocalDpMod`` on training replies when the run asks for it
    (evaluation replies carry no arrays and are left as they are). A cohort node noises each of
    its users' updates itself (:func:`privatise_user_update`), as each user's own node would."""
    run = context.run_config
    if not local_dp_on(run) or cohort_size(run) or msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    return _local_dp(run)(msg, context, call_next)


def privatise_user_update(state: dict[str, torch.Tensor], received: Mapping[str, torch.Tensor], run: Mapping) -> None:
    """What :func:`local_dp_mod` does to a one-user node's reply, done in place to one user's
    ``state`` inside a cohort: Flower's clipping of the update and its Gaussian noise."""
    mod = _local_dp(run)
    keys = list(state)
    arrays = [state[key].detach().cpu().numpy().copy() for key in keys]
    compute_clip_model_update(arrays, [received[key].cpu().numpy() for key in keys], mod.clipping_norm)
    add_gaussian_noise_inplace(arrays, local_dp_noise_std(run))
    for key, array in zip(keys, arrays):
        state[key] = torch.from_numpy(np.asarray(array, dtype=arrays[0].dtype)).to(state[key].device)


def item_row_noise(run_config: Mapping) -> float:
    """``item-row-noise``: the item-row defence's noise, as a multiple of its row clip (0: off)."""
    return float(run_config.get("item-row-noise", 0.0))


def defend_item_rows(
    change: torch.Tensor, own_items: np.ndarray, multiplier: float, generator: torch.Generator
) -> torch.Tensor:
    """The item-row defence on one user's change of the item table (``(items + 1, d)``, row 0
    padding): every row clipped to the median L2 change of the rows of ``own_items`` (the items
    of the user's training sequence), then Gaussian noise on every row but padding whose expected
    row norm is about ``multiplier`` times that clip (std ``multiplier * clip / sqrt(d)`` per value)."""
    norms = change.norm(dim=1)
    clip = float(norms[torch.as_tensor(own_items, device=change.device)].median()) if len(own_items) else 0.0
    if clip <= 0:  # nothing the user trained moved: send no change at all
        return torch.zeros_like(change)
    defended = change * (clip / norms.clamp_min(clip))[:, None]
    std = multiplier * clip / math.sqrt(change.shape[1])
    noise = torch.randn(change.shape[0] - 1, change.shape[1], generator=generator, dtype=change.dtype)
    defended[1:] += std * noise.to(change.device)
    return defended


def hides_history_length(run_config: Mapping) -> bool:
    return bool(run_config.get("hide-history-length", False))


def reported_examples(count: int, run_config: Mapping) -> int:
    """The example count a reply states for ``count`` training samples: exact, or rounded up to a
    power of two under ``hide-history-length`` (a user's weight in FedAvg then moves by < 2x)."""
    if count <= 0 or not hides_history_length(run_config):
        return count
    return 1 << (count - 1).bit_length()


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
