"""What a user sees when pipeline.toml or the command line is wrong, or a step fails.

Every mistake gets exit code 2 and exactly one line on stderr naming the file,
the target and the key, and never a traceback (DESIGN.md, "Bad input"). A
failing step gets exit code 1 and a message naming the target, the command,
the exit code, the tail of its output and the log path; it leaves no manifest.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlbuild.cli import main


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty project directory, also the working directory (as when a user runs mlbuild)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(workdir: Path, toml: str) -> None:
    (workdir / "pipeline.toml").write_text(textwrap.dedent(toml).lstrip())


def mlbuild(capsys: pytest.CaptureFixture[str], *argv: str) -> Result:
    """The CLI entry point in-process; `-f pipeline.toml` unless the command names a file."""
    args = list(argv)
    if "-f" not in args and args and args[0] in ("run", "status", "list", "clean"):
        args[1:1] = ["-f", "pipeline.toml"]
    code = main(args)
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def assert_usage_error(result: Result, *needles: str) -> str:
    """Exit 2, one line on stderr containing every needle, nothing built, no traceback."""
    assert result.code == 2, result
    assert "Traceback" not in result.err + result.out
    lines = result.err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.err}"
    line = lines[0]
    assert line.startswith("mlbuild: error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert "has started" not in result.out
    return line


GOOD = """
    [params]
    epochs = 1

    [targets.prepare]
    cmd = "echo data > {outputs.data}"
    outputs = { data = "build/data.txt" }

    [targets.train]
    cmd = "cat {inputs.data} > {outputs.model}; echo {params.epochs} >> {outputs.model}"
    inputs = { data = "build/data.txt" }
    outputs = { model = "build/model.txt" }
    params = ["epochs"]
"""


# --- pipeline.toml ---------------------------------------------------------------------------


def test_toml_syntax_error_gives_line_and_column(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(
        workdir,
        """
        [params]
        epochs = 1

        [targets.train]
        cmd = "echo hi > {outputs.model}"
        outputs = { model = "model.txt" }
        params = ["epochs"
        """,
    )
    line = assert_usage_error(mlbuild(capsys, "run"), "pipeline.toml", "invalid TOML")
    match = re.search(r"pipeline\.toml:(\d+):(\d+): ", line)
    assert match is not None, line
    assert 7 <= int(match.group(1)) <= 8  # the unclosed array (or the end of the file)
    assert int(match.group(2)) >= 1


def test_toml_syntax_error_missing_equals(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(
        workdir,
        """
        [targets.train]
        cmd "echo hi > {outputs}"
        outputs = ["model.txt"]
        """,
    )
    line = assert_usage_error(mlbuild(capsys, "run"), "invalid TOML")
    assert re.search(r"pipeline\.toml:2:\d+: ", line), line


def test_unknown_top_level_key_suggests_the_right_one(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(
        workdir,
        """
        [target.train]
        cmd = "echo hi > {outputs}"
        outputs = ["model.txt"]
        """,
    )
    assert_usage_error(
        mlbuild(capsys, "run"),
        "pipeline.toml",
        "target",
        "unknown top-level key",
        "did you mean 'targets'?",
    )


def test_unknown_target_key_suggests_the_right_one(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(
        workdir,
        """
        [targets.train]
        cmd = "echo hi > model.txt"
        ouputs = ["model.txt"]
        """,
    )
    assert_usage_error(
        mlbuild(capsys, "run"),
        "pipeline.toml",
        "targets.train.ouputs",
        "unknown key",
        "did you mean 'outputs'?",
    )


def test_target_with_neither_cmd_nor_python(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(
        workdir,
        """
        [targets.train]
        outputs = ["model.txt"]
        """,
    )
    assert_usage_error(mlbuild(capsys, "run"), "pipeline.toml", "targets.train", "cmd", "python")


def test_target_with_both_cmd_and_python(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(
        workdir,
        """
        [targets.train]
        cmd = "echo hi > {outputs}"
        python = "steps.train:train"
        outputs = ["model.txt"]
        """,
    )
    assert_usage_error(mlbuild(capsys, "run"), "pipeline.toml", "targets.train", "cmd", "python")


def test_cycle_is_shown_as_a_path(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(
        workdir,
        """
        [targets.a]
        cmd = "cat {inputs} > {outputs}"
        inputs = ["b.txt"]
        outputs = ["a.txt"]

        [targets.b]
        cmd = "cat {inputs} > {outputs}"
        inputs = ["a.txt"]
        outputs = ["b.txt"]
        """,
    )
    assert_usage_error(mlbuild(capsys, "run"), "pipeline.toml", "cycle", "a -> b -> a")


def test_longer_cycle_follows_the_data(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(
        workdir,
        """
        [targets.a]
        cmd = "cat {inputs} > {outputs}"
        inputs = ["c.txt"]
        outputs = ["a.txt"]

        [targets.b]
        cmd = "cat {inputs} > {outputs}"
        inputs = ["a.txt"]
        outputs = ["b.txt"]

        [targets.c]
        cmd = "cat {inputs} > {outputs}"
        inputs = ["b.txt"]
        outputs = ["c.txt"]
        """,
    )
    assert_usage_error(mlbuild(capsys, "run"), "pipeline.toml", "a -> b -> c -> a")


def test_two_targets_writing_one_path(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(
        workdir,
        """
        [targets.a]
        cmd = "echo a > {outputs}"
        outputs = ["out/x.txt"]

        [targets.b]
        cmd = "echo b > {outputs}"
        outputs = ["out/x.txt"]
        """,
    )
    assert_usage_error(
        mlbuild(capsys, "run"), "pipeline.toml", "targets.b.outputs", "'out/x.txt'", "'a'"
    )


def test_output_inside_another_targets_output_directory(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(
        workdir,
        """
        [targets.a]
        cmd = "mkdir -p {outputs} && echo a > out/a.txt"
        outputs = ["out"]

        [targets.b]
        cmd = "echo b > {outputs}"
        outputs = ["out/sub/b.txt"]
        """,
    )
    assert_usage_error(
        mlbuild(capsys, "run"),
        "pipeline.toml",
        "targets.b.outputs",
        "'out/sub/b.txt'",
        "'out'",
        "'a'",
    )


def test_input_that_does_not_exist_and_no_target_writes(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(
        workdir,
        """
        [targets.train]
        cmd = "cat {inputs.data} > {outputs}"
        inputs = { data = "data/train.csv" }
        outputs = ["model.txt"]
        """,
    )
    assert_usage_error(
        mlbuild(capsys, "run"),
        "pipeline.toml",
        "targets.train.inputs.data",
        "data/train.csv",
        "does not exist",
    )
    assert not (workdir / "model.txt").exists()


def test_unknown_global_param_in_target_params(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(workdir, GOOD.replace('params = ["epochs"]', 'params = ["epoch"]'))
    assert_usage_error(
        mlbuild(capsys, "run"),
        "pipeline.toml",
        "targets.train.params",
        "'epoch'",
        "did you mean 'epochs'?",
    )


def test_unknown_param_in_cmd_placeholder(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(workdir, GOOD.replace("{params.epochs}", "{params.epoch}"))
    assert_usage_error(
        mlbuild(capsys, "run"),
        "pipeline.toml",
        "targets.train.cmd",
        "{params.epoch}",
        "did you mean 'epochs'?",
    )


def test_set_of_unknown_param_suggests_the_right_one(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(workdir, GOOD)
    assert_usage_error(
        mlbuild(capsys, "run", "--set", "epoch=2"),
        "pipeline.toml",
        "--set",
        "epoch",
        "did you mean 'epochs'?",
    )
    assert not (workdir / "build").exists()


def test_malformed_set_without_equals(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(workdir, GOOD)
    assert_usage_error(mlbuild(capsys, "run", "--set", "epochs"), "--set", "epochs", "NAME=VALUE")


@pytest.mark.parametrize("command", ["run", "status", "clean"])
def test_unknown_target_on_the_command_line(
    workdir: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    write(workdir, GOOD)
    assert_usage_error(
        mlbuild(capsys, command, "trian"), "pipeline.toml", "'trian'", "did you mean 'train'?"
    )


def test_unknown_target_after_force(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(workdir, GOOD)
    assert_usage_error(
        mlbuild(capsys, "run", "--force", "trian"), "'trian'", "did you mean 'train'?"
    )


@pytest.mark.parametrize(
    ("port", "path"),
    [("inputs", "../data.csv"), ("inputs", "data/../../data.csv"), ("outputs", "../model.txt")],
)
def test_path_that_leaves_the_project(
    workdir: Path, capsys: pytest.CaptureFixture[str], port: str, path: str
) -> None:
    write(
        workdir,
        f"""
        [targets.train]
        cmd = "echo hi > model.txt"
        {port} = {{ data = "{path}" }}
        """,
    )
    assert_usage_error(
        mlbuild(capsys, "run"),
        "pipeline.toml",
        f"targets.train.{port}.data",
        f"'{path}'",
        "leaves the project",
    )


@pytest.mark.parametrize("port", ["inputs", "outputs"])
def test_absolute_path(workdir: Path, capsys: pytest.CaptureFixture[str], port: str) -> None:
    write(
        workdir,
        f"""
        [targets.train]
        cmd = "echo hi > /tmp/model.txt"
        {port} = {{ data = "/tmp/model.txt" }}
        """,
    )
    assert_usage_error(
        mlbuild(capsys, "run"),
        "pipeline.toml",
        f"targets.train.{port}.data",
        "'/tmp/model.txt'",
        "absolute",
    )


@pytest.mark.parametrize(
    ("placeholder", "hint"),
    [("{inputs.dta}", "did you mean 'data'?"), ("{input.data}", "did you mean 'inputs'?")],
)
def test_unknown_input_placeholder_in_cmd(
    workdir: Path, capsys: pytest.CaptureFixture[str], placeholder: str, hint: str
) -> None:
    write(workdir, GOOD.replace("cat {inputs.data}", f"cat {placeholder}"))
    assert_usage_error(
        mlbuild(capsys, "run"), "pipeline.toml", "targets.train.cmd", placeholder, hint
    )


def test_after_names_an_unknown_target(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(
        workdir,
        GOOD
        + """
    [targets.report]
    cmd = "echo done > {outputs}"
    outputs = ["build/report.txt"]
    after = ["trian"]
    """,
    )
    assert_usage_error(
        mlbuild(capsys, "run"),
        "pipeline.toml",
        "targets.report.after",
        "'trian'",
        "did you mean 'train'?",
    )


def test_missing_pipeline_file(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_usage_error(mlbuild(capsys, "run"), "pipeline.toml", "no such file")


@pytest.mark.parametrize(
    ("argv", "needle", "helps"),
    [
        (("bogus",), "'bogus'", "`mlbuild --help`"),
        (("run", "--bogus"), "--bogus", "`mlbuild run --help`"),
    ],
    ids=["unknown-subcommand", "unknown-option"],
)
def test_command_line_mistake_points_to_the_right_help(
    workdir: Path,
    capsys: pytest.CaptureFixture[str],
    argv: tuple[str, ...],
    needle: str,
    helps: str,
) -> None:
    """An unknown subcommand or option names the help to read, not `mlbuild mlbuild --help`."""
    write(workdir, GOOD)
    line = assert_usage_error(mlbuild(capsys, *argv), needle)
    assert helps in line
    assert "mlbuild mlbuild" not in line


def test_key_with_a_newline_is_still_one_line(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A quoted TOML key may hold any character; the message must still be one line."""
    write(
        workdir,
        """
        [targets.train]
        cmd = "echo hi > {outputs}"
        outputs = ["model.txt"]
        "out\\nputs" = ["x"]
        """,
    )
    assert_usage_error(mlbuild(capsys, "run"), "pipeline.toml", "targets.train.out", "unknown key")


def test_bad_input_through_the_console_entry_point(workdir: Path) -> None:
    """`python -m mlbuild` (what the console script runs): exit 2, one line, no traceback."""
    write(workdir, GOOD.replace("outputs = { data", "ouputs = { data"))
    proc = subprocess.run(
        [sys.executable, "-m", "mlbuild", "run"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        "mlbuild: error: pipeline.toml: targets.prepare.ouputs: unknown key"
        " (did you mean 'outputs'?)"
    ]
    assert proc.stdout == ""


# --- a broken edit after a good build ---------------------------------------------------------

# name -> (the edit of a good pipeline.toml, what the error line must say)
BROKEN_EDITS: dict[str, tuple[Callable[[str], str], tuple[str, ...]]] = {
    "syntax": (
        lambda text: text.replace('params = ["epochs"]', 'params = ["epochs"'),
        ("pipeline.toml:", "invalid TOML"),
    ),
    "unknown key": (
        lambda text: text.replace("inputs = {", "inptus = {"),
        ("targets.train.inptus", "did you mean 'inputs'?"),
    ),
    "cycle": (
        lambda text: text.replace(
            'cmd = "echo data > {outputs.data}"',
            'cmd = "cat {inputs} > {outputs.data}"\ninputs = ["build/model.txt"]',
        ),
        ("cycle", "prepare -> train -> prepare"),
    ),
    "missing input": (
        lambda text: text.replace(
            'cmd = "echo data > {outputs.data}"',
            'cmd = "cat {inputs} > {outputs.data}"\ninputs = ["raw.csv"]',
        ),
        ("targets.prepare.inputs", "'raw.csv'", "does not exist"),
    ),
}


@pytest.mark.parametrize("edit", sorted(BROKEN_EDITS))
def test_broken_edit_leaves_outputs_and_state_intact(
    workdir: Path, capsys: pytest.CaptureFixture[str], edit: str
) -> None:
    write(workdir, GOOD)
    first = mlbuild(capsys, "run")
    assert first.code == 0, first
    assert (workdir / "build/model.txt").read_text() == "data\n1\n"
    good_text = (workdir / "pipeline.toml").read_text()
    outputs = {p: (workdir / p).read_bytes() for p in ("build/data.txt", "build/model.txt")}
    mtimes = {p: (workdir / p).stat().st_mtime_ns for p in outputs}
    state = workdir / ".mlbuild" / "state.db"
    state_bytes = state.read_bytes()

    change, needles = BROKEN_EDITS[edit]
    broken = change(good_text)
    assert broken != good_text
    (workdir / "pipeline.toml").write_text(broken)
    assert_usage_error(mlbuild(capsys, "run"), "pipeline.toml", *needles)

    assert {p: (workdir / p).read_bytes() for p in outputs} == outputs
    assert {p: (workdir / p).stat().st_mtime_ns for p in outputs} == mtimes
    assert state.read_bytes() == state_bytes

    (workdir / "pipeline.toml").write_text(good_text)
    again = mlbuild(capsys, "run")
    assert again.code == 0, again
    assert "has started" not in again.out
    assert "Step `prepare` is up to date (skipped)." in again.out
    assert "Step `train` is up to date (skipped)." in again.out
    assert "2 skipped" in again.out


# --- a failing step ---------------------------------------------------------------------------

FAILING = """
    [targets.prepare]
    cmd = "echo data > {outputs}"
    outputs = ["build/data.txt"]

    [targets.train]
    cmd = "echo partial > {outputs}; echo loading {inputs}; echo 'CUDA out of memory' >&2; exit 3"
    inputs = ["build/data.txt"]
    outputs = ["build/model.txt"]

    [targets.report]
    cmd = "cat {inputs} > {outputs}"
    inputs = ["build/model.txt"]
    outputs = ["build/report.txt"]
"""


def test_failing_step_is_reported_and_not_recorded(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(workdir, FAILING)
    result = mlbuild(capsys, "run")
    assert result.code == 1
    assert "Traceback" not in result.err + result.out
    err = result.err
    assert "Step `train` failed" in err
    assert "exit code 3" in err
    command = (
        "echo partial > build/model.txt; echo loading build/data.txt;"
        " echo 'CUDA out of memory' >&2; exit 3"
    )
    assert f"command: {command}" in err
    assert "CUDA out of memory" in err  # the tail of its output, stderr included
    assert "loading build/data.txt" in err
    log = workdir / ".mlbuild" / "logs" / "train.log"
    assert str(log) in err or ".mlbuild/logs/train.log" in err
    assert "CUDA out of memory" in log.read_text()
    assert "Step `report` was not run: upstream 'train' failed." in result.out
    assert not (workdir / "build/report.txt").exists()

    # No manifest: status says its last run failed, and the next run runs it again.
    status = mlbuild(capsys, "status")
    assert status.code == 1
    assert re.search(r"^stale\s+train: its last run failed$", status.out, re.M), status.out
    assert re.search(r"^fresh\s+prepare$", status.out, re.M), status.out

    again = mlbuild(capsys, "run")
    assert again.code == 1
    assert "Step `prepare` is up to date (skipped)." in again.out
    assert "Step `train` has started: its last run failed." in again.out
    assert "Step `train` failed" in again.err

    # Fixed: it runs, and so does what was waiting on it.
    write(workdir, FAILING.replace("; exit 3", ""))
    fixed = mlbuild(capsys, "run")
    assert fixed.code == 0, fixed
    assert "Step `train` has started" in fixed.out
    assert "Step `report` has started: never built." in fixed.out


def test_step_that_does_not_write_its_output_fails(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(
        workdir,
        """
        [targets.train]
        cmd = "echo trained"
        outputs = ["build/model.txt"]
        """,
    )
    result = mlbuild(capsys, "run")
    assert result.code == 1
    assert "Step `train` failed" in result.err
    assert "build/model.txt" in result.err
    again = mlbuild(capsys, "run")
    assert "Step `train` has started: its last run failed." in again.out
