"""The server trusts no reply: every malformed or malicious reply a real ClientApp can send is a
counted failure of its round, never a crash, a poisoned model or a faked metric."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from lumosrec.client.client_app import app as real_client
from lumosrec.core.errors import ConfigError
from lumosrec.core.synthetic import SyntheticConfig, generate, write_folder
from lumosrec.launch.app import check_node_count, check_run_config, default_run_config
from lumosrec.launch.inprocess import run_in_process
from lumosrec.server import checkpoint
from lumosrec.server.server_app import fingerprint
from tests.conftest import SMALL_FEDERATION

SMALL = dict(num_users=60, items_per_category=10, seed=5)
ATTACKER = 1  # node id of the misbehaving node (of 3)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(generate(SyntheticConfig(**SMALL)), tmp_path_factory.mktemp("untrusted") / "data")


def _client(stage: str, tamper: Callable[[RecordDict], None]) -> ClientApp:
    """Lumos's ClientApp, except that node ``ATTACKER`` rewrites its ``stage`` reply with ``tamper``."""
    app = ClientApp()

    def reply(message: Message, context: Context, this_stage: str) -> Message:
        answer = real_client(message, context)
        if context.node_id == ATTACKER and this_stage == stage:
            tamper(answer.content)
        return answer

    app.train()(lambda message, context: reply(message, context, "train"))
    app.evaluate()(lambda message, context: reply(message, context, "evaluate"))
    return app


def _fails(content: RecordDict) -> None:
    raise RuntimeError("this node's reply is an error")


def _run(
    data_dir: Path, out: Path, client: ClientApp = real_client, **settings: object
) -> tuple[dict, list[dict], dict[str, torch.Tensor]]:
    run_in_process(
        {**SMALL_FEDERATION, "data": str(data_dir), "out-dir": str(out), **settings},
        client,
    )
    history = json.loads((out / "metrics.json").read_text())
    return json.loads((out / "result.json").read_text()), history, torch.load(out / "model.pt")["state_dict"]


def _item_table(content: RecordDict) -> tuple[str, np.ndarray]:
    key = next(k for k in content["arrays"] if "item" in k)
    return key, content["arrays"][key].numpy()


def _set(content: RecordDict, key: str, value: np.ndarray) -> None:
    content["arrays"][key] = Array(value)


def _wrong_shape(content: RecordDict) -> None:
    key, table = _item_table(content)
    _set(content, key, table[:1])  # a (1, d) table would broadcast over every row


def _extra_key(content: RecordDict) -> None:
    _set(content, "backdoor.weight", np.ones((4, 4), dtype=np.float32))


def _metric(name: str, value: object) -> Callable[[RecordDict], None]:
    def tamper(content: RecordDict) -> None:
        if value is None:
            del content["metrics"][name]
        else:
            content["metrics"][name] = value

    return tamper


def _non_finite(value: float) -> Callable[[RecordDict], None]:
    def tamper(content: RecordDict) -> None:
        key, table = _item_table(content)
        table = table.copy()
        table[3, 2] = value
        _set(content, key, table)

    return tamper


def _histogram(change: Callable[[list[int], int], list[int]]) -> Callable[[RecordDict], None]:
    def tamper(content: RecordDict) -> None:
        users = content["metrics"]["num-examples"]
        for key in [k for k in content["metrics"] if k.endswith("-at-rank")]:
            content["metrics"][key] = change(list(content["metrics"][key]), users)

    return tamper


TRAIN_ATTACKS = {
    "wrong shape": _wrong_shape,
    "extra key": _extra_key,
    "missing num-examples": _metric("num-examples", None),
    "negative num-examples": _metric("num-examples", -5),
    "10^12 num-examples": _metric("num-examples", 10**12),
    "NaN": _non_finite(float("nan")),
    "Inf": _non_finite(float("inf")),
}
EVALUATE_ATTACKS = {
    "short histogram": _histogram(lambda counts, users: counts[:5]),
    "inflated histogram": _histogram(lambda counts, users: [10 * users, *counts[1:]]),  # HR@20 far above 1
    "every user a hit": _histogram(lambda counts, users: [users * 1000] + [0] * (len(counts) - 1)),
    "negative num-examples": _metric("num-examples", -1000),
    "10^12 num-examples": _metric("num-examples", 10**12),
}


@pytest.fixture(scope="module")
def honest_failure(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """Runs in which the attacker's reply of each stage is an error reply instead: a rejected
    reply must leave exactly what a failed one leaves."""
    root = tmp_path_factory.mktemp("failing")
    return {stage: _run(data_dir, root / stage, _client(stage, _fails)) for stage in ("train", "evaluate")}


def _scores(history: list[dict]) -> list[tuple]:
    return [(row["train_loss"], row.get("valid"), row.get("test"), row.get("eval_users")) for row in history]


@pytest.mark.parametrize(
    ("stage", "attack"), [("train", name) for name in TRAIN_ATTACKS] + [("evaluate", n) for n in EVALUATE_ATTACKS]
)
def test_a_malicious_reply_is_a_counted_failure(
    data_dir: Path, tmp_path: Path, honest_failure: dict, stage: str, attack: str
) -> None:
    tamper = (TRAIN_ATTACKS if stage == "train" else EVALUATE_ATTACKS)[attack]
    result, history, model = _run(data_dir, tmp_path, _client(stage, tamper))
    expected_result, expected_history, expected_model = honest_failure[stage]

    rejected = "train_rejected" if stage == "train" else "eval_rejected"
    assert [row[rejected] for row in history] == [1, 1]  # counted in every round, and as a failure
    assert result["failures"] == expected_result["failures"] == 2 and result["skipped_rounds"] == 0
    assert model.keys() == expected_model.keys()
    assert all(torch.isfinite(value).all() for value in model.values())
    assert all(torch.equal(model[key], expected_model[key]) for key in model)
    assert _scores(history) == _scores(expected_history)  # metrics as if the node had simply failed
    assert 0 < result["test"]["unmasked"]["HR@20"] <= 1


def test_a_round_with_too_few_valid_replies_keeps_the_model(data_dir: Path, tmp_path: Path) -> None:
    def two_attackers(message: Message, context: Context) -> Message:
        answer = real_client(message, context)
        if context.node_id != 3 and message.metadata.message_type == "train":
            _non_finite(float("nan"))(answer.content)
        return answer

    app = ClientApp()
    app.train()(two_attackers)
    app.evaluate()(two_attackers)
    result, history, model = _run(data_dir, tmp_path, app)  # 1 valid reply of 3, min-nodes=2
    assert [bool(row["skipped"]) for row in history] == [True, True] and result["skipped_rounds"] == 2
    assert all(torch.isfinite(value).all() for value in model.values())
    assert history[0]["valid"] == history[1]["valid"]  # the initial model both times


def test_robust_rules_default_to_the_malicious_nodes_they_tolerate(data_dir: Path, tmp_path: Path) -> None:
    run = check_run_config({"data": str(data_dir), "strategy": "bulyan", "fraction-train": 1.0}, default_run_config())
    with pytest.raises(ConfigError, match=r"bulyan with 0 malicious node\(s\) needs at least 3 sampled nodes"):
        check_node_count(run, 2)
    with pytest.raises(ConfigError, match=r"needs at least 7 sampled nodes per round, and this run samples 3"):
        check_node_count({**run, "num-malicious-nodes": 1}, 3)
    # before, num-malicious-nodes=0 left Bulyan without the margin it needs, and nothing was aggregated
    overrides = {"data": str(data_dir), "out-dir": str(tmp_path), "strategy": "bulyan", "fraction-train": 1.0}
    overrides.update({"users-per-client": 8, "num-server-rounds": 1, "hidden-size": 16, "inner-size": 32})
    result = run_in_process(overrides)  # 8 nodes: Bulyan assumes 1 malicious
    assert result["skipped_rounds"] == 0 and result["test"]["unmasked"]["HR@20"] > 0


@pytest.mark.parametrize("weights", ["examples", "equal", "capped"])
def test_weights_the_server_sets_bound_an_inflated_count(data_dir: Path, tmp_path: Path, weights: str) -> None:
    # a count within max-reply-examples: the check accepts it, the weighting decides what it buys
    inflated = _client("train", _metric("num-examples", 10**5))
    settings = {"aggregation-weights": weights, "weight-cap": 1, "max-reply-examples": 10**6}
    _, _, honest = _run(data_dir, tmp_path / "honest", **settings)
    _, history, steered = _run(data_dir, tmp_path / "steered", inflated, **settings)
    assert history[-1]["train_rejected"] == 0
    unchanged = all(torch.equal(honest[key], steered[key]) for key in honest)
    assert unchanged == (weights != "examples")  # FedAvg's weights follow the claim; equal or capped ones do not


def test_dp_weighs_equally_and_reports_the_privacy_spent(data_dir: Path, tmp_path: Path) -> None:
    settings = {"dp-clipping-norm": 1.0, "dp-noise-multiplier": 0.5, "fraction-train": 1.0}
    result, history, _ = _run(data_dir, tmp_path, **settings)
    epsilons = [row["dp_epsilon"] for row in history]
    assert 0 < epsilons[0] < epsilons[1] == result["dp"]["epsilon"]  # each round spends more
    assert result["dp"]["delta"] == 1e-5 and result["skipped_rounds"] == 0
    with pytest.raises(ConfigError, match="DP runs weigh replies equally"):
        check_run_config({**settings, "aggregation-weights": "capped"}, default_run_config())


def test_a_non_finite_aggregate_is_never_the_global_model(data_dir: Path, tmp_path: Path) -> None:
    # a server step this large overflows float32: every reply is valid, the aggregate is not
    result, history, model = _run(data_dir, tmp_path, strategy="fedadam", **{"server-learning-rate": 1e39})
    assert [bool(row["skipped"]) for row in history] == [True, True] and result["skipped_rounds"] == 2
    assert all(torch.isfinite(value).all() for value in model.values())
    run = json.loads((tmp_path / "config.json").read_text())["run_config"]
    saved = checkpoint.load(tmp_path, fingerprint(run))
    assert saved.strategy_state.get("m_t") is None  # the server optimizer's moments are as before the rounds
