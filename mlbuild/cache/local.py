"""The local cache: `.mlbuild/cache/`, its objects and the entries that name them.

Layout:

- `objects/<d[:2]>/<d[2:]>`: the bytes of one output file, named by its BLAKE3
  digest `d`, read-only, written by temp file and rename (objects.py).
- `runs/<k[:2]>/<k[2:]>.json`: the entry (entry.py) of cache key `k`.
  Written after every object it names, by rename, as the commit point: an
  entry never names an object that is not complete. Files of at most
  `INLINE_MAX` bytes (4 KiB), up to `INLINE_TOTAL_MAX` per entry, smallest
  first, are held in the entry itself and get no object: a trivial target's
  save creates one file and no `objects/` folder.
- `.tmp-<token>-<n>` in either: a writer's temp file; one left by a writer
  that died is removed by `mlbuild gc` (gc.py) once an hour old.

`Cache` is what the runner, the remote and `mlbuild gc` hold: it saves a
target's outputs, looks entries up (deleting invalid and older ones), takes
verified downloads in, and restores through restore.py.
"""

from __future__ import annotations

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
from mlbuild.cache.objects import (
    O_NEW,
    O_READ,
    commit,
    copy_file,
    in_parts,
    install_verified,
    read_all,
    write_all,
)
from mlbuild.cache.restore import check_cost, restore_entry
from mlbuild.fingerprint import Fingerprinter, hash_bytes
from mlbuild.staleness import Observation


class Cache:
    """Objects and entries under `root` (`.mlbuild/cache`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects_dir = root / "objects"
        self.runs_dir = root / "runs"
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
        return self.runs_dir / key[:2] / f"{key[2:]}.json"

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
        """Write an entry (its objects must be in place already): the commit point."""
        data = json.dumps(entry_payload(entry)).encode()
        folder = str(self.entry_path(entry.key).parent)
        self._mkdir(folder)
        fd, tmp = self._temp(folder)

        def write() -> None:
            try:
                write_all(fd, data)
            finally:
                os.close(fd)

        commit(tmp, str(self.entry_path(entry.key)), write)

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

    def lookup(self, key: str) -> Entry | None:
        """The entry for `key`, or None (none, or of another version).

        Raises BadEntry for an entry that is not valid (it is deleted first).
        An entry of an older version is deleted too, quietly: it is a miss.
        """
        path = self.entry_path(key)
        try:
            with open(path, "rb") as handle:
                raw = handle.read(MAX_ENTRY_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise BadEntry(f"it cannot be read ({exc.strerror})") from None
        try:
            entry = load_entry(raw, key)
        except BadEntry:
            path.unlink(missing_ok=True)
            raise
        if entry is None and is_older_version(raw):
            path.unlink(missing_ok=True)
        return entry

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
        self.entry_path(key).unlink(missing_ok=True)

    def restore(self, entry: Entry, project: Path, fp: Fingerprinter) -> dict[str, str]:
        """Put an entry's outputs in place, verified; return their fingerprints (restore.py)."""
        return restore_entry(str(self.objects_dir), entry, project, fp)

    def check_cost(self, entry: Entry) -> None:
        """Raise SlowerThanRunning when restoring `entry` should take longer than its step."""
        check_cost(entry)

    # -- maintenance --------------------------------------------------------

    def entry_files(self) -> Iterator[tuple[str, Path]]:
        """(key, path) of every entry file."""
        if not self.runs_dir.is_dir():
            return
        for folder in sorted(self.runs_dir.iterdir()):
            for path in sorted(folder.glob("*.json")):
                yield folder.name + path.stem, path

    def entries(self) -> Iterator[tuple[Path, Entry]]:
        """Every valid entry of this version, with its file (invalid and old ones are deleted)."""
        for key, path in self.entry_files():
            try:
                entry = self.lookup(key)
            except BadEntry:
                continue
            if entry is not None:
                yield path, entry

    def object_files(self) -> Iterator[tuple[str, Path]]:
        """(digest, path) of every object on disk."""
        if not self.objects_dir.is_dir():
            return
        for folder in self.objects_dir.iterdir():
            if folder.is_dir():
                for path in folder.iterdir():
                    if not path.name.startswith(".tmp-"):
                        yield folder.name + path.name, path


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
