"""Supervising Flower for the launchers: the processes a command starts, Ctrl-C and SIGTERM,
``flwr``'s JSON answers, and one run followed round by round to its end.

``lumos simulate`` and ``lumos deploy local`` start Flower's processes (SuperLink, executors,
SuperNodes, Ray) and follow one run; both use these pieces, so they stop, report and clean up alike:

* :class:`ChildProcesses` records every process started while it is open and stops them all when
  it closes, however the command ends;
* :func:`interruptible` turns SIGINT and SIGTERM into :class:`Interrupted`, so cleanup runs;
* :func:`flwr_answer` reads ``flwr ... --format json``: ``flwr`` exits 0 when it refuses;
* :func:`run_to_end` submits the app, follows its log and ``metrics.json`` with a
  :class:`RunFollower`, and refuses a run that did not end ``finished:completed`` with a result.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TextIO

import psutil
from tqdm.auto import tqdm

from lumosrec.core.errors import LumosError
from lumosrec.core.results import read_result

log = logging.getLogger(__name__)

#: Linux prctl options: orphaned descendants are re-parented to this process instead of init
PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37
#: seconds a stopped process gets to exit after SIGTERM before SIGKILL (Ray's agents ignore SIGTERM)
GRACE_SECONDS = 3.0


class RunError(LumosError):
    """A Flower command or run failed: ``flwr`` refused, the run did not complete, or its processes died."""


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM stopped the command; it exits with status 128 + ``signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Within, SIGINT and SIGTERM (sent by ``kill``, ``timeout`` and job schedulers) raise
    :class:`Interrupted` in the main thread, so every ``finally`` and ``with`` cleans up."""
    previous = {signum: signal.signal(signum, _interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """A second Ctrl-C must not cut a cleanup short and leave processes behind (only the main
    thread may change handlers; cleanup elsewhere runs unshielded)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _set_subreaper(on: bool) -> bool | None:
    """Make this process the reaper of its orphaned descendants (Linux); the previous setting, or
    None where the system has no such thing."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    previous = ctypes.c_int()
    if libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(previous), 0, 0, 0) != 0:
        return None
    libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)
    return bool(previous.value)


def descendants(roots: Iterable[int], skip: Iterable[psutil.Process] = ()) -> set[psutil.Process]:
    """Every living descendant of the processes ``roots`` (pids), not descending into ``skip``."""
    children: dict[int, list[psutil.Process]] = defaultdict(list)
    for process in psutil.process_iter(["ppid"]):
        if process.info["ppid"] is not None:
            children[process.info["ppid"]].append(process)
    skipped, found, stack = set(skip), set(), list(roots)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in skipped and child not in found:
                found.add(child)
                stack.append(child.pid)
    return found


def _signal_all(processes: Iterable[psutil.Process], signum: int) -> None:
    """Send ``signum`` to each process and to its process group (never to our own group): the group
    also reaches a child started after the processes were listed."""
    groups = set()
    for process in processes:
        with contextlib.suppress(psutil.Error, OSError):
            groups.add(os.getpgid(process.pid))
            process.send_signal(signum)
    for group in groups - {os.getpgrp()}:
        with contextlib.suppress(OSError):
            os.killpg(group, signum)


def terminate(processes: Iterable[psutil.Process], grace: float = GRACE_SECONDS) -> None:
    """SIGTERM, then SIGKILL for whatever is still running after ``grace`` seconds; waits for them
    (reaping our own children) up to a few seconds more."""
    alive = [process for process in processes if process.is_running()]
    if grace > 0:
        _signal_all(alive, signal.SIGTERM)
        _, alive = psutil.wait_procs(alive, timeout=grace)
    _signal_all(alive, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=5.0)


class ChildProcesses:
    """Every process started while it is open, stopped when it closes: the processes of a command.

    Neither a process group nor an environment marker finds them all: Flower's local SuperLink
    detaches (a new session whose parent exits), Ray renames its processes and overwrites their
    environment. So while open, this process is the reaper of its orphans (Linux), and a thread
    records each new descendant (and each descendant of a recorded process, for orphans on other
    systems) twice a second. Closing sends SIGTERM to all of them and their process groups, then
    SIGKILL to what is left after :data:`GRACE_SECONDS`. Processes that were already running when it
    opened, and their descendants, are left alone.
    """

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.known: set[psutil.Process] = set()
        self._done = threading.Event()

    def __enter__(self) -> ChildProcesses:
        self._me = psutil.Process()
        self._before = self._me.children(recursive=True)
        self._reaper = _set_subreaper(True)
        self._watcher = threading.Thread(target=self._watch, name="lumos-child-processes", daemon=True)
        self._watcher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _watch(self) -> None:
        while not self._done.wait(self.interval):
            self.scan()

    def scan(self) -> None:
        """Record the processes started since opening that are running now (and forget those that
        ended: a deployment starts a ClientApp process per message)."""
        self.known = {process for process in self.known if process.is_running()}
        self.known |= descendants([self._me.pid, *(process.pid for process in self.known)], skip=self._before)

    def stop(self) -> None:
        """Stop every recorded process; a second Ctrl-C meanwhile is ignored."""
        with _signals_ignored():
            self._done.set()
            self._watcher.join()
            self.scan()
            terminate(self.known)
            self.scan()  # anything started while the others were stopping
            terminate(self.known, grace=0)
            if self._reaper is not None:
                _set_subreaper(self._reaper)


def flwr_answer(arguments: list[str], env: Mapping[str, str], timeout: float = 120.0, check: bool = True) -> dict:
    """``flwr ARGUMENTS --format json``'s answer. ``flwr`` exits 0 when it refuses (an unknown
    run-config key, no SuperLink), so its ``success`` decides: with ``check``, a refusal raises
    :class:`RunError` with Flower's own reason. The command gets its own session, so that Ctrl-C
    in a terminal reaches only Lumos, which stops it."""
    command = f"flwr {arguments[0]}"
    try:
        done = subprocess.run(
            ["flwr", *arguments, "--format", "json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired:
        raise RunError(f"`{command}` did not answer within {timeout:.0f} s") from None
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError:
        answer = {"success": False, "error-message": (done.stderr or done.stdout).strip()[-500:]}
    if check and not answer.get("success"):
        raise RunError(f"`{command}` failed: {flower_refusal(answer)}")
    return answer


def flower_refusal(answer: Mapping) -> str:
    """The last line of a failed ``flwr`` answer: Flower's own error, without its banner."""
    lines = str(answer.get("error-message", answer)).strip().splitlines()
    return lines[-1].strip() if lines else "no answer"


#: what a run's log holds that nobody reads: httpx's line per request of the ServerApp to the
#: SuperLink, above all the push of each of its own log records (97 % of the lines)
REQUEST_LINE = re.compile(r"^INFO httpx: HTTP Request: ")
ANSI_CODE = re.compile(r"\x1b\[[0-9;]*m")
#: the first line of a log record: its level, then Flower's handler's " :" or logging's " logger:"
RECORD_START = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*([\w.]*)\s*:")
#: the last line of a traceback: why a run failed
EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception|Exit)): (.+)$")
#: warnings of the ServerApp (lost or rejected replies, skipped rounds) the console shows before
#: leaving the rest to the log: a broken runtime can fail every node of every round
CONSOLE_WARNINGS = 20


class LogFilter:
    """Flower's log of a run as a person reads it: no request lines, and each record once.

    In the ServerApp both Flower's own handler (``INFO :      message``) and the root handler
    (``INFO flwr: message``) print every record of the ``flwr`` logger, tracebacks included; the
    second copy is dropped, with those of its continuation lines the first copy had."""

    def __init__(self) -> None:
        self.block: list[str] = []  # the continuation lines of the last record Flower printed itself
        self.copying = False  # inside the root handler's copy of a `flwr` record

    def keep(self, line: str) -> bool:
        if REQUEST_LINE.match(line):
            return False
        record = RECORD_START.match(line)
        if record:
            self.copying = record.group(2) == "flwr"
            if not record.group(2):
                self.block = []
            return not self.copying
        if self.copying and line in self.block:
            return False
        self.block.append(line)
        return True


def plain(line: str) -> str:
    """A log line without colour codes or trailing whitespace."""
    return ANSI_CODE.sub("", line).rstrip()


class RunFollower:
    """Follows one run to its end: its log (``flwr log --stream``), filtered by :class:`LogFilter`
    unless debug logging is on, and its rounds as the ServerApp writes them to ``metrics.json``.

    The console gets a progress bar (rounds done, seconds per round, failures) on a terminal and
    one line per round otherwise; a round with failures, a skipped model or users left out of its
    evaluation always gets its line, as do the ServerApp's first :data:`CONSOLE_WARNINGS` warnings.
    ``progress=False`` keeps only those. :attr:`reason` is the last exception the log showed: why a
    failed run failed.
    """

    def __init__(self, out_dir: Path, rounds: int, total_users: int, resumed: int = 0, progress: bool = True) -> None:
        self.out_dir, self.rounds, self.total_users, self.resumed = out_dir, rounds, total_users, resumed
        self.progress = progress
        self.reason: str | None = None
        self.failures = 0
        self.warnings = 0
        self.log_hint = "run with lumos -v"
        self._seen_round = resumed
        self._metrics_stamp: int | None = None

    def follow(
        self,
        command: list[str],
        env: Mapping[str, str],
        timeout: float,
        log_path: Path | None = None,
        alive: Callable[[], None] | None = None,
    ) -> None:
        """Run ``command`` (``flwr log ... --stream``, which returns when the run ends) and follow
        the run; ``alive`` is called every second and raises when a process the run needs died."""
        verbose = log.isEnabledFor(logging.DEBUG)
        if log_path is not None:
            self.log_hint = str(log_path)
        self.bar = tqdm(
            total=self.rounds,
            initial=self.resumed,
            desc="rounds",
            unit="round",
            disable=not (self.progress and sys.stderr.isatty()),
        )
        if self.resumed:
            self._say(f"resumed after round {self.resumed}")
        self._metrics_stamp = self._stamp()  # a metrics.json already there is a former run's until rewritten
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        try:
            with contextlib.ExitStack() as stack:
                log_file = stack.enter_context(open(log_path, "w", buffering=1)) if log_path else None
                selector = stack.enter_context(selectors.DefaultSelector())
                selector.register(process.stdout, selectors.EVENT_READ)
                filtered, pending, streaming = LogFilter(), b"", True
                while streaming:
                    if selector.select(timeout=1.0):
                        chunk = os.read(process.stdout.fileno(), 65536)
                        streaming = bool(chunk)
                        # whole lines now; the rest waits for its end, or for the end of the stream
                        lines = (pending + chunk).split(b"\n")
                        pending = lines.pop() if streaming else b""
                        for line in lines:
                            self._line(plain(line.decode(errors="replace")), filtered, verbose, log_file)
                    self._poll_metrics()
                    if alive is not None:
                        alive()
                    if time.monotonic() > deadline:
                        raise RunError(f"the run exceeded {timeout:.0f} s (raise --timeout)")
            self._poll_metrics()
        finally:
            process.kill()
            process.wait()
            self.bar.close()

    def _line(self, line: str, filtered: LogFilter, verbose: bool, log_file: TextIO | None) -> None:
        if not line or not (verbose or filtered.keep(line)):
            return
        if log_file is not None:
            log_file.write(line + "\n")
        log.debug(line)
        failure = EXCEPTION_LINE.match(line)
        if failure:
            self.reason = f"{failure.group(1)}: {failure.group(2)}"
        if verbose or not line.startswith(("WARNING lumos", "ERROR lumos")):
            return
        self.warnings += 1
        if self.warnings <= CONSOLE_WARNINGS:
            self._say(line)
        elif self.warnings == CONSOLE_WARNINGS + 1:
            self._say(f"(more warnings in the run's log only: {self.log_hint})")

    def _say(self, line: str) -> None:
        self.bar.write(line, file=sys.stderr)

    def _stamp(self) -> int | None:
        with contextlib.suppress(OSError):
            return (self.out_dir / "metrics.json").stat().st_mtime_ns
        return None

    def _poll_metrics(self) -> None:
        stamp = self._stamp()
        if stamp is None or stamp == self._metrics_stamp:
            return
        try:
            rows = json.loads((self.out_dir / "metrics.json").read_text())
        except (OSError, json.JSONDecodeError):  # written atomically, but removed by someone
            return
        self._metrics_stamp = stamp
        self.failures = sum(round_failures(row) for row in rows)
        for row in rows:
            if row.get("round", 0) > self._seen_round:
                self._round(row)

    def _round(self, row: Mapping) -> None:
        self._seen_round = row["round"]
        seconds = float(row.get("round_seconds", 0.0))
        self.bar.set_postfix_str(f"last round {seconds:.1f} s, {self.failures} failures", refresh=False)
        self.bar.update(row["round"] - self.bar.n)
        missing = self.total_users - int(row["eval_users"]) if "eval_users" in row else 0
        if (self.progress and self.bar.disable) or round_failures(row) or row.get("skipped") or missing > 0:
            self._say(describe_round(row, self.rounds, self.total_users))


def round_failures(row: Mapping) -> int:
    """A round's lost, failed or rejected replies, training and evaluation."""
    return int(row.get("train_failures", 0)) + int(row.get("eval_failures", 0))


def describe_round(row: Mapping, rounds: int, total_users: int) -> str:
    """One line for one row of ``metrics.json``: time, failures, evaluation, a skipped model."""
    seconds = float(row.get("round_seconds", 0.0))
    text = f"round {row['round']}/{rounds}: {seconds:.1f} s, {round_failures(row)} failures"
    if "eval_users" in row:
        text += f", {row['eval_users']} of {total_users} users evaluated"
        hit_rate = row.get("test", {}).get("unmasked", {}).get("HR@20")
        if hit_rate is not None:
            text += f", test HR@20 {hit_rate:.4f}"
    elif "eval_failures" in row:
        text += ", no valid evaluation"
    if row.get("skipped"):
        text += f"; model unchanged: {row['skipped']}"
    return text


def run_to_end(
    run_arguments: list[str],
    connection: list[str],
    env: Mapping[str, str],
    follower: RunFollower,
    timeout: float,
    log_path: Path | None = None,
    alive: Callable[[], None] | None = None,
) -> dict:
    """Submit the app (``flwr run RUN_ARGUMENTS``) through ``connection`` (``[]``: the default
    one), follow it to its end and return its ``result.json``. ``flwr run`` exits 0 even when the
    run failed, so the run's status and its result are checked; a failure raises :class:`RunError`
    with the reason the run's log gives."""
    run_id = str(flwr_answer(["run", *run_arguments], env, timeout=300)["run-id"])
    follower.follow(["flwr", "log", run_id, *connection, "--stream"], env, timeout, log_path, alive)
    listed = flwr_answer(["list", *connection, "--run-id", run_id], env)
    status = listed["runs"][0]["status"] if listed.get("runs") else "unknown"
    where = f"; log in {log_path}" if log_path else ""
    if status != "finished:completed":
        raise RunError(f"run {run_id} ended with status {status}: {follower.reason or 'see the log (-v)'}{where}")
    result_path = follower.out_dir / "result.json"
    if not result_path.is_file():
        raise RunError(f"run {run_id} completed but wrote no {result_path}{where}")
    return read_result(result_path)


def run_summary(result: Mapping, out_dir: Path, total_users: int) -> str:
    """The lines after a federated run's table: failures, users its last evaluation missed, where
    the results are."""
    lines = [f"client failures: {result.get('failures', 0)} (replies lost, failed or rejected)"]
    history = json.loads((out_dir / "metrics.json").read_text())
    evaluated = [row for row in history if "eval_users" in row]
    if evaluated and evaluated[-1]["eval_users"] < total_users:
        last = evaluated[-1]
        lines.append(
            f"users not evaluated: {total_users - last['eval_users']} of {total_users} (round {last['round']})"
        )
    lines.append(f"results: {out_dir / 'result.json'}")
    return "\n".join(lines)
