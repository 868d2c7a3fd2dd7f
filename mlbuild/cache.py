"""The local output cache: content-addressed objects and run-cache entries.

Layout, under `.mlbuild/cache/`:

- `objects/<d[:2]>/<d[2:]>`: the bytes of one output file, named by its BLAKE3
  digest `d`. Written as a temp file in the same directory, then renamed, so
  an object is never half-written. Objects are copies, never hard links into
  the workspace: a user editing a restored output cannot corrupt the cache.
- `runs/<k[:2]>/<k[2:]>.json`: one entry per target key `k` (a digest over the
  target's name, action, code, params, env, packages, input digests and output
  paths). It lists each output's recorded fingerprint and, for a directory,
  its tree: `[relative path, "file:<digest>" | "dir:" | "link:<hash>", mode,
  link target]`. Written last, by rename, as the commit point.

Restoring copies each object to a temp file beside the output (a
copy-on-write clone where the filesystem supports `copy_file_range` reflinks),
hashes the copy, and renames it into place only if the digest matches; a
mismatch means a corrupted object, which is deleted with its entry, and the
target simply runs.
"""

from __future__ import annotations

import json
import os
import shutil
import stat as _stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3

# parse_size lives in config (resource sizes); re-exported here for `mlbuild gc --max-size`.
from mlbuild.config import STATE_DIR
from mlbuild.config import parse_size as parse_size
from mlbuild.fingerprint import (
    PARALLEL_MIN_FILES,
    READ_CHUNK,
    Fingerprinter,
    StatEntry,
    hash_bytes,
    hash_file,
)
from mlbuild.staleness import Fingerprint, Observation

ENTRY_VERSION = 1
_HEX = frozenset("0123456789abcdef")


class CacheError(Exception):
    """The cache cannot be used for this operation (unwritable, full disk, bad entry)."""


class CorruptObject(CacheError):
    """An object's bytes do not match its digest."""


@dataclass(frozen=True)
class Entry:
    """A run-cache entry: the outputs a target produced for one key."""

    key: str
    target: str
    created: float
    duration: float
    outputs: Mapping[str, Any]  # path -> {"fingerprint": ..., "tree": [...] for dirs}
    size: int

    def objects(self) -> set[str]:
        """Digests of every object the entry needs."""
        found: set[str] = set()
        for out in self.outputs.values():
            fp = out["fingerprint"]
            if fp.startswith("file:"):
                found.add(fp[5:])
            for _, value, _, _ in out.get("tree", ()):
                if value.startswith("file:"):
                    found.add(value[5:])
        return found


def entry_payload(entry: Entry) -> dict[str, Any]:
    """The JSON form of an entry, as written to `runs/` (and, extended, to a remote's `ac/`)."""
    return {
        "version": ENTRY_VERSION,
        "key": entry.key,
        "target": entry.target,
        "created": entry.created,
        "duration": entry.duration,
        "size": entry.size,
        "outputs": entry.outputs,
    }


def parse_entry(data: Any, key: str) -> Entry | None:
    """An entry from its JSON form, or None when it is not one of this version for `key`."""
    if not isinstance(data, dict) or data.get("version") != ENTRY_VERSION:
        return None
    if data.get("key") != key:
        return None
    try:
        return Entry(
            key, data["target"], data["created"], data["duration"], data["outputs"], data["size"]
        )
    except KeyError:
        return None


def check_entry(entry: Entry) -> str | None:
    """What makes an entry unsafe or malformed, or None; for entries from elsewhere.

    A remote cache is written by other machines, so nothing in an entry is
    used before this passes: every digest is hex (digests become paths), every
    output path is relative and stays inside the project (and out of
    `.mlbuild/`), every directory child stays inside its directory and never
    lies below a symlink or a file of the same tree (restoring it would write
    through the link), a symlink's target matches its recorded digest, modes
    are plain permission bits.
    """
    if not is_digest(entry.key):
        return "its key is not a digest"
    if not isinstance(entry.outputs, Mapping) or not entry.outputs:
        return "it lists no outputs"
    for path, out in entry.outputs.items():
        if not isinstance(path, str) or not _inside(Path("."), path):
            return f"output path {str(path)[:80]!r} is not inside the project"
        if path == STATE_DIR or path.startswith(STATE_DIR + "/") or "\\" in path:
            return f"output path {path[:80]!r} is not inside the project"
        if not isinstance(out, Mapping) or not isinstance(out.get("fingerprint"), str):
            return f"output {path} has no fingerprint"
        fingerprint = out["fingerprint"]
        if fingerprint.startswith("file:"):
            problem = _check_file(fingerprint[5:], out.get("mode", 0o644))
        elif fingerprint.startswith("dir:") and is_digest(fingerprint[4:]):
            problem = _check_tree(out.get("tree"))
        else:
            problem = f"fingerprint {fingerprint[:80]!r} is not a file or directory digest"
        if problem is not None:
            return f"output {path}: {problem}"
    return None


def _check_file(digest: Any, mode: Any) -> str | None:
    if not isinstance(digest, str) or not is_digest(digest):
        return "a file digest is not hex"
    if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o777:
        return f"mode {mode!r} is not plain permission bits"
    return None


def _check_tree(tree: Any) -> str | None:
    if not isinstance(tree, list):
        return "its directory tree is missing"
    blocked: set[str] = set()  # children that are not directories: nothing may lie below them
    children: list[str] = []
    for item in tree:
        if not isinstance(item, list) or len(item) != 4:
            return "a directory entry is malformed"
        child, value, mode, link = item
        if not (isinstance(child, str) and isinstance(value, str) and _inside(Path("."), child)):
            return f"directory entry {str(child)[:80]!r} leaves its directory"
        norm = os.path.normpath(child)
        if value.startswith("file:"):
            problem = _check_file(value[5:], mode)
            if problem is not None:
                return problem
        elif value.startswith("link:"):
            if not isinstance(link, str) or hash_bytes(os.fsencode(link)) != value[5:]:
                return f"symlink {child[:80]!r} does not match its digest"
        elif value != "dir:":
            return f"directory entry {child[:80]!r} has an unknown kind"
        if value != "dir:":
            blocked.add(norm)
        children.append(norm)
    for norm in children:
        parts = norm.split(os.sep)
        for i in range(1, len(parts)):
            if os.sep.join(parts[:i]) in blocked:
                return f"directory entry {norm[:80]!r} lies below a file or symlink"
    return None


def cache_key(target_name: str, fingerprint: Fingerprint, output_paths: Iterable[str]) -> str:
    """The run-cache key: everything the outputs depend on, and where they go."""
    data = json.loads(fingerprint.to_json())
    data.pop("outputs", None)
    data["target"] = target_name
    data["output_paths"] = sorted(output_paths)
    return hash_bytes(json.dumps(data, sort_keys=True, separators=(",", ":")).encode())


def is_digest(text: str) -> bool:
    """A 64-character lowercase hex digest (anything else is never used as a path)."""
    return len(text) == 64 and set(text) <= _HEX


def _copy(src: str, dst_fd: int) -> None:
    """Copy a file's bytes into an open descriptor, in the kernel where possible.

    `copy_file_range` clones extents (copy-on-write) on filesystems that
    support reflinks (Btrfs, XFS) and copies in the kernel elsewhere; a plain
    read/write loop covers the rest (other filesystems, other systems).
    """
    with open(src, "rb") as source:
        src_fd = source.fileno()
        size = os.fstat(src_fd).st_size
        copied = 0
        try:
            while copied < size:
                n = os.copy_file_range(src_fd, dst_fd, size - copied)
                if n == 0:
                    break
                copied += n
            return
        except (OSError, AttributeError):
            os.lseek(src_fd, copied, os.SEEK_SET)
            os.lseek(dst_fd, copied, os.SEEK_SET)
        while chunk := os.read(src_fd, 1 << 20):
            view = memoryview(chunk)
            while view:
                view = view[os.write(dst_fd, view) :]


class Cache:
    """Objects and entries under `root` (`.mlbuild/cache`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects_dir = root / "objects"
        self.runs_dir = root / "runs"
        self._made: set[Path] = set()

    def _mkdir(self, path: Path) -> None:
        """mkdir -p, once per directory per build (a build may store hundreds of outputs)."""
        if path not in self._made:
            path.mkdir(parents=True, exist_ok=True)
            self._made.add(path)

    def object_path(self, digest: str) -> Path:
        return self.objects_dir / digest[:2] / digest[2:]

    def entry_path(self, key: str) -> Path:
        return self.runs_dir / key[:2] / f"{key[2:]}.json"

    # -- saving -------------------------------------------------------------

    def save(
        self, key: str, target: str, project: Path, observation: Observation, duration: float
    ) -> Entry:
        """Store a target's outputs and then its entry. Raises CacheError on any OSError."""
        try:
            return self._save(key, target, project, observation, duration)
        except OSError as exc:
            raise CacheError(f"cannot write the cache in {self.root}: {exc.strerror}") from exc

    def _save(
        self, key: str, target: str, project: Path, observation: Observation, duration: float
    ) -> Entry:
        fingerprints = observation.fingerprint.outputs
        outputs, files = describe_outputs(project, fingerprints, observation.listings)
        for digest, (src, _) in files.items():
            self._put(src, digest)
        size = sum(n for _, n in files.values())
        entry = Entry(key, target, time.time(), duration, outputs, size)
        self.write_entry(entry)
        return entry

    def write_entry(self, entry: Entry) -> None:
        """Write an entry (its objects must be in place already): the commit point."""
        data = json.dumps(entry_payload(entry)).encode()
        self._write_atomic(self.entry_path(entry.key), data)

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
        self._mkdir(dest.parent)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        os.close(fd)
        try:
            fill(tmp)
            actual = hash_file(tmp, os.path.getsize(tmp))
            if actual != digest:
                raise CorruptObject(
                    f"blob {digest[:12]} is corrupted (its bytes hash to {actual[:12]})"
                )
            os.chmod(tmp, 0o444)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _put(self, src: str, digest: str) -> None:
        dest = self.object_path(digest)
        if dest.exists():
            return
        self._mkdir(dest.parent)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        try:
            try:
                _copy(src, fd)
                os.fchmod(fd, 0o444)
            finally:
                os.close(fd)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _write_atomic(self, dest: Path, data: bytes) -> None:
        self._mkdir(dest.parent)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # -- looking up and restoring --------------------------------------------

    def lookup(self, key: str) -> Entry | None:
        """The entry for `key`, or None (missing, unreadable or of another version)."""
        try:
            data = json.loads(self.entry_path(key).read_bytes())
        except (OSError, ValueError):
            return None
        return parse_entry(data, key)

    def drop(self, key: str) -> None:
        self.entry_path(key).unlink(missing_ok=True)

    def restore(self, entry: Entry, project: Path, fp: Fingerprinter) -> dict[str, str]:
        """Put an entry's outputs in place, verified; return their fingerprints.

        Raises CorruptObject (the bad object is deleted) or CacheError (a
        missing object, an unusable entry); outputs are then left removed.
        """
        missing = [
            d for d in entry.objects() if not is_digest(d) or not self.object_path(d).exists()
        ]
        if missing:
            raise CacheError(f"object {missing[0][:12]} is missing")
        restored: dict[str, str] = {}
        for path, out in entry.outputs.items():
            if not _inside(project, path):
                raise CacheError(f"entry names a path outside the project: {path}")
            full = project / path
            full.parent.mkdir(parents=True, exist_ok=True)
            fingerprint = out["fingerprint"]
            if fingerprint.startswith("file:"):
                self._restore_file(fingerprint[5:], full, out.get("mode", 0o644), fp, path)
            else:
                self._restore_dir(out["tree"], full, fp, path)
            restored[path] = fingerprint
        return restored

    def _restore_file(
        self, digest: str, dest: Path, mode: int, fp: Fingerprinter, rel: str
    ) -> None:
        source = str(self.object_path(digest))
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.mlbuild-")
        try:
            checked_ns = time.time_ns()
            try:
                _copy(source, fd)
                os.fchmod(fd, mode & 0o7777 | 0o200)
            finally:
                os.close(fd)
            st = os.stat(tmp)
            actual = hash_file(tmp, st.st_size)
            if actual != digest:
                self.object_path(digest).unlink(missing_ok=True)
                raise CorruptObject(
                    f"object {digest[:12]} is corrupted (its bytes hash to {actual[:12]})"
                )
            os.replace(tmp, dest)
            fp.remember(rel, StatEntry(st.st_size, st.st_mtime_ns, st.st_ino, checked_ns, digest))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _restore_dir(self, tree: list[list[Any]], dest: Path, fp: Fingerprinter, rel: str) -> None:
        """Rebuild a directory in a private staging folder, then rename it into place.

        Files are copied and verified in one pass each (read the object, hash,
        write), on one thread per CPU plus one: a 5,000-file tree is mostly
        per-file system calls, which release the GIL.
        """
        staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.mlbuild-"))
        try:
            files: list[tuple[str, str, int]] = []
            for child, value, mode, link in tree:
                if not _inside(staging, child):
                    raise CacheError(f"entry names a path outside its directory: {child}")
                target = staging / child
                if value == "dir:":
                    target.mkdir(parents=True, exist_ok=True)
                elif value.startswith("link:"):
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.symlink_to(link)
                elif value.startswith("file:"):
                    target.parent.mkdir(parents=True, exist_ok=True)
                    files.append((child, value[5:], mode))
            for child, stat_entry in self._fill_all(staging, files):
                fp.remember(f"{rel}/{child}", stat_entry)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(staging, dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _fill_all(
        self, staging: Path, files: list[tuple[str, str, int]]
    ) -> list[tuple[str, StatEntry]]:
        if len(files) < PARALLEL_MIN_FILES:
            return self._fill_some(staging, files)
        from concurrent.futures import ThreadPoolExecutor

        workers = min(16, (os.cpu_count() or 1) + 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            parts = pool.map(
                lambda part: self._fill_some(staging, part),
                [files[i::workers] for i in range(workers)],
            )
            return [item for part in parts for item in part]

    def _fill_some(
        self, staging: Path, files: list[tuple[str, str, int]]
    ) -> list[tuple[str, StatEntry]]:
        """Write objects as new files in `staging`, verifying each; one buffer per call."""
        buffer = bytearray(READ_CHUNK)
        view = memoryview(buffer)
        done: list[tuple[str, StatEntry]] = []
        for child, digest, mode in files:
            path = str(staging / child)
            checked_ns = time.time_ns()
            hasher = blake3.blake3()
            with open(self.object_path(digest), "rb", buffering=0) as source:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode & 0o7777 | 0o200)
                try:
                    while n := source.readinto(buffer):
                        hasher.update(view[:n])
                        written = 0
                        while written < n:
                            written += os.write(fd, view[written:n])
                finally:
                    os.close(fd)
            actual = hasher.hexdigest()
            if actual != digest:
                self.object_path(digest).unlink(missing_ok=True)
                raise CorruptObject(
                    f"object {digest[:12]} is corrupted (its bytes hash to {actual[:12]})"
                )
            st = os.stat(path)
            done.append(
                (child, StatEntry(st.st_size, st.st_mtime_ns, st.st_ino, checked_ns, digest))
            )
        return done

    # -- maintenance --------------------------------------------------------

    def entries(self) -> Iterator[tuple[Path, Entry]]:
        """Every readable entry, with its file."""
        if not self.runs_dir.is_dir():
            return
        for folder in sorted(self.runs_dir.iterdir()):
            for path in sorted(folder.glob("*.json")):
                entry = self.lookup(folder.name + path.stem)
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


def describe_outputs(
    project: Path, fingerprints: Mapping[str, str], listings: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, tuple[str, int]]]:
    """An entry's `outputs` for observed outputs, and the files behind them.

    Returns (outputs, files): `outputs` maps each path to its fingerprint and
    mode, or for a directory its tree `[relative path, "file:<digest>" |
    "dir:" | "link:<hash>", mode, link target]`; `files` maps each digest to
    (one absolute path holding those bytes, size). Raises CacheError for an
    output that is neither a file nor a directory.
    """
    outputs: dict[str, Any] = {}
    files: dict[str, tuple[str, int]] = {}
    for path, fingerprint in fingerprints.items():
        full = project / path
        if fingerprint.startswith("file:"):
            st = full.stat()
            files[fingerprint[5:]] = (str(full), st.st_size)
            outputs[path] = {"fingerprint": fingerprint, "mode": _stat.S_IMODE(st.st_mode)}
        elif fingerprint.startswith("dir:"):
            tree: list[list[Any]] = []
            for rel, value in listings[fingerprint]:
                child = full / rel
                st = child.lstat()
                link = os.readlink(child) if value.startswith("link:") else ""
                if value.startswith("file:"):
                    files[value[5:]] = (str(child), st.st_size)
                tree.append([rel, value, _stat.S_IMODE(st.st_mode), link])
            outputs[path] = {"fingerprint": fingerprint, "tree": tree}
        else:
            raise CacheError(f"output {path} cannot be cached ({fingerprint.split(':')[0]})")
    return outputs, files


def _inside(root: Path, rel: str) -> bool:
    """A relative path that stays below `root` once normalized."""
    if os.path.isabs(rel):
        return False
    norm = os.path.normpath(rel)
    return norm != ".." and not norm.startswith(".." + os.sep) and norm != "."


@dataclass(frozen=True)
class GcReport:
    """What `mlbuild gc` removed and kept."""

    entries_removed: int
    objects_removed: int
    bytes_freed: int
    entries_kept: int
    bytes_kept: int


def collect_garbage(
    cache: Cache,
    current: Mapping[str, Mapping[str, str]],
    *,
    max_size: int | None = None,
    keep_runs: int | None = None,
) -> GcReport:
    """Delete entries and objects that are neither current nor among the newest kept.

    `current` maps each target to the output fingerprints of its manifest: the
    entries producing exactly those are always kept. Of the others, the newest
    are kept up to `max_size` bytes of objects in all and `keep_runs` entries
    per target; with neither limit every entry is kept and only objects no
    entry references (and leftover temp files) are removed.
    """
    entries = list(cache.entries())
    sizes = {digest: path.stat().st_size for digest, path in cache.object_files()}
    kept: list[Entry] = []
    others: list[tuple[Path, Entry]] = []
    for path, entry in entries:
        outputs = {p: o["fingerprint"] for p, o in entry.outputs.items()}
        if current.get(entry.target) == outputs:
            kept.append(entry)
        else:
            others.append((path, entry))
    others.sort(key=lambda item: item[1].created, reverse=True)
    kept_objects = set().union(*(e.objects() for e in kept)) if kept else set()
    per_target: dict[str, int] = {}
    removed_entries = 0
    for path, entry in others:
        count = per_target.get(entry.target, 0)
        objects = entry.objects()
        grown = kept_objects | objects
        too_many = keep_runs is not None and count >= keep_runs
        too_big = max_size is not None and sum(sizes.get(d, 0) for d in grown) > max_size
        if too_many or too_big:
            path.unlink(missing_ok=True)
            removed_entries += 1
            continue
        per_target[entry.target] = count + 1
        kept.append(entry)
        kept_objects = grown
    objects_removed = bytes_freed = 0
    for digest, path in cache.object_files():
        if digest not in kept_objects:
            bytes_freed += sizes.get(digest, 0)
            path.unlink(missing_ok=True)
            objects_removed += 1
    _remove_stale_temp_files(cache.root)
    bytes_kept = sum(sizes.get(d, 0) for d in kept_objects)
    return GcReport(removed_entries, objects_removed, bytes_freed, len(kept), bytes_kept)


def _remove_stale_temp_files(root: Path, older_than: float = 3600.0) -> None:
    """Temp files of writers that died (an hour old: no live writer takes that long)."""
    limit = time.time() - older_than
    for tmp in root.glob("*/*/.tmp-*"):
        try:
            if tmp.stat().st_mtime < limit:
                tmp.unlink()
        except OSError:
            continue


def verify_objects(cache: Cache) -> tuple[int, list[str]]:
    """Hash every object; delete and return the digests of corrupted ones."""
    checked = 0
    corrupt: list[str] = []
    for digest, path in cache.object_files():
        checked += 1
        if hash_file(path, path.stat().st_size) != digest:
            path.unlink(missing_ok=True)
            corrupt.append(digest)
    return checked, corrupt
