"""The local cache: `.mlbuild/cache/`, its objects and the entries that name them.

Layout:

- `objects/<d[:2]>/<d[2:]>`: the bytes of one output file, named by its BLAKE3
  digest `d`, read-only, written by temp file and rename (objects.py).
- `entries.db`: the entry (entry.py) of each cache key, one row each
  (entrydb.py). A row is written after every object it names, as the commit
  point: an entry never names an object that is not complete. Files of at
  most `INLINE_MAX` bytes (4 KiB), up to `INLINE_TOTAL_MAX` per entry,
  smallest first, are held in the entry itself and get no object: a trivial
  target's save creates no file at all.
- `runs/<k[:2]>/<k[2:]>.json`: where entries were files before (formats 2
  and 3). Still read when the database has no row for a key, and removed
  when invalid, older or dropped (by a failed restore or by gc); nothing is
  written there any more.
- `.tmp-<token>-<n>` in `objects/`: a writer's temp file; one left by a writer
  that died is removed by `mlbuild gc` (gc.py) once an hour old.

`Cache` is what the runner, the remote and `mlbuild gc` hold: it saves a
target's outputs, looks entries up (deleting invalid and older ones), takes
verified downloads in, and restores through restore.py. An entry database it
cannot use (entrydb.py) makes every lookup a miss and every save a
CacheError: the build goes on without caching.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from mlbuild.cache.entry import (
    INLINE_MAX,
    INLINE_TOTAL_MAX,
    MAX_ENTRY_BYTES,
    BadEntry,
    CacheError,
    Entry,
    Uncacheable,
    check_entry,
    describe_outputs,
    entry_payload,
    is_digest,
    is_older_version,
    load_entry,
)
from mlbuild.cache.entrydb import EntryDB, WarnFn
from mlbuild.cache.objects import (
    O_NEW,
    O_READ,
    commit,
    copy_file,
    in_parts,
    install_verified,
    read_all,
)
from mlbuild.cache.restore import check_cost, restore_entry
from mlbuild.fingerprint import Fingerprinter, hash_bytes
from mlbuild.staleness import Observation


class Cache:
    """Objects and entries under `root` (`.mlbuild/cache`)."""

    def __init__(self, root: Path, warn: WarnFn | None = None) -> None:
        self.root = root
        self.objects_dir = root / "objects"
        self.runs_dir = root / "runs"  # entry files of before entries.db: read, never written
        self.db = EntryDB(root, warn)
        self._legacy: bool | None = None  # whether runs_dir exists (asked once)
        self._made: set[str] = set()
        self._token = os.urandom(6).hex()
        self._count = 0

    def _mkdir(self, path: str) -> None:
        """mkdir -p, once per directory per build (a build may store thousands of files)."""
        if path not in self._made:
            os.makedirs(path, exist_ok=True)
            self._made.add(path)

    def _temp(self, folder: str, mode: int = 0o600) -> tuple[int, str]:
        """A new temp file in `folder` (which exists): its descriptor and path."""
        while True:
            self._count += 1
            path = f"{folder}/.tmp-{self._token}-{self._count}"
            try:
                return os.open(path, O_NEW, mode), path
            except FileExistsError:
                continue

    def object_path(self, digest: str) -> Path:
        return self.objects_dir / digest[:2] / digest[2:]

    def entry_path(self, key: str) -> Path:
        """Where the entry of `key` was a file, before entries.db (still read)."""
        return self.runs_dir / key[:2] / f"{key[2:]}.json"

    def _has_legacy(self) -> bool:
        if self._legacy is None:
            self._legacy = self.runs_dir.is_dir()
        return self._legacy

    def legacy_file(self, key: str) -> Path | None:
        """`entry_path(key)` when entry files of before may exist and `key` is a digest: a
        key read back from a row (gc, verify) is never made a path (`runs/xx//home/...`)."""
        return self.entry_path(key) if is_digest(key) and self._has_legacy() else None

    # -- saving -------------------------------------------------------------

    def save(
        self, key: str, target: str, project: Path, observation: Observation, duration: float
    ) -> Entry:
        """Store a target's outputs and then its entry.

        Raises Uncacheable when the outputs cannot be cached, CacheError on
        any OSError of the cache.
        """
        fingerprints = observation.fingerprint.outputs
        try:
            outputs, files = describe_outputs(project, fingerprints, observation.listings)
        except OSError as exc:
            raise Uncacheable(f"`{target}` not cached: {exc}") from exc
        size = sum(n for _, n in files.values())
        try:
            inline = read_small(files)
        except (OSError, Uncacheable) as exc:
            raise Uncacheable(f"`{target}` not cached: {exc}") from exc
        entry = Entry(key, target, time.time(), duration, outputs, size, inline)
        problem = check_entry(entry)
        if problem is not None:
            raise Uncacheable(f"`{target}` not cached: {problem}")
        objects = [(d, where) for d, where in files.items() if d not in inline]
        try:
            in_parts(self._put_some, objects)
            self.write_entry(entry)
        except OSError as exc:
            raise CacheError(f"cannot write the cache in {self.root}: {exc.strerror}") from exc
        return entry

    def write_entry(self, entry: Entry) -> None:
        """Write an entry (its objects must be in place already): the commit point.

        Raises CacheError when the entry database cannot be written.
        """
        data = json.dumps(entry_payload(entry)).encode()
        self.db.put(entry.key, entry.target, entry.created, entry.size, data)

    def receive(self, digest: str, fill: Callable[[str], None]) -> None:
        """Add an object whose bytes `fill(temp_path)` writes (a download), verified.

        The temp file sits beside the object and is renamed into place only if
        its bytes hash to `digest`; otherwise it is deleted and CorruptObject
        raised. An object already present is left alone.
        """
        if not is_digest(digest):
            raise CacheError(f"not a digest: {digest[:70]!r}")
        dest = self.object_path(digest)
        if dest.exists():
            return
        self._mkdir(str(dest.parent))
        fd, tmp = self._temp(str(dest.parent))
        os.close(fd)
        install_verified(tmp, str(dest), digest, fill, 0o444)

    def _put_some(self, files: list[tuple[str, tuple[str, int]]]) -> list[None]:
        """Copy output files into objects (absent ones only), each by temp file and rename."""
        objects = str(self.objects_dir)
        for digest, (src, size) in files:
            folder = f"{objects}/{digest[:2]}"
            dest = f"{folder}/{digest[2:]}"
            if os.path.exists(dest):
                continue
            self._mkdir(folder)
            fd, tmp = self._temp(folder, 0o444)
            commit(tmp, dest, functools.partial(copy_file, src, fd, size))
        return []

    # -- looking up and restoring --------------------------------------------

    def lookup(self, key: str, *, delete: bool = True) -> Entry | None:
        """The entry for `key`, or None (none, of another version, or no usable database).

        Raises BadEntry for an entry that is not valid (deleted first, unless
        `delete` is false: a query only looks). An entry of an older version is
        deleted too, quietly: it is a miss. A database that cannot be used is
        a miss here; the next save says why (CacheError).
        """
        if not is_digest(key):  # a hostile row's key, read back by gc or verify
            if delete:
                self._delete_row(key)
            raise BadEntry("its key is not a digest")
        try:
            raw = self.db.get(key)
        except (CacheError, OSError):
            raw = None
        if raw is None:
            return self._lookup_file(key, delete) if self._has_legacy() else None
        return _load(raw, key, functools.partial(self._delete_row, key) if delete else None)

    def _delete_row(self, key: str) -> None:
        with contextlib.suppress(CacheError, OSError):  # a miss all the same
            self.db.delete(key)

    def _lookup_file(self, key: str, delete: bool) -> Entry | None:
        """`lookup` of an entry file of before entries.db."""
        path = self.entry_path(key)
        try:
            with open(path, "rb") as handle:
                raw = handle.read(MAX_ENTRY_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise BadEntry(f"it cannot be read ({exc.strerror})") from None
        return _load(raw, key, functools.partial(path.unlink, missing_ok=True) if delete else None)

    def has_entry(self, key: str) -> bool:
        """Whether an entry for `key` is stored (not parsed: `exp show` asks of every row)."""
        try:
            if self.db.has(key):
                return True
        except (CacheError, OSError):
            return False
        path = self.legacy_file(key)
        return path is not None and path.exists()

    def read_file(self, entry: Entry, digest: str) -> bytes | None:
        """The bytes of `entry`'s file `digest`, from the entry or its object (unverified)."""
        data = entry.inline.get(digest)
        if data is not None:
            return data
        try:
            return self.object_path(digest).read_bytes()
        except OSError:
            return None

    def drop(self, key: str) -> None:
        """Delete the entry of `key` (a database that cannot be written keeps it: a row is
        parsed whole when read, so one left behind is never a wrong restore)."""
        self._delete_row(key)
        path = self.legacy_file(key)
        if path is not None:
            path.unlink(missing_ok=True)

    def restore(self, entry: Entry, project: Path, fp: Fingerprinter) -> dict[str, str]:
        """Put an entry's outputs in place, verified; return their fingerprints (restore.py)."""
        return restore_entry(str(self.objects_dir), entry, project, fp)

    def check_cost(self, entry: Entry) -> None:
        """Raise SlowerThanRunning when restoring `entry` should take longer than its step."""
        check_cost(entry)

    # -- maintenance --------------------------------------------------------

    def entry_keys(self) -> list[str]:
        """The key of every stored entry, rows and files of before (CacheError when the
        database cannot be read: gc must not take an unreadable one for an empty one)."""
        keys = set(self.db.keys())
        for key, _ in self.entry_files():
            keys.add(key)
        return sorted(keys)

    def entry_files(self) -> Iterator[tuple[str, Path]]:
        """(key, path) of every entry file of before entries.db."""
        if not self.runs_dir.is_dir():
            return
        for folder in sorted(self.runs_dir.iterdir()):
            for path in sorted(folder.glob("*.json")):
                yield folder.name + path.stem, path

    def entries(self) -> Iterator[tuple[str, Entry]]:
        """Every valid entry of this version, with its key (invalid and old ones are deleted)."""
        for key in self.entry_keys():
            try:
                entry = self.lookup(key)
            except BadEntry:
                continue
            if entry is not None:
                yield key, entry

    def close(self) -> None:
        """Close the entry database's connections (each thread's)."""
        self.db.close()

    def object_files(self) -> Iterator[tuple[str, Path]]:
        """(digest, path) of every object on disk."""
        if not self.objects_dir.is_dir():
            return
        for folder in self.objects_dir.iterdir():
            if folder.is_dir():
                for path in folder.iterdir():
                    if not path.name.startswith(".tmp-"):
                        yield folder.name + path.name, path


def _load(raw: bytes, key: str, remove: Callable[[], None] | None) -> Entry | None:
    """`load_entry`, with `remove()` (when given) for an entry that is invalid (before
    BadEntry is raised) or of an older version (a miss): a row and a file alike."""
    try:
        entry = load_entry(raw, key)
    except BadEntry:
        if remove is not None:
            remove()
        raise
    if entry is None and remove is not None and is_older_version(raw):
        remove()
    return entry


def read_small(files: dict[str, tuple[str, int]]) -> dict[str, bytes]:
    """The bytes of the files an entry holds itself: the smallest, within the bounds.

    `files` maps digest -> (path, size) as fingerprinted. Each is read and
    hashed again: a file rewritten since it was fingerprinted raises
    Uncacheable rather than be recorded under a digest it no longer has.
    """
    inline: dict[str, bytes] = {}
    total = 0
    small = sorted((size, digest) for digest, (_, size) in files.items() if size <= INLINE_MAX)
    for size, digest in small:
        if total + size > INLINE_TOTAL_MAX:
            break
        fd = os.open(files[digest][0], O_READ | os.O_NONBLOCK)  # never blocks on a FIFO
        try:
            data = read_all(fd, INLINE_MAX + 1)
        finally:
            os.close(fd)
        if hash_bytes(data) != digest:
            raise Uncacheable(f"{files[digest][0]} changed since it was fingerprinted")
        inline[digest] = data
        total += size
    return inline
