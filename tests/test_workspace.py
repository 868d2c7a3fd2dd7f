"""The workspace rules: the one check before any write, the trash, short derived names."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from mlbuild.workspace import (
    OutsideProject,
    empty_trash,
    log_path,
    move_aside,
    short_name,
    trash_dir,
    writable_path,
)


def test_a_plain_path_inside_the_project_is_writable(tmp_path: Path) -> None:
    assert writable_path(tmp_path, "out/model.bin") == str(tmp_path / "out/model.bin")


def test_a_parent_symlink_leading_outside_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    project = tmp_path / "project"
    project.mkdir()
    (project / "out").symlink_to(outside)
    with pytest.raises(OutsideProject, match="'out/sub' resolves outside the project"):
        writable_path(project, "out/sub")


def test_a_chain_of_symlinks_that_stays_inside_is_allowed(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "a").symlink_to("real")
    (tmp_path / "b").symlink_to("a")
    assert writable_path(tmp_path, "b/x") == str(tmp_path / "b/x")


def test_the_last_component_is_not_followed(tmp_path: Path) -> None:
    """A symlink output pointing anywhere is replaced as a link, so it is writable."""
    (tmp_path / "link").symlink_to("/etc/passwd")
    assert writable_path(tmp_path, "link") == str(tmp_path / "link")


def test_dotdot_and_state_dir_are_refused(tmp_path: Path) -> None:
    with pytest.raises(OutsideProject):
        writable_path(tmp_path / "p", "../x")
    with pytest.raises(OutsideProject, match=r"inside mlbuild.s own \.mlbuild/"):
        writable_path(tmp_path, ".mlbuild/state.db")


def test_move_aside_keeps_the_bytes_and_both_copies(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data/raw.csv").write_text("important")
    first = move_aside(tmp_path, "data")
    (tmp_path / "data").mkdir()
    (tmp_path / "data/raw.csv").write_text("second")
    second = move_aside(tmp_path, "data")
    assert first != second
    assert (tmp_path / first / "raw.csv").read_text() == "important"
    assert (tmp_path / second / "raw.csv").read_text() == "second"
    assert not (tmp_path / "data").exists()


def test_empty_trash_removes_only_old_slots(tmp_path: Path) -> None:
    (tmp_path / "old").write_text("o")
    (tmp_path / "new").write_text("n")
    old = move_aside(tmp_path, "old")
    move_aside(tmp_path, "new")
    slot = Path(tmp_path / old).parent
    past = time.time() - 10 * 24 * 3600
    os.utime(slot, (past, past))
    assert empty_trash(tmp_path) == 1
    left = [p.name for p in trash_dir(tmp_path).iterdir()]
    assert len(left) == 1
    assert (trash_dir(tmp_path) / left[0] / "new").read_text() == "n"


def test_long_or_odd_names_become_short_digests(tmp_path: Path) -> None:
    assert short_name("train") == "train"
    long = "t" * 252
    derived = short_name(long)
    assert len(derived) < 80 and derived != short_name("t" * 251)
    assert "/" not in short_name("a/b") and not short_name(".hidden").startswith(".")
    path = log_path(tmp_path, long)
    path.parent.mkdir(parents=True)
    path.write_text("ok")  # a legal file name
