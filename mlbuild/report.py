"""Everything the user reads during a build: one plain line per event, in ZenML's voice.

Lines go to stdout, failures and warnings to stderr. Steps' own output is
passed through as it arrives (and is always in `.mlbuild/logs/`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TextIO

from mlbuild.runner import BuildResult, Failure, Outcome
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
    ) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.verbosity = verbosity
        self.explain = explain

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
        if self.verbosity >= 0:
            self.out.flush()
            buffer = getattr(self.out, "buffer", None)
            if buffer is not None:
                buffer.write(data)
                buffer.flush()
            else:
                self.out.write(data.decode("utf-8", "replace"))

    def finished(self, target: str, duration: float) -> None:
        self._say(f"Step `{target}` has finished in {duration:.3f}s.")

    def restored(self, target: str, duration: float, original_run: float) -> None:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(original_run))
        self._say(f"Step `{target}` restored from cache in {duration:.3f}s (run {when}).")

    def failed(self, failure: Failure, duration: float) -> None:
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
