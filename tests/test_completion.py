"""`mlbuild completion bash|zsh|fish`: scripts a shell accepts, completing target names too.

The bash script is driven as bash does it (COMP_WORDS, COMP_CWORD, then the
completion function), with an `mlbuild` on PATH that runs this checkout; fish
is asked with `complete -C`; zsh is typed at in a pseudo-terminal (zpty), as its
completion runs only inside its line editor.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

PIPELINE = """
[targets.prepare]
cmd = "echo data > {outputs}"
outputs = ["build/data.txt"]

[targets.train]
cmd = "cat {inputs} > {outputs}"
inputs = ["build/data.txt"]
outputs = ["build/model.txt"]

[targets.report]
cmd = "cat {inputs} > {outputs}"
inputs = ["build/model.txt"]
outputs = ["build/report.txt"]
"""


def mlbuild(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mlbuild", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )


@pytest.fixture
def shell_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose PATH has an `mlbuild` running this checkout with this Python."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    launcher = bin_dir / "mlbuild"
    launcher.write_text(f'#!/bin/sh\nexec {sys.executable} -m mlbuild "$@"\n')
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A project with targets prepare -> train -> report."""
    root = tmp_path / "project"
    root.mkdir()
    (root / "pipeline.toml").write_text(PIPELINE)
    return root


def script(shell: str, tmp_path: Path) -> Path:
    result = mlbuild(tmp_path, "completion", shell)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    path = tmp_path / f"mlbuild.{shell}"
    path.write_text(result.stdout)
    return path


def syntax_check(shell: str) -> list[str]:
    return {"bash": ["bash", "-n"], "zsh": ["zsh", "-n"], "fish": ["fish", "--no-execute"]}[shell]


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_each_script_is_valid_for_its_shell(tmp_path: Path, shell: str) -> None:
    path = script(shell, tmp_path)
    text = path.read_text()
    assert "mlbuild list --names" in text  # target names are asked for, not baked in
    for command in ("init", "schema", "completion", "run", "status"):
        assert command in text
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed here: the script's syntax is not checked")
    check = subprocess.run(
        [*syntax_check(shell), str(path)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stderr


def bash_complete(script_path: Path, cwd: Path, env: dict[str, str], *words: str) -> list[str]:
    """What bash offers for the last of `words` (COMPREPLY), the completion function called."""
    quoted = " ".join(f"'{w}'" for w in words)
    program = (
        f"source '{script_path}'\n"
        f"COMP_WORDS=({quoted})\n"
        f"COMP_CWORD={len(words) - 1}\n"
        f'COMP_LINE="${{COMP_WORDS[*]}}"\n'
        "COMP_POINT=${#COMP_LINE}\n"
        "_shtab_mlbuild\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    result = subprocess.run(
        ["bash", "-c", program], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return [line for line in result.stdout.splitlines() if line]


def test_bash_completes_target_names(
    tmp_path: Path, workdir: Path, shell_env: dict[str, str]
) -> None:
    path = script("bash", tmp_path)
    assert bash_complete(path, workdir, shell_env, "mlbuild", "run", "") == [
        "prepare",
        "train",
        "report",
    ]
    assert bash_complete(path, workdir, shell_env, "mlbuild", "run", "tr") == ["train"]
    assert bash_complete(path, workdir, shell_env, "mlbuild", "run", "prepare", "r") == ["report"]
    assert bash_complete(path, workdir, shell_env, "mlbuild", "run", "--force", "p") == ["prepare"]
    assert bash_complete(path, workdir, shell_env, "mlbuild", "show", "re") == ["report"]
    assert bash_complete(path, workdir, shell_env, "mlbuild", "clean", "t") == ["train"]
    # and from a subdirectory: the nearest pipeline.toml upward, as mlbuild itself finds it
    (workdir / "src").mkdir()
    assert bash_complete(path, workdir / "src", shell_env, "mlbuild", "status", "pr") == ["prepare"]


def test_bash_completes_commands_and_their_choices(
    tmp_path: Path, workdir: Path, shell_env: dict[str, str]
) -> None:
    path = script("bash", tmp_path)
    assert bash_complete(path, workdir, shell_env, "mlbuild", "sch") == ["schema"]
    assert bash_complete(path, workdir, shell_env, "mlbuild", "completion", "") == [
        "bash",
        "zsh",
        "fish",
    ]
    assert "--dry-run" in bash_complete(path, workdir, shell_env, "mlbuild", "run", "--d")


def test_bash_offers_nothing_and_says_nothing_outside_a_project(
    tmp_path: Path, shell_env: dict[str, str]
) -> None:
    path = script("bash", tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert bash_complete(path, empty, shell_env, "mlbuild", "run", "") == []


def test_fish_completes_target_names(
    tmp_path: Path, workdir: Path, shell_env: dict[str, str]
) -> None:
    if shutil.which("fish") is None:
        pytest.skip("fish is not installed here")
    path = script("fish", tmp_path)
    result = subprocess.run(
        ["fish", "-c", f"source '{path}'; complete -C 'mlbuild run tr'"],
        cwd=workdir,
        env=shell_env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == ["train"]


# zsh completes only inside its line editor: a pseudo-terminal (zpty) runs an interactive zsh
# with the script on $fpath, types the words and TAB, and compadd writes what it was offered.
ZSH_DRIVER = r"""
zmodload zsh/zpty
zpty z zsh -f -i
zpty -w z "PS1=''"
zpty -w z "fpath=($1 \$fpath); autoload -Uz compinit; compinit -u -D"
zpty -w z 'compadd () {'
zpty -w z '  builtin compadd -O m "$@"; print -r -- "${(j: :)m}" >> '$2
zpty -w z '  builtin compadd "$@"; }'
zpty -w z "cd $3"
zpty -wn z "$4"$'\t'
for i in {1..600}; do [[ -s $2 ]] && break; sleep 0.1; done
zpty -d z
"""


def test_zsh_completes_target_names(
    tmp_path: Path, workdir: Path, shell_env: dict[str, str]
) -> None:
    if shutil.which("zsh") is None:
        pytest.skip("zsh is not installed here")
    fpath = tmp_path / "zfunc"
    fpath.mkdir()
    script("zsh", tmp_path).rename(fpath / "_mlbuild")  # installed as the README says
    driver = tmp_path / "drive.zsh"
    driver.write_text(ZSH_DRIVER)
    offered = tmp_path / "offered.txt"
    subprocess.run(
        ["zsh", "-f", str(driver), str(fpath), str(offered), str(workdir), "mlbuild show r"],
        env=shell_env,
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert offered.read_text().split() == ["report"]


def test_list_names_prints_one_name_per_line_in_build_order(workdir: Path) -> None:
    result = mlbuild(workdir, "list", "--names")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "prepare\ntrain\nreport\n"


def test_the_no_op_run_imports_none_of_it(workdir: Path) -> None:
    """Completion, init and the schema cost a no-op `mlbuild run` nothing; nor does
    `--version` (importlib.metadata, read only when asked: about 25 ms of CPU)."""
    assert mlbuild(workdir, "run").returncode == 0
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mlbuild", "run"],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    assert "has started" not in result.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    assert "mlbuild.cli" in imported  # the measurement works
    for module in (
        "shtab",
        "mlbuild.ui.completion",
        "mlbuild.scaffold",
        "mlbuild.pipeline.schema_file",
        "importlib.metadata",
    ):
        assert module not in imported
