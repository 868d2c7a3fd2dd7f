"""Running steps on a Ray cluster: each stale target one Ray task; files in place or by digest.

`mlbuild run --executor ray [--address ADDR]` (or `[executor] kind = "ray"`)
submits every stale target as a Ray task asking for the target's
`resources` (`cpus`, `gpus`, `memory`, `custom`); Ray places it on a node
that has them. A request that no node of the cluster could ever satisfy
fails that target before submission, naming what is missing, instead of
waiting forever in Ray's queue. The task runs the step exactly as the local
executor does (`/bin/sh -c` or the `mlbuild.exec.worker` process, in its own
process group), so Python targets work the same way.

How files travel, chosen once per build (`[executor] files`, default `auto`):

- `shared`: the workers see the project directory at the same path (one
  machine, NFS): the step runs in place and writes its outputs and log
  there; the driver tails the log while it runs.
- `cas`: the workers see nothing of the project. The driver uploads the
  target's inputs and code files to the remote cache's CAS (a remote cache
  is required, and must be writable); the task builds a private sandbox in
  the node's temp directory, fetches each file by digest (verified), runs
  the step there, uploads the outputs' blobs and returns only their digests
  and the log. The driver checks them as a cache entry and hands them to the
  runner (ExecResult.remote_outputs), which fetches the blobs into the local
  cache (verified) and restores the outputs as it restores any cache hit. A
  step sees exactly its declared inputs and code: anything undeclared is
  missing.
- `auto`: one probe task per alive node checks for a token file the driver
  wrote under `.mlbuild/`: `shared` when every node sees it, else `cas`.

In `cas` mode each node keeps the blobs its tasks fetched in a node-local
cache (`$MLBUILD_NODE_CACHE`, default `<node temp dir>/mlbuild-node-cache`,
trimmed to `$MLBUILD_NODE_CACHE_MAX` bytes, default 5 GB, least recently
used first), so an input read by many tasks on one node is downloaded once:
the first task takes the blob's lock and downloads it (verified), the others
wait for it and copy it. The cache's files are never handed to a step: each
sandbox gets its own copy. The driver appends what moved to the target's log
(`mlbuild: inputs on node ...: N downloaded, M from the node's cache`).

Without `-j`, a Ray build runs up to as many steps at once as the cluster
has CPUs (`slots`), learnt when the executor connects.

A worker that dies or a node that is lost fails its target with a message
saying so; with `retries = N` the task is retried up to N times first (so
is a failed transfer). Nothing is recorded for a failed target: the
manifest comes from the runner after success only, and remote records are
written by the driver's upload after that. On Ctrl-C tasks are cancelled
(the step's process group gets SIGTERM, then SIGKILL), then force-killed.
Each step runs under a guard (reaper.py, a ~10 ms `python -I -S` process)
that leads the step's process group and watches its Ray worker through a
pidfd: when the worker dies (killed, its node lost, a forced cancel), the
guard kills the step's group and the processes that escaped it, so no step
outlives its task. After the step's main process exits, the guard stops
whatever it left running, as the local executor does.

Ray is imported only when this executor is chosen.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import signal
import stat as _stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlbuild.cache import (
    MODE_BITS,
    CacheError,
    CorruptObject,
    Entry,
    check_entry,
    describe_outputs,
    install_verified,
)
from mlbuild.errors import MlbuildError, UsageError
from mlbuild.exec import reaper
from mlbuild.exec.base import (
    TERM_GRACE_SECONDS,
    Done,
    ExecResult,
    ExecutorContext,
    Output,
    RemoteOutputs,
    Step,
    raised_message,
    step_argv,
    step_environment,
    timing_path,
)
from mlbuild.exec.reaper import (
    find_leftovers,
    kill_leftovers,
    kill_started,
    new_token,
    pid_mark,
    signal_leftovers,
)
from mlbuild.exec.worker import EXIT_RAISED
from mlbuild.fingerprint import Fingerprinter
from mlbuild.manifest import DigestKind, split
from mlbuild.pipeline.schema import Target
from mlbuild.remote import BadRecord, Remote, RemoteError
from mlbuild.staleness import Observation, observe_paths
from mlbuild.workspace import ray_dir, short_name

POLL_SECONDS = 0.2  # how often the driver looks at finished tasks and growing logs
_LOG_LIMIT = 8 << 20  # bytes of a sandboxed step's log sent back to the driver
NODE_CACHE_ENV = "MLBUILD_NODE_CACHE"  # where a node keeps the blobs its tasks fetched
NODE_CACHE_MAX_ENV = "MLBUILD_NODE_CACHE_MAX"  # its size limit in bytes
NODE_CACHE_MAX = 5 * 10**9


class TransferFailed(MlbuildError):
    """A task could not move its files through the remote cache (retried like a lost worker)."""


@dataclass
class _Task:
    target: Target
    log_path: Path
    observation: Observation  # the target before the step: in cas mode, what is uploaded
    start: float
    mode: str  # "shared" or "cas"
    ref: Any = None
    log_offset: int = 0


@dataclass
class _Cluster:
    """What the driver knows of the cluster: each alive node's id and total resources."""

    nodes: dict[str, Mapping[str, float]] = field(default_factory=dict)


def _request(target: Target) -> dict[str, float]:
    """A target's resource request in Ray's names (CPU, GPU, memory, custom)."""
    res = target.resources
    if res is None:
        return {"CPU": 1.0}
    request = {"CPU": res.cpus, "GPU": res.gpus, **res.custom}
    if res.memory is not None:
        request["memory"] = float(res.memory)
    return {name: amount for name, amount in request.items() if amount > 0}


def infeasible(
    request: Mapping[str, float], nodes: Mapping[str, Mapping[str, float]]
) -> str | None:
    """Why no node could ever run `request`, or None when one can."""
    for totals in nodes.values():
        if all(totals.get(name, 0.0) >= amount for name, amount in request.items()):
            return None
    if not nodes:
        return "the Ray cluster has no alive node"
    for name, amount in request.items():
        most = max(totals.get(name, 0.0) for totals in nodes.values())
        if most < amount:
            have = f"at most {most:g}" if most else "none"
            return (
                f"needs {name} {amount:g} but no node of the Ray cluster has that much"
                f" ({have} on {len(nodes)} node{'s' if len(nodes) != 1 else ''})"
            )
    wanted = ", ".join(f"{n} {a:g}" for n, a in sorted(request.items()))
    return f"needs {wanted} on one node, and no node of the Ray cluster has all of it"


class RayExecutor:
    """Runs steps as Ray tasks; the same interface as local.LocalExecutor."""

    def __init__(self, context: ExecutorContext) -> None:
        self.root = context.root
        self.settings = settings = context.settings
        self.remote = context.remote()
        self.digest = context.digest
        self.tasks: dict[str, _Task] = {}
        self.immediate: list[Done] = []  # targets failed before submission
        self.mode: str | None = None if settings.files == "auto" else settings.files
        self.cluster: _Cluster | None = None
        self._ray: Any = None
        self._remote_fn: Any = None
        self._pool: ThreadPoolExecutor | None = None

    # -- connecting -----------------------------------------------------------

    def _connect(self) -> Any:
        if self._ray is not None:
            return self._ray
        try:
            import ray
        except ImportError:
            raise UsageError("--executor ray needs Ray: pip install 'mlbuild[ray]'") from None
        if not ray.is_initialized():
            try:
                ray.init(
                    address=self.settings.address,
                    namespace="mlbuild",
                    logging_level=logging.WARNING,
                    log_to_driver=False,  # each step's output goes to its log and the reporter
                    include_dashboard=False,
                )
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = self.settings.address or "RAY_ADDRESS or a new local instance"
                raise MlbuildError(f"cannot connect to the Ray cluster ({where}): {exc}") from None
        self._ray = ray
        self._remote_fn = ray.remote(run_step)
        self.cluster = self._nodes()
        return ray

    def _nodes(self) -> _Cluster:
        ray = self._ray
        nodes: dict[str, Mapping[str, float]] = {}
        for node in ray.nodes():
            if node.get("Alive"):
                nodes[str(node["NodeID"])] = dict(node.get("Resources", {}))
        return _Cluster(nodes)

    def _decide_mode(self) -> str:
        """`auto`: probe every alive node for the project directory; `shared` if all see it."""
        if self.mode is not None:
            return self.mode
        ray = self._ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        token = uuid.uuid4().hex
        probe_dir = ray_dir(self.root)
        probe_dir.mkdir(parents=True, exist_ok=True)
        probe = probe_dir / "probe"
        probe.write_text(token)
        probe_fn = ray.remote(sees_token)
        assert self.cluster is not None
        refs = [
            probe_fn.options(
                num_cpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
            ).remote(str(probe), token)
            for node in self.cluster.nodes
        ]
        try:
            seen = ray.get(refs, timeout=60)
        except Exception:  # a node that cannot answer in a minute is not to be relied on
            seen = []
        self.mode = "shared" if seen and all(seen) else "cas"
        return self.mode

    @property
    def slots(self) -> int | None:
        """The cluster's CPUs once connected: `-j` when the user gave none (runner)."""
        if self.cluster is None:
            return None
        cpus = sum(totals.get("CPU", 0.0) for totals in self.cluster.nodes.values())
        return max(1, int(cpus))

    # -- starting ---------------------------------------------------------------

    def start(self, step: Step) -> None:
        """Submit the step as a Ray task (or fail it at once if it can never be placed)."""
        target, log_path = step.target, step.log_path
        self._connect()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_bytes(b"")
        start = time.perf_counter()
        request = _request(target)
        assert self.cluster is not None
        problem = infeasible(request, self.cluster.nodes)
        if problem is not None:
            self.cluster = self._nodes()  # nodes may have joined since
            problem = infeasible(request, self.cluster.nodes)
        mode = "shared"
        if problem is None:
            mode = self._decide_mode()
            if mode == "cas":
                problem = self._cas_problem()
        if problem is not None:
            self.immediate.append(Done(target.name, ExecResult(-1, 0.0, log_path, problem)))
            return
        task = _Task(target, log_path, step.observation, start, mode)
        try:
            spec = self._spec(task)
        except (RemoteError, CacheError, BadRecord, OSError) as exc:
            message = f"uploading its inputs to the remote cache failed: {exc}"
            self.immediate.append(Done(target.name, ExecResult(-1, 0.0, log_path, message)))
            return
        options: dict[str, Any] = {
            "num_cpus": request.get("CPU", 0.0),
            "num_gpus": request.get("GPU", 0.0),
            "max_retries": target.retries,
            "retry_exceptions": [TransferFailed],
        }
        if "memory" in request:
            options["memory"] = int(request["memory"])
        custom = {n: a for n, a in request.items() if n not in ("CPU", "GPU", "memory")}
        if custom:
            options["resources"] = custom
        task.ref = self._remote_fn.options(**options).remote(spec)
        self.tasks[target.name] = task

    def _cas_problem(self) -> str | None:
        if self.remote is None:
            return (
                "the Ray workers do not see the project directory, and files can only travel"
                " through a remote cache: set [cache] remote"
            )
        if not self.remote.write:
            return (
                "the Ray workers do not see the project directory:"
                " the remote cache must be writable (not --remote-read-only)"
            )
        if self.remote.remote() is None:
            return (
                "the Ray workers do not see the project directory and the remote cache is unusable"
            )
        return None

    def _spec(self, task: _Task) -> dict[str, Any]:
        """What the task needs: the target, how to reach files, the driver's declared env."""
        target = task.target
        env = {name: os.environ[name] for name in target.env if name in os.environ}
        spec: dict[str, Any] = {"target": target, "mode": task.mode, "env": env}
        if task.mode == "shared":
            spec["root"] = str(self.root)
            spec["log"] = str(task.log_path)
            return spec
        assert self.remote is not None
        remote = self.remote.remote()
        assert remote is not None
        files, dirs, links, uploads = self._sandbox_files(target, task.observation)
        remote.put_blobs(uploads, self.io)
        spec.update(
            remote=self.remote.url,
            options=dict(self.remote.settings.remote_options),
            files=files,
            dirs=dirs,
            links=links,
            sizes={d: n for d, (_, n) in uploads.items()},
        )
        return spec

    @property
    def io(self) -> ThreadPoolExecutor:
        if self.remote is not None:
            return self.remote.io
        if self._pool is None:
            self._pool = ThreadPoolExecutor(4)
        return self._pool

    def _sandbox_files(
        self, target: Target, observation: Observation
    ) -> tuple[list[Any], list[str], list[Any], dict[str, tuple[str, int]]]:
        """Inputs and code of a target: files [rel, digest, mode], dirs, links, and uploads."""
        files: list[Any] = []
        dirs: list[str] = []
        links: list[Any] = []
        uploads: dict[str, tuple[str, int]] = {}

        def add_file(rel: str, digest: str) -> None:
            st = os.stat(self.root / rel)
            files.append([rel, digest, _stat.S_IMODE(st.st_mode)])
            uploads[digest] = (str(self.root / rel), st.st_size)

        for path, value in observation.fingerprint.inputs.items():
            kind, digest = split(value)
            if kind is DigestKind.FILE:
                add_file(path, digest)
            elif kind is DigestKind.LINK:
                links.append([path, os.readlink(self.root / path)])
            elif kind is DigestKind.DIR:
                dirs.append(path)
                for rel, child in observation.listings[value]:
                    full = f"{path}/{rel}"
                    child_kind, child_digest = split(child)
                    if child_kind is DigestKind.FILE:
                        add_file(full, child_digest)
                    elif child_kind is DigestKind.DIR:
                        dirs.append(full)
                    else:
                        links.append([full, os.readlink(self.root / full)])
        code = set(observation.fingerprint.code)
        for rel in list(code):  # the packages a module lives in run when it is imported
            parent = os.path.dirname(rel)
            while parent:
                init = f"{parent}/__init__.py"
                if init not in code and os.path.isfile(self.root / init):
                    code.add(init)
                parent = os.path.dirname(parent)
        for rel in sorted(code):
            found = self.digest(rel)
            if found.kind is DigestKind.FILE:
                add_file(rel, found.digest)
        return files, dirs, links, uploads

    # -- waiting ------------------------------------------------------------------

    @property
    def running(self) -> list[str]:
        return [*self.tasks, *(done.target for done in self.immediate)]

    def wait(self, timeout: float | None = None) -> Iterator[Output | Done]:
        """Events of running tasks: output (shared mode: the growing log), then each end."""
        while self.immediate:
            yield self.immediate.pop(0)
        if not self.tasks:
            return
        ray = self._ray
        refs = {task.ref: name for name, task in self.tasks.items()}
        wait_for = POLL_SECONDS if timeout is None else min(timeout, POLL_SECONDS)
        # Wake for the first task to end (or to show logs), then take every other that did.
        ready, rest = ray.wait(list(refs), num_returns=1, timeout=wait_for)
        if ready and rest:
            ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        for name, task in list(self.tasks.items()):
            if task.mode == "shared":
                data = self._tail(task)
                if data:
                    yield Output(name, data)
        for ref in ready:
            name = refs[ref]
            task = self.tasks.pop(name)
            yield from self._finish(task)

    def _tail(self, task: _Task) -> bytes:
        try:
            with open(task.log_path, "rb") as handle:
                handle.seek(task.log_offset)
                data = handle.read()
        except OSError:
            return b""
        task.log_offset += len(data)
        return data

    def _finish(self, task: _Task) -> Iterator[Output | Done]:
        name = task.target.name
        ray = self._ray
        try:
            result: dict[str, Any] = ray.get(task.ref)
        except Exception as exc:
            message = _failure_message(exc, task.target.retries)
            with open(task.log_path, "ab") as log:
                log.write(f"mlbuild: {message}\n".encode())
            duration = time.perf_counter() - task.start
            yield Done(name, ExecResult(-1, duration, task.log_path, message))
            return
        if task.mode == "shared":
            data = self._tail(task)
        else:
            data = result["log"]
            task.log_path.write_bytes(data + _transfer_line(result))
        if data:
            yield Output(name, data)
        message = str(result.get("message", ""))
        outputs: RemoteOutputs | None = None
        if task.mode == "cas" and result["returncode"] == 0:
            message, outputs = _returned_outputs(task.target, result)
        duration = time.perf_counter() - task.start
        code = result["returncode"]
        yield Done(name, ExecResult(code, duration, task.log_path, message, outputs))

    def stop_all(self, grace: float = TERM_GRACE_SECONDS) -> list[str]:
        """Cancel every task: the step gets SIGTERM, and after `grace` seconds Ray kills it."""
        names = [*self.tasks, *(done.target for done in self.immediate)]
        self.immediate.clear()
        if not self.tasks:
            return names
        ray = self._ray
        refs = [task.ref for task in self.tasks.values()]
        for ref in refs:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=False)  # KeyboardInterrupt in the task: it stops its step
        try:
            ray.wait(refs, num_returns=len(refs), timeout=grace)
        finally:
            for ref in refs:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            self.tasks.clear()
        return names


def _returned_outputs(
    target: Target, result: Mapping[str, Any]
) -> tuple[str, RemoteOutputs | None]:
    """A sandboxed step's outputs as a checked cache entry: (a problem or "", the outputs).

    Outputs the target does not declare are ignored; none at all is no
    problem here (the runner reports the missing outputs).
    """
    declared = {p.path for p in target.outputs}
    outputs = {p: o for p, o in result["outputs"].items() if p in declared}
    if not outputs:
        return "", None
    entry = Entry("0" * 64, target.name, time.time(), result["duration"], outputs, 0)
    problem = check_entry(entry)
    if problem is not None:
        return f"the Ray worker returned unusable outputs: {problem}", None
    return "", RemoteOutputs(entry, dict(result["blobs"]))


def _transfer_line(result: Mapping[str, Any]) -> bytes:
    """What a sandboxed task's inputs cost, for the end of its log (not shown as output)."""
    fetched = result.get("fetched")
    if not isinstance(fetched, dict):
        return b""
    node = str(fetched.get("node", ""))[:12] or "?"
    return (
        f"mlbuild: inputs on node {node}: {fetched.get('downloaded', 0)} downloaded,"
        f" {fetched.get('cached', 0)} from the node's cache\n"
    ).encode()


def _failure_message(exc: BaseException, retries: int) -> str:
    from ray import exceptions as rex

    tries = f" (after {retries} retr{'y' if retries == 1 else 'ies'})" if retries else ""
    if isinstance(exc, rex.TaskCancelledError):
        return "its Ray task was cancelled"
    if isinstance(exc, rex.WorkerCrashedError):
        return f"the Ray worker running it died{tries}"
    if isinstance(exc, rex.NodeDiedError | rex.ObjectLostError | rex.OwnerDiedError):
        return f"its Ray node was lost{tries}"
    if isinstance(exc, rex.RayTaskError):
        cause = exc.cause if exc.cause is not None else exc
        if isinstance(cause, TransferFailed):
            return f"moving its files through the remote cache failed{tries}: {cause}"
        return f"its Ray task failed{tries}: {type(cause).__name__}: {cause}"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"Ray failed to run it: {type(exc).__name__}: {first}"


# -- on the worker ----------------------------------------------------------------


def sees_token(path: str, token: str) -> bool:
    """The probe task: does this node see the driver's project directory?"""
    try:
        with open(path) as handle:
            return handle.read() == token
    except OSError:
        return False


def run_step(spec: dict[str, Any]) -> dict[str, Any]:
    """The Ray task: run one step in place or in a sandbox; its exit code, log and outputs."""
    target: Target = spec["target"]
    if spec["mode"] == "shared":
        root = Path(spec["root"])
        with open(spec["log"], "ab") as log:
            code, duration, message = _run(target, root, spec["env"], log, Path(spec["log"]))
        return {"returncode": code, "duration": duration, "message": message}
    remote = Remote(spec["remote"], spec["options"])
    # The node's temp directory: <work>/project is the sandbox, the log sits beside it.
    work = Path(tempfile.mkdtemp(prefix=f"mlbuild-{short_name(target.name)}-"))
    sandbox = work / "project"
    sandbox.mkdir()
    pool = ThreadPoolExecutor(8)
    try:
        downloaded, cached = _materialize(remote, sandbox, spec, pool)
        for port in target.outputs:
            (sandbox / port.path).parent.mkdir(parents=True, exist_ok=True)
        log_path = work / "step.log"
        with open(log_path, "wb") as log:
            code, duration, message = _run(target, sandbox, spec["env"], log, log_path)
        data = log_path.read_bytes()
        if len(data) > _LOG_LIMIT:
            data = b"[... cut by mlbuild ...]\n" + data[-_LOG_LIMIT:]
        outputs: dict[str, Any] = {}
        blobs: dict[str, int] = {}
        if code == 0:
            outputs, blobs = _upload_outputs(remote, sandbox, target, pool)
        return {
            "returncode": code,
            "duration": duration,
            "message": message,
            "log": data,
            "outputs": outputs,
            "blobs": blobs,
            "sandbox": str(sandbox),
            "fetched": {"downloaded": downloaded, "cached": cached, "node": _node_id()},
        }
    finally:
        pool.shutdown()
        shutil.rmtree(work, ignore_errors=True)


def _materialize(
    remote: Remote, sandbox: Path, spec: Mapping[str, Any], pool: ThreadPoolExecutor
) -> tuple[int, int]:
    """The sandbox: declared input directories, files by digest (verified), links.

    Files come through the node's cache (NodeCache); returns how many blobs
    were downloaded and how many the cache already had.
    """
    for rel in spec["dirs"]:
        (sandbox / rel).mkdir(parents=True, exist_ok=True)
    node = NodeCache.here()
    sizes: Mapping[str, int] = spec["sizes"]

    def one(item: list[Any]) -> bool:
        rel, digest, mode = item
        dest = sandbox / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        source, downloaded = node.get(remote, digest, sizes.get(digest))
        try:
            shutil.copyfile(source, dest)
        except FileNotFoundError:  # trimmed by another task just now: fetched again
            source, downloaded = node.get(remote, digest, sizes.get(digest))
            shutil.copyfile(source, dest)
        os.chmod(dest, mode & MODE_BITS)
        return downloaded

    try:
        fetched = list(pool.map(one, spec["files"]))
    except (RemoteError, BadRecord, CacheError, OSError) as exc:
        raise TransferFailed(f"fetching inputs: {exc}") from None
    for rel, link in spec["links"]:
        dest = sandbox / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(link)
    node.trim()
    return sum(fetched), len(fetched) - sum(fetched)


class NodeCache:
    """A node's blobs, shared by the tasks on it: `<root>/<d[:2]>/<d>`, read-only files.

    A blob enters only verified (install_verified: a temp file hashed, then
    renamed), under a lock per blob, so tasks wanting one blob at once
    download it once. Its mtime is its last use, for `trim`.
    """

    def __init__(self, root: Path, limit: int) -> None:
        self.root = root
        self.limit = limit

    @classmethod
    def here(cls) -> NodeCache:
        root = os.environ.get(NODE_CACHE_ENV) or os.path.join(
            tempfile.gettempdir(), "mlbuild-node-cache"
        )
        try:
            limit = int(os.environ.get(NODE_CACHE_MAX_ENV, NODE_CACHE_MAX))
        except ValueError:
            limit = NODE_CACHE_MAX
        return cls(Path(root), limit)

    def get(self, remote: Remote, digest: str, size: int | None) -> tuple[Path, bool]:
        """The cached file of blob `digest`, and whether it had to be downloaded now."""
        path = self.root / digest[:2] / digest
        if self._usable(path, size):
            return path, False
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{digest}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed, or when the task dies
            if self._usable(path, size):
                return path, False
            tmp = str(path.parent / f".tmp-{uuid.uuid4().hex}")
            try:
                install_verified(
                    tmp, str(path), digest, lambda p: remote.get_blob(digest, p, size), 0o444
                )
            except CorruptObject as exc:
                raise BadRecord(f"blob {digest[:12]}: {exc}") from None
        return path, True

    @staticmethod
    def _usable(path: Path, size: int | None) -> bool:
        try:
            st = path.stat()
        except OSError:
            return False
        if size is not None and st.st_size != size:
            path.unlink(missing_ok=True)  # truncated by someone: fetched again
            return False
        with contextlib.suppress(OSError):
            os.utime(path)  # last use
        return True

    def trim(self) -> None:
        """Remove the least recently used blobs beyond the size limit."""
        try:
            files = [(p.stat(), p) for p in self.root.glob("??/*") if not p.name.startswith(".")]
        except OSError:
            return
        total = sum(st.st_size for st, _ in files)
        for st, path in sorted(files, key=lambda f: f[0].st_mtime):
            if total <= self.limit:
                break
            with contextlib.suppress(OSError):
                path.unlink()  # a task copying it has it open: its copy completes
                total -= st.st_size


def _upload_outputs(
    remote: Remote, sandbox: Path, target: Target, pool: ThreadPoolExecutor
) -> tuple[dict[str, Any], dict[str, int]]:
    """Digest the outputs the step wrote and upload their blobs; (entry outputs, sizes)."""
    fp = Fingerprinter(sandbox, {})
    listings: dict[str, tuple[tuple[str, str], ...]] = {}
    present = [p.path for p in target.outputs if os.path.lexists(sandbox / p.path)]
    fingerprints = observe_paths(fp, present, listings)
    try:
        outputs, files = describe_outputs(sandbox, fingerprints, listings)
        remote.put_blobs(files, pool)
    except (RemoteError, BadRecord, CacheError, OSError) as exc:
        raise TransferFailed(f"uploading outputs: {exc}") from None
    return outputs, {d: n for d, (_, n) in files.items()}


def _run(
    target: Target, root: Path, env: Mapping[str, str], log: Any, log_path: Path
) -> tuple[int, float, str]:
    """Run the step in `root`, output to `log`: (exit status, seconds, what it raised).

    The step runs under the guard (reaper.guard), in a process group of its
    own that dies with this worker however the worker dies (killed, its node
    lost, the task force-cancelled): the guard watches the worker and kills
    the step's group and what escaped it. A cancel (KeyboardInterrupt here)
    sends the step SIGTERM, then SIGKILL after the grace period.
    """
    token = new_token()
    environment = step_environment(target, token=token)
    environment.update(env)
    environment["MLBUILD_RAY_NODE"] = _node_id()
    timing = timing_path(log_path)
    guard = [sys.executable, "-I", "-S", reaper.__file__, str(os.getpid()), "--"]
    start = time.perf_counter()
    mark = pid_mark()
    try:
        proc = subprocess.Popen(
            [*guard, *step_argv(target, root, timing)],
            cwd=root,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except BaseException:  # a cancel landing after the fork: the guard runs, untracked
        kill_started(mark, token)
        raise
    try:
        code = proc.wait()
    except BaseException:  # ray.cancel: KeyboardInterrupt here
        signal_leftovers(proc.pid, find_leftovers(proc.pid, token), signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=TERM_GRACE_SECONDS)
        raise
    finally:
        kill_leftovers(proc.pid, token)  # the guard stopped them; this is in case it died
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1.0)
    duration = time.perf_counter() - start
    message = raised_message(timing) if target.python and code == EXIT_RAISED else ""
    return code, duration, message


def _node_id() -> str:
    try:
        import ray

        return str(ray.get_runtime_context().get_node_id())
    except Exception:  # outside a Ray worker (tests calling run_step directly)
        return ""
