"""The words of a build's report: one function per message, shared by both reporters.

The plain log (report.py) and the live view (progress.py) tell the same events
in the same words, so a user (or a script reading the log) sees one wording
whichever view is on; `mlbuild` and `mlbuild watch` end on the same error line.
The texts live here once; how a line is shown (colors, above the live area,
stdout or stderr) stays with each reporter.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from mlbuild.build.results import Failure
from mlbuild.pipeline.schema import ActionKind


def _why(reasons: Sequence[str]) -> str:
    return "; ".join(reasons)


def step_skipped(target: str, compared: str | None = None) -> str:
    """A fresh target; with `compared` (`--explain`), what was found equal."""
    if compared is None:
        return f"Step `{target}` is up to date (skipped)."
    return f"Step `{target}` is up to date (skipped): {compared}."


def step_started(target: str, reasons: Sequence[str]) -> str:
    return f"Step `{target}` has started: {_why(reasons)}."


def step_command(command: str) -> str:
    """The command a started step runs, shown under it with `-v`."""
    return f"  $ {command}"


def step_finished(target: str, duration: float) -> str:
    return f"Step `{target}` has finished in {duration:.3f}s."


def step_restored(target: str, duration: float, original_run: float, source: str) -> str:
    """`original_run` is when the run whose outputs were restored ended (epoch seconds)."""
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(original_run))
    return f"Step `{target}` restored from {source} in {duration:.3f}s (run {when})."


def step_not_run(target: str, because: str) -> str:
    return f"Step `{target}` was not run: {because}."


def step_interrupted(target: str, duration: float) -> str:
    """A step stopped while it ran (Ctrl-C, SIGTERM): it left no record and runs again."""
    return f"Step `{target}` was interrupted after {duration:.3f}s."


def watch_stopped(interrupted: Sequence[str]) -> str:
    """What `mlbuild watch` says when it stops, naming the steps it stopped mid-run."""
    if not interrupted:
        return "stopped."
    names = ", ".join(f"`{name}`" for name in interrupted)
    again = "it runs" if len(interrupted) == 1 else "they run"
    return f"stopped; interrupted {names}: {again} again on the next build."


def step_would_run(target: str, reasons: Sequence[str]) -> str:
    return f"Step `{target}` would run: {_why(reasons)}."


def step_would_restore(target: str, reasons: Sequence[str]) -> str:
    return f"Step `{target}` would restore from cache: {_why(reasons)}."


def step_failed(failure: Failure, duration: float) -> list[str]:
    """What a failed step tells: target, why, command, the tail of its output, its log."""
    lines = [f"Step `{failure.target}` failed after {duration:.3f}s: {failure.message}."]
    label = "function" if failure.kind is ActionKind.PYTHON else "command"
    lines.append(f"  {label}: {failure.command}")
    if failure.tail:
        lines.append("  last lines of its output:")
        lines.extend(f"    {line}" for line in failure.tail)
    if failure.log_path is not None:
        lines.append(f"  full log: {failure.log_path}")
    return lines


def warning(message: str) -> str:
    return f"mlbuild: warning: {message}"


def error(text: str) -> str:
    """The one line a user error (exit 2) or a stopped command says, on stderr."""
    return f"mlbuild: error: {one_line(text)}"


def interrupted() -> str:
    """Ctrl-C, SIGTERM, a closed terminal: what was recorded stays recorded."""
    return "mlbuild: interrupted; finished targets are recorded."


def one_line(text: str) -> str:
    """Control characters (a newline in a quoted TOML key) escaped: errors are one line."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text)


def summary_with_failures(summary: str, failures: Sequence[Failure]) -> str:
    """The summary line of a build that failed, naming the failed targets."""
    return f"{summary} Failed: {', '.join(f.target for f in failures)}."


def plural(n: int, word: str, words: str | None = None) -> str:
    """Counts as read: "1 object", "2 objects"; `words` for another plural ("entries")."""
    return f"{n} {word}" if n == 1 else f"{n} {words or word + 's'}"
