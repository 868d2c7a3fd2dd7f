"""The plain log and the end-of-run summary: counts, wall time, and the time saved."""

from __future__ import annotations

import io
import re
import sqlite3

import pytest

from mlbuild.build.results import BuildResult, Outcome, TargetResult
from mlbuild.staleness import fresh_decision
from mlbuild.ui.report import PlainReporter, format_duration, summary_line
from tests.conftest import Project


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0.0421, "0.042s"), (3.24, "3.2s"), (65.2, "1m 05s"), (3599.4, "59m 59s"), (7390, "2h 03m")],
)
def test_durations_read_exact_when_short_and_coarse_when_long(seconds: float, shown: str) -> None:
    assert format_duration(seconds) == shown


def test_summary_counts_outcomes_and_adds_the_time_saved_from_recorded_durations() -> None:
    result = BuildResult(
        (
            TargetResult("prepare", Outcome.SKIPPED, duration=0.002),
            TargetResult("train", Outcome.RESTORED, duration=0.25),
            TargetResult("evaluate", Outcome.RAN, duration=1.5),
        ),
        2.0,
    )
    # Skipping prepare saved its 30 s; restoring train saved its original 60 s
    # less the 0.25 s the restore took. What ran saved nothing.
    recorded = {"prepare": 30.0, "train": 60.0, "evaluate": 1.5}
    assert summary_line(result, recorded) == (
        "mlbuild: 1 skipped, 1 ran, 1 restored in 2.000s (saved 1m 30s by skipping and restoring)."
    )
    # Without recorded durations (or none for what was skipped) nothing is claimed.
    assert summary_line(result) == "mlbuild: 1 skipped, 1 ran, 1 restored in 2.000s."
    assert summary_line(result, {"evaluate": 1.5}) == summary_line(result)
    assert summary_line(BuildResult((), 0.001), {}) == "mlbuild: nothing to do in 0.001s."


STEPS = """
[params]
v = 1

[targets.slow]
cmd = "sleep 0.2; echo {params.v} > {outputs.o}"
outputs = { o = "slow.txt" }
params = ["v"]

[targets.quick]
cmd = "cat {inputs.s} > {outputs.o}"
inputs = { s = "slow.txt" }
outputs = { o = "quick.txt" }
"""


def test_no_op_summary_says_what_the_skipped_steps_took_when_they_ran(project: Project) -> None:
    project.pipeline(STEPS)
    assert project.run("run", "-j", "1").code == 0
    with sqlite3.connect(project.root / ".mlbuild/state.db") as db:
        db.execute("UPDATE manifests SET duration = 42.0 WHERE target = 'slow'")
        db.execute("UPDATE manifests SET duration = 18.0 WHERE target = 'quick'")
    again = project.run()
    assert re.search(
        r"^mlbuild: 2 skipped in \d\.\d{3}s \(saved 1m 00s by skipping\)\.$", again.out, re.M
    ), again.out


def test_restore_summary_saves_the_original_run_less_the_restore(project: Project) -> None:
    project.pipeline(STEPS)
    project.run()
    project.run("run", "--set", "v=2")
    back = project.run("run", "--set", "v=1", "-j", "1")
    restore = float(re.findall(r"Step `slow` restored from cache in ([\d.]+)s", back.out)[0])
    with sqlite3.connect(project.root / ".mlbuild/state.db") as db:
        (original,) = db.execute("SELECT duration FROM manifests WHERE target = 'slow'").fetchone()
    assert 0.2 <= original < 1.0  # the first run's sleep, not the restore
    saved = re.findall(r"\(saved ([\d.]+)s by restoring\)\.$", back.out, re.M)
    # quick was restored too, its few milliseconds count as well.
    assert saved and float(saved[0]) == pytest.approx(original - restore, abs=0.05)


def test_verbose_plain_log_adds_the_reasons_of_fresh_targets_and_commands(
    project: Project,
) -> None:
    project.pipeline(STEPS)
    project.run()
    result = project.run("run", "-v", "--set", "v=3", "-j", "1")
    assert (
        "Step `slow` has started: param v changed 1 -> 3.\n  $ sleep 0.2; echo 3 > slow.txt\n"
        in (result.out)
    )
    project.run("run", "--set", "v=3")
    fresh = project.run("run", "-v", "--set", "v=3")
    assert "Step `slow` is up to date (skipped): same action, 1 param, 1 output." in fresh.out


@pytest.mark.parametrize("explain", [False, True])
def test_skipped_all_writes_the_lines_skipped_writes_one_by_one(explain: bool) -> None:
    """The stamp's proven targets are told in one write, line for line as one by one."""
    names = ["a", "b.c", "d@x=1"]
    decisions = [fresh_decision((0, 0, 0, 0, 1, 0, 1))] * 3
    together, apart = io.StringIO(), io.StringIO()
    PlainReporter(together, explain=explain).skipped_all(names, decisions)
    each = PlainReporter(apart, explain=explain)
    for name, decision in zip(names, decisions, strict=True):
        each.skipped(name, decision)
    assert together.getvalue() == apart.getvalue()
    assert together.getvalue().count("is up to date (skipped)") == 3
    quiet = io.StringIO()
    PlainReporter(quiet, verbosity=-1).skipped_all(names, decisions)
    assert quiet.getvalue() == ""
