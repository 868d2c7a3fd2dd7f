"""Parallel builds, failures, interrupts, crashes and the workspace lock, with real processes."""

from __future__ import annotations

import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Project


def spans(project: Project, names: list[str]) -> dict[str, tuple[float, float]]:
    """(start, end) wall times each step wrote to times/<name>."""
    result = {}
    for name in names:
        start, end = (project.root / "times" / name).read_text().split()
        result[name] = (float(start), float(end))
    return result


def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


TIMED = 'mkdir -p times; s=$(date +%s.%N); sleep {secs}; echo "$s $(date +%s.%N)" > times/{name}'


def timed_target(name: str, secs: float, extra: str = "") -> str:
    cmd = TIMED.format(secs=secs, name=name)
    return (
        f"[targets.{name}]\ncmd = '{cmd}; touch {{outputs.o}}'\n"
        f'outputs = {{ o = "out/{name}" }}\n{extra}\n'
    )


def test_independent_targets_run_concurrently(project: Project) -> None:
    project.pipeline(timed_target("a", 0.4) + timed_target("b", 0.4))
    result = project.run("run", "-j", "2")
    assert result.code == 0, result.err
    times = spans(project, ["a", "b"])
    assert overlap(times["a"], times["b"])
    serial = project.run("run", "-j", "1", "--force")
    assert serial.code == 0
    times = spans(project, ["a", "b"])
    assert not overlap(times["a"], times["b"])


def test_pool_limits_concurrency_of_its_members(project: Project) -> None:
    project.pipeline(
        "[pools]\ngpu = 1\n\n"
        + timed_target("train1", 0.4, 'pool = "gpu"')
        + timed_target("train2", 0.4, 'pool = "gpu"')
        + timed_target("prep", 0.4)
    )
    result = project.run("run", "-j", "3")
    assert result.code == 0, result.err
    times = spans(project, ["train1", "train2", "prep"])
    assert not overlap(times["train1"], times["train2"])
    assert overlap(times["prep"], times["train1"]) or overlap(times["prep"], times["train2"])


def test_output_of_concurrent_targets_is_prefixed_and_logged(project: Project) -> None:
    project.pipeline(
        """
        [targets.a]
        cmd = "echo alpha one; sleep 0.2; echo alpha two; touch {outputs}"
        outputs = ["a.out"]

        [targets.b]
        cmd = "echo beta one; sleep 0.1; printf 'beta partial'; touch {outputs}"
        outputs = ["b.out"]
        """
    )
    result = project.run("run", "-j", "2")
    # `a` may print its first line before `b` starts (targets are checked while steps
    # run): alone, it is not prefixed; from `b`'s start on, both steps' lines are.
    assert "[a] alpha one\n" in result.out or "\nalpha one\n" in result.out
    assert "[a] alpha two\n" in result.out
    assert "[b] beta partial\n" in result.out
    assert project.read(".mlbuild/logs/a.log") == "alpha one\nalpha two\n"


def test_a_step_running_alone_is_not_prefixed_even_above_j1(project: Project) -> None:
    """Prefixes tell apart the output of steps running at once; one step alone has none."""
    project.pipeline(
        """
        [targets.a]
        cmd = "echo alpha one; printf 'alpha partial'; touch {outputs}"
        outputs = ["a.out"]

        [targets.b]
        cmd = "echo beta one; touch {outputs}"
        inputs = ["a.out"]
        outputs = ["b.out"]
        """
    )
    result = project.run("run", "-j", "2")
    assert result.code == 0, result.err
    assert "alpha one\nalpha partial\n" in result.out
    assert "beta one\n" in result.out
    assert "[a]" not in result.out and "[b]" not in result.out


FAILING = """
[targets.bad]
cmd = "sleep 0.1; exit 4"
outputs = ["bad.out"]

[targets.after_bad]
cmd = "touch {outputs}"
inputs = ["bad.out"]
outputs = ["after.out"]

[targets.slow_ok]
cmd = "sleep 0.5; touch {outputs}"
outputs = ["slow.out"]

[targets.later]
cmd = "touch {outputs}"
inputs = ["slow.out"]
outputs = ["later.out"]
"""


def test_keep_going_builds_everything_not_downstream_of_a_failure(project: Project) -> None:
    project.pipeline(FAILING)
    result = project.run("run", "-k", "-j", "2")
    assert result.code == 1
    assert (project.root / "later.out").exists()
    assert "Step `after_bad` was not run: upstream 'bad' failed." in result.out
    assert "Failed: bad." in result.err
    assert "1 not run" in result.err


def test_without_keep_going_running_steps_finish_but_nothing_new_starts(
    project: Project,
) -> None:
    project.pipeline(FAILING)
    result = project.run("run", "-j", "2")
    assert result.code == 1
    # slow_ok was running when bad failed: it finishes and is recorded...
    assert (project.root / "slow.out").exists()
    assert "Step `slow_ok` has finished" in result.out
    # ...but later, which became ready after the failure, never starts.
    assert not (project.root / "later.out").exists()
    assert "Step `later` was not run: the build stopped after a failure." in result.out
    status = project.run("status", "slow_ok")
    assert status.code == 0


def mlbuild(cwd: Path, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return subprocess.Popen(
        [sys.executable, "-m", "mlbuild", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (not yet reaped by its parent) counts as gone.
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()[0] != "Z"


INTERRUPTIBLE = """
[targets.quick]
cmd = "touch {outputs}"
outputs = ["quick.out"]

[targets.long]
cmd = '''echo $$ > long.pid; (sleep 60; echo child) & echo $! > child.pid
%s sleep 60; touch {outputs}'''
inputs = ["quick.out"]
outputs = ["long.out"]
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_stops_steps_and_keeps_finished_work(project: Project, sig: int) -> None:
    project.pipeline(INTERRUPTIBLE % "")
    proc = mlbuild(project.root, "run")
    wait_for(lambda: (project.root / "child.pid").exists())
    time.sleep(0.1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130
    assert "interrupted" in err
    for pidfile in ("long.pid", "child.pid"):
        pid = int(project.read(pidfile))
        wait_for(lambda pid=pid: not alive(pid), timeout=5)  # type: ignore[misc]
    status = project.run("status")
    assert "fresh  quick" in status.out
    assert "stale  long: its last run was interrupted" in status.out


def test_second_interrupt_kills_at_once(project: Project) -> None:
    project.pipeline(INTERRUPTIBLE % "trap '' TERM;")
    proc = mlbuild(project.root, "run")
    wait_for(lambda: (project.root / "child.pid").exists())
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    assert proc.poll() is None  # waiting out the grace period: the step ignores SIGTERM
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=20)
    assert proc.returncode == 130
    assert time.monotonic() - start < 3
    pid = int(project.read("long.pid"))
    wait_for(lambda: not alive(pid), timeout=5)


def test_second_run_waits_for_the_lock_or_fails_with_no_wait(project: Project) -> None:
    project.pipeline(
        """
        [targets.hold]
        cmd = "touch started; while [ ! -e release ]; do sleep 0.02; done; touch {outputs}"
        outputs = ["hold.out"]
        """
    )
    first = mlbuild(project.root, "run")
    wait_for(lambda: (project.root / "started").exists())
    busy = project.run("run", "--no-wait")
    assert busy.code == 1
    assert f"another mlbuild is running in this workspace (pid {first.pid}: mlbuild run)" in (
        busy.err
    )
    start = time.monotonic()
    assert project.run("status").code == 1  # read-only: never blocks
    assert project.run("list").code == 0
    assert time.monotonic() - start < 5
    second = mlbuild(project.root, "run")
    time.sleep(0.5)
    assert second.poll() is None
    (project.root / "release").touch()
    first.communicate(timeout=20)
    out, err = second.communicate(timeout=20)
    assert "waiting for another mlbuild in this workspace" in err
    assert second.returncode == 0
    assert "Step `hold` is up to date (skipped)." in out


def test_lock_of_a_killed_mlbuild_is_taken_over(project: Project) -> None:
    project.pipeline(INTERRUPTIBLE % "")
    proc = mlbuild(project.root, "run")
    wait_for(lambda: (project.root / "child.pid").exists())
    proc.kill()
    proc.communicate()
    orphan = int(project.read("long.pid"))
    assert alive(orphan)  # the step outlived mlbuild...
    project.pipeline((INTERRUPTIBLE % "").replace("sleep 60", "true"))
    result = project.run("run", "--no-wait")
    assert result.code == 0, result.err
    assert "stopped step `long` left running by an mlbuild that was killed" in result.err
    assert not alive(orphan)  # ...until the next run stopped it


def test_input_modified_while_running_makes_the_target_stale(project: Project) -> None:
    project.pipeline(
        """
        [targets.slow]
        cmd = "cp {inputs.i} {outputs.o}; touch copied; sleep 0.5"
        inputs = { i = "in.txt" }
        outputs = { o = "out.txt" }
        """
    )
    project.write("in.txt", "version 1\n")
    proc = mlbuild(project.root, "run")
    wait_for(lambda: (project.root / "copied").exists())
    project.write("in.txt", "version 2\n")
    proc.communicate(timeout=20)
    assert proc.returncode == 0
    result = project.run()
    assert "Step `slow` has started: input changed: in.txt." in result.out
    assert project.read("out.txt") == "version 2\n"


CRASH_TARGETS = 20


def crash_pipeline(seed: int) -> str:
    """20 targets in a random DAG; each writes its output in two halves with a pause."""
    rng = random.Random(seed)
    parts = []
    for i in range(CRASH_TARGETS):
        deps = sorted(rng.sample(range(i), k=min(i, rng.randint(0, 2))))
        inputs = [f"out/t{d}.txt" for d in deps] or ["src.txt"]
        pause = rng.choice([0.01, 0.03, 0.06, 0.1])
        cmd = (
            f"cat {{inputs}} | head -c 200 > {{outputs.o}}; sleep {pause}; "
            f"echo t{i} >> {{outputs.o}}"
        )
        parts.append(
            f'[targets.t{i}]\ncmd = "{cmd}"\ninputs = {inputs!r}\n'
            f'outputs = {{ o = "out/t{i}.txt" }}\n'.replace("'", '"')
        )
    return "\n".join(parts)


def outputs_of(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "out").glob("*.txt"))}


def test_kill_dash_nine_at_random_moments_never_corrupts(tmp_path: Path) -> None:
    text = textwrap.dedent(crash_pipeline(seed=7))
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "pipeline.toml").write_text(text)
    (clean / "src.txt").write_text("source\n")
    out, err = mlbuild(clean, "run", "-j", "2").communicate()
    expected = outputs_of(clean)
    assert len(expected) == CRASH_TARGETS, err

    work = tmp_path / "work"
    shutil.copytree(clean, work, ignore=shutil.ignore_patterns(".mlbuild", "out"))
    rng = random.Random(11)
    for round_ in range(50):
        if round_ % 10 == 0:
            # Start over now and then, so kills land in early targets too.
            shutil.rmtree(work / ".mlbuild", ignore_errors=True)
            shutil.rmtree(work / "out", ignore_errors=True)
        (work / "src.txt").write_text(f"source {round_ % 3}\n")
        proc = mlbuild(work, "run", "-j", "2", "--no-cache")
        time.sleep(rng.uniform(0.0, 0.6))
        proc.kill()
        proc.communicate()
        db = work / ".mlbuild/state.db"
        if db.exists():  # a kill during interpreter startup comes before any state
            with sqlite3.connect(db) as conn:
                assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    (work / "src.txt").write_text("source\n")
    final = mlbuild(work, "run", "-j", "2")
    out, err = final.communicate(timeout=120)
    assert final.returncode == 0, err
    assert outputs_of(work) == expected
    again = mlbuild(work, "run", "-j", "2")
    out, _ = again.communicate(timeout=60)
    assert out.count("is up to date (skipped)") == CRASH_TARGETS


def test_a_step_whose_mlbuild_was_killed_while_spawning_it_is_stopped(project: Project) -> None:
    """Killed between the fork and the marker that names the step's group, mlbuild has
    already left a marker with the pid mark and the step's token: the next run stops it."""
    from mlbuild.exec.reaper import STEP_ID_VAR, pid_mark

    project.pipeline(INTERRUPTIBLE % "")
    running = project.root / ".mlbuild" / "running"
    running.mkdir(parents=True)
    token = "f" * 32
    (running / "long").write_text(f"-{pid_mark()} {token}\nlong\n")
    orphan = subprocess.Popen(
        ["sleep", "60"], env={**os.environ, STEP_ID_VAR: token}, start_new_session=True
    )
    try:
        result = project.run("run", "--no-wait", "quick")
        assert result.code == 0, result.err
        assert "stopped step `long` left running by an mlbuild that was killed" in result.err
        assert orphan.wait(timeout=10) == -signal.SIGKILL
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()
    assert not (running / "long").exists()


SHARED_SOURCE = """
[targets.writer]
cmd = "cat {inputs} > {outputs}; %s"
inputs = ["shared.txt"]
outputs = ["writer.out"]

[targets.reader]
cmd = "cat {inputs} > {outputs}"
inputs = ["shared.txt"]
outputs = ["reader.out"]
"""


@pytest.mark.parametrize(
    ("edit", "bytes_after"),
    [
        ("printf tampered > shared.txt; printf 'one\\n' > shared.txt", "one\n"),  # put back
        ("printf 'two\\n' > shared.txt", "two\n"),  # changed for good
    ],
)
def test_a_step_started_after_its_input_was_rewritten_is_recorded_with_what_it_read(
    project: Project, edit: str, bytes_after: str
) -> None:
    """`reader` was checked before `writer` ran and rewrote their shared input; it started
    after. It read the file as it is then, and is recorded with that, not taken for a step
    whose input changed under it."""
    project.write("shared.txt", "one\n")
    project.pipeline(SHARED_SOURCE % edit)
    result = project.run("run", "-j", "1")
    assert result.code == 0, result.err
    assert "`writer`: input 'shared.txt' changed while the step ran" in result.err
    assert "`reader`" not in result.err
    assert project.read("reader.out") == bytes_after
    status = project.run("status")
    assert "stale  writer" in status.out
    assert "fresh  reader" in status.out  # recorded with what it read


def test_bad_input_found_while_steps_run_lets_them_finish_and_be_recorded(
    project: Project, tmp_path: Path
) -> None:
    """Targets are checked while steps run: an output leading out of the project, found
    while `a` runs, stops the build with one line (exit 2) once `a` has finished and been
    recorded, not by killing it."""
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (project.root / "away").symlink_to(outside)
    project.pipeline(
        "[targets.a]\ncmd = 'sleep 0.5; echo made > {outputs.o}'\n"
        'outputs = { o = "a.txt" }\n\n'
        '[targets.b]\ncmd = "echo b > {outputs.o}"\noutputs = { o = "away/b.txt" }\n'
    )
    first = project.run("run", "-j", "2")
    assert first.code == 2
    assert first.started() == ["a"]
    assert "interrupted" not in first.out + first.err
    assert first.err.count("mlbuild: error:") == 1 and "targets.b.outputs" in first.err
    assert project.read("a.txt") == "made\n"
    assert not (outside / "b.txt").exists()
    assert project.run("show", "a").code == 0  # recorded
    again = project.run("run", "-j", "2")
    assert again.code == 2 and again.started() == []


def test_at_j1_the_next_step_is_told_after_the_last_one_ended(project: Project) -> None:
    """The next independent step starts before the last one is recorded (mlbuild's
    bookkeeping overlaps it), but the lines read as at -j 1: ended, then started."""
    project.pipeline(
        "".join(
            f"[targets.t{i}]\ncmd = 'echo {i} > {{outputs.o}}'\noutputs = {{ o = 'o{i}.txt' }}\n"
            for i in range(4)
        )
    )
    result = project.run("run", "-j", "1")
    assert result.code == 0, result.err
    lines = [line for line in result.out.splitlines() if line.startswith("Step")]
    told = [(line.split("`")[1], "started" in line) for line in lines]
    assert told == [(f"t{i}", started) for i in range(4) for started in (True, False)]
    assert "[t" not in result.out  # no prefixes: one step ran at a time
    assert [project.read(f"o{i}.txt") for i in range(4)] == ["0\n", "1\n", "2\n", "3\n"]


def test_at_j1_a_step_missing_its_output_stops_the_build_before_the_next(
    project: Project,
) -> None:
    project.pipeline(
        "[targets.a]\ncmd = 'true'\noutputs = { o = 'a.txt' }\n"
        "[targets.b]\ncmd = 'echo b > {outputs.o}'\noutputs = { o = 'b.txt' }\n"
    )
    result = project.run("run", "-j", "1")
    assert result.code == 1
    assert "did not write declared output 'a.txt'" in result.err
    assert result.started() == ["a"]
    assert not (project.root / "b.txt").exists()


def test_at_j1_a_file_in_the_way_of_the_next_step_leaves_the_last_one_recorded(
    project: Project,
) -> None:
    """`b` starts as soon as `a` ended, before `a` is recorded: a file where `b`'s output
    directory should be still ends the build with one line (exit 2), after `a` is."""
    project.write("blocker", "mine\n")
    project.pipeline(
        "[targets.a]\ncmd = 'echo a > {outputs.o}'\noutputs = { o = 'a.txt' }\n"
        "[targets.b]\ncmd = 'echo b > {outputs.o}'\noutputs = { o = 'blocker/b.txt' }\n"
    )
    result = project.run("run", "-j", "1")
    assert result.code == 2
    assert len(result.err.strip().splitlines()) == 1, result.err
    assert "'blocker'" in result.err and "targets.b.outputs" in result.err
    assert "Traceback" not in result.err
    assert project.read("blocker") == "mine\n"
    assert project.read("a.txt") == "a\n"
    status = project.run("status")
    assert "fresh  a" in status.out


def test_at_j1_no_step_is_told_started_after_a_failure_found_when_hashing(
    project: Project,
) -> None:
    """`a` exits 0 leaving a FIFO: it fails only when its outputs are hashed, after `b`
    started in its slot. `b` is told as a step that was running when `a` failed (its
    started line first), not as one started after a failure; it finishes and is recorded."""
    project.pipeline(
        "[targets.a]\ncmd = 'mkfifo {outputs.o}'\noutputs = { o = 'a.txt' }\n"
        "[targets.b]\ncmd = 'echo b > {outputs.o}'\noutputs = { o = 'b.txt' }\n"
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # stdout and stderr in the order told
    run = subprocess.run(
        [sys.executable, "-m", "mlbuild", "run", "-j", "1", "--plain"],
        cwd=project.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert run.returncode == 1, run.stdout
    lines = run.stdout.splitlines()
    failed = next(i for i, line in enumerate(lines) if line.startswith("Step `a` failed"))
    assert "cannot fingerprint 'a.txt': it is a FIFO" in lines[failed]
    assert not any("has started" in line for line in lines[failed:]), run.stdout
    assert project.read("b.txt") == "b\n"
    (project.root / "a.txt").unlink()
    assert "fresh  b" in project.run("status").out
