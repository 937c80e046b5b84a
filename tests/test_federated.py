"""The Flower app: client messages, exact federated evaluation, simulation, resume, Ray cluster."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp

from experiments.bench_privacy import NO_DEFENCE
from lumosrec.client.client_app import app as client_app
from lumosrec.client.objectives import OBJECTIVES
from lumosrec.core.data import load_data, node_data
from lumosrec.core.evaluation import PROTOCOLS, STAGES, evaluate, leave_one_out
from lumosrec.core.synthetic import SyntheticConfig, generate, write_folder
from lumosrec.launch.app import default_run_config
from lumosrec.launch.simulate import simulate, stop_federation
from lumosrec.server.server_app import fingerprint, metrics_from_histograms
from lumosrec.server.strategies import sum_metric_records
from lumosrec.server.validation import ReplyLimits, check_evaluate_reply, check_train_reply
from tests.conftest import SMALL_FEDERATION

pytestmark = pytest.mark.usefixtures("task_identity")

SMALL = dict(num_users=60, items_per_category=10, seed=5)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(generate(SyntheticConfig(**SMALL)), tmp_path_factory.mktemp("fed") / "data")


@pytest.fixture
def run_config(data_dir: Path) -> dict:
    return {**default_run_config(), **NO_DEFENCE, "data": str(data_dir), "hidden-size": 16, "inner-size": 32}


def _call(
    kind: str, arrays: ArrayRecord, run_config: dict, partition: int, partitions: int, client: ClientApp = client_app
) -> Message:
    context = Context(
        run_id=1,
        node_id=100 + partition,
        node_config={"partition-id": partition, "num-partitions": partitions},
        state=RecordDict(),
        run_config=run_config,
    )
    message_type = MessageType.TRAIN if kind == "train" else MessageType.EVALUATE
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})})
    message = Message(content, dst_node_id=100 + partition, message_type=message_type)
    return client(message, context)


def _relabelled(dataset, permutation: np.ndarray):
    """``dataset`` with item ``i`` renamed ``permutation[i]`` (ids, sequences and text alike)."""
    inverse = np.argsort(permutation)
    return replace(
        dataset,
        sequences=[permutation[sequence] for sequence in dataset.sequences],
        titles=[dataset.titles[i] for i in inverse],
        categories=[dataset.categories[i] for i in inverse],
    )


def _what_leaks(client, run_config: dict, data_dir: Path, tmp_path: Path) -> list[str]:
    """What of a user's history ``client``'s replies reveal beyond the item rows of the model.

    The user's items are renamed (a permutation moving each of them, the global model's item rows
    permuted alike) and the client runs again: everything it sends must then be the same, its
    item rows permuted back. Any value derived from an item id, in any metric or array, differs.
    The replies must also pass the server's schema check: no other record can carry text."""
    dataset = load_data(str(data_dir))
    user, partitions = 7, dataset.num_users  # one user per client
    rng = np.random.default_rng(0)
    permutation = np.concatenate([[0], rng.permutation(np.arange(1, dataset.num_items + 1))])
    while np.any(permutation[dataset.sequences[user]] == dataset.sequences[user]):  # every item renamed
        permutation = np.concatenate([[0], rng.permutation(np.arange(1, dataset.num_items + 1))])
    folders = {"as is": tmp_path / "as-is", "renamed": tmp_path / "renamed"}
    write_folder(dataset, folders["as is"])
    write_folder(_relabelled(dataset, permutation), folders["renamed"])
    model = OBJECTIVES["sasrec"].build_model(run_config, dataset.num_items)
    renamed_model = copy.deepcopy(model)
    with torch.no_grad():
        renamed_model.item_embedding.weight[permutation] = model.item_embedding.weight
    limits = ReplyLimits.for_run({**run_config, "data": str(data_dir)}, ArrayRecord(model.state_dict()), partitions)
    sent = {
        name: {
            kind: _call(
                kind, ArrayRecord(m.state_dict()), {**run_config, "data": str(folder)}, user, partitions, client
            )
            for kind in ("train", "evaluate")
        }
        for (name, folder), m in zip(folders.items(), (model, renamed_model))
    }
    leaks = []
    for name, replies in sent.items():
        try:
            check_train_reply(replies["train"].content, limits)
            check_evaluate_reply(replies["evaluate"].content, limits)
        except ValueError as problem:
            leaks.append(f"{name}: a reply outside the schema ({problem})")
    for kind in ("train", "evaluate"):
        plain, renamed = sent["as is"][kind].content, sent["renamed"][kind].content
        metrics = {name: (plain["metrics"][name], renamed["metrics"].get(name)) for name in plain["metrics"]}
        if set(plain["metrics"]) != set(renamed["metrics"]) or not all(
            np.allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-4) for a, b in metrics.values()
        ):
            leaks.append(f"{kind} metrics")
    arrays = sent["renamed"]["train"].content["arrays"].to_torch_state_dict()
    arrays["item_embedding.weight"] = arrays["item_embedding.weight"][permutation]
    for key, value in sent["as is"]["train"].content["arrays"].to_torch_state_dict().items():
        if not torch.allclose(value, arrays[key], rtol=1e-4, atol=1e-6):
            leaks.append(f"array {key}")
    return leaks


def test_nothing_of_a_users_history_leaves_the_client_but_the_item_rows(
    run_config: dict, data_dir: Path, tmp_path: Path
) -> None:
    assert _what_leaks(client_app, run_config, data_dir, tmp_path) == []


def test_the_auc_of_the_leak_benchmark_is_the_pairwise_probability_with_ties_half() -> None:
    from experiments.bench_privacy import auc

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=40).astype(float)  # many ties
    members = rng.random(40) < 0.3
    pairs = [(p > n) + 0.5 * (p == n) for p in scores[members] for n in scores[~members]]
    assert auc(scores, members) == pytest.approx(np.mean(pairs))


def test_a_servers_row_change_attack_finds_a_users_items_in_its_reply(run_config: dict) -> None:
    from experiments.bench_privacy import attack

    dataset = load_data(run_config["data"])
    torch.manual_seed(0)
    state = OBJECTIVES["sasrec"].build_model(run_config, dataset.num_items).state_dict()
    rows = {row["attack"]: row for row in attack(run_config, "fresh", state, np.arange(4), round_size=2)}
    assert rows["row-change"]["auc"] > 0.95 and rows["row-change"]["precision"] > 0.8
    assert rows["row-change"]["precision"] > 3 * rows["row-change"]["random_precision"]


def _leaking_client(where: str) -> ClientApp:
    """Lumos's ClientApp, plus a leak of the user's last training item, as a float."""
    app = ClientApp()

    def leak(message: Message, context: Context) -> Message:
        reply = client_app(message, context)
        item = float(node_data(context.run_config, context.node_config).split.train[0][-1])
        if where == "metric" and message.metadata.message_type == MessageType.TRAIN:
            reply.content["metrics"]["train-loss"] += item * 1e-3
        elif where == "array" and message.metadata.message_type == MessageType.TRAIN:
            bias = reply.content["arrays"]["input_norm.bias"].numpy()
            reply.content["arrays"]["input_norm.bias"] = Array(np.full_like(bias, item))
        elif where == "text" and message.metadata.message_type == MessageType.EVALUATE:
            reply.content["note"] = ConfigRecord({"item": f"item {item}"})
        return reply

    app.train()(leak)
    app.evaluate()(leak)
    return app


@pytest.mark.parametrize(
    ("where", "found"),
    [("metric", "train metrics"), ("array", "array input_norm.bias"), ("text", "a reply outside the schema")],
)
def test_the_privacy_check_finds_an_id_leaked_as_a_float_or_text(
    run_config: dict, data_dir: Path, tmp_path: Path, where: str, found: str
) -> None:
    leaks = _what_leaks(_leaking_client(where), run_config, data_dir, tmp_path)
    assert any(leak.startswith(found) or found in leak for leak in leaks), leaks


def test_client_evaluation_sums_to_the_centralized_evaluation_exactly(run_config: dict) -> None:
    dataset = load_data(run_config["data"])
    torch.manual_seed(3)
    model = OBJECTIVES["sasrec"].build_model(run_config, dataset.num_items)
    arrays = ArrayRecord(model.state_dict())
    partitions = 7  # uneven groups of users
    replies = [_call("evaluate", arrays, run_config, p, partitions).content for p in range(partitions)]
    federated = metrics_from_histograms(sum_metric_records(replies))
    split = leave_one_out(dataset.sequences, dataset.num_items)
    for stage in STAGES:
        assert federated[stage] == evaluate(model, split, stage, run_config["max-len"], PROTOCOLS)


def test_fedprox_term_keeps_the_update_closer(run_config: dict) -> None:
    dataset = load_data(run_config["data"])
    torch.manual_seed(0)
    model = OBJECTIVES["sasrec"].build_model(run_config, dataset.num_items)
    start = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    drift = {}
    for mu in (0.0, 10.0):
        config = {**run_config, "local-epochs": 3, "learning-rate": 0.01}
        message = Message(
            RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({"proximal-mu": mu})}),
            dst_node_id=1,
            message_type=MessageType.TRAIN,
        )
        context = Context(1, 1, {"partition-id": 0, "num-partitions": 3}, RecordDict(), config)
        trained = client_app(message, context).content["arrays"].to_torch_state_dict()
        model_after = OBJECTIVES["sasrec"].build_model(run_config, dataset.num_items)
        model_after.load_state_dict(trained)
        drift[mu] = (torch.nn.utils.parameters_to_vector(model_after.parameters()) - start).norm().item()
    assert drift[10.0] < drift[0.0]


@pytest.mark.slow
def test_simulation_resumes_after_the_server_is_killed(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "lumosrec.launch.cli",
        "simulate",
        "--data",
        str(data_dir),
        "--out",
        str(out),
        "--rounds",
        "3",
        "--fraction-train",
        "0.2",
        "--quiet",
        "--run-config",
        "hidden-size=16 inner-size=32",
    ]
    # the run's private FLWR_HOME lands in TMPDIR; short, because Ray puts its sockets there too
    short_tmp = Path(tempfile.mkdtemp(prefix="lt", dir="/tmp"))
    env = {**os.environ, "TMPDIR": str(short_tmp)}
    first = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    metrics = out / "metrics.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (metrics.is_file() and json.loads(metrics.read_text())):
        assert first.poll() is None, first.stdout.read().decode()[-2000:]
        time.sleep(0.5)
    before = json.loads(metrics.read_text())
    os.killpg(first.pid, signal.SIGKILL)  # the server dies without any chance to clean up
    for flwr_home in short_tmp.glob("lumos-flwr-*"):
        stop_federation(flwr_home)
    first.wait(timeout=30)
    assert not (out / "result.json").exists()
    completed = len(before)
    assert 1 <= completed < 3

    resumed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    history = json.loads(metrics.read_text())
    assert [row["round"] for row in history] == [1, 2, 3]
    assert history[:completed] == before[:completed]  # finished rounds were not redone
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == "fedavg-sasrec" and result["epochs"] == 3 and result["failures"] == 0

    # the federated metrics are the centralized evaluation of the saved global model
    saved = torch.load(out / "model.pt")
    dataset = load_data(str(data_dir))
    model = OBJECTIVES["sasrec"].build_model({"hidden-size": 16, "inner-size": 32}, dataset.num_items)
    model.load_state_dict(saved["state_dict"])
    split = leave_one_out(dataset.sequences, dataset.num_items)
    assert result["test"] == evaluate(model, split, "test", 50)
    shutil.rmtree(short_tmp, ignore_errors=True)


def _ray_start(ray: Path, env: dict, *args: str) -> None:
    started = subprocess.run(
        [str(ray), "start", "--node-ip-address", "127.0.0.1", "--num-cpus", "1", *args],
        env=env,
        capture_output=True,
        text=True,
    )
    assert started.returncode == 0, started.stderr[-2000:]


@pytest.mark.slow
def test_cohorts_spread_over_a_running_two_node_ray_cluster(data_dir: Path, tmp_path: Path) -> None:
    """A simulation attaches to a Ray cluster (a head and a second node joined with
    ``ray start --address``, one CPU each), and its cohort nodes train on both machines."""
    import ray as ray_api
    from ray._private import state  # the GCS's actor table: the public state API needs the dashboard

    ray = Path(sys.executable).with_name("ray")
    port = str(6380 + os.getpid() % 500)
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths are length-limited
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    address = f"127.0.0.1:{port}"
    try:
        _ray_start(ray, env, "--head", "--port", port, "--include-dashboard=false")
        _ray_start(ray, env, "--address", address)
        result = simulate(
            {
                "data": str(data_dir),
                "out-dir": str(tmp_path / "run"),
                "num-server-rounds": 2,
                "cohort-size": 6,  # 10 cohorts of 6 users
                "fraction-train": 0.5,
                "eval-every": 2,
                "hidden-size": 16,
                "inner-size": 32,
            },
            ray_address=address,
            client_cpus=1,  # one client actor per node
            progress=False,
            timeout=300,
        )
        assert result["epochs"] == 2 and result["failures"] == 0
        assert 0.0 < result["test"]["unmasked"]["HR@20"] <= 1.0
        rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
        assert [row["train_users"] for row in rows] == [30, 30]
        ray_api.init(address=address, logging_level="ERROR")
        try:
            nodes = {node["NodeID"] for node in ray_api.nodes() if node["Alive"]}
            hosts = {
                actor["Address"]["NodeID"]
                for actor in state.actors().values()
                if actor["ActorClassName"] == "ClientAppActor"
            }
        finally:
            ray_api.shutdown()
        assert len(nodes) == 2 and hosts == nodes  # client actors ran on both Ray nodes
    finally:
        subprocess.run([str(ray), "stop", "--force"], env=env, capture_output=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_every_strategy_is_flowers_own_and_dp_wraps_it() -> None:
    from flwr.serverapp import strategy as flower

    from lumosrec.core.errors import ConfigError
    from lumosrec.server.strategies import STRATEGIES, build_strategy, strategy_is_linear

    config = {**default_run_config(), "fraction-train": 0.5}  # 5 of 10 nodes: enough for every robust rule
    for name in STRATEGIES:
        built = build_strategy({**config, "strategy": name}, num_nodes=10)
        assert type(built).__module__.startswith("flwr.serverapp.strategy")
    assert isinstance(build_strategy({**config, "strategy": "fedadam"}, 10), flower.FedAdam)
    wrapped = build_strategy({**config, "dp-clipping-norm": 1.0, "dp-noise-multiplier": 0.5}, 10)
    assert isinstance(wrapped, flower.DifferentialPrivacyServerSideFixedClipping)
    assert not strategy_is_linear(wrapped) and not strategy_is_linear(
        build_strategy({**config, "strategy": "krum"}, 10)
    )
    with pytest.raises(ConfigError, match="unknown strategy 'fedsgd'"):
        build_strategy({**config, "strategy": "fedsgd"}, 10)


def test_checkpoint_of_another_run_is_refused(tmp_path: Path) -> None:
    from flwr.serverapp.strategy import FedAdam

    from lumosrec.server import checkpoint

    strategy = FedAdam()
    strategy.m_t = {"w": np.ones(3)}
    state = checkpoint.RoundState(2, {"w": torch.zeros(3)}, [{"round": 1}, {"round": 2}], fingerprint={"seed": 1})
    checkpoint.save(tmp_path, state, strategy)
    loaded = checkpoint.load(tmp_path, {"seed": 1})
    assert loaded.completed_rounds == 2 and loaded.history == state.history
    fresh = FedAdam()
    checkpoint.restore_strategy(fresh, loaded)
    np.testing.assert_array_equal(fresh.m_t["w"], np.ones(3))  # server-optimizer state survives
    with pytest.raises(ValueError, match="different settings \\(seed\\)"):
        checkpoint.load(tmp_path, {"seed": 2})
    # a knob added later and recorded as off matches a run that does not know it; on, it does not
    for value, resumes in ((0.0, True), (0.5, False)):
        state.fingerprint = {"seed": 1, "lumos-future-targets": value}
        checkpoint.save(tmp_path, state, strategy)
        if resumes:
            assert checkpoint.load(tmp_path, {"seed": 1}, optional={"lumos-future-targets"}) is not None
        else:
            with pytest.raises(ValueError, match="different settings \\(lumos-future-targets\\)"):
                checkpoint.load(tmp_path, {"seed": 1}, optional={"lumos-future-targets"})
    # another objective's knobs, recorded when fingerprints held every objective's keys, do not count
    state.fingerprint = {"seed": 1, "cl-weight": 0.1}
    checkpoint.save(tmp_path, state, strategy)
    assert checkpoint.load(tmp_path, {"seed": 1}, ignored={"cl-weight"}) is not None


def test_a_run_resumed_for_more_rounds_records_what_was_asked(data_dir: Path, tmp_path: Path) -> None:
    from lumosrec.launch.inprocess import run_in_process

    out = tmp_path / "run"
    run_in_process({**SMALL_FEDERATION, "data": str(data_dir), "out-dir": str(out), "resume": True})
    (out / "result.json").unlink()  # asked again, for more rounds
    result = run_in_process(
        {**SMALL_FEDERATION, "num-server-rounds": 3, "data": str(data_dir), "out-dir": str(out), "resume": True}
    )
    assert result["epochs"] == 3
    config = json.loads((out / "config.json").read_text())
    assert config["run_config"]["num-server-rounds"] == 3 and config["resumed_after_round"] == 2


def test_a_checkpoint_of_other_data_is_refused_even_at_the_same_path(data_dir: Path, tmp_path: Path) -> None:
    from lumosrec.launch.inprocess import run_in_process

    data, out = tmp_path / "data", tmp_path / "run"
    shutil.copytree(data_dir, data)
    run_in_process({**SMALL_FEDERATION, "data": str(data), "out-dir": str(out), "resume": True})
    other = load_data(str(data_dir))
    write_folder(replace(other, sequences=[s[::-1].copy() for s in other.sequences]), data)  # same path, new contents
    load_data.cache_clear()
    with pytest.raises(ValueError, match=r"different settings \(data-sha256\)"):
        run_in_process({**SMALL_FEDERATION, "data": str(data), "out-dir": str(out), "resume": True})
    # a deployment's server knows only the catalog: its contents count the same way
    catalog = tmp_path / "catalog"
    shutil.copytree(data_dir, catalog)
    run = {**default_run_config(), "data": str(data_dir), "catalog": str(catalog)}
    before = fingerprint(run)
    (catalog / "items.csv").write_text((catalog / "items.csv").read_text().replace("A", "B", 1))
    assert fingerprint(run)["data-sha256"] != before["data-sha256"]


@pytest.mark.parametrize("num_users,partitions", [(60, 7), (10, 10), (22363, 22363), (5, 3)])
def test_partitions_are_numpy_array_split_groups(num_users: int, partitions: int) -> None:
    from lumosrec.core.data import partition_users

    expected = np.array_split(np.arange(num_users), partitions)
    for partition in {0, 1, partitions // 2, partitions - 1}:
        np.testing.assert_array_equal(partition_users(num_users, partition, partitions), expected[partition])


def test_run_config_text_reads_like_flwr_run_and_round_trips() -> None:
    from lumosrec.core.errors import ConfigError
    from lumosrec.core.runconfig import format_run_config, parse_run_config

    assert parse_run_config('strategy="fedadam" server-learning-rate=0.03 resume=false out-dir="runs/a b"') == {
        "strategy": "fedadam",
        "server-learning-rate": 0.03,
        "resume": False,
        "out-dir": "runs/a b",
    }
    values = {"data": "/data/x y", "seed": 7, "dropout": 0.25, "resume": True, "note": 'say "hi"'}
    assert parse_run_config(format_run_config(values)) == values
    for bad in ['strategy="fedadam', "strategy=fedadam", "seed", "seed=1 rounds"]:
        with pytest.raises(ConfigError, match="run config: cannot read"):
            parse_run_config(bad)
    from lumosrec.launch.app import check_run_config

    for bad, message in [
        ({"client-optimizer": "lion"}, "choose one of adam, sgd"),
        ({"strategy": "fedsgd"}, "unknown strategy"),
        ({"rounds": 3}, "unknown run-config key"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check_run_config(bad, default_run_config())


def test_in_process_federation_keeps_node_state_and_counts_failures(data_dir: Path, tmp_path: Path) -> None:
    from lumosrec.launch.inprocess import InProcessGrid, run_in_process

    result = run_in_process({**SMALL_FEDERATION, "data": str(data_dir), "out-dir": str(tmp_path)})
    assert result["epochs"] == 2 and result["test"]["unmasked"]["HR@20"] > 0
    history = json.loads((tmp_path / "metrics.json").read_text())
    assert [row["train_nodes"] for row in history] == [3, 3] and history[-1]["eval_users"] == SMALL["num_users"]

    grid = InProcessGrid(client_app, {**default_run_config(), "data": str(data_dir)}, num_nodes=2)
    model = OBJECTIVES["sasrec"].build_model(default_run_config(), load_data(str(data_dir)).num_items)
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({"server-round": 1})})
    broken = RecordDict({"config": ConfigRecord({"server-round": 1})})  # no arrays: the client raises
    replies = list(
        grid.send_and_receive(
            [
                Message(content, dst_node_id=1, message_type=MessageType.TRAIN),
                Message(broken, dst_node_id=2, message_type=MessageType.TRAIN),
            ]
        )
    )
    assert [reply.has_error() for reply in replies] == [False, True]
    assert grid._contexts[1].state.config_records["lumos-client"]["rounds-trained"] == 1


def test_a_round_neither_waits_forever_for_nodes_nor_for_replies(data_dir: Path, tmp_path: Path) -> None:
    from lumosrec.core.errors import FederationError
    from lumosrec.launch.inprocess import InProcessGrid
    from lumosrec.server.server_app import run_rounds

    run = {**default_run_config(), **SMALL_FEDERATION, "data": str(data_dir), "out-dir": str(tmp_path / "a")}

    class Silent(InProcessGrid):
        """Node 1 never answers within the round's timeout."""

        def send_and_receive(self, messages, *, timeout=None):
            return [self._deliver(m) for m in messages if m.metadata.dst_node_id != 1]

    run_rounds(Silent(client_app, run, 3), Context(1, 0, {}, RecordDict(), run))
    history = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert [(row["train_failures"], row["eval_failures"], row["skipped"]) for row in history] == [(1, 1, None)] * 2
    assert history[-1]["eval_users"] == 40  # the 20 users of the silent node are not evaluated

    run = {**run, "min-nodes": 3, "node-wait": 0.5, "out-dir": str(tmp_path / "b")}
    started = time.monotonic()
    with pytest.raises(FederationError, match=r"round 1: 2 node\(s\) connected after waiting 0.5 s \(node-wait\)"):
        run_rounds(InProcessGrid(client_app, run, 2), Context(1, 0, {}, RecordDict(), run))
    assert time.monotonic() - started < 30


def _raising_client(nodes: set[int], rounds: set[int]) -> ClientApp:
    """Lumos's ClientApp, except that ``nodes`` raise in training in ``rounds``."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        if context.node_id in nodes and int(message.content["config"]["server-round"]) in rounds:
            raise RuntimeError("broken objective")
        return client_app(message, context)

    app.evaluate()(client_app)
    return app


def test_a_run_stops_when_every_node_raises_and_no_failed_reply_counts_as_a_result(
    data_dir: Path, tmp_path: Path
) -> None:
    from lumosrec.core.errors import FederationError
    from lumosrec.launch.experiment import finished_result, run_method
    from lumosrec.launch.inprocess import run_in_process
    from lumosrec.launch.supervise import RunError

    run = {**SMALL_FEDERATION, "data": str(data_dir), "out-dir": str(tmp_path / "all"), "resume": True}
    with pytest.raises(
        FederationError,
        match=r"round 2: all 3 sampled nodes raised in training, the first with "
        r"RuntimeError\('broken objective'\); the run stopped after round 1",
    ):
        run_in_process(run, _raising_client({1, 2, 3}, {2}))
    assert [row["round"] for row in json.loads((tmp_path / "all" / "metrics.json").read_text())] == [1]
    # the cause fixed, the run resumes after its last good round
    assert run_in_process(run)["epochs"] == 2

    # one node raising once leaves the rounds going, but the run is no result to compare
    run = {**run, "out-dir": str(tmp_path / "one")}
    result = run_in_process(run, _raising_client({2}, {1}))
    assert result["epochs"] == 2 and result["failures"] == 1 and finished_result(tmp_path / "one") is None
    with pytest.raises(RunError, match=r"1 client replies failed \(raised or never came\), 0 rounds skipped"):
        run_method("fedavg-sasrec", str(data_dir), tmp_path / "one")


def test_the_server_can_start_the_item_table_from_the_catalogs_text(data_dir: Path, tmp_path: Path) -> None:
    from lumosrec.launch.inprocess import run_in_process

    dataset = load_data(str(data_dir))
    settings = {**SMALL_FEDERATION, "data": str(data_dir), "num-server-rounds": 1, "eval-every": 0}
    tables = {}
    for init in ("random", "text"):
        out = tmp_path / init
        run_in_process({**settings, "out-dir": str(out), "item-init": init})
        state = torch.load(out / "checkpoint.pt", weights_only=True)["state_dict"]
        tables[init] = torch.nn.functional.normalize(state["item_embedding.weight"][1:], dim=1)
    categories = np.array([c[0] for c in dataset.categories[1:]])
    same = categories[:, None] == categories[None, :]
    np.fill_diagonal(same, False)
    for init, table in tables.items():
        cosine = (table @ table.T).numpy()
        gap = cosine[same].mean() - cosine[~same & ~np.eye(len(same), dtype=bool)].mean()
        assert (gap > 0.2) == (init == "text"), (init, gap)  # items of a category start close, after a round too
