"""How a step's process is started: the same whether by posix_spawn (mlbuild in the
project's directory) or by Popen (anywhere else): descriptors, signals, session, PATH."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.conftest import Project

# Where mlbuild runs: the project's directory (posix_spawn) or another one (Popen).
WHERE = ["root", "elsewhere"]


def _go(project: Project, where: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if where == "root":
        monkeypatch.chdir(project.root)
    else:
        other = tmp_path.parent / f"{tmp_path.name}-elsewhere"
        other.mkdir(exist_ok=True)
        monkeypatch.chdir(other)


@pytest.mark.parametrize("where", WHERE)
def test_a_step_gets_only_stdin_stdout_and_stderr(
    project: Project, where: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Another descriptor, a pipe's write end above all, would keep a step's output open
    after it ended (the build would wait on it) or let it write where it should not."""
    project.write(
        "fds.py",
        "import os, sys\n"
        "fds = sorted(int(n) for n in os.listdir('/proc/self/fd'))\n"
        "null = os.path.realpath('/proc/self/fd/0')\n"
        "open(sys.argv[1], 'w').write(f'{fds} {null}')\n",
    )
    project.pipeline(
        f'[targets.t]\ncmd = "{sys.executable} fds.py {{outputs.o}}"\noutputs = {{ o = "o.txt" }}\n'
    )
    _go(project, where, monkeypatch, tmp_path)
    assert project.run("run", "-j", "2").code == 0
    # 0-2, and the descriptor listdir opened for /proc/self/fd
    assert project.read("o.txt") == "[0, 1, 2, 3] /dev/null"


@pytest.mark.parametrize("where", WHERE)
def test_a_step_gets_default_sigpipe_and_a_session_of_its_own(
    project: Project, where: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Python ignores SIGPIPE and SIGXFSZ; a step must not: `yes | head` would print
    'Broken pipe'. (Read from /proc: a Python probe would ignore SIGPIPE itself.)"""
    project.write(
        "probe.py",
        "import os, sys\nopen(sys.argv[1], 'w').write(str(os.getsid(0) == os.getpid()))\n",
    )
    project.pipeline(
        f'[targets.t]\ncmd = "{sys.executable} probe.py {{outputs.o}}"\n'
        'outputs = { o = "o.txt" }\n\n'
        "[targets.y]\ncmd = 'yes | head -n 1 > {outputs.o}'\noutputs = { o = \"y.txt\" }\n\n"
        '[targets.ign]\ncmd = "grep SigIgn /proc/self/status > {outputs.o}"\n'
        'outputs = { o = "i.txt" }\n'
    )
    _go(project, where, monkeypatch, tmp_path)
    assert project.run("run").code == 0
    assert project.read("o.txt") == "True"
    assert project.read("y.txt") == "y\n"
    assert not (project.root / ".mlbuild/logs/y.log").exists()  # no "Broken pipe"
    ignored = int(project.read("i.txt").split()[1], 16)
    assert not ignored & (1 << (13 - 1)) and not ignored & (1 << (25 - 1))  # PIPE, XFSZ


@pytest.mark.parametrize("where", WHERE)
def test_the_program_is_the_first_executable_on_the_steps_path(
    project: Project, where: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """As execvp: a directory or a file that is not executable earlier on PATH is passed
    over; a program found nowhere is reported by the shell."""
    first, second, third = (tmp_path.parent / f"{tmp_path.name}-bin{i}" for i in (1, 2, 3))
    for folder in (first, second, third):
        folder.mkdir()
    (first / "mltool").mkdir()  # a directory of that name
    (second / "mltool").write_text("#!/bin/sh\necho not executable\n")
    (third / "mltool").write_text('#!/bin/sh\necho "from third $1" > "$1"\n')
    (third / "mltool").chmod(0o755)
    monkeypatch.setenv(
        "PATH", os.pathsep.join([str(first), str(second), str(third), "/usr/bin", "/bin"])
    )
    project.pipeline(
        '[targets.t]\ncmd = "mltool {outputs.o}"\noutputs = { o = "o.txt" }\n\n'
        '[targets.gone]\ncmd = "mltool-not-anywhere {outputs.o}"\noutputs = { o = "g.txt" }\n'
    )
    _go(project, where, monkeypatch, tmp_path)
    result = project.run("run", "-k")
    assert result.code == 1
    assert project.read("o.txt") == "from third o.txt\n"
    assert "mltool-not-anywhere: not found" in project.read(".mlbuild/logs/gone.log")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="lists /proc/self/fd")
def test_builds_in_one_process_leave_no_descriptor_behind(project: Project) -> None:
    """`watch`, a sweep's points and the tests build again and again in one process: a
    descriptor left by each build (the executor's epoll one was) ran a test session past
    the 1,024 that `select` takes."""
    project.pipeline(
        "".join(
            f"[targets.t{i}]\ncmd = 'echo {i} > {{outputs.o}}'\noutputs = {{ o = 'o{i}.txt' }}\n"
            for i in range(3)
        )
    )
    assert project.run("run", "-j", "2").code == 0  # what a first build opens for good
    before = sorted(os.listdir("/proc/self/fd"))
    for _ in range(3):
        result = project.run("run", "-j", "2", "--force")
        assert result.code == 0, result.err
    assert sorted(os.listdir("/proc/self/fd")) == before
