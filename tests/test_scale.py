"""A pipeline of 20,000 targets: `list`, `status` and a no-op `run` give the right answers.

No timing is asserted (bench/ measures time); what a quadratic step would
show here is a test that takes minutes instead of seconds. The first build
runs its 20,000 copies in this process through a stand-in executor (starting
20,000 shells is what bench/ measures, not the point here); everything else
is the real CLI, the real state and the real files.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlbuild.exec.base import Done, ExecResult, ExecutorContext, Output, Step
from mlbuild.exec.registry import register_executor
from mlbuild.scheduler import Scheduler
from tests.conftest import Project

N = 20_000


class CopyExecutor:
    """Runs `cp {inputs.src} {outputs.dst}` steps as file copies in this process."""

    def __init__(self, context: ExecutorContext) -> None:
        self.root = context.root
        self.done: list[Done] = []

    def start(self, step: Step) -> None:
        (src,) = step.target.inputs
        (dst,) = step.target.outputs
        (self.root / dst.path).write_bytes((self.root / src.path).read_bytes())
        self.done.append(Done(step.target.name, ExecResult(0, 0.0, step.log_path)))

    def wait(self, timeout: float | None = None) -> Iterator[Output | Done]:
        done, self.done = self.done, []
        yield from done

    @property
    def running(self) -> list[str]:
        return [d.target for d in self.done]

    def stop_all(self, grace: float = 0.0) -> list[str]:
        return []


def _wide(project: Project, n: int) -> None:
    """`n` targets, each copying its own source; the last one also needs the first."""
    (project.root / "src").mkdir()
    lines: list[str] = []
    for i in range(n):
        (project.root / "src" / f"{i}.txt").write_text(f"source {i}\n")
        lines += [
            f"[targets.t{i:05d}]",
            'cmd = "cp {inputs.src} {outputs.dst}"',
            f'inputs = {{ src = "src/{i}.txt" }}',
            f'outputs = {{ dst = "out/{i}.txt" }}',
            "cache = false",
            "",
        ]
    lines.insert(-1, 'after = ["t00000"]')
    (project.root / "pipeline.toml").write_text("\n".join(lines))


@pytest.fixture
def copies(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    previous = register_executor("local", CopyExecutor)
    try:
        yield
    finally:
        assert previous is not None
        register_executor("local", previous)


def test_twenty_thousand_targets(project: Project, copies: None) -> None:
    _wide(project, N)
    last = f"t{N - 1:05d}"

    first = project.run("run", "-q", "-j", "2")
    assert (first.code, first.err) == (0, "")
    assert (project.root / "out" / f"{N - 1}.txt").read_text() == f"source {N - 1}\n"

    again = project.run("run", "-j", "2")
    assert again.code == 0
    assert again.out.count("is up to date (skipped)") == N
    assert again.started() == []

    listed = project.run("list")
    assert listed.code == 0
    lines = listed.out.splitlines()
    assert [line.partition(":")[0] for line in lines] == [f"t{i:05d}" for i in range(N)]
    assert lines[0] == "t00000: cp {inputs.src} {outputs.dst}"
    assert lines[-1] == f"{last}: cp {{inputs.src}} {{outputs.dst}}  (after t00000)"

    status = project.run("status")
    assert (status.code, status.out.count("fresh  ")) == (0, N)

    # One source edited: exactly its target is stale.
    (project.root / "src" / "777.txt").write_text("SOURCE 777\n")
    status = project.run("status")
    assert status.code == 1
    stale = [line for line in status.out.splitlines() if not line.startswith("fresh  ")]
    assert stale == ["stale  t00777: input changed: src/777.txt"]
    assert project.run("list").out == listed.out


SLOW_AND_QUICK = """
[targets.quick]
cmd = "echo quick > {outputs}"
outputs = ["quick.txt"]

[targets.slow]
cmd = "touch started; while [ ! -e go ]; do sleep 0.02; done; echo slow > {outputs}"
outputs = ["slow.txt"]
"""


def _status(root: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "mlbuild", "status"], cwd=root, capture_output=True, text=True
    )
    return done.stdout


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)


@pytest.mark.parametrize("stop", ["go", "sigterm"])
def test_a_finished_step_is_recorded_while_another_still_runs(tmp_path: Path, stop: str) -> None:
    """Manifests are written in batches, but a batch waits at most RECORD_SECONDS, and an
    interrupted build writes what finished before it stops."""
    (tmp_path / "pipeline.toml").write_text(SLOW_AND_QUICK)
    build = subprocess.Popen(
        [sys.executable, "-m", "mlbuild", "run", "-j", "2"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(tmp_path / "started")
        _wait_for(tmp_path / "quick.txt")
        deadline = time.monotonic() + 30
        while "fresh  quick" not in (seen := _status(tmp_path)):
            assert time.monotonic() < deadline, seen
            time.sleep(0.1)
        assert "stale  slow" in seen
        if stop == "go":
            (tmp_path / "go").touch()
        else:
            build.send_signal(signal.SIGTERM)
        build.wait(timeout=60)
    finally:
        (tmp_path / "go").touch()
        build.wait(timeout=60)
    after = _status(tmp_path)
    assert "fresh  quick" in after
    assert ("fresh  slow" in after) == (stop == "go")


def test_a_pool_of_twenty_thousand_waiting_steps_starts_them_in_order() -> None:
    """Steps wait in a full pool while others run: each still starts in build order, and
    a start does not look at every waiting step again (that took minutes here)."""
    order = [f"t{i:05d}" for i in range(N)]
    pool_of = {name: ("gpu" if i % 4 else None) for i, name in enumerate(order)}
    sched = Scheduler(order, {name: () for name in order}, 2, {"gpu": 1}, pool_of)
    while (name := sched.next_to_check()) is not None:
        sched.want_run(name)
    started: list[str] = []
    while not sched.idle:
        now = sched.startable()
        assert now, "nothing could start"
        running = [n for n in now if pool_of[n] == "gpu"]
        assert len(running) <= 1
        started += now
        for name in now:
            sched.finished(name)
    assert sorted(started) == order
    assert [n for n in started if pool_of[n]] == [n for n in order if pool_of[n]]
    assert [n for n in started if not pool_of[n]] == [n for n in order if not pool_of[n]]
    assert started[:4] == ["t00000", "t00001", "t00002", "t00004"]  # t00003 waits for t00002
