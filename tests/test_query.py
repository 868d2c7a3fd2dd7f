"""Staleness as a query: `status` and `run -n` say what a run would restore, and write nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import Project
from tests.entry_rows import rows
from tests.test_cache import ORIGIN, objects, ran

NAMES = ["importer", "normalizer", "trainer", "evaluator"]


def predicted(project: Project, *args: str) -> dict[str, str]:
    """target -> the action `status --json` predicts: skip, restore or run."""
    result = project.run("status", "--json", *args)
    return {row["target"]: row["action"] for row in json.loads(result.out)["targets"]}


def happened(project: Project, *args: str) -> dict[str, str]:
    """target -> what a real `run` did, in the words of `predicted`."""
    out = project.run("run", *args).out
    done: dict[str, str] = {}
    for line in out.splitlines():
        if not line.startswith("Step `"):
            continue
        name = line.split("`")[1]
        if "is up to date" in line:
            done[name] = "skip"
        elif "restored from cache" in line:
            done[name] = "restore"
        elif "has started" in line:
            done[name] = "run"
    return done


def built_twice(project: Project) -> None:
    """The origin pipeline run with epochs 1 then 2: the cache holds both trainings."""
    project.pipeline(ORIGIN)
    assert project.run().code == 0
    assert project.run("run", "--set", "epochs=2").code == 0


def test_after_clean_status_says_restore_and_run_restores_exactly_those(project: Project) -> None:
    built_twice(project)
    assert project.run("clean").code == 0
    status = project.run("status")
    assert status.code == 1
    assert "stale  importer: outputs were cleaned (would restore from cache)\n" in status.out
    assert "stale  evaluator: outputs were cleaned (would restore from cache)\n" in status.out
    dry = project.run("run", "-n")
    assert "Step `trainer` would restore from cache: outputs were cleaned." in dry.out
    assert "mlbuild: 4 would restore in " in dry.out
    prediction = predicted(project)
    assert prediction == dict.fromkeys(NAMES, "restore")
    assert happened(project) == prediction
    assert ran(project)[6:] == []  # nothing executed


def test_prediction_matches_the_run_when_a_param_changes_back(project: Project) -> None:
    built_twice(project)
    status = project.run("status")  # epochs 1 again: its training is in the cache
    assert "stale  trainer: param epochs changed 2 -> 1 (would restore from cache)\n" in status.out
    # The evaluator's input is predicted from the entry: its key is that of the first run.
    assert (
        "stale  evaluator: input changed: build/model/weights/w.txt (would restore from cache)\n"
        in status.out
    )
    prediction = predicted(project)
    assert prediction == {
        "importer": "skip",
        "normalizer": "skip",
        "trainer": "restore",
        "evaluator": "restore",
    }
    assert happened(project) == prediction


def test_consumer_of_a_new_configuration_would_run_after_its_producer(project: Project) -> None:
    built_twice(project)
    status = project.run("status", "--set", "epochs=3")
    assert "stale  trainer: param epochs changed 2 -> 3\n" in status.out
    assert (
        "stale  evaluator: upstream 'trainer' would run\n" in status.out
    )  # no restore note: its input is not known until the trainer ran
    prediction = predicted(project, "--set", "epochs=3")
    assert prediction["evaluator"] == "run"
    assert happened(project, "--set", "epochs=3") == prediction


CONSTANT = """
[params]
p = 1

[targets.producer]
cmd = "echo producer >> ran.log; echo same > {outputs}"
outputs = ["made.txt"]
params = ["p"]

[targets.consumer]
cmd = "echo consumer >> ran.log; cat {inputs} > {outputs}"
inputs = ["made.txt"]
outputs = ["used.txt"]
"""


def test_consumer_of_an_identical_restore_is_predicted_fresh(project: Project) -> None:
    project.pipeline(CONSTANT)
    project.run()
    project.run("run", "--set", "p=2")  # same bytes: the consumer stays fresh
    assert ran(project) == ["producer", "consumer", "producer"]
    status = project.run("status")
    assert status.out == (
        "stale  producer: param p changed 2 -> 1 (would restore from cache)\nfresh  consumer\n"
    )
    prediction = predicted(project)
    assert prediction == {"producer": "restore", "consumer": "skip"}
    assert happened(project) == prediction
    assert ran(project) == ["producer", "consumer", "producer"]


def test_an_invalid_entry_is_predicted_to_run_and_left_for_the_run(project: Project) -> None:
    built_twice(project)
    trainer = [row for row, data in rows(project.root) if data["target"] == "trainer"]
    for row in trainer:
        row.write_text("{not json")
    status = project.run("status")
    assert "stale  trainer: param epochs changed 2 -> 1\n" in status.out  # no restore note
    assert all(row.read_bytes() == b"{not json" for row in trainer)  # the query deletes nothing
    prediction = predicted(project)
    assert prediction["trainer"] == "run"
    # Its consumer cannot be predicted before the step ran: "would run", the safe answer.
    # The step is deterministic here, so the run finds the consumer's entry after all.
    assert prediction["evaluator"] == "run"
    done = happened(project)
    assert done["trainer"] == "run"
    assert done["evaluator"] == "restore"
    assert ran(project)[6:] == ["trainer"]


def test_a_missing_object_is_predicted_to_run(project: Project) -> None:
    built_twice(project)
    for obj in objects(project):
        obj.unlink()
    prediction = predicted(project)
    assert prediction["trainer"] == "run"
    assert prediction["evaluator"] == "run"  # its input is not known before the step ran
    done = happened(project)
    assert done["trainer"] == "run"
    # The step is deterministic and the evaluator's entry holds its file (inline).
    assert done["evaluator"] == "restore"


def test_a_corrupted_object_is_predicted_restored_and_the_run_falls_back(project: Project) -> None:
    """Bytes are not hashed by the query (that would cost a restore): the run finds the rot."""
    built_twice(project)
    for obj in objects(project):
        obj.chmod(0o644)
        obj.write_bytes(obj.read_bytes() + b"bit rot")
    assert predicted(project)["trainer"] == "restore"
    result = project.run()
    assert "is corrupted" in result.err
    assert ran(project)[6:] == ["trainer"]  # the evaluator's entry needs no object


def test_no_cache_and_force_are_predicted_to_run(project: Project) -> None:
    built_twice(project)
    dry = project.run("run", "-n", "--no-cache")
    assert "Step `trainer` would run: param epochs changed 2 -> 1." in dry.out
    dry = project.run("run", "-n", "--force", "trainer")
    assert "Step `trainer` would run: forced; param epochs changed 2 -> 1." in dry.out
    assert "Step `evaluator` would run" not in dry.out  # only the trainer's deps are selected


def test_dag_status_marks_would_restore_targets(project: Project) -> None:
    built_twice(project)
    out = project.run("dag", "--status").out
    assert "3  trainer     STALE  <- normalizer\n     param epochs changed 2 -> 1\n" in out
    assert "     would restore from cache\n" in out


SLOW = """
[params]
p = 1

[targets.quick]
cmd = "echo quick > {outputs}"
outputs = ["quick.txt"]

[targets.slow]
cmd = "touch started; while [ ! -e go ]; do sleep 0.02; done; echo {params.p} > {outputs}"
outputs = ["slow.txt"]
params = ["p"]
"""


def _state_files(root: Path) -> dict[str, bytes]:
    """Every file of `.mlbuild/` but the running build's own (its log, lock, pid record) and
    SQLite's shared-memory index (`-shm`, where every reader takes a read mark)."""
    state = root / ".mlbuild"
    skipped = ("lock", "state.db-shm")
    return {
        str(p.relative_to(state)): p.read_bytes()
        for p in sorted(state.rglob("*"))
        if p.is_file()
        and p.name not in skipped
        and "logs" not in p.parts
        and "running" not in p.parts
    }


def test_status_during_a_build_answers_and_writes_nothing(project: Project) -> None:
    project.pipeline(SLOW)
    (project.root / "go").touch()
    assert project.run().code == 0
    (project.root / "go").unlink()
    (project.root / "started").unlink()
    build = subprocess.Popen(
        [sys.executable, "-m", "mlbuild", "run", "--set", "p=2"],
        cwd=project.root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not (project.root / "started").exists():
            assert build.poll() is None, "the build ended before its step started"
            assert time.monotonic() < deadline, "the step never started"
            time.sleep(0.02)
        before = _state_files(project.root)
        status = project.run("status", "--set", "p=2")
        assert status.code == 1
        assert "fresh  quick\n" in status.out
        assert "stale  slow: " in status.out
        assert _state_files(project.root) == before
        assert not (project.root / "slow.txt").exists()
    finally:
        (project.root / "go").touch()
        assert build.wait(timeout=60) == 0
    assert project.run("status", "--set", "p=2").code == 0
    assert os.path.exists(project.root / "slow.txt")


def test_a_directory_around_a_restored_output_is_not_guessed(project: Project) -> None:
    """The entry gives the restored file's digest, not its directory's: say "would run"."""
    project.pipeline(
        """
        [params]
        p = 1

        [targets.producer]
        cmd = "echo {params.p} > {outputs}"
        outputs = ["data/made.txt"]
        params = ["p"]

        [targets.consumer]
        cmd = "ls {inputs} > {outputs}; cat {inputs}/made.txt >> {outputs}"
        inputs = ["data"]
        outputs = ["listing.txt"]
        """
    )
    project.run()
    project.run("run", "--set", "p=2")
    status = project.run("status")
    assert "stale  producer: param p changed 2 -> 1 (would restore from cache)\n" in status.out
    assert (
        "stale  consumer: what 'data' holds after a restore is not known until then\n" in status.out
    )
    done = happened(project)
    assert done == {"producer": "restore", "consumer": "restore"}
