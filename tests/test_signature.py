"""Stat signatures (signature.py): a no-op's shortcut never says fresh where the long way would not.

Each test first lets the files age past the racy window (fingerprint.FINE_WINDOW_NS),
so that a no-op writes the signatures, checks that they are in the database, and then
makes a change that the signature's stat comparison must hand to the long way.
"""

from __future__ import annotations

import os
import sqlite3
import time

import pytest

from mlbuild.fingerprint import FINE_WINDOW_NS
from tests.conftest import Project

PIPELINE = """
[targets.copy]
cmd = "cp {inputs} {outputs}"
inputs = ["src/a.txt"]
outputs = ["build/a.txt"]
env = ["MODE"]

[targets.count]
cmd = "wc -c < {inputs} > {outputs}"
inputs = ["build/a.txt"]
outputs = ["build/count.txt"]
"""


def signatures(project: Project) -> dict[str, bytes | None]:
    with sqlite3.connect(project.root / ".mlbuild/state.db") as conn:
        return dict(conn.execute("SELECT target, sig FROM manifests"))


def age() -> None:
    """Wait out the racy window, so that digests taken from now on are trusted."""
    time.sleep(2 * FINE_WINDOW_NS / 1e9)


@pytest.fixture
def signed(project: Project, monkeypatch: pytest.MonkeyPatch) -> Project:
    """A built pipeline whose targets all have signatures (written by a no-op)."""
    monkeypatch.setenv("MODE", "fast")
    project.write("src/a.txt", "hello\n")
    project.pipeline(PIPELINE)
    assert project.run().started() == ["copy", "count"]
    age()
    assert project.run().started() == []  # re-hashes the racy outputs, writes signatures
    sigs = signatures(project)
    assert set(sigs) == {"copy", "count"} and all(sigs.values())
    return project


def test_a_step_just_recorded_has_no_signature_until_a_no_op_trusts_its_files(
    project: Project,
) -> None:
    project.write("src/a.txt", "hello\n")
    project.pipeline(PIPELINE)
    project.run()
    assert signatures(project) == {"copy": None, "count": None}  # outputs racy when recorded


def test_a_signed_no_op_says_the_same_as_the_long_way(signed: Project) -> None:
    result = signed.run("run", "--explain")
    assert result.code == 0
    assert "Step `copy` is up to date (skipped): same action, 1 env var, 1 input, 1 output." in (
        result.out
    )
    status = signed.run("status")
    assert status.code == 0 and "copy" in status.out and "would run" not in status.out


def test_an_edit_keeping_size_and_mtime_reruns_a_signed_target(signed: Project) -> None:
    path = signed.root / "src/a.txt"
    before = os.stat(path)
    path.write_text("jello\n")  # same size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # rsync -t, tar -x
    assert signed.run().started() == ["copy", "count"]
    assert signed.read("build/count.txt").strip() == "6"
    assert signed.read("build/a.txt") == "jello\n"


def test_a_touched_input_is_checked_the_long_way_and_signed_again(signed: Project) -> None:
    old = signatures(signed)["copy"]
    os.utime(signed.root / "src/a.txt")  # same bytes, new stat
    age()
    assert signed.run().started() == []
    new = signatures(signed)["copy"]
    assert new is not None and new != old
    assert signatures(signed)["count"] is not None


def test_a_changed_env_value_or_command_reruns_a_signed_target(
    signed: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODE", "slow")
    result = signed.run()
    assert "Step `copy` has started: env MODE changed." in result.out
    age()
    signed.run()
    signed.pipeline(PIPELINE.replace("wc -c <", "wc -c <  "))
    assert signed.run().started() == ["count"]


def test_a_deleted_or_replaced_output_reruns_a_signed_target(signed: Project) -> None:
    (signed.root / "build/count.txt").unlink()
    assert signed.run("run", "--no-cache").started() == ["count"]
    age()
    signed.run()
    (signed.root / "build/count.txt").unlink()
    (signed.root / "build/count.txt").write_text("      6\n")  # same bytes, another file
    result = signed.run()
    assert result.started() == []  # content decides: the long way finds it equal
    (signed.root / "build/count.txt").write_text("mine\n")
    assert signed.run("run", "--no-cache").started() == ["count"]


def test_status_says_a_consumer_would_run_when_its_producer_would(signed: Project) -> None:
    signed.write("src/a.txt", "changed\n")
    result = signed.run("status")
    assert result.code == 1  # something is stale
    assert "stale  count: upstream 'copy' would run\n" in result.out


def test_files_with_timestamps_in_the_future_never_get_a_signature(project: Project) -> None:
    """A racy stat (timestamps not older than the hash by the window) is never signed."""
    project.write("src/a.txt", "hello\n")
    project.pipeline(PIPELINE.replace('env = ["MODE"]\n', ""))
    project.run()
    future = time.time_ns() + 3600 * 10**9
    os.utime(project.root / "src/a.txt", ns=(future, future))
    age()
    project.run()
    project.run()
    assert signatures(project)["copy"] is None
    assert signatures(project)["count"] is not None
    path = project.root / "src/a.txt"
    path.write_text("jello\n")
    os.utime(path, ns=(future, future))
    assert project.run().started() == ["copy", "count"]


def test_python_targets_and_scripts_are_left_to_the_long_way(project: Project) -> None:
    project.write("steps.py", "def make(outputs):\n    open(outputs[0], 'w').write('x')\n")
    project.write("gen.sh", 'echo hi > "$1"\n')
    project.pipeline(
        """
        [targets.py]
        python = "steps:make"
        outputs = ["build/py.txt"]

        [targets.script]
        cmd = "sh gen.sh {outputs}"
        outputs = ["build/sh.txt"]
        """
    )
    assert sorted(project.run().started()) == ["py", "script"]
    age()
    project.run()
    project.run()
    assert signatures(project) == {"py": None, "script": None}
    project.write("gen.sh", 'echo bye > "$1"\n')
    assert project.run().started() == ["script"]


def test_the_signature_knows_every_fingerprint_field() -> None:
    """A new Fingerprint field is a new reason to be stale: signature.py must cover it
    (in its static part, its files, or by refusing such targets) before this list grows."""
    from mlbuild.manifest import Fingerprint

    assert Fingerprint._fields == (
        "action",  # static part
        "params",  # static part
        "env",  # static part
        "inputs",  # files
        "outputs",  # files
        "code",  # must be empty (shell commands naming no script)
        "packages",  # must be empty (no `track`)
        "ports",  # static part (no glob: no matches)
        "discovered",  # files
        "imported",  # must be empty
        "dynamic",  # must be empty
    )
