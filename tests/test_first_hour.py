"""What a new user trips on in the first hour (issue 17): each test is what they read."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Project

SIMPLE = """
[params]
epochs = 1

[targets.a]
cmd = "echo {params.epochs} > {outputs}"
outputs = ["a.txt"]
params = ["epochs"]
"""


def mlbuild(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mlbuild", *args], cwd=cwd, capture_output=True, text=True
    )


def test_version_is_printed(tmp_path: Path) -> None:
    result = mlbuild(tmp_path, "--version")
    assert result.returncode == 0
    # The package's own version, the one the installed distribution says (pyproject.toml).
    from importlib.metadata import version

    assert result.stdout == f"mlbuild {version('mlbuild')}\n"


def test_cache_help_names_its_subcommand_not_an_internal_field(tmp_path: Path) -> None:
    result = mlbuild(tmp_path, "cache", "--help")
    assert result.returncode == 0
    assert "cache_command" not in result.stdout
    assert "COMMAND" in result.stdout


def test_set_is_refused_where_it_does_nothing(project: Project) -> None:
    project.pipeline(SIMPLE)
    for command in ("list", "log", "gc", "clean", "show"):
        words = [command, "--set", "epochs=2"] + (["a"] if command == "show" else [])
        result = project.run(*words)
        assert result.code == 2, (command, result.err)
        assert result.err.count("\n") == 1 and "--set" in result.err
    assert not (project.root / "a.txt").exists()


def test_set_before_the_subcommand_still_works_for_run(tmp_path: Path) -> None:
    (tmp_path / "pipeline.toml").write_text(SIMPLE)
    result = mlbuild(tmp_path, "--set", "epochs=3", "run")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "a.txt").read_text() == "3\n"
    refused = mlbuild(tmp_path, "--set", "epochs=3", "list")
    assert refused.returncode == 2
    assert refused.stderr == (
        "mlbuild: error: --set has no effect on `mlbuild list`"
        " (it applies to run, watch, status, dag, push, pull)\n"
    )


def test_watch_accepts_plain(tmp_path: Path) -> None:
    """`--plain` is taken (here watch goes on to find no pipeline), not refused as unknown."""
    assert "--plain" in mlbuild(tmp_path, "watch", "--help").stdout
    result = mlbuild(tmp_path, "watch", "--plain")
    assert result.returncode == 2
    assert result.stderr.startswith("mlbuild: error: no pipeline.toml in ")


def test_kill_int_stops_watch_started_in_the_background_of_a_script(tmp_path: Path) -> None:
    """A shell starts a script's background jobs with SIGINT ignored; mlbuild still stops."""
    (tmp_path / "pipeline.toml").write_text(SIMPLE)

    def ignore_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlbuild", "watch"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=ignore_sigint,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "a.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "a.txt").exists()
        time.sleep(0.3)  # past the first build, into waiting for changes
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=20)
        assert proc.stdout is not None
        seen = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert code == 0  # watch ends on a stop signal as on Ctrl-C: "stopped.", exit 0
    assert "stopped." in seen


TWO = """
[targets.good]
cmd = "echo good > {outputs}"
outputs = ["build/good.txt"]

[targets.other]
cmd = "echo other > {outputs}"
outputs = ["build/other.txt"]
"""


def test_outputs_of_a_removed_target_can_be_cleaned(project: Project) -> None:
    project.pipeline(TWO)
    assert project.run("run").code == 0
    project.pipeline(TWO.split("[targets.other]")[0].replace("good", "kept"))
    project.run("run")
    cleaned = project.run("clean", "kept")
    assert cleaned.code == 0, cleaned.err
    assert (project.root / "build/good.txt").exists()  # not named: kept
    everything = project.run("clean")
    assert everything.code == 0
    assert "no longer in" in everything.out and "good, other" in everything.out
    assert (project.root / "build/other.txt").exists()

    (project.root / "build/other.txt").write_text("edited by hand\n")
    removed = project.run("clean", "good", "other")
    assert removed.code == 0, removed.err
    assert "removed build/good.txt" in removed.out
    assert not (project.root / "build/good.txt").exists()
    assert "moved build/other.txt to .mlbuild/trash/" in removed.out  # an edit is never lost
    trashed = list((project.root / ".mlbuild/trash").rglob("other.txt"))
    assert [p.read_text() for p in trashed] == ["edited by hand\n"]
    assert "no longer in" not in project.run("clean").out
    unknown = project.run("clean", "nothere")
    assert unknown.code == 2 and "unknown target 'nothere'" in unknown.err


def test_a_directory_remote_does_not_ask_for_the_s3_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlbuild.remote import RemoteError, open_fs

    monkeypatch.setitem(sys.modules, "fsspec", None)  # as if it were not installed
    with pytest.raises(RemoteError) as caught:
        open_fs("/srv/cache", {})
    assert "mlbuild[s3]" not in str(caught.value)
    with pytest.raises(RemoteError, match=r"mlbuild\[s3\]"):
        open_fs("s3://bucket/cache", {})


def test_fsspec_is_a_dependency_of_the_base_install() -> None:
    from importlib.metadata import requires

    base = [r for r in requires("mlbuild") or [] if "extra ==" not in r]
    assert any(r.startswith("fsspec") for r in base)


def test_set_of_the_wrong_type_is_one_line_and_builds_nothing(project: Project) -> None:
    project.pipeline(SIMPLE)
    result = project.run("run", "--set", "epochs=two")
    assert result.code == 2
    assert result.err == (
        "mlbuild: error: --set epochs=two: epochs is an integer (1) and this is a string;"
        " to change its type on purpose, write --set epochs:=VALUE\n"
    )
    assert not (project.root / "a.txt").exists()
    assert project.run("run", "--set", "epochs:=two").code == 0
    assert project.read("a.txt") == "two\n"


def test_pull_restores_from_the_local_cache_without_a_remote(project: Project) -> None:
    project.pipeline(SIMPLE)
    assert project.run("run").code == 0
    assert project.run("clean").code == 0
    pulled = project.run("pull")
    assert pulled.code == 0, pulled.err
    assert "restored from cache" in pulled.out
    assert project.read("a.txt") == "1\n"
