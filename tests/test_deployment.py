"""Deployment: docker-compose.yml runs the hardened topology of launch/deployment.py, which runs for real
on loopback: registered SuperNodes join and train; unregistered nodes, executors without the secret and
a CLI holding only the CA certificate are refused."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from lumosrec.core.errors import ConfigError
from lumosrec.core.synthetic import SyntheticConfig, generate
from lumosrec.launch.app import APP_DIR, default_run_config, free_port
from lumosrec.launch.cli import build_parser, main
from lumosrec.launch.deployment import (
    FleetGateway,
    LoopbackDeployment,
    compose_commands,
    flwr_json,
    make_node_files,
    make_operator_files,
    split_nodes,
    supernode_command,
    write_connection,
)
from lumosrec.launch.supervise import RunFollower

COMPOSE = APP_DIR / "docker-compose.yml"
#: the containers each folder of keys or secrets may be mounted into: its owners, nobody else
PRIVATE_MOUNTS = {
    "./deploy": {"certs"},
    "./deploy/superlink": {"superlink", "fleet-gateway"},
    "./deploy/superexec": {"superlink", "superexec-serverapp"},
    "./deploy-nodes/node-1": {"node-keys-1", "supernode-1", "superexec-clientapp-1"},
    "./deploy-nodes/node-2": {"node-keys-2", "supernode-2", "superexec-clientapp-2"},
}


def services() -> dict[str, dict]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def test_compose_file_runs_the_deployment_topology() -> None:
    compose = services()
    assert {name: service["command"] for name, service in compose.items()} == compose_commands(nodes=3)
    assert all(
        s.get("environment", {}).get("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION") == "1" for s in compose.values()
    )


def test_compose_keeps_private_files_with_their_owners() -> None:
    mounted: dict[str, set[str]] = {}
    for name, service in services().items():
        for volume in service.get("volumes", []):
            mounted.setdefault(volume.split(":")[0], set()).add(name)
    for folder, owners in PRIVATE_MOUNTS.items():
        assert mounted[folder] <= owners, folder
    # a node's folder and data go to that node's containers only
    for i in (1, 2):
        assert mounted[f"./deploy-data/node-{i}"] == {f"supernode-{i}", f"superexec-clientapp-{i}"}


def test_compose_binds_and_publishes_explicitly() -> None:
    compose = services()
    published = {name: service["ports"] for name, service in compose.items() if "ports" in service}
    # the SuperLink's port (Control API included) on the host's loopback only; the gateway where the operator says
    assert published == {
        "superlink": ["127.0.0.1:8000:8000"],
        "fleet-gateway": ["${LUMOS_FLEET_ADDRESS:-127.0.0.1}:9092:9092"],
    }
    for name, service in compose.items():
        if name.startswith("supernode-"):
            assert service["networks"] == ["fleet"]
        elif name.startswith("superexec-clientapp-"):
            assert service["network_mode"] == f"service:{name.replace('superexec-clientapp', 'supernode')}"
        elif name.startswith(("certs", "node-keys-")):
            assert service["network_mode"] == "none"
        else:
            assert "fleet" not in service["networks"] or name == "fleet-gateway", name
    assert yaml.safe_load(COMPOSE.read_text())["networks"]["fleet"] == {"internal": True}


def commands(lines: list[str]) -> list[tuple[str, list[str]]]:
    """(program, arguments) of every command of Lumos or Flower in shell ``lines``."""
    found = []
    for line in lines:
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            found += [(word, words[i + 1 :]) for i, word in enumerate(words) if word in PROGRAMS]
    return found


PROGRAMS = ("lumos", "flwr", "flower-superlink", "flower-supernode", "flower-superexec")


def check_commands(found: list[tuple[str, list[str]]]) -> None:
    """Each command parses with its program's own parser: its subcommands and options exist."""
    import click
    from flwr.cli.app import app
    from flwr.supercore.cli.flower_superexec import _parse_args as superexec_parser
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode
    from typer.main import get_command

    def flwr(arguments: list[str]) -> None:
        command: click.Command = get_command(app)
        while isinstance(command, click.Group):
            command = command.commands[arguments.pop(0)]
        command.make_context(command.name, arguments)

    parse = {
        "lumos": build_parser().parse_args,
        "flwr": flwr,
        "flower-superlink": _parse_args_run_superlink().parse_args,
        "flower-supernode": _parse_args_run_supernode().parse_args,
        "flower-superexec": superexec_parser().parse_args,
    }
    for program, arguments in found:
        parse[program](arguments)


def test_compose_header_names_only_commands_that_exist() -> None:
    # the header's command lines, minus the parenthesised notes between them
    header = [line[1:] for line in COMPOSE.read_text().splitlines() if line.startswith("#   ") and line[4] != "("]
    found = commands(header)
    assert {program for program, _ in found} == {"lumos", "flwr"}
    check_commands(found)


def test_readme_deployment_recipe_uses_only_commands_and_flags_that_exist() -> None:
    readme = (APP_DIR / "README.md").read_text()
    section = readme[readme.index("**Deployment**") : readme.index("**docker-compose**")]
    shell = "\n".join(re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL))
    found = commands(shell.replace("\\\n", " ").splitlines())
    assert {program for program, _ in found} == set(PROGRAMS)
    check_commands(found)


def test_operator_and_node_files(tmp_path: Path) -> None:
    files = make_operator_files(tmp_path / "deploy", ["link.example.org", "10.0.0.5"])
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    server = x509.load_pem_x509_certificate(files.cert.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(name.value) for name in names} == {"link.example.org", "10.0.0.5", "localhost", "127.0.0.1"}
    node = make_node_files(tmp_path / "node", files.ca)
    for private in (files.ca_key, files.key, files.secret, node.key, node.secret):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    # OpenSSH EC keys, as flower-supernode and `flwr supernode register` read them
    assert load_ssh_private_key(node.key.read_bytes(), None).public_key() == load_ssh_public_key(
        node.public_key.read_bytes()
    )
    assert node.ca.read_bytes() == files.ca.read_bytes()
    # run again (compose does on every `up`): the same keys, so nodes and registrations stay valid
    before = {path: path.read_bytes() for path in (*files.paths(), node.key)}
    make_operator_files(tmp_path / "deploy")
    make_node_files(tmp_path / "node", files.ca)
    assert all(path.read_bytes() == data for path, data in before.items())
    files.key.unlink()
    with pytest.raises(ConfigError, match="incomplete"):
        make_operator_files(tmp_path / "deploy")


@pytest.mark.parametrize(
    "command",
    [
        ["deploy", "node-keys", "--out", "NODE", "--ca", "/nowhere/ca.crt"],
        ["deploy", "register", "--ca", "/nowhere/ca.crt", "/nowhere/node.pub"],
        [
            *["deploy", "fleet-gateway", "--host", "127.0.0.1", "--ssl-certfile", "/nowhere/server.pem"],
            *["--ssl-keyfile", "/nowhere/server.key", "--ssl-ca-certfile", "/nowhere/ca.crt"],
        ],
    ],
)
def test_missing_key_files_are_one_line_errors(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(tmp_path / "node") if word == "NODE" else word for word in command]) == 2
    error = capsys.readouterr().err
    assert error.startswith("lumos: error: ") and "/nowhere/" in error and error.count("\n") == 1, error


def test_fleet_gateway_forwards_only_fleet_routes(tmp_path: Path) -> None:
    """Refusals need no SuperLink: the Control and Runtime APIs, other methods and query strings all get 404."""
    files = make_operator_files(tmp_path / "deploy")
    gateway = FleetGateway("127.0.0.1:1", files.ca)
    assert ("POST", "/v1/fleet/pull-messages") in gateway.routes
    assert not any(path.startswith(("/v1/control", "/v1/runtime")) for _, path in gateway.routes)

    async def status(method: str, path: str, query: bytes = b"") -> int:
        sent: list[dict] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "method": method, "path": path, "query_string": query, "headers": []}
        await gateway(scope, receive, send)
        return sent[0]["status"]

    assert asyncio.run(status("POST", "/v1/control/start-run")) == 404
    assert asyncio.run(status("POST", "/v1/runtime/acquire-task")) == 404
    assert asyncio.run(status("GET", "/v1/fleet/pull-messages")) == 404
    assert asyncio.run(status("POST", "/v1/fleet/pull-messages", b"x=1")) == 404
    assert asyncio.run(status("POST", "/v1/fleet/../control/start-run")) == 404
    # a Fleet route is forwarded: here to nowhere
    assert asyncio.run(status("POST", "/v1/fleet/pull-messages")) == 502
    asyncio.run(gateway.upstream.aclose())


@pytest.fixture(scope="module")
def deployment() -> Iterator[tuple[LoopbackDeployment, Path]]:
    """The hardened loopback deployment: 2 healthy nodes and one whose data is broken, all registered."""
    # short paths: Flower and Ray put sockets under their working folders
    root = Path(tempfile.mkdtemp(prefix="lumos-dep-"))
    dataset = generate(SyntheticConfig(num_users=40, items_per_category=8, seed=11))
    folders = split_nodes(dataset, 2, root / "data")
    broken = root / "data" / "broken"
    broken.mkdir()
    (broken / "interactions.csv").write_text("user_id,item\n1,2\n")
    try:
        with LoopbackDeployment([*folders, broken], root / "p") as running:
            yield running, root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def online(running: LoopbackDeployment) -> set[str]:
    return {node_id for node_id, status in running.node_status().items() if status == "online"}


def wait_all(processes: list[subprocess.Popen], timeout: float = 60.0) -> list[int]:
    return [process.wait(timeout=timeout) for process in processes]


@pytest.mark.slow
def test_registered_supernodes_join(deployment: tuple[LoopbackDeployment, Path]) -> None:
    running, _ = deployment
    assert len(running.node_ids) == 3
    assert online(running) == set(running.node_ids)


@pytest.mark.slow
def test_unregistered_supernodes_are_refused(deployment: tuple[LoopbackDeployment, Path]) -> None:
    """A node with an unregistered key, and one with no key (it holds only ca.crt), are turned away."""
    running, root = deployment
    stranger = make_node_files(root / "stranger", running.files.ca)
    data = str(root / "data" / "node-1")
    unregistered = running.start(
        "unregistered", supernode_command(running.fleet_address, data, stranger, port=free_port())
    )
    keyless = running.start(
        "keyless",
        [
            *["flower-supernode", "--superlink", running.fleet_address, "--root-certificates", str(stranger.ca)],
            *["--isolation", "process", "--host", "127.0.0.1", "--port", str(free_port())],
        ],
    )
    assert all(code != 0 for code in wait_all([unregistered, keyless]))
    assert "Failed to activate SuperNode" in (running.workdir / "unregistered.log").read_text()
    assert "must be registered" in (running.workdir / "keyless.log").read_text()
    assert online(running) == set(running.node_ids)
    # the operator's `lumos deploy register` (compose's registration step) admits the key; again is a no-op
    register = ["deploy", "register", "--superlink", running.superlink_address, "--ca", str(running.files.ca)]
    assert main([*register, str(stranger.public_key)]) == main([*register, str(stranger.public_key)]) == 0
    assert sorted(running.node_status().values()).count("registered") == 1


@pytest.mark.slow
def test_executors_without_the_secret_are_refused(deployment: tuple[LoopbackDeployment, Path]) -> None:
    """Rogue SuperExecs at the SuperLink (no secret, a wrong one), at a SuperNode, and at the gateway all stop,
    while the executors that hold the secrets keep polling."""
    running, root = deployment
    wrong = root / "wrong.secret"
    wrong.write_text("guess")
    at_link = ["flower-superexec", "--runtime-api-address", running.superlink_address]
    tls = ["--root-certificates", str(running.files.ca)]
    rogues = [
        running.start("rogue-link", [*at_link, *tls]),
        running.start("rogue-link-wrong", [*at_link, *tls, "--superexec-auth-secret-file", str(wrong)]),
        running.start(
            "rogue-node", ["flower-superexec", "--runtime-api-address", running.node_addresses[0], "--insecure"]
        ),
        running.start("rogue-gateway", ["flower-superexec", "--runtime-api-address", running.fleet_address, *tls]),
    ]
    wait_all(rogues)
    superlink_log = (running.workdir / "superlink.log").read_text()
    assert superlink_log.count('"POST /v1/runtime/acquire-task HTTP/1.1" 401') >= 2
    assert "refused POST /v1/runtime/acquire-task" in (running.workdir / "fleet-gateway.log").read_text()
    assert running.processes["superexec-serverapp"].poll() is None
    assert running.processes["superexec-clientapp-1"].poll() is None


@pytest.mark.slow
def test_cli_holding_only_the_ca_certificate_cannot_submit(deployment: tuple[LoopbackDeployment, Path]) -> None:
    """What nodes can reach is the gateway: there, a CLI can neither submit a run, nor register a key, nor list runs."""
    running, root = deployment
    home = root / "attacker"
    write_connection(home, "link", running.fleet_address, running.files.ca)
    key = make_node_files(root / "attacker-node", running.files.ca).public_key
    runs_before = flwr_json(["list", "operator"], running.cli_home)["runs"]
    for arguments in (["run", str(APP_DIR), "link"], ["supernode", "register", str(key), "link"], ["list", "link"]):
        answer = flwr_json(arguments, home)
        assert not answer["success"] and "404 Not Found" in answer["error-message"], answer
    assert flwr_json(["list", "operator"], running.cli_home)["runs"] == runs_before
    assert online(running) == set(running.node_ids)


def _fixture_run(root: Path, out: Path, **settings: object) -> dict:
    """A run on the :func:`deployment` fixture's nodes: tiny model, every node every round."""
    return {
        **default_run_config(),
        "catalog": str(root / "data" / "catalog"),
        "out-dir": str(out),
        "fraction-train": 1.0,
        "eval-every": 1,
        "hidden-size": 16,
        "inner-size": 32,
        "round-timeout": 120.0,
        **settings,
    }


@pytest.mark.slow
def test_loopback_deployment_runs_with_a_failing_node(deployment: tuple[LoopbackDeployment, Path]) -> None:
    """2 rounds over TLS through the gateway with registered nodes, one of them with broken data:
    the rounds complete, its failures are counted, and the metrics cover the healthy nodes."""
    running, root = deployment
    out = root / "run"
    # the plain exchange (the next test: the default, secure)
    run_config = _fixture_run(root, out, **{"num-server-rounds": 2, "min-nodes": 3, "secure-aggregation": False})
    result = running.run(APP_DIR, run_config, RunFollower(out, rounds=2, total_users=40, progress=False), timeout=600)
    history = json.loads((out / "metrics.json").read_text())
    assert [row["round"] for row in history] == [1, 2]
    assert all(row["train_failures"] == 1 and row["eval_failures"] == 1 for row in history)
    assert result["failures"] == 4
    assert all(row["eval_users"] == 40 for row in history)
    # the run's log as a person reads it: no push-log requests, no second copy of Flower's lines
    log = (running.workdir / "run.log").read_text()
    assert "round 2: loss" in log and "HTTP Request" not in log
    assert not any(line.startswith("INFO flwr: ") for line in log.splitlines())


@pytest.mark.slow
def test_deployments_aggregate_securely_by_default(deployment: tuple[LoopbackDeployment, Path]) -> None:
    """SecAgg+ (on by default in a deployment) through TLS, the gateway and registered SuperNodes:
    the node with broken data takes part in the key exchange, then fails to train and to evaluate;
    its neighbours' shares unmask the round, and the securely summed histograms count exactly the
    healthy nodes' 40 users."""
    running, root = deployment
    out = root / "secure-run"
    run_config = _fixture_run(root, out, **{"num-server-rounds": 1, "min-nodes": 2})
    running.run(APP_DIR, run_config, RunFollower(out, rounds=1, total_users=40, progress=False), timeout=600)
    history = json.loads((out / "metrics.json").read_text())
    assert [row["round"] for row in history] == [1] and not history[0]["skipped"]
    assert all(row["train_failures"] == 1 and row["eval_failures"] == 1 for row in history)
    assert all(row["eval_users"] == 40 for row in history)
    assert json.loads((out / "config.json").read_text())["secure_aggregation"] is True
    assert "Secure aggregation completed" in (running.workdir / "run.log").read_text()
