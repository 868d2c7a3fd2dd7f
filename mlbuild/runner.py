"""One build: select, check, decide, execute, record; what happens is told to a reporter.

Targets are visited in topological order and each one's fingerprint is taken
only when everything it needs is done, so a consumer sees its producers' new
outputs: if they came out byte-identical it stays fresh (early cutoff), and
the set of targets that run is exactly the set whose fingerprints changed.

Invariant: a manifest exists only for a target whose step succeeded and whose
declared outputs all exist; it is deleted before the step starts, so an
interrupted or failed step always reruns.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from mlbuild.code import CodeError, CodeScanner, Parsed, check_function, package_versions
from mlbuild.config import STATE_DIR, Target
from mlbuild.errors import PipelineError
from mlbuild.fingerprint import Fingerprinter, expand_port
from mlbuild.graph import Graph
from mlbuild.staleness import (
    Decision,
    Fingerprint,
    Observation,
    decide,
    observe,
    observe_paths,
)
from mlbuild.store import RunRow, Store

if TYPE_CHECKING:
    # The executor and the cache (subprocess, shutil, tempfile with them) are
    # imported only when a target is stale: a no-op build never pays for them.
    from mlbuild.cache import Cache
    from mlbuild.executor import ExecResult, LocalExecutor


class Outcome(enum.Enum):
    """What became of one target in one build."""

    SKIPPED = "skipped"  # fresh
    RAN = "ran"
    RESTORED = "restored"  # stale, and its outputs for this key came from the cache
    FAILED = "failed"
    NOT_RUN = "not run"  # an upstream target failed, or the build stopped first
    PENDING = "would run"  # dry run: stale, or waiting on a stale upstream


@dataclass(frozen=True)
class Failure:
    """Why a target failed, with what the user needs to look into it."""

    target: str
    command: str
    message: str
    log_path: Path | None = None
    tail: tuple[str, ...] = ()


@dataclass(frozen=True)
class TargetResult:
    name: str
    outcome: Outcome
    reasons: tuple[str, ...] = ()
    duration: float = 0.0
    failure: Failure | None = None


@dataclass(frozen=True)
class BuildOptions:
    """What the user asked for on the command line."""

    targets: tuple[str, ...] = ()
    force: frozenset[str] | None = None  # None: nothing; empty: every selected target
    dry_run: bool = False
    keep_going: bool = False
    no_cache: bool = False  # do not restore from the output cache (still store)
    command_line: str = "run"


@dataclass(frozen=True)
class BuildResult:
    results: tuple[TargetResult, ...]
    duration: float
    failures: tuple[Failure, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.failures

    def count(self, outcome: Outcome) -> int:
        return sum(1 for r in self.results if r.outcome is outcome)


class Reporter(Protocol):
    """Everything the user is told during a build (see report.py)."""

    def skipped(self, target: str, decision: Decision) -> None: ...
    def started(self, target: str, decision: Decision, command: str) -> None: ...
    def output(self, target: str, data: bytes) -> None: ...
    def finished(self, target: str, duration: float) -> None: ...
    def restored(self, target: str, duration: float, original_run: float) -> None: ...
    def failed(self, failure: Failure, duration: float) -> None: ...
    def not_run(self, target: str, because: str) -> None: ...
    def would_run(self, target: str, reasons: Sequence[str]) -> None: ...
    def warn(self, message: str) -> None: ...
    def summary(self, result: BuildResult) -> None: ...


def check_sources(graph: Graph, selected: Sequence[str]) -> None:
    """Every input must exist or be written by some target; say which one is missing."""
    root = graph.pipeline.root
    prefix = str(root) + os.sep
    for name in selected:
        target = graph.targets[name]
        for port in target.inputs:
            if graph.producers_of(port):
                continue
            key = f"targets.{name}.inputs" + (f".{port.name}" if port.name else "")
            if port.is_glob:
                if not expand_port(port, str(root)):
                    raise PipelineError(
                        graph.pipeline.display_file,
                        f"'{port.path}' matches no file and no target writes one",
                        key,
                    )
            elif not os.path.lexists(prefix + port.path):
                raise PipelineError(
                    graph.pipeline.display_file,
                    f"'{port.path}' does not exist and no target writes it",
                    key,
                )


def remove_outputs(root: Path, target: Target) -> None:
    """Delete a target's declared outputs (files, directories or symlinks) under `root`."""
    for port in target.outputs:
        path = root / port.path
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            import shutil  # only when something is rebuilt; see the executor import

            shutil.rmtree(path)


def check_code(graph: Graph, selected: Sequence[str], scanner: CodeScanner) -> None:
    """Python targets: the module exists, parses, and its function takes the declared names."""
    for name in selected:
        target = graph.targets[name]
        if target.python is not None:
            try:
                check_function(scanner, target, target.call_names())
            except CodeError as exc:
                raise PipelineError(
                    graph.pipeline.display_file, str(exc), f"targets.{name}.python"
                ) from None


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
        self._executor: LocalExecutor | None = None
        self._cache: Cache | None = None
        self.cache_broken = False  # set after a failed write: no more caching this run
        self.manifests = store.load_manifests()
        self.fp = Fingerprinter(self.root, store.load_stats())
        parsed = {raw: Parsed.from_json(data) for raw, data in store.load_parsed().items()}
        self.code = CodeScanner(self.fp, parsed)
        self.packages: dict[str, str | None] = {}
        self.outcomes: dict[str, Outcome] = {}
        self.results: list[TargetResult] = []
        self.stopped = False

    def run(self) -> BuildResult:
        start = time.perf_counter()
        started_at = time.time()
        forced = self.options.force
        selected = self.graph.select((*self.options.targets, *(forced or ())))
        check_sources(self.graph, selected)
        check_code(self.graph, selected, self.code)
        try:
            for name in selected:
                self._visit(name, forced is not None and (not forced or name in forced))
        finally:
            self.store.save_stats(self.fp.take_updates())
            self.store.save_parsed({r: p.to_json() for r, p in self.code.new_parsed.items()})
        failures = tuple(r.failure for r in self.results if r.failure is not None)
        result = BuildResult(tuple(self.results), time.perf_counter() - start, failures)
        if not self.options.dry_run:
            status = "ok" if result.ok else "failed"
            rows = [
                RunRow(r.name, r.outcome.value, r.duration, "; ".join(r.reasons))
                for r in self.results
            ]
            self.store.record_run(started_at, self.options.command_line, status, rows)
        return result

    def _visit(self, name: str, forced: bool) -> None:
        target = self.graph.targets[name]
        deps = self.graph.deps[name]
        blocked = [d for d in deps if self.outcomes[d] in (Outcome.FAILED, Outcome.NOT_RUN)]
        if blocked or self.stopped:
            because = f"upstream '{blocked[0]}' failed" if blocked else "the build stopped"
            if blocked and self.outcomes[blocked[0]] is Outcome.NOT_RUN:
                because = f"upstream '{blocked[0]}' was not run"
            self._finish(TargetResult(name, Outcome.NOT_RUN, (because,)))
            self.reporter.not_run(name, because)
            return
        now = self._observe(target)
        before = self._manifest(name)
        decision = decide(target, now, before, self.store.load_tree, forced=forced)
        if self.options.dry_run:
            waiting = [d for d in deps if self.outcomes[d] is Outcome.PENDING]
            if decision.fresh and not waiting:
                self._finish(TargetResult(name, Outcome.SKIPPED))
                self.reporter.skipped(name, decision)
            else:
                reasons = decision.reasons + tuple(f"upstream '{d}' would run" for d in waiting)
                self._finish(TargetResult(name, Outcome.PENDING, reasons))
                self.reporter.would_run(name, reasons)
            return
        if decision.fresh:
            self._finish(TargetResult(name, Outcome.SKIPPED))
            self.reporter.skipped(name, decision)
            return
        self._execute(target, now, decision)

    def _observe(self, target: Target) -> Observation:
        try:
            code = self.code.fingerprint(target)
        except CodeError as exc:
            key = f"targets.{target.name}.python"
            raise PipelineError(self.graph.pipeline.display_file, str(exc), key) from None
        missing = [n for n in target.track if n not in self.packages]
        self.packages.update(package_versions(tuple(missing)))
        packages = {n: self.packages[n] for n in target.track}
        return observe(target, self.fp, code=code, packages=packages)

    def _manifest(self, name: str) -> Fingerprint | None:
        stored = self.manifests.get(name)
        return Fingerprint.from_json(stored.data) if stored is not None else None

    def _execute(self, target: Target, now: Observation, decision: Decision) -> None:
        name = target.name
        command = target.command or f"python {target.python}"
        if name in self.manifests:
            self.store.forget([name])
            del self.manifests[name]
        if not target.persist:
            remove_outputs(self.root, target)
        if self._restore(target, now, decision):
            return
        for port in target.outputs:
            (self.root / port.path).parent.mkdir(parents=True, exist_ok=True)
        self.reporter.started(name, decision, command)
        log_path = self.root / STATE_DIR / "logs" / f"{name}.log"
        result = self.executor.run(target, log_path, lambda data: self.reporter.output(name, data))
        failure = self._check(target, command, result)
        if failure is not None:
            self._finish(
                TargetResult(name, Outcome.FAILED, decision.reasons, result.duration, failure)
            )
            self.reporter.failed(failure, result.duration)
            self.stopped = not self.options.keep_going
            return
        done = self._record(target, now, result.duration)
        self._finish(TargetResult(name, Outcome.RAN, decision.reasons, result.duration))
        self.reporter.finished(name, result.duration)
        self._store_outputs(target, done, result.duration)

    def _cacheable(self, target: Target) -> bool:
        return target.cache and not target.always_run and not self.cache_broken

    def _restore(self, target: Target, now: Observation, decision: Decision) -> bool:
        """Put the outputs of an earlier run with the same key in place; False if none."""
        if not self._cacheable(target) or self.options.no_cache or "forced" in decision.reasons:
            return False
        from mlbuild.cache import CacheError, cache_key

        start = time.perf_counter()
        key = cache_key(target.name, now.fingerprint, [p.path for p in target.outputs])
        entry = self.cache.lookup(key)
        if entry is None:
            return False
        try:
            outputs = self.cache.restore(entry, self.root, self.fp)
        except (CacheError, OSError) as exc:
            self.reporter.warn(f"cache entry of `{target.name}` not used: {exc}; running it")
            self.cache.drop(key)
            remove_outputs(self.root, target)
            return False
        fingerprint = replace(now.fingerprint, outputs=outputs)
        self.store.record(
            target.name,
            fingerprint.to_json(),
            entry.duration,
            self.fp.take_updates(),
            now.listings,
        )
        duration = time.perf_counter() - start
        self._finish(TargetResult(target.name, Outcome.RESTORED, decision.reasons, duration))
        self.reporter.restored(target.name, duration, entry.created)
        return True

    def _store_outputs(self, target: Target, done: Observation, duration: float) -> None:
        if not self._cacheable(target):
            return
        from mlbuild.cache import CacheError, cache_key

        paths = [p.path for p in target.outputs]
        key = cache_key(target.name, done.fingerprint, paths)
        try:
            self.cache.save(key, target.name, self.root, done, duration)
        except CacheError as exc:
            self.cache_broken = True
            self.reporter.warn(f"{exc}; the build goes on without caching outputs")

    @property
    def cache(self) -> Cache:
        if self._cache is None:
            from mlbuild.cache import Cache

            self._cache = Cache(self.root / STATE_DIR / "cache")
        return self._cache

    @property
    def executor(self) -> LocalExecutor:
        if self._executor is None:
            from mlbuild.executor import LocalExecutor

            self._executor = LocalExecutor(self.root)
        return self._executor

    def _check(self, target: Target, command: str, result: ExecResult) -> Failure | None:
        from mlbuild.executor import log_tail

        tail = tuple(log_tail(result.log_path))
        if not result.ok:
            code = result.returncode
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            return Failure(target.name, command, how, result.log_path, tail)
        missing = [p.path for p in target.outputs if not (self.root / p.path).exists()]
        if missing:
            message = "did not write declared output " + ", ".join(f"'{p}'" for p in missing)
            return Failure(target.name, command, message, result.log_path, tail)
        return None

    def _record(self, target: Target, before_run: Observation, duration: float) -> Observation:
        """Store the manifest: inputs as observed before the step, outputs as they are now.

        Recording the pre-run input digests means an input edited while the
        step ran makes the target stale next time instead of silently fresh.
        """
        listings = dict(before_run.listings)
        outputs = observe_paths(self.fp, [p.path for p in target.outputs], listings)
        fingerprint = replace(before_run.fingerprint, outputs=outputs)
        self.store.record(
            target.name, fingerprint.to_json(), duration, self.fp.take_updates(), listings
        )
        return Observation(fingerprint, listings, before_run.imported_by)

    def _finish(self, result: TargetResult) -> None:
        self.outcomes[result.name] = result.outcome
        self.results.append(result)


def run_build(graph: Graph, store: Store, reporter: Reporter, options: BuildOptions) -> BuildResult:
    """Bring the selected targets up to date (or, with `dry_run`, say what would run)."""
    return Build(graph, store, reporter, options).run()
