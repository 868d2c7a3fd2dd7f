"""Everything the user reads during a build: one plain line per event, in ZenML's voice.

Lines go to stdout, failures and warnings to stderr. Steps' own output is
passed through as it arrives (and is always in `.mlbuild/logs/`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TextIO

from mlbuild.results import BuildResult, Failure, Outcome
from mlbuild.staleness import Decision


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
        # With several steps running at once, their output is shown line by line,
        # each line prefixed with its target; partial lines wait for their end.
        self.prefix = prefix
        self.partial: dict[str, bytes] = {}

    def _say(self, line: str) -> None:
        if self.verbosity >= 0:
            self.out.write(line + "\n")
            self.out.flush()

    def skipped(self, target: str, decision: Decision) -> None:
        if self.explain:
            self._say(f"Step `{target}` is up to date (skipped): {decision.compared}.")
        else:
            self._say(f"Step `{target}` is up to date (skipped).")

    def started(self, target: str, decision: Decision, command: str) -> None:
        self._say(f"Step `{target}` has started: {'; '.join(decision.reasons)}.")
        if self.verbosity > 0:
            self._say(f"  $ {command}")

    def output(self, target: str, data: bytes) -> None:
        if self.verbosity < 0:
            return
        if self.prefix:
            lines = (self.partial.pop(target, b"") + data).split(b"\n")
            if lines[-1]:
                self.partial[target] = lines[-1]
            data = b"".join(f"[{target}] ".encode() + line + b"\n" for line in lines[:-1])
        self._write_bytes(data)

    def _write_bytes(self, data: bytes) -> None:
        self.out.flush()
        buffer = getattr(self.out, "buffer", None)
        if buffer is not None:
            buffer.write(data)
            buffer.flush()
        else:
            self.out.write(data.decode("utf-8", "replace"))

    def _flush_partial(self, target: str) -> None:
        rest = self.partial.pop(target, b"")
        if rest and self.verbosity >= 0:
            self._write_bytes(f"[{target}] ".encode() + rest + b"\n")

    def finished(self, target: str, duration: float) -> None:
        self._flush_partial(target)
        self._say(f"Step `{target}` has finished in {duration:.3f}s.")

    def restored(self, target: str, duration: float, original_run: float) -> None:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(original_run))
        self._say(f"Step `{target}` restored from cache in {duration:.3f}s (run {when}).")

    def failed(self, failure: Failure, duration: float) -> None:
        self._flush_partial(failure.target)
        lines = [f"Step `{failure.target}` failed after {duration:.3f}s: {failure.message}."]
        lines.append(f"  command: {failure.command}")
        if failure.tail:
            lines.append("  last lines of its output:")
            lines.extend(f"    {line}" for line in failure.tail)
        if failure.log_path is not None:
            lines.append(f"  full log: {failure.log_path}")
        self.err.write("\n".join(lines) + "\n")
        self.err.flush()

    def not_run(self, target: str, because: str) -> None:
        self._say(f"Step `{target}` was not run: {because}.")

    def would_run(self, target: str, reasons: Sequence[str]) -> None:
        self._say(f"Step `{target}` would run: {'; '.join(reasons)}.")

    def warn(self, message: str) -> None:
        self.err.write(f"mlbuild: warning: {message}\n")
        self.err.flush()

    def summary(self, result: BuildResult) -> None:
        parts = []
        for outcome in Outcome:
            count = result.count(outcome)
            if count:
                parts.append(f"{count} {outcome.value}")
        text = ", ".join(parts) if parts else "nothing to do"
        line = f"mlbuild: {text} in {result.duration:.3f}s."
        if result.failures:
            names = ", ".join(f.target for f in result.failures)
            self.err.write(f"{line} Failed: {names}.\n")
            self.err.flush()
        else:
            self.out.write(line + "\n")
            self.out.flush()
