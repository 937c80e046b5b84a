"""The run directory and the results schema every method writes.

A run directory holds ``config.json`` (written first: what was asked, seed, versions),
``metrics.json`` (rewritten after every epoch or round, so an interrupted run keeps its
history), ``model.pt`` and finally ``result.json``::

    {"method", "dataset", "seed", "epochs", "best_epoch", "seconds_per_epoch",
     "peak_rss_mb", "valid": {protocol: metrics}, "test": {protocol: metrics}, ...}

All files are written atomically (temporary file + rename).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from lumosrec.core.errors import ConfigError

RESULT_KEYS = (
    "method",
    "dataset",
    "seed",
    "epochs",
    "best_epoch",
    "seconds_per_epoch",
    "peak_rss_mb",
    "valid",
    "test",
)


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


#: the source checkout this package runs from, when it runs from one (an editable install)
SOURCE_ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=4)
def source_revision(root: Path = SOURCE_ROOT) -> str:
    """The git commit of the code at ``root`` (``+dirty`` when its tracked code, ``*.py`` and
    ``*.toml`` with the run config's defaults, differs from it; reports and results do not count), or
    ``unknown`` when ``root`` is not the top of a git checkout (an installed wheel, a container):
    the package version alone does not tell two results of a development tree apart."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root.resolve():
            return "unknown"  # a copy installed inside some other checkout
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "*.py", "*.toml")
        return git("rev-parse", "--short=12", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict[str, str]:
    """Versions that decide whether a result can be reproduced."""
    versions = {"python": sys.version.split()[0], "platform": platform.platform(), "source": source_revision()}
    for package in ("lumos-rec", "torch", "numpy", "flwr"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    versions["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return versions


def read_result(path: str | Path) -> dict:
    """A ``result.json``; one written before results said ``method`` has it under ``strategy``."""
    result = json.loads(Path(path).read_text())
    if "method" not in result and "strategy" in result:
        result = {"method": result.pop("strategy"), **result}
    return result


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
    os.replace(handle.name, path)


class RunDirectory:
    """Owns one run's output folder, made by its first write: a run that fails while it is
    being set up (a bad model name, a catalog without titles) leaves no empty folder behind."""

    def __init__(self, path: str | Path, overwrite: bool = False) -> None:
        self.path = Path(path)
        if (self.path / "result.json").exists() and not overwrite:
            raise ConfigError(
                f"{self.path} already holds a finished run (result.json); choose another --out or pass --overwrite"
            )
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"{self.path} exists and is not a folder")
        self.history: list[dict] = []

    def write_config(self, config: dict) -> None:
        write_json(self.path / "config.json", {**config, "versions": environment()})

    def log_metrics(self, row: dict) -> None:
        self.history.append(row)
        self.write_metrics()

    def write_metrics(self) -> None:
        write_json(self.path / "metrics.json", self.history)

    def save_model(self, state_dict: dict[str, torch.Tensor], model_config: dict) -> None:
        target = self.path / "model.pt"
        temporary = target.with_suffix(".pt.tmp")
        self.path.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": state_dict, "config": model_config}, temporary)
        os.replace(temporary, target)

    def write_result(self, result: dict) -> dict:
        missing = [key for key in RESULT_KEYS if key not in result]
        if missing:
            raise ValueError(f"result is missing {missing}")
        write_json(self.path / "result.json", result)
        return result


def format_table(rows: dict[str, dict[str, dict[str, float]]], metrics: tuple[str, ...]) -> str:
    """A small fixed-width table: one line per (model, protocol)."""
    header = f"{'model':<22} {'protocol':<9} " + " ".join(f"{m:>8}" for m in metrics)
    lines = [header, "-" * len(header)]
    for name, by_protocol in rows.items():
        for protocol, values in by_protocol.items():
            lines.append(f"{name:<22} {protocol:<9} " + " ".join(f"{values[m]:>8.4f}" for m in metrics))
    return "\n".join(lines)
