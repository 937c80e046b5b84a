"""LUMOS: the tri-view objective, parameter isolation on the client, views made once and kept
local, every method through one runner, the results report, and LUMOS on Flower's simulation."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.serde import message_to_proto

from lumosrec.augment import client_views as client_views_module
from lumosrec.augment.client_views import ViewSettings, client_views
from lumosrec.client.client_app import app as client_app
from lumosrec.client.objectives import OBJECTIVES, objective_for
from lumosrec.client.objectives.lumos import PRIVATE_KEY, restore_private
from lumosrec.core.data import node_data, run_data
from lumosrec.core.synthetic import SyntheticConfig, generate, write_folder
from lumosrec.launch.app import default_run_config
from lumosrec.launch.simulate import simulate
from lumosrec.launch.tables import MAIN_METRICS, PROTOCOL
from lumosrec.models.lumos import LUMOS, LUMOSConfig, UserViews
from lumosrec.models.sasrec import SASRec, SASRecConfig

pytestmark = pytest.mark.usefixtures("task_identity")

SMALL = dict(num_users=60, items_per_category=10, seed=5)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(generate(SyntheticConfig(**SMALL)), tmp_path_factory.mktemp("lumos") / "syn")


@pytest.fixture
def run_config(data_dir: Path, tmp_path: Path) -> dict:
    return {
        **default_run_config(),
        "data": str(data_dir),
        "hidden-size": 16,
        "inner-size": 32,
        "objective": "lumos",
        "views": "retrieval",
        "views-dir": str(tmp_path / "views"),
    }


def _model(**overrides) -> LUMOS:
    """A small LUMOS with the InfoNCE terms on and the item-level terms off, unless overridden."""
    torch.manual_seed(0)
    weights = {"lambda_future": 0.02, "lambda_paraphrase": 0.02, "future_target_weight": 0.0, **overrides}
    return LUMOS(LUMOSConfig(num_items=30, max_len=6, hidden_size=16, inner_size=32, **weights)).eval()


VIEWS = UserViews(
    [
        {"future": [21, 22], "paraphrase": [23, 24, 25], "counterfactual": [26, 27, 28]},
        {"future": [29], "paraphrase": [], "counterfactual": [30]},
    ]
)


BATCH = (
    torch.tensor([[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]]),
    torch.tensor([5, 2]),
    torch.tensor([6, 8]),
    torch.tensor([0, 1]),
)


def test_view_sequences_extend_or_rewrite_the_prefix() -> None:
    items, lengths, _, users = BATCH
    sequences = _model().view_sequences(items, lengths, users, VIEWS)

    def rows(name):
        seq, n, has = sequences[name]
        return [seq[i, : n[i]].tolist() for i in range(len(n))], has.tolist()

    # future: the prefix continued (the last max_len = 6 items kept)
    assert rows("future") == ([[2, 3, 4, 5, 21, 22], [6, 7, 29]], [True, True])
    # paraphrase / counterfactual: the most recent items replaced; no paraphrase -> no term
    assert rows("paraphrase") == ([[1, 2, 23, 24, 25], [6, 7]], [True, False])
    assert rows("counterfactual") == ([[1, 2, 26, 27, 28], [6, 30]], [True, True])


def test_only_the_backbone_is_shared_and_the_views_train_it() -> None:
    model = _model()
    assert set(model.shared_state_dict()) == set(
        SASRec(SASRecConfig(num_items=30, max_len=6, hidden_size=16, inner_size=32)).state_dict()
    )
    assert set(model.private_state_dict()) and all("projection" not in k for k in model.shared_state_dict())
    items, lengths, targets, users = BATCH
    plain = SASRec.loss(model, items, lengths, targets)
    assert model.loss(items, lengths, targets, users) == plain  # no views: SASRec's loss
    total = model.loss(items, lengths, targets, users, views=VIEWS)
    assert total > plain
    total.backward()
    view_only_items = [21, 22, 26, 29]  # in no input sequence and no target
    assert model.item_embedding.weight.grad[view_only_items].abs().sum(1).min() > 0
    assert model.projection[0].weight.grad.abs().sum() > 0


def test_counterfactual_is_a_hard_negative_and_zero_weights_give_sasrec() -> None:
    items, lengths, targets, users = BATCH
    with torch.no_grad():
        with_negative = _model().loss(items, lengths, targets, users, views=VIEWS)
        without_negative = _model(use_counterfactual=False).loss(items, lengths, targets, users, views=VIEWS)
        # one more term in every softmax denominator can only raise InfoNCE
        assert with_negative > without_negative
        off = _model(lambda_future=0.0, lambda_paraphrase=0.0)
        assert off.loss(items, lengths, targets, users, views=VIEWS) == SASRec.loss(off, items, lengths, targets)


def _view_item_probability(model: LUMOS, view: str) -> float:
    """The mean log-probability the model gives the views' items of ``view`` on BATCH."""
    items, lengths, _, users = BATCH
    with torch.no_grad():
        logits = model.score(items, lengths)
        logits[:, 0] = -torch.inf
        log_probs = torch.log_softmax(logits, -1)
        chosen = VIEWS.items[view][users]
        return float(log_probs.gather(1, chosen)[chosen > 0].mean())


@pytest.mark.parametrize(
    "weight, view, direction",
    [("future_target_weight", "future", 1.0), ("counterfactual_negative_weight", "counterfactual", -1.0)],
)
def test_item_level_view_terms_move_the_views_items_in_the_item_table(weight: str, view: str, direction: float) -> None:
    """Future items become likelier, counterfactual items less likely, than under SASRec's loss alone."""
    moved = {}
    for value in (0.0, 1.0):
        model = _model(lambda_future=0.0, lambda_paraphrase=0.0, **{weight: value})
        before = _view_item_probability(model, view)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)  # small: one step in the linear regime
        model.loss(*BATCH, views=VIEWS).backward()
        optimizer.step()
        moved[value] = _view_item_probability(model, view) - before
    assert direction * (moved[1.0] - moved[0.0]) > 0


def test_future_targets_serve_the_last_prefixes_only_within_the_horizon() -> None:
    *_, targets, users = BATCH  # targets 6 and 8
    model = _model(future_target_weight=1.0)
    log_probs = torch.log_softmax(torch.randn(2, 31), -1)
    everywhere = model.view_item_terms(log_probs, users, targets, VIEWS)
    # user 0's last training item is its row's target, user 1's is not
    recent = UserViews([{"future": [21, 22]}, {"future": [29]}], recent=[[5, 6], [7]])
    near_end = model.view_item_terms(log_probs, users, targets, recent)
    assert float(near_end[0]) == pytest.approx(float(everywhere[0])) and float(everywhere[0]) > 0
    assert float(near_end[1]) == 0.0 < float(everywhere[1])


def test_paraphrase_substitution_replaces_the_recent_items_in_place() -> None:
    items, lengths, _, users = BATCH
    every = _model(paraphrase_substitution=1.0).substitute_paraphrases(items, lengths, users, VIEWS)
    # user 0: the last three items by its paraphrase items in order; user 1 has no paraphrase view
    assert every.tolist() == [[1, 2, 23, 24, 25], [6, 7, 0, 0, 0]]
    torch.manual_seed(1)
    some = _model(paraphrase_substitution=0.5).substitute_paraphrases(items, lengths, users, VIEWS)
    # each recent position keeps its item or takes the paraphrase item of its place, nothing else
    assert all(int(s) in (int(i), int(e)) for s, i, e in zip(some.flatten(), items.flatten(), every.flatten()))
    assert some[:, :2].tolist() == items[:, :2].tolist()


def _train(run_config: dict, context: Context, arrays: ArrayRecord) -> Message:
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})})
    message = Message(content, dst_node_id=context.node_id, message_type=MessageType.TRAIN)
    return client_app(message, context)


def test_views_and_head_stay_on_the_lumos_client(run_config: dict) -> None:
    dataset = run_data(run_config)
    user, partitions = 7, dataset.num_users
    context = Context(
        run_id=1,
        node_id=107,
        node_config={"partition-id": user, "num-partitions": partitions},
        state=RecordDict(),
        run_config=run_config,
    )
    global_model = OBJECTIVES["sasrec"].build_model(run_config, dataset.num_items)
    reply = _train(run_config, context, ArrayRecord(global_model.state_dict()))
    assert not reply.has_error(), reply.error
    sent = reply.content["arrays"].to_torch_state_dict()
    assert set(sent) == set(global_model.state_dict())  # the backbone only: no projection head
    assert PRIVATE_KEY in context.state.array_records  # the head stays in the node's state
    data = node_data(run_config, context.node_config)
    settings = ViewSettings.from_config(run_config, context.node_config)
    views = client_views(data.dataset, data.users.tolist(), data.split.train, settings)[0]
    view_items = {item for items in views.values() for item in items}
    titles = {dataset.titles[i] for i in view_items | set(dataset.sequences[user].tolist())}
    wire = message_to_proto(reply).SerializeToString()
    assert view_items and not any(title.encode() in wire for title in titles)
    assert settings.cache_path(dataset.name).is_file()  # the views live in the node's cache


def test_a_node_gets_its_own_head_back_and_a_new_node_a_fresh_one(run_config: dict) -> None:
    model = objective_for(run_config).build_model(run_config, 50)
    kept = {k: torch.full_like(v, 0.5) for k, v in model.private_state_dict().items()}
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config)
    context.state.array_records[PRIVATE_KEY] = ArrayRecord(kept)
    restore_private(model, context)
    assert all(torch.equal(model.private_state_dict()[k], kept[k]) for k in kept)
    restore_private(model, Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config=run_config))
    assert not torch.equal(model.projection[0].weight, kept["0.weight"])


def test_views_without_item_text_follow_the_received_model(run_config: dict) -> None:
    dataset = run_data(run_config)
    blank = type(dataset)(
        dataset.name + "-ids",
        dataset.sequences,
        dataset.user_ids,
        dataset.item_ids,
        [""] * len(dataset.titles),
        [()] * len(dataset.titles),
    )
    histories = [s[:-2] for s in blank.sequences[:3]]
    settings = ViewSettings.from_config(run_config, {})
    with pytest.raises(ValueError, match="item embeddings"):
        client_views(blank, [0, 1, 2], histories, settings)
    first = client_views(
        blank, [0, 1, 2], histories, settings, np.random.default_rng(0).normal(size=(blank.num_items + 1, 8))
    )
    second = client_views(
        blank, [0, 1, 2], histories, settings, np.random.default_rng(1).normal(size=(blank.num_items + 1, 8))
    )
    assert all(len(v["future"]) == settings.items_per_view for v in first)
    assert first != second


def test_views_over_the_model_follow_it_on_a_text_catalog_too(run_config: dict) -> None:
    run = {**run_config, "views": "model"}
    dataset = run_data(run)
    histories = [s[:-2] for s in dataset.sequences[:3]]
    settings = ViewSettings.from_config(run, {})
    tables = [np.random.default_rng(seed).normal(size=(dataset.num_items + 1, 8)) for seed in (0, 1)]
    first, second = (client_views(dataset, [0, 1, 2], histories, settings, table) for table in tables)
    assert first != second  # the text would give the same views twice
    assert OBJECTIVES["lumos"].prepare_ahead(run, progress=False) is None  # nothing to make ahead


@pytest.mark.slow
def test_llm_views_are_made_once_before_the_federation(run_config: dict, tiny_model_dir: Path) -> None:
    run_config = {
        **run_config,
        "views": "llm",
        "views-model": str(tiny_model_dir),
        "views-backend": "transformers",
        "sample-users": 12,
    }
    report = OBJECTIVES["lumos"].prepare_ahead(run_config, progress=False)
    assert report["stats"]["made"] == 12 and report["model"]["loaded"]
    data = node_data(run_config, {"partition-id": 0, "num-partitions": 1})
    settings = ViewSettings.from_config(run_config, {})
    views = client_views(data.dataset, data.users.tolist(), data.split.train, settings)
    assert len(views) == 12 and all(set(v) == {"future", "paraphrase", "counterfactual"} for v in views)
    # every user's views came from the cache: the client never loaded the LLM
    loaded = [
        maker.generator._generator
        for dataset, maker in client_views_module._MAKERS.values()
        if maker.generator is not None
    ]
    assert loaded and all(generator is None for generator in loaded)
    # nor did the launcher, the second time: every view was cached
    again = OBJECTIVES["lumos"].prepare_ahead(run_config, progress=False)
    assert again["stats"]["from_cache"] == 12 and not again["model"]["loaded"]


@pytest.mark.slow
def test_only_the_fixed_llm_subset_gets_llm_views_and_the_others_text_retrieval(
    run_config: dict, tiny_model_dir: Path
) -> None:
    run_config = {
        **run_config,
        "views": "llm",
        "views-model": str(tiny_model_dir),
        "views-backend": "transformers",
        "sample-users": 12,
        "views-llm-users": 3,
        "views-llm-seed": 5,
    }
    report = OBJECTIVES["lumos"].prepare_ahead(run_config, progress=False)
    assert report["users"] == 3 and report["stats"]["made"] == 3  # the LLM wrote for the subset only
    data = node_data(run_config, {"partition-id": 0, "num-partitions": 1})
    settings = ViewSettings.from_config(run_config, {})
    subset = settings.llm_subset(data.dataset)
    users = data.users.tolist()
    views = client_views(data.dataset, users, data.split.train, settings)
    retrieval = client_views(data.dataset, users, data.split.train, settings.without_llm())
    outside = [i for i, user in enumerate(users) if user not in subset]
    assert len(outside) == 9 and [views[i] for i in outside] == [retrieval[i] for i in outside]
    loaded = [maker.generator._generator for _, maker in client_views_module._MAKERS.values() if maker.generator]
    assert loaded and all(generator is None for generator in loaded)  # the subset's LLM views were cached
    assert "(3 users, seed 5)" in objective_for(run_config).result_details(run_config)["views"]


def _table_again(command: list[str], start: str, end: str, *arguments: str) -> None:
    """``command`` with its flags from ``start`` up to ``end`` replaced by ``arguments``; must succeed."""
    done = subprocess.run(
        [*command[: command.index(start)], *arguments, *command[command.index(end) :]],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_every_row_runs_through_one_runner_into_one_report(tmp_path: Path, tiny_model_dir: Path) -> None:
    # named as the dataset whose LLM views cover a fixed subset of users
    data = write_folder(generate(SyntheticConfig(**SMALL)), tmp_path / "data" / "amazon-beauty")
    out = tmp_path / "table"
    rows = ["centralized-sasrec", "local-sasrec", "fedavg-sasrec", "fedavg-sasrec-text-init", "lumos"]
    rows += ["lumos-text-init", "lumos-llm-text-init"]
    command = [
        sys.executable,
        str(ROOT / "experiments" / "table_main.py"),
        "--data-root",
        str(data.parent),
        "--out",
        str(out),
        "--datasets",
        data.name,
        "--rows",
        *rows,
        "--seeds",
        "1",
        "2",
        "3",
        "--ablation-datasets",
        data.name,
        "--ablations",
        "w/o future",
        "item-level-only",
        "--ablation-seeds",
        "1",
        "--rounds",
        "2",
        "--fraction-train",
        "0.5",
        "--local-epochs",
        "1",
        "--llm-users",
        "8",
        "--views-root",
        str(tmp_path / "views"),
        "--quiet",
        "--run-config",
        f'cohort-size=0 users-per-client=6 hidden-size=16 inner-size=32 eval-every=1 views-model="{tiny_model_dir}"'
        ' views-backend="transformers"',
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "table_main.json").read_text())
    main = summary["main"][data.name]
    assert list(main) == rows
    # Beauty's seed count (2 of the 3 asked), one seed for the per-user models
    assert {row: entry["seeds"] for row, entry in main.items()} == {
        row: [1] if row == "local-sasrec" else [1, 2] for row in rows
    }
    assert all(entry["complete"] for entry in main.values())
    assert main["lumos"]["views"] == "retrieval:text"
    assert main["lumos-llm-text-init"]["views"] == "llm-rank (8 users, seed 0), retrieval:text (the others)"
    config = json.loads((out / data.name / "lumos-text-init" / "seed1" / "config.json").read_text())["run_config"]
    assert (config["item-init"], config["learning-rate"], config["views"]) == ("text", 0.1, "retrieval")
    # Beauty's every-prefix targets (lumos) give way to the last 5 prefixes over a text table
    assert config["lumos-future-horizon"] == 5
    assert (
        json.loads((out / data.name / "lumos" / "seed1" / "config.json").read_text())["run_config"][
            "lumos-future-horizon"
        ]
        == 0
    )
    gains = summary["gains"][data.name]
    assert set(gains["lumos-text-init"]) == set(rows) - {"lumos-text-init"}
    # the subset table scores every saved model on the LLM's 8 users: a result of its own
    subset = summary["llm_subset_main"][data.name]
    assert set(subset) == set(rows) - {"local-sasrec"}
    assert subset["fedavg-sasrec"]["summary"]["HR@20"] != main["fedavg-sasrec"]["summary"]["HR@20"]
    ablations = summary["ablation"][data.name]
    assert list(ablations) == ["lumos-text-init", "w/o future", "item-level only"]
    ablated = json.loads((out / data.name / "wo-future" / "seed1" / "config.json").read_text())["run_config"]
    assert (ablated["lumos-future-targets"], ablated["lumos-lambda-future"], ablated["lumos-lambda-paraphrase"]) == (
        0.0,
        0.0,
        0.02,
    )
    times = summary["round_times"][data.name]
    lumos_rounds = [
        row["train_seconds"]
        for seed in (1, 2)
        for row in json.loads((out / data.name / "lumos" / f"seed{seed}" / "metrics.json").read_text())
    ]
    assert times["lumos"]["seconds"] == pytest.approx(statistics.median(lumos_rounds))
    assert times["lumos"]["ratio"] == pytest.approx(times["lumos"]["seconds"] / times["fedavg-sasrec"]["seconds"])
    assert "centralized-sasrec" not in times
    assert (out / f"curve_{data.name}.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "| amazon-beauty | w/o future | 1/1 |" in report and f"curve_{data.name}.png" in report
    assert summary["missing"] == [] and "## Not yet run (0)" in report
    # another machine, without the run folders: the rows come back from the committed JSON, and
    # a seed run there adds to a row whose other seed an earlier session ran
    elsewhere = tmp_path / "elsewhere"
    earlier = json.loads((out / "table_main.json").read_text())
    seed1 = json.loads((out / data.name / "lumos" / "seed1" / "result.json").read_text())["test"][PROTOCOL]
    earlier["main"][data.name]["lumos"].update(
        seeds=[1], summary={m: {"mean": seed1[m], "std": 0.0, "n": 1} for m in MAIN_METRICS}
    )
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    shutil.copytree(out / data.name / "lumos" / "seed2", elsewhere / data.name / "lumos" / "seed2")
    _table_again(
        command,
        "--out",
        "--datasets",
        "--out",
        str(elsewhere),
        "--earlier",
        str(tmp_path / "earlier.json"),
        "--report-only",
    )
    rebuilt = json.loads((elsewhere / "table_main.json").read_text())
    for row, entry in rebuilt["main"][data.name].items():
        assert entry["seeds"] == main[row]["seeds"]
        for metric in MAIN_METRICS:
            assert entry["summary"][metric] == pytest.approx(main[row]["summary"][metric])
    assert all(entry["earlier"] for row, entry in rebuilt["main"][data.name].items() if row != "lumos")
    assert rebuilt["main"][data.name]["lumos"]["earlier_seeds"] == [1] and rebuilt["missing"] == []
    text = (elsewhere / "report.md").read_text()
    assert f"| {data.name} | fedavg-sasrec | 2/2 (earlier) |" in text
    assert f"| {data.name} | lumos | 2/2 (1 earlier) |" in text
    lumos_result = out / data.name / "lumos" / "seed1" / "result.json"
    written = lumos_result.stat().st_mtime_ns
    _table_again(command, "--rows", "--rounds", "--rows", "lumos", "fed-cl4srec", "--seeds", "1", "--ablation-datasets")
    assert lumos_result.stat().st_mtime_ns == written  # finished runs are reused, not rerun
    assert json.loads((out / "table_main.json").read_text())["main"][data.name]["fed-cl4srec"]["seeds"] == [1]


@pytest.mark.slow
def test_lumos_runs_on_flowers_simulation(data_dir: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    result = simulate(
        {
            "data": str(data_dir),
            "out-dir": str(tmp_path / "run"),
            "num-server-rounds": 2,
            "users-per-client": 10,
            "fraction-train": 0.5,
            "hidden-size": 16,
            "inner-size": 32,
            "objective": "lumos",
            "views": "llm",
            "views-model": str(tiny_model_dir),
            "views-backend": "transformers",
            "views-dir": str(tmp_path / "views"),
            "eval-every": 1,
        },
        client_cpus=1,
        timeout=600,
        progress=False,
    )
    assert result["method"] == "lumos" and result["failures"] == 0
    assert result["test"]["unmasked"]["HR@20"] > 0
    assert json.loads((tmp_path / "views" / "report.json").read_text())["stats"]["users"] == SMALL["num_users"]
