"""The up-to-date stamp (uptodate.py): a no-op told before loading anything, never wrongly.

Each test builds a pipeline, lets its files age past the racy window so that a
no-op signs every target and the next one writes the stamp, then checks that
the stamp answers (`by_stamp`) and that every kind of change makes it step
aside: the full command then decides, and reruns exactly what it must.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mlbuild import cli, signature, uptodate
from mlbuild.build import runner
from mlbuild.experiments import row_id
from mlbuild.fingerprint import Fingerprinter
from mlbuild.pipeline.schema import Target
from mlbuild.signature import Counts
from mlbuild.snapshot import snapshot_path
from tests.conftest import Project, Result
from tests.test_signature import age

PIPELINE = """
params_files = ["params.yaml"]

[targets.copy]
cmd = "cp {inputs} {outputs}"
inputs = ["src/a.txt"]
outputs = ["build/a.txt"]
env = ["MODE"]

[targets.count]
cmd = "wc -c < {inputs} > {outputs} && echo {params.n} >> {outputs}"
inputs = ["build/a.txt"]
outputs = ["build/count.txt"]
params = ["n"]
"""


class Told:
    """Records whether the last `mlbuild` call was answered by the stamp."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.by_stamp: list[bool] = []
        self.proofs: list[uptodate.Proof | None] = []
        real = uptodate.answer

        def answer(words: list[str]) -> int | uptodate.Proof | None:
            code = real(words)
            self.by_stamp.append(isinstance(code, int))
            self.proofs.append(code if isinstance(code, uptodate.Proof) else None)
            return code

        monkeypatch.setattr(cli, "answer", answer)


@pytest.fixture
def stamped(project: Project, monkeypatch: pytest.MonkeyPatch) -> tuple[Project, Told]:
    """A built pipeline whose next `mlbuild run` is answered by its stamp."""
    monkeypatch.setenv("MODE", "fast")
    monkeypatch.delenv("MLBUILD_UNSET", raising=False)
    project.write("src/a.txt", "hello\n")
    project.write("params.yaml", "n: 1  # kept\n")
    project.pipeline(PIPELINE)
    told = Told(monkeypatch)
    assert project.run().started() == ["copy", "count"]
    age()
    assert not stamp_file(project).exists()  # nothing proven: both just ran
    assert project.run().started() == []  # the long way signs both: the stamp proves them
    assert told.by_stamp == [False, False] and told.proofs == [None, None]
    return project, told


def stamp_file(project: Project) -> Path:
    return project.root / ".mlbuild" / "uptodate"


def run(project: Project, told: Told, *args: str) -> tuple[Result, bool]:
    result = project.run(*args)
    return result, told.by_stamp[-1]


def test_the_stamp_tells_a_no_op_as_the_full_command_does(
    stamped: tuple[Project, Told],
) -> None:
    project, told = stamped
    full = project.run("run", "--no-wait")  # an option the stamp leaves to the full command
    assert told.by_stamp[-1] is False
    result, by_stamp = run(project, told)
    assert by_stamp
    assert result.code == 0 and result.err == ""
    assert _untimed(result.out) == _untimed(full.out)
    assert result.out.splitlines()[:2] == [
        "Step `copy` is up to date (skipped).",
        "Step `count` is up to date (skipped).",
    ]
    quiet, by_stamp = run(project, told, "run", "-q", "-j", "2", "-k")
    assert (
        by_stamp and quiet.out.startswith("mlbuild: 2 skipped in ") and quiet.out.count("\n") == 1
    )


def _untimed(out: str) -> str:
    return "\n".join(line.split(" in ")[0] for line in out.splitlines())


def test_a_no_op_is_not_in_the_history(stamped: tuple[Project, Told]) -> None:
    project, told = stamped
    assert run(project, told)[1]
    log = project.run("log").out
    assert log.count("\nrun ") + log.startswith("run ") == 1  # the first build only


@pytest.mark.parametrize(
    "change",
    [
        "edit_keeping_size_and_mtime",
        "touch_input",
        "delete_output",
        "replace_output_by_symlink",
        "env_value",
        "env_unset",
        "params_value",
        "pipeline_edit",
        "state_db_replaced",
    ],
)
def test_every_change_is_left_to_the_full_command(
    stamped: tuple[Project, Told], monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    project, told = stamped
    root = project.root
    expected: list[str] | None
    if change == "edit_keeping_size_and_mtime":
        path = root / "src/a.txt"
        before = path.stat()
        path.write_text("HELLO\n")
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        expected = ["copy", "count"]
    elif change == "touch_input":
        os.utime(root / "src/a.txt")
        expected = []  # same bytes: the long way finds nothing changed
    elif change == "delete_output":
        (root / "build/count.txt").unlink()
        expected = ["count"]
    elif change == "replace_output_by_symlink":
        target = root / "elsewhere.txt"
        target.write_bytes((root / "build/count.txt").read_bytes())
        (root / "build/count.txt").unlink()
        (root / "build/count.txt").symlink_to(target)
        expected = None  # the long way decides (by content)
    elif change == "env_value":
        monkeypatch.setenv("MODE", "slow")
        expected = ["copy"]
    elif change == "env_unset":
        monkeypatch.delenv("MODE")
        expected = ["copy"]
    elif change == "params_value":
        project.write("params.yaml", "n: 2  # kept\n")
        expected = ["count"]
    elif change == "pipeline_edit":
        project.pipeline(PIPELINE.replace("wc -c <", "wc -c  <"))
        expected = ["count"]
    else:
        db = root / ".mlbuild/state.db"
        for suffix in ("-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        db.rename(root / "elsewhere.db")
        expected = None
    result, by_stamp = run(project, told, "run", "--no-cache")
    assert not by_stamp
    assert result.code in (0, 1, 2)
    if expected is not None:
        assert result.code == 0, result.err
        assert result.started() == expected


def test_options_and_targets_go_to_the_full_command(stamped: tuple[Project, Told]) -> None:
    project, told = stamped
    for args in (
        ("run", "copy"),
        ("run", "-v"),
        ("run", "--explain"),
        ("run", "--set", "n=1"),
        ("run", "-n"),
        ("run", "-j", "0"),
        ("run", "-qv"),
        ("run", "--quie"),
        ("status",),
    ):
        result, by_stamp = run(project, told, *args)
        assert not by_stamp, args
        assert result.code in (0, 2), (args, result.err)
    assert run(project, told, "run", "-j", "0")[0].err.startswith("mlbuild: error: -j 0")


def test_any_command_taking_the_lock_removes_the_stamp(stamped: tuple[Project, Told]) -> None:
    project, told = stamped
    assert project.run("clean").code == 0
    assert not stamp_file(project).exists()
    result, by_stamp = run(project, told)
    assert not by_stamp and "up to date" not in result.out  # restored from the cache


def test_a_damaged_stamp_is_not_read(stamped: tuple[Project, Told]) -> None:
    project, told = stamped
    path = stamp_file(project)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    result, by_stamp = run(project, told)
    assert not by_stamp and result.code == 0
    path.write_bytes(b"mlbuild-uptodate 9\n" + bytes(data))
    assert not run(project, told)[1]
    assert run(project, told)[1]  # the full no-op wrote a good one again


def test_the_stamp_is_gone_while_another_build_runs(project: Project, tmp_path: Path) -> None:
    """A build in another process removes the stamp before it changes anything."""
    project.write("src/a.txt", "a\n")
    project.pipeline(
        """
        [targets.slow]
        cmd = "cat {inputs} > {outputs} && sleep 3"
        inputs = ["src/a.txt"]
        outputs = ["out.txt"]
        """
    )
    assert project.run().code == 0
    age()
    project.run()
    project.run()
    assert stamp_file(project).exists()
    project.write("src/a.txt", "b\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    other = subprocess.Popen(
        [sys.executable, "-m", "mlbuild", "run", "-f", str(project.root / "pipeline.toml")],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        made = project.root / "out.txt"
        while not (made.exists() and made.read_text() == "b\n"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert not stamp_file(project).exists()  # the step is running now
    finally:
        out, _ = other.communicate(timeout=60)
    assert "has started" in out


def test_the_no_op_imports_only_the_stamp_reader(tmp_path: Path) -> None:
    """What makes it cheap: neither the parser nor the engine is imported."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src/a.txt").write_text("a\n")
    (tmp_path / "pipeline.toml").write_text(
        textwrap.dedent(
            """
            [targets.copy]
            cmd = "cp {inputs} {outputs}"
            inputs = ["src/a.txt"]
            outputs = ["out.txt"]
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    command = [sys.executable, "-X", "importtime", "-m", "mlbuild", "run"]
    subprocess.run(command, cwd=tmp_path, env=env, check=True, capture_output=True)
    age()
    for _ in range(2):
        subprocess.run(command, cwd=tmp_path, env=env, check=True, capture_output=True)
    done = subprocess.run(command, cwd=tmp_path, env=env, check=True, capture_output=True)
    imported = {line.split("|")[-1].strip() for line in done.stderr.decode().splitlines()}
    assert "mlbuild.uptodate" in imported
    mine = {name for name in imported if name.startswith("mlbuild")}
    assert mine == {"mlbuild", "mlbuild.cli", "mlbuild.uptodate"}
    assert "typing" not in imported and "argparse" not in imported and "sqlite3" not in imported
    assert (
        done.stdout.decode()
        == "Step `copy` is up to date (skipped).\n"
        + done.stdout.decode().splitlines(keepends=True)[-1]
    )


class Looks:
    """Counts the targets the full command looks at by their signature."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.names: list[str] = []
        real = signature.fresh_by_signature

        def counted(target: Target, sig: bytes, fp: Fingerprinter) -> Counts | None:
            self.names.append(target.name)
            return real(target, sig, fp)

        monkeypatch.setattr(runner, "fresh_by_signature", counted)


def test_one_changed_input_under_a_stamp_looks_only_at_its_target(
    stamped: tuple[Project, Told], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stamp proves `count` fresh (its files did not move); `copy` is decided as ever."""
    project, told = stamped
    looks = Looks(monkeypatch)
    project.write("src/a.txt", "hello\n")  # same bytes, new file: copy's stat moved
    result, by_stamp = run(project, told)
    assert not by_stamp and told.proofs[-1] is not None and told.proofs[-1].valid
    assert set(told.proofs[-1].fresh) == {"count"}
    assert looks.names == ["copy"]
    assert result.started() == [] and result.out.count("up to date (skipped)") == 2
    # `copy`'s input was too new to sign: unproven until the long way signs it.
    age()
    assert not run(project, told)[1]
    proof = told.proofs[-1]
    assert proof is not None and set(proof.fresh) == {"count"}
    assert run(project, told)[1]


def test_a_target_proven_by_the_stamp_below_one_that_ran_is_decided_as_ever(
    stamped: tuple[Project, Told], monkeypatch: pytest.MonkeyPatch
) -> None:
    project, told = stamped
    looks = Looks(monkeypatch)
    project.write("src/a.txt", "changed\n")
    result, by_stamp = run(project, told)
    assert not by_stamp and set(told.proofs[-1].fresh) == {"count"}  # type: ignore[union-attr]
    assert result.started() == ["copy", "count"]  # count's input is copy's new output
    assert project.read("build/count.txt") == "8\n1\n"
    assert looks.names == ["copy", "count"]
    # The stamp of that build leaves both unproven (just made): no answer, no proof.
    age()
    result, by_stamp = run(project, told)
    assert not by_stamp and told.proofs[-1] is None and result.started() == []
    assert run(project, told)[1]  # the long way signed both; its stamp answers


def test_a_proof_is_not_used_when_another_command_ran_in_between(
    stamped: tuple[Project, Told], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stamp read before the lock must be the one the lock removes."""
    project, _ = stamped
    project.write("src/a.txt", "hello\n")
    real = uptodate.answer

    def then_another(words: list[str]) -> int | uptodate.Proof | None:
        code = real(words)
        path = stamp_file(project)  # another command, and a no-op, wrote a new stamp
        path.write_bytes(path.read_bytes() + b"")
        path.rename(path.with_name("x"))
        path.with_name("x").rename(path)
        data = path.read_bytes()
        path.unlink()
        path.write_bytes(data)
        return code

    monkeypatch.setattr(cli, "answer", then_another)
    looks = Looks(monkeypatch)
    result = project.run()
    assert result.code == 0 and looks.names == ["copy", "count"]  # both looked at again


def _stamp_again(project: Project, told: Told) -> None:
    """Build what changed, then let the long way sign it and write a stamp that answers."""
    assert project.run().code == 0
    age()
    assert project.run().code == 0
    assert run(project, told)[1]


def test_a_state_database_restored_in_place_is_a_miss(stamped: tuple[Project, Told]) -> None:
    """`cp backup.db .mlbuild/state.db` keeps the inode but not the manifests: the full
    command restores the outputs the older database names, so the stamp must step aside."""
    project, told = stamped
    db = project.root / ".mlbuild/state.db"
    older = db.read_bytes()
    project.write("src/a.txt", "bye\n")
    _stamp_again(project, told)
    with open(db, "r+b") as handle:  # same inode, the older content
        handle.write(older)
        handle.truncate()
    result, by_stamp = run(project, told)
    assert not by_stamp
    # The older database knew `src/a.txt` as "hello": both are restored (the newer build).
    assert result.code == 0 and result.out.count("restored from cache") == 2, result.out


def test_a_state_directory_that_cannot_be_written_is_left_to_the_full_command(
    stamped: tuple[Project, Told], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only .mlbuild (chmod, or a read-only mount: even root cannot write) makes
    the full command fail with one line; the stamp must not answer 0 instead."""
    project, told = stamped
    state = str(project.root / ".mlbuild")
    real = os.access

    def access(path: object, mode: int, **kwargs: object) -> bool:
        if mode & os.W_OK and os.fspath(path).startswith(state):  # type: ignore[call-overload]
            return False
        return real(path, mode, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "access", access)
    result, by_stamp = run(project, told)
    assert not by_stamp
    assert result.code == 1 and "cannot write the state database" in result.err


def test_a_deleted_state_gitignore_is_written_again(stamped: tuple[Project, Told]) -> None:
    """Every full command keeps `.mlbuild/` out of git; a no-op told by the stamp too."""
    project, told = stamped
    ignore = project.root / ".mlbuild/.gitignore"
    ignore.unlink()
    result, by_stamp = run(project, told)
    assert not by_stamp and result.code == 0
    assert ignore.read_text().endswith("*\n")


def test_a_fifo_in_place_of_the_stamp_does_not_hang_the_run(project: Project) -> None:
    """The full command only unlinks `.mlbuild/uptodate`; reading a FIFO there would wait
    for a writer forever."""
    project.write("src/a.txt", "a\n")
    project.pipeline(
        """
        [targets.copy]
        cmd = "cp {inputs} {outputs}"
        inputs = ["src/a.txt"]
        outputs = ["out.txt"]
        """
    )
    assert project.run().code == 0
    os.mkfifo(stamp_file(project))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run(
        [sys.executable, "-m", "mlbuild", "run"],
        cwd=project.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "Step `copy` is up to date" in done.stdout, done.stderr
    assert not stamp_file(project).is_fifo()  # the lock removed it


def test_a_state_database_written_through_its_wal_is_a_miss(stamped: tuple[Project, Told]) -> None:
    """A write another process keeps in `state.db-wal` leaves `state.db` itself as it was."""
    import sqlite3

    project, told = stamped
    other = sqlite3.connect(project.root / ".mlbuild/state.db", isolation_level=None)
    try:
        other.execute("DELETE FROM manifests WHERE target = 'count'")  # no record of it now
        result, by_stamp = run(project, told)
    finally:
        other.close()
    assert not by_stamp
    assert result.code == 0 and "Step `count` restored from cache" in result.out, result.out


def test_a_symlink_planted_at_a_temporary_name_is_not_written_through(
    project: Project, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The stamp and the snapshot are written to `NAME.<pid>.tmp` first: never through
    a symlink someone put there."""
    outside = tmp_path_factory.mktemp("outside") / "victim.txt"
    outside.write_text("mine\n")
    project.write("src/a.txt", "a\n")
    project.pipeline(
        """
        [targets.copy]
        cmd = "cp {inputs} {outputs}"
        inputs = ["src/a.txt"]
        outputs = ["out.txt"]
        """
    )
    (project.root / ".mlbuild/snapshot").mkdir(parents=True)
    snapshot = snapshot_path((project.root / "pipeline.toml").resolve())
    planted = [
        Path(f"{stamp_file(project)}.{os.getpid()}.tmp"),
        snapshot.with_name(f"{snapshot.name}.{os.getpid()}.tmp"),
    ]
    for link in planted:
        link.symlink_to(outside)
    assert project.run().code == 0
    age()
    assert project.run().code == 0
    assert outside.read_text() == "mine\n"
    assert stamp_file(project).is_file() and snapshot.is_file()
    assert not any(link.is_symlink() for link in planted)


TWO = """
[targets.a]
cmd = "cp {inputs} {outputs}"
inputs = ["src/a.txt"]
outputs = ["build/a.txt"]

[targets.b]
cmd = "cp {inputs} {outputs}"
inputs = ["src/b.txt"]
outputs = ["build/b.txt"]
"""


def test_targets_the_stamp_proved_are_in_the_history_as_skipped(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`log` and `log TARGET` tell a proven target as any skipped one, though the state
    keeps the run's proven targets as one list rather than a row each."""
    project.write("src/a.txt", "a\n")
    project.write("src/b.txt", "b\n")
    project.pipeline(TWO)
    told = Told(monkeypatch)
    assert project.run().started() == ["a", "b"]
    age()
    assert project.run().started() == []  # signs both; its stamp proves them
    project.write("src/a.txt", "a2\n")
    result, by_stamp = run(project, told)
    assert not by_stamp and set(told.proofs[-1].fresh) == {"b"}  # type: ignore[union-attr]
    assert result.started() == ["a"]
    assert result.out.startswith("Step `b` is up to date (skipped).\nStep `a` has started")
    log = project.run("log", "-n", "1").out
    assert "    ran       1: a (" in log and log.rstrip().endswith("    skipped   1")
    lines = project.run("log", "b").out.splitlines()
    assert lines[0] == "b: the last 2 runs that decided it"
    assert re.fullmatch(r"run 2 +\S+ \S+  skipped +0\.000s", lines[2]), lines[2]
    assert re.fullmatch(r"run 1 +\S+ \S+  ran +\S+  never built", lines[3]), lines[3]
    with sqlite3.connect(project.root / ".mlbuild" / "state.db") as conn:
        rows = conn.execute("SELECT target FROM run_targets WHERE run_id = 2").fetchall()
    assert rows == [("a",)]


def test_a_change_rewrites_only_the_chunks_of_the_stamp_holding_what_moved(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next stamp keeps, byte for byte, each chunk whose targets were proven and
    skipped; what it keeps still tells every later change, and the no-op after."""
    monkeypatch.setattr(uptodate, "CHUNK", 2)
    for i in range(5):
        project.write(f"src/{i}.txt", f"{i}\n")
    project.pipeline(
        "".join(
            f'[targets.t{i}]\ncmd = "cp {{inputs}} {{outputs}}"\n'
            f'inputs = ["src/{i}.txt"]\noutputs = ["out/{i}.txt"]\n\n'
            for i in range(5)
        )
    )
    told = Told(monkeypatch)
    assert len(project.run().started()) == 5
    age()
    assert project.run().started() == []  # signs all: its stamp proves them
    before = uptodate._read(str(project.root))
    assert before is not None and len(before[0].chunks) == 3
    project.write("src/0.txt", "changed\n")
    result, by_stamp = run(project, told)
    assert not by_stamp and result.started() == ["t0"]
    after = uptodate._read(str(project.root))
    assert after is not None
    assert after[0].chunks[1:] == before[0].chunks[1:]  # t2..t4: kept as read
    assert after[0].chunks[0] != before[0].chunks[0]  # t0 ran: unproven now
    project.write("src/3.txt", "changed too\n")  # a target of a kept chunk
    result, by_stamp = run(project, told)
    assert not by_stamp and result.started() == ["t3"]
    assert project.read("out/3.txt") == "changed too\n"
    age()
    assert project.run().started() == []  # the long way signs t0 and t3
    result, by_stamp = run(project, told)
    assert by_stamp and result.out.count("up to date (skipped)") == 5


def test_a_row_under_a_proof_is_kept_as_its_difference_and_read_whole(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One changed input among many: the experiment row stores the entries that differ
    from the stamp's row (a few, not every target's), and `exp show` reads it whole."""
    n = 16
    for i in range(n):
        project.write(f"src/{i}.txt", f"{i}\n")
    project.pipeline(
        "".join(
            f'[targets.t{i:02d}]\ncmd = "cp {{inputs}} {{outputs}}"\n'
            f'inputs = ["src/{i}.txt"]\noutputs = ["out/{i}.txt"]\n\n'
            for i in range(n)
        )
    )
    told = Told(monkeypatch)
    assert len(project.run().started()) == n
    age()
    assert project.run().started() == []  # signs all: its stamp proves them
    for i in range(3):  # a whole row first (the stamp names none), then differences
        project.write(f"src/{i}.txt", f"changed {i}\n")
        result, by_stamp = run(project, told)
        assert not by_stamp and told.proofs[-1] is not None and told.proofs[-1].valid
        assert result.started() == [f"t{i:02d}"]
    with sqlite3.connect(project.root / ".mlbuild" / "state.db") as conn:
        stored = conn.execute(
            "SELECT e.id, b.base, e.targets FROM experiments e"
            " LEFT JOIN experiment_bases b ON b.id = e.id ORDER BY e.created"
        )
        (first, _, _), (whole, base, _), *differences = stored.fetchall()
    assert base is None  # the no-op's stamp named no row: the first one is whole
    # t00 (ran the run before: unproven) and each target changed since the whole row
    assert [(b, sorted(json.loads(t))) for _, b, t in differences] == [
        (whole, ["t00", "t01"]),
        (whole, ["t00", "t01", "t02"]),
    ]
    rows = {row["full_id"]: row for row in json.loads(project.run("exp", "show", "--json").out)}
    assert [rows[i]["current"] for i in (first, whole)] == [False, False]
    assert all(len(row["targets"]) == n for row in rows.values())
    assert all(row["full_id"] == row_id(row["targets"]) for row in rows.values())
    shown = [rows[i]["targets"] for i in (first, whole, *(d for d, _, _ in differences))]
    for i, (before, after) in enumerate(itertools.pairwise(shown)):
        assert {t for t in after if after[t] != before[t]} == {f"t{i:02d}"}
    assert rows[differences[-1][0]]["current"]


def test_a_row_built_again_is_no_base_for_a_difference(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A configuration built again keeps the row an earlier build added, whose cacheable
    marks may be another pipeline's: the next row is whole, so what `exp show` says of
    it (restorable) is this pipeline's."""
    n = 8

    def pipeline(cached: bool) -> str:
        return "".join(
            f'[targets.t{i:02d}]\ncmd = "cp {{inputs}} {{outputs}}"\n'
            f'inputs = ["src/{i}.txt"]\noutputs = ["out/{i}.txt"]\n'
            + ("cache = false\n" if i == 5 and not cached else "")
            + "\n"
            for i in range(n)
        )

    for i in range(n):
        project.write(f"src/{i}.txt", f"{i}\n")
    project.pipeline(pipeline(cached=False))  # t05 leaves no cache entry
    told = Told(monkeypatch)
    assert len(project.run().started()) == n
    project.pipeline(pipeline(cached=True))
    age()
    assert project.run().started() == []  # signs all: its stamp proves them
    # The second is the first build's configuration again (t00 from the cache).
    for text, how in (("x\n", "has started"), ("0\n", "restored from cache")):
        project.write("src/0.txt", text)
        result, by_stamp = run(project, told)
        assert not by_stamp and f"Step `t00` {how}" in result.out
    project.write("src/1.txt", "changed\n")
    result, by_stamp = run(project, told)
    assert not by_stamp and told.proofs[-1] is not None and told.proofs[-1].valid
    rows = json.loads(project.run("exp", "show", "--json").out)
    (current,) = [row for row in rows if row["current"]]
    assert not current["restorable"]  # t05 is cacheable now, and has no entry
