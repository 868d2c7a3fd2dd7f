"""Running steps: shell commands or Python workers, many at once, output to logs, timed.

Each step runs in the pipeline's directory in a process group (a session) of
its own, so that an interrupt reaches everything it started (a training
script's data loader workers included). One thread multiplexes the output
pipes of all running steps with `selectors`, as Ninja does with ppoll: no
threads, no locks, and Ctrl-C lands in the main thread.

While a step runs, `.mlbuild/running/<target>` names its process group, so
that if mlbuild itself is killed (-9) the next run can stop leftover steps
before starting them again (`reap_orphans`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from mlbuild.config import STATE_DIR, Target, render_value
from mlbuild.fingerprint import expand_port
from mlbuild.interpolate import render_command

TERM_GRACE_SECONDS = 5.0
_TAIL_LINES = 15


@dataclass(frozen=True)
class ExecResult:
    """How a step ended: exit status (negative: killed by that signal) and wall time."""

    returncode: int
    duration: float
    log_path: Path
    message: str = ""  # why the step failed when not by its own exit (a lost Ray worker)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.message


@dataclass(frozen=True)
class Output:
    """Bytes a running step wrote (stdout and stderr together)."""

    target: str
    data: bytes


@dataclass(frozen=True)
class Done:
    """A step's process exited."""

    target: str
    result: ExecResult


class Executor(Protocol):
    """Runs steps somewhere and reports their output and exit (LocalExecutor, RayExecutor)."""

    def start(self, target: Target, log_path: Path) -> None: ...
    def wait(self, timeout: float | None = None) -> Iterator[Output | Done]: ...
    @property
    def running(self) -> list[str]: ...
    def stop_all(self, grace: float = TERM_GRACE_SECONDS) -> list[str]: ...


@dataclass
class _Running:
    proc: subprocess.Popen[bytes]
    log: IO[bytes]
    log_path: Path
    start: float
    marker: Path
    pipe_open: bool = True


def step_environment(target: Target, base: dict[str, str] | None = None) -> dict[str, str]:
    """The step's environment: the user's, plus MLBUILD_TARGET and MLBUILD_PARAM_<NAME>."""
    env = dict(os.environ if base is None else base)
    env["MLBUILD_TARGET"] = target.name
    for name, value in target.params.items():
        env["MLBUILD_PARAM_" + re.sub(r"\W", "_", name).upper()] = render_value(value)
    return env


def step_argv(target: Target, root: Path, timing: Path) -> list[str]:
    """The process a target runs: `/bin/sh -c COMMAND` or the Python worker."""
    if target.command is not None:
        return ["/bin/sh", "-c", render_command(target, root)]
    return [sys.executable, "-m", "mlbuild.worker", worker_call(target, root, timing)]


def timing_path(log_path: Path) -> Path:
    """Where a Python step's worker writes how long the import and the call took."""
    return log_path.with_suffix(".timing.json")


def worker_call(target: Target, root: Path, timing: Path) -> str:
    """The JSON the worker reads: function, project root, paths and params by name."""
    paths: dict[str, str | list[str]] = {}
    for kind, ports in (("inputs", target.inputs), ("outputs", target.outputs)):
        if ports and ports[0].name is None:
            paths[kind] = [p for port in ports for p in expand_port(port, str(root))]
            continue
        for port in ports:
            assert port.name is not None
            paths[port.name] = expand_port(port, str(root)) if port.is_glob else port.path
    call = {
        "ref": target.python,
        "root": str(root),
        "paths": paths,
        "params": target.params,
        "timing": str(timing),
    }
    return json.dumps(call, default=str)


class LocalExecutor:
    """Runs steps as child processes of this machine and reports their output and exit."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.running_dir = root / STATE_DIR / "running"
        self.selector = selectors.DefaultSelector()
        self.steps: dict[str, _Running] = {}
        self.base_env = dict(os.environ)  # copied once: a build starts hundreds of steps
        self.made_dirs: set[Path] = set()

    def _mkdir(self, path: Path) -> None:
        if path not in self.made_dirs:
            path.mkdir(parents=True, exist_ok=True)
            self.made_dirs.add(path)

    def start(self, target: Target, log_path: Path) -> None:
        """Spawn the step; its events come from `wait`."""
        self._mkdir(log_path.parent)
        self._mkdir(self.running_dir)
        if target.python is not None:
            timing_path(log_path).unlink(missing_ok=True)
        log = open(log_path, "wb")  # noqa: SIM115 - closed in _reap
        try:
            proc = subprocess.Popen(
                step_argv(target, self.root, timing_path(log_path)),
                cwd=self.root,
                env=step_environment(target, self.base_env),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except BaseException:
            log.close()
            raise
        assert proc.stdout is not None
        marker = self.running_dir / target.name
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, f"{proc.pid}\n".encode())
        os.close(fd)
        self.steps[target.name] = _Running(proc, log, log_path, time.perf_counter(), marker)
        os.set_blocking(proc.stdout.fileno(), False)
        self.selector.register(proc.stdout, selectors.EVENT_READ, target.name)

    @property
    def running(self) -> list[str]:
        return list(self.steps)

    def wait(self, timeout: float | None = None) -> Iterator[Output | Done]:
        """Events of running steps: output as it arrives, then each step's end."""
        for key, _ in self.selector.select(timeout):
            name: str = key.data
            step = self.steps[name]
            stream = key.fileobj
            assert not isinstance(stream, int)
            try:
                chunk = os.read(stream.fileno(), 65536)
            except BlockingIOError:
                continue
            if chunk:
                step.log.write(chunk)
                yield Output(name, chunk)
                continue
            self.selector.unregister(stream)
            step.pipe_open = False
            # The pipe closed; the process exits now or soon (a step that closes
            # its output early is waited for here).
            yield Done(name, self._reap(name, step.proc.wait()))

    def _reap(self, name: str, returncode: int) -> ExecResult:
        step = self.steps.pop(name)
        step.log.close()
        if step.proc.stdout is not None:
            step.proc.stdout.close()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(step.proc.pid, signal.SIGKILL)  # leftover children of the step
        step.marker.unlink(missing_ok=True)
        return ExecResult(returncode, time.perf_counter() - step.start, step.log_path)

    def stop_all(self, grace: float = TERM_GRACE_SECONDS) -> list[str]:
        """SIGTERM every running step's group, SIGKILL what is left after `grace` seconds.

        A KeyboardInterrupt during the grace period (a second Ctrl-C) kills at once.
        Returns the names of the steps stopped; none of them is recorded.
        """
        names = list(self.steps)
        for step in self.steps.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(step.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        try:
            for step in self.steps.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    step.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        finally:
            for name in list(self.steps):
                step = self.steps[name]
                if step.pipe_open:
                    self.selector.unregister(step.proc.stdout)  # type: ignore[arg-type]
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(step.proc.pid, signal.SIGKILL)
                self._reap(name, step.proc.wait())
        return names


def _group_members(pgid: int) -> list[int]:
    """Pids of the live processes in process group `pgid` (from /proc; Linux)."""
    members: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != b"Z":
            members.append(int(entry.name))
    return members


def _runs_target(pid: int, name: str) -> bool:
    """Whether a process was started by mlbuild for target `name` (from its environment)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            return f"MLBUILD_TARGET={name}".encode() in handle.read().split(b"\0")
    except OSError:
        return False


def reap_orphans(root: Path) -> list[str]:
    """Kill the process groups of steps left running by an mlbuild that was killed.

    Called with the workspace lock held, so no live mlbuild owns these steps.
    A group is killed only if one of its processes still carries the step's
    `MLBUILD_TARGET` in its environment, so a reused process id is left alone.
    """
    running_dir = root / STATE_DIR / "running"
    try:
        markers = list(running_dir.iterdir())
    except FileNotFoundError:
        return []
    killed: list[str] = []
    for marker in markers:
        try:
            pgid = int(marker.read_text())
        except (OSError, ValueError):
            marker.unlink(missing_ok=True)
            continue
        if any(_runs_target(pid, marker.name) for pid in _group_members(pgid)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
                killed.append(marker.name)
        marker.unlink(missing_ok=True)
    return killed


def log_tail(log_path: Path, lines: int = _TAIL_LINES) -> list[str]:
    """The last lines of a step's log, for the failure message."""
    try:
        with open(log_path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 8192))
            data = handle.read()
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-lines:]
