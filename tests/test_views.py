"""On-device LLM views: parsing, grounding, accounting, cache and resume, no held-out leak,
the transformers backend on a tiny random model, and one real generation with the shipped GGUF."""

from __future__ import annotations

import dataclasses
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lumosrec.augment.cache import CACHE_FILE, ViewCache
from lumosrec.augment.generate import generate_views, inspect_views, select_users
from lumosrec.augment.grounding import ItemSpace, TextEncoder, ground
from lumosrec.augment.hf import TransformersGenerator
from lumosrec.augment.prompts import VIEWS, parse_titles
from lumosrec.augment.runtime import SHIPPED_MODELS, RuntimeConfig, ShippedModel, resolve_model
from lumosrec.augment.views import ViewConfig
from lumosrec.client.objectives import OBJECTIVES
from lumosrec.core.dataset import load_dataset
from lumosrec.core.errors import ConfigError
from lumosrec.core.evaluation import leave_one_out
from lumosrec.core.synthetic import SyntheticConfig, generate, write_folder
from lumosrec.launch.app import default_run_config

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> TransformersGenerator:
    return TransformersGenerator.load(resolve_model(str(tiny_model_dir)), device="cpu", batch_size=8)


class Recording:
    """A generator that remembers every prompt it was given (wraps a real one)."""

    def __init__(self, inner: TransformersGenerator) -> None:
        self.inner, self.prompts = inner, []
        self.stats = inner.stats

    def generate(self, prompts, max_new_tokens=64, temperature=0.0, seed=0):
        self.prompts.extend(prompts)
        return self.inner.generate(prompts, max_new_tokens, temperature, seed)

    def model_info(self):
        return self.inner.model_info()

    def close(self):
        pass


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder()


@pytest.fixture
def dataset():
    return generate(SyntheticConfig(num_users=24, items_per_category=10, seed=3))


FAST = dict(max_new_tokens=24, history_len=6)


def test_parse_titles_strips_list_markup() -> None:
    text = (
        'Here are five:\n1. Toy Story (1995) [Comedy]\n- "Heat (1995)"\n'
        "Cushion Deluxe [Yoga], Blush Duo [Makeup]; Tripod [Photo]\n\n*  OPI Nail Lacquer, Simmer, 0.5 Ounce\nx"
    )
    assert parse_titles(text) == [
        "Toy Story (1995)",
        "Heat (1995)",
        "Cushion Deluxe",
        "Blush Duo",
        "Tripod",
        "OPI Nail Lacquer, Simmer, 0.5 Ounce",
    ]


def test_grounding_keeps_close_titles_and_drops_hallucinations(dataset, encoder: TextEncoder) -> None:
    space = ItemSpace.from_text(dataset.titles, encoder)
    item = 7
    queries = encoder.encode([dataset.titles[item], dataset.titles[item], "zq xv wkj", dataset.titles[3]])
    grounded = ground(queries, space, threshold=0.6, exclude={3})
    assert [i for i, _ in grounded] == [item]  # repeat, hallucination and excluded item dropped
    assert grounded[0][1] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
def test_prompts_hold_only_the_training_history(dataset, tiny: TransformersGenerator, tmp_path: Path) -> None:
    # every user's validation and test items become new catalog items with titles found nowhere else
    first = dataset.num_items + 1
    sequences = [np.append(s, [first + 2 * u, first + 2 * u + 1]) for u, s in enumerate(dataset.sequences)]
    held_out = [f"HELDOUT-{kind}-{u}" for u in range(dataset.num_users) for kind in ("valid", "test")]
    marked = dataclasses.replace(
        dataset,
        sequences=sequences,
        titles=list(dataset.titles) + held_out,
        categories=list(dataset.categories) + [()] * len(held_out),
        item_ids=list(dataset.item_ids) + held_out,
    )
    assert leave_one_out(marked.sequences, marked.num_items).test[0] == first + 1
    recording = Recording(tiny)
    generate_views(marked, tmp_path, ViewConfig(**FAST), generator=recording, progress=False)
    text = json.dumps(recording.prompts)
    assert len(recording.prompts) == len(VIEWS) * dataset.num_users
    assert "HELDOUT" not in text  # neither in a user's own prompts nor in the catalog's example
    assert all(dataset.titles[int(s[-1])] in text for s in dataset.sequences)  # the latest training item is there


@pytest.mark.slow
def test_every_view_is_accounted_for_and_the_cache_is_reused(
    dataset, tiny: TransformersGenerator, tmp_path: Path
) -> None:
    recording = Recording(tiny)
    config = ViewConfig(**FAST)
    report = generate_views(dataset, tmp_path, config, generator=recording, progress=False)
    for _view, counters in report["stats"]["views"].items():
        assert counters["asked_llm"] == dataset.num_users
        assert counters["llm"] + counters["padded"] + counters["fallback"] == dataset.num_users
        assert counters["items"] == config.items_per_view * dataset.num_users
    # rerun: everything from the cache, the LLM is not called
    calls = len(recording.prompts)
    again = generate_views(dataset, tmp_path, config, generator=recording, progress=False)
    assert again["stats"]["from_cache"] == dataset.num_users and len(recording.prompts) == calls
    # one user's history grows: only that user is made again
    sequences = list(dataset.sequences)
    sequences[5] = np.append(sequences[5], sequences[5][0])
    grown = dataclasses.replace(dataset, sequences=sequences)
    third = generate_views(grown, tmp_path, config, generator=recording, progress=False)
    assert third["stats"]["from_cache"] == dataset.num_users - 1
    assert len(recording.prompts) == calls + len(VIEWS)


@pytest.mark.slow
def test_views_are_catalog_items_and_the_counterfactual_is_unlike_the_user(dataset, tiny, tmp_path: Path) -> None:
    config = ViewConfig(**FAST)
    generate_views(dataset, tmp_path, config, generator=tiny, progress=False)
    split = leave_one_out(dataset.sequences, dataset.num_items)
    space = ItemSpace.from_text(dataset.titles, TextEncoder())
    cache = ViewCache(tmp_path / CACHE_FILE)
    own_means, counterfactual_means = [], []
    for user, train in zip(dataset.user_ids, split.train):
        views = cache.latest(user)
        assert set(views) == set(VIEWS)
        centre, own = space.profile(train.tolist())
        for _view, record in views.items():
            assert len(record.items) == len(set(record.items)) == config.items_per_view
            assert all(1 <= item <= dataset.num_items for item in record.items)
            assert not set(record.items) & set(train.tolist())
        ceiling = np.quantile(own, config.counterfactual_quantile)
        counterfactual = views["counterfactual"]
        for item, grounding in zip(counterfactual.items, counterfactual.grounding):
            if not np.isnan(grounding):  # an LLM item must pass the check
                assert space.vectors[item] @ centre < ceiling
        own_means.append(own.mean())
        counterfactual_means.append(np.mean(counterfactual.profile_similarity))
    cache.close()
    assert np.mean(counterfactual_means) < np.mean(own_means) - 0.2
    assert "counterfactual (" in inspect_views(dataset, tmp_path, [dataset.user_ids[0]])


def test_retrieval_views_without_text_use_the_models_item_embeddings(dataset, tmp_path: Path) -> None:
    untitled = dataclasses.replace(dataset, titles=[""] * len(dataset.titles))
    with pytest.raises(ConfigError, match="no item titles"):
        generate_views(untitled, tmp_path, ViewConfig(mode="retrieval"), progress=False)
    model = OBJECTIVES["sasrec"].build_model(default_run_config(), dataset.num_items)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "model.pt")
    report = generate_views(
        untitled, tmp_path, ViewConfig(mode="retrieval"), item_embeddings=tmp_path / "model.pt", progress=False
    )
    assert report["item_space"] == "model-item-embeddings" and report["generation"] is None
    assert all(v["items"] == 5 * dataset.num_users for v in report["stats"]["views"].values())


def test_cached_item_vectors_spare_loading_the_encoder(dataset, tmp_path: Path) -> None:
    first = TextEncoder()
    made = ItemSpace.from_text(dataset.titles, first, tmp_path)
    assert first.loaded
    # a node (or a GPU box without the encoder's weights) whose catalog vectors are cached
    second = TextEncoder()
    reused = ItemSpace.from_text(dataset.titles, second, tmp_path)
    assert not second.loaded and np.array_equal(reused.vectors, made.vectors)


def test_model_names_resolve_or_fail_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_model("smollm2-135m").location.endswith(".gguf")
    with pytest.raises(ConfigError, match="not found"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ConfigError, match="unknown model"):
        resolve_model("not a model")
    monkeypatch.setitem(SHIPPED_MODELS, "absent", ShippedModel("lumos-absent-package", "pip install x", True))
    with pytest.raises(ConfigError, match="needs the package lumos-absent-package"):
        resolve_model("absent")


def _cached_users(path: Path) -> int:
    if not path.is_file():
        return 0
    with sqlite3.connect(path) as db:
        return db.execute("SELECT COUNT(DISTINCT user) FROM views").fetchone()[0]


@pytest.mark.slow
def test_a_killed_generation_resumes_without_redoing_users(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_folder(generate(SyntheticConfig(num_users=60, items_per_category=10, seed=4)), tmp_path / "data")
    out = tmp_path / "views"
    command = [
        sys.executable,
        "-m",
        "lumosrec.launch.cli",
        "views",
        "generate",
        "--data",
        str(data),
        "--out",
        str(out),
        "--model",
        str(tiny_model_dir),
        "--backend",
        "transformers",
        "--max-new-tokens",
        "24",
        "--batch",
        "4",
        "--quiet",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while _cached_users(out / CACHE_FILE) < 8 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = _cached_users(out / CACHE_FILE)
    assert 8 <= done < 60
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["stats"]["from_cache"] == done and report["stats"]["made"] == 60 - done


@pytest.mark.slow
@pytest.mark.skipif(not ML100K.is_dir(), reason="needs ../shared/data/ml-100k")
def test_real_gguf_generation_on_movielens_users(tmp_path: Path) -> None:
    dataset = load_dataset(ML100K)
    users = select_users(dataset, sample=3, seed=1)
    report = generate_views(
        dataset,
        tmp_path,
        ViewConfig(max_new_tokens=48),
        RuntimeConfig(backend="llamacpp", batch_size=3),
        users=users,
        progress=False,
    )
    assert report["model"]["backend"] == "llamacpp" and report["model"]["model"] == "smollm2-135m"
    assert report["generation"]["completion_tokens"] > 0
    views = report["stats"]["views"]
    assert views["future"]["parse_rate"] > 0  # the instruct model writes title lines
    assert sum(v["grounded_titles"] for v in views.values()) > 0
    for counters in views.values():
        assert counters["llm"] + counters["padded"] + counters["fallback"] == 3
        if counters["grounded_titles"]:
            assert counters["mean_grounding_similarity"] >= 0.6


def test_bad_view_settings_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="unknown views mode"):
        ViewConfig(mode="dreams")
    with pytest.raises(ConfigError, match="unknown view"):
        ViewConfig(views=("future", "past"))
    with pytest.raises(ConfigError, match="unknown user id"):
        select_users(generate(SyntheticConfig(num_users=5)), user_ids=["nobody"])


def test_one_generator_per_machine(tmp_path: Path) -> None:
    from lumosrec.augment.runtime import MachineLock

    path = tmp_path / "llm.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import time; from pathlib import Path; from lumosrec.augment.runtime import MachineLock; "
                f"lock = MachineLock(Path({str(path)!r})).acquire(); print('held', flush=True); time.sleep(3); lock.release()"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    started = time.monotonic()
    lock = MachineLock(path).acquire()  # waits for the other process
    waited = time.monotonic() - started
    lock.release()
    holder.wait()
    assert waited > 1.5


def test_a_damaged_cache_is_a_one_line_error_naming_the_file(tmp_path: Path) -> None:
    from lumosrec.augment.cache import View
    from lumosrec.core.errors import DataError

    path = tmp_path / CACHE_FILE
    cache = ViewCache(path)
    for user in range(2000):
        cache.put("m", "v1", str(user), "h", {"future": View(items=[1, 2, 3], source="retrieval", text="x" * 200)})
    cache.close()
    (tmp_path / "views.sqlite-wal").unlink(missing_ok=True)
    path.write_bytes(path.read_bytes()[: 8 * 4096])  # truncated, as by a full disk or a killed copy
    with pytest.raises(DataError, match=r"views.sqlite is damaged \(.*\): delete it, and the next run makes the views"):
        ViewCache(path).get("m", "v1", "1999", ["future"], "h")
    path.write_bytes(b"not a database at all" * 100)
    with pytest.raises(DataError, match=r"views\.sqlite is damaged"):
        ViewCache(path)
