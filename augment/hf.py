"""Any Hugging Face causal LM through transformers: bf16 on CPU, 4/8-bit bitsandbytes on CUDA.

A GGUF file is dequantized to a bf16 folder once (13–40 s) and reloaded from there (about
3 s); transformers cannot keep GGUF weights packed on CPU, and on this CPU bf16 beats every
run-time int8 path (``research/llm_runtime.md`` §3–4). Prompts are batched with left padding.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lumosrec.augment.runtime import (
    Chat,
    GenerationStats,
    MachineLock,
    ModelSpec,
    cache_key,
    file_digest,
    render_plain,
)
from lumosrec.core.errors import ConfigError
from lumosrec.core.paths import cache_dir
from lumosrec.core.training import pick_device

log = logging.getLogger(__name__)

REPETITION_PENALTY = 1.1
QUANTIZATIONS = ("none", "4bit", "8bit")


def _dequantized_folder(spec: ModelSpec) -> Path:
    """The bf16 copy of a GGUF model, converted on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_dir("models") / f"{Path(spec.location).stem}-{file_digest(spec.location)}-bf16"
    if (folder / "config.json").is_file():
        return folder
    log.info("converting %s to a bf16 cache in %s (once)", spec.location, folder)
    source, name = str(Path(spec.location).parent), Path(spec.location).name
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=torch.bfloat16)
    # transformers marks GGUF-loaded models as quantized and refuses to save them, although on
    # CPU the weights are already plain bf16 tensors
    model.hf_quantizer = None
    del model.config.quantization_config
    partial = folder.with_name(folder.name + ".part")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(folder)
    return folder


class TransformersGenerator:
    """:class:`lumosrec.augment.runtime.Generator` on a transformers model (also a model built in memory)."""

    def __init__(
        self,
        model,
        tokenizer,
        name: str,
        device: torch.device,
        batch_size: int = 8,
        quantization: str = "none",
        lock: MachineLock | None = None,
    ) -> None:
        self.model, self.tokenizer, self.name, self._lock = model.eval(), tokenizer, name, lock
        self.device, self.batch_size, self.quantization = device, max(1, batch_size), quantization
        self.weights = "bf16" if quantization == "none" else f"bitsandbytes {quantization}"
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.stats = GenerationStats()

    @classmethod
    def load(
        cls,
        spec: ModelSpec,
        device: str = "auto",
        threads: int = 0,
        batch_size: int = 8,
        quantization: str = "none",
        lock: MachineLock | None = None,
    ) -> TransformersGenerator:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if quantization not in QUANTIZATIONS:
            raise ConfigError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
        torch_device = pick_device(device)
        if torch_device.type == "cpu" and threads > 0:
            torch.set_num_threads(threads)
        location = str(_dequantized_folder(spec)) if spec.is_gguf else spec.location
        options: dict = {"dtype": torch.bfloat16}
        if quantization != "none":
            if torch_device.type != "cuda":
                raise ConfigError(f"{quantization} weights need CUDA (bitsandbytes); on CPU use --quantization none")
            from transformers import BitsAndBytesConfig

            options["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=quantization == "4bit",
                load_in_8bit=quantization == "8bit",
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
            options["device_map"] = {"": torch_device.index or 0}
        try:
            tokenizer = AutoTokenizer.from_pretrained(location)
            model = AutoModelForCausalLM.from_pretrained(location, **options)
        except OSError as error:
            raise ConfigError(f"cannot load model {spec.name}: {str(error).splitlines()[0]}") from None
        if quantization == "none":
            model = model.to(torch_device)
        return cls(model, tokenizer, spec.key, torch_device, batch_size, quantization=quantization, lock=lock)

    def _render(self, prompt: Chat) -> str:
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return render_plain(prompt)

    @torch.inference_mode()
    def generate(
        self, prompts: Sequence[Chat], max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0
    ) -> list[str]:
        started = time.perf_counter()
        texts = [self._render(prompt) for prompt in prompts]
        # similar lengths in a batch waste less padding
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        outputs: list[str] = [""] * len(texts)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            encoded = self.tokenizer(
                [texts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(self.device)
            torch.manual_seed(seed + start)
            generated = self.model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                top_p=None,
                top_k=None,
                repetition_penalty=REPETITION_PENALTY,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            new_tokens = generated[:, encoded["input_ids"].shape[1] :]
            for row, i in enumerate(batch):
                outputs[i] = self.tokenizer.decode(new_tokens[row], skip_special_tokens=True)
            self.stats.prompt_tokens += int(encoded["attention_mask"].sum())
            self.stats.completion_tokens += int((new_tokens != self.tokenizer.pad_token_id).sum())
        self.stats.calls += len(prompts)
        self.stats.seconds += time.perf_counter() - started
        return outputs

    def label_token_ids(self, labels: Sequence[str]) -> list[int]:
        """The token of each label; a label the tokenizer splits cannot be read from one next-token
        distribution, so it is refused."""
        ids = [self.tokenizer.encode(label, add_special_tokens=False) for label in labels]
        split = [label for label, tokens in zip(labels, ids) if len(tokens) != 1]
        if split:
            raise ConfigError(
                f"label(s) {', '.join(map(repr, split))} are not single tokens for {self.name}; use other labels"
            )
        return [tokens[0] for tokens in ids]

    @torch.inference_mode()
    def label_logprobs(self, prompts: Sequence[Chat], labels: Sequence[str]) -> np.ndarray:
        started = time.perf_counter()
        token_ids = torch.tensor(self.label_token_ids(labels))
        texts = [self._render(prompt) for prompt in prompts]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        result = np.zeros((len(texts), len(labels)), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            encoded = self.tokenizer(
                [texts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(self.device)
            # left padding: the last position of every row is its prompt's last token; only that
            # position's logits are computed (the vocabulary projection dominates otherwise)
            logits = self.model(**encoded, logits_to_keep=1).logits[:, -1, :].float()
            result[batch] = torch.log_softmax(logits, dim=-1)[:, token_ids.to(logits.device)].cpu().numpy()
            self.stats.prompt_tokens += int(encoded["attention_mask"].sum())
        self.stats.calls += len(prompts)
        self.stats.seconds += time.perf_counter() - started
        return result

    def model_info(self) -> dict:
        return {
            "model": self.name,
            "key": cache_key(self.name, "transformers", self.quantization),
            "backend": "transformers",
            "weights": self.weights,
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "batch_size": self.batch_size,
        }

    def close(self) -> None:
        self.model = None
        if self._lock is not None:
            self._lock.release()
