"""What every executor shares: the `Executor` contract, its context and events, a step's process.

`Step` goes in, `Output` and `Done` (with an `ExecResult`) come out; `ExecutorContext`
is all an executor is told about the build. The helpers below say what process a
target runs (`/bin/sh -c` or the Python worker), in what environment, and how its
log and timing file are read back, the same for the local and the Ray executor.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol

from mlbuild.exec.reaper import STEP_ID_VAR, new_token
from mlbuild.fingerprint import expand_port
from mlbuild.pipeline.interpolate import fill, parse_template, render_value
from mlbuild.pipeline.schema import ActionKind, ExecutorSettings, Target

if TYPE_CHECKING:
    from mlbuild.cache import Entry
    from mlbuild.fingerprint import Digest
    from mlbuild.remote import RemoteCache
    from mlbuild.staleness import Observation


TERM_GRACE_SECONDS = 5.0  # SIGTERM to SIGKILL when a build is interrupted
_TAIL_LINES = 15


class RemoteOutputs(NamedTuple):
    """Outputs a step wrote away from the workspace, whose bytes are in the remote cache's CAS.

    `entry` describes them as a cache entry (already checked: cache.check_entry)
    and `sizes` gives each blob's size. An executor never puts them in place
    itself: the runner does, through the same fetch and restore as a cache hit
    (runner.Build._bring_back), so restoring has one owner.
    """

    entry: Entry
    sizes: Mapping[str, int]


class ExecResult(NamedTuple):
    """How a step ended: exit status (negative: killed by that signal) and wall time."""

    returncode: int
    duration: float
    log_path: Path
    message: str = ""  # why it failed, when more is known than the exit status: what a
    # Python step raised, a lost Ray worker, a step that could not be started
    remote_outputs: RemoteOutputs | None = None  # outputs still to bring back (Ray, cas)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.message


class Output(NamedTuple):
    """Bytes a running step wrote (stdout and stderr together)."""

    target: str
    data: bytes


class Done(NamedTuple):
    """A step's process exited."""

    target: str
    result: ExecResult


class ExecutorContext(NamedTuple):
    """What an executor is given when the build creates it (registry.make_executor).

    This is all it sees of the build: it learns of a step only from the Step
    given to `start`, and reports back only through `wait`.
    """

    root: Path  # the project directory
    settings: ExecutorSettings  # `[executor]`, with `--address` applied
    # The build's remote cache (None: none configured), opened on the first call:
    # an executor that ships files through its CAS asks for it.
    remote: Callable[[], RemoteCache | None]
    digest: Callable[[str], Digest]  # a project file's digest, through the build's stat cache


class Step(NamedTuple):
    """One step to run, as the runner hands it to `Executor.start`."""

    target: Target
    log_path: Path  # where its output goes (the executor creates or truncates it)
    # The target as fingerprinted just before the step: the input digests its
    # manifest will record, so an executor that ships inputs ships exactly these.
    observation: Observation


class Executor(Protocol):
    """Runs steps somewhere and reports their output and end (the contract of every executor).

    Registered by kind in registry.py and created once per build, on the
    first stale target, from an ExecutorContext. The runner has already
    cleared the outputs and made their parent directories; it records,
    caches and restores, never the executor.

    - `start(step)` returns at once. A step that cannot be started is not an
      exception: it ends with a Done whose result says why.
    - `wait(timeout)` yields what happened since the last call: Output as it
      comes, and exactly one Done per started step, after its output. It
      blocks at most `timeout` seconds (None: no limit) and may yield nothing.
    - `running` names the steps started and not yet reported Done.
    - `stop_all(grace)` stops every running step (SIGTERM, SIGKILL after
      `grace` seconds) and returns their names; no Done follows for them.
    """

    def start(self, step: Step) -> None: ...
    def wait(self, timeout: float | None = None) -> Iterator[Output | Done]: ...
    @property
    def running(self) -> list[str]: ...
    def stop_all(self, grace: float = TERM_GRACE_SECONDS) -> list[str]: ...


def step_environment(
    target: Target, base: dict[str, str] | None = None, token: str = ""
) -> dict[str, str]:
    """The step's environment: the user's, MLBUILD_TARGET, MLBUILD_PARAM_<NAME>, its token.

    PATH starts with the directory of mlbuild's own interpreter (as tox and nox
    put the venv's bin first), so that `python` in a shell step is the one
    `python = "mod:fn"` steps get, even from `.venv/bin/mlbuild` never activated.
    PATH is not part of a target's key (only the declared `env` is): the same
    sources built from another checkout or venv still find their manifests and
    cache entries. What a step imports is keyed by its tracked packages.
    """
    env = dict(os.environ if base is None else base)
    env["PATH"] = interpreter_path(env.get("PATH"))
    env["MLBUILD_TARGET"] = target.name
    env[STEP_ID_VAR] = token or new_token()
    for name, value in target.params.items():
        env["MLBUILD_PARAM_" + re.sub(r"\W", "_", name).upper()] = render_value(value)
    return env


def interpreter_path(path: str | None) -> str:
    """`path` with the running interpreter's directory first (once, not again in a nested run)."""
    bin_dir = os.path.dirname(sys.executable)  # not resolved: a venv's python is a symlink
    if not bin_dir:
        return path if path is not None else os.defpath
    if path is None:
        path = os.defpath  # what /bin/sh searches when PATH is unset
    if path.split(os.pathsep, 1)[0] == bin_dir:
        return path
    return bin_dir + os.pathsep + path if path else bin_dir


def render_command(target: Target, root: Path) -> str:
    """The shell command a target's step runs, its glob inputs expanded now, in `root`."""
    assert target.cmd is not None
    where = str(root)
    return fill(
        parse_template(target.cmd),
        target.inputs,
        target.outputs,
        target.params,
        lambda port: expand_port(port, where),
    )


def step_argv(target: Target, root: Path, timing: Path) -> list[str]:
    """The process a target runs: `/bin/sh -c COMMAND` or the Python worker."""
    if target.kind is ActionKind.SHELL:
        return ["/bin/sh", "-c", render_command(target, root)]
    return [sys.executable, "-m", "mlbuild.exec.worker", worker_call(target, root, timing)]


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
            if port.name is not None:  # None: a metrics file added to named outputs
                paths[port.name] = expand_port(port, str(root)) if port.is_glob else port.path
    call = {
        "ref": target.python,
        "root": str(root),
        "paths": paths,
        "params": target.call_params(),
        "timing": str(timing),
    }
    return json.dumps(call, default=str)


def raised_message(timing: Path) -> str:
    """What a Python step raised, from the worker's timing file: `raised ValueError: ...`."""
    try:
        raised = json.loads(timing.read_text()).get("raised")
    except (OSError, ValueError, AttributeError):
        return ""
    return f"raised {raised}" if isinstance(raised, str) and raised else ""


def log_tail(log_path: Path, lines: int = _TAIL_LINES) -> list[str]:
    """The last lines of a step's log, for the failure message.

    Not a symlink's target nor a FIFO (whose open would wait for a writer): a step may
    plant either at its log's name before it prints (its log is then not made).
    """
    try:
        fd = os.open(log_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return []
        with open(fd, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 8192))
            data = handle.read()
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-lines:]


def finish(executor: Executor, interrupted: bool) -> None:
    """The build is over: the warm workers no step took are killed (a watch session keeps
    its own). Here rather than in exec/warm.py, whose imports a build without them skips."""
    close = getattr(executor, "close_warm", None)
    if close is not None:
        close()
    pool = getattr(executor, "warm_pool", None)
    if interrupted and pool is not None:
        pool.close()
