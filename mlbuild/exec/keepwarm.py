"""Keep-warm: warm workers that outlive a run, held by one background process per workspace.

Opt-in with `[workers] keep_warm = "10m"`. After a run, mlbuild asks the
workspace's keep-warm process (started on first use: `python -m
mlbuild.exec.keepwarm ROOT SECONDS`, found through `.mlbuild/workers.sock`)
to keep a warm worker for each Python target that ran, in the environment
that run gave it. The next run asks for a target's worker before starting a
fresh one; the same checks as within a run decide (exec/warm.py: environment
but `MLBUILD_PARAM_*` and the step token, package stamp, imports and literal
environment writes of the code now).

A warm worker here is the keep-warm process's child, not the run's. The run
hands it the call and the write end of its own output pipe over the unix
socket (SCM_RIGHTS), in one message the keep-warm process passes on; it then
watches the worker through a pidfd (which works for any process), stops it
through its process group and token like any step, and reads its exit status
from a file the worker writes last. So killing the keep-warm process loses
nothing: a step already handed over runs on; one not yet asked for finds no
socket and runs in a fresh worker; its idle workers see the end of their
socket and exit. The keep-warm process exits after `keep_warm` without a
request, or on `mlbuild workers stop`. The socket lives in the workspace's
`.mlbuild/`, is its owner's only (mode 0600, and the peer's uid is checked),
so it is never shared across workspaces or users.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

from mlbuild.exec.base import Executor, Step, step_environment
from mlbuild.exec.local import WARM_SUFFIX, LocalExecutor
from mlbuild.exec.reaper import STEP_ID_VAR, kill_leftovers, new_token
from mlbuild.exec.warm import (
    WarmSpec,
    _spec_of,
    package_stamp,
    params_of,
    write_warm_marker,
)
from mlbuild.exec.worker import PARAM_PREFIX, WARM_FLAG
from mlbuild.workspace import running_dir, short_name, state_dir

CONNECT_SECONDS = 2.0  # a keep-warm process that does not answer by then is not used
_KEPT = ".kept"  # + WARM_SUFFIX: the marker of a kept worker


def socket_path(root: Path) -> Path:
    return state_dir(root) / "workers.sock"


def pid_path(root: Path) -> Path:
    return state_dir(root) / "workers.pid"


def request(root: Path, message: Mapping[str, Any], fds: Sequence[int] = ()) -> Any:
    """Send one request to the workspace's keep-warm process; its answer, or None (none there)."""
    path = str(socket_path(root))
    if len(path.encode()) >= 107 or not os.path.exists(path):
        return None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(CONNECT_SECONDS)
            sock.connect(path)
            socket.send_fds(sock, [json.dumps(message).encode() + b"\n"], list(fds))
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    return None
                data += chunk
        return json.loads(data)
    except (OSError, ValueError):
        return None


def ensure_server(root: Path, idle: float) -> bool:
    """Start the workspace's keep-warm process unless one answers; whether one answers now."""
    if request(root, {"op": "ping"}) is not None:
        return True
    subprocess.run(  # it forks and returns at once: the run never waits for it to end
        [sys.executable, "-m", "mlbuild.exec.keepwarm", str(root), str(idle)],
        cwd=root,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # not stopped with the run: it outlives it, by request
        check=False,
    )
    deadline = time.monotonic() + CONNECT_SECONDS
    while time.monotonic() < deadline:
        if request(root, {"op": "ping"}) is not None:
            return True
        time.sleep(0.02)
    return False


def _compared(env: Mapping[str, str]) -> dict[str, str]:
    """The environment as compared: without the step token and the parameters' variables."""
    return {k: v for k, v in env.items() if k != STEP_ID_VAR and not k.startswith(PARAM_PREFIX)}


def process_state() -> list[Any]:
    """What a process inherits besides its environment: umask, resource limits, niceness.

    A kept worker has the keep-warm process's, which may not be the run's
    (another shell's `ulimit -f` or `umask`): it is used only if they match.
    """
    import resource

    mask = os.umask(0o022)
    os.umask(mask)
    limits = [
        [name, *resource.getrlimit(getattr(resource, name))]
        for name in sorted(dir(resource))
        if name.startswith("RLIMIT_")
    ]
    return [mask, os.nice(0), limits]


def _spec_json(spec: WarmSpec) -> list[Any]:
    return json.loads(json.dumps(spec))  # type: ignore[no-any-return]


# -- the run's side ------------------------------------------------------------------------


class Adopted:
    """A kept worker handed to this run: not its child, so watched through a pidfd.

    Quacks like the `subprocess.Popen` the local executor keeps for a step:
    `pid`, `stdout`, `poll`, `wait`, `returncode`.
    """

    def __init__(self, pid: int, stdout: IO[bytes], status: Path) -> None:
        self.pid = pid
        self.stdout: IO[bytes] | None = stdout
        self.status = status
        self.returncode: int | None = None
        try:
            self.pidfd: int | None = os.pidfd_open(pid)
        except OSError:
            self.pidfd = None

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        if self.pidfd is not None:
            if not select.select([self.pidfd], [], [], 0)[0]:
                return None
        elif _running(self.pid):
            return None
        try:
            self.returncode = int(self.status.read_text())
        except (OSError, ValueError):
            self.returncode = -signal.SIGKILL  # ended without saying how: killed
        with contextlib.suppress(OSError):
            self.status.unlink()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("warm worker", timeout or 0.0)
            if self.pidfd is not None:
                select.select([self.pidfd], [], [], 0.5)
            else:
                time.sleep(0.02)
        return code


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def adopt(root: Path, step: Step, base_env: Mapping[str, str], call: str) -> Any:
    """The step's kept worker given its call, as (Adopted, token); None: none fits, run fresh."""
    target = step.target
    fingerprint = step.observation.fingerprint
    spec = _spec_of(None, str(root), fingerprint.code)
    if spec is None:
        return None
    env = step_environment(target, dict(base_env), "")
    status = step.log_path.with_suffix(".exit")  # beside its log; never in running/
    status.unlink(missing_ok=True)
    read, write = os.pipe()
    try:
        answer = request(
            root,
            {
                "op": "take",
                "name": target.name,
                "env": _compared(env),
                "stamp": json.loads(json.dumps(package_stamp(fingerprint.packages, base_env))),
                "spec": _spec_json(spec),
                "call": call,
                "params": params_of(env),
                "state": process_state(),
                "status": str(status),
            },
            [write],
        )
    finally:
        os.close(write)
    if not isinstance(answer, dict) or "pid" not in answer:
        os.close(read)
        return None
    return Adopted(int(answer["pid"]), os.fdopen(read, "rb"), status), str(answer["token"])


def keep(
    root: Path, idle: float, steps: Sequence[Step], base_env: Mapping[str, str], n: int
) -> None:
    """After a run: ask the keep-warm process to keep a worker for each of these steps' targets."""
    wanted = []
    for step in steps[-n:]:
        fingerprint = step.observation.fingerprint
        spec = _spec_of(None, str(root), fingerprint.code)
        if spec is None:
            continue
        env = step_environment(step.target, dict(base_env), "")
        during = {k: v for k, v, only_unset in spec.env if not (only_unset and k in env)}
        wanted.append(
            {
                "name": step.target.name,
                "env": env,
                "stamp": json.loads(json.dumps(package_stamp(fingerprint.packages, base_env))),
                "spec": _spec_json(spec),
                "during": during,
            }
        )
    if wanted and ensure_server(root, idle):
        request(root, {"op": "keep", "workers": wanted, "limit": n})


def attach(executor: Executor, keep_warm: float | None) -> None:
    """With `[workers] keep_warm`: the local executor asks the keep-warm process first."""
    if keep_warm is None or not isinstance(executor, LocalExecutor):
        return
    root = executor.root
    executor.adopt = lambda step, env, call: adopt(root, step, env, call)
    listed = request(root, {"op": "list"})
    if isinstance(listed, list):  # not warmed again within the run (exec/warm.prepare)
        executor.kept = frozenset(str(entry["name"]) for entry in listed)


def keep_after(executor: Executor, keep_warm: float, jobs: int) -> None:
    """After a run: the Python targets that ran get a kept worker for the next run."""
    if isinstance(executor, LocalExecutor) and executor.started_python:
        with contextlib.suppress(OSError):  # keeping workers is only ever a saving
            keep(executor.root, keep_warm, executor.started_python, executor.base_env, jobs)


# -- the keep-warm process -------------------------------------------------------------------


class _Kept(NamedTuple):
    proc: subprocess.Popen[bytes]
    chan: socket.socket  # our end of its stdin
    token: str
    env: dict[str, str]  # compared form
    stamp: Any
    spec: Any
    marker: Path


class Server:
    """Holds kept workers and hands them out; one per workspace, gone after `idle` seconds."""

    def __init__(self, root: Path, idle: float) -> None:
        self.root = root
        self.idle = idle
        self.kept: dict[str, _Kept] = {}
        self.handed: list[subprocess.Popen[bytes]] = []  # given to runs; reaped here
        self.running = True
        self.state = process_state()  # what its workers inherit

    def serve(self) -> None:
        path = socket_path(self.root)
        path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        os.chmod(path, 0o600)  # its owner's only; connections are checked too (_handle)
        # Whole before anyone can connect: `mlbuild workers` reads it once answered.
        temp = pid_path(self.root).with_name(f".workers.pid-{os.getpid()}")
        temp.write_text(f"{os.getpid()}\n")
        os.replace(temp, pid_path(self.root))
        listener.listen(8)
        last = time.monotonic()
        try:
            while self.running and time.monotonic() - last < self.idle:
                self._reap()
                if select.select([listener], [], [], 1.0)[0]:
                    conn, _ = listener.accept()
                    with conn:
                        self._handle(conn)
                    last = time.monotonic()
        finally:
            for name in list(self.kept):
                self._drop(name)
            with contextlib.suppress(OSError):
                if pid_path(self.root).read_text().strip() == str(os.getpid()):
                    pid_path(self.root).unlink()
                    path.unlink()
            listener.close()

    def _reap(self) -> None:
        self.handed = [p for p in self.handed if p.poll() is None]
        for name in [n for n, k in self.kept.items() if k.proc.poll() is not None]:
            self._drop(name)

    def _handle(self, conn: socket.socket) -> None:
        import struct

        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        if struct.unpack("3i", creds)[1] != os.getuid():
            return  # another user's process: never served
        conn.settimeout(CONNECT_SECONDS)
        data, fds = b"", []
        try:
            while not data.endswith(b"\n"):
                chunk, got, _, _ = socket.recv_fds(conn, 65536, 4)
                fds.extend(got)
                if not chunk:
                    return
                data += chunk
            message = json.loads(data)
            answer = self._answer(message, fds)
            conn.sendall(json.dumps(answer).encode() + b"\n")
        except (OSError, ValueError, KeyError, TypeError):
            return
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _answer(self, message: dict[str, Any], fds: list[int]) -> Any:
        op = message["op"]
        if op == "ping":
            return {"pid": os.getpid()}
        if op == "list":
            return [
                {"name": name, "pid": k.proc.pid, "rss_kib": _rss_kib(k.proc.pid)}
                for name, k in self.kept.items()
            ]
        if op == "stop":
            self.running = False
            return {}
        if op == "keep":
            self._keep(message["workers"], int(message["limit"]))
            return {}
        if op == "take":
            return self._take(message, fds)
        return {}

    def _keep(self, wanted: list[dict[str, Any]], limit: int) -> None:
        wanted = wanted[:limit]
        names = [w["name"] for w in wanted]
        others = [n for n in self.kept if n not in names]
        for name in others[max(0, limit - len(wanted)) :]:  # at most `limit` kept in all
            self._drop(name)
        for want in wanted:
            kept = self.kept.get(want["name"])
            env = _compared(want["env"])
            if kept is not None and (kept.env, kept.stamp, kept.spec) == (
                env,
                want["stamp"],
                want["spec"],
            ):
                continue
            self._drop(want["name"])
            self._spawn(want, env)

    def _spawn(self, want: dict[str, Any], compared: dict[str, str]) -> None:
        name = want["name"]
        token = new_token()
        env = {**want["env"], STEP_ID_VAR: token}
        ours, theirs = socket.socketpair()
        spec = {"root": str(self.root), "imports": want["spec"][0], "env": want["during"]}
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "mlbuild.exec.worker", WARM_FLAG, json.dumps(spec)],
                cwd=self.root,
                env=env,
                stdin=theirs.fileno(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError:
            ours.close()
            return
        finally:
            theirs.close()
        marker = running_dir(self.root) / (short_name(name) + _KEPT + WARM_SUFFIX)
        running_dir(self.root).mkdir(parents=True, exist_ok=True)
        write_warm_marker(marker, proc.pid, token, name)
        self.kept[name] = _Kept(proc, ours, token, compared, want["stamp"], want["spec"], marker)

    def _take(self, message: dict[str, Any], fds: list[int]) -> Any:
        kept = self.kept.pop(message["name"], None)
        if kept is None:
            return {}
        spec = message["spec"]
        same = (
            kept.proc.poll() is None
            and kept.env == message["env"]
            and kept.stamp == message["stamp"]
            and self.state == message["state"]
            and kept.spec[1] == spec[1]  # the literal environment writes
            and all(entry in spec[0] for entry in kept.spec[0])  # imports still covered
            and len(fds) == 1
        )
        if same:
            line = {"call": message["call"], "params": message["params"]}
            line["status"] = message["status"]
            try:
                socket.send_fds(kept.chan, [json.dumps(line).encode() + b"\n"], fds[:1])
            except OSError:
                same = False
        kept.chan.close()
        kept.marker.unlink(missing_ok=True)
        if not same:
            _kill(kept)
            return {}
        self.handed.append(kept.proc)
        return {"pid": kept.proc.pid, "token": kept.token}

    def _drop(self, name: str) -> None:
        kept = self.kept.pop(name, None)
        if kept is not None:
            kept.chan.close()
            _kill(kept)
            kept.marker.unlink(missing_ok=True)


def _kill(kept: _Kept) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(kept.proc.pid, signal.SIGKILL)
    kept.proc.wait()
    kill_leftovers(kept.proc.pid, kept.token)


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# -- `mlbuild workers` ------------------------------------------------------------------------


def show(root: Path) -> list[str]:
    """Lines for `mlbuild workers`: the keep-warm process and each worker it keeps."""
    answer = request(root, {"op": "ping"})
    if not isinstance(answer, dict):
        return ["no keep-warm process for this workspace"]
    kept = request(root, {"op": "list"}) or []
    lines = [f"keep-warm process {answer['pid']} (RSS {_rss_kib(int(answer['pid'])) // 1024} MiB)"]
    for entry in kept:
        rss = int(entry["rss_kib"]) // 1024
        lines.append(f"  {entry['name']}: worker {entry['pid']}, RSS {rss} MiB")
    if not kept:
        lines.append("  no warm workers")
    return lines


def stop(root: Path) -> str:
    """`mlbuild workers stop`: end the keep-warm process and its workers."""
    answer = request(root, {"op": "ping"})
    if not isinstance(answer, dict):
        return "no keep-warm process for this workspace"
    request(root, {"op": "stop"})
    pid = int(answer["pid"])
    deadline = time.monotonic() + 10.0
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return f"stopped keep-warm process {pid}"


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C of the run that started it
    if os.fork() == 0:  # detached: no run is its parent, none waits for it
        Server(Path(sys.argv[1]), float(sys.argv[2])).serve()
    os._exit(0)
