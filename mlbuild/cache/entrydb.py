"""The cache's entries as rows of one SQLite file, `.mlbuild/cache/entries.db`.

Why not a file per entry (as before, `runs/<k[:2]>/<k[2:]>.json`): creating a
file was the dearest thing a cache save did (0.4-0.5 ms of CPU per entry on
ext4 after mass deletes, where each new inode scans recently freed ones); a
row committed on its own costs ~0.04 ms (writing an entry, its JSON included,
went from ~0.8 to ~0.1 ms of the writer thread's CPU at 2,000 targets). So
every row is its own transaction, committed as soon as it is written: no
batch to lose or to flush.

Format (SQLite, WAL, `synchronous=NORMAL`: a crash loses at most the last
rows, which is a cache miss; `application_id` APPLICATION_ID and
`user_version` FORMAT, both in the file's header):

- `entries(key, target, created, size, data)`: `data` is the JSON (bytes) of
  `entry_payload` for cache key `key` (entry.py); `target`, `created` and
  `size` repeat its fields for a reader of the file. Nothing read back is
  trusted: every read parses `data` whole (`parse_entry`, which also checks
  that it is the entry of `key`), and a row that fails is deleted.

A row is inserted only after every object it names is in place (local.py):
the row is the commit point, as the entry file's rename was.

Whose file it is: the file at that name is mlbuild's only when it is a
regular file (not a symlink, no other hard link) that is empty or whose
SQLite header carries APPLICATION_ID. The header is written before the
journal turns to WAL, so it is in the file itself from the first commit on.
Only such a file, found corrupt (when opened or by any later query) or of
another format, is moved aside (`entries.db.bad-<time>`, never deleted) with
one warning and a new one created. Anything else at that name (a directory,
a symlink, another program's database, bytes that are not a database, a
file mlbuild may not read), and a `-wal`, `-shm` or `-journal` beside it
that is not a regular file of one name (SQLite opens those by name: a
symlink or hard link there would be written through), is left alone: the
cache then has no entries for this process (lookups miss) and every write
raises CacheError, whose one line the build prints as it goes on without
caching. A database locked past the busy timeout or a full disk is the same
CacheError for that write.

Threads: the runner looks entries up on the main thread while its cache
writer thread saves. Each thread gets its own connection (SQLite
connections must not be shared across threads, nor across a fork). The
header is read by an `os.open` of our own only while no connection of this
process has the file open: closing any descriptor of a file drops every
POSIX lock the process holds on it, SQLite's included, and without its
shared lock a connection's WAL can be checkpointed and removed under it by
another mlbuild that takes itself for the last user (rows written after
that were lost). While one is open, the file is the one that was checked
(an open file's inode cannot be reused).
"""

from __future__ import annotations

import contextlib
import enum
import os
import sqlite3
import stat
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from mlbuild.cache.entry import MAX_ENTRY_BYTES, CacheError
from mlbuild.pipeline.schema import display_path
from mlbuild.store import is_corrupt, move_database_aside

DB_NAME = "entries.db"
APPLICATION_ID = 0x6D6C6263  # "mlbc": mlbuild's cache
FORMAT = 1
BUSY_SECONDS = 30.0  # as long as the state database waits for another mlbuild
_MAGIC = b"SQLite format 3\x00"
_SIDE_FILES = ("-wal", "-shm", "-journal")
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_FULL = 13

_SCHEMA = (
    "CREATE TABLE entries (key TEXT PRIMARY KEY, target TEXT NOT NULL, created REAL NOT NULL,"
    " size INTEGER NOT NULL, data BLOB NOT NULL)",
    f"PRAGMA application_id = {APPLICATION_ID}",
    f"PRAGMA user_version = {FORMAT}",
)

WarnFn = Callable[[str], None]
T = TypeVar("T")


class _Connection(sqlite3.Connection):
    """A connection that can be referenced weakly (by `_OPEN`)."""


# The open connections of this process, by (device, inode) of their file, and the lock
# under which connections are opened and headers read (see the module docstring).
_OPEN: dict[tuple[int, int], weakref.WeakSet[_Connection]] = {}
_LOCK = threading.RLock()
# Connections a forked child inherited: kept referenced, never closed by the child (its
# close could checkpoint or remove the WAL under the parent).
_INHERITED: list[_Connection] = []


def _quiet(message: str) -> None:
    """No reporter: never called (such a reader leaves an unusable database alone)."""


class Found(enum.Enum):
    """What is at the database's name, as far as its owner goes."""

    ABSENT = "absent"
    OURS = "ours"  # empty, or a SQLite header carrying APPLICATION_ID
    FOREIGN = "foreign"  # a regular file mlbuild cannot show it wrote


class EntryDB:
    """The `entries` table of `root/entries.db`, one connection per thread."""

    def __init__(self, root: Path, warn: WarnFn | None = None) -> None:
        self.root = root
        self.path = root / DB_NAME
        self.warn = warn or _quiet
        self._local = threading.local()
        self._conns: list[_Connection] = []
        self._generation = 0  # raised when the file is moved aside: every thread reconnects
        self._pid = os.getpid()
        self._problem: str | None = None  # why this process cannot use the file at all

    @property
    def problem(self) -> str | None:
        """Why this process cannot use the file at all, once found (else None)."""
        return self._problem

    # -- reading --------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        """The stored bytes of `key`'s entry, or None. CacheError when the file is unusable.

        A row larger than any entry (a hostile one) is not read into memory: it comes
        back as its first MAX_ENTRY_BYTES + 1 bytes, which `parse_entry` refuses."""
        # substr() counts a BLOB's bytes, but TEXT's characters (up to 4 bytes each).
        limit, text_limit = READ_LIMIT + 1, READ_LIMIT // 4 + 1
        row = self._query(
            f"SELECT CASE typeof(data) WHEN 'text' THEN substr(data, 1, {text_limit})"
            f" WHEN 'blob' THEN substr(data, 1, {limit}) END FROM entries WHERE key = ?",
            (key,),
        )
        if row is None:
            return None
        data = row[0]  # a BLOB as written; TEXT as the sqlite3 shell writes a quoted JSON
        if isinstance(data, str):
            return data.encode()
        return data if isinstance(data, bytes) else b""  # a number or NULL: no entry

    def has(self, key: str) -> bool:
        return self._query("SELECT 1 FROM entries WHERE key = ?", (key,)) is not None

    def keys(self) -> list[str]:
        """Every key with a row, sorted (CacheError when the file is unusable)."""
        return [str(k) for (k,) in self._run(lambda c: c.execute(_KEYS).fetchall(), False) or ()]

    # -- writing --------------------------------------------------------------

    def put(self, key: str, target: str, created: float, size: int, data: bytes) -> None:
        """Insert or replace `key`'s row, committed (CacheError if it cannot be)."""
        values = (key, target, created, size, data)
        self._run(lambda c: c.execute(_PUT, values), True)

    def delete(self, key: str) -> None:
        self._run(lambda c: c.execute("DELETE FROM entries WHERE key = ?", (key,)), False)

    def close(self) -> None:
        """Close every thread's connection (a later call opens new ones)."""
        with _LOCK:
            if self._pid == os.getpid():
                for conn in self._conns:
                    _close(conn)
            self._conns.clear()
            self._generation += 1

    # -- connections ------------------------------------------------------------

    def _query(self, sql: str, args: tuple[str, ...]) -> tuple[Any, ...] | None:
        found: tuple[Any, ...] | None = self._run(lambda c: c.execute(sql, args).fetchone(), False)
        return found

    def _run(self, work: Callable[[_Connection], T], create: bool) -> T | None:
        """`work` on this thread's connection; None when there is no database and
        `create` is false. A corrupt database of ours is moved aside and `work` run once
        more on a new one; any other database error is CacheError."""
        for attempt in (1, 2):
            conn = self._conn(create)
            if conn is None:
                return None
            try:
                return work(conn)
            except sqlite3.DatabaseError as exc:
                if attempt == 2 or not is_corrupt(exc):
                    raise self._error(exc) from None
                self._start_over(f"it is corrupt ({exc})", self._local.ino)
        raise AssertionError("unreachable")

    def _conn(self, create: bool) -> _Connection | None:
        if self._problem is not None:
            raise CacheError(self._problem)
        local = self._local
        conn: _Connection | None = getattr(local, "conn", None)
        if conn is not None and local.generation == self._generation and self._pid == os.getpid():
            return conn
        with _LOCK:
            if self._pid != os.getpid():  # a forked child: the parent's connections are not ours
                self._pid = os.getpid()
                _INHERITED.extend(self._conns)
                _OPEN.clear()
                self._conns = []
                self._generation += 1
            elif conn is not None:  # this thread's, to a file since moved aside, or closed
                _close(conn)
            local.conn = None
            found = self._open(create)
            if found is None:
                return None
            conn, local.ino = found
            local.conn = conn
            local.generation = self._generation
            self._conns.append(conn)
            return conn

    def _open(self, create: bool) -> tuple[_Connection, tuple[int, int]] | None:
        """A ready connection and the (device, inode) it opened, None when there is no
        database and `create` is false. Sets `_problem` (and raises CacheError) for a
        file that is not mlbuild's. Called under _LOCK.
        """
        found, ino = self._inspect()
        if found is Found.ABSENT and not create:
            return None
        if found is Found.FOREIGN:
            self._not_ours(self.path, "not mlbuild's cache database")
        if found is Found.ABSENT:
            try:
                os.makedirs(self.root, exist_ok=True)
            except OSError as exc:
                raise CacheError(f"cannot write the cache in {self.root}: {exc.strerror}") from exc
        for attempt in (1, 2):
            try:
                conn = self._connect()
            except (_Unusable, sqlite3.DatabaseError) as exc:
                if isinstance(exc, sqlite3.DatabaseError) and not is_corrupt(exc):
                    raise self._error(exc) from None
                if attempt == 2:
                    self._give_up(f"cannot use {display_path(self.path)}: {exc}")
                why = f"it is unreadable ({exc})" if isinstance(exc, sqlite3.Error) else str(exc)
                self._start_over(why, ino)
                found, ino = self._inspect()
                if found is Found.FOREIGN:
                    self._not_ours(self.path, "not mlbuild's cache database")
                continue
            try:
                st = os.stat(self.path)
            except OSError as exc:
                _close(conn)
                raise CacheError(f"cannot use {display_path(self.path)}: {exc.strerror}") from exc
            opened = (st.st_dev, st.st_ino)
            _OPEN.setdefault(opened, weakref.WeakSet()).add(conn)
            return conn, opened
        raise AssertionError("unreachable")

    def _inspect(self) -> tuple[Found, tuple[int, int]]:
        """Whose is the file at the database's name, and its (device, inode)."""
        for suffix in _SIDE_FILES:
            side = Path(f"{self.path}{suffix}")
            try:
                st = side.lstat()
            except FileNotFoundError:
                continue
            except OSError as exc:
                self._give_up(f"cannot use {display_path(side)}: {exc.strerror}")
            if not _is_regular(st.st_mode) or st.st_nlink > 1:
                self._not_ours(side, "not a regular file of one name")
        try:
            st = self.path.lstat()
        except FileNotFoundError:
            return Found.ABSENT, (0, 0)
        except OSError as exc:
            self._give_up(f"cannot use {display_path(self.path)}: {exc.strerror}")
        if not _is_regular(st.st_mode):
            self._not_ours(self.path, f"{_what(self.path)}, not mlbuild's cache database")
        if st.st_nlink > 1:  # writing it would write those other names too
            self._not_ours(self.path, "a file with other names (hard links)")
        opened = (st.st_dev, st.st_ino)
        if _OPEN.get(opened):
            return Found.OURS, opened  # checked when opened, and open since
        return self._header(), opened

    def _header(self) -> Found:
        """OURS or FOREIGN, from the file's first 100 bytes (no connection has it open)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            self._give_up(f"cannot read {display_path(self.path)}: {exc.strerror}")
        try:
            header = os.pread(fd, 100, 0)
        except OSError as exc:
            self._give_up(f"cannot read {display_path(self.path)}: {exc.strerror}")
        finally:
            os.close(fd)
        if not header:
            return Found.OURS  # empty: made a moment ago by another mlbuild's connect
        ours = header.startswith(_MAGIC) and header[68:72] == APPLICATION_ID.to_bytes(4, "big")
        return Found.OURS if ours else Found.FOREIGN

    def _connect(self) -> _Connection:
        """Connect and make the schema ready; _Unusable for a database of another format."""
        conn = sqlite3.connect(
            self.path,
            isolation_level=None,
            timeout=BUSY_SECONDS,
            check_same_thread=False,
            factory=_Connection,
        )
        try:
            conn.execute("PRAGMA synchronous=NORMAL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                # Empty: the schema and header, in rollback mode so that the header is in
                # the file itself, then WAL. Another mlbuild may be doing the same.
                conn.execute("BEGIN IMMEDIATE")
                try:
                    version = conn.execute("PRAGMA user_version").fetchone()[0]
                    count = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
                    if version == 0 and count == 0:
                        for statement in _SCHEMA:
                            conn.execute(statement)
                        version = FORMAT
                finally:
                    if conn.in_transaction:
                        conn.execute("COMMIT")
            if version != FORMAT:
                raise _Unusable(f"it has format {version}, this mlbuild reads {FORMAT}")
            if conn.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
                raise _Unusable("it is not mlbuild's cache database")
            conn.execute("PRAGMA journal_mode=WAL")
        except BaseException:
            conn.close()
            raise
        return conn

    def _start_over(self, problem: str, opened: tuple[int, int]) -> None:
        """Move our unusable database, the file `opened` (device, inode), aside (warning
        once), so that the next connect makes a new one. A reader with no reporter
        (`status`, `exp show`) leaves it for the next build to move and say so."""
        if self.warn is _quiet:
            self._give_up(f"{display_path(self.path)} cannot be used because {problem}")
        with _LOCK:
            if self._inspect() != (Found.OURS, opened):
                return  # moved already (by another thread or mlbuild), or not ours to move
            # Other threads' connections are left to them: each reconnects on its next call.
            self._generation += 1
            try:
                aside = move_database_aside(self.path, _SIDE_FILES)
            except OSError as exc:
                self._give_up(
                    f"{display_path(self.path)} cannot be used because {problem}, and moving it"
                    f" aside failed ({exc.strerror or exc}); move it away by hand"
                )
        self.warn(
            f"{display_path(self.path)} was moved to {aside.name} because {problem}; the cache"
            " starts over (its targets run again once)"
        )

    def _not_ours(self, path: Path, what: str) -> NoReturn:
        self._give_up(
            f"{display_path(path)} is {what} (left alone: move it away to cache outputs again)"
        )

    def _give_up(self, problem: str) -> NoReturn:
        self._problem = problem
        raise CacheError(problem)

    def _error(self, exc: sqlite3.DatabaseError) -> CacheError:
        code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
        shown = display_path(self.path)
        if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
            return CacheError(f"{shown} is locked by another process ({exc})")
        if code == _SQLITE_FULL:
            return CacheError(f"cannot write {shown}: the disk is full")
        return CacheError(f"cannot use {shown}: {exc}")


class _Unusable(Exception):
    """A database of ours that cannot be read as this format: moved aside."""


_KEYS = "SELECT key FROM entries ORDER BY key"
READ_LIMIT = MAX_ENTRY_BYTES  # bytes of a row's data read back at most (then refused)
_PUT = "INSERT OR REPLACE INTO entries (key, target, created, size, data) VALUES (?, ?, ?, ?, ?)"


def _close(conn: _Connection) -> None:
    """Close a connection and forget it as open (under _LOCK)."""
    for conns in _OPEN.values():
        conns.discard(conn)
    with contextlib.suppress(sqlite3.Error):
        conn.close()


def _is_regular(mode: int) -> bool:
    return stat.S_ISREG(mode)


def _what(path: Path) -> str:
    if path.is_symlink():
        return "a symlink"
    if path.is_dir():
        return "a directory"
    return "not a regular file"
