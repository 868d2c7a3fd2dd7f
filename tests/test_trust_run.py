"""What a build never does: delete what mlbuild did not make, write outside the project,
record or cache an output whose inputs changed under it, or interleave with `clean`/`gc`.

Each test is a finding of the adversarial review (issue 12) that failed before the fix.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Project
from tests.entry_rows import rows


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


def built_copy(project: Project) -> None:
    """A one-target project copying in.txt ("a") to out.txt, built once."""
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


def test_a_hand_edited_output_is_moved_aside_not_deleted(project: Project) -> None:
    built_copy(project)
    project.write("out.txt", "my notes\n")
    result = project.run()
    assert result.code == 0
    assert "restored from cache" in result.out
    assert project.read("out.txt") == "a\n"
    assert [p.read_text() for p in _trash(project.root)] == ["my notes\n"]


def test_an_output_mlbuild_made_is_replaced_without_a_trash_copy(project: Project) -> None:
    built_copy(project)
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
    assert rows(project.root) == []

    again = project.run()
    assert again.started() == ["slow"]
    assert "input changed: in.txt" in again.out
    assert "restored" not in again.out
    assert project.read("out.txt") == "v1\n"
    assert _trash(project.root) == []  # the step's own output was mlbuild's to replace
    assert project.run().started() == []


def test_clean_waits_for_a_running_build(project: Project) -> None:
    cmd = "echo start > {outputs}; while [ ! -e go ]; do sleep 0.02; done; echo end >> {outputs}"
    project.pipeline(
        f"""
        [targets.big]
        outputs = ["out.txt"]
        cmd = "{cmd}"
        """
    )
    proc = _mlbuild(project.root, "run")
    _wait_for(lambda: (project.root / "out.txt").exists())
    clean = _mlbuild(project.root, "clean")
    assert clean.stderr is not None
    assert "waiting for another mlbuild" in clean.stderr.readline()
    project.write("go", "")
    clean.communicate(timeout=30)
    proc.communicate(timeout=30)
    assert proc.returncode == 0 and clean.returncode == 0
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
    assert "emptied 1 trash folder older" in result.out
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


def test_a_restore_over_a_persist_output_moves_what_mlbuild_did_not_make(
    project: Project,
) -> None:
    project.write("in.txt", "v1\n")
    project.pipeline(
        """
        [targets.a]
        inputs = ["in.txt"]
        outputs = ["ckpt"]
        persist = true
        cmd = "mkdir -p ckpt; cat in.txt >> ckpt/log.txt"
        """
    )
    assert project.run().code == 0
    project.write("in.txt", "v2\n")
    assert project.run().code == 0
    project.write("ckpt/notes.txt", "my precious notes\n")
    project.write("in.txt", "v1\n")
    result = project.run()
    assert "restored from cache" in result.out, result
    assert project.read("ckpt/log.txt") == "v1\n"
    kept = {p.name: p.read_text() for p in _trash(project.root)}
    assert kept["notes.txt"] == "my precious notes\n"


def test_a_symlink_input_retargeted_and_put_back_during_the_step_is_not_cached(
    project: Project,
) -> None:
    project.write("v1.csv", "v1\n")
    project.write("v2.csv", "v2\n")
    (project.root / "cur.csv").symlink_to("v1.csv")
    cmd = (
        "touch started; while [ ! -e go ]; do sleep 0.02; done;"
        " cat {inputs} > {outputs}; touch read; while [ ! -e back ]; do sleep 0.02; done"
    )
    project.pipeline(
        f"""
        [targets.a]
        inputs = ["cur.csv"]
        outputs = ["out.txt"]
        cmd = "{cmd}"
        """
    )
    proc = _mlbuild(project.root, "run")
    _wait_for(lambda: (project.root / "started").exists())
    (project.root / "cur.csv").unlink()
    (project.root / "cur.csv").symlink_to("v2.csv")
    project.write("go", "")
    _wait_for(lambda: (project.root / "read").exists())
    (project.root / "cur.csv").unlink()
    (project.root / "cur.csv").symlink_to("v1.csv")
    project.write("back", "")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "input 'cur.csv' changed while the step ran" in err
    assert rows(project.root) == []
    (project.root / "out.txt").unlink()
    again = project.run()
    assert "restored" not in again.out
    assert project.read("out.txt") == "v1\n"


def test_an_output_on_another_filesystem_is_moved_aside_or_refused_in_one_line(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rename across filesystems fails with EXDEV: the bytes are copied into the trash.

    A rename that cannot be done at all (a mount point: EBUSY) is one line, and the
    files stay where they are.
    """
    real_rename = os.rename
    failure = {"errno": errno.EXDEV}

    def into_trash_fails(src: str, dst: str) -> None:
        if ".mlbuild/trash" in str(dst):
            raise OSError(failure["errno"], os.strerror(failure["errno"]))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", into_trash_fails)
    project.write("out/keep.txt", "mine\n")
    project.pipeline(
        """
        [targets.a]
        outputs = ["out"]
        cmd = "mkdir -p out && echo made > out/made.txt"
        """
    )
    result = project.run()
    assert result.code == 0, result
    assert [p.read_text() for p in _trash(project.root)] == ["mine\n"]

    failure["errno"] = errno.EBUSY
    project.write("out/more.txt", "also mine\n")
    result = project.run()
    assert result.code == 1 and "Traceback" not in result.err
    assert len(result.err.splitlines()) == 1, result.err
    assert "cannot move 'out' aside" in result.err and "busy" in result.err
    assert project.read("out/more.txt") == "also mine\n"


def test_a_file_where_an_output_needs_a_directory_is_one_line(project: Project) -> None:
    project.pipeline(
        """
        [targets.train]
        outputs = ["model"]
        cmd = "echo w > model"
        """
    )
    assert project.run().code == 0
    project.pipeline(
        """
        [targets.train]
        outputs = ["model/weights.bin"]
        cmd = "mkdir -p model && echo w > model/weights.bin"
        """
    )
    result = project.run()
    assert result.code == 2 and len(result.err.splitlines()) == 1, result
    assert "'model/weights.bin' needs 'model' to be a directory" in result.err
    assert project.read("model") == "w\n"


def test_a_fifo_a_step_leaves_in_its_output_fails_that_target_only(project: Project) -> None:
    project.pipeline(
        """
        [targets.bad]
        outputs = ["out"]
        cmd = "mkdir -p out && mkfifo out/pipe"
        [targets.good]
        outputs = ["good.txt"]
        cmd = "echo ok > good.txt"
        """
    )
    result = project.run("run", "-k", "-j", "1")
    assert result.code == 1, result
    assert "Traceback" not in result.err + result.out
    assert "a FIFO" in result.out + result.err
    assert project.read("good.txt") == "ok\n"


def test_gc_on_a_disk_that_takes_no_write_is_one_line(project: Project) -> None:
    """A full disk (every write fails with EFBIG): one line, not a traceback from the lock."""
    import resource

    project.pipeline(
        """
        [targets.a]
        outputs = ["a.txt"]
        cmd = "echo a > a.txt"
        """
    )
    assert project.run().code == 0
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))  # every write: EFBIG
    try:
        result = project.run("gc")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    # Before, the lock's own write was a traceback; now the state's one line says it all.
    assert "Traceback" not in result.err
    assert result.code == 1 and len(result.err.splitlines()) == 1, result
    assert "state.db" in result.err


def test_a_damaged_parsed_code_row_is_parsed_again(project: Project) -> None:
    import sqlite3

    project.write("steps/s.py", "def go(out):\n    out.write_text('x')\n")
    project.pipeline(
        """
        [targets.s]
        outputs = { out = "out.txt" }
        python = "steps.s:go"
        """
    )
    assert project.run().code == 0
    with sqlite3.connect(project.root / ".mlbuild/state.db") as conn:
        assert conn.execute("UPDATE parsed SET data = '{not json'").rowcount >= 1
    result = project.run()
    assert result.code == 0 and "Traceback" not in result.err, result
    assert result.started() == []


def test_a_step_that_fills_the_disk_fails_alone_and_records_nothing(project: Project) -> None:
    """A full disk in the step (`ulimit -f`: writes fail with EFBIG): one failure, no record."""
    project.pipeline(
        """
        [params]
        blocks = 1
        [targets.big]
        outputs = ["big.bin"]
        params = ["blocks"]
        cmd = "ulimit -f {params.blocks}; head -c 100000 /dev/zero > {outputs}"
        [targets.small]
        outputs = ["small.txt"]
        cmd = "echo ok > {outputs}"
        """
    )
    result = project.run("run", "-k", "-j", "1")
    assert result.code == 1 and "Traceback" not in result.err + result.out
    assert "Step `big` failed" in result.out + result.err
    assert project.read("small.txt") == "ok\n"
    assert "stale  big" in project.run("status").out
    result = project.run("run", "--set", "blocks:=unlimited")
    assert result.code == 0, result
    assert (project.root / "big.bin").stat().st_size == 100000
    assert _trash(project.root) == []  # what the failed step left was mlbuild's own
