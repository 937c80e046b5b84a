"""Noisy and malicious clients, simulated for robustness experiments (issue 21).

The LUMOS paper claims robustness to noisy and adversarial clients without server-side
protection. To measure it, a simulation can make some of its own clients misbehave; every threat
is off by default and acts on training only (evaluation always scores the users' true histories):

* ``noise-share``: every user's training history has this share of its items replaced by random
  catalog items (fixed per user and seed);
* ``malicious-share``: this share of the users (a fixed random set) attack, as
  ``malicious-attack`` says:
  * ``scale``: the user's update is multiplied by ``malicious-scale`` (model poisoning);
  * ``sign-flip``: multiplied by ``-malicious-scale``;
  * ``promote``: the user trains on a fabricated history in which ``promote-item`` follows each of
    its items (targeted promotion of a cold item; ``promote-item = 0`` picks one with
    :func:`cold_item`).

Every client draws the same sets from the run's seed, so a cohort's users and one-user nodes
misbehave alike.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import numpy as np

from lumosrec.core.data import NodeData
from lumosrec.core.dataset import Dataset

#: the values of ``malicious-attack``
ATTACKS = ("scale", "sign-flip", "promote")
#: a random stream apart from the training ones (which are seeded by (seed, user + 1, round))
_NOISE_STREAM, _MALICIOUS_STREAM, _TARGET_STREAM = 101, 102, 103


def threat_refusal(run_config: Mapping) -> str | None:
    """Why the run's threat settings cannot be used, None when they can."""
    if not any_threat(run_config):
        return None
    attack = str(run_config.get("malicious-attack", "scale"))
    if attack not in ATTACKS:
        return f"run config malicious-attack={attack!r}: choose one of {', '.join(ATTACKS)}"
    if str(run_config.get("catalog", "")):
        return "noisy and malicious clients are simulated: a deployment's clients are what they are"
    if int(run_config.get("users-per-client", 1)) != 1:
        return "noisy and malicious clients are simulated per user: use one user per client or cohort-size"
    return None


def any_threat(run_config: Mapping) -> bool:
    return float(run_config.get("noise-share", 0.0)) > 0 or float(run_config.get("malicious-share", 0.0)) > 0


@functools.lru_cache(maxsize=4)
def malicious_users(seed: int, share: float, num_users: int) -> frozenset[int]:
    """The fixed set of attacking users (dataset indices)."""
    count = round(share * num_users)
    rng = np.random.default_rng([seed, _MALICIOUS_STREAM])
    return frozenset(rng.choice(num_users, count, replace=False).tolist())


def cold_item(dataset: Dataset, seed: int) -> int:
    """A cold item to promote: one of the items whose interaction count is the least of all, by seed."""
    counts = np.bincount(np.concatenate(dataset.sequences), minlength=dataset.num_items + 1)[1:]
    coldest = np.flatnonzero(counts == counts.min()) + 1
    return int(np.random.default_rng([seed, _TARGET_STREAM]).choice(coldest))


def target_item(run_config: Mapping, dataset: Dataset) -> int:
    """The item ``promote`` attackers push: ``promote-item``, or (0) :func:`cold_item`."""
    chosen = int(run_config.get("promote-item", 0))
    return chosen if chosen > 0 else cold_item(dataset, int(run_config["seed"]))


def _is_malicious(run_config: Mapping, user: int, num_users: int) -> bool:
    share = float(run_config.get("malicious-share", 0.0))
    return share > 0 and user in malicious_users(int(run_config["seed"]), share, num_users)


def update_factor(run_config: Mapping, user: int, num_users: int) -> float:
    """What ``user`` multiplies its update by before sending it (1: an honest update)."""
    attack = str(run_config.get("malicious-attack", "scale"))
    if attack == "promote" or not _is_malicious(run_config, user, num_users):
        return 1.0
    scale = float(run_config["malicious-scale"])
    return scale if attack == "scale" else -scale


def noisy(sequence: np.ndarray, share: float, num_items: int, rng: np.random.Generator) -> np.ndarray:
    """``sequence`` with ``round(share * len)`` of its positions replaced by random items."""
    replaced = sequence.copy()
    positions = rng.choice(len(sequence), round(share * len(sequence)), replace=False)
    replaced[positions] = rng.integers(1, num_items + 1, size=len(positions))
    return replaced


def promoting(sequence: np.ndarray, target: int) -> np.ndarray:
    """A fabricated history in which ``target`` follows each item of ``sequence``."""
    return np.stack([sequence, np.full_like(sequence, target)], axis=1).ravel()


def training_data(data: NodeData, run_config: Mapping) -> NodeData:
    """``data`` as its noisy or malicious users train on it (``data`` itself when no threat is on)."""
    if not any_threat(run_config):
        return data
    share, seed = float(run_config.get("noise-share", 0.0)), int(run_config["seed"])
    promote = str(run_config.get("malicious-attack", "scale")) == "promote"
    num_users, num_items = data.dataset.num_users, data.num_items
    train = []
    for user, sequence in zip(data.users.tolist(), data.split.train):
        if share > 0:
            sequence = noisy(sequence, share, num_items, np.random.default_rng([seed, _NOISE_STREAM, user]))
        if promote and _is_malicious(run_config, user, num_users):
            sequence = promoting(sequence, target_item(run_config, data.dataset))
        train.append(sequence)
    return NodeData(data.dataset, data.users, dataclasses.replace(data.split, train=train))
