"""The objective interface: one registry that the client, the server and the launchers ask."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from lumosrec.client.client_app import app as client_app
from lumosrec.client.objectives import FEDERATED_METHODS, OBJECTIVES, method_name
from lumosrec.client.objectives.base import Objective
from lumosrec.core.data import NodeData, run_data
from lumosrec.core.errors import ConfigError
from lumosrec.core.synthetic import SyntheticConfig, generate, write_folder
from lumosrec.launch.app import check_run_config, default_run_config
from lumosrec.models.factory import MODELS
from lumosrec.models.sasrec import SASRec
from lumosrec.server.server_app import fingerprint

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(
        generate(SyntheticConfig(num_users=20, items_per_category=6, seed=3)),
        tmp_path_factory.mktemp("objectives") / "data",
    )


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_an_objectives_keys_and_defaults_are_the_apps(name: str) -> None:
    """Flower reads the defaults from [tool.flwr.app.config]; the model's config has them too:
    the two must agree, and every key the objective declares must be there."""
    objective, defaults = OBJECTIVES[name], default_run_config()
    assert objective.name == name and objective.model in MODELS
    missing = [key for key in objective.keys if key not in defaults]
    assert not missing, f"{name}: add {missing} to [tool.flwr.app.config]"
    config_class = MODELS[objective.model][1]
    fields = {field.name: field.default for field in dataclasses.fields(config_class)}
    for key, field in objective.hyper_keys.items():
        assert defaults[key] == fields[field], f"{key} = {defaults[key]} in pyproject.toml, {field} = {fields[field]}"
    for key, allowed in objective.choices.items():
        assert defaults[key] in allowed


def test_only_result_changing_keys_block_a_resume() -> None:
    run = default_run_config()
    assert fingerprint({**run, "objective": "lumos", "lumos-tau": 0.5}) != fingerprint({**run, "objective": "lumos"})
    cl4srec = {**run, "objective": "cl4srec"}
    assert fingerprint({**cl4srec, "cl-weight": 0.5}) != fingerprint(cl4srec)
    # another objective's knob does not change what this run trains
    assert fingerprint({**run, "cl-weight": 0.5}) == fingerprint(run)
    assert fingerprint({**run, "views-dir": "/elsewhere", "views-backend": "llamacpp"}) == fingerprint(run)
    # a knob added later blocks a resume when on, and is absent when off: older checkpoints resume
    lumos = {**run, "objective": "lumos", "lumos-counterfactual-negatives": 0.0}
    assert fingerprint({**lumos, "lumos-counterfactual-negatives": 0.5}) != fingerprint(lumos)
    older = {key: value for key, value in lumos.items() if key != "lumos-counterfactual-negatives"}
    assert fingerprint(older) == fingerprint(lumos)


def test_method_names_come_from_the_objectives() -> None:
    assert FEDERATED_METHODS == {"fedavg-sasrec": "sasrec", "fed-cl4srec": "cl4srec", "lumos": "lumos"}
    assert method_name({"objective": "lumos", "strategy": "fedprox"}) == "lumos-fedprox"
    assert method_name({"objective": "cl4srec", "strategy": "fedadam"}) == "fedadam-cl4srec"
    with pytest.raises(ConfigError, match="unknown objective"):
        method_name({"objective": "nope", "strategy": "fedavg"})


class CountingObjective(Objective):
    """A new objective, registered the way a contributor would: SASRec's loss, a counted
    per-node preparation and a private number kept in the node's state."""

    name = "counting"
    model = "sasrec"
    prepared: list[int] = []  # noqa: RUF012 -- the test reads it

    def method_name(self, strategy: str) -> str:
        return f"{strategy}-counting"

    def prepare(
        self, model: SASRec, node: NodeData, context: Context, rng: np.random.Generator, owner: str = ""
    ) -> dict:
        self.prepared.append(len(node.users))
        return {}

    def keep_private(self, model: SASRec, context: Context, owner: str = "") -> None:
        context.state.config_records["counting"] = ConfigRecord({"rounds": len(self.prepared)})


def test_a_new_objective_needs_only_its_module_and_registration(data_dir: Path, monkeypatch) -> None:
    monkeypatch.setitem(OBJECTIVES, "counting", CountingObjective())
    run = check_run_config(
        {"data": str(data_dir), "objective": "counting", "hidden-size": 16, "inner-size": 32}, default_run_config()
    )
    assert method_name(run) == "fedavg-counting"
    context = Context(
        run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 4}, state=RecordDict(), run_config=run
    )
    backbone = OBJECTIVES["sasrec"].build_model(run, run_data(run).num_items)
    content = RecordDict({"arrays": ArrayRecord(backbone.state_dict()), "config": ConfigRecord({"server-round": 1})})
    reply = client_app(Message(content, dst_node_id=5, message_type=MessageType.TRAIN), context)
    assert not reply.has_error(), reply.error
    assert CountingObjective.prepared == [5]  # 20 users over 4 nodes
    assert context.state.config_records["counting"]["rounds"] == 1
    with pytest.raises(ConfigError, match="objective='gone'"):
        check_run_config({"objective": "gone"}, default_run_config())
