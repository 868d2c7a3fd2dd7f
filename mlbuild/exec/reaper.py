"""The processes a step leaves behind: finding them, stopping them, and the guard of a Ray step.

A step ends when its main process ends (`/bin/sh -c` or the Python worker).
Whatever it started and left running is then stopped, so that nothing a step
started outlives it: a background `sleep &`, a data loader, a daemon.

What a step started is found two ways, both cheap enough to run after every
step:

- *Its process group.* Every step is the leader of a session and process
  group of its own; children stay in it unless they leave. `killpg` reaches
  them all.
- *Its token, for the ones that left* (`setsid`, a daemon's double fork).
  Every step gets `MLBUILD_STEP_ID=<random token>` in its environment, which
  its descendants inherit. Linux gives out process ids in increasing order
  (wrapping at `pid_max`), so a process the step started has an id between
  the step's own and the last one given out (`/proc/sys/kernel/ns_last_pid`):
  only that range of `/proc` is read, usually a handful of entries. A process
  carrying the token is the step's whatever its session, parent or group.
  The token, not the target name, is matched, so a same-named step of another
  checkout is never touched.

Not found: a process that left the group *and* dropped its environment
(`env -i setsid ...`), or one started through a service manager or a daemon
that existed before the step (`systemd-run`, `docker run -d`). A step that
needs a long-lived server must start it outside mlbuild (see the README).

Zombies (exited, not yet waited for by their parent) count as gone: they
cannot run or write. Elsewhere than Linux only the process group is reached.

Run as a script, this module is the guard of a step on a Ray worker (see
`guard`); it then imports only the standard library (not even typing), so it
costs about one `python -I -S` start per step (10-30 ms on the 2-core build machine).
"""

from __future__ import annotations

import os
import signal
import sys
import time

TYPE_CHECKING = False  # not typing's: the guard would pay ~15 ms to import it

if TYPE_CHECKING:
    from collections.abc import Callable

STEP_ID_VAR = "MLBUILD_STEP_ID"
LEFTOVER_GRACE_SECONDS = 1.0  # SIGTERM to SIGKILL, for what a finished step left running
POLL_SECONDS = 0.02  # how often a stop looks whether everything is gone
_PROBE_LIMIT = 64  # process ids probed one by one; more: /proc is listed
_HAVE_PROC = os.path.isdir("/proc/self")
_READ_SIZE = 16384


def new_token() -> str:
    return os.urandom(8).hex()


def _read(path: str) -> bytes:
    """A small file's bytes in three system calls (open, read, close) where `open()` makes
    eight (fstat twice, isatty, two seeks): /proc files are read several times per step."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, _READ_SIZE)
        if len(data) < _READ_SIZE:
            return data  # a /proc file's text is made whole at its first read
        chunks = [data]
        while chunk := os.read(fd, _READ_SIZE):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _last_pid() -> int | None:
    try:
        return int(_read("/proc/sys/kernel/ns_last_pid"))
    except (OSError, ValueError):
        return None


def _candidates(first: int) -> list[int]:
    """Ids of processes made since process `first` was (itself included), oldest first.

    A short range is probed id by id; a long one (a step that ran for hours on
    a busy machine) is read from the listing of /proc, which costs as much as
    probing ~50 ids.
    """
    last = _last_pid()
    if last is not None and 0 <= last - first < _PROBE_LIMIT:
        return list(range(first, last + 1))
    try:
        live = sorted(int(e.name) for e in os.scandir("/proc") if e.name.isdigit())
    except OSError:  # no /proc (macOS): see find_leftovers
        return []
    if last is None:  # no ns_last_pid (an old kernel): every process
        return live
    if last >= first:
        return [pid for pid in live if first <= pid <= last]
    return [pid for pid in live if pid >= first] + [pid for pid in live if pid <= last]


def _state(pid: int) -> tuple[str, int] | None:
    """(state letter, process group) of a process, None if there is none."""
    try:
        fields = _read(f"/proc/{pid}/stat").rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0].decode(), int(fields[2])


def carries(pid: int, token: str) -> bool:
    """Whether process `pid` has the step token `token` in its environment."""
    try:
        data = _read(f"/proc/{pid}/environ")
    except OSError:  # gone, or another user's
        return False
    return f"{STEP_ID_VAR}={token}\0".encode() in data


class Leftovers:
    """The live processes of a step: in its group, and outside it with its token.

    A plain class: the guard imports neither typing nor collections (~15 ms).
    """

    __slots__ = ("escaped", "members")

    def __init__(self, members: list[int], escaped: list[int]) -> None:
        self.members = members
        self.escaped = escaped

    def __bool__(self) -> bool:
        return bool(self.members or self.escaped)


def find_leftovers(pgid: int, token: str) -> Leftovers:
    """The live processes of the step whose group is `pgid` (this process excepted).

    The step's main process has id `pgid`, so everything it started came after.
    """
    members: list[int] = []
    escaped: list[int] = []
    me = os.getpid()
    if not _HAVE_PROC:  # only the group can be seen: whether it has a member at all
        return Leftovers([pgid] if _send(os.killpg, pgid, 0) else [], [])
    for pid in _candidates(pgid):
        state = _state(pid)
        if state is None or state[0] in "ZX" or pid == me:
            continue
        if state[1] == pgid:
            members.append(pid)
        elif token and carries(pid, token):
            escaped.append(pid)
    return Leftovers(members, escaped)


def signal_leftovers(pgid: int | None, left: Leftovers, signum: int) -> None:
    """Send `signum` to a step's group (`pgid`; else to each member found) and its escapees."""
    if pgid is not None:
        _send(os.killpg, pgid, signum)  # members made since the look too
    for pid in left.escaped if pgid is not None else [*left.members, *left.escaped]:
        _send(os.kill, pid, signum)


def _send(kill: Callable[[int, int], None], pid: int, signum: int) -> bool:
    """`kill(pid, signum)`; False if there was no such process (or it is not ours)."""
    try:
        kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def stop_leftovers(
    pgid: int, token: str, grace: float = LEFTOVER_GRACE_SECONDS, *, in_group: bool = False
) -> bool:
    """SIGTERM what is left of a step, SIGKILL it after `grace`; True if anything was left.

    `in_group`: the caller is a member of the group (the guard), so members
    are signalled one by one rather than through `killpg`. Blocks for at most
    `grace` and a moment for SIGKILL to land; a KeyboardInterrupt while
    waiting kills at once.
    """
    by_group = None if in_group else pgid
    left = find_leftovers(pgid, token)
    if not left:
        return False
    signal_leftovers(by_group, left, signal.SIGTERM)
    deadline = time.monotonic() + grace
    try:
        while left and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
            left = find_leftovers(pgid, token)
    finally:
        kill_leftovers(pgid, token, in_group=in_group)
    return True


def kill_leftovers(pgid: int, token: str, *, in_group: bool = False) -> None:
    """SIGKILL every process of a step until none is left (one may start another meanwhile)."""
    for _ in range(20):
        left = find_leftovers(pgid, token)
        if not left:
            return
        signal_leftovers(None if in_group else pgid, left, signal.SIGKILL)
        time.sleep(0.005)


def pid_mark() -> int:
    """The last process id given out: every process started after it has a later one."""
    last = _last_pid()
    return 1 if last is None else last


def kill_started(mark: int, token: str) -> bool:
    """SIGKILL every process carrying `token` made after `pid_mark()` returned `mark`, with
    its group when it leads one: a step whose start was interrupted before it was tracked.
    True if there was any."""
    seen = False
    for _ in range(20):
        found = [
            (pid, state[1])
            for pid in _candidates(mark)
            if (state := _state(pid)) is not None and state[0] not in "ZX" and carries(pid, token)
        ]
        if not found:
            return seen
        seen = True
        for pid, pgid in found:
            if pid == pgid:
                _send(os.killpg, pgid, signal.SIGKILL)
            _send(os.kill, pid, signal.SIGKILL)
        time.sleep(0.005)
    return seen


# -- the guard of a step on a Ray worker ------------------------------------------------


def guard(parent: int, argv: list[str]) -> int:
    """Run `argv` in this process's group; kill the group if `parent` (the Ray worker) dies.

    The Ray task starts this script as the leader of a new session, and the
    step as its child in the same group. It waits for whichever comes first:
    the step's exit, or the death of the Ray worker that started it (which no
    signal of the worker's can report when it is killed with -9). On the
    worker's death it kills the step's group and what escaped it. After the
    step's exit it stops what the step left, then exits as the step did
    (the same code, or the same signal). It ignores SIGTERM, SIGINT and SIGHUP
    so that a cancel sent to the group reaches the step and the guard stays
    to report how it ended.
    """
    if os.getpgrp() != os.getpid():  # never kill a group the guard did not make
        os.setsid()
    stops = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:  # the step starts with no signal blocked, in the guard's group
        pid = os.posix_spawnp(argv[0], argv, os.environ, setsigmask=())
    except OSError as exc:
        os.write(2, f"mlbuild: cannot run {argv[0]}: {exc}\n".encode())
        return 127
    for signum in stops:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
    token = os.environ.get(STEP_ID_VAR, "")
    pgid = os.getpgrp()
    _wait_step_or_parent(pid, parent, token, pgid)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    stop_leftovers(pgid, token, in_group=True)
    if code < 0:  # die of the same signal, so that the task sees it as the step's
        if -code not in (signal.SIGKILL, signal.SIGSTOP):  # those cannot be set, nor need be
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


def _wait_step_or_parent(pid: int, parent: int, token: str, pgid: int) -> None:
    import select

    try:
        step_fd = os.pidfd_open(pid)
        parent_fd = os.pidfd_open(parent)
    except (AttributeError, OSError):  # no pidfd (Linux < 5.3): look every 0.1 s
        while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if os.getppid() != parent:
                _kill_all(token, pgid)
            time.sleep(0.1)
        return
    if os.getppid() != parent:
        _kill_all(token, pgid)
    while True:
        ready, _, _ = select.select([step_fd, parent_fd], [], [])
        if parent_fd in ready:
            _kill_all(token, pgid)
        if step_fd in ready:
            return


def _kill_all(token: str, pgid: int) -> None:
    """The worker died: kill every process of the step, the guard last."""
    kill_leftovers(pgid, token, in_group=True)
    os._exit(137)


if __name__ == "__main__":
    # python -I -S reaper.py WORKER_PID -- ARGV...
    sys.exit(guard(int(sys.argv[1]), sys.argv[3:]))
