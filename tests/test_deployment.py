"""Deployment: docker-compose.yml matches the process topology, which runs for real over TLS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lumosrec.core.runconfig import format_run_config
from lumosrec.core.synthetic import SyntheticConfig, generate
from lumosrec.launch.app import APP_DIR
from lumosrec.launch.deployment import Certificates, LoopbackDeployment, compose_commands, split_nodes

COMPOSE = APP_DIR / "docker-compose.yml"
COMPOSE_CERTS = Certificates(Path("/certs/ca.crt"), Path("/certs/server.pem"), Path("/certs/server.key"))


def test_compose_file_runs_the_deployment_topology() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    expected = compose_commands(nodes=2, certs=COMPOSE_CERTS)
    assert {name: services[name]["command"] for name in expected} == expected
    assert set(services) == set(expected) | {"certs"}
    # every node has its own data volume, shared only with its own ClientApp executor
    for i in (1, 2):
        mounts = {services[f"supernode-{i}"]["volumes"][-1], services[f"superexec-clientapp-{i}"]["volumes"][-1]}
        assert mounts == {f"./deploy-data/node-{i}:/data:ro"}
    assert services["superlink"]["ports"] == ["8000:8000"]
    assert all(
        s.get("environment", {}).get("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION") == "1" for s in services.values()
    )


@pytest.mark.slow
def test_tls_loopback_deployment_with_a_failing_node(tmp_path: Path) -> None:
    """SuperLink + 2 SuperNodes over TLS for 2 rounds, plus a node whose data is broken:
    the rounds complete, its failures are counted, and the metrics cover the healthy nodes."""
    dataset = generate(SyntheticConfig(num_users=40, items_per_category=8, seed=11))
    folders = split_nodes(dataset, 2, tmp_path / "data")
    broken = tmp_path / "data" / "broken"
    broken.mkdir()
    (broken / "interactions.csv").write_text("user_id,item\n1,2\n")
    out = tmp_path / "run"
    run_config = format_run_config(
        {
            "catalog": str(tmp_path / "data" / "catalog"),
            "out-dir": str(out),
            "num-server-rounds": 2,
            "fraction-train": 1.0,
            "min-nodes": 3,
            "eval-every": 1,
            "hidden-size": 16,
            "inner-size": 32,
            "round-timeout": 120.0,
        }
    )
    with LoopbackDeployment([*folders, broken], tmp_path / "processes", tls=True) as deployment:
        assert deployment.certs is not None
        status = deployment.run(APP_DIR, run_config, timeout=600)
    log = (tmp_path / "processes" / "run.log").read_text()
    assert status == "finished:completed", log[-3000:]
    result = json.loads((out / "result.json").read_text())
    history = json.loads((out / "metrics.json").read_text())
    assert [row["round"] for row in history] == [1, 2]
    assert all(row["train_failures"] == 1 and row["eval_failures"] == 1 for row in history)
    assert result["failures"] == 4
    assert all(row["eval_users"] == dataset.num_users for row in history)
    assert all("--insecure" not in process.args for process in deployment.processes)
