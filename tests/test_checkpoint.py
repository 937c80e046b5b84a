"""Checkpoints hold only tensors and plain values: every strategy resumes exactly, and a planted
or old pickled file is refused without running anything it carries."""

from __future__ import annotations

import pathlib
import pickle
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import RdpAccountant, SamplingMethod
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAdam, FedAvg, Strategy

from lumosrec.core.errors import ConfigError
from lumosrec.launch.app import default_run_config
from lumosrec.launch.inprocess import InProcessGrid
from lumosrec.server import checkpoint
from lumosrec.server.strategies import STRATEGIES, build_strategy

NODES = 7  # enough for Bulyan to tolerate one malicious node (n >= 4f + 3)
DP = {"dp-clipping-norm": 1.0, "dp-noise-multiplier": 0.5}
CASES = {
    **{name: {"strategy": name} for name in STRATEGIES},
    "dp-fedavg": {"strategy": "fedavg", **DP},  # with Flower's privacy accountant
    "dp-fedadam": {"strategy": "fedadam", **DP},  # the inner strategy's moments under "inner"
    "dp-fedavgm": {"strategy": "fedavgm", **DP},
}
#: cases whose next global model depends on state carried over from earlier rounds
STATEFUL_MODEL = {"fedavgm", "fedadam", "fedyogi", "dp-fedadam", "dp-fedavgm"}

client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    """A node's update: the global arrays plus noise that depends on the node and the round."""
    config = msg.content["config"]
    rng = np.random.default_rng([context.node_id, int(config["server-round"])])
    arrays = {key: array.numpy() for key, array in msg.content["arrays"].items()}
    updated = {key: Array((a + rng.normal(0.0, 0.1, a.shape)).astype(a.dtype)) for key, a in arrays.items()}
    # equal weights: Flower's accountant refuses anything else
    metrics = MetricRecord({str(config["weight-key"]): 10, "num-examples": 10, "train-loss": 1.0})
    return Message(RecordDict({"arrays": ArrayRecord(updated), "metrics": metrics}), reply_to=msg)


def _build(case: str) -> Strategy:
    run = {**default_run_config(), **CASES[case], "fraction-train": 1.0, "min-nodes": NODES}
    return build_strategy(run, NODES)


def _round(strategy: Strategy, grid: InProcessGrid, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
    """One real training round: Flower's configure_train, the ClientApp, Flower's aggregate_train."""
    weight_key = getattr(strategy, "strategy", strategy).weighted_by_key
    config = ConfigRecord({"server-round": server_round, "weight-key": weight_key})
    messages = list(strategy.configure_train(server_round, arrays, config, grid))
    # sampled in random order: sorted, so two strategies aggregate the same replies in the same order
    replies = sorted(grid.send_and_receive(messages), key=lambda reply: reply.metadata.src_node_id)
    np.random.seed(server_round)  # the DP wrapper's noise
    aggregated, _ = strategy.aggregate_train(server_round, replies)
    assert aggregated is not None
    return aggregated


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in record.items()}


def _assert_same(restored: object, original: object, where: str) -> None:
    """Equal values of equal types, arrays bit for bit."""
    assert type(restored) is type(original), where
    if isinstance(original, np.ndarray | np.generic):
        assert restored.dtype == original.dtype, where
        np.testing.assert_array_equal(restored, original, err_msg=where)
    elif isinstance(original, ArrayRecord):
        _assert_same(_numpy(restored), _numpy(original), where)
    elif isinstance(original, RdpAccountant):
        assert restored.state_dict() == original.state_dict(), where
    elif isinstance(original, dict):
        assert list(restored) == list(original), where
        for key in original:
            _assert_same(restored[key], original[key], f"{where}[{key!r}]")
    elif isinstance(original, list | tuple):
        assert len(restored) == len(original), where
        for i, (a, b) in enumerate(zip(restored, original, strict=True)):
            _assert_same(a, b, f"{where}[{i}]")
    else:
        assert restored == original, where


def _state(strategy: Strategy) -> dict:
    return {key: value for key, value in vars(strategy).items() if not callable(value) and key != "strategy"}


@pytest.mark.parametrize("case", CASES)
def test_every_strategy_resumes_exactly(case: str, tmp_path: Path) -> None:
    grid = InProcessGrid(client, {}, NODES)
    rng = np.random.default_rng(0)
    arrays = ArrayRecord(
        {"item.weight": Array(rng.normal(size=(6, 4)).astype(np.float32)), "bias": Array(np.zeros(4, np.float32))}
    )
    original = _build(case)
    for server_round in (1, 2):
        arrays = _round(original, grid, server_round, arrays)
    inner = getattr(original, "strategy", original)
    # the state the checkpoint must carry exists: momentum, moments, a privacy ledger
    if case.endswith("fedavgm"):
        assert inner.momentum_vector is not None
    if case.endswith(("fedadam", "fedyogi")):
        assert inner.m_t is not None and inner.v_t is not None
    if case == "dp-fedavg":
        assert original.accountant.num_releases == 2

    state = checkpoint.RoundState(2, arrays.to_torch_state_dict(), [{"round": 1}, {"round": 2}], fingerprint={"x": 1})
    checkpoint.save(tmp_path, state, original)
    loaded = checkpoint.load(tmp_path, {"x": 1})
    assert loaded.completed_rounds == 2 and loaded.history == state.history
    _assert_same(_numpy(ArrayRecord(loaded.state_dict)), _numpy(arrays), "model")
    restored = _build(case)
    checkpoint.restore_strategy(restored, loaded)
    _assert_same(_state(restored), _state(original), type(original).__name__)
    if restored is not getattr(restored, "strategy", restored):
        _assert_same(_state(restored.strategy), _state(original.strategy), "inner")

    # the third round from the restored strategy is the one the uninterrupted run computes
    resumed_arrays = ArrayRecord(loaded.state_dict)
    expected = _numpy(_round(original, grid, 3, arrays))
    resumed = _numpy(_round(restored, grid, 3, resumed_arrays))
    for key in expected:
        np.testing.assert_array_equal(resumed[key], expected[key], err_msg=key)
    # ... and one that lost the state would not be: the comparison above can fail
    if case in STATEFUL_MODEL:
        fresh = _numpy(_round(_build(case), grid, 3, ArrayRecord(loaded.state_dict)))
        assert any(not np.array_equal(fresh[key], expected[key]) for key in expected)
    if case == "dp-fedavg":
        assert restored.privacy_spent() == original.privacy_spent()
        assert restored.accountant.num_releases == 3
        fresh_strategy = _build(case)
        _round(fresh_strategy, grid, 3, ArrayRecord(loaded.state_dict))
        assert fresh_strategy.privacy_spent().epsilon < original.privacy_spent().epsilon


@pytest.mark.parametrize(
    "value",
    [Fraction(1, 3), SamplingMethod.POISSON, np.zeros(2, dtype=object)],
    ids=["fraction", "str-enum", "object-array"],
)
@pytest.mark.parametrize("wrapped", [False, True])
def test_state_that_would_need_pickle_fails_at_save(value: object, wrapped: bool, tmp_path: Path) -> None:
    fedavg = FedAvg()
    strategy = DifferentialPrivacyServerSideFixedClipping(fedavg, 0.5, 1.0, 2) if wrapped else fedavg
    state = checkpoint.RoundState(1, {"w": torch.ones(2)}, fingerprint={"x": 1})
    checkpoint.save(tmp_path, state, strategy)
    before = (tmp_path / checkpoint.CHECKPOINT_FILE).read_bytes()
    fedavg.odd_state = value
    state.completed_rounds = 2
    with pytest.raises(TypeError) as excinfo:
        checkpoint.save(tmp_path, state, strategy)
    where = "DifferentialPrivacyServerSideFixedClipping.strategy.odd_state" if wrapped else "FedAvg.odd_state"
    assert where in str(excinfo.value)
    # the last good checkpoint stays, untouched
    assert (tmp_path / checkpoint.CHECKPOINT_FILE).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.CHECKPOINT_FILE]
    assert checkpoint.load(tmp_path, {"x": 1}).completed_rounds == 1


def _refusal(directory: Path) -> str:
    with pytest.raises(ConfigError) as excinfo:
        checkpoint.load(directory, {"x": 1})
    message = str(excinfo.value)
    assert "\n" not in message
    assert "not a safe Lumos checkpoint" in message and "resume=false" in message
    assert str(directory / checkpoint.CHECKPOINT_FILE) in message
    return message


class Planted:
    """Unpickling this touches a file: a stand-in for any code a planted checkpoint could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_planted_pickle_is_refused_without_running(writer: str, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / checkpoint.CHECKPOINT_FILE
    planted = {"completed_rounds": 1, "state_dict": {}, "history": [Planted(marker)]}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(planted))
    else:
        torch.save(planted, path)
    _refusal(tmp_path)
    assert not marker.exists()
    assert path.is_file()  # left for the user to inspect and move away
    # the file really carries code: an unsafe load, as the old checkpoints needed, runs it
    if writer == "pickle":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


def test_old_format_checkpoints_are_refused(tmp_path: Path) -> None:
    # exactly what the previous save wrote: vars(RoundState) with the strategy's vars, pickled
    strategy = FedAdam()
    strategy.m_t = {"w": np.ones(3)}
    old = checkpoint.RoundState(2, {"w": torch.zeros(3)}, [{"round": 1}], {"m_t": strategy.m_t}, {"x": 1})
    torch.save(vars(old), tmp_path / checkpoint.CHECKPOINT_FILE)
    assert "older Lumos" in _refusal(tmp_path)
    # one whose state happened to be tensors only loads safely, and is still not this format
    old.strategy_state = {}
    torch.save(vars(old), tmp_path / checkpoint.CHECKPOINT_FILE)
    assert "older Lumos" in _refusal(tmp_path)


@pytest.mark.parametrize(
    "payload",
    [
        {"lumos-kind": "numpy", "tensor": "not a tensor"},
        {"lumos-kind": "something-new"},
        {"lumos-kind": "ArrayRecord", "arrays": [1, 2]},
        {"lumos-kind": torch.zeros(4, 4)},  # its repr spans lines: the message must not
    ],
    ids=["kind-without-tensor", "unknown-kind", "malformed-record", "tensor-kind"],
)
def test_tampered_contents_are_refused(payload: dict, tmp_path: Path) -> None:
    state = checkpoint.RoundState(1, {"w": torch.ones(2)}, fingerprint={"x": 1})
    checkpoint.save(tmp_path, state, FedAvg())
    saved = torch.load(tmp_path / checkpoint.CHECKPOINT_FILE, weights_only=True)
    saved["strategy_state"]["extra"] = payload
    torch.save(saved, tmp_path / checkpoint.CHECKPOINT_FILE)
    _refusal(tmp_path)


def test_damaged_checkpoint_is_refused(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, checkpoint.RoundState(1, {"w": torch.ones(2)}, fingerprint={"x": 1}), FedAvg())
    path = tmp_path / checkpoint.CHECKPOINT_FILE
    path.write_bytes(path.read_bytes()[:100])
    _refusal(tmp_path)
