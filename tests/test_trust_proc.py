"""What a step's processes may and may not do: outlive it, outlive mlbuild, break its build.

A step ends when its main process ends; what it left running (a `sleep &`, a
`setsid` child, a daemon) is stopped then, and a hang-up, SIGTERM or Ctrl-C
stops every step and what it started. A long target name, a Python step that
raises KeyboardInterrupt or SystemExit, and a closed stdout are all reported
as what they are, without aborting the build. Real processes and real pipes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import Project
from tests.test_parallel import alive, mlbuild, wait_for

HANG = 60  # seconds a test waits for an mlbuild before calling it hung


def pid_in(project: Project, rel: str) -> int:
    wait_for(lambda: (project.root / rel).exists() and project.read(rel).strip() != "")
    return int(project.read(rel))


def gone(pid: int) -> bool:
    return not alive(pid)


def processes_of(target: str) -> list[int]:
    """Live processes whose environment says mlbuild started them for `target`."""
    found = []
    needle = f"MLBUILD_TARGET={target}\0".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as handle:
                if needle in handle.read() and alive(int(entry.name)):
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


# -- 1. a step ends when its main process ends -------------------------------------------------

LEFTOVERS = """
[targets.background]
cmd = "sleep 600 & echo $! > bg.pid; echo x > {outputs.o}"
outputs = { o = "background.txt" }

[targets.escapes]
cmd = "setsid sleep 600 & echo $! > escaped.pid; echo x > {outputs.o}"
outputs = { o = "escapes.txt" }

[targets.forks]
python = "steps:fork_and_leave"
outputs = { o = "forks.txt" }

[targets.daemon]
python = "steps:start_daemon"
outputs = { o = "daemon.txt" }
"""

STEPS = '''
import os
import time


def fork_and_leave(o):
    if os.fork() == 0:  # a child in a session of its own, holding the output pipe
        os.setsid()
        with open("forked.pid", "w") as handle:
            handle.write(str(os.getpid()))
        time.sleep(600)
        os._exit(0)
    o.write_text("x")


def start_daemon(o):
    """The classic double fork: a daemon in its own session, stdio closed."""
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            with open("daemon.pid", "w") as handle:
                handle.write(str(os.getpid()))
            time.sleep(600)
        os._exit(0)
    while not os.path.exists("daemon.pid"):
        time.sleep(0.01)
    o.write_text("x")
'''


def test_a_step_ends_with_its_main_process_and_what_it_left_is_stopped(project: Project) -> None:
    project.pipeline(LEFTOVERS)
    project.write("steps.py", STEPS)
    proc = mlbuild(project.root, "run", "-j", "4")
    out, err = proc.communicate(timeout=HANG)  # before: waited for the 600 s sleeps
    assert proc.returncode == 0, err
    for name in ("background", "escapes", "forks", "daemon"):
        assert f"Step `{name}` has finished" in out
        assert project.read(f"{name}.txt") == "x" + (
            "\n" if name in ("background", "escapes") else ""
        )
    for pidfile in ("bg.pid", "escaped.pid", "forked.pid", "daemon.pid"):
        pid = int(project.read(pidfile))
        wait_for(lambda pid=pid: gone(pid), timeout=5)  # type: ignore[misc]
    again = project.run()
    assert again.code == 0
    assert again.out.count("is up to date (skipped)") == 4


def test_output_written_just_before_the_main_process_exits_is_kept(project: Project) -> None:
    project.pipeline(
        """
        [targets.t]
        cmd = "sleep 600 & for i in 1 2 3; do echo line $i; done; touch {outputs.o}"
        outputs = { o = "t.txt" }
        """
    )
    proc = mlbuild(project.root, "run", "-j", "1")
    out, err = proc.communicate(timeout=HANG)
    assert proc.returncode == 0, err
    assert "line 1\nline 2\nline 3\n" in out
    assert project.read(".mlbuild/logs/t.log") == "line 1\nline 2\nline 3\n"


# -- 2. hang-up, SIGTERM and Ctrl-C stop steps the same way ---------------------------------

HUNG_UP = """
[targets.hup_step]
cmd = '''echo $$ > step.pid; setsid sleep 600 & echo $! > escaped.pid
sleep 1.5; echo late > {outputs.o}'''
outputs = { o = "late.txt" }
"""


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM, signal.SIGINT])
def test_hangup_terminate_and_interrupt_stop_the_step_and_what_escaped_it(
    project: Project, sig: int
) -> None:
    project.pipeline(HUNG_UP)
    proc = mlbuild(project.root, "run")
    step = pid_in(project, "step.pid")
    escaped = pid_in(project, "escaped.pid")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=HANG)
    assert proc.returncode == 130  # before, SIGHUP killed mlbuild and left the step running
    assert "interrupted" in err
    wait_for(lambda: gone(step) and gone(escaped), timeout=5)
    wait_for(lambda: not processes_of("hup_step"), timeout=5)
    time.sleep(2.0)  # past the moment the step would have written its output
    assert not (project.root / "late.txt").exists()
    assert "stale  hup_step: its last run was interrupted" in project.run("status").out


def test_an_interrupt_while_a_step_is_being_started_stops_it(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C landing after the fork, before mlbuild tracks the step (a loaded machine)."""
    import mlbuild.exec.local

    project.pipeline(HUNG_UP)
    real = mlbuild.exec.local._pidfd

    def interrupted(pid: int) -> int | None:
        pid_in(project, "escaped.pid")  # written, not only created: the race is mlbuild's
        fd = real(pid)
        if fd is not None:
            os.close(fd)
        raise KeyboardInterrupt

    monkeypatch.setattr(mlbuild.exec.local, "_pidfd", interrupted)
    assert project.run().code == 130
    step = pid_in(project, "step.pid")
    escaped = pid_in(project, "escaped.pid")
    wait_for(lambda: gone(step) and gone(escaped), timeout=5)
    assert not list((project.root / ".mlbuild" / "running").iterdir())


def test_closing_the_terminal_stops_the_step(project: Project) -> None:
    """A real terminal that goes away: the live view's last redraw fails, steps still stop."""
    import pty

    project.pipeline(HUNG_UP)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["TERM"] = "xterm"
    pid, terminal = pty.fork()
    if pid == 0:  # pragma: no cover - the child becomes mlbuild at once
        os.chdir(project.root)
        os.execve(sys.executable, [sys.executable, "-m", "mlbuild", "run"], env)
    try:
        step = pid_in(project, "step.pid")
        escaped = pid_in(project, "escaped.pid")
        os.read(terminal, 65536)
    finally:
        os.close(terminal)  # the terminal goes: mlbuild, its session leader, gets SIGHUP
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 130  # before: killed by SIGHUP (-1)
    wait_for(lambda: gone(step) and gone(escaped), timeout=5)
    time.sleep(2.0)  # past the moment the step would have written its output
    assert not (project.root / "late.txt").exists()


# -- 4. long target names --------------------------------------------------------------------

LONG = "t" * 252
LONGER = "u" * 300


def test_long_target_names_run_log_and_show(project: Project) -> None:
    project.pipeline(
        f"""
        [targets.{LONG}]
        cmd = "echo hello; echo x > {{outputs.o}}"
        outputs = {{ o = "long.txt" }}

        [targets.{LONGER}]
        cmd = "echo failing; exit 3"
        outputs = {{ o = "longer.txt" }}

        [targets.plain]
        cmd = "echo x > {{outputs.o}}"
        outputs = {{ o = "plain.txt" }}
        """
    )
    result = project.run("run", "-k", "-j", "1")
    assert result.code == 1  # only the failing one: before, the first log aborted the build
    assert f"Step `{LONG}` has finished" in result.out
    assert "Step `plain` has finished" in result.out
    assert f"Step `{LONGER}` failed" in result.err and "exit code 3" in result.err
    assert "    failing" in result.err  # its log was written and read back
    assert project.read("long.txt") == "x\n"
    logs = list((project.root / ".mlbuild" / "logs").iterdir())
    assert all(len(p.name) < 100 for p in logs)
    log = project.run("log", LONG)
    assert log.code == 0
    assert log.out.startswith(f"{LONG}: the last 1 run")
    assert ".mlbuild/logs/" in log.out
    show = project.run("show", LONG)
    assert show.code == 0, show.err
    shown_log = next(line for line in show.out.splitlines() if ".mlbuild/logs/" in line)
    assert "hello" in (project.root / shown_log.split()[-1]).read_text()


def test_a_long_named_step_left_by_a_killed_mlbuild_is_stopped_next_run(
    project: Project,
) -> None:
    text = f"""
        [targets.{LONGER}]
        cmd = '''echo $$ > step.pid; setsid sleep 600 & echo $! > escaped.pid; sleep 600
        touch {{outputs.o}}'''
        outputs = {{ o = "o.txt" }}
        """
    project.pipeline(text)
    proc = mlbuild(project.root, "run")
    step = pid_in(project, "step.pid")
    escaped = pid_in(project, "escaped.pid")
    proc.kill()
    proc.communicate()
    assert alive(step) and alive(escaped)  # they outlived mlbuild...
    markers = list((project.root / ".mlbuild" / "running").iterdir())
    assert len(markers) == 1 and len(markers[0].name) < 100
    project.pipeline(text.replace("sleep 600\n", "true\n"))
    result = project.run("run", "--no-wait")
    assert result.code == 0, result.err
    assert f"stopped step `{LONGER}` left running by an mlbuild that was killed" in result.err
    wait_for(lambda: gone(step) and gone(escaped), timeout=5)  # ...until the next run


# -- 5. what a Python step raised ------------------------------------------------------------

RAISING = """
import sys


def interrupted(o):
    raise KeyboardInterrupt


def exits(o):
    sys.exit(3)


def exits_cleanly(o):
    o.write_text("x")
    sys.exit(0)


def fails(o):
    raise ValueError("the data is bad")
"""


@pytest.mark.parametrize(
    ("function", "message", "last_line"),
    [
        ("interrupted", "raised KeyboardInterrupt", "KeyboardInterrupt"),
        ("exits", "raised SystemExit: 3", "SystemExit: 3"),
        ("fails", "raised ValueError: the data is bad", "ValueError: the data is bad"),
    ],
)
def test_a_python_step_that_raises_is_reported_with_the_users_traceback(
    project: Project, function: str, message: str, last_line: str
) -> None:
    project.pipeline(
        f"""
        [targets.step]
        python = "steps:{function}"
        outputs = {{ o = "o.txt" }}
        """
    )
    project.write("steps.py", RAISING)
    result = project.run()
    assert result.code == 1
    assert "Step `step` failed after " in result.err
    assert f": {message}." in result.err
    assert "killed by signal" not in result.err
    assert "Traceback (most recent call last):" in result.err
    assert 'steps.py", line' in result.err  # the user's frame...
    assert "mlbuild/exec/worker.py" not in result.err  # ...and none of the worker's
    assert result.err.count(f"    {last_line}\n") == 1
    assert "stale  step: its last run failed" in project.run("status").out


def test_a_python_step_that_exits_with_zero_succeeds(project: Project) -> None:
    project.pipeline(
        """
        [targets.step]
        python = "steps:exits_cleanly"
        outputs = { o = "o.txt" }
        """
    )
    project.write("steps.py", RAISING)
    result = project.run()
    assert result.code == 0, result.err
    assert project.read("o.txt") == "x"


# -- 6. a closed stdout ----------------------------------------------------------------------

CHATTY = "\n".join(
    f"""
[targets.t{i}]
cmd = "echo step {i} says hello; sleep 0.3; echo {i} > {{outputs.o}}"
outputs = {{ o = "out/t{i}.txt" }}
"""
    for i in range(4)
)


def test_run_into_head_finishes_the_build_and_records_it(project: Project) -> None:
    project.pipeline(CHATTY)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    run = subprocess.Popen(
        [sys.executable, "-m", "mlbuild", "run", "-j", "1"],
        cwd=project.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert run.stdout is not None
    head = subprocess.Popen(["head", "-1"], stdin=run.stdout, stdout=subprocess.PIPE)
    run.stdout.close()  # head holds the only reading end
    first, _ = head.communicate(timeout=HANG)
    _, err = run.communicate(timeout=HANG)
    assert first.decode().startswith("Step `t0` has started")
    assert run.returncode == 0, err.decode()
    text = err.decode()
    assert "Traceback" not in text
    assert text.count("cannot write to stdout") == 1
    for i in range(4):
        assert project.read(f"out/t{i}.txt") == f"{i}\n"
    again = project.run()
    assert again.out.count("is up to date (skipped)") == 4


def test_list_into_head_exits_quietly(project: Project) -> None:
    # More than a pipe holds (64 KiB), so mlbuild is still writing when head leaves.
    words = " ".join(["word"] * 2000)
    project.pipeline(
        "\n".join(f'[targets.t{i}]\ncmd = "true"\ndescription = "{words}"\n' for i in range(100))
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    lister = subprocess.Popen(
        [sys.executable, "-m", "mlbuild", "list"],
        cwd=project.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert lister.stdout is not None
    head = subprocess.Popen(["head", "-1"], stdin=lister.stdout, stdout=subprocess.PIPE)
    lister.stdout.close()
    first, _ = head.communicate(timeout=HANG)
    _, err = lister.communicate(timeout=HANG)
    assert first == f"t0: {words}\n".encode()
    assert err == b""  # before: a BrokenPipeError traceback
    assert lister.returncode == 0


def test_stdout_closed_from_the_start_loses_nothing(project: Project) -> None:
    project.pipeline(CHATTY)
    read, write = os.pipe()
    os.close(read)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    run = subprocess.Popen(
        [sys.executable, "-m", "mlbuild", "run", "-j", "2"],
        cwd=project.root,
        stdout=write,
        stderr=subprocess.PIPE,
        env=env,
    )
    os.close(write)
    _, err = run.communicate(timeout=HANG)
    assert run.returncode == 0, err.decode()
    assert "Traceback" not in err.decode()
    assert "step 2 says hello" in project.read(".mlbuild/logs/t2.log")
    assert project.run().out.count("is up to date (skipped)") == 4
