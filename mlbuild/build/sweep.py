"""Grid runs (`mlbuild exp run --sweep NAME=A,B`): one build per point, each in a sandbox.

A point is one value of every swept parameter. It is built outside the
workspace, in a sandbox under the system's temp directory that holds copies
of what the affected targets and what they need read (the pipeline file, its
params files, source inputs, code files and discovered inputs) and nothing
else. Copies, never links: a step writing into an input must not reach the
workspace. Outputs of upstream targets are not copied: the sandbox starts with
no manifests, so each target of the point is restored from the cache when its
key is there and runs otherwise.

Each sandbox is built by `mlbuild run` in a process forked for the point
(`--set` gives the point's values; a params-file key is written into the
sandbox's copy of that file), with its own `.mlbuild/` state, so two points
never share a database;
only `.mlbuild/cache` is the workspace's (a link to it: objects and entries
are written by temp file and rename, so concurrent writers are safe). When a
point's build is over, this process copies its experiment row and metrics into
the workspace's `state.db`, one point at a time, under the workspace lock
held for the whole sweep; the sandbox is then removed. The workspace's files,
manifests and params files are never written.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple

from mlbuild.code import CodeError, CodeScanner, Parsed
from mlbuild.errors import UsageError
from mlbuild.fingerprint import Fingerprinter, encode_value
from mlbuild.graph import Graph
from mlbuild.manifest import Fingerprint
from mlbuild.pipeline.load import did_you_mean, parse_value, toml_type
from mlbuild.pipeline.schema import STATE_DIR, Pipeline, Target
from mlbuild.staleness import expand_inputs
from mlbuild.store import Store, StoredExperiment, open_existing_store
from mlbuild.workspace import cache_dir, short_name, state_dir

SANDBOX_PREFIX = "mlbuild-sweep-"
LOG_TAIL = 10  # lines of a failed step's log shown


class Axis(NamedTuple):
    """One `--sweep NAME=A,B`: the values as typed for NAME and as the user wrote them."""

    name: str
    values: tuple[Any, ...]
    texts: tuple[str, ...]
    target: str | None  # the target of a local `TARGET.NAME`, else None


class Point(NamedTuple):
    """One point of the grid: (name, value as written) for every axis, in --sweep order."""

    number: int  # 0-based position in the grid
    values: tuple[tuple[str, str], ...]

    @property
    def label(self) -> str:
        return ",".join(f"{name}={text}" for name, text in self.values)


class PointStatus(Enum):
    OK = "ok"
    FAILED = "failed"
    NOT_STARTED = "not started"
    INTERRUPTED = "interrupted"


class PointResult(NamedTuple):
    """What became of one point; `row` and `metrics` go into the workspace's state.db."""

    point: Point
    status: PointStatus
    outcomes: Mapping[str, str]  # target -> outcome value (ran, restored, failed, ...)
    row: StoredExperiment | None
    metrics: tuple[tuple[str, str, str], ...]  # (cache key, target, JSON) for save_metrics
    logs: Mapping[str, Path]  # failed target -> its log, kept under .mlbuild/sweeps/
    seconds: float


class SweepOptions(NamedTuple):
    sweeps: tuple[str, ...]  # the `--sweep` arguments as given
    targets: tuple[str, ...]
    jobs: int  # points at once
    keep_going: bool
    command_line: str
    main: Callable[[Sequence[str]], int]  # the CLI's entry point, which each point runs


# --- the grid -------------------------------------------------------------------------


def parse_axes(pipeline: Pipeline, items: Sequence[str]) -> list[Axis]:
    """The `--sweep` arguments checked against the pipeline; a UsageError for a mistake."""
    axes: list[Axis] = []
    seen: set[str] = set()
    for item in items:
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UsageError(f"--sweep {item!r}: expected NAME=VALUE,VALUE,...")
        if name in seen:
            raise UsageError(
                f"--sweep {name}: given twice; list all its values in one --sweep ({name}=A,B,C)"
            )
        seen.add(name)
        declared, target = _declared(pipeline, name)
        texts = split_values(raw)
        if not texts or any(not t for t in texts):
            raise UsageError(
                f"--sweep {name}={raw}: "
                + ("needs at least one value" if not raw.strip() else "an empty value")
                + f" ({name}=A,B,...)"
            )
        values = tuple(_typed(name, declared, text) for text in texts)
        encoded = [encode_value(v) for v in values]
        twice = next((t for t, e in zip(texts, encoded, strict=True) if encoded.count(e) > 1), None)
        if twice is not None:
            raise UsageError(f"--sweep {name}: the value {twice} is given twice")
        axes.append(Axis(name, values, tuple(texts), target))
    return axes


def _declared(pipeline: Pipeline, name: str) -> tuple[Any, str | None]:
    """The declared value of the parameter `name` (as `--set` names it) and, for a
    local one, its target."""
    if name in pipeline.params:
        return pipeline.params[name], None
    target_name, _, pname = name.rpartition(".")
    target = pipeline.targets.get(target_name)
    if target is not None and pname in target.params and not _reads_global(pipeline, target):
        return target.params[pname], target_name
    known = sorted(pipeline.params) + sorted(
        f"{t.name}.{p}"
        for t in pipeline.targets.values()
        if not _reads_global(pipeline, t)
        for p in t.params
    )
    raise UsageError(
        f"--sweep {name}: no such parameter in {pipeline.display_file}" + did_you_mean(name, known)
    )


def _reads_global(pipeline: Pipeline, target: Target) -> bool:
    """Whether a target's params are globals it names (a list) rather than its own
    table; as experiments.row_params tells them apart."""
    return bool(target.params) and all(
        p in pipeline.params and encode_value(pipeline.params[p]) == encode_value(v)
        for p, v in target.params.items()
    )


def _typed(name: str, declared: Any, text: str) -> Any:
    """A value held to the declared type, as `--set` holds it (load.typed_override)."""
    value = parse_value(text)
    want, got = toml_type(declared), toml_type(value)
    if want == got:
        return value
    if want == "a float" and got == "an integer":
        return float(value)
    if want == "a string":
        return text
    raise UsageError(
        f"--sweep {name}={text}: {name} is {want} ({encode_value(declared)}) and {text} is {got}"
    )


def split_values(raw: str) -> list[str]:
    """`1,2,3` -> ['1', '2', '3'], keeping commas inside quotes and brackets (`[1,2],[3]`)."""
    parts: list[str] = []
    depth, quote, start = 0, "", 0
    for i, ch in enumerate(raw):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(raw[start:i].strip())
            start = i + 1
    if raw.strip():
        parts.append(raw[start:].strip())
    return parts


def grid(axes: Sequence[Axis]) -> list[Point]:
    """Every combination of the axes' values, the first axis varying slowest."""
    combos = itertools.product(*[[(a.name, t) for t in a.texts] for a in axes])
    return [Point(i, tuple(combo)) for i, combo in enumerate(combos)]


def affected(graph: Graph, axes: Sequence[Axis], named: Sequence[str]) -> tuple[str, ...]:
    """The targets a point builds: those reading a swept parameter and what depends on
    them, among the named targets' closure (all targets if none named)."""
    pipeline = graph.pipeline
    readers: set[str] = set()
    for axis in axes:
        if axis.target is not None:
            readers.add(axis.target)
            continue
        readers.update(
            t.name
            for t in pipeline.targets.values()
            if axis.name in t.params and _reads_global(pipeline, t)
        )
    scope = set(graph.select(named)) if named else set(graph.order)
    chosen = (readers | graph.downstream(readers)) & scope
    if not chosen:
        swept = ", ".join(a.name for a in axes)
        where = f" among {', '.join(named)} and what they need" if named else ""
        raise UsageError(f"--sweep {swept}: no target reads it{where}; nothing to sweep")
    return tuple(name for name in graph.order if name in chosen)


# --- the sandbox ----------------------------------------------------------------------


def sandbox_files(graph: Graph, store: Store, names: Iterable[str]) -> list[str]:
    """What a sandbox needs from the workspace to build `names` and what they need:
    the pipeline file, params files, and each target's source inputs (no target writes
    them), code files and recorded discovered inputs; paths relative to the root."""
    pipeline = graph.pipeline
    root = pipeline.root
    wanted: dict[str, None] = {pipeline.file.relative_to(root).as_posix(): None}
    wanted.update(dict.fromkeys(pipeline.params_files))
    manifests = store.load_manifests()
    fp = Fingerprinter(root, store.load_stats())
    parsed = {raw: Parsed.from_json(data) for raw, data in store.load_parsed().items()}
    scanner = CodeScanner(fp, {raw: p for raw, p in parsed.items() if p is not None})
    for name in graph.select(names):
        target = graph.targets[name]
        before = manifests.get(name)
        recorded = Fingerprint.from_json(before.data) if before is not None else None
        wanted.update(dict.fromkeys(expand_inputs(target, str(root))))
        try:
            code = scanner.fingerprint(target, recorded.imported if recorded else ())
            wanted.update(dict.fromkeys(code.files))
        except CodeError:
            pass  # the sandbox's own build says what is wrong with it
        if recorded is not None:
            wanted.update(dict.fromkeys(recorded.discovered))
    return [rel for rel in wanted if not _produced(graph, rel)]


def _produced(graph: Graph, rel: str) -> bool:
    """Whether some target writes `rel` or a directory around it."""
    parts = rel.split("/")
    return any("/".join(parts[:n]) in graph.producers for n in range(1, len(parts) + 1))


def make_sandbox(root: Path, files: Iterable[str]) -> Path:
    """A new directory outside the project holding copies of `files` (relative to
    `root`) under `project/`, with `.mlbuild/cache` leading to the workspace's cache."""
    base = Path(tempfile.gettempdir()).resolve()
    if base == root or root in base.parents:  # a TMPDIR inside the project: its state dir
        base = state_dir(root) / "sandboxes"
        base.mkdir(parents=True, exist_ok=True)
    top = Path(tempfile.mkdtemp(prefix=SANDBOX_PREFIX, dir=base))
    project = top / "project"
    for rel in files:
        _copy_in(root / rel, project / rel)
    state = project / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    shared = cache_dir(root)
    shared.mkdir(parents=True, exist_ok=True)
    os.symlink(shared, state / "cache")
    return top


def localize(pipeline: Pipeline, top: Path) -> None:
    """Settings of the sandbox's pipeline file that must not be taken as written there:
    no keep-warm process (it would outlive the sandbox), and a remote cache given as
    a relative path made absolute (it names the workspace's neighbour, not the
    sandbox's). Neither enters a cache key."""
    if pipeline.workers.keep_warm is None and (
        pipeline.cache.remote is None or "://" in pipeline.cache.remote
    ):
        return
    import tomlkit

    file = top / "project" / pipeline.file.relative_to(pipeline.root)
    doc = tomlkit.parse(file.read_text(encoding="utf-8"))
    doc.pop("workers", None)
    cache = doc.get("cache")
    if pipeline.cache.remote is not None and "://" not in pipeline.cache.remote and cache:
        cache["remote"] = pipeline.cache.remote  # the loader made it absolute
    file.write_text(tomlkit.dumps(doc), encoding="utf-8")


def _copy_in(src: Path, dest: Path) -> None:
    """Copy a file or tree; a symlink stays a symlink only when relative (an absolute
    one could lead a step back into the workspace): otherwise what it points to."""
    if not os.path.lexists(src):
        return  # the sandbox build reports the missing source as the workspace would
    dest.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(dest):
        return  # inside a directory copied already
    if src.is_symlink() and not os.path.isabs(os.readlink(src)):
        os.symlink(os.readlink(src), dest)
    elif src.is_dir():
        shutil.copytree(src, dest, symlinks=True, copy_function=shutil.copy)
    else:
        shutil.copy(src, dest)


def remove_sandbox(top: Path) -> None:
    """Remove a sandbox; its `.mlbuild/cache` link is unlinked, never followed."""

    def writable(func: Callable[..., Any], path: str, exc: object) -> None:
        os.chmod(os.path.dirname(path), 0o700)  # a step left a read-only directory
        func(path)

    shutil.rmtree(top, onerror=writable)


# --- one point ------------------------------------------------------------------------


def start_point(
    graph: Graph, top: Path, point: Point, names: Sequence[str], options: SweepOptions
) -> int:
    """Fork a process building `point` in the sandbox `top`; its pid.

    A fork, not a new interpreter: the point's build starts with mlbuild already
    imported (a new `python -m mlbuild` costs a start-up and every import per
    point). The child runs `mlbuild run` in the sandbox, output to `point.log`,
    in a session of its own: Ctrl-C reaches the sweeping process alone, which
    stops each point so that it ends its steps. It never touches the parent's
    open state (the workspace's database and lock): it opens the sandbox's.
    """
    project = top / "project"
    argv = ["run", "-f", str(project / graph.pipeline.file.relative_to(graph.pipeline.root))]
    argv += ["--plain", "-j", "1", *(["-k"] if options.keep_going else [])]
    main = options.main
    for name, text in point.values:
        argv += ["--set", f"{name}={text}"]
    argv += names
    log = os.open(top / "point.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(log)
        return pid
    code = 1
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.chdir(project)
        sys.stdout = open(1, "w", encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
        code = main(argv)
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # whatever happens, the child must not return into the sweep
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(code)


def wait_any(pids: Iterable[int]) -> tuple[int, int]:
    """Wait until one of `pids` (children of this process) ends: its pid and exit code."""
    pids = list(pids)
    fds = {}
    try:
        for pid in pids:
            with contextlib.suppress(OSError):  # no pidfds: polled below
                fds[os.pidfd_open(pid)] = pid
        while True:
            for pid in pids:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    return pid, os.waitstatus_to_exitcode(status)
            if len(fds) == len(pids):
                select.select(list(fds), [], [])
            else:
                time.sleep(0.01)
    finally:
        for fd in fds:
            os.close(fd)


def _read_back(root: Path, top: Path, point: Point, code: int, seconds: float) -> PointResult:
    """The point's outcome, row and metrics from its sandbox's state.db; the logs of
    failed targets are kept in the workspace's `.mlbuild/sweeps/`."""
    project = top / "project"
    outcomes: dict[str, str] = {}
    row: StoredExperiment | None = None
    metrics: list[tuple[str, str, str]] = []
    store = open_existing_store(state_dir(project), lambda line: None)
    if store is not None:
        with store:
            runs = store.load_runs(1)
            if runs:
                outcomes = {r.target: r.status for r in runs[0].targets}
            rows = store.load_experiments()
            if code == 0 and rows:
                row = max(rows, key=lambda r: r.built)
            known = store.load_metrics()
            if row is not None:
                for target, (key, _) in json.loads(row.targets).items():
                    if key in known:
                        metrics.append((key, target, known[key]))
    if code == 0:
        status = PointStatus.OK
    elif code == 130:
        status = PointStatus.INTERRUPTED
    else:
        status = PointStatus.FAILED
    logs: dict[str, Path] = {}
    if status is not PointStatus.OK:
        kept = state_dir(root) / "sweeps" / f"point-{point.number + 1}"
        kept.mkdir(parents=True, exist_ok=True)
        shutil.copy(top / "point.log", kept / "mlbuild.log")
        logs[""] = kept / "mlbuild.log"
        for target, outcome in outcomes.items():
            step_log = project / STATE_DIR / "logs" / f"{short_name(target)}.log"
            if outcome == "failed" and step_log.exists():
                logs[target] = kept / f"{short_name(target)}.log"
                shutil.copy(step_log, logs[target])
    return PointResult(point, status, outcomes, row, tuple(metrics), logs, seconds)


# --- the sweep ------------------------------------------------------------------------


class Sweep(NamedTuple):
    """A checked sweep, ready to run: the grid and the targets each point builds."""

    axes: tuple[Axis, ...]
    points: tuple[Point, ...]
    names: tuple[str, ...]


def plan_sweep(graph: Graph, options: SweepOptions) -> Sweep:
    """Check everything the user gave before anything is made (exit 2 on a mistake)."""
    if options.jobs < 1:
        raise UsageError(f"-j {options.jobs}: needs at least 1")
    if not options.sweeps:
        raise UsageError("exp run: give at least one --sweep NAME=A,B")
    axes = parse_axes(graph.pipeline, options.sweeps)
    names = affected(graph, axes, options.targets)
    return Sweep(tuple(axes), tuple(grid(axes)), names)


def run_sweep(
    graph: Graph,
    store: Store,
    sweep: Sweep,
    options: SweepOptions,
    tell: Callable[[str], None],
) -> list[PointResult]:
    """Build every point, `options.jobs` at once; record each finished point's row and
    metrics in the workspace's `store` as it comes in. Without `keep_going`, a failed
    point stops points from starting; Ctrl-C stops all of them."""
    files = sandbox_files(graph, store, sweep.names)
    root = graph.pipeline.root
    total = len(sweep.points)
    waiting = list(sweep.points)
    running: dict[int, tuple[Point, Path, float]] = {}  # pid -> point, sandbox, start
    results: list[PointResult] = []
    stopped = False
    try:
        while waiting or running:
            while waiting and not stopped and len(running) < options.jobs:
                point = waiting.pop(0)
                top = make_sandbox(root, files)
                try:
                    localize(graph.pipeline, top)
                    pid = start_point(graph, top, point, sweep.names, options)
                except BaseException:
                    remove_sandbox(top)
                    raise
                running[pid] = (point, top, time.monotonic())
            if not running:
                break
            pid, code = wait_any(running)
            point, top, start = running.pop(pid)
            try:
                result = _read_back(root, top, point, code, time.monotonic() - start)
            finally:
                remove_sandbox(top)
            results.append(result)
            _record(store, result)
            tell(describe(result, total))
            if result.status is not PointStatus.OK and not options.keep_going:
                stopped = True
    except BaseException:
        _stop(running)
        raise
    for point in waiting:
        result = PointResult(point, PointStatus.NOT_STARTED, {}, None, (), {}, 0.0)
        results.append(result)
        tell(describe(result, total))
    return sorted(results, key=lambda r: r.point.number)


def _stop(running: Mapping[int, tuple[Point, Path, float]]) -> None:
    """Ctrl-C: stop every running point (each stops its steps), wait, remove sandboxes."""
    for pid in running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
    for pid, (_, top, _) in running.items():
        while True:
            try:
                os.waitpid(pid, 0)
                break
            except ChildProcessError:
                break
            except KeyboardInterrupt:  # a second Ctrl-C: they are stopping already
                continue
        remove_sandbox(top)


def sweep_command(graph: Graph, options: SweepOptions) -> int:
    """`mlbuild exp run --sweep ...`: check, then build every point under the workspace
    lock; exit 0 when every point was built, 1 otherwise."""
    from mlbuild.build.lock import hold_workspace

    sweep = plan_sweep(graph, options)
    root = graph.pipeline.root

    def warn(line: str) -> None:
        print(f"mlbuild: warning: {line}", file=sys.stderr, flush=True)

    def tell(line: str) -> None:
        print(f"mlbuild: {line}", flush=True)

    names = ", ".join(sweep.names)
    count = len(sweep.points)
    at_once = min(options.jobs, count)
    tell(f"sweep: {_points(count)} of {names}, {at_once} at once, in sandboxes")
    with hold_workspace(root, options.command_line, wait=True, warn=warn) as store:
        results = run_sweep(graph, store, sweep, options, tell)
    tell(summary(results))
    return 0 if all(r.status is PointStatus.OK for r in results) else 1


def _record(store: Store, result: PointResult) -> None:
    if result.metrics:
        store.save_metrics(result.metrics)
    if result.row is not None:
        store.save_experiment(result.row._replace(name=None))


def describe(result: PointResult, total: int) -> str:
    """One line per point: its values, outcome, row and what its targets did."""
    counts: dict[str, int] = {}
    for outcome in result.outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    did = ", ".join(f"{n} {what}" for what, n in counts.items())
    head = f"sweep [{result.point.number + 1}/{total}] {result.point.label}:"
    if result.status is PointStatus.NOT_STARTED:
        return f"{head} not started"
    if result.status is PointStatus.OK:
        row = result.row.id[:7] if result.row is not None else "none"
        return f"{head} row {row} ({did}) in {result.seconds:.1f}s"
    lines = [f"{head} {result.status.value} ({did})"]
    for target, log in result.logs.items():
        if target:
            lines.append(f"  target `{target}` failed; its log: {_shown(log)}")
            tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL:]
            lines.extend(f"    {line}" for line in tail)
    if "" in result.logs:
        lines.append(f"  the point's build log: {_shown(result.logs[''])}")
    return "\n".join(lines)


def _shown(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


def summary(results: Sequence[PointResult]) -> str:
    """The last line: how many points, rows, and how many steps ran among them."""
    by: dict[PointStatus, int] = {}
    steps: dict[str, int] = {}
    for r in results:
        by[r.status] = by.get(r.status, 0) + 1
        for outcome in r.outcomes.values():
            steps[outcome] = steps.get(outcome, 0) + 1
    parts = [f"{n} {status.value}" for status, n in by.items()]
    did = ", ".join(f"{n} {what}" for what, n in steps.items()) or "nothing built"
    return f"sweep: {_points(len(results))}: {', '.join(parts)}; targets: {did}"


def _points(n: int) -> str:
    return f"{n} point{'' if n == 1 else 's'}"
