"""The markers of running steps (`.mlbuild/running/`), now reused from one step to the next.

A marker must exist before its step's process does and name that step while it
runs; when mlbuild is killed, the next run stops what the marker names. Reusing
one file for step after step (exec/local.py `_Markers`) must keep all of that:
each step sees a marker naming itself with its own process group, none is left
once the build is over, and a step started in a reused marker is still stopped
after a kill -9.
"""

from __future__ import annotations

import signal
from pathlib import Path

from tests.conftest import Project
from tests.test_parallel import alive, mlbuild, wait_for
from tests.test_trust_proc import HANG, gone, pid_in

# Each step copies the markers it can see (the shell reads them while the step runs).
CAT = "cat .mlbuild/running/.[!.]* .mlbuild/running/* 2>/dev/null > {outputs.o}; true"
SEEN = f"""
[targets.first]
cmd = "{CAT}"
outputs = {{ o = "first.txt" }}

[targets.second]
cmd = "echo $$ > second.pid; {CAT}"
inputs = ["first.txt"]
outputs = {{ o = "second.txt" }}
"""


def _markers_seen(text: str) -> list[tuple[int, str]]:
    """(process group, target) of each non-empty marker in `text` (cat of the markers)."""
    lines = text.splitlines()
    return [(int(lines[i].split()[0]), lines[i + 1]) for i in range(0, len(lines), 2)]


def test_each_step_sees_one_marker_naming_itself_and_none_is_left(project: Project) -> None:
    project.pipeline(SEEN)
    result = project.run("run", "-j1")
    assert result.code == 0, result.err
    [(group1, name1)] = _markers_seen(project.read("first.txt"))
    [(group2, name2)] = _markers_seen(project.read("second.txt"))
    assert (name1, name2) == ("first", "second")
    # The marker names the step before its process exists: by the last pid given out
    # (negative), then by its process group once the spawn returned. A step that reads
    # its marker at once may see either.
    pid = int(project.read("second.pid"))
    assert group2 == pid or -pid < group2 < 0, (group2, pid)
    assert group1 != 0 and group1 != group2
    running = project.root / ".mlbuild" / "running"
    assert not running.exists() or list(running.iterdir()) == []


def test_an_empty_marker_a_killed_mlbuild_left_is_removed_quietly(project: Project) -> None:
    project.pipeline(SEEN)
    running = project.root / ".mlbuild" / "running"
    running.mkdir(parents=True)
    (running / ".step-1-1").write_text("")  # a marker kept for reuse when mlbuild died
    result = project.run("run")
    assert result.code == 0, result.err
    assert "stopped step" not in result.err
    assert list(running.iterdir()) == []


HANGS_SECOND = """
[targets.first]
cmd = "echo one > {outputs.o}"
outputs = { o = "first.txt" }

[targets.second]
cmd = "echo $$ > second.pid; setsid sleep 600 & echo $! > escaped.pid; sleep 600"
inputs = ["first.txt"]
outputs = { o = "second.txt" }
"""


def test_a_step_in_a_reused_marker_is_stopped_after_a_kill_9(project: Project) -> None:
    """`second` starts in the marker `first` gave back: killed -9 then, mlbuild's next run
    still finds and stops `second` and what escaped its group."""
    project.pipeline(HANGS_SECOND)
    proc = mlbuild(project.root, "run", "-j1")
    step = pid_in(project, "second.pid")
    escaped = pid_in(project, "escaped.pid")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=HANG)
    assert alive(step) and alive(escaped)
    project.pipeline(HANGS_SECOND.replace('; sleep 600"', '; echo two > {outputs.o}"'))
    result = project.run("run", "--no-wait")
    assert result.code == 0, result.err
    assert "stopped step `second` left running by an mlbuild that was killed" in result.err
    wait_for(lambda: gone(step) and gone(escaped), timeout=5)
    assert project.read("second.txt") == "two\n"


def test_two_executors_of_one_process_never_share_a_marker(tmp_path: Path) -> None:
    """Each executor counts its markers, but the names are the process's: a second executor
    (a watch cycle's next build, a wrapping executor) never truncates a live marker."""
    from mlbuild.exec.local import LocalExecutor

    one, two = LocalExecutor(tmp_path), LocalExecutor(tmp_path)
    (tmp_path / ".mlbuild" / "running").mkdir(parents=True)
    first = one.markers.take(-5, "a" * 16, "first")
    second = two.markers.take(-5, "b" * 16, "second")
    assert first.path != second.path
    assert first.path.read_text().splitlines()[1] == "first"
    assert second.path.read_text().splitlines()[1] == "second"
    for executor, marker in ((one, first), (two, second)):
        executor.markers.give_back(marker)
        executor.close_warm()
    assert list((tmp_path / ".mlbuild" / "running").iterdir()) == []
