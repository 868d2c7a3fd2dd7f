"""The compiled pipeline snapshot: never an answer a fresh load of the TOML would not give."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mlbuild import snapshot, uptodate
from mlbuild.pipeline.load import Source, source_digest
from tests.conftest import Project

PIPELINE = """
[params]
lr = 1

[targets.train]
cmd = "echo {params.lr} > {outputs}"
outputs = ["model.txt"]
params = ["lr"]
"""
FRESH = "fresh  train\n"
CHANGED = "stale  train: param lr changed 1 -> "


def _snapshot_file(project: Project) -> Path:
    (found,) = (project.root / ".mlbuild" / "snapshot").glob("*.pickle")
    return found


def _built(project: Project) -> Path:
    """A built project and its snapshot (the first run makes `.mlbuild/`; the second keeps it)."""
    project.pipeline(PIPELINE)
    assert project.run().code == 0
    assert not (project.root / ".mlbuild" / "snapshot").exists()
    assert project.run().code == 0
    return _snapshot_file(project)


def test_a_run_keeps_a_snapshot_and_the_next_command_uses_it(project: Project) -> None:
    kept = _built(project)
    stamp = kept.stat().st_mtime_ns
    listed = project.run("status")
    assert listed.out == FRESH
    assert kept.stat().st_mtime_ns == stamp  # read back, not written again


def test_no_state_directory_is_made_for_a_snapshot(project: Project) -> None:
    project.pipeline(PIPELINE)
    assert project.run("list").code == 0
    assert not (project.root / ".mlbuild").exists()


def test_a_corrupt_snapshot_is_loaded_from_the_toml(project: Project) -> None:
    kept = _built(project)
    head = b"".join(kept.read_bytes().splitlines(keepends=True)[:2])
    for broken in (head + b"\x80\x05garbage", head, b"", b"\xff" * 100):
        kept.write_bytes(broken)
        listed = project.run("status")
        assert (listed.code, listed.out) == (0, FRESH)
    assert kept.read_bytes().startswith(head)  # and written again, whole
    assert len(kept.read_bytes()) > len(head)


def test_an_edit_with_the_same_size_and_mtime_is_seen(project: Project) -> None:
    _built(project)
    file = project.root / "pipeline.toml"
    before = file.stat()
    file.write_text(PIPELINE.replace("lr = 1", "lr = 7"))
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert file.stat().st_size == before.st_size
    status = project.run("status")
    assert (status.code, status.out) == (1, CHANGED + "7\n")


def test_set_overrides_are_part_of_the_key(project: Project) -> None:
    _built(project)
    assert project.run("status", "--set", "lr=2").out == CHANGED + "2\n"
    assert project.run("status").out == FRESH
    assert project.run("status", "--set", "lr:=2.0").out == CHANGED + "2.0\n"
    assert project.run("status", "--set", 'lr:="1"').out == CHANGED + '"1"\n'
    assert project.run("status", "--set", "lr=1").out == FRESH
    unknown = project.run("status", "--set", "nope=1")
    assert unknown.code == 2
    assert "--set nope: no such parameter" in unknown.err


def test_an_unwritable_snapshot_directory_costs_only_the_load(project: Project) -> None:
    kept = _built(project)
    folder = kept.parent
    kept.unlink()
    folder.rmdir()
    folder.write_text("in the way")  # mkdir and every write below it fail
    assert project.run("status", "--set", "lr=3").out == CHANGED + "3\n"
    assert project.run("status").code == 0
    assert folder.read_text() == "in the way"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_state_directory_costs_only_the_load(project: Project) -> None:
    kept = _built(project)
    kept.unlink()
    kept.parent.chmod(0o500)
    try:
        assert project.run("status", "--set", "lr=3").out == CHANGED + "3\n"
    finally:
        kept.parent.chmod(0o700)
    assert not list(kept.parent.iterdir())


def test_a_code_change_of_mlbuild_is_a_miss(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = _built(project)
    stamp = kept.stat().st_mtime_ns
    monkeypatch.setattr(uptodate, "code_stamp", lambda: "another mlbuild")
    assert project.run("status").out == FRESH
    assert kept.stat().st_mtime_ns != stamp  # the old snapshot was not used, a new one kept


def test_the_code_stamp_follows_mlbuilds_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sub").mkdir()
    module = tmp_path / "sub" / "mod.py"
    module.write_text("x = 1\n")
    monkeypatch.setattr(uptodate, "_PACKAGE", str(tmp_path))
    first = uptodate.code_stamp()
    module.write_text("x = 2\n")  # same size
    os.utime(module, ns=(0, module.stat().st_mtime_ns + 1))
    assert uptodate.code_stamp() != first


def test_the_disk_check_of_a_python_module_is_made_again(project: Project) -> None:
    """An output directory `pkg/mod` is fine while the module is `pkg/mod.py`; once a
    package `pkg/mod/` appears, the same pipeline is refused, snapshot or not."""
    project.write("pkg/__init__.py", "")
    project.write("pkg/mod.py", "def f(model):\n    open(model, 'w').write('m')\n")
    project.pipeline(
        """
        [targets.train]
        python = "pkg.mod:f"
        outputs = { model = "model.txt" }

        [targets.other]
        cmd = "mkdir -p {outputs}"
        outputs = ["pkg/mod"]
        """
    )
    assert project.run("list").code == 0
    (project.root / ".mlbuild").mkdir()
    assert project.run("list").code == 0
    _snapshot_file(project)
    project.write("pkg/mod/__init__.py", "")
    refused = project.run("list")
    assert refused.code == 2
    assert "would overwrite 'pkg/mod/__init__.py'" in refused.err


def test_a_changed_source_file_is_a_miss(project: Project) -> None:
    """The hook for files a pipeline reads besides itself (`_Loader.read_source`)."""
    _built(project)
    extra = project.write("params.yaml", "lr: 1\n")
    file = (project.root / "pipeline.toml").resolve()
    data = file.read_bytes()
    graph = snapshot.load_graph(file)
    key = uptodate.pipeline_key(str(file), data, "[]")
    path = snapshot.snapshot_path(file)
    snapshot._write(path, key, (Source(str(extra), source_digest(extra.read_bytes())),), graph)
    assert snapshot._read(path, key, file) is not None
    extra.write_text("lr: 2\n")
    assert snapshot._read(path, key, file) is None
    extra.unlink()
    assert snapshot._read(path, key, file) is None


def test_a_params_file_edit_is_seen_through_the_snapshot(tmp_path: Path) -> None:
    """The snapshot is keyed by the params file's bytes: an edit with the same size and
    mtime still reloads, and the value a target gets is the file's."""
    from mlbuild.snapshot import load_graph

    (tmp_path / ".mlbuild").mkdir()
    (tmp_path / "params.yaml").write_text("train:\n  n_est: 50  # trees\n")
    (tmp_path / "pipeline.toml").write_text(
        'params_files = ["params.yaml"]\n\n[targets.t]\ncmd = "echo {params.train.n_est}"\n'
        'params = ["train.n_est"]\n'
    )
    first = load_graph(tmp_path / "pipeline.toml")
    assert first.targets["t"].params == {"train.n_est": 50}
    st = os.stat(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("train:\n  n_est: 60  # trees\n")
    os.utime(tmp_path / "params.yaml", ns=(st.st_atime_ns, st.st_mtime_ns))
    again = load_graph(tmp_path / "pipeline.toml")
    assert again.targets["t"].params == {"train.n_est": 60}
    assert again.targets["t"].command == "echo 60"


def test_glob_inputs_written_by_targets_are_matched_from_a_snapshot(project: Project) -> None:
    """A glob input matches the outputs other targets declare (the graph's output tree),
    whether the graph came from the TOML or from its snapshot."""
    project.pipeline(
        """
[targets.make]
cmd = "mkdir -p parts && echo a > parts/a.txt"
outputs = ["parts/a.txt"]

[targets.join]
cmd = "cat parts/*.txt > {outputs}"
inputs = ["parts/*.txt"]
outputs = ["all.txt"]
"""
    )
    assert project.run().code == 0
    assert project.run().code == 0  # keeps the snapshot
    kept = _snapshot_file(project)
    stamp = kept.stat().st_mtime_ns
    assert project.run("clean").code == 0
    assert not (project.root / "parts" / "a.txt").exists()
    again = project.run("run", "--no-cache")
    assert again.code == 0, again.err
    assert again.started() == ["make", "join"]
    assert kept.stat().st_mtime_ns == stamp  # the snapshot answered
