"""Flower deployment: SuperLink, Fleet gateway, SuperNodes and their SuperExecs; keys, secrets, node data.

One description of the topology serves three uses, so they cannot drift apart:

* :class:`LoopbackDeployment` starts it as processes on 127.0.0.1 (``lumos deploy local``
  and the integration tests);
* ``docker-compose.yml`` runs the same commands in containers (a test compares them with
  :func:`compose_commands`);
* the README's multi-host recipe lists the same flags.

Flower 1.41's SuperLink serves its Fleet, Control and Runtime APIs on one HTTP(S) port, and its
Control API has no account authentication: whoever reaches that port can register SuperNode keys
and submit runs. So the SuperLink binds the operator host's loopback only, and nodes reach it
through the Fleet gateway (:class:`FleetGateway`), which forwards Flower's Fleet routes and
nothing else. Every SuperNode signs its requests with its own EC key, registered by the operator
(``--enable-supernode-auth``); every SuperExec proves a shared secret to the Runtime API it polls
(``--superexec-auth-secret-file``), so a rogue executor cannot pick up runs or replies.

Files, by who may hold them (:class:`OperatorFiles`, :class:`NodeFiles`)::

    deploy/ca/ca.key                 signs the SuperLink certificate; used by nothing that runs
    deploy/superlink/server.{pem,key}  SuperLink and Fleet gateway (operator host)
    deploy/superexec/superexec.secret  SuperLink and its ServerApp executor (operator host)
    deploy/public/ca.crt             everyone: nodes, CLIs, executors
    node/node.key, node/superexec.secret, node/ca.crt   one node: its SuperNode and ClientApp executor
    node/node.pub                    the operator, who registers it
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lumosrec.core.dataset import CATALOG_NAME_FILE, Dataset
from lumosrec.core.errors import ConfigError, LumosError
from lumosrec.core.runconfig import format_run_config
from lumosrec.core.synthetic import write_folder
from lumosrec.launch.app import flower_env, free_port
from lumosrec.launch.supervise import ChildProcesses, RunError, RunFollower, flower_refusal, flwr_answer, run_to_end

log = logging.getLogger(__name__)

#: the SuperLink's one port (Fleet, Control, Runtime APIs): bind it to the operator host's loopback
SUPERLINK_PORT = 8000
#: the Fleet gateway: the only port nodes reach (that of Flower's former gRPC Fleet API)
FLEET_PORT = 9092
#: a SuperNode's Runtime API, polled by its ClientApp executor on the same host
SUPERNODE_PORT = 9094
#: the largest request body the gateway buffers: a SuperNode pushes one object per request and
#: Flower cuts arrays into 5 MiB chunks, so this is ample, and it bounds what one request costs
MAX_BODY_BYTES = 64 * 1024 * 1024
#: certificate lifetime
CERT_DAYS = 365
#: the operator's side always reaches the SuperLink on loopback, so its certificate names it too
LOOPBACK_HOSTS = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class OperatorFiles:
    """The operator's CA, SuperLink certificate and ServerApp-executor secret, under ``root``."""

    root: Path

    @property
    def ca_key(self) -> Path:
        return self.root / "ca" / "ca.key"

    @property
    def ca(self) -> Path:
        return self.root / "public" / "ca.crt"

    @property
    def cert(self) -> Path:
        return self.root / "superlink" / "server.pem"

    @property
    def key(self) -> Path:
        return self.root / "superlink" / "server.key"

    @property
    def secret(self) -> Path:
        return self.root / "superexec" / "superexec.secret"

    def paths(self) -> tuple[Path, ...]:
        return (self.ca_key, self.ca, self.cert, self.key, self.secret)


@dataclass(frozen=True)
class NodeFiles:
    """One node's key pair, its executor secret and the CA certificate, in ``folder``."""

    folder: Path

    @property
    def key(self) -> Path:
        return self.folder / "node.key"

    @property
    def public_key(self) -> Path:
        return self.folder / "node.pub"

    @property
    def secret(self) -> Path:
        return self.folder / "superexec.secret"

    @property
    def ca(self) -> Path:
        return self.folder / "ca.crt"


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` readable by its owner only, from the first byte on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


def _write_secret(path: Path) -> None:
    # Flower reads the file as raw bytes: no trailing newline, so `echo`-made copies are not equal
    _write_private(path, secrets.token_hex(32).encode())


def _existing(paths: Sequence[Path], what: str) -> bool:
    """True if all of ``paths`` exist (reuse them), False if none; a partial set is an error."""
    present = [path.is_file() for path in paths]
    if all(present):
        return True
    if any(present):
        missing = ", ".join(str(path) for path, here in zip(paths, present) if not here)
        raise ConfigError(f"{what} is incomplete ({missing} missing); delete it and run the command again")
    return False


def make_operator_files(root: Path, hosts: Sequence[str] = ()) -> OperatorFiles:
    """A CA, a SuperLink certificate for ``hosts`` (plus loopback) and a SuperExec secret under ``root``;
    files already there are kept, so nodes holding the CA certificate stay valid."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    files = OperatorFiles(root)
    if _existing(files.paths(), f"the deployment folder {root}"):
        return files
    names = list(dict.fromkeys([*hosts, *LOOPBACK_HOSTS]))
    san: list[x509.GeneralName] = []
    for name in names:
        try:
            san.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            san.append(x509.DNSName(name))
    # clocks of nodes and operator differ a little; a certificate valid from "now" would be refused
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    end = start + datetime.timedelta(days=CERT_DAYS)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Lumos CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    # the extensions strict verifiers (Python 3.13's default context) require of a CA and a server
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    unencrypted = serialization.NoEncryption()
    _write_private(files.ca_key, ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, unencrypted))
    _write_private(files.key, server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, unencrypted))
    files.cert.write_bytes(server_cert.public_bytes(pem) + ca_cert.public_bytes(pem))
    files.ca.parent.mkdir(parents=True, exist_ok=True)
    files.ca.write_bytes(ca_cert.public_bytes(pem))
    _write_secret(files.secret)
    return files


def make_node_files(folder: Path, ca: Path, public_key: Path | None = None) -> NodeFiles:
    """A node's EC key pair (OpenSSH format, as Flower reads it), its executor secret and a copy of
    the CA certificate in ``folder``; the public key goes to ``public_key`` (default ``folder/node.pub``).
    Keys already there are kept: the SuperLink knows the node by its registered public key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not ca.is_file():
        raise ConfigError(f"CA certificate {ca} not found; copy public/ca.crt from the operator")
    node = NodeFiles(folder)
    public_key = public_key or node.public_key
    if not _existing([node.key, node.secret, public_key], f"the node folder {folder}"):
        private = ec.generate_private_key(ec.SECP384R1())
        _write_private(
            node.key,
            private.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            ),
        )
        public_key.parent.mkdir(parents=True, exist_ok=True)
        public = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        public_key.write_bytes(public + b"\n")
        _write_secret(node.secret)
    if not node.ca.is_file() or node.ca.read_bytes() != ca.read_bytes():
        shutil.copyfile(ca, node.ca)
    return node


def require_files(*paths: Path) -> None:
    """A one-line error for the first of ``paths`` that is not a file."""
    for path in paths:
        if not path.is_file():
            raise ConfigError(f"{path} not found; make it with `lumos deploy certs` or `lumos deploy node-keys`")


def superlink_command(
    files: OperatorFiles, host: str = "127.0.0.1", port: int = SUPERLINK_PORT, database: str | None = None
) -> list[str]:
    """The SuperLink: TLS, registered SuperNodes only, and (process isolation) executors that hold the secret."""
    command = [
        "flower-superlink",
        "--host",
        host,
        "--port",
        str(port),
        "--isolation",
        "process",
        "--disable-runtime-dependency-installation",
        "--enable-supernode-auth",
        "--superexec-auth-secret-file",
        str(files.secret),
        "--ssl-ca-certfile",
        str(files.ca),
        "--ssl-certfile",
        str(files.cert),
        "--ssl-keyfile",
        str(files.key),
    ]
    if database:
        command += ["--database", database]
    return command


def gateway_command(files: OperatorFiles, host: str, superlink: str, port: int = FLEET_PORT) -> list[str]:
    """The Fleet gateway: nodes' only way in, on the node-facing ``host``."""
    return [
        "lumos",
        "deploy",
        "fleet-gateway",
        "--host",
        host,
        "--port",
        str(port),
        "--superlink",
        superlink,
        "--ssl-certfile",
        str(files.cert),
        "--ssl-keyfile",
        str(files.key),
        "--ssl-ca-certfile",
        str(files.ca),
    ]


def supernode_command(
    fleet: str, data_path: str, node: NodeFiles, host: str = "127.0.0.1", port: int = SUPERNODE_PORT
) -> list[str]:
    """A SuperNode: reaches the SuperLink through the Fleet gateway at ``fleet``, signs with its own
    key, and serves its ClientApp executor (which must hold the node's secret) on ``host:port``."""
    return [
        "flower-supernode",
        "--superlink",
        fleet,
        "--root-certificates",
        str(node.ca),
        "--auth-supernode-private-key",
        str(node.key),
        "--superexec-auth-secret-file",
        str(node.secret),
        "--host",
        host,
        "--port",
        str(port),
        "--isolation",
        "process",
        "--node-config",
        f'data-path="{data_path}"',
    ]


def superexec_command(runtime_address: str, secret: Path, ca: Path | None = None) -> list[str]:
    """A SuperExec: runs the ServerApp (at the SuperLink, over TLS: give ``ca``) or the ClientApp
    (at its SuperNode, on the same host: plain HTTP on loopback)."""
    command = ["flower-superexec", "--runtime-api-address", runtime_address]
    command += ["--insecure"] if ca is None else ["--root-certificates", str(ca)]
    return [*command, "--superexec-auth-secret-file", str(secret)]


def compose_commands(nodes: int) -> dict[str, list[str]]:
    """The commands ``docker-compose.yml`` must run, by service, with its containers' paths:
    ``/operator`` (the deployment folder, certs only), ``/superlink``, ``/superexec``, ``/public``,
    ``/node`` (one node's folder), ``/data`` and ``/catalog``."""
    files = OperatorFiles(Path("/"))
    keys = [f"/public/node-{i}.pub" for i in range(1, nodes + 1)]
    certs = ["lumos", "deploy", "certs", "--out", "/operator", "--host", "superlink", "--host", "fleet-gateway"]
    commands = {
        "certs": certs,
        "superlink": superlink_command(files, host="superlink", database="/state/state.db"),
        "superexec-serverapp": superexec_command(f"superlink:{SUPERLINK_PORT}", files.secret, files.ca),
        # inside its container 0.0.0.0 is the gateway's networks only: the nodes' one and the operator's
        "fleet-gateway": gateway_command(files, "0.0.0.0", f"superlink:{SUPERLINK_PORT}"),
        "register": [
            "lumos",
            "deploy",
            "register",
            "--superlink",
            f"superlink:{SUPERLINK_PORT}",
            "--ca",
            str(files.ca),
            *keys,
        ],
    }
    node = NodeFiles(Path("/node"))
    for i, key in enumerate(keys, start=1):
        commands[f"node-keys-{i}"] = [
            "lumos",
            "deploy",
            "node-keys",
            "--out",
            "/node",
            "--ca",
            str(files.ca),
            "--public-key",
            key,
        ]
        commands[f"supernode-{i}"] = supernode_command(f"fleet-gateway:{FLEET_PORT}", "/data", node)
        # the executor shares its SuperNode's network namespace, so the Runtime API stays on loopback
        commands[f"superexec-clientapp-{i}"] = superexec_command(f"127.0.0.1:{SUPERNODE_PORT}", node.secret)
    return commands


#: response headers that describe one hop, not the message; the gateway sets its own
_HOP_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        b"content-encoding",
    }
)


def fleet_routes() -> frozenset[tuple[str, str]]:
    """(method, path) of every route of Flower's Fleet API and of its health check: what the gateway forwards."""
    from flwr.supercore.routers import health
    from flwr.superlink.routers.fleet.router import router

    return frozenset(
        (method, route.path) for route in (*router.routes, *health.router.routes) for method in route.methods
    )


class FleetGateway:
    """ASGI app that forwards the Fleet API to the SuperLink over TLS and answers 404 to everything
    else, the Control and Runtime APIs above all. Exact (method, path) pairs, no query strings:
    nothing a node sends can reach another route of the SuperLink."""

    def __init__(self, superlink: str, ca: Path) -> None:
        import httpx

        self.routes = fleet_routes()
        self.httpx = httpx
        self.upstream = httpx.AsyncClient(
            base_url=f"https://{superlink}",
            verify=ssl.create_default_context(cafile=str(ca)),
            # longer than a SuperNode's own 30 s, so its retries, not the gateway, decide when to give up
            timeout=httpx.Timeout(60.0),
        )

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await self.upstream.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return
        route = (scope["method"], scope["path"])
        if route not in self.routes or scope["query_string"]:
            client = scope.get("client") or ("?", 0)
            log.warning("refused %s %s from %s", *route, client[0])
            await _respond(send, 404, b"not a Fleet API route\n")
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY_BYTES:
                await _respond(send, 413, b"request too large\n")
                return
        headers = [(name, value) for name, value in scope["headers"] if name.lower() not in _HOP_HEADERS]
        try:
            reply = await self.upstream.request(scope["method"], scope["path"], headers=headers, content=bytes(body))
        except self.httpx.HTTPError as error:
            log.warning("SuperLink unreachable: %s", error)
            await _respond(send, 502, b"SuperLink unreachable\n")
            return
        reply_headers = [(name, value) for name, value in reply.headers.raw if name.lower() not in _HOP_HEADERS]
        await _respond(send, reply.status_code, reply.content, reply_headers)


async def _respond(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", b"text/plain")] if headers is None else headers
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def run_fleet_gateway(host: str, port: int, superlink: str, certfile: Path, keyfile: Path, ca: Path) -> None:
    """Serve :class:`FleetGateway` on ``host:port`` over TLS until stopped."""
    import uvicorn

    require_files(certfile, keyfile, ca)
    # httpx logs a line per forwarded request (every node polls every few seconds) and Flower's state
    # module, imported for the route list, its migrations; the gateway logs refusals itself
    for noisy in ("httpx", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        # uvicorn would load the pair only when it starts serving, and fail with a traceback
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
        gateway = FleetGateway(superlink, ca)
    except ssl.SSLError as error:
        raise ConfigError(f"cannot use {certfile}, {keyfile} and {ca} for TLS: {error}") from error
    log.info("Fleet gateway on %s:%d -> SuperLink %s (Fleet API only)", host, port, superlink)
    uvicorn.run(
        gateway,
        host=host,
        port=port,
        ssl_certfile=str(certfile),
        ssl_keyfile=str(keyfile),
        ws="none",
        lifespan="on",
        access_log=False,
        # the SuperLink's own Server and Date headers pass through
        server_header=False,
        date_header=False,
        log_level="warning",
    )


def write_connection(home: Path, name: str, address: str, ca: Path) -> Path:
    """``home/config.toml`` with one SuperLink connection, the default one, over TLS with ``ca``."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    path.write_text(
        f'[superlink]\ndefault = "{name}"\n[superlink.{name}]\naddress = "{address}"\n'
        f'root-certificates = "{ca.resolve()}"\n'
    )
    return path


def flwr_json(arguments: list[str], home: Path, timeout: float = 120.0) -> dict:
    """Run ``flwr ... --format json`` with ``FLWR_HOME=home``; its JSON answer (``success`` says how it went)."""
    return flwr_answer(arguments, flower_env(FLWR_HOME=str(home)), timeout, check=False)


def register_nodes(public_keys: Sequence[Path], home: Path, connection: str) -> list[str]:
    """Register each public key with the SuperLink of ``connection`` (in ``home``) through the Control
    API; a key registered before counts as done, so setup can be run again. Returns the new node ids."""
    require_files(*public_keys)
    node_ids = []
    for key in public_keys:
        answer = flwr_json(["supernode", "register", str(key.resolve()), connection], home)
        if answer.get("success"):
            node_ids.append(str(answer["node-id"]))
        elif "already in use" not in str(answer.get("error-message")):
            raise LumosError(f"registering {key} failed: {flower_refusal(answer)}")
    return node_ids


def register_at(superlink: str, ca: Path, public_keys: Sequence[Path]) -> list[str]:
    """:func:`register_nodes` through a throwaway Flower home that connects to ``superlink``."""
    require_files(ca)
    with tempfile.TemporaryDirectory(prefix="lumos-flwr-") as home:
        write_connection(Path(home), "operator", superlink, ca)
        return register_nodes(public_keys, Path(home), "operator")


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
    # the server sees only this folder: it names the run's dataset in result.json
    (out / "catalog" / CATALOG_NAME_FILE).write_text(json.dumps({"name": dataset.name}) + "\n", encoding="utf-8")
    return folders


@dataclass
class LoopbackDeployment:
    """The hardened topology on 127.0.0.1: SuperLink and its ServerApp executor, the Fleet gateway,
    and per data folder a registered SuperNode with its ClientApp executor.

    Use as a context manager: it waits until every SuperNode is online. :meth:`run` submits the
    app with ``flwr run`` through the operator's CLI home (``cli/``) and follows it to its result.
    Every process gets its own ``FLWR_HOME``, log file in ``workdir`` and session (Ctrl-C in a
    terminal reaches the launcher only); :meth:`start` adds one. Leaving the context stops every
    process started meanwhile, those the executors spawned included (:class:`ChildProcesses`).
    On one host nothing keeps a node from the SuperLink's port; across hosts, that port is on the
    operator host's loopback and nodes see the gateway only.
    """

    data_paths: list[Path]
    workdir: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    #: the processes without which no run can go on (a SuperNode may die: the server counts it out)
    ESSENTIAL = ("superlink", "superexec-serverapp", "fleet-gateway")

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.files = make_operator_files(self.workdir / "deploy")
        self.superlink_address = f"127.0.0.1:{free_port()}"
        self.fleet_address = f"127.0.0.1:{free_port()}"
        self.nodes = [
            make_node_files(self.workdir / "deploy" / f"node-{i}", self.files.ca)
            for i in range(1, len(self.data_paths) + 1)
        ]
        self.node_addresses = [f"127.0.0.1:{free_port()}" for _ in self.nodes]
        self.cli_home = self.workdir / "cli"
        write_connection(self.cli_home, "operator", self.superlink_address, self.files.ca)
        self.children = ChildProcesses()

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        """Start ``command`` with its own ``FLWR_HOME`` (``workdir/name``), output to ``workdir/name.log``."""
        home = self.workdir / name
        home.mkdir(exist_ok=True)
        with open(self.workdir / f"{name}.log", "w") as log_file:
            process = subprocess.Popen(
                command,
                env=flower_env(FLWR_HOME=str(home)),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes[name] = process
        return process

    def __enter__(self) -> LoopbackDeployment:
        self.children.__enter__()
        try:
            self._start_all()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start_all(self) -> None:
        host, port = self.superlink_address.split(":")
        self.start("superlink", superlink_command(self.files, host=host, port=int(port)))
        self.start("superexec-serverapp", superexec_command(self.superlink_address, self.files.secret, self.files.ca))
        fleet_host, fleet_port = self.fleet_address.split(":")
        self.start("fleet-gateway", gateway_command(self.files, fleet_host, self.superlink_address, int(fleet_port)))
        self._wait_healthy(self.superlink_address, "superlink")
        self._wait_healthy(self.fleet_address, "fleet-gateway")
        self.node_ids = register_nodes([node.public_key for node in self.nodes], self.cli_home, "operator")
        for i, (path, node, address) in enumerate(zip(self.data_paths, self.nodes, self.node_addresses), start=1):
            node_host, node_port = address.split(":")
            self.start(
                f"supernode-{i}",
                supernode_command(self.fleet_address, str(path.resolve()), node, node_host, int(node_port)),
            )
            self.start(f"superexec-clientapp-{i}", superexec_command(address, node.secret))
        self._wait_online()

    def _wait_healthy(self, address: str, name: str, timeout: float = 60.0) -> None:
        import urllib.request

        context = ssl.create_default_context(cafile=str(self.files.ca))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                urllib.request.urlopen(f"https://{address}/health", timeout=2, context=context)
                return
            except OSError:
                time.sleep(0.3)
        raise LumosError(f"{name} did not become healthy within {timeout:.0f} s; see {self.workdir}/{name}.log")

    def check_alive(self) -> None:
        """Raise :class:`RunError` when a process no run can do without has exited."""
        for name in self.ESSENTIAL:
            process = self.processes.get(name)
            if process is not None and process.poll() is not None:
                code = process.returncode
                how = f"was killed ({signal.Signals(-code).name})" if code < 0 else f"exited with status {code}"
                raise RunError(f"the {name} {how}; see {self.workdir}/{name}.log")

    def node_status(self) -> dict[str, str]:
        """Node id -> status (``registered``, ``online``, ...) of every node the SuperLink knows."""
        answer = flwr_answer(["supernode", "list", "operator"], flower_env(FLWR_HOME=str(self.cli_home)))
        return {str(node["node-id"]): node["status"] for node in answer["nodes"]}

    def _wait_online(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            status = self.node_status()
            if all(status.get(node_id) == "online" for node_id in self.node_ids):
                return
            time.sleep(1.0)
        raise LumosError(f"SuperNodes not online within {timeout:.0f} s ({status}); see {self.workdir}/supernode-*.log")

    def run(self, app_dir: Path, run_config: Mapping, follower: RunFollower, timeout: float = 900.0) -> dict:
        """Submit the app with ``run_config``, follow it to its end with ``follower`` (Flower's log
        to ``workdir/run.log``), and return its ``result.json``; a run that fails, or loses a
        process it needs, raises :class:`RunError`."""
        return run_to_end(
            [str(app_dir), "operator", "--run-config", format_run_config(run_config)],
            ["operator"],
            flower_env(FLWR_HOME=str(self.cli_home)),
            follower,
            timeout,
            log_path=self.workdir / "run.log",
            alive=self.check_alive,
        )

    def __exit__(self, *exc: object) -> None:
        self.children.stop()
