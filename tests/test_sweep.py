"""`mlbuild exp run --sweep`: grid points built in sandboxes, recorded as experiment rows.

Through the real CLI. The steps are trivial shell commands; each appends its
name to a file outside the project (`runs.txt`), so a test sees exactly which
steps ran, wherever they ran (workspace or sandbox).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mlbuild.store import open_existing_store
from tests.conftest import Project

PIPELINE = """
    params_files = ["params.yaml"]

    [params]
    epochs = 1
    lr = 0.1

    [targets.prep]
    cmd = "echo prep >> {runs}; cp data.txt {{outputs.0}}"
    inputs = ["data.txt"]
    outputs = ["build/prep.txt"]

    [targets.train]
    cmd = '''echo train >> {runs}; python3 train.py {{inputs.0}} {{params.epochs}} \\
        {{params.lr}} {{outputs.0}}'''
    inputs = ["build/prep.txt", "train.py"]
    outputs = ["build/model.txt"]
    params = ["epochs", "lr", "train.seed"]

    [targets.evaluate]
    cmd = "echo evaluate >> {runs}; python3 evaluate.py {{inputs.0}} {{outputs.0}}"
    inputs = ["build/model.txt", "evaluate.py"]
    metrics = ["build/metrics.json"]
"""

TRAIN = """
    import sys
    _, data, epochs, lr, model = sys.argv
    if float(lr) < 0:
        sys.exit("negative learning rate")
    open(model, "w").write(f"{epochs} {lr}\\n")
"""

EVALUATE = """
    import json, sys
    epochs, lr = open(sys.argv[1]).read().split()
    json.dump({"acc": int(epochs) * float(lr)}, open(sys.argv[2], "w"))
"""


@pytest.fixture
def sweep(
    project: Project, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Project:
    """A built project; sandboxes go to a temp dir of their own, checked empty after."""
    outside = tmp_path_factory.mktemp("outside")
    sandboxes = tmp_path_factory.mktemp("sandboxes")
    monkeypatch.setattr(tempfile, "tempdir", str(sandboxes))
    project.runs = outside / "runs.txt"  # type: ignore[attr-defined]
    project.sandboxes = sandboxes  # type: ignore[attr-defined]
    project.pipeline(PIPELINE.format(runs=project.runs))  # type: ignore[attr-defined]
    project.write("params.yaml", "train:\n  seed: 1  # the seed\n")
    project.write("data.txt", "hello\n")
    project.write("train.py", TRAIN)
    project.write("evaluate.py", EVALUATE)
    assert project.run("run", "-q").code == 0
    return project


def ran(project: Project) -> list[str]:
    """The steps that ran since the last call (and forget them)."""
    runs: Path = project.runs  # type: ignore[attr-defined]
    if not runs.exists():
        return []
    lines = runs.read_text().split()
    runs.unlink()
    return lines


def workspace_digest(root: Path) -> dict[str, str]:
    """Every file of the project outside `.mlbuild/`, and the manifests, by content."""
    seen: dict[str, str] = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".mlbuild"]
        for name in files:
            path = Path(folder) / name
            seen[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    store = open_existing_store(root / ".mlbuild", lambda line: None)
    assert store is not None
    with store:
        for target, stored in store.load_manifests().items():
            seen[f"manifest:{target}"] = stored.data
    return seen


def table(project: Project) -> list[dict[str, object]]:
    result = project.run("exp", "show", "--json")
    assert result.code == 0, result
    rows: list[dict[str, object]] = json.loads(result.out)
    return rows


def test_a_2x2_sweep_adds_four_rows_and_leaves_the_workspace_byte_identical(sweep: Project) -> None:
    ran(sweep)
    before = workspace_digest(sweep.root)
    result = sweep.run("exp", "run", "--sweep", "epochs=1,2", "--sweep", "lr=0.5,0.25", "-j", "2")
    assert result.code == 0, result
    assert workspace_digest(sweep.root) == before
    assert sorted(ran(sweep)) == sorted(["train", "evaluate"] * 4)  # prep: restored
    rows = table(sweep)
    points = {(r["params"]["epochs"], r["params"]["lr"]): r["metrics"] for r in rows}  # type: ignore[index]
    assert points == {
        (1, 0.1): {"acc": 0.1},  # the workspace's own build
        (1, 0.5): {"acc": 0.5},
        (1, 0.25): {"acc": 0.25},
        (2, 0.5): {"acc": 1.0},
        (2, 0.25): {"acc": 0.5},
    }
    current = [r for r in rows if r["current"]]
    assert [(r["params"]["epochs"], r["params"]["lr"]) for r in current] == [(1, 0.1)]  # type: ignore[index]
    assert "sweep [4/4] epochs=2,lr=0.25: row" in result.out
    assert list(sweep.sandboxes.iterdir()) == []  # type: ignore[attr-defined]


def test_the_same_sweep_again_executes_nothing(sweep: Project) -> None:
    args = ("exp", "run", "--sweep", "epochs=1,2", "--sweep", "lr=0.5,0.25", "-j", "2")
    assert sweep.run(*args).code == 0
    ran(sweep)
    rows = len(table(sweep))
    again = sweep.run(*args)
    assert again.code == 0, again
    assert ran(sweep) == []
    assert len(table(sweep)) == rows
    assert "targets: 12 restored" in again.out


def test_exp_apply_of_a_point_restores_it_with_no_step_run(sweep: Project) -> None:
    assert sweep.run("exp", "run", "--sweep", "epochs=2,3", "--sweep", "lr=0.5").code == 0
    ran(sweep)
    row = next(r for r in table(sweep) if r["params"]["epochs"] == 3)  # type: ignore[index]
    applied = sweep.run("exp", "apply", str(row["id"]))
    assert applied.code == 0, applied
    assert ran(sweep) == []
    assert sweep.read("build/model.txt") == "3 0.5\n"
    assert json.loads(sweep.read("build/metrics.json")) == {"acc": 1.5}
    assert [r["id"] for r in table(sweep) if r["current"]] == [row["id"]]


def test_a_params_file_key_is_swept_in_the_sandbox_only(sweep: Project) -> None:
    before = sweep.read("params.yaml")
    result = sweep.run("exp", "run", "--sweep", "train.seed=2,3")
    assert result.code == 0, result
    assert sweep.read("params.yaml") == before
    seeds = sorted(r["params"]["train.seed"] for r in table(sweep))  # type: ignore[index]
    assert seeds == [1, 2, 3]


def test_keep_going_reports_the_failed_point_and_builds_the_others(sweep: Project) -> None:
    result = sweep.run("exp", "run", "--sweep", "lr=0.5,-1,0.25", "-k", "-j", "1")
    assert result.code == 1
    assert "sweep [2/3] lr=-1: failed" in result.out
    assert "target `train` failed; its log: " in result.out
    assert "negative learning rate" in result.out
    log = sweep.root / ".mlbuild" / "sweeps" / "point-2" / "train.log"
    assert "negative learning rate" in log.read_text()
    assert "sweep [3/3] lr=0.25: row" in result.out
    assert sorted(r["params"]["lr"] for r in table(sweep)) == [0.1, 0.25, 0.5]  # type: ignore[index]


def test_without_keep_going_no_point_starts_after_a_failure(sweep: Project) -> None:
    result = sweep.run("exp", "run", "--sweep", "lr=-1,0.5,0.25", "-j", "1")
    assert result.code == 1
    assert "sweep [2/3] lr=0.5: not started" in result.out
    assert "sweep [3/3] lr=0.25: not started" in result.out
    assert len(table(sweep)) == 1


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (
            ["--sweep", "epoch=1,2"],
            "--sweep epoch: no such parameter in ",
        ),
        (["--sweep", "epoch=1,2"], "pipeline.toml (did you mean 'epochs'?)"),
        (
            ["--sweep", "lr=1,x"],
            "--sweep lr=x: lr is a float (0.1) and x is a string",
        ),
        (["--sweep", "train.sed=1"], "(did you mean 'train.seed'?)"),
        (["--sweep", "epochs="], "--sweep epochs=: needs at least one value"),
        (["--sweep", "epochs=1,,2"], "an empty value"),
        (
            ["--sweep", "epochs=1,two"],
            "--sweep epochs=two: epochs is an integer (1) and two is a string",
        ),
        (["--sweep", "epochs=1", "--sweep", "epochs=2"], "--sweep epochs: given twice"),
        (["--sweep", "epochs=1,1"], "the value 1 is given twice"),
        (["--sweep", "epochs"], "expected NAME=VALUE,VALUE"),
        (["prep", "--sweep", "epochs=1,2"], "no target reads it among prep"),
        ([], "give at least one --sweep"),
    ],
)
def test_bad_sweep_is_one_line_and_changes_nothing(
    sweep: Project, args: list[str], needle: str
) -> None:
    ran(sweep)
    before = workspace_digest(sweep.root)
    rows = table(sweep)
    result = sweep.run("exp", "run", *args)
    assert result.code == 2, result
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlbuild: error: "), result.err
    assert needle in lines[0]
    assert "Traceback" not in result.err
    assert ran(sweep) == []
    assert workspace_digest(sweep.root) == before
    assert table(sweep) == rows


def test_ctrl_c_stops_every_point_and_leaves_the_workspace_untouched(sweep: Project) -> None:
    ran(sweep)
    before = workspace_digest(sweep.root)
    (sweep.root / "train.py").write_text(
        "import time\nopen('started', 'w').close()\ntime.sleep(120)\n"
    )
    before["train.py"] = hashlib.sha256((sweep.root / "train.py").read_bytes()).hexdigest()
    sandboxes: Path = sweep.sandboxes  # type: ignore[attr-defined]
    env = {**os.environ, "TMPDIR": str(sandboxes)}
    argv = [sys.executable, "-m", "mlbuild", "exp", "run", "--sweep", "lr=0.5,0.25", "-j", "2"]
    proc = subprocess.Popen(argv, cwd=sweep.root, env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(list(sandboxes.glob("*/project/started"))) < 2:  # both points' steps are running
        assert proc.poll() is None and time.monotonic() < deadline, "the points did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert list(sandboxes.iterdir()) == []
    assert workspace_digest(sweep.root) == before
    assert len(table(sweep)) == 1


def test_a_relative_remote_cache_is_still_the_workspaces(sweep: Project) -> None:
    with (sweep.root / "pipeline.toml").open("a") as file:
        file.write('\n[cache]\nremote = "../remote"\n')
    assert sweep.run("exp", "run", "--sweep", "lr=0.5").code == 0
    uploaded = list((sweep.root.parent / "remote").rglob("*"))
    assert any(p.is_file() for p in uploaded)


def test_a_temp_dir_inside_the_project_is_not_used_for_sandboxes(
    sweep: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    inside = sweep.root / "tmp"
    inside.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(inside))
    before = workspace_digest(sweep.root)
    result = sweep.run("exp", "run", "--sweep", "lr=0.5,0.25")
    assert result.code == 0, result
    assert list(inside.iterdir()) == []
    assert workspace_digest(sweep.root) == before
    assert list((sweep.root / ".mlbuild" / "sandboxes").iterdir()) == []


def test_exp_diff_compares_two_points(sweep: Project) -> None:
    assert sweep.run("exp", "run", "--sweep", "lr=0.5,0.25").code == 0
    rows = {r["params"]["lr"]: r["id"] for r in table(sweep)}  # type: ignore[index]
    diff = sweep.run("exp", "diff", str(rows[0.5]), str(rows[0.25]))
    assert diff.code == 0, diff
    lr = next(line.split() for line in diff.out.splitlines() if line.split()[:1] == ["lr"])
    acc = next(line.split() for line in diff.out.splitlines() if line.split()[:1] == ["acc"])
    assert lr[1:3] == ["0.5", "0.25"]
    assert acc[1:3] == ["0.5", "0.25"]
