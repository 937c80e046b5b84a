"""The LLM backends by name, and the generators that load them (the runtime's registry).

The backends (:mod:`lumosrec.augment.hf`, :mod:`lumosrec.augment.llamacpp`) implement the
interface of :mod:`lumosrec.augment.runtime`; this module, above the three, picks one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lumosrec.augment.hf import TransformersGenerator
from lumosrec.augment.llamacpp import LlamaCppGenerator
from lumosrec.augment.runtime import (
    BACKENDS,
    Chat,
    GenerationStats,
    Generator,
    MachineLock,
    ModelSpec,
    RuntimeConfig,
    cache_key,
    cpu_threads,
    resolve_model,
)
from lumosrec.core.errors import ConfigError


def _backend(config: RuntimeConfig) -> str:
    if config.backend not in BACKENDS:
        raise ConfigError(f"unknown LLM backend {config.backend!r}; choose one of {', '.join(BACKENDS)}")
    # measured on 2 cores (experiments/bench_views.py): transformers bf16 with 12 prompts per batch
    # makes 21-23 users/min, llama.cpp with 6 parallel slots and prefix reuse 15-16
    return "transformers" if config.backend == "auto" else config.backend


class LazyGenerator:
    """A :class:`Generator` that loads its model on first use (``generate``, ``label_logprobs``): a
    client whose views are all cached never loads (nor locks) an LLM, yet knows its cache key."""

    def __init__(self, config: RuntimeConfig) -> None:
        self.config = config
        self.key = cache_key(resolve_model(config.model).key, _backend(config), config.quantization)
        self._generator: Generator | None = None
        self._stats = GenerationStats()

    @property
    def stats(self) -> GenerationStats:
        return self._generator.stats if self._generator is not None else self._stats

    def generate(
        self, prompts: Sequence[Chat], max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0
    ) -> list[str]:
        if self._generator is None:
            self._generator = load_generator(self.config)
        return self._generator.generate(prompts, max_new_tokens, temperature, seed)

    def label_logprobs(self, prompts: Sequence[Chat], labels: Sequence[str]) -> np.ndarray:
        if self._generator is None:
            self._generator = load_generator(self.config)
        return self._generator.label_logprobs(prompts, labels)

    def model_info(self) -> dict:
        if self._generator is not None:
            return {**self._generator.model_info(), "loaded": True}
        return {"model": self.config.model, "key": self.key, "backend": _backend(self.config), "loaded": False}

    def close(self) -> None:
        if self._generator is not None:
            self._generator.close()
            self._generator = None


def load_generator(config: RuntimeConfig | None = None) -> Generator:
    """The generator for ``config``; ``auto`` is the transformers backend (batched bf16 is the
    fastest on CPU here, and it is the CUDA path); ``llamacpp`` runs GGUF files as shipped."""
    config = config or RuntimeConfig()
    backend = _backend(config)
    spec = resolve_model(config.model)
    threads = config.threads if config.threads > 0 else cpu_threads()
    lock = MachineLock().acquire()
    try:
        return _load(spec, config, backend, threads, lock)
    except BaseException:
        lock.release()
        raise


def _load(spec: ModelSpec, config: RuntimeConfig, backend: str, threads: int, lock: MachineLock) -> Generator:
    if backend == "llamacpp":
        if not spec.is_gguf:
            raise ConfigError(
                f"the llamacpp backend runs GGUF files; {spec.name} is not one (use --backend transformers)"
            )
        return LlamaCppGenerator(
            spec, threads=threads, parallel=config.batch_size, prefix_cache=config.prefix_cache, lock=lock
        )
    return TransformersGenerator.load(
        spec,
        device=config.device,
        threads=threads,
        batch_size=config.batch_size,
        quantization=config.quantization,
        lock=lock,
    )
