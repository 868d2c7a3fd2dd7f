"""`mlbuild log` and `mlbuild show`: past runs and a target's last manifest, from state.db."""

from __future__ import annotations

import json
import re
import sqlite3

import blake3
import pytest

from tests.conftest import Project

PIPELINE = """
[params]
epochs = 1

[targets.prepare]
cmd = "cat {inputs.raw} > {outputs.clean}"
inputs = { raw = "data/raw.txt" }
outputs = { clean = "build/clean.txt" }

[targets.train]
python = "steps.train:train"
inputs = { data = "build/clean.txt" }
outputs = { model = "build/model.txt" }
params = ["epochs"]
env = ["MLBUILD_TEST_SEED"]

[targets.broken]
cmd = "exit 3"
outputs = ["never.txt"]
"""

TRAIN = """\
from steps.helpers import scale


def train(data, model, epochs):
    print(f"training {epochs} epochs")  # a log to show (a silent step leaves none)
    model.write_text(data.read_text() * scale(epochs))
"""


@pytest.fixture(autouse=True)
def _in_project(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    """Work in the project, as a user does, so paths print relative to it."""
    monkeypatch.chdir(project.root)
    monkeypatch.setenv("MLBUILD_TEST_SEED", "7")


def make(project: Project) -> None:
    project.pipeline(PIPELINE)
    project.write("data/raw.txt", "rows\n")
    project.write("steps/__init__.py", "")
    project.write("steps/helpers.py", "def scale(n):\n    return n\n")
    project.write("steps/train.py", TRAIN)


def three_runs(project: Project) -> None:
    """Run 1 builds all (broken fails), run 2 changes epochs, run 3 goes back: restored."""
    make(project)
    assert project.run("run", "-k", "prepare", "train", "broken").code == 1
    assert project.run("run", "--set", "epochs=2", "prepare", "train").code == 0
    assert project.run("run", "prepare", "train").code == 0


def test_log_lists_runs_newest_first_with_what_each_did(project: Project) -> None:
    three_runs(project)
    out = project.run("log").out
    blocks = out.strip("\n").split("\n\n")
    assert len(blocks) == 3
    time = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
    took = r"\d+\.\d+s"
    assert re.fullmatch(
        rf"run 3  {time}  {took}  ok\n"
        r"    mlbuild run -f \S+/pipeline.toml prepare train\n"
        rf"    restored  1: train \({took}\)\n"
        r"    skipped   1",
        blocks[0],
    ), blocks[0]
    assert re.fullmatch(
        rf"run 2  {time}  {took}  ok\n"
        r"    mlbuild run -f \S+ --set epochs=2 prepare train\n"
        rf"    ran       1: train \({took}\)\n"
        r"    skipped   1",
        blocks[1],
    ), blocks[1]
    assert re.fullmatch(
        rf"run 1  {time}  {took}  failed\n"
        r"    mlbuild run -f \S+ -k prepare train broken\n"
        rf"    ran       2: prepare \({took}\), train \({took}\)\n"
        rf"    failed    1: broken \({took}\)",
        blocks[2],
    ), blocks[2]
    newest = project.run("log", "-n", "1").out
    assert newest.startswith("run 3  ") and newest.count("\nrun ") == 0


def test_log_of_a_target_shows_its_duration_history(project: Project) -> None:
    three_runs(project)
    with sqlite3.connect(".mlbuild/state.db") as db:  # known durations for the statistics
        for run_id, seconds in ((1, 4.0), (2, 6.0)):
            db.execute(
                "UPDATE run_targets SET duration = ? WHERE run_id = ? AND target = 'train'",
                (seconds, run_id),
            )
    out = project.run("log", "train").out.splitlines()
    assert out[0] == "train: the last 3 runs that decided it"
    time = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
    restored = rf"run 3    {time}  restored   \d\.\d{{3}}s  param epochs changed 2 -> 1"
    assert re.fullmatch(restored, out[2]), out[2]
    assert re.fullmatch(rf"run 2    {time}  ran {{10}}6\.0s  param epochs changed 1 -> 2", out[3])
    assert re.fullmatch(rf"run 1    {time}  ran {{10}}4\.0s  never built", out[4])
    assert out[6] == "ran 2 times: last 6.0s, median 5.0s, fastest 4.0s, slowest 6.0s"
    assert project.run("log", "-n", "1", "train").out.count("\nrun ") == 1


def test_show_prints_the_last_manifest_with_digests_params_code_and_log(
    project: Project,
) -> None:
    three_runs(project)
    out = project.run("show", "train").out
    digest = blake3.blake3(b"rows\n").hexdigest()[:16]
    model = blake3.blake3(b"rows\n").hexdigest()[:16]  # epochs=1: the data once
    lines = out.splitlines()
    code = {line.split()[0]: line.split()[1] for line in lines[10:13]}
    assert lines[0] == "train"
    assert re.fullmatch(r"  built     \S+ \S+ \(restored from cache in run 3\)", lines[1])
    assert re.fullmatch(
        r"  took      \d\.\d{3}s \(when it ran; the restore took \d\.\d{3}s\)", lines[2]
    )
    assert lines[3:] == [
        "  log       .mlbuild/logs/train.log (of its last run, not the one restored)",
        "  action    python steps.train:train",
        "  params",
        "    epochs  1",
        "  inputs",
        f"    build/clean.txt  file:{digest}",
        "  code",  # the function's module, what it imports, and its package
        f"    steps/__init__.py  {code['steps/__init__.py']}",
        f"    steps/helpers.py   {code['steps/helpers.py']}",
        f"    steps/train.py     {code['steps/train.py']}",
        "  outputs",
        f"    build/model.txt  file:{model}",
        "  env",
        "    MLBUILD_TEST_SEED  set",
    ]
    assert all(re.fullmatch(r"[0-9a-f]{16}", digest) for digest in code.values())
    data = json.loads(project.run("show", "train", "--json").out)
    assert data["manifest"]["inputs"] == {
        "build/clean.txt": "file:" + blake3.blake3(b"rows\n").hexdigest()
    }
    assert data["built_by"] == {"run": 3, "outcome": "restored"}
    assert data["log"] == ".mlbuild/logs/train.log"


def test_show_of_a_target_without_manifest_says_why_and_exits_1(project: Project) -> None:
    three_runs(project)
    broken = project.run("show", "broken")
    assert broken.code == 1
    assert broken.out == (
        "`broken` has no manifest: it was never built, or its last run failed"
        " (see `mlbuild log broken`).\n"
    )
    unknown = project.run("show", "trian")
    assert unknown.code == 2
    assert "unknown target 'trian'" in unknown.err and "did you mean 'train'" in unknown.err


def test_history_of_a_target_removed_from_the_pipeline_is_still_readable(
    project: Project,
) -> None:
    three_runs(project)
    project.pipeline(PIPELINE.split("[targets.broken]")[0])
    assert project.run("log", "broken").out.startswith("broken: the last 1 run that decided it")


def test_log_before_any_run_says_so_and_creates_no_state(project: Project) -> None:
    make(project)
    assert project.run("log").out == "No runs recorded yet.\n"
    assert project.run("show", "train").code == 1
    assert not (project.root / ".mlbuild").exists()
    assert project.run("log", "-n", "0").code == 2
