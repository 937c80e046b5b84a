"""Flower deployment: SuperLink + SuperNodes (+ SuperExecs), TLS certificates, node data.

One description of the topology serves three uses, so they cannot drift apart:

* :class:`LoopbackDeployment` starts it as processes on 127.0.0.1 (``lumos deploy local``
  and the integration test);
* ``docker-compose.yml`` runs the same commands in containers (a test compares them with
  :func:`compose_commands`);
* the README's multi-host recipe lists the same flags.

Flower 1.41 serves the Fleet, Control and Runtime APIs on one HTTP(S) port (8000); each
SuperNode has its own Runtime API port (9094, 9095, ...).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lumosrec.core.dataset import Dataset
from lumosrec.core.errors import ConfigError, LumosError
from lumosrec.core.synthetic import write_folder
from lumosrec.launch.app import flower_env, free_port

log = logging.getLogger(__name__)

SUPERLINK_PORT = 8000
SUPERNODE_PORT = 9094


@dataclass(frozen=True)
class Certificates:
    """A self-signed CA and a server certificate for the SuperLink."""

    ca: Path
    cert: Path
    key: Path


def make_certificates(out: Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "superlink")) -> Certificates:
    """Create a CA and a SuperLink certificate whose SAN lists ``hosts`` (needs ``openssl``)."""
    if shutil.which("openssl") is None:
        raise ConfigError("openssl not found; install it (apt-get install openssl) to generate TLS certificates")
    out.mkdir(parents=True, exist_ok=True)
    san = ",".join(f"IP:{h}" if h.replace(".", "").isdigit() else f"DNS:{h}" for h in hosts)
    steps = [
        ["openssl", "genrsa", "-out", "ca.key", "4096"],
        [
            "openssl",
            "req",
            "-new",
            "-x509",
            "-key",
            "ca.key",
            "-sha256",
            "-subj",
            "/CN=Lumos CA",
            "-days",
            "365",
            "-out",
            "ca.crt",
        ],
        ["openssl", "genrsa", "-out", "server.key", "4096"],
        ["openssl", "req", "-new", "-key", "server.key", "-subj", "/CN=superlink", "-out", "server.csr"],
        [
            "openssl",
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "365",
            "-sha256",
            "-extfile",
            "san.cnf",
            "-out",
            "server.pem",
        ],
    ]
    (out / "san.cnf").write_text(f"subjectAltName={san}\n")
    for step in steps:
        done = subprocess.run(step, cwd=out, capture_output=True, text=True)
        if done.returncode != 0:
            raise LumosError(f"openssl failed: {done.stderr.strip().splitlines()[-1:]}")
    return Certificates(out / "ca.crt", out / "server.pem", out / "server.key")


def superlink_command(
    certs: Certificates | None,
    isolation: str,
    host: str = "0.0.0.0",
    port: int = SUPERLINK_PORT,
    database: str | None = None,
) -> list[str]:
    command = [
        "flower-superlink",
        "--host",
        host,
        "--port",
        str(port),
        "--isolation",
        isolation,
        "--disable-runtime-dependency-installation",
    ]
    if certs is None:
        command.append("--insecure")
    else:
        command += [
            "--ssl-ca-certfile",
            str(certs.ca),
            "--ssl-certfile",
            str(certs.cert),
            "--ssl-keyfile",
            str(certs.key),
        ]
    if database:
        command += ["--database", database]
    return command


def supernode_command(
    superlink: str,
    data_path: str,
    certs: Certificates | None,
    isolation: str,
    host: str = "0.0.0.0",
    port: int = SUPERNODE_PORT,
) -> list[str]:
    command = [
        "flower-supernode",
        "--superlink",
        superlink,
        "--host",
        host,
        "--port",
        str(port),
        "--isolation",
        isolation,
        "--node-config",
        f'data-path="{data_path}"',
    ]
    command += ["--insecure"] if certs is None else ["--root-certificates", str(certs.ca)]
    return command


def superexec_command(runtime_address: str, certs: Certificates | None) -> list[str]:
    """A SuperExec for process isolation: runs ServerApps (at the SuperLink) or ClientApps (at a SuperNode)."""
    command = ["flower-superexec", "--runtime-api-address", runtime_address]
    command += ["--insecure"] if certs is None else ["--root-certificates", str(certs.ca)]
    return command


def compose_commands(nodes: int, certs: Certificates | None, data_root: str = "/data") -> dict[str, list[str]]:
    """The commands ``docker-compose.yml`` must run: process isolation, one container per process."""
    link = f"superlink:{SUPERLINK_PORT}"
    commands = {
        "superlink": superlink_command(certs, "process", database="/state/state.db"),
        "superexec-serverapp": superexec_command(link, certs),
    }
    for i in range(1, nodes + 1):
        commands[f"supernode-{i}"] = supernode_command(link, f"{data_root}", certs, "process")
        commands[f"superexec-clientapp-{i}"] = superexec_command(f"supernode-{i}:{SUPERNODE_PORT}", None)
    return commands


def split_nodes(dataset: Dataset, nodes: int, out: Path) -> list[Path]:
    """Write ``node-<i>/`` per node (its users' interactions plus the full public catalog)
    and ``catalog/`` (the catalog alone, for the server)."""
    if not 1 <= nodes <= dataset.num_users:
        raise ConfigError(f"--nodes must be between 1 and the number of users ({dataset.num_users})")
    folders = []
    for index, users in enumerate(np.array_split(np.arange(dataset.num_users), nodes), start=1):
        part = Dataset(
            dataset.name,
            [dataset.sequences[u] for u in users],
            [dataset.user_ids[u] for u in users],
            dataset.item_ids,
            dataset.titles,
            dataset.categories,
        )
        folders.append(write_folder(part, out / f"node-{index}"))
    catalog = Dataset(dataset.name, [], [], dataset.item_ids, dataset.titles, dataset.categories)
    write_folder(catalog, out / "catalog")
    return folders


@dataclass
class LoopbackDeployment:
    """SuperLink + one SuperNode per data folder on 127.0.0.1, TLS unless ``tls=False``.

    Use as a context manager; :meth:`run` submits the app with ``flwr run`` and returns the
    run's final status. Every process gets its own ``FLWR_HOME`` and log file in ``workdir``.
    """

    data_paths: list[Path]
    workdir: Path
    tls: bool = True
    processes: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.certs = make_certificates(self.workdir / "certs") if self.tls else None

    def _env(self, name: str) -> dict[str, str]:
        home = self.workdir / name
        home.mkdir(exist_ok=True)
        return flower_env(FLWR_HOME=str(home))

    def _start(self, name: str, command: list[str]) -> None:
        log_file = open(self.workdir / f"{name}.log", "w")  # noqa: SIM115 -- the process's stdout while it runs
        self.processes.append(subprocess.Popen(command, env=self._env(name), stdout=log_file, stderr=subprocess.STDOUT))

    def __enter__(self) -> LoopbackDeployment:
        self._start("superlink", superlink_command(self.certs, "subprocess", host="127.0.0.1", port=self.port))
        for i, path in enumerate(self.data_paths, start=1):
            command = supernode_command(
                f"127.0.0.1:{self.port}",
                str(path.resolve()),
                self.certs,
                "subprocess",
                host="127.0.0.1",
                port=free_port(),
            )
            self._start(f"supernode-{i}", command)
        self._wait_healthy()
        return self

    def _wait_healthy(self, timeout: float = 60.0) -> None:
        scheme = "https" if self.tls else "http"
        deadline = time.monotonic() + timeout
        context = None
        if self.certs is not None:
            import ssl

            context = ssl.create_default_context(cafile=str(self.certs.ca))
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{scheme}://127.0.0.1:{self.port}/health", timeout=2, context=context)
                return
            except OSError:
                time.sleep(0.3)
        raise LumosError(f"SuperLink did not become healthy within {timeout:.0f} s; see {self.workdir}/superlink.log")

    def run(self, app_dir: Path, run_config: str, timeout: float = 900.0) -> str:
        """Submit the app, follow it to the end, return its final status."""
        cli_env = self._env("cli")
        connection = [f'[superlink]\ndefault = "loopback"\n[superlink.loopback]\naddress = "127.0.0.1:{self.port}"']
        connection.append(f'root-certificates = "{self.certs.ca}"' if self.certs else "insecure = true")
        (Path(cli_env["FLWR_HOME"]) / "config.toml").write_text("\n".join(connection) + "\n")
        submitted = subprocess.run(
            ["flwr", "run", str(app_dir), "loopback", "--format", "json", "--run-config", run_config],
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if submitted.returncode != 0:
            raise LumosError(f"flwr run failed: {submitted.stderr.strip()[-500:]}")
        run_id = str(json.loads(submitted.stdout)["run-id"])
        with open(self.workdir / "run.log", "w") as run_log:
            subprocess.run(
                ["flwr", "log", run_id, "loopback", "--stream"],
                env=cli_env,
                stdout=run_log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
        listed = subprocess.run(
            ["flwr", "list", "loopback", "--run-id", run_id, "--format", "json"],
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return json.loads(listed.stdout)["runs"][0]["status"]

    def __exit__(self, *exc: object) -> None:
        for process in reversed(self.processes):
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
