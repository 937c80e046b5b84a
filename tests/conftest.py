"""Shared fixtures: tiny datasets written in the uniform folder format, a tiny random LLM."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
#: a federation of 3 nodes of 20 users (the 60-user test data), every node every round, a tiny model
SMALL_FEDERATION = {
    "num-server-rounds": 2,
    "fraction-train": 1.0,
    "eval-every": 1,
    "hidden-size": 16,
    "inner-size": 32,
    "users-per-client": 20,
    "resume": False,
}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Three users; user 30 has ties in time, user 40 is too short to keep."""
    write(
        tmp_path / "interactions.csv",
        "user_id,item_id,timestamp\n10,7,100\n10,5,50\n10,9,200\n10,5,300\n30,9,10\n30,7,10\n30,8,5\n40,7,1\n40,9,2\n",
    )
    write(
        tmp_path / "items.csv",
        'item_id,title,categories\n5,"Alpha, the first",A|B\n7,Beta,B\n8,Gamma,\n9,Delta,C\n',
    )
    return tmp_path


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer LLaMA with a byte-level tokenizer, saved as a HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = CHATML
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        max_position_embeddings=2048,
    )
    folder = tmp_path_factory.mktemp("tiny-llm") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def task_identity() -> None:
    """Messages can only be built inside a Flower process; these identify a fake one (modules that
    build ClientApp messages use it with ``pytestmark = pytest.mark.usefixtures("task_identity")``)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


@pytest.fixture(scope="module")
def small_catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 synthetic users in the folder format, for what one client sends."""
    from lumosrec.core.synthetic import SyntheticConfig, generate, write_folder

    config = SyntheticConfig(num_users=40, items_per_category=10, seed=3)
    return write_folder(generate(config), tmp_path_factory.mktemp("catalog"))


@pytest.fixture
def bare_run_config(small_catalog: Path) -> dict:
    """The default run config over :func:`small_catalog`, a tiny model and no client-side defence."""
    from experiments.bench_privacy import NO_DEFENCE
    from lumosrec.launch.app import default_run_config

    return {**default_run_config(), **NO_DEFENCE, "data": str(small_catalog), "hidden-size": 16, "inner-size": 32}
