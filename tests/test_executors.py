"""The executor registry: the runner makes its executor only through it, by kind."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from mlbuild.config import ExecutorSettings, load_pipeline
from mlbuild.errors import UsageError
from mlbuild.executor import (
    TERM_GRACE_SECONDS,
    Done,
    Executor,
    ExecutorContext,
    LocalExecutor,
    Output,
    Step,
)
from mlbuild.executors import executor_kinds, make_executor, register_executor
from mlbuild.fingerprint import Fingerprinter
from mlbuild.graph import build_graph
from mlbuild.lock import hold_workspace
from mlbuild.report import PlainReporter
from mlbuild.results import BuildOptions
from mlbuild.runner import run_build
from tests.conftest import Project

PIPELINE = """
[targets.prep]
cmd = "tr a-z A-Z < {inputs.raw} > {outputs.clean}"
inputs = { raw = "raw.txt" }
outputs = { clean = "build/clean.txt" }

[targets.count]
cmd = "wc -c < {inputs.clean} > {outputs.n}"
inputs = { clean = "build/clean.txt" }
outputs = { n = "build/n.txt" }
"""


class Delegating:
    """A fake executor: records each Step it is given and runs it with a LocalExecutor."""

    made: ClassVar[list[Delegating]] = []

    def __init__(self, context: ExecutorContext) -> None:
        self.context = context
        self.local = LocalExecutor(context.root)
        self.steps: list[Step] = []
        Delegating.made.append(self)

    def start(self, step: Step) -> None:
        self.steps.append(step)
        self.local.start(step)

    def wait(self, timeout: float | None = None) -> Iterator[Output | Done]:
        return self.local.wait(timeout)

    @property
    def running(self) -> list[str]:
        return self.local.running

    def stop_all(self, grace: float = TERM_GRACE_SECONDS) -> list[str]:
        return self.local.stop_all(grace)


def _fake(context: ExecutorContext) -> Executor:
    return Delegating(context)


@pytest.fixture
def fake_kind(monkeypatch: pytest.MonkeyPatch) -> str:
    """The kind `fake`, registered for one test only."""
    from mlbuild import executors

    Delegating.made.clear()
    monkeypatch.setattr(executors, "_FACTORIES", dict(executors._FACTORIES))
    assert register_executor("fake", _fake) is None
    return "fake"


def _build(root: Path, options: BuildOptions) -> tuple[bool, str]:
    """Run a build in-process with `options` (the CLI knows only the built-in kinds)."""
    graph = build_graph(load_pipeline(root / "pipeline.toml", {}))
    out, err = io.StringIO(), io.StringIO()
    reporter = PlainReporter(out, err)
    with hold_workspace(root, "run", wait=False, warn=reporter.warn) as store:
        result = run_build(graph, store, reporter, options)
    return result.ok, out.getvalue() + err.getvalue()


def test_every_kind_the_pipeline_accepts_has_an_executor() -> None:
    from mlbuild.config import EXECUTOR_KINDS

    assert set(EXECUTOR_KINDS) <= set(executor_kinds())


def test_an_unknown_kind_is_a_usage_error_naming_the_known_ones(tmp_path: Path) -> None:
    context = ExecutorContext(
        tmp_path, ExecutorSettings(), lambda: None, Fingerprinter(tmp_path, {}).digest
    )
    with pytest.raises(UsageError) as raised:
        make_executor("slurm", context)
    assert str(raised.value) == "unknown executor 'slurm': the known executors are local, ray"


def test_the_runner_makes_its_executor_through_the_registry(project: Project) -> None:
    project.pipeline(PIPELINE)
    project.write("raw.txt", "hello\n")
    with pytest.raises(UsageError, match="unknown executor 'slurm'"):
        _build(project.root, BuildOptions(executor="slurm"))
    assert not (project.root / "build/clean.txt").exists()


def test_a_registered_executor_runs_a_pipeline_end_to_end(project: Project, fake_kind: str) -> None:
    project.pipeline(PIPELINE)
    project.write("raw.txt", "hello\n")
    ok, shown = _build(project.root, BuildOptions(executor=fake_kind, jobs=2))
    assert ok, shown
    assert project.read("build/clean.txt") == "HELLO\n"
    assert project.read("build/n.txt").strip() == "6"
    [fake] = Delegating.made
    assert fake.context.root == project.root
    assert [step.target.name for step in fake.steps] == ["prep", "count"]
    # Each step comes with the digests its manifest records: `count` sees what `prep` made.
    count = fake.steps[1]
    assert set(count.observation.fingerprint.inputs) == {"build/clean.txt"}
    assert count.log_path.read_text() == ""
    # Recorded like any build: the next run (local executor, through the CLI) has nothing to do.
    again = project.run("run")
    assert again.code == 0, again.err
    assert again.started() == []
    assert len(Delegating.made) == 1
