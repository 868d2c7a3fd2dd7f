"""The on-disk state in `.mlbuild/state.db`: stat cache, manifests, directory listings, history.

Format (SQLite, WAL journal, `synchronous=NORMAL`: a crash of mlbuild or of the
machine loses at most the last transactions, never the database):

- `meta(key, value)`: `schema_version` = SCHEMA_VERSION.
- `stats(path, size, mtime_ns, ctime_ns, ino, checked_ns, digest)`: the stat
  cache of files fingerprinted on their own.
- `dirs(path, summary, digest, listing, files)`: the stat cache of directory
  trees, one row per directory (see fingerprint.py's `DirStat`). `listing` is
  the directory's listing and `files` its per-file stat entries (path below
  the directory -> size, mtime_ns, ino, checked_ns, digest, ctime_ns), each
  a `marshal` (format 2) blob behind a 16-byte BLAKE3 checksum of it, so that a
  damaged blob reads as absent and costs a re-hash, never a wrong digest.
  `files` is read only when a directory's summary changed. Writing a row
  drops the `stats` rows below that directory (a cache restore learns them).
- `manifests(target, data, finished_at, duration, sig, key)`: one row per target,
  `data` is the JSON of its last successful build (opaque here; see staleness.py),
  `sig` its stat signature or NULL (opaque here; see signature.py): what lets a
  no-op call it fresh from the stat of its files alone. `key` is the cache key
  `data` stands for, or NULL until experiments.py first needs it (parsing 10,000
  manifests to name a configuration cost more than the build of one changed
  target); writing a manifest replaces the row, so a key never outlives its data.
  `manifests_key` covers (target, key, duration): what experiments.py and the
  summary read of every row, without the pages of `data` and `sig`.
- `parsed(raw, data)`: what code.py learned from a Python file with that raw
  digest (its AST digest and imports), so unchanged files are never parsed again.
- `trees(digest, listing)`: zlib-compressed listings of input/output directories,
  so that a reason can name the entries that changed.
- `runs` and `run_targets`: history, one row per run and per target in it;
  `run_targets_target` indexes the latter by target, skipped rows left out (a
  no-op adds one per target, and indexing them doubled its insert cost): what
  `show` asks, the run that last built a target, is found at once. The targets
  a run skipped without a look (the up-to-date stamp proved them: no time, no
  reason) have no row each: `runs.proven` names their list in `name_sets(digest,
  names)` (the BLAKE3 of the names, zlib of a checksummed `marshal` tuple; one
  changed input of 10,000 targets wrote 10,000 rows, and the same list is kept
  once however many runs share it). Read back, each is a `skipped` row with no
  time and no reason, listed before the run's own rows.
- `experiments(id, name, created, built, params, targets)`: one row per
  configuration built to success (experiments.py owns its meaning): `params`
  the JSON of its parameter values, `targets` the JSON of target -> [cache
  key, cacheable], or, for a row in `experiment_bases(id, base)`, only the
  entries that differ from those of row `base` (a whole row): one changed input
  among 10,000 targets adds a few hundred bytes, not a megabyte. (Apart, not a
  column: a column after `targets` is read through its overflow pages.)
  `metrics(key, target, data)`: the numbers read from a target's metrics files,
  by the cache key of the run that wrote them.

A manifest and the stat entries it relies on are written in one transaction,
only after the target succeeded. A database that is corrupt (found when it is
opened or by any later query) or of an unknown schema version is moved aside
under a name no other backup has (never deleted) and the build starts over
with one warning: a lost state costs a rebuild and the history, never a wrong
result. Version 2 (no ctime, one stats row per file) is upgraded in place by
dropping its stat cache: those files are simply hashed again. Version 3 (no
experiment tables) is upgraded by creating them, version 4 (no `manifests.sig`,
no history index) by adding the column (NULL: those targets are checked the long
way once) and the index, version 6 (no `runs.proven`) by adding that column,
`name_sets`, the index `manifests_key` and `experiment_bases`; nothing else changes. Any other
database error (read-only, locked, disk full) is one `StateError` line
naming the path and what to do.
"""

from __future__ import annotations

import contextlib
import gc
import json
import marshal
import os
import sqlite3
import stat
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Concatenate, NamedTuple, ParamSpec, TypeVar

import blake3

from mlbuild.errors import StateError
from mlbuild.fingerprint import DirStat, LazyStats, StatCache, StatEntry
from mlbuild.pipeline.schema import display_path

SCHEMA_VERSION = "7"
UPGRADABLE = {"2"}  # schema versions opened by dropping their stat cache
# Schema versions opened by creating the tables, columns and indexes they lack.
ADDITIVE = {"3", "4", "5", "6"}
DB_NAME = "state.db"
WarnFn = Callable[[str], None]

# SQLite primary result codes (extended codes carry these in their low byte).
_SQLITE_PERM = 3
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_READONLY = 8
_SQLITE_IOERR = 10
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_CANTOPEN = 14
_SQLITE_AUTH = 23
_SQLITE_NOTADB = 26
_CORRUPT = {_SQLITE_CORRUPT, _SQLITE_NOTADB}

# A NamedTuple from a row's columns without running its Python `__new__` (rows by the
# ten thousand are read on every no-op): the columns are the fields, in order.
_make = tuple.__new__
_IN_CHUNK = 500  # names per `IN (...)` query, below SQLite's oldest limit of 999 variables

_BLOB_MARSHAL = 2
_CHECKSUM = 16
SKIPPED = "skipped"  # the history's status of a target decided fresh (results.Outcome's value)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS stats (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL, ino INTEGER NOT NULL, checked_ns INTEGER NOT NULL,
    digest TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dirs (
    path TEXT PRIMARY KEY, summary TEXT NOT NULL, digest TEXT NOT NULL,
    listing BLOB NOT NULL, files BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS manifests (
    target TEXT PRIMARY KEY, data TEXT NOT NULL, finished_at REAL NOT NULL, duration REAL NOT NULL,
    sig BLOB, key TEXT
);
-- Covers `load_manifest_keys` and `load_durations`: scanning the table itself reads every
-- manifest's JSON and signature pages (ten times the bytes) for these two columns.
CREATE INDEX IF NOT EXISTS manifests_key ON manifests (target, key, duration);
CREATE TABLE IF NOT EXISTS parsed (raw TEXT PRIMARY KEY, data TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS trees (digest TEXT PRIMARY KEY, listing BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY, started_at REAL NOT NULL, finished_at REAL NOT NULL,
    command TEXT NOT NULL, status TEXT NOT NULL, proven TEXT
);
CREATE TABLE IF NOT EXISTS name_sets (digest TEXT PRIMARY KEY, names BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS run_targets (
    run_id INTEGER NOT NULL, target TEXT NOT NULL, status TEXT NOT NULL,
    duration REAL NOT NULL, reason TEXT NOT NULL, PRIMARY KEY (run_id, target)
);
CREATE INDEX IF NOT EXISTS run_targets_target ON run_targets (target, run_id)
    WHERE status != 'skipped';
CREATE TABLE IF NOT EXISTS experiments (
    id TEXT PRIMARY KEY, name TEXT, created REAL NOT NULL, built REAL NOT NULL,
    params TEXT NOT NULL, targets TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS experiment_bases (id TEXT PRIMARY KEY, base TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS metrics (
    key TEXT PRIMARY KEY, target TEXT NOT NULL, data TEXT NOT NULL
) WITHOUT ROWID;
"""

P = ParamSpec("P")
R = TypeVar("R")


class StoredManifest(NamedTuple):
    """A manifest row: the opaque JSON plus when the target finished and how long it took,
    and its stat signature (signature.py) if one was written."""

    data: str
    finished_at: float
    duration: float
    sig: bytes | None = None


class Record(NamedTuple):
    """A manifest to write: a target's fingerprint JSON with the stats and listings behind it."""

    target: str
    data: str
    duration: float
    stats: Mapping[str, StatEntry | DirStat]
    trees: Mapping[str, Iterable[tuple[str, str]]]
    finished_at: float
    key: str | None = None  # its cache key when the build knows it (None: found when needed)


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


class StoredExperiment(NamedTuple):
    """An `experiments` row; `params` and `targets` are JSON (see experiments.py). With a
    `base`, `targets` holds only the entries that differ from that row's (a target
    absent here but there: null); `load_experiments` gives every row whole."""

    id: str
    name: str | None
    created: float
    built: float
    params: str
    targets: str
    base: str | None = None


class TargetRun(NamedTuple):
    """One target's outcome in one run, with when that run started."""

    run_id: int
    started_at: float
    status: str
    duration: float
    reason: str


def _guarded(method: Callable[Concatenate[Store, P], R]) -> Callable[Concatenate[Store, P], R]:
    """Run a Store method; if the database turns out corrupt, start over and run it again.

    Corruption inside the file (a bad page) is only found by the query that
    reads it, so every public method is guarded, not just the open. Any other
    database error becomes one StateError line.
    """

    def run(self: Store, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            self._recover(exc)
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            raise state_error(self.path, exc) from None

    run.__name__, run.__doc__ = method.__name__, method.__doc__
    return run


class _DirFiles(Mapping[str, StatEntry]):
    """A directory's per-file stat entries, read from the database on first use."""

    def __init__(self, load: Callable[[], dict[str, tuple[Any, ...]]]) -> None:
        self._load = load
        self._raw: dict[str, tuple[Any, ...]] | None = None

    def _data(self) -> dict[str, tuple[Any, ...]]:
        if self._raw is None:
            self._raw = self._load()
        return self._raw

    def __getitem__(self, name: str) -> StatEntry:
        return StatEntry._make(self._data()[name])

    def get(self, name: str, default: Any = None) -> Any:
        raw = self._data().get(name)
        return StatEntry._make(raw) if raw is not None else default

    def __iter__(self) -> Iterator[str]:
        return iter(self._data())

    def __len__(self) -> int:
        return len(self._data())


class Store:
    """An open state database. Use `open_store`; close with `close` (or a `with` block)."""

    def __init__(self, path: Path, conn: sqlite3.Connection, warn: WarnFn) -> None:
        self.path = path
        self.conn = conn
        self.warn = warn
        # The rows `load_manifests` returned, while nothing was written since: what
        # `load_durations` reads instead of scanning the table again (a no-op's summary).
        self._read: dict[str, StoredManifest] | None = None
        self._durations: dict[str, float] | None = None  # the same, of `load_manifest_keys`
        self._name_sets: dict[str, tuple[str, ...]] = {}  # `name_sets` rows read (immutable)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.conn.close()

    def check_writable(self) -> None:
        """Fail now, before any step runs, if the state cannot be written.

        `access` rather than a trial write: a write transaction on every no-op
        cost a checkpoint at close (~5 ms). It answers for the real user and
        for read-only filesystems (EROFS), which is what a write would meet.
        """
        for path in (self.path, self.path.parent):
            if not os.access(path, os.W_OK):
                folder = display_path(self.path.parent)
                raise StateError(
                    f"cannot write the state database {display_path(self.path)}"
                    f" ({display_path(path)} is not writable); make {folder} and the files in"
                    f" it writable by this user (chmod -R u+w {folder}), or run mlbuild as"
                    " their owner"
                )

    @_guarded
    def load_stats(self) -> StatCache:
        """File entries now; a directory's record when the fingerprinter asks for it."""
        rows = self.conn.execute(
            "SELECT path, size, mtime_ns, ino, checked_ns, digest, ctime_ns FROM stats"
        )
        with _no_collection():
            return StatCache({row[0]: _make(StatEntry, row[1:]) for row in rows}, self.load_dir)

    def lazy_stats(self) -> StatCache:
        """As `load_stats`, with file entries read as they are asked for (`LazyStats`)."""
        return StatCache(LazyStats(self.load_stat, self._file_stats), self.load_dir)

    @_guarded
    def load_stat(self, path: str) -> StatEntry | None:
        """One file's entry in the stat cache, if it has one."""
        row = self.conn.execute(
            "SELECT size, mtime_ns, ino, checked_ns, digest, ctime_ns FROM stats WHERE path = ?",
            (path,),
        ).fetchone()
        return None if row is None else _make(StatEntry, row)

    def _file_stats(self) -> Mapping[str, StatEntry]:
        return self.load_stats().files

    @_guarded
    def load_dir(self, path: str) -> DirStat | None:
        """A directory's recorded summary, digest and listing (its files read lazily)."""
        row = self.conn.execute(
            "SELECT summary, digest, listing FROM dirs WHERE path = ?", (path,)
        ).fetchone()
        if row is None:
            return None
        listing = _unpack(row[2])
        if not isinstance(listing, tuple):
            return None
        return DirStat(row[0], row[1], listing, _DirFiles(lambda: self._load_dir_files(path)))

    @_guarded
    def _load_dir_files(self, path: str) -> dict[str, tuple[Any, ...]]:
        row = self.conn.execute("SELECT files FROM dirs WHERE path = ?", (path,)).fetchone()
        files = _unpack(row[0]) if row is not None else None
        return files if isinstance(files, dict) else {}

    @_guarded
    def load_manifests(self) -> dict[str, StoredManifest]:
        """Every manifest row; its text is checked where it is parsed (Fingerprint.from_json)."""
        rows = self.conn.execute("SELECT target, data, finished_at, duration, sig FROM manifests")
        with _no_collection():
            loaded = {row[0]: _make(StoredManifest, row[1:]) for row in rows}
        self._read = loaded
        return loaded

    @_guarded
    def load_manifests_of(self, targets: Sequence[str]) -> dict[str, StoredManifest]:
        """The manifest rows of `targets` only, as `load_manifests` gives them.

        A build of a few targets of a large pipeline (a watch cycle) reads those
        rows, not all ten thousand. Not kept for `load_durations`: they are not all.
        """
        loaded: dict[str, StoredManifest] = {}
        for i in range(0, len(targets), _IN_CHUNK):
            chunk = targets[i : i + _IN_CHUNK]
            rows = self.conn.execute(
                "SELECT target, data, finished_at, duration, sig FROM manifests"
                f" WHERE target IN ({','.join('?' * len(chunk))})",
                chunk,
            )
            loaded.update((row[0], _make(StoredManifest, row[1:])) for row in rows)
        return loaded

    @_guarded
    def load_manifest(self, target: str) -> StoredManifest | None:
        """One target's manifest; None when there is none or its text is not a JSON object."""
        row = self.conn.execute(
            "SELECT data, finished_at, duration, sig FROM manifests WHERE target = ?", (target,)
        ).fetchone()
        if row is None:
            return None
        try:
            data = json.loads(row[0])
        except (TypeError, ValueError):
            return None
        return StoredManifest(*row) if isinstance(data, dict) else None

    @_guarded
    def load_durations(self) -> dict[str, float]:
        """How long each built target's step took when it last really ran.

        The manifest's duration is the step's own run time: a restored target's
        manifest holds the duration of the run that produced the cached outputs,
        and a skipped target keeps its manifest, so this is what skipping or
        restoring saved (unlike `run_targets`, where a skip records its check cost).
        """
        if self._read is not None:  # nothing written since they were read
            return {target: row.duration for target, row in self._read.items()}
        if self._durations is not None:
            return dict(self._durations)
        return dict(self.conn.execute("SELECT target, duration FROM manifests"))

    @_guarded
    def load_runs(self, limit: int) -> list[RunRecord]:
        """The last `limit` runs, newest first, each with its targets (those the stamp
        proved first, then the others in the order they were decided)."""
        runs = self.conn.execute(
            "SELECT id, started_at, finished_at, command, status, proven FROM runs"
            " ORDER BY id DESC LIMIT ?",
            (limit,),
        ).fetchall()
        if not runs:
            return []
        rows: dict[int, list[RunRow]] = {run[0]: [] for run in runs}
        for run_id, *_, proven in runs:
            if proven is not None:
                rows[run_id] = [RunRow(n, SKIPPED, 0.0, "") for n in self._name_set(proven)]
        for run_id, target, status, duration, reason in self.conn.execute(
            "SELECT run_id, target, status, duration, reason FROM run_targets"
            " WHERE run_id >= ? ORDER BY run_id, rowid",
            (runs[-1][0],),
        ):
            if run_id in rows:
                rows[run_id].append(RunRow(target, status, duration, reason))
        return [
            RunRecord(run_id, started, finished, command, status, tuple(rows[run_id]))
            for run_id, started, finished, command, status, _ in runs
        ]

    @_guarded
    def load_target_runs(
        self, target: str, limit: int, statuses: Iterable[str] | None = None
    ) -> list[TargetRun]:
        """The last `limit` runs that decided `target` (with one of `statuses`), newest first."""
        wanted = list(statuses) if statuses is not None else []
        only = f" AND t.status IN ({', '.join('?' * len(wanted))})" if wanted else ""
        # Without skipped rows asked for, the partial index run_targets_target (target,
        # run_id) yields the newest rows first: the query stops at `limit`. With them,
        # runs are walked from the newest, each looked up by the primary key.
        order = "t.run_id"
        skipped = not wanted or SKIPPED in wanted
        if not skipped:
            only += " AND t.status != 'skipped'"  # the index's own condition, word for word
        else:
            order = "r.id"
        rows = self.conn.execute(
            "SELECT r.id, r.started_at, t.status, t.duration, t.reason"
            " FROM run_targets t JOIN runs r ON r.id = t.run_id"
            f" WHERE t.target = ?{only} ORDER BY {order} DESC LIMIT ?",
            (target, *wanted, limit),
        )
        found = [TargetRun(*row) for row in rows]
        if not skipped:
            return found
        proven: list[TargetRun] = []
        for run_id, started_at, digest in self.conn.execute(
            "SELECT id, started_at, proven FROM runs WHERE proven IS NOT NULL ORDER BY id DESC"
        ):
            if len(proven) == limit or (len(found) == limit and run_id < found[-1].run_id):
                break
            if target in self._name_set(digest):
                proven.append(TargetRun(run_id, started_at, SKIPPED, 0.0, ""))
        return sorted(found + proven, key=lambda row: -row.run_id)[:limit]

    @_guarded
    def last_statuses(self, statuses: Iterable[str]) -> dict[str, str]:
        """Each target's status in the last run that gave it one of `statuses` (one scan)."""
        wanted = list(statuses)
        # SQLite takes a bare column of a MAX() aggregate from the row holding the maximum.
        rows = self.conn.execute(
            "SELECT target, status, MAX(run_id) FROM run_targets"
            f" WHERE status IN ({', '.join('?' * len(wanted))}) GROUP BY target",
            wanted,
        )
        last = {target: (run_id, status) for target, status, run_id in rows}
        if SKIPPED in wanted:  # and the lists of proven targets: each list's latest run
            for digest, run_id in self.conn.execute(
                "SELECT proven, MAX(id) FROM runs WHERE proven IS NOT NULL GROUP BY proven"
            ):
                for name in self._name_set(digest):
                    if last.get(name, (0,))[0] < run_id:
                        last[name] = (run_id, SKIPPED)
        return {target: status for target, (_, status) in last.items()}

    @_guarded
    def known_targets(self) -> set[str]:
        """Every target name the state has a manifest or any history for."""
        rows = self.conn.execute(
            "SELECT target FROM manifests UNION SELECT DISTINCT target FROM run_targets"
        )
        known = {row[0] for row in rows}
        for (digest,) in self.conn.execute(
            "SELECT DISTINCT proven FROM runs WHERE proven IS NOT NULL"
        ):
            known.update(self._name_set(digest))
        return known

    def _name_set(self, digest: str) -> tuple[str, ...]:
        """The names `runs.proven` refers to, in their order (a damaged list: none)."""
        names = self._name_sets.get(digest)
        if names is None:
            row = self.conn.execute(
                "SELECT names FROM name_sets WHERE digest = ?", (digest,)
            ).fetchone()
            try:
                value = _unpack(zlib.decompress(row[0])) if row is not None else None
            except zlib.error:
                value = None
            names = ()
            if isinstance(value, tuple) and all(isinstance(n, str) for n in value):
                names = value
            self._name_sets[digest] = names
        return names

    @_guarded
    def load_parsed(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT raw, data FROM parsed"))

    @_guarded
    def save_parsed(self, parsed: Mapping[str, str]) -> None:
        if parsed:
            with self._transaction() as conn:
                conn.executemany(
                    "INSERT OR REPLACE INTO parsed (raw, data) VALUES (?, ?)", parsed.items()
                )

    @_guarded
    def load_tree(self, digest: str) -> list[tuple[str, str]] | None:
        row = self.conn.execute("SELECT listing FROM trees WHERE digest = ?", (digest,)).fetchone()
        if row is None:
            return None
        try:
            return [(name, value) for name, value in json.loads(zlib.decompress(row[0]))]
        except (zlib.error, ValueError, TypeError):
            return None  # a damaged listing only costs the detail of a reason

    def record(
        self,
        target: str,
        data: str,
        duration: float,
        stats: Mapping[str, StatEntry | DirStat],
        trees: Mapping[str, Iterable[tuple[str, str]]],
    ) -> None:
        """Write a target's manifest with the stat entries and listings it relies on, atomically."""
        self.record_many([Record(target, data, duration, stats, trees, time.time())])

    @_guarded
    def record_many(self, records: Iterable[Record]) -> None:
        """Write several manifests in one transaction (a first build records in batches):
        all of them, with what each relies on, or none."""
        records = list(records)  # a retry after starting over must see them again
        self._read = self._durations = None
        with self._transaction() as conn:
            for r in records:
                self._put_stats(conn, r.stats)
                for digest, listing in r.trees.items():
                    known = conn.execute("SELECT 1 FROM trees WHERE digest = ?", (digest,))
                    if known.fetchone() is not None:
                        continue  # a large listing is encoded once, not at every record
                    blob = zlib.compress(json.dumps(list(listing)).encode(), 1)
                    conn.execute(
                        "INSERT INTO trees (digest, listing) VALUES (?, ?)", (digest, blob)
                    )
                # No signature yet (NULL): the outputs a step just wrote are racy, so the
                # next no-op checks the long way, re-hashes them and writes one.
                conn.execute(
                    "INSERT OR REPLACE INTO manifests (target, data, finished_at, duration, key)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (r.target, r.data, r.finished_at, r.duration, r.key),
                )

    @_guarded
    def save_signatures(self, sigs: Iterable[tuple[str, bytes]]) -> None:
        """Set the stat signatures of manifests found fresh the long way (target, sig)."""
        rows = [(sig, target) for target, sig in sigs]
        if rows:
            with self._transaction() as conn:
                conn.executemany("UPDATE manifests SET sig = ? WHERE target = ?", rows)

    @_guarded
    def forget(self, targets: Iterable[str]) -> None:
        """Drop manifests, so that these targets are stale (before rerunning or cleaning)."""
        self._read = self._durations = None
        with self._transaction() as conn:
            conn.executemany("DELETE FROM manifests WHERE target = ?", [(t,) for t in targets])

    @_guarded
    def save_stats(self, stats: Mapping[str, StatEntry | DirStat]) -> None:
        if stats:
            with self._transaction() as conn:
                self._put_stats(conn, stats)

    @_guarded
    def record_run(
        self,
        started_at: float,
        command: str,
        status: str,
        rows: Iterable[RunRow],
        proven: Sequence[str] = (),
    ) -> int:
        """Append one run and its per-target outcomes to the history; `proven` are the
        targets skipped with no time and no reason (one list, not a row each)."""
        rows = list(rows)  # a retry after starting over must see them again
        digest = None
        if proven:
            packed = _pack(tuple(proven))
            digest = blake3.blake3(packed).hexdigest()
        with self._transaction() as conn:
            if digest is not None:
                known = conn.execute("SELECT 1 FROM name_sets WHERE digest = ?", (digest,))
                if known.fetchone() is None:
                    conn.execute(
                        "INSERT INTO name_sets (digest, names) VALUES (?, ?)",
                        (digest, zlib.compress(packed, 1)),
                    )
            cursor = conn.execute(
                "INSERT INTO runs (started_at, finished_at, command, status, proven)"
                " VALUES (?, ?, ?, ?, ?)",
                (started_at, time.time(), command, status, digest),
            )
            run_id = cursor.lastrowid
            assert run_id is not None
            conn.executemany(
                "INSERT INTO run_targets (run_id, target, status, duration, reason)"
                " VALUES (?, ?, ?, ?, ?)",
                [(run_id, r.target, r.status, r.duration, r.reason) for r in rows],
            )
            return run_id

    # -- experiments: rows and metrics (their meaning is experiments.py's) ------

    @_guarded
    def load_experiments(self) -> list[StoredExperiment]:
        """Every experiment row, oldest first, whole: a row kept as its difference from
        another (`base`) has that row's entries with its own over them, as the JSON
        `json.dumps(..., sort_keys=True)` writes (a base unreadable: `targets` empty)."""
        rows = [
            StoredExperiment(*row)
            for row in self.conn.execute(
                "SELECT e.id, e.name, e.created, e.built, e.params, e.targets, b.base"
                " FROM experiments e LEFT JOIN experiment_bases b ON b.id = e.id"
                " ORDER BY e.created, e.id"
            )
        ]
        whole = {row.id: row.targets for row in rows if row.base is None}
        parsed: dict[str, Any] = {}  # a base's entries, parsed once for all its differences
        return [row if row.base is None else _whole(row, whole, parsed) for row in rows]

    @_guarded
    def experiment_base(self, row_id: str) -> tuple[str, str] | None:
        """(the row a new row may be kept as a difference from, the entries to carry over
        as JSON) for row `row_id`: itself and "{}" when it is whole, its base and its own
        entries when it is a difference (a difference is never taken from another); None
        when there is no such row."""
        based = self.conn.execute(
            "SELECT b.base, e.targets FROM experiment_bases b JOIN experiments e ON e.id = b.id"
            " WHERE b.id = ?",
            (row_id,),
        ).fetchone()
        if based is not None:
            return based[0], based[1]
        whole = self.conn.execute("SELECT 1 FROM experiments WHERE id = ?", (row_id,))
        return None if whole.fetchone() is None else (row_id, "{}")

    @_guarded
    def load_manifest_keys(self) -> dict[str, str | None]:
        """Target -> the cache key kept beside its manifest (None: not computed yet).

        The durations come in the same scan of `manifests_key`, kept for `load_durations`
        while no manifest is written (a build's summary reads them next)."""
        with _no_collection():
            rows = self.conn.execute("SELECT target, key, duration FROM manifests").fetchall()
            self._durations = {target: duration for target, _, duration in rows}
            keys = {target: key for target, key, _ in rows}
            del rows  # freed while collection is paused: nothing left for it to scan
        return keys

    @_guarded
    def save_manifest_keys(self, keys: Iterable[tuple[str, str, str]]) -> None:
        """Keep (target, data, key): only on the row still holding that very data."""
        rows = [(key, target, data) for target, data, key in keys]
        if rows:
            with self._transaction() as conn:
                conn.executemany("UPDATE manifests SET key = ? WHERE target = ? AND data = ?", rows)

    @_guarded
    def save_experiment(self, row: StoredExperiment) -> bool:
        """Add a row, or mark a known one built again; a name given moves to this row.
        True when the row was added (its text is this one, not an older build's)."""
        with self._transaction() as conn:
            if row.name is not None:
                conn.execute(
                    "UPDATE experiments SET name = NULL WHERE name = ? AND id != ?",
                    (row.name, row.id),
                )
            known = conn.execute("SELECT 1 FROM experiments WHERE id = ?", (row.id,))
            if known.fetchone() is not None:  # built again: as it is kept, whole or not
                conn.execute(
                    "UPDATE experiments SET built = ?, name = coalesce(?, name) WHERE id = ?",
                    (row.built, row.name, row.id),
                )
                return False
            conn.execute(
                "INSERT INTO experiments (id, name, created, built, params, targets)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                row[:6],
            )
            if row.base is not None:
                conn.execute(
                    "INSERT INTO experiment_bases (id, base) VALUES (?, ?)", (row.id, row.base)
                )
            return True

    @_guarded
    def load_metrics(self) -> dict[str, str]:
        """Cache key -> the JSON of the metrics its run wrote."""
        return dict(self.conn.execute("SELECT key, data FROM metrics"))

    @_guarded
    def save_metrics(self, rows: Iterable[tuple[str, str, str]]) -> None:
        """(cache key, target, metrics JSON) rows; a key read again replaces its row."""
        rows = list(rows)  # a retry after starting over must see them again
        if rows:
            with self._transaction() as conn:
                conn.executemany(
                    "INSERT OR REPLACE INTO metrics (key, target, data) VALUES (?, ?, ?)", rows
                )

    @staticmethod
    def _put_stats(conn: sqlite3.Connection, stats: Mapping[str, StatEntry | DirStat]) -> None:
        """File entries first, then directory rows, which drop the file rows below them."""
        conn.executemany(
            "INSERT OR REPLACE INTO stats"
            " (path, size, mtime_ns, ctime_ns, ino, checked_ns, digest)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (p, e.size, e.mtime_ns, e.ctime_ns, e.ino, e.checked_ns, e.digest)
                for p, e in stats.items()
                if isinstance(e, StatEntry)
            ],
        )
        for path, entry in stats.items():
            if isinstance(entry, DirStat):
                # "/" + 1 == "0": the range holds exactly the paths below `path`.
                conn.execute(
                    "DELETE FROM stats WHERE path >= ? AND path < ?", (path + "/", path + "0")
                )
                files = {name: tuple(e) for name, e in entry.files.items()}
                conn.execute(
                    "INSERT OR REPLACE INTO dirs (path, summary, digest, listing, files)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (path, entry.summary, entry.digest, _pack(entry.listing), _pack(files)),
                )

    def _transaction(self) -> _Transaction:
        return _Transaction(self.conn)

    def _recover(self, exc: sqlite3.DatabaseError) -> None:
        """After a failed query: start over if the database is corrupt, else one StateError."""
        if not is_corrupt(exc):
            raise state_error(self.path, exc) from None
        self._read = self._durations = None
        with contextlib.suppress(sqlite3.Error):
            self.conn.close()
        self.conn = _start_over(self.path, f"it is corrupt ({exc})", self.warn)


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
            # A corrupt database may refuse the rollback too; the original error tells.
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")


@contextlib.contextmanager
def _no_collection() -> Iterator[None]:
    """The cyclic garbage collector paused while rows by the hundred thousand become tuples
    (they hold no cycles; scanning them as they pile up made the load grow faster than them)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _pack(value: Any) -> bytes:
    payload = marshal.dumps(value, _BLOB_MARSHAL)
    return blake3.blake3(payload).digest()[:_CHECKSUM] + payload


def _unpack(blob: Any) -> Any:
    """What `_pack` stored, or None when the blob is damaged or unreadable here."""
    if not isinstance(blob, bytes) or len(blob) < _CHECKSUM:
        return None
    payload = blob[_CHECKSUM:]
    if blake3.blake3(payload).digest()[:_CHECKSUM] != blob[:_CHECKSUM]:
        return None
    try:
        return marshal.loads(payload)
    except (EOFError, ValueError, TypeError):
        return None


def _whole(
    row: StoredExperiment, whole: Mapping[str, str], parsed: dict[str, Any]
) -> StoredExperiment:
    """A difference row with its base's entries under its own (store.py's doc)."""
    try:
        base = row.base or ""
        if base not in parsed:
            parsed[base] = json.loads(whole[base])
        targets = dict(parsed[base])
        targets.update(json.loads(row.targets))
        text = json.dumps({t: v for t, v in targets.items() if v is not None}, sort_keys=True)
    except (KeyError, ValueError, TypeError, AttributeError):
        text = ""  # read as a damaged row: it costs only its line
    return row._replace(targets=text, base=None)


def is_corrupt(exc: sqlite3.DatabaseError) -> bool:
    """True for "malformed" and "not a database": only those are moved aside and rebuilt."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return "malformed" in str(exc) or "not a database" in str(exc)
    return code & 0xFF in _CORRUPT


def state_error(path: Path, exc: sqlite3.DatabaseError) -> StateError:
    """One line for a database error that starting over would not fix."""
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    shown = display_path(path)
    if code in (_SQLITE_READONLY, _SQLITE_PERM, _SQLITE_CANTOPEN, _SQLITE_AUTH):
        folder = display_path(path.parent)
        return StateError(
            f"cannot write the state database {shown} ({exc}); make {folder} and the files"
            f" in it writable by this user (chmod -R u+w {folder}), or run mlbuild as their owner"
        )
    if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return StateError(f"{shown} is locked by another process; try again when it is done")
    if code == _SQLITE_FULL:
        return StateError(f"cannot write {shown}: the disk is full; free some space")
    if code == _SQLITE_IOERR:
        return StateError(f"cannot read or write {shown}: {exc}; check the disk")
    return StateError(f"cannot use the state database {shown}: {exc}")


def _dir_error(state_dir: Path, exc: OSError) -> StateError:
    shown = display_path(state_dir)
    if isinstance(exc, FileExistsError | NotADirectoryError):
        return StateError(
            f"{shown} exists but is not a directory; mlbuild keeps its state there:"
            " move or delete that file"
        )
    if isinstance(exc, PermissionError) and not state_dir.is_dir():
        parent = display_path(state_dir.parent)
        folder = "the current directory" if parent == "." else parent
        return StateError(
            f"cannot create {shown}: permission denied; make {folder} writable by this user,"
            " or run mlbuild as its owner"
        )
    if isinstance(exc, PermissionError):
        where = display_path(Path(exc.filename)) if exc.filename else shown
        return StateError(
            f"cannot write {where}: permission denied; make {shown} writable by this user"
            f" (chmod -R u+w {shown}), or run mlbuild as its owner"
        )
    return StateError(f"cannot use {shown}: {exc.strerror or exc}")


def ensure_state_dir(state_dir: Path) -> None:
    """Create the state directory if needed, or say in one line why it cannot be used."""
    try:
        state_dir.mkdir(exist_ok=True)
    except OSError as exc:
        raise _dir_error(state_dir, exc) from None


def open_lock_file(path: Path) -> int:
    """The workspace lock file's descriptor (see lock.py), or one StateError line."""
    ensure_state_dir(path.parent)
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise _dir_error(path.parent, exc) from None


def open_store(state_dir: Path, warn: WarnFn) -> Store:
    """Open (creating if needed) the state database in `state_dir`.

    A corrupt database or one of an unknown schema version is renamed to
    `state.db.bad-<time>` (with a counter if that name is taken) with a
    warning, and a fresh one is created; version 2 is upgraded in place.
    """
    ensure_state_dir(state_dir)
    ignore = state_dir / ".gitignore"
    if not ignore.exists():
        # Keeps mlbuild's state out of git without asking the user to edit anything.
        try:
            ignore.write_text(
                "# created by mlbuild: its state never belongs in version control\n*\n"
            )
        except OSError as exc:
            raise _dir_error(state_dir, exc) from None
    path = state_dir / DB_NAME
    conn: sqlite3.Connection | None = None
    try:
        conn = _connect(path)
        problem = _prepare(conn)
    except sqlite3.DatabaseError as exc:
        if conn is not None:
            conn.close()
        if not is_corrupt(exc):
            raise state_error(path, exc) from None
        problem = f"it is unreadable ({exc})"
    if problem is None:
        assert conn is not None
        return Store(path, conn, warn)
    if conn is not None:
        conn.close()
    return Store(path, _start_over(path, problem, warn), warn)


def open_existing_store(state_dir: Path, warn: WarnFn) -> Store | None:
    """The state database if a build ever created one, else None (creating nothing)."""
    if not (state_dir / DB_NAME).exists():
        return None
    return open_store(state_dir, warn)


def _connect(path: Path) -> sqlite3.Connection:
    new = not os.path.lexists(path)
    conn = sqlite3.connect(path, isolation_level=None, timeout=30.0, check_same_thread=False)
    if new:
        # Turning a new, empty database to WAL goes through a rollback journal, synced
        # three times (6 ms of a first run here). Nothing is in it to lose: a crash
        # meanwhile leaves a file `open_store` moves aside and starts over from.
        conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def _prepare(conn: sqlite3.Connection) -> str | None:
    """Make the database ready at SCHEMA_VERSION; else why it must be moved aside."""
    version = _schema_version(conn)
    if version == SCHEMA_VERSION:
        return None
    if version is None:
        _create(conn)
        return None
    if version in UPGRADABLE or version in ADDITIVE:
        # Older stat entries lack the ctime: dropping them costs one re-hash.
        drop = "DROP TABLE IF EXISTS stats; DROP TABLE IF EXISTS dirs;" * (version in UPGRADABLE)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(manifests)")}
        # Before 5: no stat signature (NULL: checked the long way once, then written).
        add_sig = "ALTER TABLE manifests ADD COLUMN sig BLOB;" * ("sig" not in columns)
        # Before 6: no cache key kept (NULL: computed from `data` when first needed).
        add_key = "ALTER TABLE manifests ADD COLUMN key TEXT;" * ("key" not in columns)
        # Before 7: every skipped target had its row (NULL: none listed apart).
        run_columns = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
        add_proven = "ALTER TABLE runs ADD COLUMN proven TEXT;" * ("proven" not in run_columns)
        conn.executescript(
            f"BEGIN IMMEDIATE; {drop} {add_sig} {add_key} {add_proven}"
            f"{_SCHEMA} INSERT OR REPLACE INTO meta (key, value)"
            f" VALUES ('schema_version', '{SCHEMA_VERSION}'); COMMIT;"
        )
        return None
    return f"it has schema version {version}, this mlbuild reads {SCHEMA_VERSION}"


def _start_over(path: Path, problem: str, warn: WarnFn) -> sqlite3.Connection:
    """Move the database aside under a fresh name, warn once, and open a new one."""
    try:
        aside = move_database_aside(path)
        conn = _connect(path)
        _create(conn)
    except OSError as exc:
        raise StateError(
            f"{display_path(path)} cannot be used because {problem}, and moving it aside"
            f" failed ({exc.strerror or exc}); move it away by hand"
        ) from None
    except sqlite3.DatabaseError as exc:
        raise state_error(path, exc) from None
    warn(
        f"{path} was moved to {aside.name} because {problem}; starting with a fresh state"
        " (targets run again once; the history stays in the moved file)"
    )
    return conn


def move_database_aside(path: Path, sides: tuple[str, ...] = ("-wal", "-shm")) -> Path:
    """Rename a database of mlbuild's (and those of its `sides` files that are regular
    files: SQLite's -wal, -shm) to `<name>.bad-<time>`, a name no earlier backup has."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    n = 0
    while True:
        aside = path.with_name(f"{path.name}.bad-{stamp}" + (f"-{n}" if n else ""))
        n += 1
        if any(os.path.lexists(f"{aside}{suffix}") for suffix in ("", *sides)):
            continue
        try:
            # A hard link claims the name atomically: a backup made at the same
            # moment by another mlbuild is never overwritten.
            os.link(path, aside)
        except FileExistsError:
            continue
        except OSError:
            os.rename(path, aside)  # a filesystem without hard links
        else:
            os.unlink(path)
        break
    for suffix in sides:
        side = f"{path}{suffix}"
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISREG(os.lstat(side).st_mode):  # a link there is not ours to move
                os.replace(side, f"{aside}{suffix}")
    return aside


def _create(conn: sqlite3.Connection) -> None:
    """The tables, in one transaction (each statement its own cost a commit each)."""
    conn.executescript(
        f"BEGIN IMMEDIATE; {_SCHEMA} INSERT OR REPLACE INTO meta (key, value)"
        f" VALUES ('schema_version', '{SCHEMA_VERSION}'); COMMIT;"
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
