"""Running one target: a shell command or a Python worker, output captured to a log, timed.

Each step runs in the pipeline's directory, in a process group of its own, so
that an interrupt reaches everything it started (a training script's data
loader workers included). Its output goes to `.mlbuild/logs/<target>.log` and,
as it arrives, to a callback that shows it to the user.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlbuild.config import Target, render_value
from mlbuild.fingerprint import expand_port

OutputFn = Callable[[bytes], None]
TERM_GRACE_SECONDS = 5.0
_TAIL_LINES = 15


@dataclass(frozen=True)
class ExecResult:
    """How a step ended: exit status (negative: killed by that signal) and wall time."""

    returncode: int
    duration: float
    log_path: Path

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def step_environment(target: Target) -> dict[str, str]:
    """The step's environment: the user's, plus MLBUILD_TARGET and MLBUILD_PARAM_<NAME>."""
    env = dict(os.environ)
    env["MLBUILD_TARGET"] = target.name
    for name, value in target.params.items():
        env["MLBUILD_PARAM_" + re.sub(r"\W", "_", name).upper()] = render_value(value)
    return env


def step_argv(target: Target, root: Path) -> list[str]:
    """The process a target runs: `/bin/sh -c COMMAND` or the Python worker."""
    if target.command is not None:
        return ["/bin/sh", "-c", target.command]
    return [sys.executable, "-m", "mlbuild.worker", worker_call(target, root)]


def worker_call(target: Target, root: Path) -> str:
    """The JSON the worker reads: function, project root, paths and params by name."""
    paths: dict[str, str | list[str]] = {}
    for kind, ports in (("inputs", target.inputs), ("outputs", target.outputs)):
        if ports and ports[0].name is None:
            paths[kind] = [p for port in ports for p in expand_port(port, str(root))]
            continue
        for port in ports:
            assert port.name is not None
            paths[port.name] = expand_port(port, str(root)) if port.is_glob else port.path
    call = {"ref": target.python, "root": str(root), "paths": paths, "params": target.params}
    return json.dumps(call, default=str)


class LocalExecutor:
    """Runs steps as child processes of this machine."""

    def __init__(self, root: Path, extra_env: dict[str, str] | None = None) -> None:
        self.root = root
        self.extra_env = extra_env or {}

    def run(self, target: Target, log_path: Path, on_output: OutputFn) -> ExecResult:
        """Run the step to completion; on KeyboardInterrupt its process group is stopped."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = step_environment(target)
        env.update(self.extra_env)
        start = time.perf_counter()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                step_argv(target, self.root),
                cwd=self.root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            assert proc.stdout is not None
            try:
                fd = proc.stdout.fileno()
                while chunk := os.read(fd, 65536):
                    log.write(chunk)
                    on_output(chunk)
                returncode = proc.wait()
            except BaseException:
                stop_process_group(proc)
                raise
            finally:
                proc.stdout.close()
        return ExecResult(returncode, time.perf_counter() - start, log_path)


def stop_process_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the step's whole group, then SIGKILL what is left after a grace period."""
    for sig, wait in ((signal.SIGTERM, TERM_GRACE_SECONDS), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            # The leader is gone; make sure its children are too.
            os.killpg(proc.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


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
