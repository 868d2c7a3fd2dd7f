"""The plain log of a build: one line per event, and the summary.

The events' words are messages.py's, shared with the live view.

Lines go to stdout, failures and warnings to stderr. Steps' own output is
passed through as it arrives (and is always in `.mlbuild/logs/`). This is
the view when output is not a terminal, with `--plain`, and with `-q`; the
live view on a terminal (progress.py) shares the summary defined here.

A stdout that cannot be written (`mlbuild run | head`, a closed terminal)
never stops a build: the reporter says so once on stderr and writes nothing
more there; the build goes on and records everything. The same for stderr,
silently.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import TextIO

from mlbuild.build.results import BuildPlan, BuildResult, Failure, Outcome
from mlbuild.staleness import Decision
from mlbuild.ui import messages
from mlbuild.uptodate import summary_text

MIN_SAVED = 0.01  # less saved than this goes unsaid: "saved 0.002s" is noise


def format_duration(seconds: float) -> str:
    """`0.042s`, `3.2s`, `1m 05s`, `2h 03m`: exact when short, readable when long."""
    if seconds < 1:
        return f"{seconds:.3f}s"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        minutes, rest = divmod(round(seconds), 60)
        return f"{minutes}m {rest:02d}s"
    hours, rest = divmod(round(seconds) // 60, 60)
    return f"{hours}h {rest:02d}m"


def time_saved(result: BuildResult, recorded: Mapping[str, float]) -> tuple[float, str] | None:
    """What skipping and restoring saved, and how (`skipping`, `restoring` or both).

    A skipped target saved what its step took when it last ran; a restored one
    saved its original run's duration less the time the restore took (checking
    a target is paid by every target, so it is not subtracted). `recorded` is
    `Store.load_durations()` read after the build, where a restored target's
    duration is that of the run whose outputs were restored. None when no
    skipped or restored target has a recorded duration.
    """
    saved = 0.0
    how: set[str] = set()
    skipped, restored, get = Outcome.SKIPPED, Outcome.RESTORED, recorded.get
    for r in result.results:  # 10,000 skipped targets: kept to plain comparisons
        outcome = r.outcome
        if outcome is skipped:
            took = get(r.name)
            if took is not None:
                saved += max(0.0, took)
                how.add("skipping")
        elif outcome is restored:
            took = get(r.name)
            if took is not None:
                saved += max(0.0, took - r.duration)
                how.add("restoring")
    if not how:
        return None
    return saved, " and ".join(sorted(how, reverse=True))


def summary_line(result: BuildResult, recorded: Mapping[str, float] | None = None) -> str:
    """`mlbuild: 2 skipped, 1 ran in 3.104s (saved 1m 12s by skipping).`

    Counts per outcome, the build's wall time, and with `recorded` durations
    the time saved by skipping and restoring.
    """
    head, note = summary_parts(result, recorded)
    return summary_text(head, result.duration, note)


def summary_parts(
    result: BuildResult, recorded: Mapping[str, float] | None = None
) -> tuple[str, str]:
    """The summary line before and after its time (`mlbuild: 2 skipped`, ` (saved 1m 12s by
    skipping)`): the up-to-date stamp keeps them to tell a no-op again (uptodate.py)."""
    outcomes = [r.outcome for r in result.results]  # counted by identity: an Enum hashes slowly
    counts = {outcome: outcomes.count(outcome) for outcome in Outcome}
    parts = [f"{counts[outcome]} {outcome.value}" for outcome in Outcome if counts[outcome]]
    text = ", ".join(parts) if parts else "nothing to do"
    saved = time_saved(result, recorded) if recorded is not None else None
    note = ""
    if saved is not None and saved[0] >= MIN_SAVED:
        note = f" (saved {format_duration(saved[0])} by {saved[1]})"
    return f"mlbuild: {text}", note


def stdout_closed() -> bool:
    """Whether writing to file descriptor 1 must fail: a pipe whose reader is gone."""
    import select

    try:
        poller = select.poll()
        poller.register(1, select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def silence_stdout(stream: TextIO) -> None:
    """Point descriptor 1 at /dev/null when `stream` writes to it, so that the final flush
    at exit (Python's, of what is still buffered) cannot fail and print a traceback."""
    try:
        if stream.fileno() != 1:
            return
    except (OSError, ValueError):  # io.StringIO, pytest's capture: nothing to do
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


class PlainReporter:
    """The line-per-event log; `verbosity` -1 is `-q`, 1 is `-v`; `explain` shows all reasons."""

    def __init__(
        self,
        out: TextIO | None = None,
        err: TextIO | None = None,
        *,
        verbosity: int = 0,
        explain: bool = False,
        prefix: bool = False,
    ) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.verbosity = verbosity
        self.explain = explain
        # With -j above 1, output is shown line by line, and while several steps run at
        # once each line is prefixed with its target; partial lines wait for their end.
        # A step running alone writes through as it would at -j 1 (progress bars too).
        self.prefix = prefix
        self.partial: dict[str, bytes] = {}
        self.running: set[str] = set()
        self.tagged: set[str] = set()  # steps shown with prefixes: they keep them to the end
        self.mid_line = False  # the last raw write of a lone step ended inside a line
        self.out_closed = False  # stdout failed once: nothing more is written to it

    def _say(self, line: str) -> None:
        if self.verbosity >= 0:
            self._write_out(line + "\n")

    def _write_out(self, text: str | bytes) -> None:
        """Text or bytes to stdout, unless it failed before; a failure is told once on stderr."""
        if self.out_closed:
            return
        try:
            if isinstance(text, str):
                self.out.write(text)
                self.out.flush()
                return
            self.out.flush()
            buffer = getattr(self.out, "buffer", None)
            if buffer is not None:
                buffer.write(text)
                buffer.flush()
            else:
                self.out.write(text.decode("utf-8", "replace"))
        except (OSError, ValueError) as exc:
            self.out_closed = True
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self._write_err(
                messages.warning(
                    f"cannot write to stdout ({why.lower()}); the build goes on"
                    " (steps' output is in .mlbuild/logs/)"
                )
                + "\n"
            )
            silence_stdout(self.out)

    def _write_err(self, text: str) -> None:
        try:
            self.err.write(text)
            self.err.flush()
        except (OSError, ValueError):
            pass  # stderr is gone too (a closed terminal): nobody is left to tell

    def skipped(self, target: str, decision: Decision) -> None:
        self._say(messages.step_skipped(target, decision.compared if self.explain else None))

    def skipped_all(self, targets: Sequence[str], decisions: Sequence[Decision]) -> None:
        """`skipped` of each target with its decision, in one write: the up-to-date stamp's
        proven targets by the ten thousand (a flush per line cost more than deciding them)."""
        if self.verbosity < 0 or not targets:
            return
        if self.explain:
            step_skipped = messages.step_skipped
            told = zip(targets, decisions, strict=True)
            self._write_out("".join([step_skipped(t, d.compared) + "\n" for t, d in told]))
            return
        head, _, tail = messages.step_skipped("\0").partition("\0")  # the line around a name
        self._write_out(head + f"{tail}\n{head}".join(targets) + tail + "\n")

    def started(self, target: str, decision: Decision, command: str) -> None:
        if self.mid_line:  # a lone step's unfinished line must not run into the next one
            self._write_out("\n")
            self.mid_line = False
        if self.running:  # from now on their lines can interleave: all are prefixed
            self.tagged.update(self.running)
            self.tagged.add(target)
        self.running.add(target)
        self._say(messages.step_started(target, decision.reasons))
        if self.verbosity > 0:
            self._say(messages.step_command(command))

    def output(self, target: str, data: bytes) -> None:
        if self.verbosity < 0:
            return
        if self.prefix and len(self.running) <= 1 and target not in self.tagged:
            self.mid_line = not data.endswith(b"\n")
        elif self.prefix:
            self.tagged.add(target)
            lines = (self.partial.pop(target, b"") + data).split(b"\n")
            if lines[-1]:
                self.partial[target] = lines[-1]
            data = b"".join(f"[{target}] ".encode() + line + b"\n" for line in lines[:-1])
        self._write_bytes(data)

    def _write_bytes(self, data: bytes) -> None:
        self._write_out(data)

    def _flush_partial(self, target: str) -> None:
        self.running.discard(target)
        self.tagged.discard(target)
        if self.mid_line:
            self._write_out("\n")
            self.mid_line = False
        rest = self.partial.pop(target, b"")
        if rest and self.verbosity >= 0:
            self._write_bytes(f"[{target}] ".encode() + rest + b"\n")

    def finished(self, target: str, duration: float) -> None:
        self._flush_partial(target)
        self._say(messages.step_finished(target, duration))

    def restored(
        self, target: str, duration: float, original_run: float, *, source: str = "cache"
    ) -> None:
        self._say(messages.step_restored(target, duration, original_run, source))

    def failed(self, failure: Failure, duration: float) -> None:
        self._flush_partial(failure.target)
        self._write_err("\n".join(messages.step_failed(failure, duration)) + "\n")

    def not_run(self, target: str, because: str) -> None:
        self._say(messages.step_not_run(target, because))

    def interrupted(self, target: str, duration: float) -> None:
        self._flush_partial(target)
        self._say(messages.step_interrupted(target, duration))

    def would_run(self, target: str, reasons: Sequence[str]) -> None:
        self._say(messages.step_would_run(target, reasons))

    def would_restore(self, target: str, reasons: Sequence[str]) -> None:
        self._say(messages.step_would_restore(target, reasons))

    def warn(self, message: str) -> None:
        self._write_err(messages.warning(message) + "\n")

    def planned(self, plan: BuildPlan) -> None:
        """The plain log needs no plan: each line stands alone."""

    def close(self) -> None:
        """Nothing to take down: every line is already written."""

    def summary(self, result: BuildResult, recorded: Mapping[str, float] | None = None) -> None:
        line = summary_line(result, recorded)
        if result.failures:
            self._write_err(messages.summary_with_failures(line, result.failures) + "\n")
        else:
            self._write_out(line + "\n")
