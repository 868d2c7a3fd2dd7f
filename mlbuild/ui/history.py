"""What the state remembers, as text: past runs (`mlbuild log`) and a target's manifest (`show`).

Reads only what store.py returns; nothing here opens the database or decides
anything. Times are local, to the second, as a user compares them with a
clock; durations use the summary's format.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlbuild.build.results import Outcome
from mlbuild.manifest import Fingerprint, split
from mlbuild.store import RunRecord, RunRow, StoredManifest, TargetRun
from mlbuild.ui.messages import plural
from mlbuild.ui.report import format_duration

NAMES_SHOWN = 8  # target names listed per outcome in `log` before "and N more"
DIGEST_SHOWN = 16  # hex digits of a digest in `show` (`--json` has them whole)
# The outcomes `log` lists by name; skipped targets are only counted.
_NAMED = (
    Outcome.RAN,
    Outcome.RESTORED,
    Outcome.FAILED,
    Outcome.INTERRUPTED,
    Outcome.NOT_RUN,
    Outcome.CLEANED,
)
_UNFINISHED = (Outcome.FAILED.value, Outcome.INTERRUPTED.value)  # ran, but not to success
_UNTIMED = (Outcome.NOT_RUN.value, Outcome.CLEANED.value)  # nothing ran: no duration to show


def when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def render_runs(runs: Sequence[RunRecord]) -> str:
    """`mlbuild log`: each run, newest first, with what it did to which targets."""
    if not runs:
        return "No runs recorded yet.\n"
    lines: list[str] = []
    for run in runs:
        took = format_duration(run.finished_at - run.started_at)
        lines.append(f"run {run.id}  {when(run.started_at)}  {took}  {run.status}")
        lines.append(f"    mlbuild {run.command}")
        by_status: dict[str, list[str]] = {}
        for row in run.targets:
            shown = row.target if row.status in _UNTIMED else _timed(row)
            by_status.setdefault(row.status, []).append(shown)
        skipped = len(by_status.pop(Outcome.SKIPPED.value, []))
        for outcome in _NAMED:
            names = by_status.pop(outcome.value, [])
            if names:
                lines.append(f"    {outcome.value:<8}  {len(names)}: {_some(names)}")
        if skipped:
            lines.append(f"    {Outcome.SKIPPED.value:<8}  {skipped}")
        for status, names in by_status.items():  # written by a newer mlbuild
            lines.append(f"    {status:<8}  {len(names)}: {_some(names)}")
        if not run.targets:
            lines.append("    no targets decided")
        lines.append("")
    return "\n".join(lines)


def _timed(row: RunRow) -> str:
    return f"{row.target} ({format_duration(row.duration)})"


def _some(names: Sequence[str]) -> str:
    shown = ", ".join(names[:NAMES_SHOWN])
    more = len(names) - NAMES_SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


def render_target_runs(target: str, rows: Sequence[TargetRun]) -> str:
    """`mlbuild log TARGET`: the target in each run, newest first, and its run times."""
    if not rows:
        return f"No runs of `{target}` recorded yet.\n"
    lines = [f"{target}: the last {plural(len(rows), 'run')} that decided it", ""]
    for row in rows:
        reason = f"  {row.reason}" if row.reason else ""
        took = format_duration(row.duration)
        lines.append(
            f"run {row.run_id:<4} {when(row.started_at)}  {row.status:<8}  {took:>7}{reason}"
        )
    ran = [row.duration for row in rows if row.status == Outcome.RAN.value]
    lines.append("")
    if ran:
        lines.append(
            f"ran {plural(len(ran), 'time')}: last {format_duration(ran[0])},"
            f" median {format_duration(statistics.median(ran))},"
            f" fastest {format_duration(min(ran))}, slowest {format_duration(max(ran))}"
        )
    elif any(row.status in _UNFINISHED for row in rows):
        lines.append("its step did not run to success in these runs")
    else:
        lines.append("its step did not run in these runs")
    return "\n".join(lines) + "\n"


def render_manifest(
    target: str,
    stored: StoredManifest,
    built_by: TargetRun | None,
    log: Path | None,
) -> str:
    """`mlbuild show TARGET`: the manifest of its last successful build, readable.

    `built_by` is the last run in which the target ran or was restored (the
    manifest's time is when that happened; its duration is the step's own, for
    a restore the original run's); `log` is its captured output, when present.
    """
    fingerprint = Fingerprint.from_json(stored.data)
    lines = [f"{target}"]
    how = ""
    if built_by is not None:
        verb = "restored from cache" if built_by.status == Outcome.RESTORED.value else "ran"
        how = f" ({verb} in run {built_by.run_id})"
    lines.append(f"  built     {when(stored.finished_at)}{how}")
    took = f"{stored.duration:.3f}s"
    if built_by is not None and built_by.status == Outcome.RESTORED.value:
        took += f" (when it ran; the restore took {built_by.duration:.3f}s)"
    lines.append(f"  took      {took}")
    shown_log = str(log) if log is not None else "(none)"
    if log is not None and built_by is not None and built_by.status == Outcome.RESTORED.value:
        # Logs are not cached: the file is from the last time the step really ran.
        shown_log += " (of its last run, not the one restored)"
    lines.append(f"  log       {shown_log}")
    if fingerprint is None:
        lines.append("  (the manifest was written by another version of mlbuild)")
        return "\n".join(lines) + "\n"
    lines.append(f"  action    {_action(fingerprint.action)}")
    sections: list[tuple[str, Mapping[str, Any]]] = [
        ("params", fingerprint.params),
        ("inputs", {p: _digest(d) for p, d in fingerprint.inputs.items()}),
        ("code", {p: _digest(d) for p, d in fingerprint.code.items()}),
        ("outputs", {p: _digest(d) for p, d in fingerprint.outputs.items()}),
        # Values are kept as digests only: `show` says whether a variable was set, never its value.
        ("env", {k: "(unset)" if v is None else "set" for k, v in fingerprint.env.items()}),
        ("packages", {k: "(absent)" if v is None else v for k, v in fingerprint.packages.items()}),
        (
            "discovered inputs (read by the step but not declared: add them to `inputs`)",
            {p: _digest(d) for p, d in fingerprint.discovered.items()},
        ),
    ]
    for title, items in sections:
        if not items:
            continue
        lines.append(f"  {title}")
        width = max(len(key) for key in items)
        lines.extend(f"    {key:<{width}}  {value}" for key, value in sorted(items.items()))
    for path in fingerprint.dynamic:
        lines.append(
            f"  note: {path} imports a module by a computed name, so the code closure may be"
            " incomplete: modules the step imported when it ran are tracked; declare files"
            " it loads otherwise in `inputs`"
        )
    return "\n".join(lines) + "\n"


def _action(action: str) -> str:
    return f"python {action[len('python:') :]}" if action.startswith("python:") else action


def _digest(text: str) -> str:
    """`file:1a2b...` shortened to DIGEST_SHOWN hex digits; other forms unchanged."""
    kind, digest = split(text)
    if kind is None:
        return text[:DIGEST_SHOWN]
    return f"{kind}:{digest[:DIGEST_SHOWN]}" if digest else str(kind)


def manifest_json(
    target: str, stored: StoredManifest, built_by: TargetRun | None, log: Path | None
) -> str:
    """`mlbuild show --json`: the manifest with whole digests, and when and how it was built.

    Parameters are stored as canonical encodings (fingerprint.encode_value);
    here they are decoded to their TOML types (`"epochs": 1`, not `"1"`), a
    date or time as its ISO text, since JSON has no such type.
    """
    manifest = json.loads(stored.data)
    if isinstance(manifest, dict) and isinstance(manifest.get("params"), dict):
        manifest["params"] = {k: _decoded(v) for k, v in manifest["params"].items()}
    data = {
        "target": target,
        "finished_at": stored.finished_at,
        "duration": stored.duration,
        "built_by": None
        if built_by is None
        else {"run": built_by.run_id, "outcome": built_by.status},
        "log": None if log is None else str(log),
        "manifest": manifest,
    }
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


_DATES = ("$date", "$datetime", "$time")  # how encode_value writes TOML's date and time values


def _decoded(encoded: Any) -> Any:
    """A parameter's value from its canonical encoding; text that is not one stays as it is."""
    if not isinstance(encoded, str):
        return encoded
    try:
        return json.loads(encoded, object_hook=_undate, parse_constant=str)  # inf: "Infinity"
    except ValueError:
        return encoded


def _undate(obj: dict[str, Any]) -> Any:
    if len(obj) == 1:
        key, value = next(iter(obj.items()))
        if key in _DATES and isinstance(value, str):
            return value
    return obj
