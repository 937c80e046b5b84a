"""Where Lumos keeps what it downloads and makes: one root, ``$LUMOS_CACHE`` or ``~/.cache/lumos``.

Under it: ``datasets/`` (``lumos data download``), ``models/`` (dequantized LLMs),
``embeddings/`` (sentence-encoder vectors), ``views/<dataset>/`` (LUMOS views) and
``semantic/<dataset>/`` (SRA-CL texts).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_ENV = "LUMOS_CACHE"
#: the datasets folder alone, before there was one root; still read, with a deprecation line
LEGACY_DATASETS_ENV = "LUMOS_CACHE_DIR"


def cache_root() -> Path:
    """``$LUMOS_CACHE`` when set, else ``~/.cache/lumos``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lumos").expanduser()


def cache_dir(kind: str) -> Path:
    """The cache folder of one kind of thing (``datasets``, ``models``, ``views``, ...)."""
    if kind == "datasets" and os.environ.get(LEGACY_DATASETS_ENV):
        _warn_legacy_datasets_env()
        return Path(os.environ[LEGACY_DATASETS_ENV]).expanduser()
    return cache_root() / kind


@functools.cache
def _warn_legacy_datasets_env() -> None:
    log.warning(
        "%s is deprecated: set %s to the cache root instead (datasets go to $%s/datasets)",
        LEGACY_DATASETS_ENV,
        CACHE_ENV,
        CACHE_ENV,
    )
