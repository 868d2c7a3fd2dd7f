"""The output cache: restoring outputs of a configuration seen before, safely."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import Project
from tests.entry_rows import EntryRow, rows

# The origin's scenario with shell steps; every step appends its name to ran.log.
# raw, norm and weights are larger than INLINE_MAX (objects), the other outputs
# smaller (held in their entries).
ORIGIN = """
[params]
epochs = 1

[targets.importer]
cmd = "echo importer >> ran.log; seq 1 2000 > {outputs.raw}"
outputs = { raw = "build/raw.txt" }

[targets.normalizer]
cmd = "echo normalizer >> ran.log; awk '{{ print $1 / 50 }}' {inputs.raw} > {outputs.norm}"
inputs = { raw = "build/raw.txt" }
outputs = { norm = "build/norm.txt" }

[targets.trainer]
cmd = '''echo trainer >> ran.log; mkdir -p {outputs.model}/weights
for i in $(seq {params.epochs}); do cat {inputs.data}; done > {outputs.model}/weights/w.txt
echo epochs {params.epochs} > {outputs.model}/config.txt; date +%N > {outputs.history}'''
inputs = { data = "build/norm.txt" }
outputs = { model = "build/model", history = "build/history.txt" }
params = ["epochs"]

[targets.evaluator]
cmd = "echo evaluator >> ran.log; wc -l < {inputs.weights} > {outputs.metrics}"
inputs = { weights = "build/model/weights/w.txt" }
outputs = { metrics = "build/metrics.txt" }
"""


def ran(project: Project) -> list[str]:
    """Steps executed so far, from the log every command appends to."""
    log = project.root / "ran.log"
    return log.read_text().split() if log.exists() else []


def snapshot(project: Project) -> dict[str, bytes]:
    build = project.root / "build"
    return {str(p.relative_to(build)): p.read_bytes() for p in build.rglob("*") if p.is_file()}


def objects(project: Project) -> list[Path]:
    root = project.root / ".mlbuild/cache/objects"
    return [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".tmp")]


def test_origin_scenario_restores_instead_of_retraining(project: Project) -> None:
    project.pipeline(ORIGIN)
    assert project.run().code == 0
    assert ran(project) == ["importer", "normalizer", "trainer", "evaluator"]
    first = snapshot(project)

    second = project.run("run", "--set", "epochs=2")
    assert ran(project)[4:] == ["trainer", "evaluator"]
    assert "Step `importer` is up to date (skipped)." in second.out
    assert "Step `normalizer` is up to date (skipped)." in second.out

    third = project.run()
    assert third.code == 0, third.err
    assert ran(project)[6:] == []  # nothing executed at all
    assert "Step `trainer` restored from cache in " in third.out
    assert "Step `evaluator` restored from cache in " in third.out
    assert snapshot(project) == first  # byte-identical, history's timestamp included
    assert "2 skipped, 2 restored" in third.out
    assert project.run().started() == []


def test_restored_outputs_are_copies_not_links(project: Project) -> None:
    project.pipeline(ORIGIN)
    project.run()
    project.run("run", "--set", "epochs=2")
    project.run()
    restored = project.root / "build/model/weights/w.txt"
    assert restored.stat().st_nlink == 1
    before = {p: p.read_bytes() for p in objects(project)}
    restored.write_text("edited by the user\n")
    assert {p: p.read_bytes() for p in objects(project)} == before


def test_directory_tree_with_symlink_and_exec_bit_round_trips(project: Project) -> None:
    project.pipeline(
        """
        [params]
        v = 1

        [targets.tree]
        cmd = '''mkdir -p out/a/empty out/b && echo {params.v} > out/a/f.txt
        printf '#!/bin/sh\\n' > out/b/run.sh && chmod 755 out/b/run.sh
        ln -s ../a/f.txt out/b/link'''
        outputs = ["out"]
        params = ["v"]
        """
    )
    project.run()
    project.run("run", "--set", "v=2")
    result = project.run()
    assert "restored from cache" in result.out
    out = project.root / "out"
    assert (out / "a/f.txt").read_text() == "1\n"
    assert (out / "a/empty").is_dir()
    assert os.readlink(out / "b/link") == "../a/f.txt"
    assert (out / "b/run.sh").stat().st_mode & 0o777 == 0o755
    assert project.run().started() == []


def test_corrupted_object_is_detected_and_the_target_runs(project: Project) -> None:
    project.pipeline(ORIGIN)
    project.run()
    project.run("run", "--set", "epochs=2")
    for obj in objects(project):
        obj.chmod(0o644)
        obj.write_bytes(obj.read_bytes() + b"bit rot")
    result = project.run()
    assert result.code == 0
    assert "cache entry of `trainer` not used: object " in result.err
    assert "is corrupted" in result.err
    # The evaluator's metrics are inline: its entry needs no object.
    assert ran(project)[6:] == ["trainer"]
    assert "Step `evaluator` restored from cache" in result.out
    assert project.run().started() == []


def test_missing_object_falls_back_to_running(project: Project) -> None:
    project.pipeline(ORIGIN)
    project.run()
    project.run("run", "--set", "epochs=2")
    for obj in objects(project):
        obj.unlink()
    result = project.run()
    assert result.code == 0
    assert "is missing; running it" in result.err
    assert ran(project)[6:] == ["trainer"]
    assert "Step `evaluator` restored from cache" in result.out


def test_cache_false_never_stores(project: Project) -> None:
    project.pipeline(ORIGIN.replace('params = ["epochs"]', 'params = ["epochs"]\ncache = false'))
    project.run()
    project.run("run", "--set", "epochs=2")
    result = project.run()
    assert "Step `trainer` has started: param epochs changed 2 -> 1." in result.out
    # The evaluator's cache is on, and its input came out as in the first run.
    assert ran(project)[6:] == ["trainer"]
    assert "Step `evaluator` restored from cache" in result.out


def test_always_run_is_never_restored(project: Project) -> None:
    project.pipeline(
        """
        [targets.stamp]
        cmd = "echo stamp >> ran.log; echo x > {outputs.o}"
        outputs = { o = "o.txt" }
        always_run = true
        """
    )
    project.run()
    project.run()
    assert ran(project) == ["stamp", "stamp"]


def test_no_cache_flag_runs_instead_of_restoring(project: Project) -> None:
    project.pipeline(ORIGIN)
    project.run()
    project.run("run", "--set", "epochs=2")
    project.run("run", "--no-cache")
    assert ran(project)[6:] == ["trainer", "evaluator"]


def test_gc_keeps_what_current_manifests_reference(project: Project) -> None:
    project.pipeline(ORIGIN)
    project.run()
    for epochs in (2, 3):
        project.run("run", "--set", f"epochs={epochs}")
    result = project.run("gc", "--keep-runs", "0")
    assert result.code == 0
    assert result.out.startswith("mlbuild gc: removed 4 entries and ")
    assert "kept 4 entries" in result.out
    # What the workspace holds now (epochs=3) is still restorable...
    (project.root / "build/history.txt").unlink()
    again = project.run("run", "--set", "epochs=3")
    assert "Step `trainer` restored from cache" in again.out
    # ...while epochs=1 is gone and reruns.
    project.run()
    assert ran(project)[-2:] == ["trainer", "evaluator"]


def test_gc_max_size_and_plain_gc(project: Project) -> None:
    project.pipeline(ORIGIN)
    project.run()
    project.run("run", "--set", "epochs=2")
    plain = project.run("gc")
    assert "removed 0 entries and 0 objects" in plain.out
    assert "every entry kept" in plain.out
    small = project.run("gc", "--max-size", "1B")
    assert "removed 2 entries" in small.out
    bad = project.run("gc", "--max-size", "lots")
    assert bad.code == 2


def test_cache_verify_reports_corruption(project: Project) -> None:
    project.pipeline(ORIGIN)
    project.run()
    clean = project.run("cache", "verify")
    assert clean.code == 0
    assert "0 corrupted" in clean.out
    victim = objects(project)[0]
    victim.chmod(0o644)
    victim.write_bytes(b"garbage")
    result = project.run("cache", "verify")
    assert result.code == 1
    assert "1 corrupted" in result.out
    assert not victim.exists()


@pytest.mark.parametrize("blocker", ["file", "objects-file"])
def test_unwritable_cache_warns_and_the_build_succeeds(project: Project, blocker: str) -> None:
    project.pipeline(ORIGIN)
    cache = project.root / ".mlbuild/cache"
    cache.parent.mkdir(parents=True)
    # Tests run as root here, so permissions cannot make a directory unwritable:
    # a file where a directory must be makes every write fail the same way.
    if blocker == "file":
        cache.write_text("not a directory")
    else:
        cache.mkdir()
        (cache / "objects").write_text("not a directory")
    result = project.run()
    assert result.code == 0
    assert "cannot write the cache" in result.err
    assert result.err.count("cannot write the cache") == 1
    assert ran(project) == ["importer", "normalizer", "trainer", "evaluator"]
    assert project.run().started() == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-size=-5"], "--max-size: '-5' is negative"),
        (["--max-size", "inf"], "--max-size: not a size: 'inf'"),
        (["--keep-runs", "-1"], "--keep-runs -1: must be 0 or more"),
    ],
)
def test_gc_refuses_negative_limits(project: Project, args: list[str], message: str) -> None:
    project.pipeline(ORIGIN)
    project.run()
    before = sorted(p.name for p in objects(project))
    result = project.run("gc", *args)
    assert result.code == 2
    assert result.err.strip().splitlines() == [f"mlbuild: error: {message}"]
    assert sorted(p.name for p in objects(project)) == before


def test_gc_removes_old_and_invalid_entries(project: Project) -> None:
    project.pipeline(ORIGIN)
    project.run()
    good = [row.key for row, _ in rows(project.root)]
    # As rows, and as the entry files of before entries.db.
    EntryRow(project.root, "ab" + "c" * 62).write_text(
        '{"version": 1, "key": "ab' + "c" * 62 + '"}'
    )
    bad = '{"version": 2, "key": "ab' + "d" * 62 + '", "created": "yesterday"}'
    EntryRow(project.root, "ab" + "d" * 62).write_text(bad)
    runs = project.root / ".mlbuild/cache/runs"
    old = runs / "ab" / ("e" * 62 + ".json")
    old.parent.mkdir(parents=True)
    old.write_text('{"version": 1, "key": "ab' + "e" * 62 + '"}')
    broken = runs / "ab" / ("f" * 62 + ".json")
    broken.write_text('{"version": 2, "key": "ab' + "f" * 62 + '", "created": "yesterday"}')
    result = project.run("gc")
    assert result.code == 0
    assert [row.key for row, _ in rows(project.root)] == good
    assert sorted(runs.rglob("*.json")) == []
