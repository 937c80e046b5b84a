"""The launchers (`lumos simulate`, `lumos deploy local`): values checked before anything starts,
Flower's log as a person reads it, and no process left behind after Ctrl-C or SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from lumosrec.core.errors import ConfigError
from lumosrec.core.runconfig import check_values
from lumosrec.core.synthetic import SyntheticConfig, generate, write_folder
from lumosrec.launch.app import APP_DIR, default_run_config
from lumosrec.launch.cli import main
from lumosrec.launch.supervise import LogFilter, RunFollower, describe_round, plain, run_summary
from tests.test_deployment import check_commands, commands

#: a tiny model: the processes matter here, not the training
TINY = "hidden-size=16 inner-size=32"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"num-server-rounds": -1}, "num-server-rounds=-1: must be a positive integer"),
        ({"fraction-train": 1.5}, r"fraction-train=1.5: must be in \(0, 1\]"),
        ({"fraction-evaluate": 0.0}, r"fraction-evaluate=0.0: must be in \(0, 1\]"),
        ({"learning-rate": -1.0}, "learning-rate=-1.0: must be positive"),
        ({"local-epochs": 2.5}, "local-epochs=2.5: must be a positive integer"),
        ({"min-nodes": True}, "min-nodes=True: must be a positive integer"),
        ({"round-timeout": "soon"}, "round-timeout='soon': must be positive"),
        ({"num-malicious-nodes": -2}, "num-malicious-nodes=-2: must be -1"),
        ({"trimmed-beta": 0.5}, r"trimmed-beta=0.5: must be in \[0, 0.5\)"),
        ({"hidden-size": 30, "num-heads": 4}, "hidden-size=30: must be a multiple of num-heads=4"),
    ],
)
def test_values_no_run_can_use_are_refused(values: dict, message: str) -> None:
    check_values(default_run_config())  # the defaults pass
    with pytest.raises(ConfigError, match=message):
        check_values({**default_run_config(), **values})


@pytest.mark.parametrize(
    "command",
    [
        ["simulate", "--fraction-train", "1.5"],
        ["simulate", "--fraction-train", "0"],
        ["simulate", "--rounds", "-1"],
        ["simulate", "--users-per-client", "2000"],  # one node for min-nodes=2
        ["simulate", "--run-config", "learning-rate=-1"],
        ["simulate", "--run-config", "fraction-train=1.5", "--num-supernodes", "4"],
        ["deploy", "local", "--rounds", "0"],
        ["deploy", "local", "--nodes", "2", "--run-config", "min-nodes=3"],
        ["deploy", "local", "--run-config", "rounds=3"],  # a mistyped key
    ],
)
def test_a_bad_value_is_one_line_before_anything_starts(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before Ray or a SuperLink starts: no child process, nothing written, one line."""
    out = tmp_path / "out"
    where = ["--workdir", str(out)] if command[0] == "deploy" else ["--out", str(out)]
    before = set(psutil.Process().children(recursive=True))
    assert main([*command, *where]) == 2
    error = capsys.readouterr().err
    assert error.startswith("lumos: error: ") and error.count("\n") == 1, error
    assert set(psutil.Process().children(recursive=True)) <= before
    assert not out.exists()


def test_flowers_log_without_request_lines_and_each_record_once() -> None:
    """A ServerApp's log as `flwr log` streams it: Flower's handler and the root handler both
    print every `flwr` record (tracebacks too), and httpx logs each request to the SuperLink (the
    push of every record among them)."""
    streamed = [
        "\x1b[92mINFO \x1b[0m:      configure_train: Sampled 3 nodes (out of 3)",
        "INFO flwr: configure_train: Sampled 3 nodes (out of 3)",
        'INFO httpx: HTTP Request: POST http://127.0.0.1:9093/v1/runtime/push-logs "HTTP/1.1 200 OK"',
        'INFO httpx: HTTP Request: POST https://127.0.0.1:9093/v1/runtime/get-nodes "HTTP/1.1 200 OK"',
        "DEBUG flwr: Constructed ActorPool with: 2 actors",
        "WARNING lumos.server: round 2: node 7's train reply is an error: boom",
        "\x1b[91mERROR \x1b[0m:     ServerApp thread raised an exception",
        "Traceback (most recent call last):",
        '  File "server_app.py", line 3, in main',
        "lumosrec.core.errors.FederationError: round 2: 1 node(s) connected",
        "ERROR flwr: ServerApp thread raised an exception",
        "Traceback (most recent call last):",
        '  File "server_app.py", line 3, in main',
        "lumosrec.core.errors.FederationError: round 2: 1 node(s) connected",
        "INFO lumos.server: round 3: loss 1.0000",
        "INFO lumos.server: round 3: loss 1.0000",  # the same line twice from one logger is kept
    ]
    log_filter = LogFilter()
    assert [line for line in map(plain, streamed) if log_filter.keep(line)] == [
        "INFO :      configure_train: Sampled 3 nodes (out of 3)",
        "WARNING lumos.server: round 2: node 7's train reply is an error: boom",
        "ERROR :     ServerApp thread raised an exception",
        "Traceback (most recent call last):",
        '  File "server_app.py", line 3, in main',
        "lumosrec.core.errors.FederationError: round 2: 1 node(s) connected",
        "INFO lumos.server: round 3: loss 1.0000",
        "INFO lumos.server: round 3: loss 1.0000",
    ]


def test_the_summary_says_failures_users_left_out_and_where_the_result_is(tmp_path: Path) -> None:
    rows = [{"round": 1, "eval_users": 60}, {"round": 2}, {"round": 3, "eval_users": 40}]
    (tmp_path / "metrics.json").write_text(json.dumps(rows))
    assert run_summary({"failures": 3}, tmp_path, 60).splitlines() == [
        "client failures: 3 (replies lost, failed or rejected)",
        "users not evaluated: 20 of 60 (round 3)",
        f"results: {tmp_path / 'result.json'}",
    ]
    (tmp_path / "metrics.json").write_text(json.dumps(rows[:1]))
    assert "not evaluated" not in run_summary({"failures": 0}, tmp_path, 60)


def test_a_round_line_says_failures_and_users_left_out() -> None:
    row = {"round": 2, "round_seconds": 4.25, "train_failures": 1, "eval_failures": 1, "eval_users": 800}
    row["test"] = {"unmasked": {"HR@20": 0.5}}
    assert (
        describe_round(row, 3, 1200) == "round 2/3: 4.2 s, 2 failures, 800 of 1200 users evaluated, test HR@20 0.5000"
    )
    skipped = {"round": 1, "round_seconds": 1.0, "train_failures": 2, "skipped": "0 valid replies of 2"}
    assert describe_round(skipped, 3, 1200) == "round 1/3: 1.0 s, 2 failures; model unchanged: 0 valid replies of 2"


def test_following_a_run_shows_its_rounds_and_why_it_failed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The follower reads a stream shaped like `flwr log --stream` while the run writes metrics.json:
    a resumed run says so, each new round gets a line (not a terminal), the run's log keeps no
    push-log line, and the last exception is why the run failed."""
    out = tmp_path / "run"
    out.mkdir()
    before = [{"round": 1, "round_seconds": 2.0, "train_failures": 0}]  # the checkpointed round
    (out / "metrics.json").write_text(json.dumps(before))
    row = {"round": 2, "round_seconds": 3.0, "train_failures": 1, "eval_failures": 0, "eval_users": 40}
    stream = [
        "\x1b[92mINFO \x1b[0m:      Starting logstream for run_id `7`",
        'INFO httpx: HTTP Request: POST http://127.0.0.1:1/v1/runtime/push-logs "HTTP/1.1 200 OK"',
        "WARNING lumos.server: round 2: 1 node(s) sent no train reply within round-timeout=20.0s",
        "lumosrec.core.errors.FederationError: round 3: 1 node(s) connected",
    ]
    server = (
        "import json, pathlib, sys\n"
        f"print(*{stream[:3]!r}, sep='\\n', flush=True)\n"
        f"pathlib.Path({str(out / 'metrics.json')!r}).write_text(json.dumps({[*before, row]!r}))\n"
        f"print({stream[3]!r}, flush=True)\n"
    )
    follower = RunFollower(out, rounds=3, total_users=60, resumed=1)
    follower.follow([sys.executable, "-c", server], os.environ, timeout=60, log_path=tmp_path / "run.log")
    console = capsys.readouterr().err
    assert "resumed after round 1" in console and "round 1/3" not in console
    assert "round 2/3: 3.0 s, 1 failures, 40 of 60 users evaluated" in console
    assert "WARNING lumos.server: round 2: 1 node(s) sent no train reply" in console
    assert follower.reason == "FederationError: round 3: 1 node(s) connected" and follower.failures == 1
    assert (tmp_path / "run.log").read_text().splitlines() == [plain(stream[0]), *stream[2:]]


def test_readme_bare_flower_usage_names_only_commands_and_flags_that_exist() -> None:
    readme = (APP_DIR / "README.md").read_text()
    section = readme[readme.index("The bare Flower command") : readme.index("Strategies (all Flower's own)")]
    shell = "\n".join(re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL))
    found = commands(shell.replace("\\\n", " ").replace("<run-id>", "1").splitlines())
    assert [(program, arguments[0]) for program, arguments in found] == [
        ("flwr", "run"),
        ("flwr", "log"),
        ("flwr", "list"),
    ]
    check_commands(found)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 users: 20 per node of a three-node deployment, so that a round takes seconds."""
    return write_folder(
        generate(SyntheticConfig(num_users=60, items_per_category=8, seed=11)), tmp_path_factory.mktemp("small")
    )


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short TMPDIR for the command: Flower and Ray put their sockets under it."""
    folder = Path(tempfile.mkdtemp(prefix="ll", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def lumos(short_tmp: Path) -> Iterator[Callable[[list[str]], Command]]:
    """Starts `lumos ARGUMENTS` as a :class:`Command`; closes it after the test, passed or failed."""
    started: list[Command] = []

    def start(arguments: list[str]) -> Command:
        started.append(Command(arguments, short_tmp))
        return started[-1]

    yield start
    for command in started:
        command.close()


class Command:
    """`lumos ...` in its own session (as a shell runs a command), its output in files, and every
    process it starts recorded while it runs."""

    def __init__(self, arguments: list[str], folder: Path) -> None:
        self.out, self.err = folder / "stdout.txt", folder / "stderr.txt"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "lumosrec.launch.cli", *arguments],
                env={**os.environ, "TMPDIR": str(folder)},
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        self.me = psutil.Process(self.process.pid)
        self.seen: set[psutil.Process] = set()

    def close(self) -> None:
        """Stop the command as a user would, if it still runs, then kill whatever it left: a
        failed test must not leave processes behind either."""
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=30)
        self.process.kill()
        self.process.wait()
        for process in self.seen:
            with contextlib.suppress(psutil.Error):
                process.kill()

    def record(self) -> None:
        """Remember every process below the command now; one it orphans later stays in ``seen``."""
        with contextlib.suppress(psutil.NoSuchProcess):
            self.seen |= set(self.me.children(recursive=True))

    def wait_for(self, condition: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            self.record()
            assert self.process.poll() is None, self.output()
            assert time.monotonic() < deadline, f"gave up waiting after {timeout:.0f} s\n{self.output()}"
            time.sleep(0.3)
        self.record()

    def commands(self) -> dict[int, str]:
        """Pid -> command line of the recorded processes still there."""
        found = {}
        for process in self.seen:
            with contextlib.suppress(psutil.Error):
                found[process.pid] = " ".join(process.cmdline())
        return found

    def pids(self, *words: str) -> list[int]:
        return [pid for pid, command in self.commands().items() if all(word in command for word in words)]

    def running(self, *words: str) -> bool:
        return bool(self.pids(*words))

    def output(self) -> str:
        return self.out.read_text()[-3000:] + self.err.read_text()[-3000:]

    def stop(self, signum: int) -> tuple[int, float]:
        """Ctrl-C (SIGINT to the command's process group, as a terminal sends it) or ``kill``
        (SIGTERM to the command alone); its exit status and when it exited."""
        self.record()
        if signum == signal.SIGINT:
            os.killpg(self.process.pid, signum)
        else:
            self.process.send_signal(signum)
        status = self.process.wait(timeout=60)
        return status, time.monotonic()

    def left_behind(self, since: float, within: float = 10.0) -> list[str]:
        """The recorded processes still running ``within`` seconds after ``since``."""
        while True:
            alive = []
            for process in self.seen:
                try:
                    if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                        alive.append(f"{process.pid} {' '.join(process.cmdline())[:120]}")
                except psutil.NoSuchProcess:
                    continue
            if not alive or time.monotonic() > since + within:
                return alive
            time.sleep(0.5)


def metrics_rows(out: Path) -> int:
    try:
        return len(json.loads((out / "metrics.json").read_text()))
    except (OSError, json.JSONDecodeError):
        return 0


def check_stopped(command: Command, signum: int) -> None:
    status, exited = command.stop(signum)
    assert status == 128 + signum, command.output()
    error = command.err.read_text()
    assert error.rstrip().endswith("lumos: interrupted; resume with the same command"), error[-2000:]
    assert "Traceback" not in error, error[-3000:]
    assert command.left_behind(exited) == []


SIMULATION = ["simulate", "--data", "synthetic", "--users-per-client", "200", "--rounds", "2", "--run-config", TINY]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stopped_simulation_leaves_no_process(
    signum: int, short_tmp: Path, lumos: Callable[[list[str]], Command]
) -> None:
    """Ctrl-C or SIGTERM once Ray runs: every process the command started (the detached SuperLink,
    its executor, the simulation, Ray's renamed agents and workers) is gone within seconds, and the
    command ends with one line and status 128 + the signal."""
    command = lumos([*SIMULATION, "--out", str(short_tmp / "run")])
    command.wait_for(lambda: command.running("ray::"), timeout=240)
    assert command.running("flower-superlink")  # it outlives `flwr run`, which started it
    check_stopped(command, signum)


def deploy_local(data: Path, nodes: int, workdir: Path, run_config: str) -> list[str]:
    """`lumos deploy local` of two rounds of a tiny model on ``data``."""
    command = [
        "deploy",
        "local",
        "--data",
        str(data),
        "--nodes",
        str(nodes),
        "--rounds",
        "2",
        "--workdir",
        str(workdir),
    ]
    return [*command, "--run-config", f"{TINY} eval-every=1 local-epochs=1 {run_config}"]


@pytest.mark.slow
def test_a_deployment_stopped_with_sigterm_leaves_no_process(
    small_data: Path, short_tmp: Path, lumos: Callable[[list[str]], Command]
) -> None:
    """SIGTERM once the run started: SuperLink, gateway, SuperNodes, executors and the app
    processes they spawned are all gone within seconds."""
    command = lumos(deploy_local(small_data, 2, short_tmp / "deploy", ""))
    command.wait_for(lambda: command.running("flwr-serverapp"), timeout=240)
    assert command.running("flower-supernode") and command.running("flower-superlink")
    check_stopped(command, signal.SIGTERM)


@pytest.mark.slow
def test_a_dead_node_is_reported_and_ctrl_c_leaves_no_process(
    small_data: Path, short_tmp: Path, lumos: Callable[[list[str]], Command]
) -> None:
    """One of three SuperNodes dies as the run starts: the round neither hangs nor fails, and says
    what it lost (its failures, the users it could not evaluate); then Ctrl-C stops every process.
    The SuperLink takes the dead node for online until its heartbeats are missed, so the round waits
    round-timeout for its replies."""
    workdir = short_tmp / "deploy"
    command = lumos(deploy_local(small_data, 3, workdir, "round-timeout=40.0"))
    command.wait_for(lambda: command.running("flwr-serverapp"), timeout=240)
    [node] = [process for process in command.seen if process.pid in command.pids("flower-supernode", "node-2")]
    node.kill()
    command.wait_for(lambda: metrics_rows(workdir / "run") >= 1, timeout=240)
    [row] = json.loads((workdir / "run" / "metrics.json").read_text())
    assert row["train_failures"] == 1 and row["eval_users"] == 40, row
    command.wait_for(lambda: "round 1/2: " in command.err.read_text(), timeout=10)
    line = f"round 1/2: {row['round_seconds']:.1f} s, {row['train_failures'] + row['eval_failures']} failures, "
    assert line + "40 of 60 users evaluated" in command.err.read_text()
    check_stopped(command, signal.SIGINT)
