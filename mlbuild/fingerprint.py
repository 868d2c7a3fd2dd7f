"""BLAKE3 digests of files, directories and values, behind a racy-safe stat cache.

A file is hashed again only when its stat (size, mtime_ns, ctime_ns, inode)
differs from the one recorded with its digest, or when the recorded stat is
*racy*: the file's mtime or ctime lies within the filesystem's timestamp
granularity of the moment it was hashed, so a later write in the same clock
tick could leave the stat unchanged (git's "racy git" problem; Ninja compares
against the command start time for the same reason). Racy entries are
re-hashed once, after which their checked time is safely later than their
timestamps and they are trusted. The ctime is what catches an edit whose mtime
was put back (`rsync -t`, `tar -x`, `cp -p`, `touch -d`): no user call can set
it, and it comes from the same stat call as the rest.

Directories are digested as a hash over their sorted listing of
`kind digest relative-path` lines, a one-level Merkle tree: any added, removed
or modified entry changes the digest, and the listing itself is kept so that a
reason can say which entries changed. A directory's stat cache entry is one
record (`DirStat`), not one per file: a *summary* hash over the stat of every
entry found by the walk. When the walk's summary equals the recorded one, the
recorded digest and listing are reused without looking at a single per-file
entry; only when it differs are the per-file entries consulted (and only the
files whose stat changed re-hashed). A summary is recorded only when no file
in it was racy, so a trusted summary implies trusted entries.

Only regular files, directories and symlinks can be fingerprinted. Anything
else (a FIFO, a socket, a device) is refused with a `FingerprintError` before
it is opened: reading a FIFO blocks forever and a device may never end. Files
are opened with O_NONBLOCK and checked again with fstat, so a path swapped for
a FIFO between the stat and the open cannot block either.
"""

from __future__ import annotations

import datetime as _dt
import glob
import json
import marshal
import os
import stat as _stat
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import blake3

from mlbuild.errors import FingerprintError
from mlbuild.manifest import DIR_IN_LISTING, DigestKind
from mlbuild.pipeline.schema import Port

# Files at least this large are mmapped and hashed on every core.
MMAP_THRESHOLD = 8 * 1024 * 1024
# Hash in threads when a walk finds at least this many files to (re)hash:
# reads and blake3 release the GIL, so small files hash on every core. Files
# are dealt round-robin to one more thread than CPUs (a thread waiting on a read
# leaves its core to another), each thread reusing one read buffer.
PARALLEL_MIN_FILES = 16
READ_CHUNK = 1 << 20
SMALL_FILE = 1 << 16  # read as it is, not through a READ_CHUNK buffer
# Timestamp granularity assumed for racy checks. Linux stamps files from a
# coarse clock (one tick, <= 10 ms); filesystems with whole-second timestamps
# (ext3, HFS+, FAT's 2 s) are recognised by a zero sub-second part.
FINE_WINDOW_NS = 100_000_000
COARSE_WINDOW_NS = 2_000_000_000
# marshal format of a walk's stat records, for the summary: version 2 writes no
# back-references, so equal records always give equal bytes.
_SUMMARY_MARSHAL = 2


def is_trusted(mtime_ns: int, ctime_ns: int, checked_ns: int) -> bool:
    """True when a digest taken at `checked_ns` cannot hide a write with these timestamps.

    Both timestamps must be older than the check by the filesystem's granularity:
    a write in the same tick as the hash would otherwise leave them unchanged.
    """
    newest = max(mtime_ns, ctime_ns)
    window = COARSE_WINDOW_NS if newest % 1_000_000_000 == 0 else FINE_WINDOW_NS
    return newest < checked_ns - window


class StatEntry(NamedTuple):
    """What the stat cache remembers of one file (paths are project-relative)."""

    size: int
    mtime_ns: int
    ino: int
    checked_ns: int  # wall clock just before the bytes were read
    digest: str
    ctime_ns: int = -1  # -1: not recorded (an entry remembered without it): never matches

    def same_file(self, st: os.stat_result) -> bool:
        """True when `st` is still the stat this entry was taken at (racy or not)."""
        now = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        return now == (self.size, self.mtime_ns, self.ctime_ns, self.ino)

    def matches(self, st: os.stat_result) -> bool:
        """True when `st` is the stat this digest was taken at, and it was not racy."""
        if (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) != (
            self.size,
            self.mtime_ns,
            self.ctime_ns,
            self.ino,
        ):
            return False
        return is_trusted(self.mtime_ns, self.ctime_ns, self.checked_ns)


class DirStat(NamedTuple):
    """What the stat cache remembers of one directory tree (see the module docstring)."""

    summary: str  # BLAKE3 of the walk's stat records; "" while any file in it was racy
    digest: str
    listing: tuple[tuple[str, str], ...]
    files: Mapping[str, StatEntry]  # path below the directory -> entry (may load lazily)


class LazyStats(dict[str, StatEntry]):
    """The persisted file entries, read from the store one path at a time at first.

    A build that digests a few files of a large project (one input changed in
    10,000) reads their rows, not every row; past `BULK_AFTER` reads the rest
    come in one query. Only `get` reads through: the fingerprinter's one way
    to look an entry up. Entries set in this run win over rows read later.
    """

    BULK_AFTER = 64

    def __init__(
        self,
        one: Callable[[str], StatEntry | None],
        every: Callable[[], Mapping[str, StatEntry]],
    ) -> None:
        super().__init__()
        self._one = one
        self._every: Callable[[], Mapping[str, StatEntry]] | None = every
        self._asked = 0

    def get(self, key: str, default: Any = None) -> Any:
        if key in self:
            return self[key]
        if self._every is None:
            return default
        self._asked += 1
        if self._asked > self.BULK_AFTER:
            every, self._every = self._every, None
            for path, entry in every().items():
                self.setdefault(path, entry)
            return super().get(key, default)
        found = self._one(key)
        if found is None:
            return default
        self[key] = found
        return found


class StatCache:
    """The persisted stat cache: file entries in memory, directory records on demand.

    A plain class, not a NamedTuple: it is a handle made once per build, and a
    NamedTuple costs a tenth of a millisecond to define at import.
    """

    __slots__ = ("files", "load_dir")

    def __init__(
        self, files: Mapping[str, StatEntry], load_dir: Callable[[str], DirStat | None]
    ) -> None:
        self.files = files
        self.load_dir = load_dir


class Digest(NamedTuple):
    """The fingerprint of one path: a file, a directory with its listing, or missing."""

    kind: DigestKind  # FILE, DIR, LINK or MISSING
    digest: str
    listing: tuple[tuple[str, str], ...] = ()  # for directories: (relative path, digest text)

    @property
    def text(self) -> str:
        """The digest as manifests write it (`manifest.Ref`)."""
        return self.kind + ":" + self.digest


MISSING = Digest(DigestKind.MISSING, "")
_FILE = DigestKind.FILE
_DIR = DigestKind.DIR
_FILE_PREFIX = DigestKind.FILE + ":"
_LINK_PREFIX = DigestKind.LINK + ":"

# A walked file: (path below the directory, size, mtime_ns, ctime_ns, inode).
WalkedFile = tuple[str, int, int, int, int]


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
    """Hex BLAKE3 of a regular file's bytes; large files are mmapped and hashed on every core.

    Opened with O_NONBLOCK and checked with fstat, so that a FIFO or device
    (even one swapped in after the caller's stat) is refused, never read.
    Smaller files are read into `buffer` (reused across files: a fresh bytes
    object per file costs an allocation and page faults for every file).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not _stat.S_ISREG(st.st_mode):
            raise FingerprintError(_not_regular(str(path), st.st_mode))
        if st.st_size >= MMAP_THRESHOLD:
            import mmap  # only for large files

            hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
            with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mapped:
                hasher.update(mapped)
            return hasher.hexdigest()
        hasher = blake3.blake3()
        if buffer is None and st.st_size < SMALL_FILE:
            # No 1 MiB buffer for one small file: its fresh pages cost ~40 µs a file.
            while chunk := os.read(fd, SMALL_FILE):
                hasher.update(chunk)
            return hasher.hexdigest()
        buffer = buffer if buffer is not None else bytearray(READ_CHUNK)
        view = memoryview(buffer)
        while n := os.readv(fd, [buffer]):
            hasher.update(view[:n])
        return hasher.hexdigest()
    finally:
        os.close(fd)


def _hash_files(paths: list[tuple[str, int]]) -> list[str]:
    """Digests of several files in one thread, with one read buffer."""
    buffer = bytearray(READ_CHUNK)
    return [hash_file(path, size, buffer) for path, size in paths]


def _hash_all(jobs: list[tuple[str, int]]) -> list[str]:
    """Digests of files `(full path, size)`, in threads when there are many."""
    if len(jobs) < PARALLEL_MIN_FILES:
        return _hash_files(jobs)
    # Imported here: it pulls in logging and threading, which a no-op never needs.
    from concurrent.futures import ThreadPoolExecutor

    workers = min(16, (os.cpu_count() or 1) + 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        parts = list(pool.map(_hash_files, [jobs[i::workers] for i in range(workers)]))
    digests = [""] * len(jobs)
    for i, part in enumerate(parts):
        digests[i::workers] = part
    return digests


def summarize(files: list[WalkedFile], others: list[tuple[str, str]]) -> str:
    """The summary of a walk: equal exactly when every entry's name, kind and stat are equal."""
    return hash_bytes(marshal.dumps((files, others), _SUMMARY_MARSHAL))


def _not_regular(path: str, mode: int) -> str:
    kinds = (
        (_stat.S_ISFIFO, "a FIFO (named pipe)"),
        (_stat.S_ISSOCK, "a socket"),
        (_stat.S_ISCHR, "a character device"),
        (_stat.S_ISBLK, "a block device"),
    )
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    return (
        f"cannot fingerprint '{path}': it is {kind}; only regular files, directories"
        " and symlinks can be inputs or outputs (move it out of the way)"
    )


def _unreadable(path: str, exc: OSError, *, folder: bool = False) -> FingerprintError:
    """The one line for an input mlbuild may not read, saying what to do about it."""
    if isinstance(exc, PermissionError):
        if folder:
            fix = "make it readable and searchable (chmod u+rx) or run mlbuild as its owner"
        else:
            fix = "make it readable (chmod u+r) or run mlbuild as its owner"
        return FingerprintError(f"cannot read '{path}': permission denied; {fix}")
    return FingerprintError(f"cannot read '{path}': {exc.strerror or exc}")


def _unreadable_folder(rel: str, below: str, exc: OSError) -> FingerprintError:
    """`_unreadable` for a folder of the tree `rel`; `below` is its path inside, with a `/`."""
    return _unreadable(f"{rel}/{below[:-1]}" if below else rel, exc, folder=True)


def _encode_default(value: Any) -> Any:
    if isinstance(value, _dt.datetime | _dt.date | _dt.time):
        return {"$" + type(value).__name__: value.isoformat()}
    raise TypeError(f"cannot fingerprint a value of type {type(value).__name__}")


def encode_value(value: Any) -> str:
    """A canonical text for a parameter value: equal values, equal text; 1 != 1.0 != true."""
    return json.dumps(
        value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=_encode_default
    )


def _no_dirs(rel: str) -> None:
    return None


class Fingerprinter:
    """Digests paths under `root`, consulting and updating a stat cache.

    `stats` is the persisted cache (`StatCache`), a function returning it (called
    on first use: a no-op whose targets are all fresh by their stat signatures,
    signature.py, never reads the stat cache), or a plain mapping of file
    entries for a cache that starts empty of directories. `updates` collects
    the entries learned since the last `take_updates`, for the caller to
    persist with the manifest they belong to.

    With `reuse_walks`, a directory digested twice (one target's output, then
    the next target's input) is walked once: its digest is kept until
    `expire()`, which the caller must call whenever files may change (a step
    starts or ends, outputs are removed or restored). A walk of a large
    directory is one stat per file, the whole cost of a no-op over it.
    """

    def __init__(
        self,
        root: Path,
        stats: StatCache | Mapping[str, StatEntry] | Callable[[], StatCache],
        *,
        reuse_walks: bool = False,
    ) -> None:
        self.root = root
        self._prefix = str(root) + os.sep
        self._stats: dict[str, StatEntry] | None = None
        self._load_dir: Callable[[str], DirStat | None] = _no_dirs
        self._source: Callable[[], StatCache] | None = None
        if isinstance(stats, StatCache):
            self._use(stats)
        elif callable(stats):
            self._source = stats
        else:
            self._stats = dict(stats)
        self.dirs: dict[str, DirStat | None] = {}  # loaded or learned this run
        self.updates: dict[str, StatEntry | DirStat] = {}
        self._reuse_walks = reuse_walks
        self._walked: dict[str, Digest] = {}  # directory digests since the last expire()
        # lstat results taken by `exists` (a build's check that sources exist), each
        # used once by `digest` until expire(): one syscall per source, not two.
        self._checked: dict[str, os.stat_result] = {}

    def _use(self, cache: StatCache) -> dict[str, StatEntry]:
        self._load_dir = cache.load_dir
        files = cache.files
        stats = self._stats = files if isinstance(files, LazyStats) else dict(files)
        return stats

    @property
    def stats(self) -> dict[str, StatEntry]:
        """File path -> stat entry: the persisted cache with what this run learned."""
        stats = self._stats
        if stats is None:
            assert self._source is not None
            stats = self._use(self._source())
        return stats

    def take_updates(self) -> dict[str, StatEntry | DirStat]:
        """The stat entries learned since the last call, emptied."""
        updates, self.updates = self.updates, {}
        return updates

    def remember(self, rel: str, entry: StatEntry) -> None:
        """Record a digest learned elsewhere (a verified restore from the cache)."""
        self.stats[rel] = entry
        self.updates[rel] = entry
        self._walked.clear()  # a restore writes files

    def expire(self) -> None:
        """Forget the directory digests taken so far: files may change from now on."""
        self._walked.clear()
        self._checked.clear()

    def exists(self, rel: str) -> bool:
        """Whether a project-relative path exists (a symlink counts, as for os.path.lexists).

        The stat is kept for the next `digest` of that path until `expire()`:
        taken earlier than the digest's own would be, which is safe (a write
        after it changes the stat, and the stat cache entry then differs).
        """
        try:
            self._checked[rel] = os.lstat(self._prefix + rel)
        except OSError:
            return False
        return True

    def lstat(self, rel: str) -> os.stat_result | None:
        """The lstat of a project-relative path (the one `exists` took, if any); None if absent."""
        st = self._checked.pop(rel, None) if self._checked else None
        if st is not None:
            return st
        try:
            return os.lstat(self._prefix + rel)
        except OSError:
            return None

    def digest(self, rel: str) -> Digest:
        """The fingerprint of a project-relative path, following no symlink.

        Raises FingerprintError for a path that is not a regular file,
        directory or symlink, or that cannot be read.
        """
        full = self._prefix + rel
        st = self._checked.pop(rel, None) if self._checked else None
        if st is None:
            try:
                st = os.lstat(full)
            except (FileNotFoundError, NotADirectoryError):
                return MISSING
            except OSError as exc:
                raise _unreadable(rel, exc) from None
        mode = st.st_mode
        if _stat.S_ISREG(mode):
            return self._file_digest(rel, st)
        if _stat.S_ISDIR(mode):
            return self._digest_dir(rel, full)
        if not _stat.S_ISLNK(mode):
            raise FingerprintError(_not_regular(rel, mode))
        try:
            target = os.readlink(full)
        except OSError as exc:
            raise _unreadable(rel, exc) from None
        try:
            st = os.stat(full)
        except (FileNotFoundError, NotADirectoryError):
            return Digest(DigestKind.LINK, hash_bytes(b"link:" + os.fsencode(target)))
        except OSError as exc:
            raise _unreadable(rel, exc) from None
        if _stat.S_ISDIR(st.st_mode):
            # A symlinked directory is read through, as a step would read it.
            return self._digest_dir(rel, full)
        if _stat.S_ISREG(st.st_mode):
            return self._file_digest(rel, st)
        raise FingerprintError(_not_regular(rel, st.st_mode))

    def _file_digest(self, rel: str, st: os.stat_result) -> Digest:
        entry = self.stats.get(rel)
        if entry is not None and entry.matches(st):
            return Digest(_FILE, entry.digest)
        checked_ns = time.time_ns()
        # The stat was taken before the read: a write during or after the read
        # either changes the stat or lands inside the racy window of checked_ns.
        try:
            digest = hash_file(self._prefix + rel, st.st_size)
        except OSError as exc:
            raise _unreadable(rel, exc) from None
        entry = StatEntry(st.st_size, st.st_mtime_ns, st.st_ino, checked_ns, digest, st.st_ctime_ns)
        self.stats[rel] = entry
        self.updates[rel] = entry
        return Digest(_FILE, digest)

    def _digest_dir(self, rel: str, full: str) -> Digest:
        if self._reuse_walks and rel in self._walked:
            return self._walked[rel]
        found = self._digest_tree(rel, full)
        if self._reuse_walks:
            self._walked[rel] = found
        return found

    def _digest_tree(self, rel: str, full: str) -> Digest:
        files, others = self._walk(rel, full)
        summary = summarize(files, others)
        if rel in self.dirs:
            known = self.dirs[rel]
        else:
            if self._stats is None:
                self.stats  # noqa: B018  # loads the cache: the directory loader comes with it
            known = self.dirs[rel] = self._load_dir(rel)
        if known is not None and known.summary == summary:
            return Digest(_DIR, known.digest, known.listing)
        record = self._rehash_dir(rel, files, others, summary, known)
        self.dirs[rel] = record
        self.updates[rel] = record
        return Digest(_DIR, record.digest, record.listing)

    def _walk(self, rel: str, full: str) -> tuple[list[WalkedFile], list[tuple[str, str]]]:
        """Every entry below a directory: files with their stat, others as (path, value).

        The hot loop of a no-op over a large directory: one `stat` per file and
        nothing else. Each folder is scanned through a descriptor, so that stat
        resolves one name (fstatat) rather than the whole path again.
        """
        files: list[WalkedFile] = []
        others: list[tuple[str, str]] = []
        stack = [(full, "")]
        while stack:
            folder, below = stack.pop()
            try:
                fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                raise _unreadable_folder(rel, below, exc) from None
            try:
                with os.scandir(fd) as entries:
                    for entry in entries:
                        name = below + entry.name
                        if entry.is_file(follow_symlinks=False):
                            try:
                                st = entry.stat(follow_symlinks=False)
                            except FileNotFoundError:
                                continue  # removed while walking: not part of the tree
                            files.append(
                                (name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
                            )
                        elif entry.is_dir(follow_symlinks=False):
                            others.append((name, DIR_IN_LISTING))
                            stack.append((f"{folder}/{entry.name}", name + "/"))
                        elif entry.is_symlink():
                            link = os.readlink(entry.name, dir_fd=fd)
                            others.append((name, _LINK_PREFIX + hash_bytes(os.fsencode(link))))
                        else:
                            mode = entry.stat(follow_symlinks=False).st_mode
                            raise FingerprintError(_not_regular(f"{rel}/{name}", mode))
            except OSError as exc:
                raise _unreadable_folder(rel, below, exc) from None
            finally:
                os.close(fd)
        return files, others

    def _rehash_dir(
        self,
        rel: str,
        files: list[WalkedFile],
        others: list[tuple[str, str]],
        summary: str,
        known: DirStat | None,
    ) -> DirStat:
        """A directory whose summary changed: reuse what still matches, hash the rest."""
        old = known.files if known is not None else {}
        prefix = rel + "/"
        entries: dict[str, StatEntry] = {}
        todo: list[WalkedFile] = []
        trusted = True
        for walked in files:
            name, size, mtime_ns, ctime_ns, ino = walked
            for entry in (old.get(name), self.stats.get(prefix + name)):
                if (
                    entry is not None
                    and entry.size == size
                    and entry.mtime_ns == mtime_ns
                    and entry.ctime_ns == ctime_ns
                    and entry.ino == ino
                    and is_trusted(mtime_ns, ctime_ns, entry.checked_ns)
                ):
                    entries[name] = entry
                    break
            else:
                todo.append(walked)
        if todo:
            checked_ns = time.time_ns()
            jobs = [(self._prefix + prefix + w[0], w[1]) for w in todo]
            try:
                digests = _hash_all(jobs)
            except OSError as exc:
                name = _failed_name(exc, self._prefix + prefix)
                raise _unreadable(prefix + name, exc) from None
            for (name, size, mtime_ns, ctime_ns, ino), digest in zip(todo, digests, strict=True):
                entries[name] = StatEntry(size, mtime_ns, ino, checked_ns, digest, ctime_ns)
                trusted = trusted and is_trusted(mtime_ns, ctime_ns, checked_ns)
        listing = [(name, _FILE_PREFIX + entry.digest) for name, entry in entries.items()]
        listing = sorted(listing + others)
        text = "".join(f"{value} {name}\n" for name, value in listing)
        digest = hash_bytes(text.encode("utf-8", "surrogateescape"))
        return DirStat(summary if trusted else "", digest, tuple(listing), entries)


def _failed_name(exc: OSError, base: str) -> str:
    """The path below `base` that an OSError names (its filename), for the message."""
    name = str(exc.filename or "")
    return name[len(base) :] if name.startswith(base) else name


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
