"""GGUF weights run as shipped (4-bit) by llama.cpp, through the prebuilt ``xllamacpp`` wheel.

One in-process llama.cpp server per machine with ``parallel`` slots: a batch of prompts is
submitted concurrently and decoded together (continuous batching), and each slot keeps the
KV cache of its last prompt, so the shared system prompt and few-shot exchange of the views'
prompts are evaluated once per slot rather than once per call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from lumosrec.augment.runtime import Chat, GenerationStats, MachineLock, ModelSpec, cache_key, render_plain
from lumosrec.core.errors import ConfigError, LumosError

#: tokens of context per parallel slot: few-shot prompt (~300) + history + answer
CONTEXT_PER_SLOT = 2048
#: mild, as measured in research/llm_runtime.md: 1.3 breaks the list format
REPEAT_PENALTY = 1.1


class GenerationError(LumosError):
    """The LLM runtime refused or failed a request."""


def has_chat_template(path: str) -> bool:
    import gguf

    return "tokenizer.chat_template" in gguf.GGUFReader(path).fields


class LlamaCppGenerator:
    """:class:`lumosrec.augment.runtime.Generator` on llama.cpp."""

    def __init__(
        self,
        spec: ModelSpec,
        threads: int,
        parallel: int = 8,
        prefix_cache: bool = True,
        lock: MachineLock | None = None,
    ) -> None:
        import xllamacpp

        self._lock, self._stats_lock = lock, threading.Lock()
        self.spec, self.threads, self.parallel, self.prefix_cache = spec, threads, max(1, parallel), prefix_cache
        self.chat = has_chat_template(spec.location)
        params = xllamacpp.CommonParams()
        params.model.path = spec.location
        params.n_parallel = self.parallel
        params.n_ctx = CONTEXT_PER_SLOT * self.parallel
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        params.warmup = False
        params.verbosity = -1
        self._server = xllamacpp.Server(params)
        self._pool = ThreadPoolExecutor(self.parallel, thread_name_prefix="llamacpp")
        self.stats = GenerationStats()

    def _request(self, prompt: Chat, max_new_tokens: int, temperature: float, seed: int) -> str:
        request = {
            "max_tokens": max_new_tokens,
            "temperature": temperature,
            "seed": seed,
            "repeat_penalty": REPEAT_PENALTY,
            "cache_prompt": self.prefix_cache,
        }
        if temperature == 0:
            request["top_k"] = 1
        if self.chat:
            reply = self._server.handle_chat_completions({**request, "messages": prompt})
        else:
            reply = self._server.handle_completions({**request, "prompt": render_plain(prompt)})
        if "error" in reply:
            raise GenerationError(f"llama.cpp: {reply['error']}")
        usage = reply["usage"]
        with self._stats_lock:
            self.stats.prompt_tokens += usage["prompt_tokens"]
            self.stats.cached_prompt_tokens += usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
            self.stats.completion_tokens += usage["completion_tokens"]
        choice = reply["choices"][0]
        return choice["message"]["content"] if self.chat else choice["text"]

    def generate(
        self, prompts: Sequence[Chat], max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0
    ) -> list[str]:
        started = time.perf_counter()
        futures = [
            self._pool.submit(self._request, prompt, max_new_tokens, temperature, seed + i)
            for i, prompt in enumerate(prompts)
        ]
        texts = [future.result() for future in futures]
        self.stats.calls += len(prompts)
        self.stats.seconds += time.perf_counter() - started
        return texts

    def label_logprobs(self, prompts: Sequence[Chat], labels: Sequence[str]) -> np.ndarray:
        """Not offered: the server's completions expose only the top log-probabilities of a
        sampled token, not those of chosen labels."""
        raise ConfigError(
            "llm-rank views need label probabilities, which the llamacpp backend does not give; use --backend transformers"
        )

    def model_info(self) -> dict:
        return {
            "model": self.spec.name,
            "location": self.spec.location,
            "key": cache_key(self.spec.key, "llamacpp"),
            "backend": "llamacpp",
            "weights": "gguf (as shipped)",
            "chat_template": self.chat,
            "threads": self.threads,
            "parallel": self.parallel,
            "prefix_cache": self.prefix_cache,
        }

    def close(self) -> None:
        self._pool.shutdown()
        del self._server
        if self._lock is not None:
            self._lock.release()
