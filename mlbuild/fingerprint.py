"""BLAKE3 digests of files, directories and values, behind a racy-safe stat cache.

A file is hashed again only when its stat (size, mtime_ns, inode) differs from
the one recorded with its digest, or when the recorded stat is *racy*: the
file's mtime lies within the filesystem's timestamp granularity of the moment
it was hashed, so a later write in the same clock tick could leave the stat
unchanged (git's "racy git" problem; Ninja compares against the command start
time for the same reason). Racy entries are re-hashed once, after which their
checked time is safely later than their mtime and they are trusted.

Directories are digested as a hash over their sorted listing of
`kind digest relative-path` lines, a one-level Merkle tree: any added, removed
or modified entry changes the digest, and the listing itself is kept so that a
reason can say which entries changed.
"""

from __future__ import annotations

import datetime as _dt
import glob
import json
import os
import stat as _stat
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import blake3

from mlbuild.config import Port

# Files at least this large go through blake3's mmap and multi-threaded hashing.
MMAP_THRESHOLD = 8 * 1024 * 1024
# Hash in threads when a walk finds at least this many files to (re)hash:
# reads and blake3 release the GIL, so small files hash on every core. Files
# are dealt round-robin to one more thread than CPUs (a thread waiting on a read
# leaves its core to another), each thread reusing one read buffer.
PARALLEL_MIN_FILES = 16
READ_CHUNK = 1 << 20
# Timestamp granularity assumed for racy checks. Linux stamps files from a
# coarse clock (one tick, <= 10 ms); filesystems with whole-second mtimes
# (ext3, HFS+, FAT's 2 s) are recognised by a zero sub-second part.
FINE_WINDOW_NS = 100_000_000
COARSE_WINDOW_NS = 2_000_000_000


class StatEntry(NamedTuple):
    """What the stat cache remembers of one file (paths are project-relative)."""

    size: int
    mtime_ns: int
    ino: int
    checked_ns: int  # wall clock just before the bytes were read
    digest: str

    def same_file(self, st: os.stat_result) -> bool:
        """True when `st` is still the stat this entry was taken at (racy or not)."""
        return (st.st_size, st.st_mtime_ns, st.st_ino) == (self.size, self.mtime_ns, self.ino)

    def matches(self, st: os.stat_result) -> bool:
        """True when `st` is the stat this digest was taken at, and it was not racy."""
        if (st.st_size, st.st_mtime_ns, st.st_ino) != (self.size, self.mtime_ns, self.ino):
            return False
        window = COARSE_WINDOW_NS if st.st_mtime_ns % 1_000_000_000 == 0 else FINE_WINDOW_NS
        return st.st_mtime_ns < self.checked_ns - window


class Digest(NamedTuple):
    """The fingerprint of one path: a file, a directory with its listing, or missing."""

    kind: str  # "file", "dir", "link" or "missing"
    digest: str
    listing: tuple[tuple[str, str], ...] = ()  # for directories: (relative path, "kind:digest")


MISSING = Digest("missing", "")


def expand_port(port: Port, root: str) -> list[str]:
    """An input's paths: itself, or a glob pattern's sorted matches."""
    if not port.is_glob:
        return [port.path]
    matches = glob.glob(port.path, root_dir=root, recursive=True)
    return sorted(os.path.normpath(m).replace(os.sep, "/") for m in matches)


def hash_bytes(data: bytes) -> str:
    """Hex BLAKE3 of a byte string."""
    return blake3.blake3(data).hexdigest()


def hash_file(path: Path | str, size: int, buffer: bytearray | None = None) -> str:
    """Hex BLAKE3 of a file's bytes; large files are mmapped and hashed on every core.

    Smaller files are read into `buffer` (reused across files: a fresh bytes
    object per file costs an allocation and page faults for every file).
    """
    if size >= MMAP_THRESHOLD:
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        hasher.update_mmap(path)
        return hasher.hexdigest()
    buffer = buffer if buffer is not None else bytearray(READ_CHUNK)
    view = memoryview(buffer)
    hasher = blake3.blake3()
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            hasher.update(view[:n])
    return hasher.hexdigest()


def _hash_files(paths: list[tuple[str, int]]) -> list[str]:
    """Digests of several files in one thread, with one read buffer."""
    buffer = bytearray(READ_CHUNK)
    return [hash_file(path, size, buffer) for path, size in paths]


def _encode_default(value: Any) -> Any:
    if isinstance(value, _dt.datetime | _dt.date | _dt.time):
        return {"$" + type(value).__name__: value.isoformat()}
    raise TypeError(f"cannot fingerprint a value of type {type(value).__name__}")


def encode_value(value: Any) -> str:
    """A canonical text for a parameter value: equal values, equal text; 1 != 1.0 != true."""
    return json.dumps(
        value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=_encode_default
    )


class Fingerprinter:
    """Digests paths under `root`, consulting and updating a stat cache.

    `updates` collects the stat entries learned since the last `take_updates`,
    for the caller to persist with the manifest they belong to.
    """

    def __init__(self, root: Path, stats: Mapping[str, StatEntry]) -> None:
        self.root = root
        self._prefix = str(root) + os.sep
        self.stats: dict[str, StatEntry] = dict(stats)
        self.updates: dict[str, StatEntry] = {}

    def take_updates(self) -> dict[str, StatEntry]:
        """The stat entries learned since the last call, emptied."""
        updates, self.updates = self.updates, {}
        return updates

    def remember(self, rel: str, entry: StatEntry) -> None:
        """Record a digest learned elsewhere (a verified restore from the cache)."""
        self.stats[rel] = entry
        self.updates[rel] = entry

    def digest(self, rel: str) -> Digest:
        """The fingerprint of a project-relative path, following no symlink."""
        full = self._prefix + rel
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            return MISSING
        except NotADirectoryError:
            return MISSING
        if _stat.S_ISDIR(st.st_mode):
            return self._digest_dir(rel, full)
        if _stat.S_ISLNK(st.st_mode):
            target = os.readlink(full)
            if os.path.isdir(full):
                # A symlinked directory is read through, as a step would read it.
                return self._digest_dir(rel, full)
            if os.path.exists(full):
                return self._file_digests([(rel, os.stat(full))])[rel]
            return Digest("link", hash_bytes(b"link:" + os.fsencode(target)))
        return self._file_digests([(rel, st)])[rel]

    def _file_digests(self, files: list[tuple[str, os.stat_result]]) -> dict[str, Digest]:
        """Digests for regular files, hashing only stat-cache misses (in parallel if many)."""
        result: dict[str, Digest] = {}
        todo: list[tuple[str, os.stat_result]] = []
        for rel, st in files:
            entry = self.stats.get(rel)
            if entry is not None and entry.matches(st):
                result[rel] = Digest("file", entry.digest)
            else:
                todo.append((rel, st))
        if not todo:
            return result
        checked_ns = time.time_ns()
        jobs = [(self._prefix + rel, st.st_size) for rel, st in todo]
        if len(todo) >= PARALLEL_MIN_FILES:
            # Imported here: it pulls in logging and threading, which a no-op never needs.
            from concurrent.futures import ThreadPoolExecutor

            workers = min(16, (os.cpu_count() or 1) + 1)
            with ThreadPoolExecutor(max_workers=workers) as pool:
                parts = list(pool.map(_hash_files, [jobs[i::workers] for i in range(workers)]))
            digests = [""] * len(jobs)
            for i, part in enumerate(parts):
                digests[i::workers] = part
        else:
            digests = _hash_files(jobs)
        for (rel, st), digest in zip(todo, digests, strict=True):
            # The stat was taken before the read: a write during or after the read
            # either changes the stat or lands inside the racy window of checked_ns.
            entry = StatEntry(st.st_size, st.st_mtime_ns, st.st_ino, checked_ns, digest)
            self.stats[rel] = entry
            self.updates[rel] = entry
            result[rel] = Digest("file", digest)
        return result

    def _digest_dir(self, rel: str, full: str) -> Digest:
        files: list[tuple[str, os.stat_result]] = []
        others: list[tuple[str, str]] = []
        stack = [(full, rel)]
        while stack:
            folder, folder_rel = stack.pop()
            with os.scandir(folder) as entries:
                for entry in entries:
                    child = f"{folder_rel}/{entry.name}"
                    if entry.is_dir(follow_symlinks=False):
                        others.append((child, "dir:"))
                        stack.append((entry.path, child))
                    elif entry.is_file(follow_symlinks=False):
                        files.append((child, entry.stat(follow_symlinks=False)))
                    elif entry.is_symlink():
                        link = os.readlink(entry.path)
                        others.append((child, "link:" + hash_bytes(os.fsencode(link))))
        digests = self._file_digests(files)
        start = len(rel) + 1
        listing = sorted(
            [(name[start:], "file:" + digests[name].digest) for name, _ in files]
            + [(name[start:], value) for name, value in others]
        )
        text = "".join(f"{value} {name}\n" for name, value in listing)
        return Digest("dir", hash_bytes(text.encode("utf-8", "surrogateescape")), tuple(listing))


def diff_listings(
    old: Iterable[tuple[str, str]], new: Iterable[tuple[str, str]]
) -> tuple[list[str], list[str], list[str]]:
    """Entries (added, removed, modified) between two directory listings."""
    before = dict(old)
    after = dict(new)
    added = sorted(k for k in after if k not in before)
    removed = sorted(k for k in before if k not in after)
    modified = sorted(k for k in after if k in before and before[k] != after[k])
    return added, removed, modified
