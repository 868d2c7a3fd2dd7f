"""Shared fixtures: a project directory with a pipeline, and mlbuild run in-process."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlbuild.cli import main


@dataclass
class Result:
    """What the user saw: exit code, stdout and stderr."""

    code: int
    out: str
    err: str

    def started(self) -> list[str]:
        """Names of the targets whose step started, in order."""
        return [line.split("`")[1] for line in self.out.splitlines() if "` has started" in line]


class Project:
    """A pipeline directory under tmp_path; `run` calls the real CLI entry point."""

    def __init__(self, root: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.root = root
        self.capsys = capsys

    def write(self, rel: str, text: str) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        return path

    def read(self, rel: str) -> str:
        return (self.root / rel).read_text()

    def pipeline(self, text: str) -> Path:
        return self.write("pipeline.toml", text)

    def run(self, *args: str) -> Result:
        self.capsys.readouterr()
        words = list(args) or ["run"]
        code = main([words[0], "-f", str(self.root / "pipeline.toml"), *words[1:]])
        captured = self.capsys.readouterr()
        return Result(code, captured.out, captured.err)


@pytest.fixture
def project(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Project]:
    yield Project(tmp_path, capsys)
