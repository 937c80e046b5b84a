"""``lumos simulate``: a federated run on Flower's Ray simulation runtime, checked end to end.

It wraps ``flwr run`` and fixes what makes the bare command unsafe to script:

* ``num-supernodes`` is derived from the data (one user per virtual client by default);
* relative paths become absolute (the apps run from Flower's own app folder);
* a private ``FLWR_HOME`` and port per call, so a stale SuperLink of another checkout can
  never serve the run, and the managed SuperLink is stopped afterwards;
* ``flwr run`` exits 0 even when the run failed, so the run's final status *and* its
  ``result.json`` are checked, and any failure raises :class:`SimulationError`.

``--ray-address`` attaches the simulation to an existing Ray cluster (``ray start --head``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from tqdm.auto import tqdm

from lumosrec.client.objectives import objective_for
from lumosrec.core.errors import ConfigError, LumosError
from lumosrec.core.results import read_result
from lumosrec.core.runconfig import format_run_config
from lumosrec.launch.app import (
    APP_DIR,
    check_node_count,
    check_run_config,
    default_num_nodes,
    default_run_config,
    flower_env,
    free_port,
)
from lumosrec.server.server_app import load_checkpoint

log = logging.getLogger(__name__)

ROUND_LINE = re.compile(r"round (\d+): loss")
PATH_KEYS = ("data", "out-dir", "views-dir")


class SimulationError(LumosError):
    """The simulation did not finish with status ``finished:completed`` and a result."""


def _absolute(run_config: dict) -> dict:
    for key in PATH_KEYS:
        value = str(run_config[key])
        if value and (key == "out-dir" or Path(value).exists()):
            run_config[key] = str(Path(value).resolve())
    return run_config


def stop_federation(flwr_home: Path) -> None:
    """Stop every process of one simulation: the detached SuperLink that ``flwr run`` started,
    its SuperExec, the simulation engine and its Ray workers all carry our private FLWR_HOME
    in their environment, and nothing else does."""
    marker = f"FLWR_HOME={flwr_home}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _flwr(args: list[str], env: Mapping[str, str], timeout: float) -> str:
    done = subprocess.run(["flwr", *args], env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise SimulationError(f"flwr {args[0]} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    return done.stdout


def simulate(
    overrides: Mapping[str, object],
    num_supernodes: int | None = None,
    ray_address: str | None = None,
    client_cpus: int | None = None,
    timeout: float = 3600.0,
    progress: bool = True,
) -> dict:
    """Run one simulation and return its ``result.json``.

    Parameters
    ----------
    overrides : mapping
        Run-config values replacing those of ``[tool.flwr.app.config]``.
    num_supernodes : int, optional
        Default: ``ceil(users / users-per-client)`` of the dataset.
    ray_address : str, optional
        Address of a running Ray cluster (``host:port``) to attach to.
    client_cpus : int, optional
        CPUs reserved per virtual client (Flower's default is 2).
    """
    run_config = _absolute(check_run_config(overrides, default_run_config()))
    if run_config["resume"]:
        _check_resumable(run_config)
    if num_supernodes is None:
        num_supernodes = default_num_nodes(run_config)
    check_node_count(run_config, num_supernodes)
    objective_for(run_config).prepare_ahead(run_config, progress)
    federation = {"num-supernodes": num_supernodes}
    if client_cpus is not None:
        federation["client-resources-num-cpus"] = client_cpus
    flwr_home = Path(tempfile.mkdtemp(prefix="lumos-flwr-"))
    env = flower_env(FLWR_HOME=str(flwr_home), FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()))
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    log.info(
        "simulating %d supernodes, %s rounds, results in %s",
        num_supernodes,
        run_config["num-server-rounds"],
        run_config["out-dir"],
    )
    # `timeout`, `kill` and job schedulers send SIGTERM: clean up as on Ctrl-C.
    previous_handler = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        submitted = _flwr(
            [
                "run",
                str(APP_DIR),
                "--format",
                "json",
                "--federation-config",
                " ".join(f"{k}={v}" for k, v in federation.items()),
                "--run-config",
                format_run_config(run_config),
            ],
            env,
            timeout=300,
        )
        run_id = str(json.loads(submitted)["run-id"])
        _stream(run_id, env, int(run_config["num-server-rounds"]), timeout, progress)
        listed = json.loads(_flwr(["list", "--run-id", run_id, "--format", "json"], env, timeout=120))
        status = listed["runs"][0]["status"]
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        stop_federation(flwr_home)
        shutil.rmtree(flwr_home, ignore_errors=True)
    result_path = Path(str(run_config["out-dir"])) / "result.json"
    if status != "finished:completed":
        raise SimulationError(f"run {run_id} ended with status {status}; see the log above")
    if not result_path.is_file():
        raise SimulationError(f"run {run_id} completed but wrote no {result_path}")
    return read_result(result_path)


def _check_resumable(run_config: Mapping) -> None:
    """Refuse early, with one line, to resume a checkpoint written with other settings."""
    try:
        load_checkpoint(Path(str(run_config["out-dir"])), run_config)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _stream(run_id: str, env: Mapping[str, str], rounds: int, timeout: float, progress: bool) -> None:
    """Follow the run's log until it ends, advancing a progress bar per round."""
    bar = tqdm(total=rounds, desc="rounds", unit="round", disable=not progress)
    process = subprocess.Popen(
        ["flwr", "log", run_id, "--stream"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + timeout
    try:
        for line in process.stdout:
            match = ROUND_LINE.search(line)
            if match:
                bar.update(int(match.group(1)) - bar.n)
            if match or "ERROR" in line or "Traceback" in line:
                bar.write(line.rstrip())
            else:
                log.debug(line.rstrip())
            if time.monotonic() > deadline:
                raise SimulationError(f"run {run_id} exceeded {timeout:.0f} s")
    finally:
        process.kill()
        bar.close()
