"""`mlbuild run` as a user sees it: what runs, what is skipped, and why."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Project

CHAIN = """
[params]
greeting = "hello"
repeat = 2

[targets.upper]
cmd = "tr a-z A-Z < {inputs.raw} > {outputs.up}"
inputs = { raw = "data/raw.txt" }
outputs = { up = "build/upper.txt" }

[targets.first_line]
cmd = "head -n 1 {inputs.up} > {outputs.first}"
inputs = { up = "build/upper.txt" }
outputs = { first = "build/first.txt" }

[targets.greet]
cmd = "for i in $(seq {params.repeat}); do echo {params.greeting}; done > {outputs.g}"
outputs = { g = "build/greet.txt" }
params = ["greeting", "repeat"]

[targets.report]
cmd = "cat {inputs} > {outputs.report}"
inputs = ["build/first.txt", "build/greet.txt"]
outputs = { report = "build/report.txt" }
"""


def make_chain(project: Project) -> None:
    project.pipeline(CHAIN)
    project.write("data/raw.txt", "one\ntwo\n")


def test_first_run_builds_everything_in_order(project: Project) -> None:
    make_chain(project)
    result = project.run("run", "-j", "1")
    assert result.code == 0, result.err
    assert result.started() == ["upper", "first_line", "greet", "report"]
    assert "Step `upper` has started: never built." in result.out
    assert "Step `upper` has finished in " in result.out
    assert project.read("build/report.txt") == "ONE\nhello\nhello\n"
    assert "4 ran" in result.out


def test_second_run_and_touch_run_nothing(project: Project) -> None:
    make_chain(project)
    project.run()
    again = project.run()
    assert again.code == 0
    assert again.started() == []
    for name in ("upper", "first_line", "greet", "report"):
        assert f"Step `{name}` is up to date (skipped)." in again.out
    for path in project.root.rglob("*"):
        if ".mlbuild" not in path.parts and path.is_file():
            os.utime(path, ns=(path.stat().st_mtime_ns + 5_000_000_000,) * 2)
    touched = project.run()
    assert touched.started() == []


def test_changed_input_reruns_consumers_until_bytes_match(project: Project) -> None:
    make_chain(project)
    project.run()
    # The first line is unchanged, so first_line's output comes out byte-identical
    # and report (its consumer) stays fresh: early cutoff.
    project.write("data/raw.txt", "one\nTWO-CHANGED\n")
    result = project.run()
    assert result.started() == ["upper", "first_line"]
    assert "Step `upper` has started: input changed: data/raw.txt." in result.out
    assert "Step `first_line` has started: input changed: build/upper.txt." in result.out
    assert "Step `report` is up to date (skipped)." in result.out
    project.write("data/raw.txt", "zero\n")
    result = project.run()
    assert result.started() == ["upper", "first_line", "report"]
    assert project.read("build/report.txt") == "ZERO\nhello\nhello\n"


def test_param_change_reruns_only_its_reader(project: Project) -> None:
    make_chain(project)
    project.run()
    project.pipeline(CHAIN.replace("repeat = 2", "repeat = 3"))
    result = project.run()
    assert result.started() == ["greet", "report"]
    assert "Step `greet` has started: param repeat changed 2 -> 3." in result.out


def test_set_overrides_without_editing_the_file(project: Project) -> None:
    make_chain(project)
    project.run()
    result = project.run("run", "--set", "repeat=1")
    assert result.started() == ["greet", "report"]
    assert "param repeat changed 2 -> 1" in result.out
    assert project.read("build/greet.txt") == "hello\n"
    strings = project.run("run", "--set", "greeting=bonjour", "--set", "repeat=1")
    assert 'param greeting changed "hello" -> "bonjour"' in strings.out
    # Back to the file's values: greet is stale (its manifest is for repeat=1), and its
    # outputs for repeat=2 come back from the output cache instead of running again.
    back = project.run()
    assert back.started() == []
    assert "Step `greet` restored from cache in " in back.out
    assert project.read("build/greet.txt") == "hello\nhello\n"


def test_command_change_and_output_tampering(project: Project) -> None:
    make_chain(project)
    project.run()
    project.pipeline(CHAIN.replace("head -n 1", "head -n 2"))
    result = project.run()
    assert "Step `first_line` has started: command changed." in result.out
    (project.root / "build/report.txt").write_text("tampered\n")
    result = project.run("run", "--no-cache")
    assert result.started() == ["report"]
    assert "output modified: build/report.txt" in result.out
    (project.root / "build/greet.txt").unlink()
    result = project.run("run", "--no-cache")
    assert "Step `greet` has started: output missing: build/greet.txt." in result.out
    # With the cache, a tampered output is put back without running anything.
    (project.root / "build/report.txt").write_text("tampered again\n")
    result = project.run()
    assert result.started() == []
    assert "Step `report` restored from cache" in result.out
    assert project.read("build/report.txt") == "ONE\nTWO\nhello\nhello\n"


def test_selection_builds_only_what_the_target_needs(project: Project) -> None:
    make_chain(project)
    result = project.run("run", "first_line")
    assert result.started() == ["upper", "first_line"]
    assert not (project.root / "build/greet.txt").exists()


def test_dry_run_and_status_run_nothing(project: Project) -> None:
    make_chain(project)
    dry = project.run("run", "-n")
    assert dry.code == 0
    assert "Step `upper` would run: never built." in dry.out
    assert not (project.root / "build").exists()
    status = project.run("status")
    assert status.code == 1
    assert "stale  upper: never built" in status.out
    project.run()
    assert project.run("status").code == 0
    project.write("data/raw.txt", "changed\n")
    status = project.run("status", "--json")
    assert status.code == 1
    assert '"target": "upper"' in status.out
    assert "input changed: data/raw.txt" in status.out


def test_force_reruns_a_fresh_target(project: Project) -> None:
    make_chain(project)
    project.run()
    result = project.run("run", "--force", "greet")
    assert result.started() == ["greet"]
    assert "Step `greet` has started: forced." in result.out


def test_directory_input_names_changed_entries(project: Project) -> None:
    project.pipeline(
        """
        [targets.count]
        cmd = "ls {inputs.d} | wc -l > {outputs.n}"
        inputs = { d = "data" }
        outputs = { n = "n.txt" }
        """
    )
    for i in range(3):
        project.write(f"data/f{i}.csv", f"{i}\n")
    project.run()
    project.write("data/f1.csv", "changed\n")
    project.write("data/new.csv", "x\n")
    (project.root / "data/f2.csv").unlink()
    result = project.run()
    assert "input changed: data (added new.csv; removed f2.csv; modified f1.csv)" in result.out


def test_glob_input_sees_new_matches(project: Project) -> None:
    project.pipeline(
        """
        [targets.cat]
        cmd = "cat {inputs.parts} > {outputs.all}"
        inputs = { parts = "parts/*.txt" }
        outputs = { all = "all.txt" }
        """
    )
    project.write("parts/a.txt", "a\n")
    project.run()
    project.write("parts/b.txt", "b\n")
    project.write("parts/ignored.md", "no\n")
    result = project.run()
    assert "input added: parts/b.txt" in result.out
    assert project.read("all.txt") == "a\nb\n"
    project.write("parts/ignored.md", "still not an input\n")
    assert project.run().started() == []


def test_failed_step_is_not_recorded_and_stops_the_build(project: Project) -> None:
    project.pipeline(
        """
        [targets.bad]
        cmd = "echo partial > {outputs.o}; echo oops; exit 3"
        outputs = { o = "o.txt" }

        [targets.after_bad]
        cmd = "cp {inputs.o} {outputs.p}"
        inputs = { o = "o.txt" }
        outputs = { p = "p.txt" }
        """
    )
    result = project.run()
    assert result.code == 1
    assert "Step `bad` failed after" in result.err
    assert "exit code 3" in result.err
    assert "    oops" in result.err
    assert ".mlbuild/logs/bad.log" in result.err
    assert "Step `after_bad` was not run: upstream 'bad' failed." in result.out
    again = project.run()
    assert again.started() == ["bad"]


def test_missing_declared_output_fails(project: Project) -> None:
    project.pipeline(
        """
        [targets.lazy]
        cmd = "true"
        outputs = ["never.txt"]
        """
    )
    result = project.run()
    assert result.code == 1
    assert "did not write declared output 'never.txt'" in result.err


def test_stale_output_is_removed_before_rerun(project: Project) -> None:
    project.pipeline(
        """
        [params]
        write = true

        [targets.maybe]
        cmd = "if {params.write}; then echo x > {outputs.o}; fi"
        outputs = { o = "o.txt" }
        params = ["write"]
        """
    )
    project.run()
    # A step that stops writing its output fails instead of trusting yesterday's file.
    result = project.run("run", "--set", "write=false")
    assert result.code == 1
    assert not (project.root / "o.txt").exists()


def test_step_sees_its_name_and_params_in_the_environment(project: Project) -> None:
    project.pipeline(
        """
        [targets.env]
        cmd = "echo $MLBUILD_TARGET $MLBUILD_PARAM_LEARNING_RATE > {outputs.o}"
        outputs = { o = "o.txt" }
        params = { learning_rate = 0.001 }
        """
    )
    project.run()
    assert project.read("o.txt") == "env 0.001\n"


def test_env_variables_declared_count(project: Project) -> None:
    project.pipeline(
        """
        [targets.env]
        cmd = "echo ${MLB_TEST_VAR:-none} > {outputs.o}"
        outputs = { o = "o.txt" }
        env = ["MLB_TEST_VAR"]
        """
    )
    project.run()
    os.environ["MLB_TEST_VAR"] = "1"
    try:
        result = project.run()
    finally:
        del os.environ["MLB_TEST_VAR"]
    assert "Step `env` has started: env MLB_TEST_VAR changed." in result.out


def test_always_run_runs_every_time(project: Project) -> None:
    project.pipeline(
        """
        [targets.stamp]
        cmd = "date +%N > {outputs.o}"
        outputs = { o = "o.txt" }
        always_run = true
        """
    )
    project.run()
    result = project.run()
    assert "Step `stamp` has started: always_run." in result.out


def test_clean_removes_declared_outputs_only(project: Project) -> None:
    make_chain(project)
    project.run()
    project.write("build/keep.txt", "mine\n")
    result = project.run("clean", "greet")
    assert result.out == "removed build/greet.txt\n"
    assert (project.root / "build/report.txt").exists()
    assert project.run("run", "--no-cache").started() == ["greet"]
    project.run("clean")
    assert sorted(p.name for p in (project.root / "build").iterdir()) == ["keep.txt"]


def test_state_db_is_versioned_and_corruption_starts_over(project: Project) -> None:
    make_chain(project)
    project.run()
    db = project.root / ".mlbuild" / "state.db"
    with sqlite3.connect(db) as conn:
        version = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        mode = conn.execute("PRAGMA journal_mode").fetchone()
    assert version == ("7",)
    assert mode == ("wal",)
    for suffix in ("-wal", "-shm"):
        (project.root / f".mlbuild/state.db{suffix}").unlink(missing_ok=True)
    db.write_bytes(b"this is not a database" * 100)
    result = project.run("run", "--no-cache")
    assert result.code == 0
    assert "was moved to state.db.bad-" in result.err
    assert sorted(result.started()) == ["first_line", "greet", "report", "upper"]
    assert any(p.name.startswith("state.db.bad-") for p in db.parent.iterdir())
    assert project.run().started() == []


def test_unknown_schema_version_is_moved_aside(project: Project) -> None:
    make_chain(project)
    project.run()
    db = project.root / ".mlbuild" / "state.db"
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    result = project.run()
    assert "schema version 999" in result.err
    assert result.code == 0


def test_state_dir_ignores_itself_for_git(project: Project) -> None:
    make_chain(project)
    project.run()
    assert (project.root / ".mlbuild/.gitignore").read_text().splitlines()[-1] == "*"


def test_list_shows_targets_in_build_order(project: Project) -> None:
    make_chain(project)
    result = project.run("list")
    names = [line.split(":")[0] for line in result.out.splitlines()]
    assert names == ["upper", "first_line", "greet", "report"]


@pytest.mark.parametrize("closed", [">&-", ">&- 2>&-"])
def test_a_run_with_stdout_closed_builds_and_says_nothing(tmp_path: Path, closed: str) -> None:
    """`mlbuild run >&-` used to end in a traceback (sys.stdout is None then)."""
    (tmp_path / "pipeline.toml").write_text(
        '[targets.a]\ncmd = "echo hi > {outputs}"\noutputs = ["a.txt"]\n'
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    command = f"{sys.executable} -m mlbuild run {closed}"
    for _ in range(2):
        done = subprocess.run(
            ["sh", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert (tmp_path / "a.txt").read_text() == "hi\n"
