"""Shell commands without shell syntax run as their words, without /bin/sh (exec/local.py)."""

from __future__ import annotations

import sys

from tests.conftest import Project


def test_a_plain_command_is_the_step_process_itself(project: Project) -> None:
    project.write(
        "probe.py",
        "import os, sys\n"
        "open(sys.argv[1], 'w').write(f'{os.getpid() == os.getsid(0)} {os.getppid()}')\n",
    )
    project.pipeline(
        f"""
        [targets.plain]
        cmd = "{sys.executable} probe.py {{outputs}}"
        outputs = ["plain.txt"]

        [targets.shell]
        cmd = "{sys.executable} probe.py {{outputs}} && true"
        outputs = ["shell.txt"]
        """
    )
    result = project.run()
    assert result.code == 0, result.out + result.err
    leader, _ = project.read("plain.txt").split()
    assert leader == "True"  # no /bin/sh in between: the command leads the step's session
    leader, _ = project.read("shell.txt").split()
    assert leader == "False"  # `&&` needs the shell, whose child the command is


def test_a_command_that_is_not_found_fails_as_the_shell_says(project: Project) -> None:
    project.pipeline(
        """
        [targets.missing]
        cmd = "no-such-command-mlbuild-test {outputs}"
        outputs = ["out.txt"]
        """
    )
    result = project.run()
    assert result.code == 1
    assert "exit code 127" in result.out + result.err
    assert "no-such-command-mlbuild-test: not found" in project.read(".mlbuild/logs/missing.log")


def test_a_plain_command_gets_its_exit_code_and_arguments(project: Project) -> None:
    project.write("fail.py", "import sys\nprint(sys.argv[1:])\nsys.exit(3)\n")
    project.pipeline(
        f"""
        [targets.fails]
        cmd = "{sys.executable} fail.py  a   b {{outputs}}"
        outputs = ["out.txt"]
        """
    )
    result = project.run()
    assert result.code == 1
    assert "exit code 3" in result.out + result.err
    assert "['a', 'b', 'out.txt']" in project.read(".mlbuild/logs/fails.log")
