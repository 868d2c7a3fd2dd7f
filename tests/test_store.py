"""store.py: the schema version, upgrading and starting over, corruption, transactions.

Each test opens a real state database in tmp_path and checks what is on disk
(tables, rows, backup files) and what the user is told (warnings, StateError).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlbuild.errors import StateError
from mlbuild.fingerprint import DirStat, StatEntry
from mlbuild.store import SCHEMA_VERSION, Record, RunRow, Store, StoredExperiment, open_store

ENTRY = StatEntry(5, 1_000, 42, 2_000_000_000_000, "d" * 64, 1_500)
# The schema this mlbuild wrote before ctimes were recorded.
SCHEMA_2 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE stats (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    ino INTEGER NOT NULL, checked_ns INTEGER NOT NULL, digest TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE manifests (
    target TEXT PRIMARY KEY, data TEXT NOT NULL, finished_at REAL NOT NULL, duration REAL NOT NULL
);
CREATE TABLE parsed (raw TEXT PRIMARY KEY, data TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE trees (digest TEXT PRIMARY KEY, listing BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE runs (
    id INTEGER PRIMARY KEY, started_at REAL NOT NULL, finished_at REAL NOT NULL,
    command TEXT NOT NULL, status TEXT NOT NULL
);
CREATE TABLE run_targets (
    run_id INTEGER NOT NULL, target TEXT NOT NULL, status TEXT NOT NULL,
    duration REAL NOT NULL, reason TEXT NOT NULL, PRIMARY KEY (run_id, target)
);
INSERT INTO meta VALUES ('schema_version', '2');
INSERT INTO stats VALUES ('in.txt', 5, 1000, 42, 2000000000000, 'abc');
INSERT INTO manifests VALUES ('t', '{"version": 1}', 1.0, 2.0);
INSERT INTO runs VALUES (1, 1.0, 2.0, 'run', 'ok');
INSERT INTO run_targets VALUES (1, 't', 'ran', 2.0, 'never built');
"""


class Warnings(list[str]):
    def __call__(self, message: str) -> None:
        self.append(message)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / ".mlbuild"


@pytest.fixture
def warned() -> Warnings:
    return Warnings()


@pytest.fixture
def store(state: Path, warned: Warnings) -> Iterator[Store]:
    with open_store(state, warned) as opened:
        yield opened


def backups(state: Path) -> list[str]:
    return sorted(
        p.name for p in state.glob("state.db.bad-*") if not p.name.endswith(("-wal", "-shm"))
    )


def fill(store: Store, n: int) -> None:
    """Many rows in every table, so that the database spans many pages."""
    for i in range(n):
        store.record(f"t{i:03d}", '{"version": 1}' + " " * 300, 0.5, {f"f{i}": ENTRY}, {})
    store.record_run(
        1.0, "run", "ok", [RunRow(f"t{i:03d}", "ran", 0.5, "x" * 100) for i in range(n)]
    )


def corrupt_middle(db: Path) -> None:
    """Damage every page but the first and last of a checkpointed database."""
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    data = bytearray(db.read_bytes())
    for n in range(2, pages - 1):
        data[n * page + 100 : (n + 1) * page - 100] = b"\xa5" * (page - 200)
    db.write_bytes(bytes(data))


# --- the schema version ------------------------------------------------------------------------


def test_a_new_database_records_its_schema_version(store: Store, state: Path) -> None:
    with sqlite3.connect(state / "state.db") as conn:
        rows = conn.execute("SELECT key, value FROM meta").fetchall()
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert rows == [("schema_version", SCHEMA_VERSION)]
    assert {"stats", "dirs", "manifests", "trees", "runs", "run_targets"} <= tables
    assert (state / ".gitignore").read_text().splitlines()[-1] == "*"


def test_version_2_is_upgraded_in_place_keeping_manifests_and_history(
    state: Path, warned: Warnings
) -> None:
    state.mkdir()
    with sqlite3.connect(state / "state.db") as conn:
        conn.executescript(SCHEMA_2)
    with open_store(state, warned) as store:
        assert store.load_stats().files == {}  # no ctime recorded: re-hashed once
        assert store.load_manifest("t") is not None
        assert [r.command for r in store.load_runs(5)] == ["run"]
        store.save_stats({"in.txt": ENTRY})
        assert store.load_stats().files == {"in.txt": ENTRY}
    assert warned == []
    assert backups(state) == []
    with sqlite3.connect(state / "state.db") as conn:
        assert conn.execute("SELECT value FROM meta").fetchone() == (SCHEMA_VERSION,)


def test_version_4_is_upgraded_keeping_everything_and_indexing_the_history(
    state: Path, warned: Warnings
) -> None:
    with open_store(state, warned) as store:
        store.save_stats({"in.txt": ENTRY})
        store.record("t", '{"version": 2}', 2.0, {}, {})
        store.record_run(1.0, "run", "ok", [RunRow("t", "ran", 2.0, "never built")])
    with sqlite3.connect(state / "state.db") as conn:  # as schema 4 left it
        conn.execute("DROP INDEX run_targets_target")
        conn.execute("DROP INDEX manifests_key")
        conn.execute("ALTER TABLE manifests DROP COLUMN sig")
        conn.execute("ALTER TABLE manifests DROP COLUMN key")
        conn.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    with open_store(state, warned) as store:
        stored = store.load_manifest("t")
        assert stored is not None and stored.data == '{"version": 2}' and stored.sig is None
        assert store.load_stats().files == {"in.txt": ENTRY}
        assert [run.targets for run in store.load_runs(5)] == [
            (RunRow("t", "ran", 2.0, "never built"),)
        ]
        store.save_signatures([("t", b"sig")])
        assert store.load_manifests()["t"].sig == b"sig"
        assert store.load_manifest_keys() == {"t": None}
        store.save_manifest_keys([("t", '{"version": 2}', "k2")])
        store.save_manifest_keys([("t", '{"version": 1}', "k1")])  # not the data it holds
        assert store.load_manifest_keys() == {"t": "k2"}
        store.record("t", '{"version": 2}', 3.0, {}, {})  # a new manifest: no signature yet
        assert store.load_manifests()["t"].sig is None
        assert store.load_manifest_keys() == {"t": None}  # nor a key
    assert warned == [] and backups(state) == []
    with sqlite3.connect(state / "state.db") as conn:
        assert conn.execute("SELECT value FROM meta").fetchone() == (SCHEMA_VERSION,)
        assert conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'run_targets'"
            " AND name = 'run_targets_target'"
        ).fetchone()


def test_version_6_is_upgraded_keeping_the_history_and_listing_proven_targets_apart(
    state: Path, warned: Warnings
) -> None:
    with open_store(state, warned) as store:
        store.record_run(1.0, "run", "ok", [RunRow("t", "ran", 2.0, "never built")])
    with sqlite3.connect(state / "state.db") as conn:  # as schema 6 left it
        conn.execute("DROP TABLE name_sets")
        conn.execute("DROP INDEX manifests_key")
        conn.execute("ALTER TABLE runs DROP COLUMN proven")
        conn.execute("DROP TABLE experiment_bases")
        conn.execute("UPDATE meta SET value = '6' WHERE key = 'schema_version'")
    with open_store(state, warned) as store:
        assert [run.targets for run in store.load_runs(5)] == [
            (RunRow("t", "ran", 2.0, "never built"),)
        ]
        store.save_experiment(StoredExperiment("a", None, 1.0, 1.0, "{}", '{"t": ["k", true]}'))
        store.save_experiment(
            StoredExperiment("b", None, 2.0, 2.0, "{}", '{"u": ["k", true]}', "a")
        )
        assert [row.targets for row in store.load_experiments()][1] == (
            '{"t": ["k", true], "u": ["k", true]}'
        )
        store.record_run(2.0, "run", "ok", [RunRow("u", "ran", 1.0, "")], ["t"])
        assert store.load_runs(1)[0].targets == (
            RunRow("t", "skipped", 0.0, ""),
            RunRow("u", "ran", 1.0, ""),
        )
    assert warned == [] and backups(state) == []
    with sqlite3.connect(state / "state.db") as conn:
        assert conn.execute("SELECT value FROM meta").fetchone() == (SCHEMA_VERSION,)
        for columns in ("target, key", "target, duration"):  # read without the manifests' pages
            plan = conn.execute(f"EXPLAIN QUERY PLAN SELECT {columns} FROM manifests").fetchall()
            assert "COVERING INDEX manifests_key" in str(plan), plan


def test_targets_proven_in_a_run_read_back_as_skipped_rows_and_are_kept_once(
    store: Store, state: Path
) -> None:
    """A run's stamp-proven targets are one list (not a row each); every reader sees rows."""
    names = [f"t{i}" for i in range(3)]
    store.record_run(1.0, "run", "ok", [RunRow(n, "ran", 1.0, "never built") for n in names])
    store.record_run(2.0, "run", "ok", [RunRow("t2", "ran", 0.5, "input changed")], names[:2])
    store.record_run(3.0, "run", "ok", [RunRow("t2", "failed", 0.5, "input changed")], names[:2])
    store.record_run(4.0, "run", "ok", [RunRow("t0", "cleaned", 0.0, "")])
    (_, third, second) = store.load_runs(3)
    assert second.targets == (
        RunRow("t0", "skipped", 0.0, ""),
        RunRow("t1", "skipped", 0.0, ""),
        RunRow("t2", "ran", 0.5, "input changed"),
    )
    assert [r.status for r in third.targets] == ["skipped", "skipped", "failed"]
    assert [(r.run_id, r.status) for r in store.load_target_runs("t0", 5)] == [
        (4, "cleaned"),
        (3, "skipped"),
        (2, "skipped"),
        (1, "ran"),
    ]
    assert [r.run_id for r in store.load_target_runs("t0", 2)] == [4, 3]
    assert [r.run_id for r in store.load_target_runs("t1", 1, ("skipped",))] == [3]
    assert [r.run_id for r in store.load_target_runs("t1", 5, ("ran", "restored"))] == [1]
    statuses = store.last_statuses(("ran", "skipped", "failed", "cleaned"))
    assert statuses == {"t0": "cleaned", "t1": "skipped", "t2": "failed"}
    assert store.last_statuses(("ran",)) == dict.fromkeys(names, "ran")
    assert store.known_targets() == set(names)
    with sqlite3.connect(state / "state.db") as conn:
        assert conn.execute("SELECT count(*) FROM name_sets").fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM run_targets WHERE run_id = 2").fetchone() == (1,)


def test_a_row_kept_as_a_difference_reads_whole_and_a_lost_base_costs_its_line(
    store: Store, state: Path
) -> None:
    whole = '{"a": ["k1", true], "b": ["k2", false], "c": ["k3", true]}'
    store.save_experiment(StoredExperiment("w", "base", 1.0, 1.0, "{}", whole))
    store.save_experiment(
        StoredExperiment("d", None, 2.0, 2.0, '{"p": 1}', '{"b": ["k9", false], "c": null}', "w")
    )
    store.save_experiment(StoredExperiment("x", None, 3.0, 3.0, "{}", '{"a": null}', "gone"))
    rows = store.load_experiments()
    assert [(r.id, r.name, r.params, r.base) for r in rows] == [
        ("w", "base", "{}", None),
        ("d", None, '{"p": 1}', None),
        ("x", None, "{}", None),
    ]
    assert rows[0].targets == whole
    assert rows[1].targets == '{"a": ["k1", true], "b": ["k9", false]}'
    assert rows[2].targets == ""  # its base is not there: read as a damaged row
    assert store.experiment_base("w") == ("w", "{}")
    assert store.experiment_base("d") == ("w", '{"b": ["k9", false], "c": null}')
    assert store.experiment_base("nope") is None
    # Built again (its whole text given, a name with it): kept as it was, marked built.
    store.save_experiment(StoredExperiment("d", "again", 2.0, 9.0, '{"p": 1}', rows[1].targets))
    again = store.load_experiments()[1]
    assert (again.name, again.built, again.targets) == ("again", 9.0, rows[1].targets)
    assert store.experiment_base("d") == ("w", '{"b": ["k9", false], "c": null}')


def test_a_damaged_list_of_proven_targets_reads_as_none(store: Store, state: Path) -> None:
    store.record_run(1.0, "run", "ok", [RunRow("u", "ran", 1.0, "")], ["t"])
    with sqlite3.connect(state / "state.db") as conn:
        conn.execute("UPDATE name_sets SET names = x'0102'")
    reopened = open_store(state, lambda line: None)
    with reopened:
        assert reopened.load_runs(1)[0].targets == (RunRow("u", "ran", 1.0, ""),)
        assert reopened.load_target_runs("t", 5) == []


def test_the_run_that_built_a_target_is_found_among_later_no_ops(store: Store, state: Path) -> None:
    store.record_run(1.0, "run", "ok", [RunRow("t", "ran", 2.0, "never built")])
    for n in range(50):
        store.record_run(2.0 + n, "run", "ok", [RunRow("t", "skipped", 0.0, "")])
    (built,) = store.load_target_runs("t", 1, ("ran", "restored"))
    assert (built.run_id, built.status, built.reason) == (1, "ran", "never built")
    assert [r.status for r in store.load_target_runs("t", 2)] == ["skipped", "skipped"]
    with sqlite3.connect(state / "state.db") as conn:
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT r.id FROM run_targets t JOIN runs r ON r.id = t.run_id"
            " WHERE t.target = ? AND t.status IN ('ran') AND t.status != 'skipped'"
            " ORDER BY t.run_id DESC LIMIT 1",
            ("t",),
        ).fetchall()
    assert "run_targets_target" in str(plan)  # `show` reads by index, not the whole history


@pytest.mark.parametrize("version", ["1", "999", None])
def test_an_unknown_schema_is_moved_aside_never_deleted(
    state: Path, warned: Warnings, version: str | None
) -> None:
    state.mkdir()
    with sqlite3.connect(state / "state.db") as conn:
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("CREATE TABLE mine (x)")
        if version is not None:
            conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (version,))
    with open_store(state, warned) as store:
        assert store.load_manifests() == {}
    (backup,) = backups(state)
    with sqlite3.connect(state / backup) as conn:
        assert conn.execute("SELECT count(*) FROM mine").fetchone() == (0,)
    (line,) = warned
    assert f"was moved to {backup}" in line and "schema version" in line


# --- corruption --------------------------------------------------------------------------------


def test_a_database_that_is_not_one_is_moved_aside(state: Path, warned: Warnings) -> None:
    state.mkdir()
    (state / "state.db").write_bytes(b"not a database at all" * 200)
    with open_store(state, warned) as store:
        fill(store, 2)
    assert len(backups(state)) == 1 and len(warned) == 1
    assert (state / backups(state)[0]).read_bytes() == b"not a database at all" * 200


def test_corruption_found_by_a_later_query_starts_over_once(state: Path, warned: Warnings) -> None:
    with open_store(state, warned) as store:
        fill(store, 200)
    corrupt_middle(state / "state.db")
    with open_store(state, warned) as store:  # the header and schema are intact
        assert warned == []
        stats = store.load_stats()  # this query meets the damaged pages
        assert stats.files == {}
        assert len(warned) == 1 and "is corrupt" in warned[0]
        store.record("t", "{}", 1.0, {"f": ENTRY}, {})
        assert store.load_manifests().keys() == {"t"}
        assert store.load_stats().files == {"f": ENTRY}
    with open_store(state, warned) as store:
        assert store.load_manifests().keys() == {"t"}
    assert len(warned) == 1
    assert len(backups(state)) == 1


def test_two_backups_in_the_same_second_keep_both(
    state: Path, warned: Warnings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pinned clock: the backups are made within one second, as two quick runs can.
    monkeypatch.setattr(time, "strftime", lambda fmt: "20260101-000000")
    state.mkdir()
    for n in range(3):
        (state / "state.db").write_bytes(b"garbage %d " % n * 300)
        open_store(state, warned).close()
    assert backups(state) == [
        "state.db.bad-20260101-000000",
        "state.db.bad-20260101-000000-1",
        "state.db.bad-20260101-000000-2",
    ]
    contents = {(state / name).read_bytes()[:10] for name in backups(state)}
    assert contents == {b"garbage 0 ", b"garbage 1 ", b"garbage 2 "}


def test_a_damaged_directory_record_reads_as_absent(store: Store, state: Path) -> None:
    listing = (("a.txt", "file:" + "1" * 64),)
    record = DirStat("s" * 64, "2" * 64, listing, {"a.txt": ENTRY})
    store.save_stats({"data": record})
    loaded = store.load_dir("data")
    assert loaded is not None
    assert (loaded.summary, loaded.digest, loaded.listing) == record[:3]
    assert dict(loaded.files) == {"a.txt": ENTRY}
    with sqlite3.connect(state / "state.db") as conn:
        (blob,) = conn.execute("SELECT listing FROM dirs").fetchone()
        damaged = blob[:-3] + b"zzz"
        conn.execute("UPDATE dirs SET listing = ?, files = ?", (damaged, damaged))
    assert store.load_dir("data") is None


def test_a_directory_record_replaces_the_file_rows_below_it(store: Store) -> None:
    store.save_stats({"data/a.txt": ENTRY, "data/b/c.txt": ENTRY, "data.txt": ENTRY, "d": ENTRY})
    store.save_stats({"data": DirStat("", "0" * 64, (), {})})
    assert set(store.load_stats().files) == {"data.txt", "d"}


def test_a_manifest_that_is_not_a_json_object_is_no_manifest(store: Store) -> None:
    store.record("t", "{broken", 1.0, {}, {})
    store.record("u", "[1]", 1.0, {}, {})
    assert store.load_manifest("t") is None
    assert store.load_manifest("u") is None


# --- errors that starting over would not fix ---------------------------------------------------


def test_a_state_dir_that_is_a_file_is_a_state_error(state: Path, warned: Warnings) -> None:
    state.write_text("mine\n")
    with pytest.raises(StateError, match="exists but is not a directory"):
        open_store(state, warned)
    assert state.read_text() == "mine\n"


def test_a_locked_database_is_a_state_error_not_a_rebuild(state: Path, warned: Warnings) -> None:
    with open_store(state, warned) as store:
        store.conn.execute("PRAGMA busy_timeout = 50")
        other = sqlite3.connect(state / "state.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(StateError, match="locked by another process"):
                store.save_stats({"f": ENTRY})
        finally:
            other.execute("ROLLBACK")
            other.close()
    assert backups(state) == [] and warned == []


# --- transactions ------------------------------------------------------------------------------


class Exploding(dict[str, list[tuple[str, str]]]):
    """Trees whose listing fails to encode, after the stats were written in the transaction."""

    def items(self) -> Iterator[tuple[str, list[tuple[str, str]]]]:  # type: ignore[override]
        yield "dir:x", [("a", "file:b")]
        raise RuntimeError("boom")


def test_record_is_all_or_nothing(store: Store) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        store.record("t", '{"version": 1}', 1.0, {"in.txt": ENTRY}, Exploding())
    assert store.load_manifests() == {}
    assert store.load_stats().files == {}
    assert store.load_tree("dir:x") is None
    store.record("t", '{"version": 1}', 1.0, {"in.txt": ENTRY}, {"dir:x": [("a", "file:b")]})
    assert set(store.load_manifests()) == {"t"}
    assert store.load_stats().files == {"in.txt": ENTRY}
    assert store.load_tree("dir:x") == [("a", "file:b")]


def test_a_new_connection_sees_only_committed_records(store: Store, state: Path) -> None:
    store.record("t", "{}", 1.0, {}, {})
    with sqlite3.connect(state / "state.db") as conn:
        assert conn.execute("SELECT target FROM manifests").fetchall() == [("t",)]
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_durations_read_after_the_manifests_follow_every_write(store: Store) -> None:
    store.record("a", '{"version": 2}', 2.0, {}, {})
    store.record("b", '{"version": 2}', 3.0, {}, {})
    assert set(store.load_manifests()) == {"a", "b"}
    assert store.load_durations() == {"a": 2.0, "b": 3.0}  # from the rows just read
    store.record("a", '{"version": 2}', 5.0, {}, {})
    assert store.load_durations() == {"a": 5.0, "b": 3.0}
    store.load_manifests()
    store.forget(["b"])
    assert store.load_durations() == {"a": 5.0}


def test_durations_read_with_the_keys_follow_every_write(store: Store) -> None:
    store.record("a", '{"version": 2}', 2.0, {}, {})
    assert store.load_manifest_keys() == {"a": None}
    assert store.load_durations() == {"a": 2.0}
    store.record("a", '{"version": 3}', 5.0, {}, {})
    store.record("b", '{"version": 3}', 1.0, {}, {})
    assert store.load_durations() == {"a": 5.0, "b": 1.0}
    store.load_manifest_keys()
    store.forget(["a"])
    assert store.load_durations() == {"b": 1.0}


def test_the_manifests_of_some_targets_are_theirs_in_any_number(store: Store) -> None:
    """A watch cycle's build reads only its targets' rows; more than one query's worth too."""
    records = [Record(f"t{i}", f'{{"version": {i}}}', float(i), {}, {}, 0.0) for i in range(1300)]
    store.record_many(records)
    everything = store.load_manifests()
    some = [f"t{i}" for i in range(0, 1300, 2)] + ["never-built"]
    assert store.load_manifests_of(some) == {n: everything[n] for n in some[:-1]}
    assert store.load_manifests_of([]) == {}
    store.record("t0", '{"version": 9}', 9.0, {}, {})
    store.load_manifests_of(["t0"])  # not all of them: the durations are read afresh
    assert store.load_durations()["t0"] == 9.0 and len(store.load_durations()) == 1300
