"""SRA-CL: prompts from training data only, cached LLM texts, neighbour retrieval, the model's
two contrastive terms and the learnable synthesizer, and ``lumos train --method sracl``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lumosrec.augment.neighbours import nearest_neighbours, random_neighbours
from lumosrec.augment.runtime import RuntimeConfig
from lumosrec.augment.semantic import SemanticConfig, build_semantic_side, semantic_prompts
from lumosrec.core.dataset import load_dataset
from lumosrec.core.evaluation import evaluate, leave_one_out
from lumosrec.core.synthetic import SyntheticConfig, generate, write_folder
from lumosrec.launch.cli import main
from lumosrec.models.factory import build_model
from lumosrec.models.losses import nt_xent
from lumosrec.models.sracl import SRACL, SRACLConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def secret_targets(tmp_path: Path) -> Path:
    """Eight users over a shared pool of eight items; every validation and test item is the
    user's own and named ``SECRET``, so any leak into a prompt shows by name."""
    rows, items = ["user_id,item_id,timestamp"], ["item_id,title,categories"]
    items += [f"{i},Shared thing {i},Pool" for i in range(1, 9)]
    for user in range(8):
        history = [1 + (user + step) % 8 for step in range(5)]
        secret = [100 + 2 * user, 101 + 2 * user]
        items += [f"{item},SECRET {item},Hidden" for item in secret]
        rows += [f"{user},{item},{time}" for time, item in enumerate(history + secret)]
    folder = tmp_path / "secret"
    folder.mkdir()
    (folder / "interactions.csv").write_text("\n".join(rows) + "\n")
    (folder / "items.csv").write_text("\n".join(items) + "\n")
    return folder


def test_no_validation_or_test_item_reaches_a_prompt(secret_targets: Path) -> None:
    dataset = load_dataset(secret_targets)
    split = leave_one_out(dataset.sequences, dataset.num_items)
    users, items = semantic_prompts(dataset, split, SemanticConfig())
    assert len(users) == dataset.num_users
    texts = [turn["content"] for prompt in [*users.values(), *items.values()] for turn in prompt]
    assert any("Shared thing" in text for text in texts)
    assert not any("SECRET" in text for text in texts)
    # only items seen in training are described
    described = {dataset.titles[int(key)] for key in items}
    assert described == {f"Shared thing {i}" for i in range(1, 9)}


@pytest.mark.slow
def test_texts_are_generated_once_then_read_from_the_cache(
    secret_targets: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    dataset = load_dataset(secret_targets)
    split = leave_one_out(dataset.sequences, dataset.num_items)
    config = SemanticConfig(k=3, user_tokens=6, item_tokens=6, folder=str(tmp_path / "semantic"))
    runtime = RuntimeConfig(model=str(tiny_model_dir), backend="transformers", batch_size=4)
    first = build_semantic_side(dataset, split, config, runtime, progress=False)
    report = json.loads((tmp_path / "semantic" / "report.json").read_text())
    assert report["user_texts"]["made"] == 8 and report["item_texts"]["made"] == 8
    assert report["user_texts"]["completion_tokens"] > 0 and report["user_texts"]["per_minute"] > 0
    second = build_semantic_side(dataset, split, config, runtime, progress=False)
    assert second.report["user_texts"]["from_cache"] == 8 and second.report["item_texts"]["made"] == 0
    assert second.report["model"]["loaded"] is False  # nothing to generate: the LLM is never loaded
    # the cache keeps what making its texts cost, for runs that only read it
    for kind in ("user", "item"):
        made_then, kept = report[f"{kind}_texts"], second.report["generation"][kind]
        assert kept["made"] == 8 and kept["completion_tokens"] == made_then["completion_tokens"]
        assert kept["seconds"] == pytest.approx(made_then["seconds"])
    np.testing.assert_array_equal(first.user_neighbours, second.user_neighbours)
    assert first.user_neighbours.shape == (8, 3)
    assert not (first.user_neighbours == np.arange(8)[:, None]).any()
    # undescribed items (the secret ones) keep themselves as neighbours: substitution leaves them
    secret = [i for i in range(1, dataset.num_items + 1) if dataset.titles[i].startswith("SECRET")]
    assert (first.item_neighbours[secret] == np.array(secret)[:, None]).all()
    shared = [i for i in range(1, dataset.num_items + 1) if i not in secret]
    assert set(first.item_neighbours[shared].ravel()) <= set(shared)


def test_exact_neighbours_match_brute_force_and_approximate_ones_agree() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(300, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    found = nearest_neighbours(vectors, 5, chunk=64)
    scores = vectors @ vectors.T
    np.fill_diagonal(scores, -np.inf)
    np.testing.assert_array_equal(found, np.argsort(-scores, axis=1)[:, :5])
    candidates = np.arange(0, 300, 3)
    restricted = nearest_neighbours(vectors, 4, candidates)
    assert set(restricted.ravel()) <= set(candidates.tolist())
    assert not (restricted == np.arange(300)[:, None]).any()
    approximate = nearest_neighbours(vectors, 5, index="approximate")
    recall = np.mean([len(set(a) & set(e)) / 5 for a, e in zip(approximate, found)])
    assert recall > 0.9
    drawn = random_neighbours(300, 5, np.arange(300), rng)
    assert not (drawn == np.arange(300)[:, None]).any()
    assert all(len(set(row)) == 5 for row in drawn)


def test_nt_xent_matches_its_definition() -> None:
    torch.manual_seed(0)
    first, second = torch.randn(4, 8), torch.randn(4, 8)
    rows = torch.cat([first, second])
    total = 0.0
    for i in range(8):
        positive = (i + 4) % 8
        others = [j for j in range(8) if j != i]
        logits = torch.stack([rows[i] @ rows[j] / 0.5 for j in others])
        total += -(logits[others.index(positive)] - torch.logsumexp(logits, 0))
    assert torch.isclose(nt_xent(first, second, 0.5), total / 8, atol=1e-5)


def _model(num_users: int = 12, num_items: int = 30, **overrides) -> tuple[SRACL, list[np.ndarray]]:
    rng = np.random.default_rng(1)
    config = SRACLConfig(num_items=num_items, max_len=10, hidden_size=16, inner_size=32, semantic_size=8, **overrides)
    model = SRACL(config)
    sequences = [rng.integers(1, num_items + 1, size=rng.integers(2, 9)) for _ in range(num_users)]
    users = rng.normal(size=(num_users, 8)).astype(np.float32)
    user_neighbours = np.array([[(u + j) % num_users for j in range(1, 4)] for u in range(num_users)])
    item_neighbours = np.array([[(i % num_items) + 1, ((i + 1) % num_items) + 1] for i in range(num_items + 1)])
    model.set_semantics(users, user_neighbours, sequences, item_neighbours)
    return model, sequences


def test_the_positive_is_the_synthesizer_mix_of_the_neighbours_encodings() -> None:
    model, _ = _model()
    model.eval()  # no dropout: the mix is exact
    users = torch.tensor([0, 5, 5, 11])
    weights = model.synthesizer_weights(users)
    assert torch.allclose(weights.sum(1), torch.ones(4))
    expected = []
    for row, user in enumerate(users.tolist()):
        neighbours = model.user_neighbours[user]
        encoded = model.encode(model.neighbour_items[neighbours], model.neighbour_lengths[neighbours])
        expected.append((weights[row, :, None] * encoded).sum(0))
    assert torch.allclose(model.synthesized_positives(users), torch.stack(expected), atol=1e-5)
    top1 = _model(synthesizer="top1")[0].eval()
    nearest = top1.user_neighbours[users, 0]
    assert torch.allclose(
        top1.synthesized_positives(users),
        top1.encode(top1.neighbour_items[nearest], top1.neighbour_lengths[nearest]),
        atol=1e-6,
    )


def test_substitution_uses_semantic_neighbours_at_the_configured_rate() -> None:
    model, _ = _model(num_items=30)
    items = torch.randint(1, 31, (400, 10))
    items[:, 8:] = 0
    changed = model.substitute(items)
    assert (changed[:, 8:] == 0).all()
    replaced = changed != items
    assert 0.15 < replaced[:, :8].float().mean() < 0.25
    allowed = model.item_neighbours[items]
    assert ((changed[..., None] == allowed).any(-1) | ~replaced).all()


@pytest.mark.parametrize("alpha, beta", [(0.1, 0.0), (0.0, 0.1), (0.0, 0.0)])
def test_each_term_switches_off_and_only_the_user_term_trains_the_synthesizer(alpha: float, beta: float) -> None:
    model, _ = _model(alpha=alpha, beta=beta)
    items = torch.tensor([[3, 4, 5, 0], [7, 8, 9, 10]])
    lengths, targets, users = torch.tensor([3, 4]), torch.tensor([6, 11]), torch.tensor([2, 7])
    model.train()
    torch.manual_seed(0)
    loss = model.loss(items, lengths, targets, users)
    loss.backward()
    synthesizer_grad = model.attention.grad
    assert (synthesizer_grad is not None and synthesizer_grad.abs().sum() > 0) == (alpha > 0)
    model.eval()
    plain = F.cross_entropy(model.item_logits(model.encode(items, lengths))[:, 1:], targets - 1)
    if alpha == beta == 0:
        assert torch.isclose(model.loss(items, lengths, targets, users), plain, atol=1e-5)


def test_lumos_train_sracl_with_ablation_flags(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_folder(generate(SyntheticConfig(num_users=80, items_per_category=8, seed=4)), tmp_path / "data")
    common = [
        "train",
        "--method",
        "sracl",
        "--data",
        str(data),
        "--epochs",
        "1",
        "--quiet",
        "--semantic",
        "raw-text",
        "--hidden-size",
        "16",
        "--inner-size",
        "32",
    ]
    out = tmp_path / "run"
    assert main([*common, "--out", str(out), "--no-user-cl", "--retrieval", "random", "--k", "4"]) == 0
    result = json.loads((out / "result.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert result["method"] == "sracl" and result["epochs"] == 1
    # the reported test metrics are those of the saved model
    saved = torch.load(out / "model.pt", weights_only=True)
    model = build_model("sracl", **saved["config"])
    model.load_state_dict(saved["state_dict"])
    dataset = load_dataset(data)
    assert evaluate(model, leave_one_out(dataset.sequences, dataset.num_items), "test", 50) == result["test"]
    assert config["model"]["alpha"] == 0.0 and config["model"]["beta"] == 0.1
    assert config["semantic"]["retrieval"] == "random" and config["semantic"]["k"] == 4
    assert result["semantic"]["source"] == "raw-text"
    assert main([*common, "--out", str(tmp_path / "top1"), "--synthesizer", "top1"]) == 0
    assert json.loads((tmp_path / "top1" / "config.json").read_text())["model"]["synthesizer"] == "top1"
    capsys.readouterr()
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "x"), "--alpha", "0.2"]) == 2
    assert "use them with sracl" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "negative"), "--beta", "-0.1"]) == 2
    assert "cannot be negative" in capsys.readouterr().err


@pytest.mark.slow
def test_sracl_table_reports_gains_ablations_and_llm_cost(tmp_path: Path, tiny_model_dir: Path) -> None:
    write_folder(generate(SyntheticConfig(num_users=60, items_per_category=6, seed=6)), tmp_path / "syn")
    out = tmp_path / "table"
    command = [
        sys.executable,
        str(ROOT / "experiments" / "table_sracl.py"),
        "--data-root",
        str(tmp_path),
        "--out",
        str(out),
        "--datasets",
        "syn",
        "--seeds",
        "1",
        "2",
        "--ablation-datasets",
        "syn",
        "--ablation-seeds",
        "1",
        "--epochs",
        "1",
        "--llm-model",
        str(tiny_model_dir),
        "--quiet",
    ]
    env = {**os.environ, "LUMOS_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "table_sracl.json").read_text())
    rows = summary["main"]["syn"]
    assert {"centralized-sasrec", "centralized-cl4srec", "sracl", "sracl raw-text"} <= set(rows)
    assert rows["sracl"]["HR@20"]["n"] == 2 and len(rows) == 3 + 5
    assert [run["seed"] for run in rows["sracl"]["runs"]] == [1, 2]
    first = json.loads((out / "syn" / "sracl" / "seed1" / "result.json").read_text())
    assert rows["sracl"]["runs"][0]["HR@20"] == first["test"]["unmasked"]["HR@20"]
    assert set(summary["gains"]["syn"]) == {"HR@20", "NDCG@20"}
    cost = summary["llm_cost"]["syn"]
    assert cost["users"] == 60 and cost["items"] > 0 and cost["tokens"] > 0 and cost["minutes"] > 0
    assert "| syn | sracl hard-rule synthesizer |" in (out / "report.md").read_text()

    # a run that reached its cap is run again under a larger one; then it is reused as it is
    longer = [
        *command[: command.index("--seeds")],
        "--methods",
        "centralized-sasrec",
        "--seeds",
        "1",
        "--ablation-datasets",
        "--epochs",
        "2",
        "--quiet",
    ]
    for expected in ("== syn / centralized-sasrec / seed 1", ""):
        done = subprocess.run(longer, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        assert ("==" in done.stdout) == bool(expected) and expected in done.stdout
    run = out / "syn" / "centralized-sasrec" / "seed1"
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 2


def test_a_catalog_without_titles_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "ids"
    folder.mkdir()
    (folder / "interactions.csv").write_text(
        "user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u in range(4) for t, i in enumerate([1, 2, 3, 4]))
    )
    (folder / "items.csv").write_text("item_id,title,categories\n1,,\n2,,\n3,,\n4,,\n")
    assert main(["train", "--method", "sracl", "--data", str(folder), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "SRA-CL reads item titles" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # a run that never started leaves no empty folder


def test_neighbour_agreement_scores_shared_items_and_categories() -> None:
    from experiments.semantic_neighbours import item_agreement, user_overlap

    item_sets = [{1, 2}, {2, 3}, {4}]
    # user 0's neighbour shares one of three items; user 2's shares nothing
    assert user_overlap(item_sets, np.array([[1], [0], [0]])) == pytest.approx((1 / 3 + 1 / 3 + 0) / 3)
    item_users = {1: {0}, 2: {0, 1}, 3: {1}, 4: {2}}
    categories = [(), ("a",), ("a", "b"), ("b",), ("c",)]
    neighbours = np.array([[0], [2], [3], [1], [4]])  # item 4's only neighbour is itself: left out
    found = item_agreement(item_users, categories, neighbours)
    assert found["co_occurring"] == pytest.approx(2 / 3)  # 1-2 and 2-3 share a user, 3-1 do not
    assert found["category_jaccard"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
