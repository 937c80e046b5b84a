"""Which data a run and each of its nodes use: a data spec resolved, sampled, partitioned.

``data`` is ``synthetic`` (the embedded default), the name of a downloaded dataset, or a path
to a folder / sequences file. A simulated node takes a contiguous share of the run's users; a
deployed node reads its own folder (``--node-config data-path=...``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lumosrec.core import download as downloads
from lumosrec.core.dataset import Dataset, load_dataset, sample_users
from lumosrec.core.errors import ConfigError
from lumosrec.core.evaluation import LeaveOneOut, leave_one_out
from lumosrec.core.paths import cache_dir
from lumosrec.core.synthetic import SyntheticConfig, generate

SYNTHETIC = "synthetic"


def resolve_data(spec: str, items: str | None = None, seed: int = SyntheticConfig.seed) -> Dataset:
    """``synthetic``, a downloaded dataset's name, or a path to a folder / sequences file."""
    if spec == SYNTHETIC:
        return generate(SyntheticConfig(seed=seed))
    path = Path(spec)
    if not path.exists() and spec in downloads.DATASETS:
        cached = cache_dir("datasets") / spec
        if not (cached / "interactions.csv").is_file():
            raise ConfigError(f"dataset {spec} is not downloaded yet; run: lumos data download {spec}")
        path = cached
    return load_dataset(path, items)


@functools.lru_cache(maxsize=4)
def load_data(spec: str, sample: int = 0, seed: int = 0) -> Dataset:
    """Load a dataset once per process (a Ray actor serves many virtual clients); ``sample > 0``
    keeps a fixed random subset of that many users (the same for every method and seed)."""
    dataset = resolve_data(spec)
    return dataset.subset(sample_users(dataset.num_users, sample, seed)) if sample else dataset


def run_data(run_config: Mapping) -> Dataset:
    """The run's dataset: ``data``, sampled to ``sample-users`` users with ``sample-seed``."""
    return load_data(
        str(run_config["data"]), int(run_config.get("sample-users", 0)), int(run_config.get("sample-seed", 0))
    )


@dataclass
class NodeData:
    """The users a node holds (indices into ``dataset``), with their leave-one-out split."""

    dataset: Dataset
    users: np.ndarray
    split: LeaveOneOut

    @property
    def num_items(self) -> int:
        return self.dataset.num_items

    def subset(self, positions: list[int]) -> NodeData:
        """The node's users at ``positions`` (in its user order), with their split."""
        return NodeData(self.dataset, self.users[positions], self.split.subset(positions))


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
        dataset, split = _split(
            str(run_config["data"]), int(run_config.get("sample-users", 0)), int(run_config.get("sample-seed", 0))
        )
        partition, partitions = int(node_config["partition-id"]), int(node_config["num-partitions"])
        users = partition_users(dataset.num_users, partition, partitions)
    return NodeData(dataset, users, split.subset(users))
