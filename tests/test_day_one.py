"""Issue 17, the first hour: the environment steps get, true reasons, honest history and reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
