"""One build: select, check, decide, restore or execute, record; told to a reporter.

A target is checked only when everything it needs has finished, so a consumer
sees its producers' new outputs: if they came out byte-identical it stays
fresh (early cutoff), and the set of targets that run is exactly the set whose
fingerprints changed. Deciding, restoring and recording happen in this one
thread; only the steps themselves run concurrently (up to `-j`, in pools).

Invariants: a manifest exists only for a target whose step succeeded and
whose declared outputs all exist; it is deleted before the step starts, so a
failed or interrupted step always reruns. The manifest records the input
digests taken *before* the step started, so an input edited while the step
ran makes it stale next time. Manifests of finished targets are written in
batches (`_record_later`): one transaction per batch is what lets a first
build of ten thousand short steps keep up with them; a crash loses at most
the queued records, and those steps run again.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import stat
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mlbuild.build.results import (
    BuildOptions,
    BuildResult,
    Failure,
    Outcome,
    Reporter,
    RunStatus,
    TargetResult,
    Unbuilt,
    failure_of,
)
from mlbuild.code import CodeError, CodeScanner, Parsed, check_function, package_versions
from mlbuild.errors import FingerprintError, PipelineError, UserError
from mlbuild.fingerprint import Fingerprinter, StatEntry, expand_port
from mlbuild.graph import Graph, check_kept_sources
from mlbuild.manifest import CHANGED_DURING_STEP, Fingerprint, is_dir, is_missing, target_key
from mlbuild.pipeline.load import missing_hint
from mlbuild.pipeline.schema import ActionKind, Target
from mlbuild.scheduler import Scheduler
from mlbuild.signature import fresh_by_signature, make_signature
from mlbuild.staleness import (
    NEVER_BUILT,
    Decision,
    Observation,
    decide,
    expand_inputs,
    fresh_decision,
    observe,
    observe_paths,
)
from mlbuild.store import Record, RunRow, Store, StoredManifest
from mlbuild.workspace import (
    OutsideProject,
    cache_dir,
    forget_made,
    load_made,
    log_path,
    move_aside,
    save_made,
    writable_path,
)

if TYPE_CHECKING:
    # The executor and the cache (subprocess, shutil, tempfile with them) are
    # imported only when a target is stale: a no-op build never pays for them.
    from mlbuild.build.background import Background, Job
    from mlbuild.build.results import ProvenFiles
    from mlbuild.cache import Cache
    from mlbuild.cache.entry import Entry
    from mlbuild.exec.base import ExecResult, Executor
    from mlbuild.remote import RemoteCache


# Finished targets' manifests are written in batches of up to RECORD_BATCH, at most
# RECORD_SECONDS after the oldest finished: one transaction per batch, not per target.
RECORD_BATCH = 200
RECORD_SECONDS = 0.5
# With every job slot busy, targets are checked for at most this long between looks at
# the running steps: a short step's end is seen within about one check.
VISIT_SLICE = 0.0005

StatMap = Mapping[str, "StatEntry | None"]
_new = tuple.__new__  # a NamedTuple from its fields without its Python `__new__` (hot loops)
# Keys of `StatMap` entries that hold a symlink's own lstat rather than its target's.
LINK_PREFIX = "\0link:"


def check_sources(graph: Graph, selected: Sequence[str], fp: Fingerprinter) -> None:
    """Every input must exist or be written by some target; say which one is missing.

    `fp` takes the stats (kept for its next digest of the same paths), so a
    source is stat'ed once per build, not once here and once when visited.
    """
    root = graph.pipeline.root
    targets = graph.targets
    has_producer = graph.has_producer
    exists = fp.exists
    for name in selected:
        for port in targets[name].inputs:
            if has_producer(port):
                continue
            if port.is_glob:
                if expand_port(port, str(root)):
                    continue
                problem = "matches no file and no target writes one"
            elif exists(port.path):
                continue
            else:
                problem = "does not exist and no target writes it" + missing_hint(root, port.path)
            key = f"targets.{name}.inputs" + (f".{port.name}" if port.name else "")
            raise PipelineError(graph.pipeline.display_file, f"'{port.path}' {problem}", key)


def check_code(graph: Graph, selected: Sequence[str], scanner: CodeScanner) -> None:
    """Python targets: the module exists, parses, and its function takes the declared names."""
    for name in selected:
        target = graph.targets[name]
        if target.kind is ActionKind.PYTHON:
            try:
                check_function(scanner, target, target.call_names())
            except CodeError as exc:
                raise PipelineError(
                    graph.pipeline.display_file, str(exc), f"targets.{name}.python"
                ) from None


def clear_outputs(
    root: Path, where: str, target: Target, current: Mapping[str, str], known: Mapping[str, str]
) -> list[tuple[str, str]]:
    """Make way for a step: delete the outputs mlbuild made, move anything else aside.

    `current` maps each output path to its digest now, `known` to a digest
    mlbuild recorded for it (the target's last manifest, or the cache entry
    being restored). An output whose digest is neither (a first build over
    existing files, a hand edit, extra files in an output directory) is
    renamed into `.mlbuild/trash/`, never deleted. Returns (path, where it
    went) for each output moved aside.
    """
    moved: list[tuple[str, str]] = []
    for port in target.outputs:
        digest = current.get(port.path)
        if digest is None or is_missing(digest):
            continue  # nothing there to delete or move: no write, so no check (a first build)
        full = check_writable(root, where, target, port.path)
        if not os.path.lexists(full):
            continue
        if known.get(port.path) == digest:
            _delete(full)
        else:
            moved.append((port.path, move_aside(root, port.path)))
    return moved


def check_writable(root: Path, where: str, target: Target, rel: str) -> str:
    """`rel`'s full path if mlbuild may write it; a pipeline error naming it otherwise."""
    try:
        return writable_path(root, rel)
    except OutsideProject as exc:
        raise PipelineError(where, str(exc), f"targets.{target.name}.outputs") from None


def _delete(full: str) -> None:
    if os.path.isdir(full) and not os.path.islink(full):
        import shutil  # only when something is rebuilt; see the executor import

        shutil.rmtree(full)
    else:
        os.unlink(full)


def observe_target(
    target: Target,
    before: Fingerprint | None,
    fp: Fingerprinter,
    code: CodeScanner,
    packages: dict[str, str | None],
    where: str,
) -> Observation:
    """`target` as it stands now (code closure and tracked packages included).

    `before` (its manifest) names the files its step was seen using; `packages`
    caches the versions looked up so far in this build or query.
    """
    try:
        closure = code.fingerprint(target, before.imported if before is not None else ())
    except CodeError as exc:
        raise PipelineError(where, str(exc), f"targets.{target.name}.python") from None
    missing = [n for n in target.track if n not in packages]
    packages.update(package_versions(tuple(missing)))
    tracked = {n: packages[n] for n in target.track}
    return observe(target, fp, code=closure, packages=tracked, previous=before)


def save_checked(store: Store, fp: Fingerprinter, code: CodeScanner) -> None:
    """Keep what checking learnt (file stats, parsed code): the next check is cheaper."""
    store.save_stats(fp.take_updates())
    store.save_parsed({raw: p.to_json() for raw, p in code.new_parsed.items()})


class Build:
    """The state of one build in progress."""

    def __init__(
        self, graph: Graph, store: Store, reporter: Reporter, options: BuildOptions
    ) -> None:
        self.graph = graph
        self.store = store
        self.reporter = reporter
        self.options = options
        self.root = graph.pipeline.root
        self.where = graph.pipeline.display_file  # for messages; computed once, not per target
        self.manifests: dict[str, StoredManifest] = {}  # the selection's, read by run()
        self.fp = Fingerprinter(self.root, store.lazy_stats, reuse_walks=True)
        parsed = {raw: Parsed.from_json(data) for raw, data in store.load_parsed().items()}
        self.code = CodeScanner(self.fp, {raw: p for raw, p in parsed.items() if p is not None})
        self.packages: dict[str, str | None] = {}
        self.outcomes: dict[str, Outcome] = {}
        self.results: list[TargetResult] = []
        self.stopped = False
        self._bad_input: UserError | None = None  # found while steps ran: raised after them
        self.cache_broken = False  # set after a failed write: no more caching this run
        self._saver: Background | None = None  # background cache writes
        self._saves: deque[Job[Entry]] = deque()  # in the order the writer runs them
        self._executor: Executor | None = None
        self._cache: Cache | None = None
        self._remote: RemoteCache | None = None  # opened on the first stale target
        # Per running step: its observation before it started, why it runs, and the
        # stats its input digests were taken from.
        self._running: dict[str, tuple[Observation, Decision, StatMap]] = {}
        self._started: dict[str, float] = {}  # step -> monotonic time it started
        self._unbuilt = Unbuilt(store.last_statuses)  # why a target has no manifest
        self.made_dirs: set[Path] = set()  # output parents created in this build
        self._pending: list[Record] = []  # manifests not yet written (_record_later)
        self._pending_since = 0.0  # monotonic time the oldest of them was queued
        # Cache keys found by `_restore`, with the fingerprint they are of: a step's
        # outputs are stored under the same key while nothing moved in between.
        self._keys: dict[str, tuple[Fingerprint, str]] = {}
        self._signed: list[tuple[str, bytes]] = []  # stat signatures to write (signature.py)
        # What proved each skipped target fresh: its signature or the up-to-date stamp's
        # files (the next stamp is made of them, uptodate.py); the stamp's own proof.
        self._proven: dict[str, bytes | ProvenFiles] = {}
        proof = options.proof
        self.by_stamp = proof.fresh if proof is not None and proof.valid else {}
        # The experiment row the stamp's targets were in (uptodate.py), while it holds;
        # the targets decided without the proof, whose entries in it may differ.
        self.row = proof.row if self.by_stamp and proof is not None else None
        self._looked: list[str] = []

    def run(self) -> BuildResult:
        start = time.perf_counter()
        started_at = time.time()
        forced = self.options.force
        if forced and self.graph.pipeline.matrices:  # `--force train`: every point (watch too)
            forced = frozenset(self.graph.pipeline.expand(forced))
        selected = self.graph.select((*self.options.targets, *(forced or ())))
        by_stamp = self.by_stamp
        looked_at = [name for name in selected if name not in by_stamp] if by_stamp else selected
        # A watch cycle, or one changed input under a stamp: only the rows looked at.
        few = len(looked_at) * 2 < len(self.graph.order)
        self.manifests = (
            self.store.load_manifests_of(looked_at) if few else self.store.load_manifests()
        )
        check_sources(self.graph, looked_at, self.fp)
        # A target the stamp proves has a signature, which only shell targets naming no
        # script get (signature.py): no code of its own to check.
        check_code(self.graph, looked_at if forced is None else selected, self.code)
        if by_stamp and forced is None:  # the stamp's proven targets: never scheduled
            proven = self._skip_proven(selected)
            selected = tuple([name for name in selected if name not in proven])
        pool_of = {name: self.graph.targets[name].pool for name in selected}
        sched = Scheduler(
            selected, self.graph.deps, self.options.jobs, self.graph.pipeline.pools, pool_of
        )
        status = RunStatus.INTERRUPTED
        try:
            self._loop(sched, forced)
            failed = any(r.failure for r in self.results)
            status = RunStatus.FAILED if failed else RunStatus.OK
        finally:
            self._finish_build(started_at, status)
        self._record_experiment(status is RunStatus.OK, forced is None)
        failures = tuple(r.failure for r in self.results if r.failure is not None)
        took = time.perf_counter() - start
        return BuildResult(tuple(self.results), took, failures, self._proven, self.row)

    def _skip_proven(self, selected: Sequence[str]) -> set[str]:
        """Skip, in build order, each target the up-to-date stamp proves fresh whose
        dependencies were all skipped so: nothing it reads was made since the stamp's
        check (uptodate.py). The scheduler never sees them; a proven target below one
        decided otherwise is visited (`_visit` may still skip it by the proof).

        `_skip_by_stamp` for each, inlined, and told in one batch where the reporter
        can (`skipped_all`): at 10,000 targets the calls were a tenth of the build."""
        done: set[str] = set()
        by_stamp, deps = self.by_stamp, self.graph.deps
        proven, outcomes, results = self._proven, self.outcomes, self.results
        skipped = Outcome.SKIPPED
        names: list[str] = []
        decisions: list[Decision] = []
        collecting = gc.isenabled()
        gc.disable()  # results by the ten thousand, no cycles, kept to the end: not scanned
        try:
            for name in selected:
                stamped = by_stamp.get(name)
                if stamped is None:
                    continue
                needs = deps[name]
                if not needs or done.issuperset(needs):
                    done.add(name)
                    proven[name] = stamped
                    outcomes[name] = skipped
                    results.append(_new(TargetResult, (name, skipped, (), 0.0, None)))
                    names.append(name)
                    decisions.append(fresh_decision(stamped[0]))
            gc.freeze()
        finally:
            if collecting:
                gc.enable()
        tell_all = getattr(self.reporter, "skipped_all", None)
        if tell_all is not None:
            tell_all(names, decisions)
        else:
            for name, decision in zip(names, decisions, strict=True):
                self.reporter.skipped(name, decision)
        return done

    def _skip_by_stamp(self, name: str, stamped: ProvenFiles) -> None:
        """Its files were as the up-to-date stamp has them when this command began, and
        nothing it reads was made since (uptodate.py): its signature would find it fresh."""
        self._proven[name] = stamped
        self._finish(TargetResult(name, Outcome.SKIPPED, duration=0.0))
        self.reporter.skipped(name, fresh_decision(stamped[0]))

    def _finish_build(self, started_at: float, status: RunStatus) -> None:
        """Write what finished first (a second Ctrl-C while waiting on cache writes keeps
        it), then wait for the background work, then the stats and the history."""
        try:
            self._flush_records()
        finally:
            if self._executor is not None:  # warm workers no step took (exec/warm.py)
                from mlbuild.exec.base import finish

                finish(self._executor, interrupted=status is RunStatus.INTERRUPTED)
            self._collect_saves(wait=True)
            if self._executor is not None and self._executor.running:
                # A second Ctrl-C lands here: stop_all has killed everything by then.
                with contextlib.suppress(KeyboardInterrupt):
                    self._interrupt()
            if self._remote is not None:
                self._remote.finish(wait=status is not RunStatus.INTERRUPTED)  # background uploads
            if self._cache is not None:
                self._cache.close()  # its database connections: `watch` builds again and again
        save_checked(self.store, self.fp, self.code)
        self.store.save_signatures(self._signed)
        skipped = Outcome.SKIPPED
        if status is not RunStatus.OK or any(r.outcome is not skipped for r in self.results):
            # The history lists runs that did something: a no-op is not one (uptodate.py).
            # Targets the stamp proved (no time, no reason) go in one list, not a row each.
            rows: list[RunRow] = []
            proven: list[str] = []
            for r in self.results:
                if r.outcome is skipped and not r.duration and not r.reasons:
                    proven.append(r.name)
                else:
                    reason = "; ".join(r.reasons)
                    rows.append(RunRow(r.name, r.outcome.value, r.duration, reason))
            command, value = self.options.command_line, status.value
            self.store.record_run(started_at, command, value, rows, proven)
        keep_warm = self.graph.pipeline.workers.keep_warm
        if self._executor is not None and keep_warm and status is not RunStatus.INTERRUPTED:
            from mlbuild.exec.keepwarm import keep_after

            keep_after(self._executor, keep_warm, self.options.jobs)  # `[workers] keep_warm`
        close = getattr(self._executor, "close", None)
        if close is not None:  # the local executor's selector
            close()

    def _record_experiment(self, ok: bool, unforced: bool) -> None:
        """Metrics of what ran or was restored, and the configuration's row (experiments.py);
        `self.row` becomes the row the decided targets are in (None: not known).

        A no-op (nothing made, no `--name`) imports nothing for it: its targets are in
        the row they were in.
        """
        ran, restored, skipped = Outcome.RAN, Outcome.RESTORED, Outcome.SKIPPED
        made = [r.name for r in self.results if r.outcome is ran or r.outcome is restored]
        if made or self.options.name is not None:
            from mlbuild.experiments import record_build

            done = [r.name for r in self.results if r.outcome is skipped] + made
            pipeline, warn = self.graph.pipeline, self.reporter.warn
            # The stamp's row holds every target the proof skipped as it is now.
            like = (self.row, self._looked) if self.row is not None and unforced else None
            self.row = record_build(
                self.store, pipeline, done, made, ok, self.options.name, warn, like
            )

    def _loop(self, sched: Scheduler, forced: frozenset[str] | None) -> None:
        """Check what is ready, start what may start, wait for steps; until all is done."""
        while True:
            # Checking goes on while steps run: a free slot is filled as soon as a target
            # for it is found, and with every slot busy the steps are polled every
            # VISIT_SLICE, so that 10,000 checks do not hold back the first step.
            busy = self._executor is not None and bool(self._executor.running)
            until = time.perf_counter() + VISIT_SLICE
            while not sched.start_first() and (name := sched.next_to_check()) is not None:
                is_forced = forced is not None and (not forced or name in forced)
                try:
                    stale = self._visit(name, is_forced)
                except UserError as exc:
                    if not busy:
                        raise
                    # Bad input found while steps run: they finish and are recorded
                    # (nothing is started any more), then the one-line error.
                    self._bad_input = self._bad_input or exc
                    self.stopped = True
                    self._not_run(name, "the build stopped on an error")
                    stale = False
                if stale:
                    sched.want_run(name)
                else:
                    sched.finished(name)
                if sched.can_start() or (busy and time.perf_counter() > until):
                    break
            if self.stopped:
                for name in sched.drain_runnable():
                    self._not_run(name, "the build stopped after a failure")
                    sched.finished(name)
            for name in sched.startable():
                self._start(name)
            if self.options.auto_jobs and self._executor is not None:
                sched.jobs = getattr(self._executor, "slots", None) or sched.jobs  # Ray's CPUs
            if self._executor is None or not self._executor.running:
                if self._bad_input is not None:
                    raise self._bad_input
                if sched.idle:
                    return
                continue
            if self.options.jobs > 1 and not self.stopped:  # warm the next steps' workers
                from mlbuild.exec.warm import prepare

                targets, deps = self.graph.targets, self.graph.deps
                args = (sched, self._running, self.outcomes, self.code, self.options.jobs)
                prepare(self._executor, targets, deps, *args)
            from mlbuild.exec.base import Done

            timeout = 0.0 if sched.checkable else self._flush_due()
            for event in self._executor.wait(timeout):
                if isinstance(event, Done):
                    self._complete(event.target, event.result, sched)
                    sched.finished(event.target)
                else:
                    self.reporter.output(event.target, event.data)
            if self._flush_due() == 0.0:
                self._flush_records()

    def _interrupt(self) -> None:
        """Stop running steps (Ctrl-C, SIGTERM); they leave no manifest and rerun next time."""
        assert self._executor is not None
        stopped_at = time.monotonic()
        for name in self._executor.stop_all():
            self._remember_made(self.graph.targets[name])
            took = stopped_at - self._started.get(name, stopped_at)
            reasons = self._running[name][1].reasons if name in self._running else ()
            self._finish(TargetResult(name, Outcome.INTERRUPTED, reasons, took))
            with contextlib.suppress(OSError):  # a closed terminal: the history still has it
                self.reporter.interrupted(name, took)

    def _remember_made(self, target: Target) -> None:
        """What an unrecorded step left in its outputs is mlbuild's: the next run may delete it."""
        try:
            made = observe_paths(self.fp, [p.path for p in target.outputs], {})
        except FingerprintError:
            return  # a FIFO, say: left for the user, moved aside next time
        left = {path: digest for path, digest in made.items() if not is_missing(digest)}
        if left:
            save_made(self.root, target.name, left)

    def _visit(self, name: str, forced: bool) -> bool:
        """Decide one target whose dependencies are done; True if its step must run."""
        deps = self.graph.deps[name]
        stamped = self.by_stamp.get(name)
        if stamped is not None and not forced and not self.stopped:
            outcomes, skipped = self.outcomes, Outcome.SKIPPED
            if all(outcomes[d] is skipped for d in deps):  # else: a dependency was made
                self._skip_by_stamp(name, stamped)
                return False
        self._looked.append(name)
        target = self.graph.targets[name]
        blocked = [d for d in deps if self.outcomes[d] in (Outcome.FAILED, Outcome.NOT_RUN)]
        if blocked or self.stopped:
            because = "the build stopped after a failure"
            if blocked:
                verb = "failed" if self.outcomes[blocked[0]] is Outcome.FAILED else "was not run"
                because = f"upstream '{blocked[0]}' {verb}"
            self._not_run(name, because)
            return False
        checking = time.perf_counter()
        stored = self.manifests.get(name)
        if stored is None and stamped is not None:  # not read with the others
            stored = self.store.load_manifests_of([name]).get(name)
        if stored is not None and stored.sig is not None and not forced:
            counts = fresh_by_signature(target, stored.sig, self.fp)
            if counts is not None:  # fresh by the stat of its files alone (signature.py)
                self._proven[name] = stored.sig
                decision = fresh_decision(counts)
                self._finish(
                    TargetResult(name, Outcome.SKIPPED, duration=time.perf_counter() - checking)
                )
                self.reporter.skipped(name, decision)
                return False
        before = Fingerprint.from_json(stored.data) if stored is not None else None
        now = self._observe(target, before)
        decision = decide(
            target,
            now,
            before,
            self.store.load_tree,
            forced=forced,
            stored=stored is not None,
            unbuilt=self._unbuilt.reason(name) if stored is None else NEVER_BUILT,
        )
        if decision.fresh:
            sig = make_signature(target, now.fingerprint, self.fp.stats)
            if sig is not None and stored is not None and sig != stored.sig:
                self._signed.append((name, sig))
            if sig is not None:
                self._proven[name] = sig
            # A skipped target's duration is what checking it cost.
            cost = time.perf_counter() - checking
            self._finish(TargetResult(name, Outcome.SKIPPED, duration=cost))
            self.reporter.skipped(name, decision)
            return False
        # Output digests mlbuild can show it made: those it may delete.
        known = before.outputs if before is not None else load_made(self.root, name)
        check_kept_sources(self.graph, target, known)
        for port in target.outputs:
            check_writable(self.root, self.where, target, port.path)
        self.fp.expire()  # outputs are removed, restored or written from here on
        if self.options.restore_only:  # `mlbuild pull`: restore or leave alone, never run
            if not self._restore(target, now, decision, clear=known):
                self._not_run(name, "not in the cache")
            return False
        if not target.persist:
            self._clear(target, now.fingerprint.outputs, known)
        if name in self.manifests:
            self.store.forget([name])
            del self.manifests[name]
        # A persist target keeps its outputs for its step, but a restore replaces
        # them: what mlbuild did not make is moved aside first, as for any target.
        if self._restore(target, now, decision, clear=known if target.persist else None):
            return False
        self._running[name] = (now, decision, self._input_stats(target, now))
        return True

    def _clear(self, target: Target, current: Mapping[str, str], known: Mapping[str, str]) -> None:
        for path, dest in clear_outputs(self.root, self.where, target, current, known):
            self.reporter.warn(
                f"`{target.name}`: '{path}' was not made by mlbuild (or changed since it was);"
                f" moved it to {dest}"
            )

    def _input_stats(self, target: Target, now: Observation) -> dict[str, StatEntry | None]:
        """The stat entries the input and code digests were taken from, file by file.

        Compared again when the step ends: an input written while the step ran
        has another stat even if its bytes were later put back.
        """
        stats = self.fp.stats
        taken: dict[str, StatEntry | None] = {}
        fingerprint = now.fingerprint
        files = (*fingerprint.inputs.items(), *fingerprint.code.items())
        prefix = str(self.root) + os.sep
        for path, digest in (*files, *fingerprint.discovered.items()):
            link = _link_stat(prefix + path)
            if link is not None:  # retargeting the link (`ln -sfn`) changes the read too
                taken[LINK_PREFIX + path] = link
            if is_dir(digest):
                record = self.fp.dirs.get(path)
                below = record.files if record is not None else {}
                for name, _ in now.listings.get(digest, ()):
                    taken[f"{path}/{name}"] = below.get(name) or stats.get(f"{path}/{name}")
            else:
                taken[path] = stats.get(path)
        return taken

    def _changed_input(self, target: Target, before: Observation, taken: StatMap) -> str | None:
        """An input (or code file) that changed since the step started, or None."""
        moved = _moved(self.root, taken)
        if moved is not None:
            return moved
        listings: dict[str, tuple[tuple[str, str], ...]] = {}
        now = observe_paths(self.fp, expand_inputs(target, str(self.root)), listings)
        for path, digest in now.items():
            if before.fingerprint.inputs.get(path) != digest:
                return path
        return next((p for p in before.fingerprint.inputs if p not in now), None)

    def _observe(self, target: Target, before: Fingerprint | None = None) -> Observation:
        """The target now; `before` (its manifest) names the files its step was seen using."""
        return observe_target(target, before, self.fp, self.code, self.packages, self.where)

    def _start(self, name: str, *, announce: bool = True) -> None:
        """Spawn a stale target's step; `announce=False` leaves its "started" line to the
        caller (`_complete`), which tells the step that ended first."""
        target = self.graph.targets[name]
        for port in target.outputs:
            parent = (self.root / port.path).parent
            if parent not in self.made_dirs:
                try:
                    parent.mkdir(parents=True, exist_ok=True)
                except (FileExistsError, NotADirectoryError):
                    raise PipelineError(
                        self.graph.pipeline.display_file,
                        f"'{port.path}' needs '{os.path.relpath(parent, self.root)}' to be a"
                        " directory, but a file is in the way: move or remove it",
                        f"targets.{name}.outputs",
                    ) from None
                self.made_dirs.add(parent)
        now, decision, taken = self._running[name]
        if _moved(self.root, taken):
            # An input changed between the visit and now (a step that ran meanwhile wrote
            # it): the step reads what is there now, so that is what it is recorded with.
            self.fp.expire()
            now = self._observe(target, now.fingerprint)
            self._running[name] = (now, decision, self._input_stats(target, now))
        if announce:
            self.reporter.started(name, decision, target.shown)
        starting = getattr(self.reporter, "starting", None)
        if starting is not None:  # before it runs, whenever its line comes (watch's OwnWrites)
            starting(name)
        from mlbuild.exec.base import Step

        self._started[name] = time.monotonic()  # an interrupted step's duration
        try:
            self.executor.start(Step(target, log_path(self.root, name), now))
        except KeyboardInterrupt:
            # Stopped while being spawned: the executor killed what had started, and
            # stop_all will not list it, so it is told and recorded as interrupted here.
            if name not in self.executor.running:
                took = time.monotonic() - self._started[name]
                self._remember_made(target)
                self._finish(TargetResult(name, Outcome.INTERRUPTED, decision.reasons, took))
                with contextlib.suppress(OSError):
                    self.reporter.interrupted(name, took)
            raise

    def _complete(self, name: str, result: ExecResult, sched: Scheduler) -> None:
        """A step exited: check its outputs, record it, store its outputs in the cache.

        A shell step that exited well with its outputs in place frees its slot first:
        the next step starts before this one's outputs are hashed and recorded, so
        that mlbuild's bookkeeping overlaps a step even at -j 1. What it starts is
        independent of this target (runnable before it finished), and is told after it.
        """
        target = self.graph.targets[name]
        before, decision, taken = self._running.pop(name)
        ending = getattr(self.reporter, "ending", None)
        if ending is not None:  # at its exit, before a step starts in its slot (watch)
            ending(name)
        if result.remote_outputs is not None:
            result = self._bring_back(result)
        self.fp.expire()  # the step wrote files
        failure = self._check(target, result)
        early: list[str] = []
        stopped_by: BaseException | None = None
        if failure is None and target.kind is ActionKind.SHELL and not self.stopped:
            try:
                for next_name in sched.start_early(name):
                    self._start(next_name, announce=False)
                    early.append(next_name)
            except BaseException as exc:  # a file in the way, Ctrl-C: raised once this is told
                stopped_by = exc
        try:
            self._record_step(name, target, result, before, decision, taken, failure, early)
        finally:
            self._tell_started(early)
        if stopped_by is not None:
            raise stopped_by

    def _tell_started(self, early: list[str]) -> None:
        """Tell the steps `_complete` started early (once: the list is emptied)."""
        for started in early:
            shown = self.graph.targets[started].shown
            self.reporter.started(started, self._running[started][1], shown)
        early.clear()

    def _record_step(
        self,
        name: str,
        target: Target,
        result: ExecResult,
        before: Observation,
        decision: Decision,
        taken: StatMap,
        failure: Failure | None,
        early: list[str],
    ) -> None:
        """The rest of `_complete`: record the step (or its failure), store its outputs.

        A failure found here (a FIFO among the outputs) was found after the `early` steps
        started: they are told first, as steps that were running, not started after it.
        """
        known = self._keys.pop(name, None)  # the cache key `_restore` found, and of what
        if failure is None and target.kind is ActionKind.PYTHON:
            before, failure = self._take_observed(target, before, result)
        changed: str | None = None
        done: Observation | None = None
        key: str | None = None
        if failure is None:
            try:
                changed = self._changed_input(target, before, taken)
                if changed is not None:
                    before = _poisoned(before, changed)
                # The key `_restore` found holds while the inputs are the ones it was of.
                key = known[1] if known is not None and known[0] is before.fingerprint else None
                done = self._record(target, before, result.duration, key)
            except FingerprintError as exc:  # the step left a FIFO or an unreadable file
                failure = failure_of(target, str(exc), result.log_path)
        if failure is not None or done is None:
            assert failure is not None
            self._remember_made(target)
            self._finish(
                TargetResult(name, Outcome.FAILED, decision.reasons, result.duration, failure)
            )
            self._tell_started(early)
            self.reporter.failed(failure, result.duration)
            self.stopped = self.stopped or not self.options.keep_going
            return
        self._finish(TargetResult(name, Outcome.RAN, decision.reasons, result.duration))
        self.reporter.finished(name, result.duration)
        if changed is not None:
            # As Bazel's "file modified during build": the outputs may come from
            # either version, so they are not cached or shared, and the manifest
            # records the input as changed: the outputs are known to be mlbuild's,
            # and the next run redoes the step ("input changed: PATH").
            self.reporter.warn(
                f"`{name}`: input '{changed}' changed while the step ran; its outputs are"
                " kept but not cached, and the next run redoes the step"
            )
            return
        self._store_outputs(target, done, result.duration, key)

    def _check(self, target: Target, result: ExecResult) -> Failure | None:
        from mlbuild.exec.base import log_tail

        if result.message:  # the executor's own account (a Ray worker that died)
            message = result.message
        elif not result.ok:
            code = result.returncode
            message = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        else:
            missing = [p.path for p in target.outputs if not (self.root / p.path).exists()]
            if not missing:
                return None
            message = "did not write declared output " + ", ".join(f"'{p}'" for p in missing)
        tail = tuple(log_tail(result.log_path))
        return failure_of(target, message, result.log_path, tail)

    def _take_observed(
        self, target: Target, before: Observation, result: ExecResult
    ) -> tuple[Observation, Failure | None]:
        """Add what a Python step was seen using to its manifest (observed.py).

        With `strict_inputs`, reading an undeclared project file fails the target.
        """
        from mlbuild.exec.base import timing_path
        from mlbuild.observed import observed_path, read_observed, settle

        path = observed_path(str(timing_path(result.log_path)))
        # One second of slack: the file's mtime comes from a coarser clock.
        seen = read_observed(path, time.time() - result.duration - 1.0)
        if seen is None:
            return before, None
        counted = self.graph.pipeline.params_files
        settled = settle(target, before, seen, self.fp, self.code, counted)
        if target.strict_inputs and settled.undeclared:
            shown = ", ".join(f"'{p}'" for p in settled.undeclared)
            message = (
                f"read {shown}, not declared in its inputs"
                f" (strict_inputs = true: add to `targets.{target.name}.inputs`)"
            )
            return before, failure_of(target, message, result.log_path)
        return settled.observation, None

    def _record(
        self, target: Target, before_run: Observation, duration: float, key: str | None
    ) -> Observation:
        """Store the manifest: inputs as observed before the step, outputs as they are now."""
        listings = dict(before_run.listings)
        outputs = observe_paths(self.fp, [p.path for p in target.outputs], listings)
        fingerprint = before_run.fingerprint._replace(outputs=outputs)
        self._record_later(target.name, fingerprint, duration, listings, key)
        return Observation(fingerprint, listings, before_run.imported_by)

    def _record_later(
        self,
        name: str,
        fingerprint: Fingerprint,
        duration: float,
        listings: Mapping[str, tuple[tuple[str, str], ...]],
        key: str | None = None,
    ) -> None:
        """Queue a manifest; written with others in one transaction (`_flush_records`),
        with its cache key when known (the experiment table reads it: none to hash then).

        Everything in it was true when it was taken, so writing it later is
        never wrong: what changes in between is found as any later change is.
        A crash before the write loses the record and the step runs again.
        """
        data, updates = fingerprint.to_json(), self.fp.take_updates()
        record = Record(name, data, duration, updates, listings, time.time(), key)
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending.append(record)
        if len(self._pending) >= RECORD_BATCH or self._flush_due() == 0.0:
            self._flush_records()  # the time also counts when no step runs (restores)

    def _flush_records(self) -> None:
        """Write the queued manifests in one transaction; only then drop their `made/` notes."""
        if not self._pending:
            return
        records, self._pending = self._pending, []
        self.store.record_many(records)
        for record in records:
            forget_made(self.root, record.target)

    def _flush_due(self) -> float | None:
        """Seconds until the queued manifests must be written (None: nothing queued)."""
        if not self._pending:
            return None
        return max(0.0, self._pending_since + RECORD_SECONDS - time.monotonic())

    def _cacheable(self, target: Target) -> bool:
        return target.cache and not target.always_run and not self.cache_broken

    def _restore(
        self,
        target: Target,
        now: Observation,
        decision: Decision,
        clear: Mapping[str, str] | None = None,
    ) -> bool:
        """Put the outputs of an earlier run with the same key in place; False if none.

        With `clear` (the digests mlbuild made, as for `_clear`), the outputs in
        the way are cleared first, once an entry was found: `pull` leaves a
        target it cannot restore untouched.
        """
        if not self._cacheable(target) or self.options.no_cache or decision.forced:
            return False
        from mlbuild.cache import CacheError, SlowerThanRunning

        start = time.perf_counter()
        key = target_key(target, now.fingerprint)
        self._keys[target.name] = (now.fingerprint, key)  # the same for its step's outputs
        quick = not self.options.restore_only  # `mlbuild pull` restores whatever it costs
        try:
            entry = self.cache.lookup(key)
            source = "cache"
            if entry is None and self.remote is not None:
                # A local miss: the remote's entry, fetched into the local cache, verified.
                paths = [p.path for p in target.outputs]
                entry = self.remote.fetch(target.name, key, paths, quick=quick)
                source = "remote cache"
            if entry is None:
                return False
            if quick:
                self.cache.check_cost(entry)
        except SlowerThanRunning as exc:
            self.reporter.warn(f"`{target.name}` runs instead of being restored: {exc}")
            return False
        except CacheError as exc:  # an invalid local entry (deleted by lookup)
            self.reporter.warn(f"cache entry of `{target.name}` not used: {exc}; running it")
            return False
        if clear is not None:
            self._clear(target, now.fingerprint.outputs, clear)
        try:
            outputs = self.cache.restore(entry, self.root, self.fp)
        except (CacheError, OSError) as exc:
            self.reporter.warn(f"cache entry of `{target.name}` not used: {exc}; running it")
            self.cache.drop(key)
            listings: dict[str, tuple[tuple[str, str], ...]] = {}
            paths = [p.path for p in target.outputs]
            current = observe_paths(self.fp, paths, listings)
            known = {path: out["fingerprint"] for path, out in entry.outputs.items()}
            self._clear(target, current, known)
            return False
        fingerprint = now.fingerprint._replace(outputs=outputs)
        self._record_later(target.name, fingerprint, entry.duration, now.listings, key)
        self._keys.pop(target.name, None)
        duration = time.perf_counter() - start
        self._finish(TargetResult(target.name, Outcome.RESTORED, decision.reasons, duration))
        self.reporter.restored(target.name, duration, entry.created, source=source)
        return True

    def _bring_back(self, result: ExecResult) -> ExecResult:
        """Put in place the outputs a step left in the remote cache (a Ray worker's sandbox).

        The same path as a remote cache hit: the blobs into the local cache,
        verified (RemoteCache.receive), then Cache.restore. A failure fails
        the step; the time it took counts as the step's.
        """
        from mlbuild.cache import CacheError
        from mlbuild.remote import BadRecord, RemoteError

        assert result.remote_outputs is not None
        start = time.perf_counter()
        entry, sizes = result.remote_outputs
        message = ""
        try:
            if self.remote is None or not self.remote.receive(entry, sizes):
                message = "its outputs are in the remote cache, which became unreachable"
            else:
                self.cache.restore(entry, self.root, self.fp)
        except (RemoteError, BadRecord, CacheError, OSError) as exc:
            message = f"fetching its outputs from the remote cache failed: {exc}"
        duration = result.duration + time.perf_counter() - start
        return result._replace(duration=duration, message=message, remote_outputs=None)

    def _store_outputs(
        self, target: Target, done: Observation, duration: float, key: str | None = None
    ) -> None:
        """Copy a finished target's outputs into the cache, in a background thread.

        The copy (file I/O that releases the GIL) overlaps with the next steps;
        the digests were taken here, and a restore verifies every byte anyway.
        """
        if not self._cacheable(target):
            return
        if self._saver is None:
            from mlbuild.build.background import Background

            self._saver = Background("mlbuild-cache")
        if key is None:  # not looked up before the step, or its inputs were taken again
            key = target_key(target, done.fingerprint)
        save = functools.partial(self.cache.save, key, target.name, self.root, done, duration)
        self._saves.append(self._saver.submit(save))
        self._collect_saves(wait=False)

    def _collect_saves(self, *, wait: bool) -> None:
        """Report failed cache writes (once: the first failure turns caching off)."""
        if not self._saves and self._saver is None:
            return
        from mlbuild.cache import CacheError, Uncacheable

        # The writer saves in order: the first save not done yet ends the look (looking
        # at every pending one per step was quadratic when the writer fell behind).
        saves = self._saves
        while saves and (wait or saves[0].done()):
            save = saves.popleft()
            try:
                entry = save.result()
            except Uncacheable as exc:  # this target's outputs only
                self.reporter.warn(str(exc))
                continue
            except CacheError as exc:
                if not self.cache_broken:
                    self.reporter.warn(f"{exc}; the build goes on without caching outputs")
                self.cache_broken = True
                continue
            if self.remote is not None:
                self.remote.upload_later(entry.target, entry)  # in the background too
        if wait and self._saver is not None:
            self._saver.shutdown()
            self._saver = None

    @property
    def cache(self) -> Cache:
        if self._cache is None:
            from mlbuild.cache import Cache

            self._cache = Cache(cache_dir(self.root), self.reporter.warn)
        return self._cache

    @property
    def remote(self) -> RemoteCache | None:
        """The shared remote cache (`[cache] remote`), or None; see remote.py."""
        settings = self.graph.pipeline.cache
        if self._remote is None and settings.remote is not None:
            from mlbuild.remote import RemoteCache

            write = settings.remote_write and not self.options.remote_read_only
            self._remote = RemoteCache(settings, self.cache, self.reporter.warn, write=write)
        return self._remote

    @property
    def executor(self) -> Executor:
        """This build's executor, made through the registry (exec/registry.py) on first use."""
        if self._executor is None:
            from mlbuild.exec.base import ExecutorContext
            from mlbuild.exec.registry import make_executor

            settings = self.graph.pipeline.executor
            settings = settings._replace(address=self.options.address or settings.address)
            kind = self.options.executor or settings.kind
            context = ExecutorContext(self.root, settings, lambda: self.remote, self.fp.digest)
            self._executor = make_executor(kind, context)
            if self.graph.pipeline.workers.keep_warm is not None:
                from mlbuild.exec.keepwarm import attach  # `[workers] keep_warm`

                attach(self._executor, self.graph.pipeline.workers.keep_warm)
        return self._executor

    def _not_run(self, name: str, because: str) -> None:
        self._finish(TargetResult(name, Outcome.NOT_RUN, (because,)))
        self.reporter.not_run(name, because)

    def _finish(self, result: TargetResult) -> None:
        self.outcomes[result.name] = result.outcome
        self.results.append(result)


def _moved(root: Path, taken: StatMap) -> str | None:
    """The first file (or symlink) of `taken` whose stat is not the one taken, or None."""
    prefix = str(root) + os.sep
    for rel, entry in taken.items():
        if entry is None:
            continue
        if rel.startswith(LINK_PREFIX):
            path = rel[len(LINK_PREFIX) :]
            if _link_stat(prefix + path) != entry:
                return path
            continue
        try:
            st = os.stat(prefix + rel)
        except OSError:
            return rel
        if not entry.same_file(st):
            return rel
    return None


def _link_stat(full: str) -> StatEntry | None:
    """A symlink's own identity (inode, ctime, target text), or None if `full` is no link."""
    try:
        st = os.lstat(full)
        if not stat.S_ISLNK(st.st_mode):
            return None
        text = os.readlink(full)
    except OSError:
        return None
    return StatEntry(st.st_size, st.st_mtime_ns, st.st_ino, 0, text, st.st_ctime_ns)


def _poisoned(observed: Observation, changed: str) -> Observation:
    """`observed` with the input or code file holding `changed` marked as never matching."""
    fp = observed.fingerprint
    for path in fp.inputs:
        if changed == path or changed.startswith(path + "/"):
            inputs = {**fp.inputs, path: CHANGED_DURING_STEP}
            return observed._replace(fingerprint=fp._replace(inputs=inputs))
    if changed in fp.code:
        code = {**fp.code, changed: CHANGED_DURING_STEP}
        return observed._replace(fingerprint=fp._replace(code=code))
    if changed in fp.discovered:
        discovered = {**fp.discovered, changed: CHANGED_DURING_STEP}
        return observed._replace(fingerprint=fp._replace(discovered=discovered))
    return observed


def run_build(graph: Graph, store: Store, reporter: Reporter, options: BuildOptions) -> BuildResult:
    """Bring the selected targets up to date (`query.predict` says what that would do)."""
    return Build(graph, store, reporter, options).run()
