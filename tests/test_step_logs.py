"""Step logs: made at a step's first output, never left from an older run, never followed out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Project

LOGS = ".mlbuild/logs"


def test_a_silent_step_leaves_no_log_and_a_talking_one_keeps_its_output(project: Project) -> None:
    project.write("in.txt", "x\n")
    project.pipeline(
        '[targets.quiet]\ncmd = "cp {inputs.i} {outputs.o}"\n'
        'inputs = { i = "in.txt" }\noutputs = { o = "quiet.txt" }\n\n'
        "[targets.loud]\ncmd = 'echo one; echo two >&2; cp {inputs.i} {outputs.o}'\n"
        'inputs = { i = "in.txt" }\noutputs = { o = "loud.txt" }\n'
    )
    result = project.run("run", "-j", "1")
    assert result.code == 0, result.err
    assert not (project.root / LOGS / "quiet.log").exists()
    assert project.read(f"{LOGS}/loud.log") == "one\ntwo\n"
    quiet = project.run("log", "quiet")
    assert quiet.code == 0 and "output of its last step" not in quiet.out
    loud = project.run("log", "loud")
    assert "output of its last step: " in loud.out and f"{LOGS}/loud.log" in loud.out


def test_a_step_silent_this_time_loses_the_last_runs_log(project: Project) -> None:
    project.write("in.txt", "x\n")
    project.write("say.txt", "hello\n")
    project.pipeline(
        "[targets.t]\ncmd = 'cat {inputs.say}; cp {inputs.i} {outputs.o}'\n"
        'inputs = { i = "in.txt", say = "say.txt" }\noutputs = { o = "out.txt" }\n'
    )
    assert project.run("run").code == 0
    assert project.read(f"{LOGS}/t.log") == "hello\n"
    project.write("say.txt", "")
    assert project.run("run").code == 0
    assert not (project.root / LOGS / "t.log").exists()  # not the older run's "hello"
    assert "output of its last step" not in project.run("log", "t").out


def test_a_silent_failure_points_to_no_log(project: Project) -> None:
    project.pipeline('[targets.t]\ncmd = "false"\noutputs = { o = "out.txt" }\n')
    result = project.run("run")
    assert result.code == 1
    assert "Step `t` failed" in result.err and "exit code 1" in result.err
    assert "full log" not in result.err
    assert not (project.root / LOGS / "t.log").exists()


def test_a_talking_failure_points_to_its_log(project: Project) -> None:
    project.pipeline("[targets.t]\ncmd = 'echo broken; exit 3'\noutputs = { o = \"out.txt\" }\n")
    result = project.run("run")
    assert result.code == 1
    assert "    broken" in result.err
    assert "full log: " in result.err and f"{LOGS}/t.log" in result.err


@pytest.mark.parametrize("link", ["ln -s", "ln"])
def test_a_link_planted_at_the_log_is_neither_followed_nor_truncated(
    project: Project, tmp_path: Path, link: str
) -> None:
    """The log is made at the step's first output, so a step has time to plant a symlink
    or a hard link to a user's file at its name first: that file keeps its bytes (never
    written through, nor truncated), the step fails, and nothing is recorded."""
    theirs = tmp_path.parent / f"{tmp_path.name}-theirs.txt"
    theirs.write_text("theirs\n")
    project.pipeline(
        f"[targets.t]\ncmd = '{link} {theirs} {LOGS}/t.log; echo hi; touch {{outputs.o}}'\n"
        'outputs = { o = "out.txt" }\n'
    )
    result = project.run("run")
    assert result.code == 1
    assert "its output could not be written to its log" in result.err
    assert theirs.read_text() == "theirs\n"
    assert project.run("show", "t").code == 1  # nothing recorded


def test_a_fifo_planted_at_the_log_does_not_hang_the_build(tmp_path: Path) -> None:
    """Opening a FIFO for writing waits for a reader: mlbuild would wait forever. The
    timeout only guards the suite against that hang; the assertions are on the outcome."""
    (tmp_path / "pipeline.toml").write_text(
        f"[targets.t]\ncmd = 'mkfifo {LOGS}/t.log; echo hi; touch {{outputs.o}}'\n"
        'outputs = { o = "out.txt" }\n'
    )
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-m", "mlbuild", "run"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert "its output could not be written to its log" in done.stderr


def test_a_logs_folder_leading_out_of_the_project_is_refused(
    project: Project, tmp_path: Path
) -> None:
    """`.mlbuild/logs` a symlink to elsewhere: no log there is removed or written."""
    outside = tmp_path.parent / f"{tmp_path.name}-logs"
    outside.mkdir()
    (outside / "t.log").write_text("someone's file\n")
    (project.root / ".mlbuild").mkdir()
    (project.root / ".mlbuild/logs").symlink_to(outside)
    project.pipeline("[targets.t]\ncmd = 'echo hi > {outputs.o}'\noutputs = { o = \"o.txt\" }\n")
    result = project.run("run")
    assert result.code == 1
    assert "could not be started" in result.err and "through a symlink" in result.err
    assert (outside / "t.log").read_text() == "someone's file\n"
    assert not (project.root / "o.txt").exists()
