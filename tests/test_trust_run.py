"""What a build never does: delete what mlbuild did not make, write outside the project,
record or cache an output whose inputs changed under it, or interleave with `clean`/`gc`.

Each test is a finding of the adversarial review (issue 12) that failed before the fix.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import Project


def _trash(root: Path) -> list[Path]:
    trash = root / ".mlbuild" / "trash"
    return sorted(p for p in trash.rglob("*") if p.is_file()) if trash.exists() else []


def _mlbuild(root: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mlbuild", *args, "-f", str(root / "pipeline.toml")],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_first_build_moves_existing_files_aside_instead_of_deleting(project: Project) -> None:
    project.write("data/raw.csv", "important\n")
    project.pipeline(
        """
        [targets.prep]
        outputs = ["data"]
        cmd = "mkdir -p data && echo p > data/prepared.csv"
        """
    )
    result = project.run()
    assert result.code == 0, result
    assert (project.root / "data/prepared.csv").read_text() == "p\n"
    kept = _trash(project.root)
    assert [p.name for p in kept] == ["raw.csv"]
    assert kept[0].read_text() == "important\n"
    assert "`prep`: 'data' was not made by mlbuild" in result.err
    assert str(kept[0].parent.parent.relative_to(project.root)) in result.err


def test_a_hand_edited_output_is_moved_aside_not_deleted(project: Project) -> None:
    project.write("in.txt", "a\n")
    project.pipeline(
        """
        [targets.copy]
        inputs = ["in.txt"]
        outputs = ["out.txt"]
        cmd = "cp {inputs} {outputs}"
        """
    )
    assert project.run().code == 0
    project.write("out.txt", "my notes\n")
    result = project.run()
    assert result.code == 0
    assert "restored from cache" in result.out
    assert project.read("out.txt") == "a\n"
    assert [p.read_text() for p in _trash(project.root)] == ["my notes\n"]


def test_an_output_mlbuild_made_is_replaced_without_a_trash_copy(project: Project) -> None:
    project.write("in.txt", "a\n")
    project.pipeline(
        """
        [targets.copy]
        inputs = ["in.txt"]
        outputs = ["out.txt"]
        cmd = "cp {inputs} {outputs}"
        """
    )
    assert project.run().code == 0
    project.write("in.txt", "b\n")
    result = project.run()
    assert result.code == 0 and "moved" not in result.err
    assert project.read("out.txt") == "b\n"
    assert _trash(project.root) == []


def test_an_output_through_a_symlink_leaving_the_project_is_refused(
    project: Project,
) -> None:
    outside = project.root.parent / (project.root.name + "-outside")
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "keep.txt").write_text("mine\n")
    (project.root / "out").symlink_to(outside)
    project.pipeline(
        """
        [targets.w]
        outputs = ["out/sub"]
        cmd = "mkdir -p out/sub && echo x > out/sub/f"
        """
    )
    result = project.run()
    assert result.code == 2, result
    assert (
        "targets.w.outputs" in result.err and "'out/sub' resolves outside the project" in result.err
    )
    assert len(result.err.splitlines()) == 1
    assert sorted(p.name for p in (outside / "sub").iterdir()) == ["keep.txt"]
    clean = project.run("clean")
    assert clean.code == 2 and "resolves outside the project" in clean.err
    assert (outside / "sub" / "keep.txt").read_text() == "mine\n"


def test_input_edited_and_put_back_during_the_step_is_not_cached(project: Project) -> None:
    """The output made from v2 must not be recorded or cached under v1's key (ABA)."""
    project.write("in.txt", "v1\n")
    # The step and the test take turns through marker files (outside the step's
    # declared inputs and outputs): started -> v2 written, go -> read -> v1 put back.
    cmd = (
        "touch started; while [ ! -e go ]; do sleep 0.02; done;"
        " cat {inputs} > {outputs}; touch read; while [ ! -e back ]; do sleep 0.02; done"
    )
    project.pipeline(
        f"""
        [targets.slow]
        inputs = ["in.txt"]
        outputs = ["out.txt"]
        cmd = "{cmd}"
        """
    )
    proc = _mlbuild(project.root, "run")
    _wait_for(lambda: (project.root / "started").exists())
    project.write("in.txt", "v2\n")
    project.write("go", "")
    _wait_for(lambda: (project.root / "read").exists())
    project.write("in.txt", "v1\n")  # same bytes as when the step started
    project.write("back", "")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "input 'in.txt' changed while the step ran" in err
    assert project.read("out.txt") == "v2\n"
    assert not any((project.root / ".mlbuild/cache/runs").rglob("*.json"))

    again = project.run()
    assert again.started() == ["slow"]
    assert "input changed: in.txt" in again.out
    assert "restored" not in again.out
    assert project.read("out.txt") == "v1\n"
    assert _trash(project.root) == []  # the step's own output was mlbuild's to replace
    assert project.run().started() == []


def test_clean_waits_for_a_running_build(project: Project) -> None:
    project.pipeline(
        """
        [targets.big]
        outputs = ["out.txt"]
        cmd = "echo start > {outputs}; sleep 1; echo end >> {outputs}"
        """
    )
    proc = _mlbuild(project.root, "run")
    _wait_for(lambda: (project.root / "out.txt").exists())
    clean = _mlbuild(project.root, "clean")
    _, clean_err = clean.communicate(timeout=30)
    proc.communicate(timeout=30)
    assert proc.returncode == 0 and clean.returncode == 0
    assert "waiting for another mlbuild" in clean_err
    assert not (project.root / "out.txt").exists()
    status = project.run("status")
    assert "stale  big" in status.out
    result = project.run()  # restored from the cache: the entry holds the whole output
    assert result.code == 0
    assert project.read("out.txt") == "start\nend\n"


def test_clean_moves_a_hand_edited_output_aside(project: Project) -> None:
    project.pipeline(
        """
        [targets.a]
        outputs = ["a.txt"]
        cmd = "echo a > {outputs}"
        [targets.b]
        outputs = ["b.txt"]
        cmd = "echo b > {outputs}"
        """
    )
    assert project.run().code == 0
    project.write("b.txt", "edited by hand\n")
    result = project.run("clean")
    assert result.code == 0
    assert "removed a.txt" in result.out
    assert "moved b.txt to .mlbuild/trash/" in result.out
    assert not (project.root / "a.txt").exists() and not (project.root / "b.txt").exists()
    assert [p.read_text() for p in _trash(project.root)] == ["edited by hand\n"]


def test_gc_rejects_negative_limits_and_empties_old_trash(project: Project) -> None:
    project.pipeline(
        """
        [targets.a]
        outputs = ["a.txt"]
        cmd = "echo a > {outputs}"
        """
    )
    project.write("a.txt", "old\n")
    assert project.run().code == 0
    for args in (("--max-size=-5",), ("--keep-runs", "-1")):
        result = project.run("gc", *args)
        assert result.code == 2 and len(result.err.splitlines()) == 1, result
        assert "negative" in result.err or "must be 0 or more" in result.err
    assert _trash(project.root)
    result = project.run("gc")
    assert result.code == 0 and _trash(project.root), "recent trash is kept"
    long_ago = time.time() - 30 * 24 * 3600
    for slot in (project.root / ".mlbuild/trash").iterdir():
        os.utime(slot, (long_ago, long_ago))
    result = project.run("gc")
    assert "emptied 1 trash folders" in result.out
    assert _trash(project.root) == []
    assert project.read("a.txt") == "a\n"


def test_what_a_failed_step_left_is_mlbuilds_to_replace(project: Project) -> None:
    project.pipeline(
        """
        [params]
        ok = 0
        [targets.flaky]
        outputs = ["out.txt"]
        params = ["ok"]
        cmd = "echo partial > {outputs}; test {params.ok} = 1 && echo done > {outputs}"
        """
    )
    assert project.run().code == 1
    assert project.read("out.txt") == "partial\n"  # left for the user to look at
    result = project.run("run", "--set", "ok=1")
    assert result.code == 0 and "moved" not in result.err, result
    assert project.read("out.txt") == "done\n"
    assert _trash(project.root) == []
    assert project.run("run", "--set", "ok=0").code == 1
    project.write("out.txt", "edited after the failure\n")
    result = project.run("run", "--set", "ok=1")
    assert "moved it to .mlbuild/trash/" in result.err
    assert [p.read_text() for p in _trash(project.root)] == ["edited after the failure\n"]


def test_pull_moves_a_hand_edited_output_aside_before_restoring(project: Project) -> None:
    remote = project.root.parent / (project.root.name + "-remote")
    project.pipeline(
        f"""
        [cache]
        remote = "file://{remote}"
        [targets.a]
        outputs = ["a.txt"]
        cmd = "echo a > {{outputs}}"
        """
    )
    assert project.run().code == 0
    project.write("a.txt", "notes\n")
    result = project.run("pull")
    assert result.code == 0, result
    assert project.read("a.txt") == "a\n"
    assert [p.read_text() for p in _trash(project.root)] == ["notes\n"]
