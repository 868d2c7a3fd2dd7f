"""Watch mode: filesystem events -> debounced sets of changed paths -> the ordinary runner.

Nothing here decides staleness. A change only chooses which targets the
runner looks at; the content check decides what runs, so a `touch`, or a save
or atomic rename that leaves the bytes equal, runs nothing.

Two threads: watchdog's observer thread only drops irrelevant paths (outputs,
`.mlbuild/`, editor temp files) and hands the rest to a `Debouncer`; the
thread that calls `Watcher.run` does everything else (reload, code scan, watch
bookkeeping, builds). Changes that arrive while a build runs wait in the
debouncer and become the next cycle.

Which targets a changed path affects comes from an index (`Readers`) built
once per pipeline and code scan: a dictionary probe per ancestor of the path,
and a match per glob input, never a scan of every target per path. The
code files and the directories to watch are worked out again only when a
batch may change them (`Planner`): an edited data file costs a stat per
changed path, not a pass over every target.

Each cycle's build holds the workspace lock (`lock.hold_workspace`, as `mlbuild
run` takes it) from before the runner reads the state until it has written
it, so another `mlbuild run` (or any command that takes the lock) waits for
the cycle, or with `--no-wait` fails at once, and a cycle waits for them.
The lock is released between cycles, while watch only waits for events.

A step that writes into one of its own source inputs would retrigger itself
forever: its write is an event in a watched input, and the runner records the
input digests taken before the step, so the target is stale again. The rule
(`OwnWrites`): the source inputs of every step are digested when the runner
reports its start and again when it reports its end. If they differ, the
step's inputs changed while it ran, and the digests at its end are kept. A
later change to a path inside such an input is that step's own write exactly
when the input's digests still equal those at the step's end (so events that
arrive late, or in several batches, are attributed all the same; any edit
after the step's end makes the digests differ). Digests, not event times: a
change made while the step ran cannot be told from the step's own write by
its event, so the first time, watch says so and runs the target again, in
case it was an edit. When its inputs changed during SELF_WRITE_RUNS runs in a
row and a cycle's only reason to check it is such changes, the target is left
out of the cycle with one warning naming it and the paths it wrote. An edit
made while it is not running still reruns it (and, if that run writes into
its input again, the warning repeats). What this cannot see: an edit made
while a known self-writing step runs is taken for its own write (the target
stays stale, and `mlbuild run` or the next edit rebuilds it).

Stopping: Ctrl-C, SIGTERM and SIGHUP (the terminal closed) all end watch
mode the same way. Each raises KeyboardInterrupt in the main thread, so the
build under way stops its steps' process groups and records nothing for them,
and `run` returns 0. A step whose terminal went away never writes its outputs
after mlbuild is gone.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import posixpath
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NamedTuple, TextIO

from watchdog import events as ev
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.polling import PollingObserver

from mlbuild.build.lock import hold_workspace
from mlbuild.build.results import BuildOptions, BuildResult, CliReporter, Failure, Outcome, Reporter
from mlbuild.build.runner import run_build
from mlbuild.code import SCRIPT_SUFFIXES, CodeError, CodeScanner, Parsed
from mlbuild.errors import Interrupted, MlbuildError
from mlbuild.fingerprint import Digest, Fingerprinter, expand_port
from mlbuild.graph import Graph, ancestors, build_graph, glob_base
from mlbuild.pipeline.load import load_pipeline
from mlbuild.pipeline.schema import STATE_DIR, Pipeline, Port
from mlbuild.staleness import Decision
from mlbuild.store import Store
from mlbuild.ui import messages

if TYPE_CHECKING:
    from mlbuild.exec.warm import WarmPool

DEFAULT_DEBOUNCE = 0.15  # seconds of quiet after the last event before a cycle starts
DEFAULT_POLL_INTERVAL = 1.0  # seconds between directory scans when polling
# Runs in a row that changed a step's own input after which watch stops rerunning it
# for such changes: one could be an edit made while the step ran, two in a row are its own.
SELF_WRITE_RUNS = 2

# Only events that can change content. Opening or reading a file (the build
# itself reads its inputs) must never start a cycle; with this filter inotify
# is not even asked for IN_OPEN or IN_ACCESS.
_EVENT_TYPES: list[type[ev.FileSystemEvent]] = [
    *(ev.FileCreatedEvent, ev.FileModifiedEvent, ev.FileClosedEvent, ev.FileDeletedEvent),
    *(ev.FileMovedEvent, ev.DirCreatedEvent, ev.DirDeletedEvent, ev.DirMovedEvent),
]
_IGNORED_DIRS = {"__pycache__", ".git", ".hg", ".svn", ".ipynb_checkpoints", ".mypy_cache"}
_IGNORED_NAMES = {"4913", ".DS_Store"}  # 4913: the file vim probes a directory with
_IGNORED_PREFIXES = (".#", ".goutputstream-", ".~lock.")
_IGNORED_SUFFIXES = (
    *(".swp", ".swo", ".swx", ".swpx", "~", ".tmp", ".temp", ".part", ".crdownload"),
    *(".pyc", ".pyo", "___jb_tmp___", "___jb_old___"),
)
_LIMIT_ERRNOS = (errno.ENOSPC, errno.EMFILE)  # inotify watch / instance limit


def is_ignored(rel: str) -> bool:
    """Editor swap, backup and temp files, bytecode and VCS folders: never a reason to build."""
    parts = rel.split("/")
    name = parts[-1]
    if any(part in _IGNORED_DIRS for part in parts) or name in _IGNORED_NAMES:
        return True
    if name.startswith("#") and name.endswith("#"):  # emacs auto-save
        return True
    return name.startswith(_IGNORED_PREFIXES) or name.endswith(_IGNORED_SUFFIXES)


@dataclass(frozen=True)
class WatchOptions:
    """How to watch: the quiet period, polling instead of inotify, verbosity (-1 quiet)."""

    debounce: float = DEFAULT_DEBOUNCE
    poll: bool = False
    poll_interval: float = DEFAULT_POLL_INTERVAL
    verbosity: int = 0


@dataclass(frozen=True)
class Batch:
    """Coalesced changes: each path once, and when the newest event of them came."""

    paths: frozenset[str]
    last_event: float


class Debouncer:
    """Collects changed paths until `quiet` seconds pass without a new one.

    A pure trailing debounce with no maximum wait: a file that is still being
    written (a download, a long export) keeps postponing the cycle, so a step
    never starts on half-written data because the writer is slow. The clock is
    injectable so that the timing can be tested without sleeping.
    """

    def __init__(self, quiet: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.quiet = quiet
        self.clock = clock
        self._cond = threading.Condition()
        self._paths: set[str] = set()
        self._last = 0.0
        self._closed = False

    def add(self, paths: Iterable[str]) -> None:
        """Record changed paths (called from the observer thread)."""
        with self._cond:
            was_empty = not self._paths
            self._paths.update(paths)
            if self._paths:
                self._last = self.clock()
                if was_empty:  # a waiter with a deadline recomputes it when it wakes
                    self._cond.notify_all()

    def due_in(self) -> float | None:
        """Seconds until the pending paths form a batch (<= 0: now); None when none pend."""
        with self._cond:
            return self._last + self.quiet - self.clock() if self._paths else None

    def take(self) -> Batch:
        """The pending paths as one batch, emptying the collection."""
        with self._cond:
            batch = Batch(frozenset(self._paths), self._last)
            self._paths.clear()
            return batch

    def wait(self) -> Batch | None:
        """Block until a batch is due, or return None once `close` was called."""
        with self._cond:
            while not self._closed:
                delay = self.due_in()
                if delay is not None and delay <= 0:
                    return self.take()
                self._cond.wait(delay)
            return None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


@dataclass(frozen=True)
class Scope:
    """What the observer thread needs to drop paths; replaced whole when the pipeline changes."""

    outputs: frozenset[str]  # declared outputs: they and everything inside them are dropped
    output_dirs: frozenset[str]  # directories holding outputs and no source: their own events
    known: frozenset[str]  # declared inputs and code files: never mistaken for temp files

    def keeps(self, rel: str) -> bool:
        """False for paths no build should ever follow: state, outputs, temp files."""
        if rel == STATE_DIR or rel.startswith(STATE_DIR + "/") or rel in self.output_dirs:
            return False
        if rel in self.outputs or any(a in self.outputs for a in ancestors(rel)):
            return False
        return rel in self.known or not is_ignored(rel)


def scope_of(graph: Graph, code: Mapping[str, frozenset[str]]) -> Scope:
    sources = [(base, port) for name in graph.targets for base, port in _sources(graph, name)]
    known = {port.path for _, port in sources if not port.is_glob}.union(*code.values())
    known.update(graph.pipeline.params_files)  # their edits reload the pipeline
    inside = known | {base + "/*" for base, port in sources if port.is_glob}
    output_dirs = set(graph.below).difference(a for path in inside for a in ancestors(path))
    return Scope(frozenset(graph.producers), frozenset(output_dirs), frozenset(known))


def _sources(graph: Graph, name: str) -> Iterator[tuple[str, Port]]:
    """(static base, port) of a target's inputs that no target writes."""
    for port in graph.targets[name].inputs:
        base = glob_base(port.path) if port.is_glob else port.path
        if not any(p in graph.producers for p in (base, *ancestors(base))):
            yield base, port


class Plan(NamedTuple):
    """The watches a selection needs, and the paths found to be directories on the way.

    The watches depend on the filesystem only through whether those paths are
    directories, so a batch that made none of them a directory, or stopped one
    being one, leaves the plan as it is (`Watcher._refresh` keeps it).
    """

    watches: dict[str, bool]
    dirs: frozenset[str]


def plan_watches(
    graph: Graph, selected: Iterable[str], code: Mapping[str, frozenset[str]]
) -> dict[str, bool]:
    """Directories to watch ("" is the root) -> recursive, for the selection's sources and code."""
    return make_plan(graph, selected, code).watches


def make_plan(graph: Graph, selected: Iterable[str], code: Mapping[str, frozenset[str]]) -> Plan:
    """Directories to watch ("" is the root) -> recursive, for the selection's sources and code.

    A file is watched through its directory (so an atomic rename over it is
    seen), a directory input recursively and through its parent, a glob
    through its static base. Inputs that are some target's output are never
    watched. A directory that does not exist yet is stood in for by its
    nearest existing ancestor, so that its creation is seen.
    """
    root = str(graph.pipeline.root)
    wanted: dict[str, bool] = {"": False}  # the pipeline file's directory

    is_dir: dict[str, bool] = {}  # one stat per directory, however many inputs it holds

    def exists(rel: str) -> bool:
        known = is_dir.get(rel)
        if known is None:
            known = is_dir[rel] = os.path.isdir(os.path.join(root, rel))
        return known

    def add(rel: str, recursive: bool) -> None:
        while rel and not exists(rel):
            rel, recursive = posixpath.dirname(rel), False
        wanted[rel] = wanted.get(rel, False) or recursive

    for name in selected:
        for base, port in _sources(graph, name):
            if port.is_glob:
                rest = port.path[len(base) :].lstrip("/")
                add(base, "**" in rest or "/" in rest)
            elif exists(port.path):
                add(port.path, True)
            add(posixpath.dirname(port.path), False)
        for file in code.get(name, ()):
            add(posixpath.dirname(file), False)
    for file in graph.pipeline.params_files:
        add(posixpath.dirname(file), False)
    # A directory below a recursive watch is covered by it (looked up through its
    # ancestors: linear in the directories, not directories times recursive ones).
    tops = {d for d, recursive in wanted.items() if recursive}
    watches = {
        d: r
        for d, r in wanted.items()
        if not (d and ("" in tops or any(a in tops for a in ancestors(d))))
    }
    return Plan(watches, frozenset(rel for rel, found in is_dir.items() if found))


class Planner:
    """The watch plan and the reverse dependencies, kept until a batch may change them.

    Planning looks at every selected target (and stats each input), which at
    ten thousand targets took longer than the debounce; a cycle for an edited
    data file needs none of it again. The plan is made anew when the graph or
    the code files changed, or when a path of the batch is a directory now or
    was one when the plan was made (the only way the filesystem enters it).
    The code files are scanned anew unless every path of the batch is a
    regular file that is not a script or module by its suffix (the only files
    a scan can newly find: SCRIPT_SUFFIXES), not a code file, and not above one.
    """

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self._for: tuple[Graph, Mapping[str, frozenset[str]]] | None = None
        self._plan = Plan({}, frozenset())
        self._code_paths: frozenset[str] = frozenset()  # code files and the directories above
        self._users_of: tuple[Graph, dict[str, list[str]]] | None = None  # Graph.users()

    def may_change_code(self, paths: set[str] | None) -> bool:
        """Whether a batch (None: unknown changes) may change some target's code files."""
        if paths is None:
            return True
        return any(
            path.endswith(SCRIPT_SUFFIXES)
            or path in self._code_paths
            or not stat.S_ISREG(_mode(self.root, path))
            for path in paths
        )

    def watches(
        self,
        graph: Graph,
        selected: Sequence[str],
        code: Mapping[str, frozenset[str]],
        paths: set[str] | None,
    ) -> dict[str, bool]:
        """The directories to watch after a batch (None: unknown changes)."""
        same = self._for is not None and self._for[0] is graph and self._for[1] is code
        if not same:
            self._code_paths = frozenset(
                a for files in code.values() for f in files for a in (f, *ancestors(f))
            )
        if (
            not same
            or paths is None
            or any(
                path in self._plan.dirs or stat.S_ISDIR(_mode(self.root, path)) for path in paths
            )
        ):
            self._plan = make_plan(graph, selected, code)
            self._for = (graph, code)
        return self._plan.watches

    def downstream(self, graph: Graph, names: Iterable[str]) -> set[str]:
        """`graph.downstream`, with its reverse index built once per graph, not per cycle."""
        if self._users_of is None or self._users_of[0] is not graph:
            self._users_of = (graph, graph.users())
        return graph.downstream(names, self._users_of[1])


def _mode(root: str, rel: str) -> int:
    """The file type bits of a project path, following links as `os.path.isdir` does; 0 if gone."""
    try:
        return os.stat(os.path.join(root, rel)).st_mode
    except (OSError, ValueError):
        return 0


class Readers:
    """Which selected targets read a changed path: an index, built once per pipeline and code.

    A target reads a path when the graph would say so (the path is one of its
    inputs or inside one, or matches one of its globs), when it is one of its
    code files, or when the path is a directory above one of its code files or
    source inputs (created, deleted or moved as a whole). Only sources count
    there: the runner creating `build/` for an output is no change.

    A lookup costs a dictionary probe per ancestor of the path plus one match
    per glob input, whatever the number of targets: a checkout touching a
    thousand files in a pipeline of a thousand targets used to cost a million
    comparisons per cycle.
    """

    def __init__(
        self, graph: Graph, selected: Iterable[str], code: Mapping[str, frozenset[str]]
    ) -> None:
        self.graph = graph
        self.inputs: dict[str, set[str]] = {}  # input path -> targets reading it, or inside it
        self.globs: list[tuple[str, str, str]] = []  # (pattern, static base, target)
        self.around: dict[str, set[str]] = {}  # code file, or directory above code or a source
        for name in selected:
            for port in graph.targets[name].inputs:
                if port.is_glob:
                    self.globs.append((port.path, glob_base(port.path), name))
                else:
                    self.inputs.setdefault(port.path, set()).add(name)
            files = code.get(name, frozenset())
            bases = [base for base, _ in _sources(graph, name)]
            for path in (*files, *(a for f in (*files, *bases) for a in ancestors(f))):
                self.around.setdefault(path, set()).add(name)

    def affected(self, paths: Iterable[str]) -> dict[str, set[str]]:
        """Changed path -> the selected targets reading it (paths reading nothing left out)."""
        hits: dict[str, set[str]] = {}
        for path in paths:
            found = set(self.around.get(path, ()))
            for key in (path, *ancestors(path)):
                found.update(self.inputs.get(key, ()))
            for pattern, base, name in self.globs:
                if name not in found and (
                    fnmatch.fnmatchcase(path, pattern) or (base and path.startswith(base + "/"))
                ):
                    found.add(name)
            if found:
                hits[path] = found
        return hits


Observed = tuple[tuple[str, Digest], ...]  # one input's paths (a glob's matches), digested


class Wrote(NamedTuple):
    """A target whose step changed its own source inputs while it ran, in `runs` runs in a row."""

    runs: int
    end: Mapping[str, tuple[str, ...]]  # each input it changed -> its digests at the step's end
    paths: tuple[str, ...]  # what changed in them during the last run


def _inside(path: str, port: Port) -> bool:
    """Whether a changed path belongs to a source input (a glob: to its static base)."""
    base = glob_base(port.path) if port.is_glob else port.path
    return not base or path == base or path.startswith(base + "/")


def _summary(observed: Observed) -> tuple[str, ...]:
    """What equality needs of an input: a directory's digest covers everything in it."""
    return tuple(f"{path} {digest.text}" for path, digest in observed)


def _files(observed: Observed) -> dict[str, str]:
    """Path -> `kind:digest` of every file of an input, to name what changed."""
    files: dict[str, str] = {}
    for path, digest in observed:
        files[path] = digest.text
        for rel, value in digest.listing:
            files[f"{path}/{rel}"] = value
    return files


class OwnWrites:
    """Tells a step's writes into its own inputs apart from edits (see the module docstring).

    Inputs are digested through the watcher's stat cache: a file unchanged
    since it was last digested costs a stat, so the digests at a step's start
    and end cost a walk of its source inputs and the hashing of what changed.
    Only while the step runs are the listings kept; afterwards, a digest per
    input it changed.
    """

    def __init__(self, fp: Fingerprinter) -> None:
        self.fp = fp
        self.at_start: dict[str, dict[str, Observed]] = {}  # running target -> its inputs
        self.wrote: dict[str, Wrote] = {}

    def started(self, graph: Graph, name: str) -> None:
        try:
            self.at_start[name] = self.observe(graph, name)
        except OSError:  # unreadable: this step is not followed
            self.at_start.pop(name, None)

    def ended(self, graph: Graph, name: str) -> None:
        """The step of `name` exited: remember the inputs that changed while it ran."""
        before = self.at_start.pop(name, None)
        if before is None:
            return
        try:
            after = self.observe(graph, name)
        except OSError:
            return
        end = {
            key: _summary(now)
            for key, now in after.items()
            if _summary(now) != _summary(before.get(key, ()))
        }
        if not end:
            self.wrote.pop(name, None)
            return
        paths: set[str] = set()
        for key in end:
            old, new = _files(before.get(key, ())), _files(after[key])
            paths.update(p for p in old.keys() | new.keys() if old.get(p) != new.get(p))
        # A directory's own entry changes with what is inside it: name the insides.
        named = paths.difference(a for p in paths for a in ancestors(p))
        runs = self.wrote[name].runs + 1 if name in self.wrote else 1
        self.wrote[name] = Wrote(runs, end, tuple(sorted(named)))

    def judge(self, graph: Graph, name: str, paths: Iterable[str]) -> Wrote | None:
        """`name`'s record when `paths` (changed, read by it) left its inputs as its step did.

        None when a path is not in an input its step changed, or when such an
        input differs now from its state at the step's end: then something
        else changed it, and the target is checked as usual.
        """
        wrote = self.wrote.get(name)
        if wrote is None:
            return None
        ports = {port.path: port for _, port in _sources(graph, name) if port.path in wrote.end}
        touched: set[str] = set()
        for path in paths:
            inside = [key for key, port in ports.items() if _inside(path, port)]
            if not inside:
                return None
            touched.update(inside)
        try:
            same = all(_summary(self.digest(graph, ports[k])) == wrote.end[k] for k in touched)
        except OSError:
            return None
        return wrote if same else None

    def observe(self, graph: Graph, name: str) -> dict[str, Observed]:
        return {port.path: self.digest(graph, port) for _, port in _sources(graph, name)}

    def digest(self, graph: Graph, port: Port) -> Observed:
        paths = expand_port(port, str(graph.pipeline.root)) if port.is_glob else [port.path]
        return tuple((path, self.fp.digest(path)) for path in paths)


class _Attributing:
    """The reporter of a watch build: tells `OwnWrites` when each step starts and ends.

    The input states are taken just before the step is spawned (`starting`) and as its
    process has exited (`ending`), as close to its start and exit as a reporter can be.
    """

    def __init__(self, inner: Reporter, graph: Graph, own: OwnWrites, stopped: list[str]) -> None:
        self.inner, self.graph, self.own, self.stopped = inner, graph, own, stopped

    def skipped(self, target: str, decision: Decision) -> None:
        self.inner.skipped(target, decision)

    def starting(self, target: str) -> None:
        """Just before the step is spawned: a step started as the last one ended is told
        after that one's end line (runner `_complete`), when it may have written already."""
        self.own.started(self.graph, target)

    def started(self, target: str, decision: Decision, command: str) -> None:
        self.inner.started(target, decision, command)

    def output(self, target: str, data: bytes) -> None:
        self.inner.output(target, data)

    def ending(self, target: str) -> None:
        """Its process exited, before another step starts in its slot (runner `_complete`):
        taken at its end line, that step's writes could pass for its own."""
        self.own.ended(self.graph, target)

    def finished(self, target: str, duration: float) -> None:
        self.inner.finished(target, duration)

    def restored(
        self, target: str, duration: float, original_run: float, *, source: str = "cache"
    ) -> None:
        self.inner.restored(target, duration, original_run, source=source)

    def failed(self, failure: Failure, duration: float) -> None:
        self.inner.failed(failure, duration)

    def not_run(self, target: str, because: str) -> None:
        self.inner.not_run(target, because)

    def interrupted(self, target: str, duration: float) -> None:
        self.stopped.append(target)  # named when watch stops
        self.inner.interrupted(target, duration)

    def would_run(self, target: str, reasons: Sequence[str]) -> None:
        self.inner.would_run(target, reasons)

    def warn(self, message: str) -> None:
        self.inner.warn(message)

    def summary(self, result: BuildResult) -> None:
        self.inner.summary(result)


class _Events(ev.FileSystemEventHandler):
    """Forwards the paths of every event (both ends of a move) to a callback."""

    def __init__(self, sink: Callable[[list[str]], None]) -> None:
        self.sink = sink

    def on_any_event(self, event: ev.FileSystemEvent) -> None:
        paths = [os.fsdecode(event.src_path)]
        if event.dest_path:
            paths.append(os.fsdecode(event.dest_path))
        self.sink(paths)


class Watcher:
    """An initial build, then one build per debounced batch of changes, until stopped.

    Each cycle builds the targets the changed paths affect plus everything
    downstream of them (run_build adds what they need). That is exact: a
    target's fingerprint changes only through its inputs and code (watched
    here), its upstream outputs (covered by the downstream closure) or its
    pipeline entry (a reload checks the whole selection). Checking the whole
    selection every time would give the same results but print a line for
    every fresh target and cost a full check per save in a large pipeline.
    Builds always keep going past a failure, so what a failure leaves stale is
    exactly the failed targets and their downstream, which the save that fixes
    them brings back; a build that stops on an error (a vanished input, a
    syntax error) hands its targets on to the next cycle.
    """

    def __init__(
        self,
        file: Path,
        reporter: CliReporter,
        out: TextIO,
        err: TextIO,
        *,
        targets: Sequence[str] = (),
        overrides: Mapping[str, Any] | None = None,
        options: WatchOptions | None = None,
        build: BuildOptions | None = None,
    ) -> None:
        self.file = file.resolve()
        self.reporter, self.out, self.err = reporter, out, err
        self.targets = tuple(targets)
        self.overrides = dict(overrides or {})
        self.options = options or WatchOptions()
        self.build_options = build or BuildOptions(command_line="watch")
        self.debouncer = Debouncer(self.options.debounce)
        self.graph, self.selection = self._load()  # MlbuildError here: nothing to fall back on
        self.pipeline_text = self._pipeline_bytes()
        self.code: dict[str, frozenset[str]] = {}
        self.scope = scope_of(self.graph, self.code)
        self.readers = Readers(self.graph, self.selection, self.code)
        self.planner = Planner(self.graph.pipeline.root)
        self.carry: set[str] = set()  # targets of a build that stopped on an error
        # Stat cache of code files and source inputs; filled from the state at the first build.
        self._fp = Fingerprinter(self.graph.pipeline.root, {})
        self._seeded = False
        self.own = OwnWrites(self._fp)
        self._parsed: dict[str, Parsed] = {}
        self._observer: BaseObserver | None = None
        self._watches: dict[tuple[str, bool], tuple[ObservedWatch, int]] = {}
        self._handler = _Events(self._on_paths)
        self._warm: WarmPool | None = None  # while `run` runs
        self.interrupted: list[str] = []  # steps stopped mid-run when watch was stopped

    def run(self) -> int:
        """Watch until `stop`, Ctrl-C, SIGTERM or SIGHUP; returns 0, the usual end of watch mode."""
        restore = _stop_on_signals()
        from mlbuild.exec.warm import end_session, start_session  # kept between builds

        self._warm = start_session(self.graph.pipeline.root)
        try:
            self._use_observer(None)
            self._refresh()
            self._build(self.targets, initial=True)
            kind = type(self._observer).__name__.removesuffix("Observer").lower()
            if isinstance(self._observer, PollingObserver):
                kind = f"polling every {self.options.poll_interval:g}s"
            debounce = f"{self.options.debounce * 1000:.0f} ms debounce"
            self._say(
                f"watching {len(self._watches)} directories ({kind}, {debounce});"
                " waiting for changes."
            )
            while (batch := self.debouncer.wait()) is not None:
                self._cycle(batch)
        except (KeyboardInterrupt, Interrupted):
            # The running steps are stopped by now (the runner's own cleanup); after a
            # SIGHUP the terminal may be gone, and there is no one left to tell.
            with contextlib.suppress(OSError):
                self._say(messages.watch_stopped(self.interrupted))
        finally:
            end_session(self._warm)
            self.debouncer.close()
            if self._observer is not None:
                self._observer.stop()
                self._observer.join()
            restore()
        return 0

    def stop(self) -> None:
        """End `run` after the current cycle (from another thread)."""
        self.debouncer.close()

    def _on_paths(self, paths: list[str]) -> None:
        """Observer thread: keep the relevant project paths of one event."""
        prefix, scope = str(self.graph.pipeline.root) + os.sep, self.scope
        rels = [p[len(prefix) :].replace(os.sep, "/") for p in paths if p.startswith(prefix)]
        if kept := [rel for rel in rels if scope.keeps(rel)]:
            self.debouncer.add(kept)

    def _cycle(self, batch: Batch) -> None:
        paths = set(batch.paths)
        pipeline_rel = self.graph.pipeline.file.name
        loaded_from = {pipeline_rel, *self.graph.pipeline.params_files}
        reloaded = not paths.isdisjoint(loaded_from) and self._reload()
        self._refresh(paths)
        readers = self.readers.affected(paths)
        hits = self._not_own_writes(readers)
        if not hits and not reloaded:
            if self.options.verbosity > 0 and not readers:
                self._say(f"{_shown(paths)} changed; no selected target reads it.")
            return
        carried = self.carry.intersection(self.selection)  # a reload may have removed some
        wanted = self.planner.downstream(self.graph, set().union(*hits.values()) | carried)
        names = self.selection if reloaded else tuple(n for n in self.selection if n in wanted)
        changed = {*hits, *(paths & loaded_from if reloaded else ())}
        self._say(f"{_shown(changed)} changed; checking {', '.join(names)}.")
        result = self._build(names)
        if result is None:
            self._say("the build stopped on that error; save a fix to retry; waiting for changes.")
        else:
            after = time.monotonic() - batch.last_event
            self._say(f"{_ran(result)}; done {after:.3f}s after the change; waiting for changes.")

    def _not_own_writes(self, hits: dict[str, set[str]]) -> dict[str, set[str]]:
        """`hits` without the targets that only their own steps' writes retriggered.

        Says so for each target whose inputs changed during its last run and are
        as its step left them: once, it runs again (that change may have been an
        edit made while it ran); after SELF_WRITE_RUNS such runs in a row, it is
        left out, with a warning naming what it wrote.
        """
        paths_of: dict[str, set[str]] = {}
        for path, names in hits.items():
            for name in names:
                paths_of.setdefault(name, set()).add(path)
        left_out: set[str] = set()
        for name, paths in paths_of.items():
            wrote = self.own.judge(self.graph, name, paths)
            if wrote is None:
                continue
            inputs = ", ".join(wrote.end)
            if wrote.runs < SELF_WRITE_RUNS:
                self._say(
                    f"{_shown(wrote.paths)} changed while `{name}` ran (in its input {inputs});"
                    " running it again: if that run changes it too, that is the step's own write."
                )
                continue
            left_out.add(name)
            self.reporter.warn(
                f"not rerunning `{name}`: its step wrote {_shown(wrote.paths)}, inside its own"
                f" input {inputs}, in each of its last {wrote.runs} runs (a step should not"
                " write into its inputs); a change made while it is not running reruns it"
            )
        return {path: names - left_out for path, names in hits.items() if names - left_out}

    def _reload(self) -> bool:
        """Load the edited pipeline file; on a mistake say so and keep the last good one."""
        text = self._pipeline_bytes()
        if text == self.pipeline_text:
            return False  # saved without a change
        self.pipeline_text = text
        try:
            self.graph, self.selection = self._load()
            self.pipeline_text = self._pipeline_bytes()  # its params files may be others now
        except MlbuildError as exc:
            self._error(exc)
            self._say(
                f"keeping the last good pipeline until {self.file.name} loads again;"
                " waiting for changes."
            )
            return False
        return True

    def _pipeline_bytes(self) -> tuple[bytes | None, ...]:
        """The bytes the pipeline is loaded from: its file, then its params files."""
        root = self.graph.pipeline.root
        return (_read(self.file), *(_read(root / rel) for rel in self.graph.pipeline.params_files))

    def _load(self) -> tuple[Graph, tuple[str, ...]]:
        graph = build_graph(load_pipeline(self.file, self.overrides))
        return graph, graph.select(self.targets)

    def _refresh(self, changed: Iterable[str] | None = None) -> None:
        """Rescan the selection's code files, then bring the watches in line with them.

        This runs before each build, so a write lands either before the build
        reads the file or after the watch on its directory exists. `changed`:
        the batch's paths (None: anything may have changed). What a batch
        cannot have changed is kept (`Planner`), so an edit of one data file in
        a pipeline of ten thousand targets costs a stat, not a rescan of all.
        """
        paths = None if changed is None else set(changed)
        graph_changed = self.readers.graph is not self.graph
        if graph_changed or self.planner.may_change_code(paths):
            code = self._scan_code()
            if graph_changed or code != self.code:  # kept as the same object when equal
                self.readers = Readers(self.graph, self.selection, code)
                self.scope = scope_of(self.graph, code)
                self.code = code
        watches = self.planner.watches(self.graph, self.selection, self.code, paths)
        self._sync_watches(watches, paths or ())

    def _scan_code(self) -> dict[str, frozenset[str]]:
        """The code files of every selected target (a module's may not exist yet)."""
        scanner = CodeScanner(self._fp, self._parsed)
        code: dict[str, frozenset[str]] = {}
        for name in self.selection:
            target = self.graph.targets[name]
            files: set[str] = set()
            if target.python is not None:  # the module may not exist yet: its creation counts
                base = target.python.partition(":")[0].replace(".", "/")
                files.update((base + ".py", base + "/__init__.py"))
            try:
                files.update(scanner.fingerprint(target).files)
            except (CodeError, OSError):
                files.update(self.code.get(name, ()))  # a broken module keeps its last closure
            code[name] = frozenset(files)
        self._parsed.update(scanner.new_parsed)
        self._fp.take_updates()
        return code

    def _use_observer(self, limit: OSError | None) -> None:
        """Start inotify (or the platform's native observer), or polling when asked or forced."""
        if self._observer is not None:
            self._observer.unschedule_all()
            self._observer.stop()
            self._observer.join()
            self._watches.clear()
        if limit is not None:
            which = "max_user_watches" if limit.errno == errno.ENOSPC else "max_user_instances"
            value = (_read(Path("/proc/sys/fs/inotify", which)) or b"?").decode().strip()
            self.err.write(
                f"mlbuild watch: the inotify limit is reached (fs.inotify.{which} = {value});"
                f" polling every {self.options.poll_interval:g}s instead. To raise it:"
                f" sudo sysctl fs.inotify.{which}=524288\n"
            )
            self.err.flush()
        elif not self.options.poll:
            try:
                self._observer = Observer()
                self._observer.start()
                return
            except OSError as exc:  # EMFILE: no inotify instance left
                if exc.errno not in _LIMIT_ERRNOS:
                    raise
                return self._use_observer(exc)
        self._observer = PollingObserver(timeout=self.options.poll_interval)
        self._observer.start()

    def _sync_watches(self, plan: Mapping[str, bool], changed: Iterable[str]) -> None:
        """Schedule what the plan adds; unschedule what it drops or what was replaced.

        A watched directory that was itself created, deleted or moved (or one
        above it) is watched afresh: its old watch died with the old inode, and
        the inode number alone cannot tell, as the filesystem may reuse it.
        """
        assert self._observer is not None
        root = self.graph.pipeline.root
        for key, (watch, inode) in list(self._watches.items()):
            moved = any(key[0] == p or key[0].startswith(p + "/") for p in changed)
            if moved or plan.get(key[0]) != key[1] or _inode(root / key[0]) != inode:
                self._observer.unschedule(watch)
                del self._watches[key]
        for rel, recursive in plan.items():
            if (rel, recursive) in self._watches or (now := _inode(root / rel)) is None:
                continue
            try:
                watch = self._observer.schedule(
                    self._handler, str(root / rel), recursive=recursive, event_filter=_EVENT_TYPES
                )
            except OSError as exc:
                if exc.errno in _LIMIT_ERRNOS and not isinstance(self._observer, PollingObserver):
                    self._use_observer(exc)
                    return self._sync_watches(plan, ())
                self.reporter.warn(f"cannot watch {rel or '.'}: {exc.strerror or exc}")
                continue
            self._watches[(rel, recursive)] = (watch, now)

    def _build(self, names: Sequence[str], *, initial: bool = False) -> BuildResult | None:
        """One ordinary build; a user error is printed and the watcher goes on."""
        force = self.build_options.force if initial else None
        options = self.build_options._replace(targets=tuple(names), keep_going=True, force=force)
        try:
            with self._locked_state(self.graph.pipeline) as store:
                if not self._seeded:  # what the state knows of the inputs: stats, not hashes
                    self._fp.stats.update(store.load_stats().files)
                    self._seeded = True
                self.own.at_start.clear()
                reporter = _Attributing(self.reporter, self.graph, self.own, self.interrupted)
                result = run_build(self.graph, store, reporter, options)
                recorded = store.load_durations()
        except (MlbuildError, OSError) as exc:
            if isinstance(exc, Interrupted):
                raise
            self._error(exc)
            self.carry.update(names or self.selection)
            return None
        self.carry.clear()
        self.reporter.summary(result, recorded)
        ran = [r.name for r in result.results if r.outcome in (Outcome.RAN, Outcome.FAILED)]
        if self._warm is not None and (ran or self._warm.workers):
            from mlbuild.exec.warm import keep_for  # a warm worker for each that may rerun

            keep_for(self._warm, self.graph.targets, ran, self.build_options.jobs)
        return result

    @contextmanager
    def _locked_state(self, pipeline: Pipeline) -> Iterator[Store]:
        """The state for one cycle's build, under the workspace lock as `mlbuild run` takes it.

        The lock is held per cycle, not for the whole session, so that a `run`
        in another terminal can go between two cycles (a cycle waits for it).
        """
        with hold_workspace(
            pipeline.root, self.build_options.command_line, wait=True, warn=self.reporter.warn
        ) as store:
            yield store

    def _say(self, text: str) -> None:
        if self.options.verbosity >= 0:
            self.out.write(f"mlbuild watch: {text}\n")
            self.out.flush()

    def _error(self, exc: Exception) -> None:
        self.err.write(messages.error(str(exc)) + "\n")
        self.err.flush()


def _stop_on_signals() -> Callable[[], None]:
    """SIGTERM and SIGHUP (a closed terminal) stop watch mode as Ctrl-C does; returns the undo.

    Each raises KeyboardInterrupt in the main thread, so the build under way
    stops its steps' process groups and records nothing for them, exactly as
    for Ctrl-C. Without this, SIGHUP ended mlbuild at once and left the step
    it had started (in a session of its own) running, writing its outputs
    after mlbuild was gone. Only the main thread may set handlers; a watcher
    run from another thread (the tests) leaves them alone.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    return restore


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _shown(paths: Iterable[str], limit: int = 5) -> str:
    ordered = sorted(paths)
    more = f" (+{len(ordered) - limit} more)" if len(ordered) > limit else ""
    return ", ".join(ordered[:limit]) + more


def _ran(result: BuildResult) -> str:
    """`ran a, b; failed c`: what a cycle did, in the words of the outcomes."""
    parts = []
    for outcome in (Outcome.RAN, Outcome.RESTORED, Outcome.FAILED):
        if names := [r.name for r in result.results if r.outcome is outcome]:
            parts.append(f"{outcome.value} {', '.join(names)}")
    return "; ".join(parts) or "nothing ran"
