"""Secure aggregation (Flower's SecAgg+ between the real ServerApp loop and ClientApp, in one
process): the server learns the round's sums and nothing of a single reply, the sums are those of
the plain run, and a node that drops out mid-protocol is unmasked by its neighbours."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from lumosrec.client.client_app import app as client_app
from lumosrec.client.objectives import OBJECTIVES
from lumosrec.core.data import load_data
from lumosrec.core.errors import ConfigError
from lumosrec.core.evaluation import evaluate, leave_one_out
from lumosrec.launch.app import check_run_config, default_run_config
from lumosrec.launch.inprocess import RUN_ID, InProcessGrid, run_in_process
from lumosrec.server.secure import use_secure_aggregation
from lumosrec.server.server_app import run_rounds
from tests.conftest import SMALL_FEDERATION

pytestmark = pytest.mark.usefixtures("task_identity")

#: 4 nodes of 10 users, every node trains every round
FEDERATION = {**SMALL_FEDERATION, "users-per-client": 10, "min-nodes": 3}
COHORTS = {**SMALL_FEDERATION, "users-per-client": 1, "cohort-size": 10, "fraction-train": 0.5, "min-nodes": 3}


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", weights_only=True)["state_dict"]


def _history(out: Path) -> list[dict]:
    return json.loads((out / "metrics.json").read_text())


class _Grid(InProcessGrid):
    """The in-process grid, keeping every reply the server receives; ``drop`` (a node id) answers
    training messages with an error: those that carry a model (it is lost after sharing its keys),
    or every one (``offline``: it never answers)."""

    def __init__(self, *args, drop: int = 0, offline: bool = False, corrupt: int = 0) -> None:
        super().__init__(*args)
        self.replies: list[Message] = []
        self.drop, self.offline, self.corrupt = drop, offline, corrupt

    def _deliver(self, message: Message) -> Message:
        content = message.content
        carries_model = "arrays" in content or "fitins.parameters" in content.array_records
        lost = self.offline or carries_model
        if message.metadata.dst_node_id == self.drop and message.metadata.message_type == "train" and lost:
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "node lost"), reply_to=message)
        reply = super()._deliver(message)
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS, {}) if reply.has_content() else {}
        if message.metadata.dst_node_id == self.corrupt and Key.MASKED_PARAMETERS in configs:
            configs[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(np.zeros(3, dtype=np.int64))]  # a vector of 3 values
        return reply

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.replies.extend(replies)
        return replies


def _run(run_config: dict, out: Path, drop: int = 0, offline: bool = False, corrupt: int = 0) -> _Grid:
    run = check_run_config({**run_config, "out-dir": str(out)}, default_run_config())
    grid = _Grid(client_app, run, 4, drop=drop, offline=offline, corrupt=corrupt)
    run_rounds(grid, Context(RUN_ID, 0, {}, RecordDict(), run))
    return grid


#: a deployment's bound on a reply's examples: every node's weight is then a tiny share of it
LOOSE_BOUND = {**FEDERATION, "max-reply-examples": 100_000, "num-server-rounds": 1}


@pytest.mark.parametrize(
    ("federation", "tolerance"),
    # under the loose bound a node's ~40 examples weigh 4e-4 of the bound, and the rounding noise
    # grows by the inverse (at Flower's default range, 2**22, it would be 128 times larger still)
    [(FEDERATION, 1e-4), (COHORTS, 1e-4), (LOOSE_BOUND, 1e-3)],
    ids=["silos", "cohorts", "loose-bound"],
)
def test_secure_rounds_train_the_plain_model_and_evaluate_exactly(
    bare_run_config: dict, tmp_path: Path, federation: dict, tolerance: float
) -> None:
    run = {**bare_run_config, **federation}
    run_in_process({**run, "out-dir": str(tmp_path / "plain")})
    secure = run_in_process({**run, "secure-aggregation": True, "out-dir": str(tmp_path / "secure")})
    # the same mean update, up to SecAgg+'s quantization (2 x 8 / 2**30 per value and node, times
    # max-reply-examples over the node's examples)
    weights, plain_weights = _weights(tmp_path / "secure"), _weights(tmp_path / "plain")
    assert max(float((weights[k] - plain_weights[k]).abs().max()) for k in weights) < tolerance
    assert [r["train_loss"] for r in _history(tmp_path / "secure")] == pytest.approx(
        [r["train_loss"] for r in _history(tmp_path / "plain")], rel=1e-5
    )
    # the securely summed histograms are the centralized evaluation of the model, exactly
    dataset = load_data(run["data"])
    model = OBJECTIVES["sasrec"].build_model(run, dataset.num_items)
    model.load_state_dict(weights)
    split = leave_one_out(dataset.sequences, dataset.num_items)
    assert secure["test"] == evaluate(model, split, "test", int(run["max-len"]))
    assert all(row["eval_users"] == dataset.num_users for row in _history(tmp_path / "secure"))


def test_the_server_receives_masked_vectors_and_no_single_update(bare_run_config: dict, tmp_path: Path) -> None:
    grid = _run({**bare_run_config, **FEDERATION, "num-server-rounds": 1, "secure-aggregation": True}, tmp_path / "run")
    assert grid.replies
    assert not any(len(arrays) for reply in grid.replies for arrays in reply.content.array_records.values())
    masked = [
        np.concatenate([bytes_to_ndarray(b).ravel() for b in reply.content[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]])
        for reply in grid.replies
        if Key.MASKED_PARAMETERS in reply.content.config_records.get(RECORD_KEY_CONFIGS, {})
    ]
    assert len(masked) == 2 * 4  # the training and the evaluation exchange, each node once
    for vector in masked:
        # unmasked, every quantized value lies below the quantization range 2**22; masked, the
        # values are uniform over SecAgg+'s modulus 2**32, and 1 in 1,024 lies there
        assert np.mean(vector < 2**22) < 0.02


@pytest.mark.parametrize("offline", [False, True], ids=["lost-after-sharing-keys", "offline-from-the-start"])
def test_a_lost_node_costs_its_update_not_the_round(bare_run_config: dict, tmp_path: Path, offline: bool) -> None:
    """Lost after sharing its keys, a node is unmasked from its neighbours' shares; offline from the
    start (Flower 1.41's workflow alone fails that round), it is left out."""
    run = {**bare_run_config, **FEDERATION}
    _run(run, tmp_path / "plain", drop=2)
    _run({**run, "secure-aggregation": True}, tmp_path / "secure", drop=2, offline=offline)
    history = _history(tmp_path / "secure")
    assert [row["train_failures"] for row in history] == [1, 1] and not any(row["skipped"] for row in history)
    weights, plain_weights = _weights(tmp_path / "secure"), _weights(tmp_path / "plain")
    assert max(float((weights[k] - plain_weights[k]).abs().max()) for k in weights) < 1e-4


def test_a_malformed_masked_vector_costs_its_round_not_the_run(bare_run_config: dict, tmp_path: Path) -> None:
    _run({**bare_run_config, **FEDERATION, "secure-aggregation": True}, tmp_path / "run", corrupt=3)
    history = _history(tmp_path / "run")
    assert [row["round"] for row in history] == [1, 2]
    assert all(row["skipped"] and "valid" not in row for row in history)  # no sum, no model, no metrics
    assert json.loads((tmp_path / "run" / "result.json").read_text())["skipped_rounds"] == 2


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"strategy": "fedmedian"}, "needs each update"),
        ({"dp-clipping-norm": 1.0}, "with DP clipping needs each update"),
        ({"aggregation-weights": "equal"}, "use aggregation-weights=examples"),
        ({"users-per-client": 20, "min-nodes": 2}, "at least 3 nodes per round"),
        ({"secure-aggregation-shares": 2}, "at least 3"),
        ({"secure-aggregation": "yes"}, 'true, false or "auto"'),
    ],
)
def test_runs_secure_aggregation_cannot_serve_are_refused_in_one_line(
    bare_run_config: dict, tmp_path: Path, settings: dict, message: str
) -> None:
    run = {**bare_run_config, **FEDERATION, "secure-aggregation": True, **settings, "out-dir": str(tmp_path)}
    with pytest.raises(ConfigError, match=message) as refused:
        run_in_process(run)
    assert "\n" not in str(refused.value)


def test_auto_aggregates_securely_in_deployments_that_allow_it(
    bare_run_config: dict, caplog: pytest.LogCaptureFixture
) -> None:
    deployment = {**bare_run_config, "catalog": "/nodes/catalog", "secure-aggregation": "auto"}
    assert use_secure_aggregation(deployment, linear=True, sampled_nodes=3)
    assert not use_secure_aggregation({**deployment, "catalog": ""}, linear=True, sampled_nodes=3)  # a simulation
    with caplog.at_level("WARNING", logger="lumos.server"):
        assert not use_secure_aggregation({**deployment, "strategy": "krum"}, linear=False, sampled_nodes=5)
    assert "secure aggregation is off" in caplog.text and "needs each update" in caplog.text
    assert not use_secure_aggregation(deployment, linear=True, sampled_nodes=2)


#: a deployed node's process for one SecAgg+ key message: load the ClientApp, answer the setup stage
_KEY_MESSAGE_ALONE = """
import sys
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.task_identity import TaskIdentity
from lumosrec.client.client_app import app

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 0  # as flwr-clientapp sets them
setup = ConfigRecord({Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3, Key.THRESHOLD: 2,
    Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 2**30, Key.MOD_RANGE: 2**32, Key.MAX_WEIGHT: 1000.0})
message = Message(RecordDict({RECORD_KEY_CONFIGS: setup}), dst_node_id=1, message_type=MessageType.TRAIN)
reply = app(message, Context(1, 1, {}, RecordDict(), {}))
assert not reply.has_error(), reply.error
assert set(reply.content[RECORD_KEY_CONFIGS]) == {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2}
print("torch" in sys.modules)
"""


def test_a_key_message_spares_the_node_torch() -> None:
    # a deployed SuperNode starts a ClientApp process per message: SecAgg+'s key messages
    # should pay for Python and Flower, not for torch and the model as well
    alone = subprocess.run([sys.executable, "-c", _KEY_MESSAGE_ALONE], capture_output=True, text=True, check=True)
    assert alone.stdout.strip() == "False"
    then_trained = _KEY_MESSAGE_ALONE.replace('print("torch"', 'import lumosrec.client.local\nprint("torch"')
    trained = subprocess.run([sys.executable, "-c", then_trained], capture_output=True, text=True, check=True)
    assert trained.stdout.strip() == "True"  # the check sees torch where a handler imports it
