"""Issue 17, the first hour: the environment steps get, true reasons, honest history and reports."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import Project


def mlbuild(cwd: Path, *args: str, path: str = "/usr/bin:/bin") -> subprocess.CompletedProcess[str]:
    """The CLI as `.venv/bin/mlbuild` runs it from a shell that never activated the venv."""
    env = {**os.environ, "PATH": path}
    return subprocess.run(
        [sys.executable, "-m", "mlbuild", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
    )


# -- item 1: shell steps find mlbuild's interpreter -------------------------------------


PYTHONS = """
[targets.plain]
cmd = "python -c 'import sys; print(sys.prefix)' > {outputs}"
outputs = ["plain.txt"]

[targets.placeholder]
cmd = "{python} -c 'import sys; print(sys.executable)' > {outputs}"
outputs = ["placeholder.txt"]
"""


def test_a_shell_steps_python_is_mlbuilds_without_an_activated_venv(tmp_path: Path) -> None:
    (tmp_path / "pipeline.toml").write_text(PYTHONS)
    result = mlbuild(tmp_path, "run")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "plain.txt").read_text() == sys.prefix + "\n"
    assert (tmp_path / "placeholder.txt").read_text() == sys.executable + "\n"


def test_the_step_path_is_not_part_of_the_key(tmp_path: Path) -> None:
    """Another PATH (another shell, another checkout's venv) does not make targets stale."""
    (tmp_path / "pipeline.toml").write_text(PYTHONS)
    assert mlbuild(tmp_path, "run").returncode == 0
    status = mlbuild(tmp_path, "status", path="/bin:/usr/bin:/usr/local/bin")
    assert status.returncode == 0, status.stderr
    assert "stale" not in status.stdout, status.stdout


def test_python_placeholder_takes_no_name(project: Project) -> None:
    project.pipeline('[targets.a]\ncmd = "{python.x} -V"\n')
    result = project.run("list")
    assert result.code == 2
    assert "targets.a.cmd" in result.err and "{python} takes no name" in result.err
    assert result.err.count("\n") == 1


# -- items 3 and 4: true reasons; an interrupted step is recorded as such ------------------


REASONS = """
[targets.good]
cmd = "echo good > {outputs}"
outputs = ["good.txt"]

[targets.bad]
cmd = "echo trying; exit 3"
outputs = ["bad.txt"]

[targets.fresh]
cmd = "echo fresh > {outputs}"
outputs = ["fresh.txt"]
"""


def test_status_run_and_log_say_why_a_target_has_no_manifest(project: Project) -> None:
    project.pipeline(REASONS)
    first = project.run("run", "-k", "good", "bad")
    assert first.code == 1
    assert project.run("clean", "good").code == 0
    status = project.run("status")
    assert "stale  good: outputs were cleaned (would restore from cache)\n" in status.out
    assert "stale  bad: its last run failed\n" in status.out, status.out
    assert "stale  fresh: never built\n" in status.out, status.out  # no history at all
    dry = project.run("run", "-n", "--no-cache", "good")
    assert "Step `good` would run: outputs were cleaned." in dry.out, dry.out
    again = project.run("run", "--no-cache", "good")
    assert "Step `good` has started: outputs were cleaned." in again.out, again.out
    log = project.run("log", "good").out
    assert re.search(r"ran\s+\S+s\s+outputs were cleaned", log), log
    assert re.search(r"cleaned\s+0\.000s", log), log
    assert "cleaned   1: good" in project.run("log").out


SLOW = """
[targets.slow]
cmd = "touch started.flag && sleep 30 && echo done > {outputs}"
outputs = ["slow.txt"]
"""


def _interrupt_when_started(tmp_path: Path, *args: str) -> tuple[int, str]:
    """Start mlbuild, wait until the step has started and run a little, then send SIGINT."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlbuild", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "started.flag").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "started.flag").exists()
        time.sleep(0.5)  # the step has run a while: its duration is not zero
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
        assert proc.stdout is not None
        return code, proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_an_interrupted_step_is_recorded_with_its_duration(tmp_path: Path) -> None:
    (tmp_path / "pipeline.toml").write_text(SLOW)
    code, seen = _interrupt_when_started(tmp_path, "run")
    assert code == 130, seen
    took = re.search(r"Step `slow` was interrupted after (\d+\.\d{3})s\.", seen)
    assert took is not None, seen
    assert float(took.group(1)) > 0
    log = mlbuild(tmp_path, "log", "slow").stdout
    row = re.search(r"interrupted\s+(\d+\.\d{3})s\s+never built", log)
    assert row is not None and float(row.group(1)) > 0, log
    assert not re.search(r"^run .*not run", log, re.M), log
    assert "its step did not run to success in these runs" in log
    assert "interrupted  1: slow (" in mlbuild(tmp_path, "log").stdout
    status = mlbuild(tmp_path, "status").stdout
    assert "stale  slow: its last run was interrupted\n" in status, status


def test_watch_names_the_step_it_stopped(tmp_path: Path) -> None:
    (tmp_path / "pipeline.toml").write_text(SLOW)
    code, seen = _interrupt_when_started(tmp_path, "watch")
    assert code == 0, seen
    assert "mlbuild watch: stopped; interrupted `slow`: it runs again on the next build." in seen


# -- item 13: a Python step's failure names its function; show --json keeps TOML types -----


def test_a_python_steps_failure_names_its_function_not_a_command(project: Project) -> None:
    project.write("steps.py", "def f():\n    raise ValueError('no')\n")
    project.pipeline('[targets.t]\npython = "steps:f"\n')
    result = project.run("run")
    assert result.code == 1
    assert "  function: steps:f\n" in result.err, result.err
    assert "command:" not in result.err


def test_a_shell_steps_failure_still_shows_its_command(project: Project) -> None:
    project.pipeline('[targets.t]\ncmd = "exit 4"\n')
    result = project.run("run")
    assert "  command: exit 4\n" in result.err, result.err


def test_show_json_gives_params_their_toml_types(project: Project) -> None:
    project.pipeline(
        """
        [params]
        epochs = 1
        lr = 0.5
        flag = true
        name = "x"
        layers = [1, 2]
        day = 1979-05-27
        big = inf

        [targets.a]
        cmd = "echo > {outputs}"
        outputs = ["a.txt"]
        params = ["epochs", "lr", "flag", "name", "layers", "day", "big"]
        """
    )
    assert project.run("run").code == 0
    shown = json.loads(project.run("show", "--json", "a").out)
    assert shown["manifest"]["params"] == {
        "epochs": 1,
        "lr": 0.5,
        "flag": True,
        "name": "x",
        "layers": [1, 2],
        "day": "1979-05-27",
        "big": "Infinity",
    }
