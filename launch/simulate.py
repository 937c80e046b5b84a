"""``lumos simulate``: a federated run on Flower's Ray simulation runtime, checked end to end.

It wraps ``flwr run`` and fixes what makes the bare command unsafe to script:

* the run config is checked, and a checkpoint to resume compared, before anything starts;
* ``num-supernodes`` is derived from the data (one user per virtual client by default);
* relative paths become absolute (the apps run from Flower's own app folder);
* a private ``FLWR_HOME`` and port per call, so a stale SuperLink of another checkout can
  never serve the run, and every process the run started (the detached SuperLink, its
  executor, the simulation, Ray's processes) is stopped afterwards, on Ctrl-C and SIGTERM too;
* ``flwr run`` exits 0 even when the run failed, so the run's final status *and* its
  ``result.json`` are checked, and any failure raises :class:`~lumosrec.launch.supervise.RunError`
  with the reason from the run's log.

``--ray-address`` attaches the simulation to an existing Ray cluster (``ray start --head``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import psutil

from lumosrec.client.objectives import objective_for
from lumosrec.core.data import run_data
from lumosrec.core.runconfig import format_run_config
from lumosrec.launch.app import (
    APP_DIR,
    check_node_count,
    check_resume,
    check_run_config,
    default_num_nodes,
    default_run_config,
    flower_env,
    free_port,
)
from lumosrec.launch.supervise import (
    ChildProcesses,
    RunFollower,
    descendants,
    interruptible,
    run_to_end,
    terminate,
)

log = logging.getLogger(__name__)

PATH_KEYS = ("data", "out-dir", "views-dir")


def simulation_config(overrides: Mapping[str, object]) -> dict:
    """The run config a simulation runs with: checked, its paths absolute."""
    run_config = check_run_config(overrides, default_run_config())
    for key in PATH_KEYS:
        value = str(run_config[key])
        if value and (key == "out-dir" or Path(value).exists()):
            run_config[key] = str(Path(value).resolve())
    return run_config


def stop_federation(flwr_home: Path) -> None:
    """Stop what is left of a simulation whose launcher could not clean up (it was SIGKILLed): the
    processes that carry its private ``FLWR_HOME`` in their environment (SuperLink, SuperExec, the
    simulation, Ray's raylet and GCS), and their descendants (Ray's agents and workers rename
    themselves and overwrite their environment)."""
    marked = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.pid != os.getpid() and process.environ().get("FLWR_HOME") == str(flwr_home):
                marked.append(process)
    terminate({*marked, *descendants(process.pid for process in marked)}, grace=0)


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

    Raises :class:`~lumosrec.launch.supervise.RunError` when the run fails (with the reason from
    its log), and :class:`~lumosrec.launch.supervise.Interrupted` on SIGINT or SIGTERM, once every
    process the run started is stopped; its checkpoint resumes.
    """
    run_config = simulation_config(overrides)
    resumed = check_resume(run_config)
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
    out_dir = Path(str(run_config["out-dir"]))
    rounds = int(run_config["num-server-rounds"])
    follower = RunFollower(out_dir, rounds, run_data(run_config).num_users, resumed, progress)
    arguments = [
        str(APP_DIR),
        "--federation-config",
        " ".join(f"{k}={v}" for k, v in federation.items()),
        "--run-config",
        format_run_config(run_config),
    ]
    try:
        # SIGTERM (kill, timeout, job schedulers) stops the run as Ctrl-C does, callers of this function included
        with interruptible(), ChildProcesses():
            return run_to_end(arguments, [], env, follower, timeout)
    finally:
        shutil.rmtree(flwr_home, ignore_errors=True)
