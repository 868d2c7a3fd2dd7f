"""The cache's entry database, `.mlbuild/cache/entries.db` (cache/entrydb.py).

What a user sees when it is broken or hostile: the build succeeds with one
warning line and writes nothing outside the project; mlbuild's own database
that cannot be read is moved aside (kept) and the cache starts over, anything
else at that name is left alone; a tampered row is refused, deleted, and the
step runs; entry files of before the database are still restored; two
mlbuild processes on one cache (as a sweep's points) both cache all they build.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from mlbuild.cache import entrydb
from mlbuild.fingerprint import hash_bytes
from tests.conftest import Project
from tests.entry_rows import db_path, rows

PIPELINE = """
[params]
v = 1

[targets.a]
outputs = ["out/a.txt"]
params = ["v"]
cmd = "echo a{params.v} > {outputs}; echo a >> ran.log"

[targets.b]
outputs = ["out/b.bin"]
params = ["v"]
cmd = "head -c 5000 /dev/zero > {outputs}; echo {params.v} >> {outputs}; echo b >> ran.log"
"""


def ran(project: Project) -> list[str]:
    log = project.root / "ran.log"
    return log.read_text().split() if log.exists() else []


def built(project: Project) -> Project:
    """Both targets built at v=1 and at v=2 (so v=1 is a restore away), now at v=2."""
    project.pipeline(PIPELINE)
    assert project.run().code == 0
    assert project.run("run", "--set", "v=2").code == 0
    assert sorted(ran(project)) == ["a", "a", "b", "b"]
    return project


def warnings(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.strip()]


def cache_files(root: Path) -> list[str]:
    return sorted(p.name for p in (root / ".mlbuild/cache").iterdir())


def test_saves_are_rows_and_restores_come_from_them(project: Project) -> None:
    built(project)
    assert sorted(data["target"] for _, data in rows(project.root)) == ["a", "a", "b", "b"]
    assert not (project.root / ".mlbuild/cache/runs").exists()  # no entry file any more
    result = project.run()
    assert result.code == 0 and result.err == ""
    assert "Step `a` restored from cache" in result.out
    assert "Step `b` restored from cache" in result.out
    assert project.read("out/a.txt") == "a1\n"
    assert sorted(ran(project)) == ["a", "a", "b", "b"]


# -- a broken or foreign file at the database's name ---------------------------------------


def _rerun_v1(project: Project) -> list[str]:
    """Build v=1 again (both steps run: no usable entry); its warning lines."""
    result = project.run()
    assert result.code == 0, result.err
    assert sorted(result.started()) == ["a", "b"]
    assert project.read("out/a.txt") == "a1\n"
    return warnings(result.err)


def _contents(path: Path) -> Any:
    """A file's bytes, or a directory's files with theirs."""
    if path.is_file():
        return path.read_bytes()
    return {p.name: p.read_bytes() for p in path.iterdir()}


@pytest.mark.parametrize(
    ("case", "shown"),
    [
        ("garbage", "is not mlbuild's cache database (left alone"),
        ("short", "is not mlbuild's cache database (left alone"),
        ("foreign sqlite", "is not mlbuild's cache database (left alone"),
        ("directory", "is a directory, not mlbuild's cache database (left alone"),
    ],
)
def test_a_file_mlbuild_cannot_show_is_its_own_is_left_alone(
    project: Project, case: str, shown: str
) -> None:
    built(project)
    db = db_path(project.root)
    good = db.read_bytes()
    db.unlink()
    if case == "garbage":
        db.write_bytes(os.urandom(20000))
    elif case == "short":  # too short to hold a header: nothing says it was mlbuild's
        db.write_bytes(good[:50])
    elif case == "foreign sqlite":
        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TABLE notes (text TEXT)")
            conn.execute("INSERT INTO notes VALUES ('mine')")
        conn.close()
    else:
        db.mkdir()
        (db / "keep.txt").write_text("mine\n")
    before = _contents(db)
    for _ in range(2):  # and again on the next build: nothing was changed
        [line] = _rerun_v1(project)
        assert shown in line
        assert "move it away to cache outputs again" in line
        assert line.endswith("; the build goes on without caching outputs")
        assert ".mlbuild/cache/entries.db" in line
        assert _contents(db) == before
        assert [p for p in db.parent.iterdir() if p.name.startswith("entries.db")] == [db]
        project.run("run", "--set", "v=2")
    # Moved away by the user: caching works again.
    if db.is_dir():
        (db / "keep.txt").unlink()
        db.rmdir()
    else:
        db.unlink()
    assert warnings(project.run().err) == []
    assert project.run("run", "--set", "v=2").code == 0
    assert "Step `a` restored from cache" in project.run().out


@pytest.mark.parametrize("name", ["entries.db", "entries.db-wal", "entries.db-shm"])
def test_a_symlink_leading_out_of_the_project_is_never_written_through(
    project: Project, tmp_path_factory: pytest.TempPathFactory, name: str
) -> None:
    built(project)
    outside = tmp_path_factory.mktemp("outside")
    (outside / "victim").write_text("not mlbuild's\n")
    cache = project.root / ".mlbuild/cache"
    link = cache / name
    if name == "entries.db":
        db_path(project.root).unlink()
    link.symlink_to(outside / ("victim" if name == "entries.db" else "absent"))
    [line] = _rerun_v1(project)
    assert f"{name} is " in line and "(left alone: move it away" in line
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert (outside / "victim").read_text() == "not mlbuild's\n"
    assert link.is_symlink()


@pytest.mark.parametrize("name", ["entries.db", "entries.db-wal"])
def test_a_hard_link_to_a_file_outside_is_never_written_through(
    project: Project, tmp_path_factory: pytest.TempPathFactory, name: str
) -> None:
    """Even a copy of mlbuild's own database: its other name is not in the project."""
    built(project)
    outside = tmp_path_factory.mktemp("outside") / "copy.db"
    db = db_path(project.root)
    if name == "entries.db":
        os.replace(db, outside)
    else:
        outside.write_bytes(b"")
    before = outside.read_bytes()
    os.link(outside, db.parent / name)
    [line] = _rerun_v1(project)
    assert f"{name} is " in line and "(left alone: move it away" in line
    assert outside.read_bytes() == before
    assert sorted(p.name for p in outside.parent.iterdir()) == ["copy.db"]


def test_an_unreadable_database_is_left_alone(project: Project) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads a file of mode 000")
    built(project)
    db = db_path(project.root)
    db.chmod(0)
    try:
        [line] = _rerun_v1(project)
    finally:
        db.chmod(0o644)
    assert "entries.db" in line and "the build goes on without caching outputs" in line


@pytest.mark.parametrize("damage", ["truncated", "overwritten", "other format"])
def test_its_own_database_that_cannot_be_read_is_moved_aside(project: Project, damage: str) -> None:
    built(project)
    db = db_path(project.root)
    good = db.read_bytes()
    assert not Path(f"{db}-wal").exists()  # the last connection checkpointed it
    if damage == "truncated":
        db.write_bytes(good[: len(good) // 2])
    elif damage == "overwritten":  # its header kept, pages after it garbage
        db.write_bytes(good[:100] + os.urandom(len(good) - 100))
    else:
        with sqlite3.connect(db) as conn:
            conn.execute("PRAGMA user_version = 99")
        conn.close()
    damaged = db.read_bytes()
    [line] = _rerun_v1(project)
    assert line.startswith("mlbuild: warning: ")
    assert ".mlbuild/cache/entries.db was moved to entries.db.bad-" in line
    assert "the cache starts over" in line
    [aside] = [p for p in db.parent.iterdir() if p.name.startswith("entries.db.bad-")]
    assert aside.read_bytes() == damaged  # kept, not deleted
    # The new database caches again: v=2 built, v=1 restored, no more warnings.
    assert warnings(project.run("run", "--set", "v=2").err) == []
    result = project.run()
    assert warnings(result.err) == []
    assert "Step `a` restored from cache" in result.out


@pytest.mark.parametrize("reader", [["status"], ["run", "-n"], ["exp", "show"]])
def test_a_command_that_reads_the_cache_leaves_its_unusable_database_to_the_build(
    project: Project, reader: list[str]
) -> None:
    """A query has no reporter: it moved the database aside without a word, and the next
    build ran everything again without saying why. It now leaves it (its lookups miss),
    and the build moves it aside with its one warning."""
    built(project)
    with contextlib.closing(sqlite3.connect(db_path(project.root))) as conn:
        conn.execute("PRAGMA user_version = 99")
    project.run(*reader)
    assert cache_files(project.root) == ["entries.db", "objects"]
    [line] = _rerun_v1(project)
    assert ".mlbuild/cache/entries.db was moved to entries.db.bad-" in line


def test_a_full_disk_is_one_warning_and_the_build_goes_on(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's own "database or disk is full", from a page limit at the current size."""
    project.pipeline(PIPELINE)
    assert project.run("run", "a").code == 0
    connect = entrydb.EntryDB._connect

    def full(self: entrydb.EntryDB) -> sqlite3.Connection:
        conn = connect(self)
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")
        return conn

    monkeypatch.setattr(entrydb.EntryDB, "_connect", full)
    for n in range(3):  # entries of 4 KiB files: each needs pages of its own
        project.write(f"in{n}.txt", "x" * 4000)
    project.pipeline(
        PIPELINE
        + "".join(
            f'\n[targets.c{n}]\ninputs = ["in{n}.txt"]\noutputs = ["out/c{n}.txt"]\n'
            f'cmd = "cp {{inputs}} {{outputs}}"\n'
            for n in range(3)
        )
    )
    result = project.run("run", "-j", "1")
    assert result.code == 0
    [line] = warnings(result.err)
    assert ".mlbuild/cache/entries.db: the disk is full" in line
    assert line.endswith("; the build goes on without caching outputs")
    assert all((project.root / f"out/c{n}.txt").exists() for n in range(3))


# -- rows that were tampered with --------------------------------------------------------------


A1 = hash_bytes(b"a1\n")
A1_TEXT = base64.b64encode(b"a1\n").decode()


def _other_key(data: dict[str, Any], key: str) -> bytes:
    data["key"] = "0" * 64
    return json.dumps(data).encode()


def _bad_inline(data: dict[str, Any], key: str) -> bytes:
    digest = next(iter(data["inline"]))
    data["inline"][digest] = "QUFB"  # "AAA": not the bytes of that digest
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda data, key: b"{not json", "it is not JSON"),
        (_other_key, "it is the entry of another key"),
        (_bad_inline, "inline file "),
    ],
    ids=["not json", "other key", "wrong inline bytes"],
)
def test_a_tampered_row_is_refused_deleted_and_the_step_runs(
    project: Project, change: Any, why: str
) -> None:
    built(project)
    [(row, data)] = [(r, d) for r, d in rows(project.root) if d["inline"] == {A1: A1_TEXT}]
    row.write_bytes(change(data, row.key))
    result = project.run()
    assert result.code == 0
    [line] = warnings(result.err)
    assert "cache entry of `a` not used: " in line and why in line
    assert result.started() == ["a"]
    assert "Step `b` restored from cache" in result.out
    assert project.read("out/a.txt") == "a1\n"
    # The bad row was deleted; the rerun's save put a good one under the same key.
    assert json.loads(row.read_bytes())["inline"] == {A1: A1_TEXT}


def test_a_row_whose_data_is_text_is_read_as_its_bytes(project: Project) -> None:
    """The sqlite3 shell stores a quoted JSON as TEXT, not BLOB: it is the same entry."""
    built(project)
    with contextlib.closing(sqlite3.connect(db_path(project.root))) as conn, conn:
        conn.execute("UPDATE entries SET data = CAST(data AS TEXT)")
    result = project.run("run", "--set", "v=1")
    assert result.code == 0, result.err
    assert warnings(result.err) == []
    assert "Step `a` restored from cache" in result.out
    assert "Step `b` restored from cache" in result.out


@pytest.mark.parametrize("value", ["1000000000000", "2.5", "NULL"])
def test_a_row_whose_data_is_a_number_is_refused_and_the_step_runs(
    project: Project, value: str
) -> None:
    """A number there is no entry (never `bytes(n)`: n zero bytes); NULL neither."""
    built(project)
    with contextlib.closing(sqlite3.connect(db_path(project.root))) as conn, conn:
        conn.execute("PRAGMA ignore_check_constraints = 1")
        conn.execute("PRAGMA writable_schema = 1")  # NOT NULL is kept in the schema's text
        conn.execute(
            "UPDATE sqlite_master SET sql = replace(sql, 'data BLOB NOT NULL', 'data BLOB')"
            " WHERE name = 'entries'"
        )
    with contextlib.closing(sqlite3.connect(db_path(project.root))) as conn, conn:
        conn.execute(f"UPDATE entries SET data = {value}")
    result = project.run("run", "--set", "v=1")
    assert result.code == 0, result.err
    lines = warnings(result.err)
    assert len(lines) == 2 and all("not used: it is not JSON; running it" in x for x in lines)
    assert sorted(result.started()) == ["a", "b"]


@pytest.mark.parametrize("command", [["cache", "verify"], ["gc", "--keep-runs", "0"]])
def test_a_row_key_leading_out_of_the_cache_never_names_a_file(
    project: Project, tmp_path_factory: pytest.TempPathFactory, command: list[str]
) -> None:
    """A hostile row's key is never a path: `runs/` + `xx` + `/home/...` named a user's
    file outside the project, which gc and verify read and deleted when the row could not
    be read (its data not UTF-8) and entry files of before were looked at instead."""
    victim = tmp_path_factory.mktemp("outside") / "victim.json"
    victim.write_text('{"mine": 1}\n')
    built(project)
    (project.root / ".mlbuild/cache/runs").mkdir()  # a cache with entry files of before
    key = "xx" + str(victim.with_suffix(""))
    with contextlib.closing(sqlite3.connect(db_path(project.root))) as conn, conn:
        conn.execute("INSERT INTO entries VALUES (?, 'a', 0, 0, CAST(x'ff' AS TEXT))", (key,))
    result = project.run(*command)
    assert "Traceback" not in result.err
    assert victim.read_text() == '{"mine": 1}\n'
    assert str(victim) not in result.out + result.err
    with contextlib.closing(sqlite3.connect(db_path(project.root))) as conn:
        assert conn.execute("SELECT count(*) FROM entries WHERE key = ?", (key,)).fetchone() == (0,)


# -- entry files of before the database ----------------------------------------------------


@pytest.mark.parametrize("version", [2, 3])
def test_entry_files_of_before_are_restored_and_gc_removes_them(
    project: Project, version: int
) -> None:
    built(project)
    cache = project.root / ".mlbuild/cache"
    for row, data in rows(project.root):
        if version == 2:  # no `inline`: every file an object
            for digest, text in data.pop("inline").items():
                obj = cache / "objects" / digest[:2] / digest[2:]
                obj.parent.mkdir(parents=True, exist_ok=True)
                obj.write_bytes(base64.b64decode(text))
            data["version"] = 2
        path = cache / "runs" / row.key[:2] / f"{row.key[2:]}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
    db_path(project.root).unlink()
    result = project.run()
    assert result.code == 0 and result.err == ""
    assert "Step `a` restored from cache" in result.out
    assert "Step `b` restored from cache" in result.out
    assert sorted(ran(project)) == ["a", "a", "b", "b"]
    verify = project.run("cache", "verify")
    assert verify.code == 0 and "4 entries checked, 0 corrupted" in verify.out
    gc = project.run("gc", "--keep-runs", "0")
    assert gc.code == 0 and "removed 2 entries" in gc.out, gc.out
    left = sorted(p.name for p in (cache / "runs").rglob("*.json"))
    assert len(left) == 2  # the current ones (v=1) are kept where they are
    assert project.run("run", "--set", "v=2").started() == ["a", "b"]


# -- two mlbuild processes on one cache ----------------------------------------------------


def _many(n: int) -> str:
    return "".join(
        f'[targets.t{i}]\noutputs = ["out/t{i}.txt"]\ncmd = "echo {i}-{{params.v}} > {{outputs}}"\n'
        f'params = ["v"]\n'
        for i in range(n)
    )


def test_four_processes_on_one_cache_all_cache_everything(tmp_path: Path) -> None:
    """As a sweep's points: each project's `.mlbuild/cache` is the same folder, and a
    fifth project's gc runs beside the builds: no lock error, no row lost. (Timing
    decides whether a race shows here; the one found, rows lost while a header check
    dropped SQLite's locks, has its own test below.)"""
    n = 40
    shared = tmp_path / "shared-cache"
    shared.mkdir()
    roots = [tmp_path / f"p{k}" for k in range(1, 6)]
    for k, root in enumerate(roots, 1):
        root.mkdir()
        (root / "pipeline.toml").write_text(f"[params]\nv = {k}\n\n" + _many(n))
        (root / ".mlbuild").mkdir()
        (root / ".mlbuild/cache").symlink_to(shared)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    command = [sys.executable, "-m", "mlbuild", "run", "-q", "-j", "2"]
    gc = [sys.executable, "-m", "mlbuild", "gc"]
    builders = [
        subprocess.Popen(command, cwd=r, env=env, stderr=subprocess.PIPE, text=True)
        for r in roots[:4]
    ]
    collector = subprocess.Popen(
        gc, cwd=roots[4], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for proc in builders:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and err == "", err
    _, err = collector.communicate(timeout=120)
    assert collector.returncode == 0 and err == "", err
    with contextlib.closing(sqlite3.connect(shared / "entries.db")) as conn:
        count = conn.execute("SELECT count(*) FROM entries").fetchone()[0]
    assert count == 4 * n
    # One project restores what the others built.
    for v in (2, 3, 4):
        result = subprocess.run(
            [*command, "--set", f"v={v}"], cwd=roots[0], env=env, capture_output=True, text=True
        )
        assert result.returncode == 0 and result.stderr == "", result.stderr
        assert (roots[0] / "out/t0.txt").read_text() == f"0-{v}\n"
        assert f"{n} restored" in result.stdout, result.stdout


def test_a_second_thread_opening_the_database_keeps_the_first_ones_rows(tmp_path: Path) -> None:
    """Checking a file's header by an `os.open` and `close` of its own dropped the POSIX
    locks of the process's SQLite connections: another mlbuild closing its connection
    then took itself for the last user and removed the WAL, and later rows were lost."""
    db = entrydb.EntryDB(tmp_path)
    payload = b"{}"
    writer = ThreadPoolExecutor(1)  # as the runner's cache writer
    writer.submit(db.put, "1" * 64, "t", 1.0, 2, payload).result()
    assert db.get("1" * 64) == payload  # the main thread's own connection
    other = "import sqlite3, sys; sqlite3.connect(sys.argv[1]).execute('SELECT * FROM entries')"
    subprocess.run([sys.executable, "-c", other, str(db.path)], check=True)  # reads, closes
    writer.submit(db.put, "2" * 64, "t", 1.0, 2, payload).result()
    writer.shutdown()
    count = (
        "import sqlite3, sys; conn = sqlite3.connect(sys.argv[1]);"
        " print(conn.execute('SELECT count(*) FROM entries').fetchone()[0])"
    )
    seen = subprocess.run(
        [sys.executable, "-c", count, str(db.path)], capture_output=True, text=True, check=True
    )
    db.close()
    assert seen.stdout == "2\n"


@pytest.mark.parametrize("command", [["gc"], ["gc", "--keep-runs", "0"], ["cache", "verify"]])
def test_gc_and_verify_stop_at_a_database_they_cannot_read(
    project: Project, command: list[str]
) -> None:
    """An unreadable database is not an empty one: gc would drop every object."""
    built(project)
    objects = sorted((project.root / ".mlbuild/cache/objects").rglob("*"))
    assert objects
    db = db_path(project.root)
    db.unlink()
    db.write_bytes(os.urandom(20000))
    garbage = db.read_bytes()
    result = project.run(*command)
    assert result.code == 1
    assert result.err.startswith("mlbuild: error: ")
    assert "entries.db is not mlbuild's cache database (left alone" in result.err
    assert len(result.err.splitlines()) == 1, result.err
    assert sorted((project.root / ".mlbuild/cache/objects").rglob("*")) == objects
    assert db.read_bytes() == garbage


def test_with_a_remote_an_unusable_database_is_still_one_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not a line per target the remote has: nothing is fetched that cannot be kept."""
    remote = f'[cache]\nremote = "file://{tmp_path / "remote"}"\n'
    first = Project(tmp_path / "a", capsys)
    first.pipeline(remote + PIPELINE)
    assert first.run().code == 0
    second = Project(tmp_path / "b", capsys)
    second.pipeline(remote + PIPELINE)
    (second.root / ".mlbuild/cache").mkdir(parents=True)
    db_path(second.root).write_bytes(os.urandom(20000))
    result = second.run("run", "-j", "1")
    assert result.code == 0
    [line] = warnings(result.err)
    assert "entries.db is not mlbuild's cache database (left alone" in line
    assert line.endswith("; the build goes on without caching outputs")
    assert sorted(result.started()) == ["a", "b"]


def test_a_database_locked_past_the_busy_timeout_is_one_warning(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holding the write lock (a long gc, say): no crash, no traceback."""
    built(project)
    monkeypatch.setattr(entrydb, "BUSY_SECONDS", 0.2)
    with contextlib.closing(sqlite3.connect(db_path(project.root), isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        project.pipeline(
            PIPELINE + '[targets.c]\noutputs = ["out/c.txt"]\ncmd = "echo c > {outputs}"\n'
        )
        result = project.run()
        other.execute("ROLLBACK")
    assert result.code == 0
    assert "Step `a` restored from cache" in result.out  # reading never waits for a writer
    [line] = warnings(result.err)
    assert ".mlbuild/cache/entries.db is locked by another process" in line
    assert line.endswith("; the build goes on without caching outputs")
    assert (project.root / "out/c.txt").read_text() == "c\n"
    (project.root / "out/c.txt").unlink()
    assert project.run("run", "c").started() == ["c"]  # once free, it caches again
    assert "c" in {data["target"] for _, data in rows(project.root)}


@pytest.mark.parametrize("kind", ["blob", "text"])
def test_a_row_larger_than_any_entry_is_not_read_whole(
    project: Project, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A hostile row of a gigabyte was read into memory whole before its size was
    checked: at most the limit (and one byte) is read now, refused, the row deleted."""
    from mlbuild.cache.entry import load_entry as load

    built(project)
    monkeypatch.setattr(entrydb, "READ_LIMIT", 4000)
    read: list[int] = []

    def spy(raw: bytes, key: str) -> Any:
        read.append(len(raw))
        return load(raw, key)

    monkeypatch.setattr("mlbuild.cache.local.load_entry", spy)
    big = "randomblob(100000)" if kind == "blob" else "printf('%.*c', 100000, 'x')"
    with contextlib.closing(sqlite3.connect(db_path(project.root))) as conn, conn:
        conn.execute(f"UPDATE entries SET data = {big}")
    result = project.run("run", "--set", "v=1")
    assert result.code == 0, result.err
    assert read and max(read) <= 4001
    assert all("not used" in line and "running it" in line for line in warnings(result.err))
    assert sorted(result.started()) == ["a", "b"]
