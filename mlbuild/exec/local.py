"""Running steps: shell commands or Python workers, many at once, output to logs, timed.

Each step runs in the pipeline's directory in a process group (a session) of
its own, so that an interrupt reaches everything it started (a training
script's data loader workers included). One thread multiplexes the output
pipes of all running steps with `selectors`, as Ninja does with ppoll: no
threads, no locks, and Ctrl-C lands in the main thread.

A step ends when its main process exits, not when its output pipe closes
(a `sleep 60 &` or a daemon keeps the pipe open): the selector also watches a
pidfd of each main process (Linux 5.3+; elsewhere the processes are polled
every POLL_SECONDS). Its output is then read for up to DRAIN_SECONDS more,
until the pipe closes, and whatever it left running is stopped: SIGTERM,
then SIGKILL after LEFTOVER_GRACE_SECONDS, to its process group and to the
processes that left the group but carry the step's token (reaper.py). Only
then is the step reported done, so nothing it started can write to its
outputs after they are recorded.

While a step runs, a marker in `.mlbuild/running/` holds its process group,
token and target, so that if mlbuild itself is killed (-9) the next run can
stop leftover steps before starting them again (`reap_orphans`). Markers are
files kept open and reused from one step to the next (`_Markers`): emptied
when a step ends, removed when the build ends. Creating and unlinking a file
per step cost more on ext4 than the rest of a short step's bookkeeping.

A step's output goes to `.mlbuild/logs/<target>.log`, made at its first
byte: the last run's log is removed when the step starts, and a step that
prints nothing leaves none. Creating a file costs a short step as much as
its own work on ext4 (inode allocation), and most steps print nothing.

A shell command with no shell syntax (no quote, expansion, redirection,
operator, glob, assignment or comment; its first word not a shell builtin or
keyword) runs as its words, without `/bin/sh`, as make runs such a recipe:
dash would fork it as a second process, which cost about as much again as the
command itself for a short step. Should that exec fail (not found, not
executable, a script without `#!`), the step is started through the shell
after all, so it reports what it always did (`sh: 1: foo: not found`).

A Python step may start in a worker that is already running: a warm one of
this build or watch session (`warm_pool`, exec/warm.py) or one kept by the
workspace's keep-warm process (`adopt`, exec/keepwarm.py). From its call on
it is a step like any other: same marker, token, process group, pipe and end.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import itertools
import os
import selectors
import signal
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, NamedTuple, Protocol

from mlbuild.exec.base import (
    TERM_GRACE_SECONDS,
    Done,
    ExecResult,
    Output,
    Step,
    raised_message,
    step_argv,
    step_environment,
    timing_path,
)
from mlbuild.exec.reaper import (
    LEFTOVER_GRACE_SECONDS,
    POLL_SECONDS,
    carries,
    find_leftovers,
    kill_leftovers,
    kill_started,
    new_token,
    pid_mark,
    signal_leftovers,
)
from mlbuild.exec.worker import EXIT_RAISED
from mlbuild.pipeline.schema import ActionKind
from mlbuild.workspace import running_dir

if TYPE_CHECKING:
    import subprocess

    from mlbuild.exec.warm import WarmPool

DRAIN_SECONDS = 0.2  # output read after a step's main process exited
# A command holding any of these needs the shell (quoting, expansion, redirection,
# operators, globs, comments, assignments, line breaks); tabs too, to split on spaces.
_SHELL_CHARS = frozenset("#;&|<>()$`\\\"'*?[]{}~!^=%\n\r\t")
# First words the shell gives its own meaning (builtins and keywords of dash, POSIX, bash).
_SHELL_WORDS = frozenset(
    [
        ".",
        ":",
        "[",
        "alias",
        "bg",
        "break",
        "builtin",
        "case",
        "cd",
        "chdir",
        "command",
        "continue",
        "declare",
        "do",
        "done",
        "echo",
        "elif",
        "else",
        "enable",
        "esac",
        "eval",
        "exec",
        "exit",
        "export",
        "false",
        "fc",
        "fg",
        "fi",
        "for",
        "function",
        "getopts",
        "hash",
        "if",
        "in",
        "jobs",
        "kill",
        "let",
        "local",
        "newgrp",
        "printf",
        "pwd",
        "read",
        "readonly",
        "return",
        "select",
        "set",
        "shift",
        "shopt",
        "source",
        "test",
        "then",
        "time",
        "times",
        "trap",
        "true",
        "type",
        "typeset",
        "ulimit",
        "umask",
        "unalias",
        "unset",
        "until",
        "wait",
        "while",
    ]
)
WARM_SUFFIX = ".warm"  # the marker of a warm worker (exec/warm.py), not of a step
# The warm workers of a watch session (exec/warm.session), kept from one build to the next.
SESSION_POOL: WarmPool | None = None


class StepProcess(Protocol):
    """What a step's main process must offer: a `subprocess.Popen`, or a kept warm worker
    of another process (exec/keepwarm.Adopted, watched through a pidfd)."""

    pid: int
    stdout: IO[bytes] | None

    def poll(self) -> int | None: ...
    def wait(self) -> int: ...


# Given a step, the environment and the worker call: a process already running the
# call and its token, or None (set by exec/keepwarm.attach for `[workers] keep_warm`).
Adopt = Callable[[Step, Mapping[str, str], str], "tuple[StepProcess, str] | None"]


class _Phase(enum.Enum):
    """Where a local step is in its life."""

    RUNNING = "running"  # its main process runs
    DRAINING = "draining"  # the main process exited; the rest of its output is read
    STOPPING = "stopping"  # what it left got SIGTERM; SIGKILL at the deadline


class _Running:
    """A started step's process and where it is in its end (a plain class: `dataclasses`
    costs a first run 5 ms of imports)."""

    __slots__ = (
        "deadline",
        "duration",
        "log",
        "log_error",
        "log_path",
        "marker",
        "name",
        "phase",
        "pidfd",
        "pipe_open",
        "proc",
        "python",
        "returncode",
        "start",
        "token",
    )

    def __init__(
        self,
        name: str,
        proc: StepProcess,
        log_path: Path,
        start: float,
        marker: _Marker,
        token: str,
        python: bool,
        pidfd: int | None,  # readable when the main process exits (None: polled)
    ) -> None:
        self.name, self.proc, self.log_path, self.start = name, proc, log_path, start
        self.marker, self.token, self.python, self.pidfd = marker, token, python, pidfd
        self.log: int | None = None  # the step's log, opened at its first output
        self.log_error = ""  # why the log could not be written (the step fails)
        self.pipe_open = True
        self.phase = _Phase.RUNNING
        self.returncode = 0
        self.duration = 0.0
        self.deadline = 0.0  # monotonic time when DRAINING or STOPPING ends


class _Marker(NamedTuple):
    """One marker file, open: `fd` is written in place (pwrite), never reopened."""

    fd: int
    path: Path

    def started(self, pgid: int) -> None:
        """The step runs as group `pgid`: the marker says so from now on."""
        _pwrite_all(self.fd, f"{pgid:0{_PGID_WIDTH}d}".encode())


class _Markers:
    """The marker files of this executor's steps, each reused by the next step to start.

    A marker is written whole before its step is spawned (the file is empty
    then), its group updated in place once the step runs (the number has a
    fixed width, so the rest stays as it is), and emptied when the step is
    over: an empty marker names no step (`reap_orphans` removes it). Removed
    at the end of the build (`close`); a killed mlbuild leaves empty ones,
    which the next run removes.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.free: list[_Marker] = []
        self.closed = False  # after `close`, a marker given back is removed at once

    def take(self, pgid: int, token: str, target: str) -> _Marker:
        """A marker holding `PGID TOKEN` then `target`: written before this returns."""
        data = _marker_text(pgid, token, target)
        while self.free:
            marker = self.free.pop()
            if os.fstat(marker.fd).st_nlink:  # not removed meanwhile (by hand)
                try:
                    _pwrite_all(marker.fd, data)
                except BaseException:
                    self._discard(marker)
                    raise
                return marker
            self._discard(marker)
        while True:  # a new name: never another executor's marker (one per process counts)
            path = self.folder / f"{_MARKER_PREFIX}{os.getpid()}-{next(_MARKER_NUMBERS)}"
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                break
            except FileExistsError:
                continue
        marker = _Marker(fd, path)
        try:
            _pwrite_all(fd, data)
        except BaseException:
            self._discard(marker)
            raise
        return marker

    def give_back(self, marker: _Marker) -> None:
        """The marker's step is over (all its processes gone): empty it for the next one."""
        if self.closed:
            self._discard(marker)
            return
        try:
            os.ftruncate(marker.fd, 0)
        except OSError:
            self._discard(marker)
            return
        self.free.append(marker)

    def close(self) -> None:
        """Remove the markers kept for reuse (the build is over; a step stopped after this
        has its marker removed when it is given back)."""
        self.closed = True
        for marker in self.free:
            self._discard(marker)
        self.free.clear()

    def _discard(self, marker: _Marker) -> None:
        with contextlib.suppress(OSError):
            os.close(marker.fd)
        marker.path.unlink(missing_ok=True)


class LocalExecutor:
    """Runs steps as child processes of this machine and reports their output and exit."""

    def __init__(self, root: Path, pool: WarmPool | None = None) -> None:
        self.root = root
        # Warm workers (exec/warm.py): a watch session's pool outlives this executor,
        # else the executor's own, made when the runner first names steps to warm.
        session = SESSION_POOL if SESSION_POOL is not None and SESSION_POOL.root == root else None
        self.warm_pool = pool if pool is not None else session
        self.owns_pool = self.warm_pool is None
        self.adopt: Adopt | None = None  # a kept worker of the keep-warm process
        self.kept: frozenset[str] = frozenset()  # targets the keep-warm process has one for
        self.started_python: list[Step] = []  # in start order: what keep-warm keeps after
        self.running_dir = running_dir(root)
        self.selector = selectors.DefaultSelector()
        self.steps: dict[str, _Running] = {}
        self.failed_to_start: list[Done] = []
        self.base_env = dict(os.environ)  # copied once: a build starts hundreds of steps
        self.made_dirs: set[Path] = set()
        self.markers = _Markers(self.running_dir)

    def _mkdir(self, path: Path) -> None:
        """Make one of mlbuild's own directories (logs, markers), once per build; one
        leading out of `.mlbuild` through a symlink is refused: logs are removed and
        made there, and nothing outside the project is touched."""
        if path not in self.made_dirs:
            path.mkdir(parents=True, exist_ok=True)
            real = os.path.realpath(path)
            expected = os.path.join(os.path.realpath(self.root), os.path.relpath(path, self.root))
            if real != expected:
                raise OSError(
                    f"'{os.path.relpath(path, self.root)}' leads to {real} through a symlink;"
                    " mlbuild keeps its own files inside the project (remove the link)"
                )
            self.made_dirs.add(path)

    def start(self, step: Step) -> None:
        """Spawn the step; its events come from `wait` (also when it cannot be started)."""
        target, log_path = step.target, step.log_path
        try:
            self._spawn(step)
        except OSError as exc:  # a log or marker that cannot be written, no /bin/sh, ...
            message = f"could not be started: {exc}"
            self.failed_to_start.append(Done(target.name, ExecResult(-1, 0.0, log_path, message)))

    def _spawn(self, step: Step) -> None:
        target, log_path = step.target, step.log_path
        self._mkdir(log_path.parent)
        self._mkdir(self.running_dir)
        if target.kind is ActionKind.PYTHON:
            timing_path(log_path).unlink(missing_ok=True)
        log_path.unlink(missing_ok=True)  # the last run's: this step's is made if it prints
        token = new_token()
        mark = pid_mark()
        proc: StepProcess | None = None
        pidfd: int | None = None
        start = time.perf_counter()  # before the spawn: a step's time includes starting it
        # Written before the spawn, with the pid mark in place of the group: killed between
        # the fork and the marker's update below, mlbuild still leaves a way to the step's
        # processes.
        marker = self.markers.take(-mark, token, target.name)
        try:
            taken = self._take_warm(step)
            if taken is not None:
                proc, token = taken
            else:
                argv = step_argv(target, self.root, timing_path(log_path))
                env = step_environment(target, self.base_env, token)
                words = direct_words(argv) if target.kind is ActionKind.SHELL else None
                try:
                    proc = _start(words or argv, self.root, env)
                except OSError:
                    if words is None:
                        raise
                    proc = _start(argv, self.root, env)  # the shell says what is wrong
            assert proc.stdout is not None
            marker.started(proc.pid)
            pidfd = _pidfd(proc.pid)
            os.set_blocking(proc.stdout.fileno(), False)
            self.selector.register(proc.stdout, selectors.EVENT_READ, (target.name, _PIPE))
            if pidfd is not None:
                self.selector.register(pidfd, selectors.EVENT_READ, (target.name, _EXIT))
            python = target.kind is ActionKind.PYTHON
            running = _Running(target.name, proc, log_path, start, marker, token, python, pidfd)
            self.steps[target.name] = running  # from here on, stop_all stops it
        except BaseException:
            # Not tracked (a marker that cannot be written, or Ctrl-C landing between
            # the fork and here, while the step already runs): stop it by its token.
            self._abandon(proc, pidfd, marker, mark, token)
            raise

    def _take_warm(self, step: Step) -> tuple[StepProcess, str] | None:
        """A warm worker given the step's call (exec/warm.py, keepwarm.py), or None: spawn one."""
        if step.target.kind is not ActionKind.PYTHON:
            return None
        self.started_python.append(step)
        here = self.warm_pool is not None and step.target.name in self.warm_pool.workers
        if not here and self.adopt is None:
            return None
        from mlbuild.exec.base import worker_call

        call = worker_call(step.target, self.root, timing_path(step.log_path))
        if self.warm_pool is not None and here:
            given = self.warm_pool.give(step, self.base_env, call)
            if given is not None:
                return given
        return self.adopt(step, self.base_env, call) if self.adopt is not None else None

    def close_warm(self) -> None:
        """The build is over: kill the warm workers no step took (a watch session keeps its own),
        and remove the markers kept for reuse."""
        self.markers.close()
        if self.warm_pool is not None and self.owns_pool:
            self.warm_pool.close()

    def close(self) -> None:
        """The build is over: its selector (an epoll descriptor) goes. `watch`, a sweep's
        points and the tests build again and again in one process; one leaked per build
        ran a test session out of the descriptors `select` takes."""
        self.selector.close()

    def _abandon(
        self,
        proc: StepProcess | None,
        pidfd: int | None,
        marker: _Marker,
        mark: int,
        token: str,
    ) -> None:
        """Undo a start that failed halfway: kill what started, forget what was registered."""
        kill_started(mark, token)
        for fileobj in (proc.stdout if proc is not None else None, pidfd):
            if fileobj is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(fileobj)
        if pidfd is not None:
            os.close(pidfd)
        if proc is not None:
            if proc.stdout is not None:
                proc.stdout.close()
            kill_leftovers(proc.pid, token)
            proc.wait()
        self.markers.give_back(marker)

    @property
    def running(self) -> list[str]:
        return [*self.steps, *(done.target for done in self.failed_to_start)]

    def wait(self, timeout: float | None = None) -> Iterator[Output | Done]:
        """Events of running steps: output as it arrives, then each step's end.

        A step ends when its main process exits: its output is read for up to
        DRAIN_SECONDS more (until the pipe closes), then what it left running
        is stopped (reaper.py) before its Done, so that nothing writes to its
        outputs after it is recorded.
        """
        while self.failed_to_start:
            yield self.failed_to_start.pop(0)
        if not self.steps:
            return
        for key, _ in self.selector.select(self._timeout(timeout)):
            name, kind = key.data
            step = self.steps.get(name)
            if step is None:
                continue
            if kind == _EXIT:
                if step.phase is _Phase.RUNNING:  # else taken at its pipe's end (_read)
                    self._exited(step)
                continue
            chunk = self._read(step)
            if chunk:
                yield Output(name, chunk)
        for step in list(self.steps.values()):
            if step.phase is _Phase.RUNNING and step.pidfd is None and step.proc.poll() is not None:
                self._exited(step)
        yield from self._advance()

    def _timeout(self, timeout: float | None) -> float | None:
        """How long the selector may sleep: until `timeout` or the next step's deadline."""
        now = time.monotonic()
        wake = timeout
        for step in self.steps.values():
            if step.phase is _Phase.RUNNING:
                until = None if step.pidfd is not None else POLL_SECONDS
            elif step.phase is _Phase.DRAINING:
                until = max(0.0, step.deadline - now)
            else:
                until = max(0.0, min(step.deadline - now, POLL_SECONDS))
            if until is not None:
                wake = until if wake is None else min(wake, until)
        return wake

    def _read(self, step: _Running) -> bytes:
        """One read of a step's output (logged); b"" when there was none or the pipe closed."""
        stream = step.proc.stdout
        assert stream is not None
        try:
            chunk = os.read(stream.fileno(), 65536)
        except BlockingIOError:
            return b""
        if chunk:
            self._log(step, chunk)
            return chunk
        self._close_pipe(step)
        if step.phase is _Phase.RUNNING and step.proc.poll() is not None:
            # The pipe closes as the main process exits: taken now rather than at its
            # pidfd's event, the next time round the build's loop.
            self._exited(step)
        if step.phase is _Phase.DRAINING:
            step.deadline = 0.0  # all read: on to its leftovers
        return b""

    def _log(self, step: _Running, chunk: bytes) -> None:
        """Append to the step's log, made at its first output: a silent step leaves none.

        A log that cannot be written (a full disk) fails the step, which is still read
        to its end: its output is shown, and nothing it made is recorded.
        """
        if step.log_error:
            return
        try:
            if step.log is None:
                step.log = os.open(step.log_path, _LOG_FLAGS, 0o666)
            _write_all(step.log, chunk)
        except OSError as exc:
            step.log_error = f"its output could not be written to its log: {exc.strerror}"

    def _close_pipe(self, step: _Running) -> None:
        if step.pipe_open:
            # Ctrl-C between the two lines below leaves it unregistered but still open:
            # stop_all closes it again.
            with contextlib.suppress(KeyError):
                self.selector.unregister(step.proc.stdout)  # type: ignore[arg-type]
            step.pipe_open = False
        if step.proc.stdout is not None:
            step.proc.stdout.close()

    def _exited(self, step: _Running) -> None:
        """The main process exited: the step is over; its output is drained briefly."""
        step.returncode = step.proc.wait()
        step.duration = time.perf_counter() - step.start
        if step.pidfd is not None:
            self.selector.unregister(step.pidfd)
            os.close(step.pidfd)
            step.pidfd = None
        step.phase = _Phase.DRAINING
        step.deadline = time.monotonic() + DRAIN_SECONDS if step.pipe_open else 0.0

    def _advance(self) -> Iterator[Done]:
        """Steps past their main process: stop their leftovers, then report them done."""
        now = time.monotonic()
        for step in list(self.steps.values()):
            pgid = step.proc.pid
            if step.phase is _Phase.RUNNING:
                continue
            if step.phase is _Phase.DRAINING:
                if step.pipe_open and now < step.deadline:
                    continue
                self._close_pipe(step)  # output after the drain is not waited for
                left = find_leftovers(pgid, step.token)
                if left:
                    signal_leftovers(pgid, left, signal.SIGTERM)
                    step.phase = _Phase.STOPPING
                    step.deadline = now + LEFTOVER_GRACE_SECONDS
                    continue
            else:
                if now < step.deadline and find_leftovers(pgid, step.token):
                    continue
                kill_leftovers(pgid, step.token)
            yield Done(step.name, self._close(step))

    def _close(self, step: _Running) -> ExecResult:
        """Forget a step whose processes are all gone; its result."""
        del self.steps[step.name]
        if step.pidfd is not None:
            self.selector.unregister(step.pidfd)
            os.close(step.pidfd)
            step.pidfd = None
        self._close_pipe(step)
        if step.log is not None:
            os.close(step.log)
        self.markers.give_back(step.marker)
        message = step.log_error
        if not message and step.python and step.returncode == EXIT_RAISED:
            message = raised_message(timing_path(step.log_path))
        return ExecResult(step.returncode, step.duration, step.log_path, message)

    def stop_all(self, grace: float = TERM_GRACE_SECONDS) -> list[str]:
        """SIGTERM every running step and what it left, SIGKILL what is left after `grace` s.

        A KeyboardInterrupt during the grace period (a second Ctrl-C) kills at once.
        Returns the names of the steps stopped; none of them is recorded.
        """
        names = self.running
        self.failed_to_start.clear()
        if self.warm_pool is not None:
            self.warm_pool.close()
        steps = list(self.steps.values())
        for step in steps:
            pgid = step.proc.pid
            signal_leftovers(pgid, find_leftovers(pgid, step.token), signal.SIGTERM)
        deadline = time.monotonic() + grace
        try:
            while time.monotonic() < deadline:
                if all(
                    step.proc.poll() is not None and not find_leftovers(step.proc.pid, step.token)
                    for step in steps
                ):
                    break
                time.sleep(POLL_SECONDS)
        finally:
            for step in steps:
                pgid = step.proc.pid
                signal_leftovers(pgid, find_leftovers(pgid, step.token), signal.SIGKILL)
                kill_leftovers(pgid, step.token)
                if step.phase is _Phase.RUNNING:
                    step.returncode = step.proc.wait()
                self._close(step)
        return names


_PIPE = "pipe"
_EXIT = "exit"
# The last run's log was removed when the step started: whatever is found here now was
# planted since (a symlink, a hard link to a user's file, a FIFO that would block the
# open) and is neither followed, truncated nor opened.
_LOG_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_MARKER_PREFIX = ".step-"  # no target's short name starts with a dot
_MARKER_NUMBERS = itertools.count(1)  # marker names of this process, whichever executor
_PGID_WIDTH = 11  # "-" and ten digits: any pid (Linux: at most 2**22)


def direct_words(argv: list[str]) -> list[str] | None:
    """The words of `/bin/sh -c COMMAND` when COMMAND has no shell syntax, else None."""
    if len(argv) != 3 or argv[:2] != ["/bin/sh", "-c"]:
        return None
    command = argv[2]
    if not _SHELL_CHARS.isdisjoint(command):
        return None
    words = [word for word in command.split(" ") if word]  # the shell's split: spaces only
    if not words or words[0] in _SHELL_WORDS:
        return None
    return words


class _Spawned:
    """A step's main process started by `os.posix_spawn`: the part of a Popen the executor uses.

    Popen's own Python costs twice posix_spawn's in the parent (0.18 against 0.08 ms a
    step, measured): at -j2 on two cores every step's bookkeeping competes with steps.
    """

    __slots__ = ("pid", "returncode", "stdout")

    def __init__(self, pid: int, stdout: IO[bytes]) -> None:
        self.pid = pid
        self.stdout: IO[bytes] | None = stdout
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def _start(argv: list[str], root: Path, env: Mapping[str, str]) -> StepProcess:
    """Start a step's main process: stdin /dev/null, stdout and stderr one pipe, a session
    of its own, SIGPIPE and SIGXFSZ back to their defaults (Python ignores them).

    By posix_spawn when mlbuild runs in the step's directory (it has no `cwd`), else
    by Popen. The program is found on the step's PATH here, as execvp would (the first
    executable regular file), by stat rather than by failed execs in the child. The
    step gets only these three descriptors, as Popen's close_fds leaves it: mlbuild's
    own are close-on-exec (PEP 446), and any other (one mlbuild inherited, a
    library's) is closed in the child.
    """
    inherited = _inheritable_fds() if os.getcwd() == str(root) else None
    if inherited is None:
        return _popen(argv, root, env)
    program = argv[0] if "/" in argv[0] else _which(argv[0], env.get("PATH", os.defpath))
    if program is None:
        raise FileNotFoundError(errno.ENOENT, "not found on PATH", argv[0])
    read, write = os.pipe()
    try:
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            actions: list[tuple[int, ...]] = [(os.POSIX_SPAWN_CLOSE, fd) for fd in inherited]
            actions += [
                (os.POSIX_SPAWN_DUP2, null, 0),
                (os.POSIX_SPAWN_DUP2, write, 1),
                (os.POSIX_SPAWN_DUP2, write, 2),
            ]
            pid = os.posix_spawn(
                program,
                argv,
                env,
                file_actions=actions,
                setsid=True,
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
            )
        finally:
            os.close(null)
    except BaseException:
        os.close(read)
        raise
    finally:
        os.close(write)
    return _Spawned(pid, os.fdopen(read, "rb", buffering=0))


def _inheritable_fds() -> list[int] | None:
    """Open descriptors above 2 a child would keep (not close-on-exec); None without /proc."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return None
    kept: list[int] = []
    for name in names:
        fd = int(name)
        if fd > 2:
            with contextlib.suppress(OSError):  # the listing's own, closed by now
                if os.get_inheritable(fd):
                    kept.append(fd)
    return kept


def _which(name: str, path: str) -> str | None:
    """The first executable regular file `name` in the directories of `path`, as execvp takes.

    Not shutil.which: it takes any non-directory and stats each hit three times."""
    for folder in path.split(os.pathsep):
        candidate = os.path.join(folder or ".", name)
        try:
            mode = os.stat(candidate).st_mode
        except OSError:
            continue
        if stat.S_ISREG(mode) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _popen(argv: list[str], root: Path, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    import subprocess  # only away from the project's directory: a first run's imports count

    return subprocess.Popen(
        argv,
        cwd=root,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when process `pid` exits (Linux 5.3+), else None."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _marker_text(pgid: int, token: str, target: str) -> bytes:
    """A marker's bytes: `PGID TOKEN` then the target's name, for reap_orphans.

    Before the step is spawned, PGID is the negated pid mark (reaper.pid_mark): the step is
    then found as the processes made after it that carry TOKEN. PGID has a fixed width
    (zero-padded), so that `_Marker.started` rewrites it in place.
    """
    return f"{pgid:0{_PGID_WIDTH}d} {token}\n{target}\n".encode()


def _pwrite_all(fd: int, data: bytes, offset: int = 0) -> None:
    view = memoryview(data)
    while view:
        offset += (n := os.pwrite(fd, view, offset))
        view = view[n:]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def reap_orphans(root: Path) -> list[str]:
    """Kill the steps left running by an mlbuild that was killed; their target names.

    Called with the workspace lock held, so no live mlbuild owns these steps.
    A marker holds the step's process group and token (reaper.py): the group
    is killed only if a member still carries the token, so a reused process
    id is left alone, and processes that left the group are found by it too.
    """
    try:
        markers = list(running_dir(root).iterdir())
    except FileNotFoundError:
        return []
    killed: list[str] = []
    for marker in markers:
        try:
            head, _, name = marker.read_text().partition("\n")
            pgid_text, _, token = head.partition(" ")
            pgid = int(pgid_text)
        except (OSError, ValueError):
            marker.unlink(missing_ok=True)
            continue
        name, _, owner = name.partition("\n")
        if marker.name.endswith(WARM_SUFFIX):
            # A warm worker ran no step: killed without a word, unless the mlbuild that
            # keeps it warm (a watch session between two cycles) is alive.
            if not _alive(owner.strip()):
                if token and any(carries(p, token) for p in find_leftovers(pgid, token).members):
                    kill_leftovers(pgid, token)
                marker.unlink(missing_ok=True)
            continue
        if pgid < 0:  # killed while spawning the step: its processes carry the token
            if token and kill_started(-pgid, token):
                killed.append(name.strip() or marker.name)
            marker.unlink(missing_ok=True)
            continue
        left = find_leftovers(pgid, token)
        if token:
            ours = bool(left.escaped) or any(carries(pid, token) for pid in left.members)
        else:  # a marker of an older mlbuild: `PGID`, named after the target
            ours = any(_runs_target(pid, marker.name) for pid in left.members)
        if ours:
            kill_leftovers(pgid, token)
            killed.append(name.strip() or marker.name)
        marker.unlink(missing_ok=True)
    return killed


def _alive(pid_text: str) -> bool:
    """Whether process `pid_text` exists (a warm worker's owner; it exits with its owner anyway)."""
    try:
        os.kill(int(pid_text), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _runs_target(pid: int, name: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            return f"MLBUILD_TARGET={name}".encode() in handle.read().split(b"\0")
    except OSError:
        return False
