"""`mlbuild init`: a new project that builds at once, and never a file of the user's replaced."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCAFFOLD = (
    "pipeline.toml",
    "pipeline.schema.json",
    "steps/__init__.py",
    "steps/example.py",
    "data/numbers.txt",
    ".gitignore",
)


def mlbuild(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI in a subprocess, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "mlbuild", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


def test_init_then_run_builds_and_a_second_run_does_nothing(tmp_path: Path) -> None:
    init = mlbuild(tmp_path, "init", "proj")
    assert init.returncode == 0, init.stderr
    assert init.stdout.splitlines() == [
        f"mlbuild init: wrote {', '.join(SCAFFOLD)}",
        "next: cd proj && mlbuild run  (a second `mlbuild run` finds nothing to do)",
    ]
    project = tmp_path / "proj"
    assert files_under(project) == sorted(SCAFFOLD)

    first = mlbuild(project, "run", "-j", "1")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Step `prepare` has started: never built." in first.stdout
    assert "Step `summarize` has started: never built." in first.stdout
    assert first.stdout.splitlines()[-1].startswith("mlbuild: 2 ran in ")
    assert (project / "build/sorted.txt").read_text().split() == ["3", "7", "19", "23", "42", "88"]
    summary = (project / "build/summary.json").read_text()
    assert (
        '"count": 6' in summary and '"largest": [\n    88.0,\n    42.0,\n    23.0\n  ]' in summary
    )

    second = mlbuild(project, "run", "-j", "1")
    assert second.returncode == 0, second.stderr
    assert "has started" not in second.stdout
    assert second.stdout.splitlines()[-1].startswith("mlbuild: 2 skipped in ")
    assert mlbuild(project, "status").returncode == 0  # nothing stale


def test_the_scaffold_reruns_what_an_edit_affects(tmp_path: Path) -> None:
    """What its comments promise: code edits rerun the Python step, params are typed."""
    assert mlbuild(tmp_path, "init").returncode == 0
    assert mlbuild(tmp_path, "run").returncode == 0
    step = tmp_path / "steps/example.py"
    step.write_text(step.read_text().replace('"count"', '"n"'))
    edited = mlbuild(tmp_path, "run", "-j", "1")
    assert edited.returncode == 0, edited.stderr
    assert "Step `prepare` is up to date (skipped)." in edited.stdout
    assert "Step `summarize` has started: code changed: steps/example.py." in edited.stdout
    wrong = mlbuild(tmp_path, "run", "--set", "top=five")
    assert wrong.returncode == 2
    assert "top is an integer" in wrong.stderr
    larger = mlbuild(tmp_path, "run", "--set", "top=5")
    assert larger.returncode == 0
    assert "param top changed 3 -> 5" in larger.stdout


def test_init_here_writes_a_gitignore_that_ignores_what_mlbuild_makes(tmp_path: Path) -> None:
    init = mlbuild(tmp_path, "init")
    assert init.returncode == 0, init.stderr
    assert init.stdout.splitlines()[-1].startswith("next: mlbuild run ")
    assert mlbuild(tmp_path, "run").returncode == 0
    if shutil.which("git") is None:
        pytest.skip("git is not installed: the .gitignore is checked by git itself")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    ignored = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    shown = sorted(line[3:] for line in ignored.splitlines())
    assert shown == sorted(SCAFFOLD)  # build/ and .mlbuild/ are not offered for a commit


def test_the_pipeline_points_editors_at_the_schema_beside_it(tmp_path: Path) -> None:
    assert mlbuild(tmp_path, "init").returncode == 0
    first_line = (tmp_path / "pipeline.toml").read_text().splitlines()[0]
    assert first_line == "#:schema ./pipeline.schema.json"
    assert (tmp_path / "pipeline.schema.json").read_text() == mlbuild(tmp_path, "schema").stdout


@pytest.mark.parametrize("existing", [".gitignore", "steps/example.py", "pipeline.toml"])
def test_init_refuses_to_overwrite_and_writes_nothing(tmp_path: Path, existing: str) -> None:
    mine = tmp_path / existing
    mine.parent.mkdir(parents=True, exist_ok=True)
    mine.write_text("the user's own\n")
    result = mlbuild(tmp_path, "init")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"mlbuild: error: init: {existing} already exists;"
        " nothing written (mlbuild init never overwrites a file)"
    ]
    assert result.stdout == ""
    assert mine.read_text() == "the user's own\n"
    assert files_under(tmp_path) == [existing]


def test_init_names_every_file_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj/pipeline.toml").write_text("")
    os.symlink("nowhere", tmp_path / "proj/.gitignore")  # a dangling link is in the way too
    result = mlbuild(tmp_path, "init", "proj")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "mlbuild: error: init: pipeline.toml, .gitignore already exist in proj;"
        " nothing written (mlbuild init never overwrites a file)"
    ]
    assert sorted(os.listdir(tmp_path / "proj")) == [".gitignore", "pipeline.toml"]


def test_init_into_a_file_or_over_a_file_named_like_a_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine\n")
    into_file = mlbuild(tmp_path, "init", "notes.txt")
    assert into_file.returncode == 2
    assert into_file.stderr.splitlines() == [
        "mlbuild: error: init: notes.txt exists and is not a directory; nothing written"
    ]
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj/steps").write_text("mine\n")
    blocked = mlbuild(tmp_path, "init", "proj")
    assert blocked.returncode == 2
    assert blocked.stderr.splitlines() == [
        "mlbuild: error: init: proj/steps is not a directory; nothing written"
    ]
    assert files_under(tmp_path) == ["notes.txt", "proj/steps"]
