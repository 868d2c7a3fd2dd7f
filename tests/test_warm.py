"""Warm workers (exec/warm.py): a step sees exactly what a fresh worker would show it.

An installed package (`fakepkg`, in a directory named site-packages outside
the project) notes each process that imports it. Step `a` waits until some
process has imported it, which only a warm worker for `b` does while `a`
runs; so `b` running in the process that imported `fakepkg` proves the
warm worker was used, with no timing involved.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlbuild.exec.base import Step, timing_path, worker_call
from mlbuild.exec.warm import WarmPool, WarmSpec, _environment_writes, package_stamp
from mlbuild.manifest import Fingerprint
from mlbuild.pipeline.load import load_pipeline
from mlbuild.staleness import Observation
from tests.conftest import Project
from tests.test_parallel import alive, wait_for

HANG = 60

FAKEPKG = """
import os
with open(os.path.join(os.environ["TRACE_DIR"], "imported"), "a") as handle:
    handle.write(f"{os.getpid()}\\n")
VALUE = 42

from io import open as _open  # bound when imported: a warm worker imports it early


def read(path):
    with _open(path) as handle:
        return handle.read()
"""

PIPELINE = """
[targets.a]
python = "steps.a:run"
outputs = { out = "a.txt" }

[targets.b]
python = "steps.b:run"
inputs = { a = "a.txt" }
outputs = { out = "b.json" }
params = { k = 1 }
"""

STEP_A = """
import os
import time
from collections.abc import Iterator
from pathlib import Path


def run(out: Path) -> None:
    trace = Path(os.environ["TRACE_DIR"]) / "imported"
    seen = "fresh"
    if os.environ.get("WAIT_FOR_WARM"):
        for _ in range(1200):  # a minute at most: only a broken warm worker makes it wait
            if trace.exists() and trace.read_text().strip():  # its pid written, not just made
                seen = "warmed"
                break
            time.sleep(0.05)
        action = os.environ.get("THEN", "")
        if action == "edit":  # b's helper changes after b's worker was warmed
            Path("steps/helper.py").write_text('WORD = "two"\\n')
        elif action == "setenv":  # b now sets a variable before its imports
            source = Path("steps/b.py").read_text()
            Path("steps/b.py").write_text("import os\\nos.environ['SET_BY_B'] = '1'\\n" + source)
        elif action == "kill" and trace.exists():
            os.kill(int(trace.read_text().split()[0]), 9)
    out.write_text(seen)
"""

STEP_B = """
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from steps import helper


def run(a: Path, out: Path, k: int) -> None:
    import fakepkg

    fakepkg.read("extra.txt")  # a project file read through an `open` bound at import
    root = os.getcwd()
    project = sorted(
        name
        for name, module in sys.modules.items()
        if str(getattr(module, "__file__", "") or "").startswith(root)
    )
    ignored = ("MLBUILD_STEP_ID", "WAIT_FOR_WARM", "THEN")
    env = {k: v for k, v in os.environ.items() if k not in ignored}
    out.write_text(json.dumps({
        "pid": os.getpid(), "modules": project, "env": env, "cwd": root,
        "path": sys.path, "word": helper.WORD, "k": k, "value": fakepkg.VALUE,
        "argv": sys.argv[1:], "stdin": sys.stdin.read(),
    }))
"""


@pytest.fixture
def warm_project(
    project: Project, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Project:
    site = tmp_path_factory.mktemp("env") / "site-packages"
    (site / "fakepkg").mkdir(parents=True)
    (site / "fakepkg" / "__init__.py").write_text(FAKEPKG)
    trace = tmp_path_factory.mktemp("trace")
    monkeypatch.setenv("TRACE_DIR", str(trace))
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([*paths, str(site)]))
    project.pipeline(PIPELINE)
    project.write("steps/__init__.py", "")
    project.write("steps/a.py", STEP_A)
    project.write("steps/b.py", STEP_B)
    project.write("steps/helper.py", 'WORD = "one"\n')
    project.write("extra.txt", "undeclared\n")
    return project


def importers() -> list[int]:
    trace = Path(os.environ["TRACE_DIR"]) / "imported"
    return [int(line) for line in trace.read_text().split()] if trace.exists() else []


def b_result(project: Project) -> dict[str, object]:
    data: dict[str, object] = json.loads(project.read("b.json"))
    return data


def test_a_warm_worker_shows_the_step_what_a_fresh_one_does(
    warm_project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WAIT_FOR_WARM", "1")
    warm = warm_project.run("run", "-j2")  # never built: what is recorded is this run's
    assert warm.code == 0, warm.err
    assert warm_project.read("a.txt") == "warmed"  # fakepkg was imported while `a` ran ...
    warm_seen = b_result(warm_project)
    assert importers() == [warm_seen["pid"]]  # ... by the process that then ran `b`
    discovered = "discovered inputs (read by the step but not declared: add them to `inputs`)"
    assert discovered + "\n    extra.txt" in warm_project.run("show", "b").out
    assert not list((warm_project.root / ".mlbuild" / "running").iterdir())

    monkeypatch.delenv("WAIT_FOR_WARM")
    (Path(os.environ["TRACE_DIR"]) / "imported").unlink()
    fresh = warm_project.run("run", "-j1", "--force")
    assert fresh.code == 0, fresh.err
    assert warm_project.read("a.txt") == "fresh"
    fresh_seen = b_result(warm_project)
    assert importers() == [fresh_seen["pid"]]
    for key in ("modules", "env", "cwd", "path", "word", "k", "value", "argv", "stdin"):
        assert warm_seen[key] == fresh_seen[key], key
    assert fresh_seen["modules"] == ["steps", "steps.b", "steps.helper"]
    assert fresh_seen["stdin"] == ""


def test_a_project_module_edited_after_warming_is_seen(
    warm_project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WAIT_FOR_WARM", "1")
    monkeypatch.setenv("THEN", "edit")
    result = warm_project.run("run", "-j2")
    assert result.code == 0, result.err
    seen = b_result(warm_project)
    assert warm_project.read("a.txt") == "warmed"
    assert importers() == [seen["pid"]]  # the warm worker ran `b` ...
    assert seen["word"] == "two"  # ... and imported the helper as it is when called


def test_code_that_now_writes_the_environment_gets_a_fresh_worker(
    warm_project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WAIT_FOR_WARM", "1")
    monkeypatch.setenv("THEN", "setenv")
    result = warm_project.run("run", "-j2")
    assert result.code == 0, result.err
    warmed, fresh = importers()  # the warm worker imported fakepkg without SET_BY_B set
    assert b_result(warm_project)["pid"] == fresh != warmed
    assert not alive(warmed)


def test_a_warm_worker_that_dies_is_replaced_by_a_fresh_one(
    warm_project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WAIT_FOR_WARM", "1")
    monkeypatch.setenv("THEN", "kill")  # `a` kills b's warm worker with SIGKILL
    result = warm_project.run("run", "-j2")
    assert result.code == 0, result.err
    assert "warning" not in result.err.lower()
    killed, fresh = importers()
    assert b_result(warm_project)["pid"] == fresh != killed
    assert not alive(killed)


def test_an_unused_warm_worker_is_gone_after_the_run(
    warm_project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WAIT_FOR_WARM", "1")
    assert warm_project.run("run", "-j2").code == 0
    (Path(os.environ["TRACE_DIR"]) / "imported").unlink()
    # `a` reruns and writes the same bytes: `b`, warmed meanwhile, stays up to date.
    warm_project.write("steps/a.py", STEP_A + "\n\ndef unused() -> None:\n    pass\n")
    result = warm_project.run("run", "-j2")
    assert result.code == 0, result.err
    assert result.started() == ["a"]
    (warm_pid,) = importers()
    assert not alive(warm_pid)
    assert not list((warm_project.root / ".mlbuild" / "running").iterdir())


def test_no_warm_worker_at_one_job(warm_project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    result = warm_project.run("run", "-j1")
    assert result.code == 0, result.err
    assert warm_project.read("a.txt") == "fresh"
    assert importers() == [b_result(warm_project)["pid"]]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_stopping_mlbuild_leaves_no_warm_worker(warm_project: Project, sig: int) -> None:
    env = {**os.environ, "WAIT_FOR_WARM": "1"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    # `a` waits for b's warm worker, then for a file that never comes: mlbuild is stopped.
    warm_project.write("steps/a.py", STEP_A.replace("out.write_text(seen)", "time.sleep(600)"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlbuild", "run", "-j2"],
        cwd=warm_project.root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for(lambda: bool(importers()), timeout=HANG)
    (warm_pid,) = importers()
    proc.send_signal(sig)
    proc.communicate(timeout=HANG)
    if sig == signal.SIGKILL:
        # Its stdin's other end is gone: the warm worker exits by itself; the next
        # run reaps what is left (step `a`, here) and runs both again.
        wait_for(lambda: not alive(warm_pid), timeout=HANG)
        warm_project.write("steps/a.py", STEP_A)
        again = warm_project.run("run", "-j2")
        assert again.code == 0, again.err
    assert not alive(warm_pid)
    assert not list((warm_project.root / ".mlbuild" / "running").iterdir())


# -- the pool, one warm worker at a time ------------------------------------------------------


def _pool_step(project: Project) -> tuple[WarmPool, Step, WarmSpec]:
    """A pool and a Step for `b`, as the local executor hands them over."""
    pipeline = load_pipeline(project.root / "pipeline.toml")
    code = {"steps/__init__.py": "1", "steps/b.py": "2", "steps/helper.py": "3"}
    observation = Observation(Fingerprint("python:steps.b:run", {}, {}, {}, code=code), {})
    log = project.root / ".mlbuild" / "logs" / "b.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    step = Step(pipeline.targets["b"], log, observation)
    return WarmPool(project.root), step, WarmSpec((("fakepkg", ()),))


def _spawn(pool: WarmPool, step: Step, spec: WarmSpec, env: dict[str, str]) -> int:
    pool.spawn(step.target, spec, env, package_stamp({}, env))
    wait_for(lambda: bool(importers()), timeout=HANG)  # it has imported fakepkg
    return pool.workers["b"].proc.pid


def test_a_changed_environment_value_discards_the_warm_worker(warm_project: Project) -> None:
    pool, step, spec = _pool_step(warm_project)
    env = {**os.environ, "DECLARED": "1"}
    pid = _spawn(pool, step, spec, env)
    assert pool.give(step, {**env, "DECLARED": "2"}, "{}") is None
    assert not alive(pid)
    assert pool.discarded == 1 and not pool.workers
    assert not list((warm_project.root / ".mlbuild" / "running").iterdir())


def test_a_package_change_discards_the_warm_worker(warm_project: Project) -> None:
    pool, step, spec = _pool_step(warm_project)
    env = dict(os.environ)
    pid = _spawn(pool, step, spec, env)
    site = next(p for p in env["PYTHONPATH"].split(os.pathsep) if p.endswith("site-packages"))
    (Path(site) / "newpkg-1.0.dist-info").mkdir()  # what `pip install newpkg` adds
    assert pool.give(step, env, "{}") is None
    assert not alive(pid)


def test_a_warm_worker_is_used_once(warm_project: Project) -> None:
    pool, step, spec = _pool_step(warm_project)
    (warm_project.root / "a.txt").write_text("a")
    env = dict(os.environ)
    pid = _spawn(pool, step, spec, env)
    call = worker_call(step.target, warm_project.root, timing_path(step.log_path))
    given = pool.give(step, env, call)
    assert given is not None and given[0].pid == pid
    assert pool.give(step, env, call) is None
    assert given[0].wait(timeout=HANG) == 0  # it ran the step, then exited
    assert given[0].stdout is not None
    given[0].stdout.close()
    assert b_result(warm_project)["pid"] == pid


@pytest.mark.parametrize(
    ("source", "applied"),
    [
        ('import os\nos.environ.setdefault("A", "1")\n', [("A", "1", True)]),
        ('import os\nos.environ["A"] = "2"\n', [("A", "2", False)]),
        ('import os, sys\nx = os.environ.get("A")\nprint(sys.path)\n', []),
        ('import sys\nsys.path.insert(0, "lib")\n', None),
        ('import sys\nsys.path += ["lib"]\n', None),
        ("import sys\npaths = sys.path\n", None),
        ("from sys import path\n", None),
        ('import os\nos.environ.update(A="1")\n', None),
        ('import os\nos.environ["A"] = value\n', None),
        ('import os\ndel os.environ["A"]\n', None),
        ('import os\nos.putenv("A", "1")\n', None),
    ],
)
def test_environment_writes_are_applied_while_warming_or_prevent_it(
    tmp_path: Path, source: str, applied: object
) -> None:
    (tmp_path / "m.py").write_text(source)
    assert _environment_writes(str(tmp_path / "m.py")) == applied


# -- watch mode: warm workers kept between builds ---------------------------------------------

WATCHED = """
[targets.train]
python = "steps.train:run"
inputs = { data = "data.txt" }
outputs = { out = "train.json" }
"""

TRAIN = """
import json
import os

from steps import helper


def run(data, out):
    import fakepkg

    out.write_text(json.dumps({"pid": os.getpid(), "word": helper.WORD}))
"""


def test_watch_keeps_a_warm_worker_and_replaces_it_after_a_package_change(
    warm_project: Project,
) -> None:
    from tests.test_watch import watching

    root = warm_project.root
    warm_project.pipeline(WATCHED)
    warm_project.write("data.txt", "d\n")
    warm_project.write("steps/train.py", TRAIN)

    def result() -> dict[str, object]:
        data: dict[str, object] = json.loads((root / "train.json").read_text())
        return data

    with watching(root) as w:
        wait_for(lambda: len(importers()) == 2, timeout=HANG)  # the first run, then warming
        first, warm = importers()
        assert result()["pid"] == first
        mark = w.mark()
        warm_project.write("steps/helper.py", 'WORD = "edited"\n')
        w.wait_text("waiting for changes.", mark)
        assert result() == {"pid": warm, "word": "edited"}  # ran in the warm worker
        wait_for(lambda: len(importers()) == 3, timeout=HANG)  # and another is warm
        stale = importers()[2]

        site = next(p for p in os.environ["PYTHONPATH"].split(os.pathsep) if "site-packages" in p)
        (Path(site) / "newpkg-1.0.dist-info").mkdir()  # `pip install newpkg`
        mark = w.mark()
        warm_project.write("steps/helper.py", 'WORD = "again"\n')
        w.wait_text("waiting for changes.", mark)
        wait_for(lambda: len(importers()) == 5, timeout=HANG)
        fresh, replacement = importers()[3:]
        assert result() == {"pid": fresh, "word": "again"}  # not in the stale warm worker
        assert not alive(stale)
        assert alive(replacement)
    assert not alive(replacement)  # the session's warm workers end with it
    assert not list((root / ".mlbuild" / "running").iterdir())


# -- keep-warm: workers kept between runs by a background process ----------------------------

KEEP = '\n[workers]\nkeep_warm = "1m"\n'


@pytest.fixture
def keeping(warm_project: Project) -> Iterator[Project]:
    warm_project.pipeline(PIPELINE + KEEP)
    yield warm_project
    warm_project.run("workers", "stop")


def server_pid(project: Project) -> int:
    return int(project.read(".mlbuild/workers.pid"))


def test_a_kept_worker_runs_the_next_runs_step(keeping: Project) -> None:
    first = keeping.run("run", "-j1")
    assert first.code == 0, first.err
    (fresh,) = importers()
    listed = keeping.run("workers").out
    wait_for(lambda: len(importers()) == 2, timeout=HANG)  # the kept worker has imported
    kept = importers()[1]
    assert f"b: worker {kept}, RSS " in listed and " MiB" in listed
    keeping.write("steps/helper.py", 'WORD = "edited"\n')
    second = keeping.run("run", "-j1")
    assert second.code == 0, second.err
    assert second.started() == ["b"]
    seen = b_result(keeping)
    assert seen["pid"] == kept != fresh  # a process of the keep-warm process, not this run's
    assert seen["word"] == "edited"
    discovered = "discovered inputs (read by the step but not declared: add them to `inputs`)"
    assert discovered + "\n    extra.txt" in keeping.run("show", "b").out
    server = server_pid(keeping)
    stopped = keeping.run("workers", "stop")
    assert stopped.out.strip() == f"stopped keep-warm process {server}"
    assert not alive(server)
    assert keeping.run("workers").out.strip() == "no keep-warm process for this workspace"
    assert not (keeping.root / ".mlbuild" / "workers.sock").exists()


def test_killing_the_keep_warm_process_loses_nothing(keeping: Project) -> None:
    assert keeping.run("run", "-j1").code == 0
    wait_for(lambda: len(importers()) == 2, timeout=HANG)
    kept = importers()[1]
    os.kill(server_pid(keeping), signal.SIGKILL)  # before the next run asks for its worker
    keeping.write("steps/helper.py", 'WORD = "edited"\n')
    result = keeping.run("run", "-j1")
    assert result.code == 0, result.err
    seen = b_result(keeping)
    assert seen["word"] == "edited" and seen["pid"] not in (kept, importers()[0])
    wait_for(lambda: not alive(kept), timeout=HANG)  # its socket closed: it exits by itself


def test_a_step_in_a_kept_worker_survives_the_keep_warm_process(keeping: Project) -> None:
    assert keeping.run("run", "-j1").code == 0
    wait_for(lambda: len(importers()) == 2, timeout=HANG)
    kept = importers()[1]
    pid = server_pid(keeping)
    # b kills the keep-warm process while it runs in that process's worker
    keeping.write(
        "steps/b.py",
        STEP_B.replace("    import fakepkg\n", f"    import fakepkg\n    os.kill({pid}, 9)\n"),
    )
    result = keeping.run("run", "-j1")
    assert result.code == 0, result.err
    assert b_result(keeping)["pid"] == kept
    assert not alive(pid)


def test_without_keep_warm_nothing_outlives_the_run(warm_project: Project) -> None:
    assert warm_project.run("run", "-j2").code == 0
    assert warm_project.run("workers").out.strip() == "no keep-warm process for this workspace"
    assert not (warm_project.root / ".mlbuild" / "workers.sock").exists()
    assert all(not alive(pid) for pid in importers())


def test_a_bad_keep_warm_is_one_line(warm_project: Project) -> None:
    warm_project.pipeline(PIPELINE + '\n[workers]\nkeep_warm = "soon"\n')
    result = warm_project.run("run")
    assert result.code == 2
    assert result.err.strip().splitlines() == [
        f"mlbuild: error: {warm_project.root / 'pipeline.toml'}: workers.keep_warm: must be a"
        ' duration such as "10m", "90s" or "1h"'
    ]


def test_a_kept_worker_with_another_umask_is_not_used(keeping: Project) -> None:
    assert keeping.run("run", "-j1").code == 0
    wait_for(lambda: len(importers()) == 2, timeout=HANG)
    kept = importers()[1]
    keeping.write("steps/helper.py", 'WORD = "edited"\n')
    before = os.umask(0o077)  # as from another shell: the kept worker has the old one
    try:
        result = keeping.run("run", "-j1")
    finally:
        os.umask(before)
    assert result.code == 0, result.err
    assert b_result(keeping)["pid"] not in (kept, importers()[0])
    assert not alive(kept)


def test_a_kept_worker_gets_the_parameters_of_its_call(keeping: Project) -> None:
    assert keeping.run("run", "-j1").code == 0
    wait_for(lambda: len(importers()) == 2, timeout=HANG)
    kept = importers()[1]
    result = keeping.run("run", "-j1", "--set", "b.k=2")
    assert result.code == 0, result.err
    seen = b_result(keeping)
    assert seen["pid"] == kept  # warmed with k = 1 in its environment ...
    env = seen["env"]
    assert isinstance(env, dict)
    assert seen["k"] == 2 and env["MLBUILD_PARAM_K"] == "2"  # ... called with k = 2


def test_watch_keeps_the_last_steps_that_ran_warm_not_the_first() -> None:
    """After the demo's first build (importer, normalizer, trainer, evaluator) at -j 2,
    watch keeps the trainer and evaluator warm: an edit to the trainer reruns both, while
    the data steps rarely rerun (the ZenML bench found the importer and normalizer kept)."""
    from mlbuild.exec.warm import likely_to_rerun
    from mlbuild.pipeline.schema import Target

    def python(name: str) -> Target:
        return Target(name, None, None, f"steps.{name}:run", (), (), {})

    names = ("importer", "normalizer", "trainer", "evaluator")
    targets = {name: python(name) for name in names}
    targets["report"] = Target("report", "cat x", "cat x", None, (), (), {})
    ran = [*names, "report"]
    assert likely_to_rerun(targets, ran, [], 2) == ["evaluator", "trainer"]
    assert likely_to_rerun(targets, ["trainer"], ["evaluator", "gone"], 2) == [
        "trainer",
        "evaluator",
    ]
