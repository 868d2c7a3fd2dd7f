"""The executor registry: the runner makes its executor only through it, by kind."""

from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from mlbuild.build.lock import hold_workspace
from mlbuild.build.results import BuildOptions
from mlbuild.build.runner import run_build
from mlbuild.errors import UsageError
from mlbuild.exec.base import TERM_GRACE_SECONDS, Done, Executor, ExecutorContext, Output, Step
from mlbuild.exec.local import LocalExecutor
from mlbuild.exec.registry import executor_kinds, make_executor, register_executor
from mlbuild.fingerprint import Fingerprinter
from mlbuild.graph import build_graph
from mlbuild.pipeline.load import load_pipeline
from mlbuild.pipeline.schema import ExecutorSettings
from mlbuild.ui.report import PlainReporter
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
    from mlbuild.exec import registry

    Delegating.made.clear()
    monkeypatch.setattr(registry, "_FACTORIES", dict(registry._FACTORIES))
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
    from mlbuild.pipeline.schema import EXECUTOR_KINDS

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
    assert not count.log_path.exists()  # it printed nothing: no log
    # Recorded like any build: the next run (local executor, through the CLI) has nothing to do.
    again = project.run("run")
    assert again.code == 0, again.err
    assert again.started() == []
    assert len(Delegating.made) == 1


class Sandboxed:
    """A fake remote executor: runs each step in a private directory, as a Ray worker in cas
    mode does, uploads its outputs to the remote cache and returns only their description."""

    def __init__(self, context: ExecutorContext) -> None:
        self.context = context
        self.done: list[Done] = []

    def start(self, step: Step) -> None:
        from mlbuild.exec.base import ExecResult, render_command
        from mlbuild.exec.ray import _returned_outputs, _upload_outputs

        remote_cache = self.context.remote()
        assert remote_cache is not None
        remote = remote_cache.remote()
        assert remote is not None
        sandbox = Path(tempfile.mkdtemp())
        command = render_command(step.target, sandbox)
        code = subprocess.run(["/bin/sh", "-c", command], cwd=sandbox).returncode
        outputs, blobs = _upload_outputs(remote, sandbox, step.target, remote_cache.io)
        shutil.rmtree(sandbox)
        returned = {"outputs": outputs, "blobs": blobs, "duration": 0.1}
        message, elsewhere = _returned_outputs(step.target, returned)
        assert elsewhere is not None, message
        step.log_path.parent.mkdir(parents=True, exist_ok=True)
        step.log_path.write_bytes(b"")
        result = ExecResult(code, 0.1, step.log_path, message, elsewhere)
        self.done.append(Done(step.target.name, result))

    def wait(self, timeout: float | None = None) -> Iterator[Output | Done]:
        while self.done:
            yield self.done.pop(0)

    @property
    def running(self) -> list[str]:
        return [done.target for done in self.done]

    def stop_all(self, grace: float = TERM_GRACE_SECONDS) -> list[str]:
        names = self.running
        self.done.clear()
        return names


ELSEWHERE = """
[cache]
remote = "{remote}"

[targets.far]
cmd = "mkdir -p {{outputs.o}} && echo made elsewhere > {{outputs.o}}/x.txt"
outputs = {{ o = "build/far" }}
"""


@pytest.fixture
def sandboxed_kind(monkeypatch: pytest.MonkeyPatch) -> str:
    from mlbuild.exec import registry

    monkeypatch.setattr(registry, "_FACTORIES", dict(registry._FACTORIES))
    register_executor("sandboxed", Sandboxed)
    return "sandboxed"


def test_outputs_left_in_the_remote_are_restored_by_the_runner(
    project: Project, sandboxed_kind: str
) -> None:
    project.pipeline(ELSEWHERE.format(remote=project.root / "remote"))
    ok, shown = _build(project.root, BuildOptions(executor=sandboxed_kind))
    assert ok, shown
    assert project.read("build/far/x.txt") == "made elsewhere\n"
    # Restored through the local cache, as a cache hit is: its object is there.
    objects = [p for p in (project.root / ".mlbuild/cache/objects").rglob("*") if p.is_file()]
    assert [p.read_text() for p in objects] == ["made elsewhere\n"]
    again = project.run("run")
    assert again.code == 0, again.err
    assert again.started() == []


def test_a_corrupted_blob_from_the_executor_fails_the_target(
    project: Project, sandboxed_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlbuild.remote import Remote

    project.pipeline(ELSEWHERE.format(remote=project.root / "remote"))

    def get_other_bytes(self: Remote, digest: str, dest: str, size: int | None = None) -> None:
        Path(dest).write_text("not what was made\n")  # as a damaged remote would serve it

    monkeypatch.setattr(Remote, "get_blob", get_other_bytes)
    ok, shown = _build(project.root, BuildOptions(executor=sandboxed_kind))
    assert not ok
    assert "fetching its outputs from the remote cache failed" in shown, shown
    assert not (project.root / "build/far").exists()
    objects = [p for p in (project.root / ".mlbuild/cache/objects").rglob("*") if p.is_file()]
    assert objects == []  # bytes that do not match their digest never enter the local cache
