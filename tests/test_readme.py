"""The README, checked: its commands work when pasted, and its output examples are real.

Every command in a `sh` block, and every inline `.venv/bin/...` command, is
either run here (as pasted, in a scratch copy of the repository's demo, from a
shell whose PATH has no venv on it, `.venv/bin/` standing for this
interpreter) or listed in NOT_RUN with the reason. A command added to the
README without either fails `test_every_readme_command_is_run_or_excused`.

The transcripts of "Seeing the pipeline" come from `examples/quick/`; they
are produced again by the same runs and compared line by line, times, dates
and durations aside.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()

# Commands the README gives that this test does not run, and why.
NOT_RUN = {
    "python3 -m venv .venv && .venv/bin/pip install -q -e '.[examples]' && .venv/bin/mlbuild run": (
        "the first quickstart command: installs TensorFlow, then trains the demo"
        " (tests/test_mnist_example.py builds the same pipeline)"
    ),
    "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]'"
    " && .venv/bin/python -m pytest -q": (
        "the second quickstart command: installs, then runs this whole suite"
    ),
    ".venv/bin/mlbuild run --set epochs=2": (
        "trains the demo's model; tests/test_mnist_example.py runs exactly this after a first"
        " `run` and checks that the importer and normalizer are skipped"
    ),
    ".venv/bin/python examples/mnist/demo.py": "trains the demo three times (about a minute)",
    ".venv/bin/pip install -q -e '.[s3]'    # s3:// remotes (s3fs); '.[gcs]' for gs:// (gcsfs)": (
        "installs from the network"
    ),
    ".venv/bin/pip install -q -e '.[ray]'   # --executor ray": "installs from the network",
    ".venv/bin/pip install -q -e '.[plots]'": "installs (the `examples` extra already has it)",
}


def code_blocks(text: str) -> list[tuple[str, list[str]]]:
    """Each fenced block of the Markdown: its info string (`sh`, or "") and its lines."""
    blocks: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current = []
                blocks.append((line[3:].strip(), current))
            else:
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def readme_commands(text: str) -> list[str]:
    """The lines of `sh` blocks and the inline `.venv/bin/...` commands, in order."""
    commands: list[str] = []
    for info, lines in code_blocks(text):
        if info == "sh":
            commands += [line.strip() for line in lines if line.strip()]
    commands += re.findall(r"(?<!`)`(\.venv/bin/[^`]+)`", text)
    return list(dict.fromkeys(commands))


def test_every_readme_command_is_run_or_excused(tmp_path: Path) -> None:
    commands = readme_commands(README)
    assert ".venv/bin/mlbuild run --set epochs=2" in commands  # the extraction works
    stale = set(NOT_RUN) - set(commands)
    assert not stale, f"NOT_RUN lists commands the README no longer has: {stale}"
    to_run = [c for c in commands if c not in NOT_RUN]
    assert to_run, "nothing left to run: the README's commands are all excused"
    scratch, env = _pasted_after_quickstart(tmp_path)
    for command in to_run:
        done = subprocess.run(
            ["/bin/sh", "-c", command], cwd=scratch, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, f"{command}\n{done.stdout}{done.stderr}"
    # The completion scripts landed where each shell looks, and name the demo's targets' command.
    home = Path(env["HOME"])
    for written in (
        ".local/share/bash-completion/completions/mlbuild",
        ".zfunc/_mlbuild",
        ".config/fish/completions/mlbuild.fish",
    ):
        assert "mlbuild" in (home / written).read_text(), written


def _pasted_after_quickstart(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the repository's demo with `.venv/bin/{mlbuild,python}`, and the environment
    of a shell that never activated the venv (and whose HOME is scratch too)."""
    scratch = tmp_path / "clone"
    scratch.mkdir()
    shutil.copy(REPO / "pipeline.toml", scratch / "pipeline.toml")
    shutil.copytree(
        REPO / "examples",
        scratch / "examples",
        ignore=shutil.ignore_patterns("__pycache__", ".mlbuild", "build"),
    )
    bin_dir = scratch / ".venv/bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(sys.executable)
    entry = bin_dir / "mlbuild"
    entry.write_text(f'#!/bin/sh\nexec {sys.executable} -m mlbuild "$@"\n')
    entry.chmod(0o755)
    home = tmp_path / "home"
    for directory in (
        ".local/share/bash-completion/completions",  # "make the directory if it is missing"
        ".zfunc",
        ".config/fish/completions",
    ):
        (home / directory).mkdir(parents=True)
    env = {
        **os.environ,
        "HOME": str(home),
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO),  # this checkout's mlbuild, as the editable install gives
    }
    return scratch, env


# -- the transcripts of "Seeing the pipeline", from examples/quick ---------------------------

QUICK_RUNS = (("run",), ("run", "--set", "epochs=2"), ("run", "--set", "epochs=1"))
QUICK_TRANSCRIPTS = (
    "mlbuild log -n 2",
    "mlbuild log trainer -n 3",
    "mlbuild show trainer",
    "mlbuild dag --status --set epochs=3",
    "mlbuild dag --mermaid",
)


def transcripts(text: str) -> dict[str, list[str]]:
    """`$ COMMAND` lines of the untagged code blocks, each with the output lines under it."""
    found: dict[str, list[str]] = {}
    for info, lines in code_blocks(text):
        if info:
            continue
        command: str | None = None
        for line in lines:
            if line.startswith("$ "):
                command = line[2:]
                found[command] = []
            elif command is not None:
                found[command].append(line)
    return found


def normalized(lines: list[str]) -> list[str]:
    """Lines with what differs from run to run replaced: dates, times, durations."""
    out = []
    for line in lines:
        line = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d(:\d\d)?", "DATE", line)
        line = re.sub(r"\d+\.\d+s\b", "Ns", line)
        line = re.sub(r" \(saved Ns by [a-z ]+\)", "", line)  # said only above 10 ms
        out.append(line.rstrip())
    while out and not out[-1]:
        out.pop()
    return out


def mlbuild(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "mlbuild", *args], cwd=cwd, capture_output=True, text=True
    )
    assert done.returncode in (0, 1), done.stderr  # 1: `status`-like answers with stale targets
    return done.stdout


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """examples/quick built as the README says; the plain output of `run --set epochs=2`."""
    root = tmp_path_factory.mktemp("quick")
    shutil.copy(REPO / "examples/quick/pipeline.toml", root / "pipeline.toml")
    outputs = [mlbuild(root, *args) for args in QUICK_RUNS]
    return root, outputs[1].splitlines()


@pytest.mark.parametrize("command", QUICK_TRANSCRIPTS)
def test_readme_transcript_is_what_the_command_prints(
    quick: tuple[Path, list[str]], command: str
) -> None:
    root, _ = quick
    shown = transcripts(README)
    assert command in shown, f"the README has no `$ {command}` transcript"
    real = mlbuild(root, *command.split()[1:]).splitlines()
    assert normalized(shown[command]) == normalized(real)


def test_readme_progress_example_is_what_the_run_printed(quick: tuple[Path, list[str]]) -> None:
    """`--set epochs=2` prints two epochs; the lines that stay are the run's, in its order."""
    _, run2 = quick
    live = transcripts(README)["mlbuild run --set epochs=2"]
    epochs = [line for line in run2 if line.startswith("epoch ")]
    assert epochs == ["epoch 1", "epoch 2"]
    shown_epochs = [line for line in live if line.startswith("epoch ")]
    assert shown_epochs == epochs[: len(shown_epochs)]  # a frame while the trainer runs
    assert any("param epochs changed 1 -> 2" in line for line in live)
    assert any(" 2/5 targets " in line for line in live)
    done = re.search(r"and once it is done:\n\n```\n(.*?)```", README, re.S)
    assert done is not None
    # The live view keeps the steps' output, the finished lines and the summary.
    kept = [line for line in run2 if "has started" not in line and "up to date" not in line]
    assert normalized(done.group(1).splitlines()) == normalized(kept)


def test_the_quick_example_builds_the_five_targets_the_readme_shows(
    quick: tuple[Path, list[str]],
) -> None:
    root, _ = quick
    names = mlbuild(root, "list", "--names").split()
    assert names == ["importer", "normalizer", "trainer", "evaluator", "report"]
