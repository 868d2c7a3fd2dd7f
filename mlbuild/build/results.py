"""What a build reports: options, per-target outcomes, failures, and the Reporter protocol.

Shared by the runner (which produces them), the report (which shows them) and
the CLI (which turns them into exit codes), so none of those imports another.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol

from mlbuild.pipeline.schema import EMPTY, ActionKind, Target
from mlbuild.staleness import NEVER_BUILT, Decision
from mlbuild.uptodate import Proof

if TYPE_CHECKING:
    from mlbuild.uptodate import Proven

    # What the up-to-date stamp proved of a target: its counts, files and chunk (uptodate.py).
    ProvenFiles = Proven


class Outcome(enum.Enum):
    """What became of one target in one build."""

    SKIPPED = "skipped"  # fresh
    RAN = "ran"
    RESTORED = "restored"  # stale, and its outputs for this key came from the cache
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # its step was running when the build was stopped (Ctrl-C)
    NOT_RUN = "not run"  # an upstream target failed, or the build stopped first
    PENDING = "would run"  # a prediction (query.py): stale, or waiting on a stale upstream
    WOULD_RESTORE = "would restore"  # a prediction: stale, and the local cache has its outputs
    CLEANED = "cleaned"  # history only: `mlbuild clean` removed its outputs and manifest


# Why a target has no manifest, by its last outcome that touched its outputs (history rows).
_UNBUILT = {
    Outcome.FAILED.value: "its last run failed",
    Outcome.INTERRUPTED.value: "its last run was interrupted",
    Outcome.CLEANED.value: "outputs were cleaned",
}
# A manifest should exist after these; without one, mlbuild was killed before it was written.
_BUILT = (Outcome.RAN.value, Outcome.RESTORED.value, Outcome.SKIPPED.value)


class Unbuilt:
    """Why a target without a manifest has none, from the history, for its stale reason.

    Asked only for targets without a manifest (so never on the no-op path); the
    history is read once, on the first question, in one query.
    """

    def __init__(self, load: Callable[[Iterable[str]], Mapping[str, str]]) -> None:
        self._load = load  # Store.last_statuses
        self._last: Mapping[str, str] | None = None

    def reason(self, target: str) -> str:
        if self._last is None:
            self._last = self._load((*_UNBUILT, *_BUILT))
        status = self._last.get(target)
        if status is None:
            return NEVER_BUILT
        return _UNBUILT.get(status, "no record of its last build")


class RunStatus(enum.Enum):
    """How a whole build ended, as the history (`mlbuild log`) records it."""

    OK = "ok"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


class Failure(NamedTuple):
    """Why a target failed, with what the user needs to look into it."""

    target: str
    command: str  # the shell command as run, or a Python step's `module:function`
    message: str
    log_path: Path | None = None
    tail: tuple[str, ...] = ()
    kind: ActionKind = ActionKind.SHELL  # what `command` is: shown as "command" or "function"


def failure_of(
    target: Target, message: str, log_path: Path | None, tail: tuple[str, ...] = ()
) -> Failure:
    """A target's failure, naming what it runs as the user wrote it (not as a shell line)."""
    what = target.python if target.python is not None else target.shown
    if log_path is not None and not log_path.exists():
        log_path = None  # the step printed nothing: it has no log to point to
    return Failure(target.name, what, message, log_path, tail, target.kind)


class TargetResult(NamedTuple):
    name: str
    outcome: Outcome
    reasons: tuple[str, ...] = ()
    duration: float = 0.0
    failure: Failure | None = None


class BuildOptions(NamedTuple):
    """What the user asked for on the command line."""

    targets: tuple[str, ...] = ()
    force: frozenset[str] | None = None  # None: nothing; empty: every selected target
    keep_going: bool = False
    no_cache: bool = False  # do not restore from the output cache (still store)
    jobs: int = 1  # steps running at once
    auto_jobs: bool = False  # no `-j`: an executor with `slots` (Ray: the cluster's CPUs) sets it
    command_line: str = "run"
    executor: str | None = None  # `--executor`: overrides [executor] kind
    address: str | None = None  # `--address`: the Ray cluster
    remote_read_only: bool = False  # `--remote-read-only`: never upload to the remote cache
    restore_only: bool = False  # `mlbuild pull`: restore stale targets from a cache, run none
    name: str | None = None  # `run --name`: the name of the experiment row it builds
    proof: Proof | None = None  # targets the up-to-date stamp proved fresh (uptodate.py)


class BuildResult(NamedTuple):
    results: tuple[TargetResult, ...]
    duration: float
    failures: tuple[Failure, ...] = ()
    # Target -> what proved it fresh: its stat signature, or the (counts, files) of the
    # up-to-date stamp; the next stamp is made from them (uptodate.py). Others: unproven.
    proven: Mapping[str, bytes | ProvenFiles] = EMPTY
    # The experiment row the decided targets are in after the build, when known (the
    # next stamp keeps it: uptodate.py).
    row: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failures

    def count_of(self, outcome: Outcome) -> int:
        return sum(1 for r in self.results if r.outcome is outcome)


class BuildPlan(NamedTuple):
    """What a build is about to decide, for progress and estimates; the CLI reads it up front.

    Built from the graph and the state before the build starts, so that the
    runner needs no knowledge of how progress is drawn.
    """

    targets: tuple[str, ...]  # the selected targets, in build order
    deps: Mapping[str, tuple[str, ...]]  # target -> the targets it needs
    jobs: int = 1
    # target -> how long its step took when it last really ran (Store.load_durations)
    durations: Mapping[str, float] = EMPTY


class Reporter(Protocol):
    """Everything the user is told during a build (see report.py)."""

    def skipped(self, target: str, decision: Decision) -> None: ...
    def started(self, target: str, decision: Decision, command: str) -> None: ...
    def output(self, target: str, data: bytes) -> None: ...
    def finished(self, target: str, duration: float) -> None: ...
    def restored(
        self, target: str, duration: float, original_run: float, *, source: str = "cache"
    ) -> None: ...
    def failed(self, failure: Failure, duration: float) -> None: ...
    def not_run(self, target: str, because: str) -> None: ...
    def interrupted(self, target: str, duration: float) -> None: ...
    def would_run(self, target: str, reasons: Sequence[str]) -> None: ...
    def warn(self, message: str) -> None: ...
    def summary(self, result: BuildResult) -> None: ...


class CliReporter(Reporter, Protocol):
    """A reporter as `mlbuild run` drives it: told the plan first, closed whatever happens.

    `recorded` holds the durations read from the state after the build (a
    restored target's is its original run's), for the time-saved figure.
    """

    def planned(self, plan: BuildPlan) -> None: ...
    def would_restore(self, target: str, reasons: Sequence[str]) -> None: ...
    def summary(self, result: BuildResult, recorded: Mapping[str, float] | None = None) -> None: ...
    def close(self) -> None: ...
