"""The on-disk state in `.mlbuild/state.db`: stat cache, manifests, directory listings, history.

Format (SQLite, WAL journal, `synchronous=NORMAL`: a crash of mlbuild or of the
machine loses at most the last transactions, never the database):

- `meta(key, value)`: `schema_version` = SCHEMA_VERSION.
- `stats(path, size, mtime_ns, ino, checked_ns, digest)`: the stat cache.
- `manifests(target, data, finished_at, duration)`: one row per target, `data`
  is the JSON of its last successful build (opaque here; see staleness.py).
- `parsed(raw, data)`: what code.py learned from a Python file with that raw
  digest (its AST digest and imports), so unchanged files are never parsed again.
- `trees(digest, listing)`: zlib-compressed listings of input/output directories,
  so that a reason can name the entries that changed.
- `runs` and `run_targets`: history, one row per run and per target in it.

A manifest and the stat entries it relies on are written in one transaction,
only after the target succeeded. A database that is corrupt or of another
schema version is moved aside (never deleted) and the build starts over: a lost
state costs a rebuild, never a wrong result.
"""

from __future__ import annotations

import json
import sqlite3
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

from mlbuild.errors import StateError
from mlbuild.fingerprint import StatEntry

SCHEMA_VERSION = "2"
DB_NAME = "state.db"
WarnFn = Callable[[str], None]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS stats (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    ino INTEGER NOT NULL, checked_ns INTEGER NOT NULL, digest TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS manifests (
    target TEXT PRIMARY KEY, data TEXT NOT NULL, finished_at REAL NOT NULL, duration REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS parsed (raw TEXT PRIMARY KEY, data TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS trees (digest TEXT PRIMARY KEY, listing BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY, started_at REAL NOT NULL, finished_at REAL NOT NULL,
    command TEXT NOT NULL, status TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS run_targets (
    run_id INTEGER NOT NULL, target TEXT NOT NULL, status TEXT NOT NULL,
    duration REAL NOT NULL, reason TEXT NOT NULL, PRIMARY KEY (run_id, target)
);
"""


class StoredManifest(NamedTuple):
    """A manifest row: the opaque JSON plus when the target finished and how long it took."""

    data: str
    finished_at: float
    duration: float


class RunRow(NamedTuple):
    """One target's outcome in one run, for the history."""

    target: str
    status: str
    duration: float
    reason: str


# History rows are NamedTuples rather than frozen dataclasses: they are read only by
# `mlbuild log` and `show`, and a dataclass costs about a millisecond to define at
# import, on the no-op path of every `mlbuild run`.


class RunRecord(NamedTuple):
    """One run of the history, with its targets' outcomes in the order they were decided."""

    id: int
    started_at: float
    finished_at: float
    command: str
    status: str
    targets: tuple[RunRow, ...]


class TargetRun(NamedTuple):
    """One target's outcome in one run, with when that run started."""

    run_id: int
    started_at: float
    status: str
    duration: float
    reason: str


class Store:
    """An open state database. Use `open_store`; close with `close` (or a `with` block)."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self.conn = conn

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.conn.close()

    def load_stats(self) -> dict[str, StatEntry]:
        rows = self.conn.execute("SELECT path, size, mtime_ns, ino, checked_ns, digest FROM stats")
        return {row[0]: StatEntry(*row[1:]) for row in rows}

    def load_manifests(self) -> dict[str, StoredManifest]:
        rows = self.conn.execute("SELECT target, data, finished_at, duration FROM manifests")
        return {row[0]: StoredManifest(*row[1:]) for row in rows}

    def load_manifest(self, target: str) -> StoredManifest | None:
        row = self.conn.execute(
            "SELECT data, finished_at, duration FROM manifests WHERE target = ?", (target,)
        ).fetchone()
        return StoredManifest(*row) if row is not None else None

    def load_durations(self) -> dict[str, float]:
        """How long each built target's step took when it last really ran.

        The manifest's duration is the step's own run time: a restored target's
        manifest holds the duration of the run that produced the cached outputs,
        and a skipped target keeps its manifest, so this is what skipping or
        restoring saved (unlike `run_targets`, where a skip records its check cost).
        """
        return dict(self.conn.execute("SELECT target, duration FROM manifests"))

    def load_runs(self, limit: int) -> list[RunRecord]:
        """The last `limit` runs, newest first, each with its targets."""
        runs = self.conn.execute(
            "SELECT id, started_at, finished_at, command, status FROM runs"
            " ORDER BY id DESC LIMIT ?",
            (limit,),
        ).fetchall()
        if not runs:
            return []
        rows: dict[int, list[RunRow]] = {run[0]: [] for run in runs}
        for run_id, target, status, duration, reason in self.conn.execute(
            "SELECT run_id, target, status, duration, reason FROM run_targets"
            " WHERE run_id >= ? ORDER BY run_id, rowid",
            (runs[-1][0],),
        ):
            if run_id in rows:
                rows[run_id].append(RunRow(target, status, duration, reason))
        return [
            RunRecord(run_id, started, finished, command, status, tuple(rows[run_id]))
            for run_id, started, finished, command, status in runs
        ]

    def load_target_runs(
        self, target: str, limit: int, statuses: Iterable[str] | None = None
    ) -> list[TargetRun]:
        """The last `limit` runs that decided `target` (with one of `statuses`), newest first."""
        wanted = list(statuses) if statuses is not None else []
        only = f" AND t.status IN ({', '.join('?' * len(wanted))})" if wanted else ""
        rows = self.conn.execute(
            "SELECT r.id, r.started_at, t.status, t.duration, t.reason"
            " FROM run_targets t JOIN runs r ON r.id = t.run_id"
            f" WHERE t.target = ?{only} ORDER BY r.id DESC LIMIT ?",
            (target, *wanted, limit),
        )
        return [TargetRun(*row) for row in rows]

    def known_targets(self) -> set[str]:
        """Every target name the state has a manifest or any history for."""
        rows = self.conn.execute(
            "SELECT target FROM manifests UNION SELECT DISTINCT target FROM run_targets"
        )
        return {row[0] for row in rows}

    def load_parsed(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT raw, data FROM parsed"))

    def save_parsed(self, parsed: Mapping[str, str]) -> None:
        if parsed:
            with self._transaction() as conn:
                conn.executemany(
                    "INSERT OR REPLACE INTO parsed (raw, data) VALUES (?, ?)", parsed.items()
                )

    def load_tree(self, digest: str) -> list[tuple[str, str]] | None:
        row = self.conn.execute("SELECT listing FROM trees WHERE digest = ?", (digest,)).fetchone()
        if row is None:
            return None
        return [(name, value) for name, value in json.loads(zlib.decompress(row[0]))]

    def record(
        self,
        target: str,
        data: str,
        duration: float,
        stats: Mapping[str, StatEntry],
        trees: Mapping[str, Iterable[tuple[str, str]]],
    ) -> None:
        """Write a target's manifest with the stat entries and listings it relies on, atomically."""
        with self._transaction() as conn:
            self._put_stats(conn, stats)
            for digest, listing in trees.items():
                blob = zlib.compress(json.dumps(list(listing)).encode(), 1)
                conn.execute(
                    "INSERT OR IGNORE INTO trees (digest, listing) VALUES (?, ?)", (digest, blob)
                )
            conn.execute(
                "INSERT OR REPLACE INTO manifests (target, data, finished_at, duration)"
                " VALUES (?, ?, ?, ?)",
                (target, data, time.time(), duration),
            )

    def forget(self, targets: Iterable[str]) -> None:
        """Drop manifests, so that these targets are stale (before rerunning or cleaning)."""
        with self._transaction() as conn:
            conn.executemany("DELETE FROM manifests WHERE target = ?", [(t,) for t in targets])

    def save_stats(self, stats: Mapping[str, StatEntry]) -> None:
        if stats:
            with self._transaction() as conn:
                self._put_stats(conn, stats)

    def record_run(
        self, started_at: float, command: str, status: str, rows: Iterable[RunRow]
    ) -> int:
        """Append one run and its per-target outcomes to the history."""
        with self._transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO runs (started_at, finished_at, command, status) VALUES (?, ?, ?, ?)",
                (started_at, time.time(), command, status),
            )
            run_id = cursor.lastrowid
            assert run_id is not None
            conn.executemany(
                "INSERT INTO run_targets (run_id, target, status, duration, reason)"
                " VALUES (?, ?, ?, ?, ?)",
                [(run_id, r.target, r.status, r.duration, r.reason) for r in rows],
            )
            return run_id

    @staticmethod
    def _put_stats(conn: sqlite3.Connection, stats: Mapping[str, StatEntry]) -> None:
        conn.executemany(
            "INSERT OR REPLACE INTO stats (path, size, mtime_ns, ino, checked_ns, digest)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [(p, e.size, e.mtime_ns, e.ino, e.checked_ns, e.digest) for p, e in stats.items()],
        )

    def _transaction(self) -> _Transaction:
        return _Transaction(self.conn)


class _Transaction:
    """`BEGIN IMMEDIATE` ... `COMMIT`, rolled back on any exception."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")


def open_store(state_dir: Path, warn: WarnFn) -> Store:
    """Open (creating if needed) the state database in `state_dir`.

    A corrupt database or one of an unknown schema version is renamed to
    `state.db.bad-<time>` with a warning, and a fresh one is created.
    """
    try:
        state_dir.mkdir(exist_ok=True)
    except OSError as exc:
        raise StateError(f"cannot create {state_dir}: {exc.strerror}") from None
    ignore = state_dir / ".gitignore"
    if not ignore.exists():
        # Keeps mlbuild's state out of git without asking the user to edit anything.
        ignore.write_text("# created by mlbuild: its state never belongs in version control\n*\n")
    path = state_dir / DB_NAME
    problem: str | None = None
    try:
        conn = _connect(path)
        version = _schema_version(conn)
        if version == SCHEMA_VERSION:
            return Store(path, conn)
        if version is None:
            _create(conn)
            return Store(path, conn)
        conn.close()
        problem = f"it has schema version {version}, this mlbuild reads {SCHEMA_VERSION}"
    except sqlite3.DatabaseError as exc:
        problem = f"it is unreadable ({exc})"
    aside = path.with_name(f"{DB_NAME}.bad-{time.strftime('%Y%m%d-%H%M%S')}")
    for suffix in ("", "-wal", "-shm"):
        source = Path(str(path) + suffix)
        if source.exists():
            source.replace(Path(str(aside) + suffix))
    warn(f"{path} was moved to {aside.name} because {problem}; starting with a fresh state")
    conn = _connect(path)
    _create(conn)
    return Store(path, conn)


def open_existing_store(state_dir: Path, warn: WarnFn) -> Store | None:
    """The state database if a build ever created one, else None (creating nothing)."""
    if not (state_dir / DB_NAME).exists():
        return None
    return open_store(state_dir, warn)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=30.0, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def _create(conn: sqlite3.Connection) -> None:
    conn.executescript(_SCHEMA)
    conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
    )


def _schema_version(conn: sqlite3.Connection) -> str | None:
    """The stored schema version, None for an empty database."""
    has_meta = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
    ).fetchone()
    if has_meta is None:
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        return None if tables == 0 else "unknown"
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return str(row[0]) if row else "unknown"
