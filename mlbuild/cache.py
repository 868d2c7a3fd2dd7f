"""The local output cache: content-addressed objects and run-cache entries.

Layout, under `.mlbuild/cache/`:

- `objects/<d[:2]>/<d[2:]>`: the bytes of one output file, named by its BLAKE3
  digest `d`. Written as a temp file in the same directory, then renamed, so
  an object is never half-written; holes of sparse files stay holes. Objects
  are copies, never hard links into the workspace: a user editing a restored
  output cannot corrupt the cache.
- `runs/<k[:2]>/<k[2:]>.json`: one entry per target key `k` (a digest over the
  target's name, action, code, params, env, packages, input digests and output
  paths). Written last, by rename, as the commit point. Format version 2:
  `{"version": 2, "key", "target", "created", "duration", "size", "outputs"}`
  where `outputs` maps each output path to `{"fingerprint": "file:<d>",
  "mode"}` or `{"fingerprint": "dir:<d>", "mode", "tree"}`, and a tree lists
  `[relative path, "file:<d>" | "dir:" | "link:<hash>", mode, link target]`
  sorted by path. Entries of another version are a miss (version 1 had no
  directory modes); an old one is deleted when met.

Nothing in an entry is used before `parse_entry` accepted all of it, for
entries read here as for records from a remote (remote.py): its types and
ranges, every path (relative, no `.`, `..`, empty or `.mlbuild` component, no
NUL, at most 128 levels and 4,095 bytes, names of at most 255 bytes), every
directory entry below a directory of the same tree, symlinks whose targets
resolve inside their output (other links of the tree followed), modes that are
permissions without setuid, setgid, sticky or world-write bits, and the
directory digest recomputed from the tree. Outputs that do not fit (a symlink
leading out of its directory, say) are not cached at all (`Uncacheable`).
Modes are recorded as they are minus those bits: a file must be readable and a
directory usable by its owner.

Restoring assembles every output in `.mlbuild/staging/<pid>-<random>/` (the
same filesystem as the project, so the final step is a rename; a private
folder beside the output when that is another filesystem), under short names
whatever the output's name. Each file is copied from its object and checked
against its digest: small files are read, hashed and written in one pass,
large ones are copied extent by extent in the kernel (`copy_file_range`, which
clones on Btrfs and XFS; holes skipped) and the copy hashed, holes as zeros.
A mismatch means a corrupted object, which is deleted, and the target simply
runs. Only when every output is staged are they renamed into place (what they
replace goes into the staging folder, deleted with it). A restore killed
midway leaves its folder in `.mlbuild/staging/`, never in the project:
`clear_staging` removes it at the next start.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import math
import os
import re
import stat as _stat
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import blake3

# parse_size lives in config (resource sizes); wrapped here for `mlbuild gc --max-size`.
from mlbuild.config import STATE_DIR
from mlbuild.config import parse_size as _parse_size
from mlbuild.errors import MlbuildError, UsageError
from mlbuild.fingerprint import PARALLEL_MIN_FILES, Fingerprinter, StatEntry, hash_bytes
from mlbuild.staleness import Fingerprint, Observation
from mlbuild.workspace import OutsideProject, staging_dir, writable_path

ENTRY_VERSION = 2
_DIGEST = re.compile("[0-9a-f]{64}")
# Paths whose every name is plain ASCII not starting with a dot (so never `.`, `..` or
# `.mlbuild`) and at most 255 bytes long: most of them, checked by one match.
_PLAIN_PATH = re.compile(r"[\w+=,@-][\w.+=,@-]{0,254}(?:/[\w+=,@-][\w.+=,@-]{0,254})*", re.ASCII)

# Bounds of what an entry may hold: far above real outputs, far below what
# would exhaust memory, the recursion limit or the filesystem's name limits.
MAX_OUTPUTS = 10_000
MAX_ITEMS = 2_000_000  # directory entries, all outputs of one entry together
MAX_DEPTH = 128  # path components (a 2,000-level path would overflow mkdir -p)
MAX_PATH_BYTES = 4095
MAX_NAME_BYTES = 255
MAX_TARGET_CHARS = 1024
MAX_DURATION = 1e8  # seconds (three years)
MAX_FUTURE = 30 * 86400.0  # clock skew tolerated in `created`
MAX_BYTES = 1 << 60
MAX_ENTRY_BYTES = 1 << 28  # the JSON of one entry
MAX_LINK_HOPS = 40  # as Linux's path resolution
# Permission bits an entry may record: no setuid, setgid, sticky or world-write.
MODE_BITS = 0o775

# Files at least this large are copied by extents in the kernel and hashed from the copy.
LARGE_FILE = 8 << 20
_CHUNK = 1 << 22
_ZEROS = memoryview(bytes(_CHUNK))
# Restore cost model (measured with bench/features.py on a 2-CPU VM, ext4):
# per file, per directory or symlink, and per byte of file data.
RESTORE_SECONDS_PER_FILE = 40e-6
RESTORE_SECONDS_PER_OTHER = 15e-6
RESTORE_BYTES_PER_SECOND = 400e6


_T = TypeVar("_T")
_R = TypeVar("_R")


class CacheError(MlbuildError):
    """The cache cannot be used for this operation (unwritable, full disk, bad entry)."""


class CorruptObject(CacheError):
    """An object's bytes do not match its digest."""


class BadEntry(CacheError):
    """An entry that must not be used: malformed, out of bounds or unsafe."""


class Uncacheable(CacheError):
    """One target's outputs cannot be cached (the cache itself is fine)."""


class SlowerThanRunning(MlbuildError):
    """Restoring an entry is expected to take longer than its step did."""


class Entry(NamedTuple):
    """A run-cache entry: the outputs a target produced for one key."""

    key: str
    target: str
    created: float
    duration: float
    outputs: Mapping[str, Any]  # path -> {"fingerprint", "mode"[, "tree"]}
    size: int  # bytes of its distinct objects

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

    def counts(self) -> tuple[int, int]:
        """(files, other tree entries: directories and symlinks) a restore creates."""
        files = others = 0
        for out in self.outputs.values():
            if "tree" not in out:
                files += 1
                continue
            others += 1
            for _, value, _, _ in out["tree"]:
                if value.startswith("file:"):
                    files += 1
                else:
                    others += 1
        return files, others


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


_FIELDS = frozenset(entry_payload(Entry("", "", 0.0, 0.0, {}, 0)))


# -- checking entries -----------------------------------------------------------


def load_entry(raw: bytes, key: str, extra: frozenset[str] = frozenset()) -> Entry | None:
    """An entry from the bytes of its JSON; None when it is of another version.

    Raises BadEntry for anything else that is not a valid entry for `key`
    (`extra` names further top-level fields allowed, a remote record's).
    """
    if len(raw) > MAX_ENTRY_BYTES:
        raise BadEntry(f"it is larger than {MAX_ENTRY_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadEntry("it is not JSON") from None
    return parse_entry(data, key, extra)


def parse_entry(data: Any, key: str, extra: frozenset[str] = frozenset()) -> Entry | None:
    """An entry from its JSON form; None when of another version; BadEntry when invalid."""
    if not isinstance(data, dict) or not _is_int(data.get("version")):
        raise BadEntry("it is not an mlbuild cache entry")
    if data["version"] != ENTRY_VERSION:
        return None
    unknown = set(data) - _FIELDS - extra
    if unknown:
        raise BadEntry(f"unknown field {sorted(unknown)[0][:40]!r}")
    missing = _FIELDS - set(data)
    if missing:
        raise BadEntry(f"field {sorted(missing)[0]!r} is missing")
    if data["key"] != key:
        raise BadEntry("it is the entry of another key")
    entry = Entry(
        key, data["target"], data["created"], data["duration"], data["outputs"], data["size"]
    )
    _check(entry)
    return entry


def check_entry(entry: Entry) -> str | None:
    """What makes an entry malformed or unsafe, or None (see the module docstring)."""
    try:
        _check(entry)
    except BadEntry as exc:
        return str(exc)
    return None


def _check(entry: Entry) -> None:
    if not isinstance(entry.key, str) or not is_digest(entry.key):
        raise BadEntry("its key is not a digest")
    target = entry.target
    if not isinstance(target, str) or not 0 < len(target) <= MAX_TARGET_CHARS or "\0" in target:
        raise BadEntry("its target is not a target name")
    _check_number("created", entry.created, time.time() + MAX_FUTURE)
    _check_number("duration", entry.duration, MAX_DURATION)
    if not _is_int(entry.size) or not 0 <= entry.size <= MAX_BYTES:
        raise BadEntry(f"size {str(entry.size)[:40]} is not a byte count")
    outputs = entry.outputs
    if not isinstance(outputs, dict) or not 0 < len(outputs) <= MAX_OUTPUTS:
        raise BadEntry("it lists no outputs, or too many")
    items = 0
    for path, out in outputs.items():
        _check_path(path, "output path")
        if "\\" in path:
            raise BadEntry(f"output path {path[:80]!r} is not portable")
        try:
            items += _check_output(path, out)
        except BadEntry as exc:
            raise BadEntry(f"output {path[:80]}: {exc}") from None
        if items > MAX_ITEMS:
            raise BadEntry(f"it lists more than {MAX_ITEMS:,} directory entries")
    paths = sorted(outputs)
    for before, after in itertools.pairwise(paths):
        if after.startswith(before + "/"):
            raise BadEntry(f"output {after[:80]} lies inside output {before[:80]}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_number(name: str, value: Any, most: float) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise BadEntry(f"{name} {str(value)[:40]!r} is not a number")
    if not (math.isfinite(value) and 0 <= value <= most):
        raise BadEntry(f"{name} {str(value)[:40]} is out of range")


def _check_path(path: Any, what: str) -> None:
    """A relative path in normal form: no empty, `.`, `..` or `.mlbuild` part, no NUL."""
    if not isinstance(path, str) or not path:
        raise BadEntry(f"{what} {str(path)[:80]!r} is not a path")
    if _PLAIN_PATH.fullmatch(path) and len(path) <= MAX_PATH_BYTES and path.count("/") < MAX_DEPTH:
        return
    try:
        size = len(os.fsencode(path))
    except UnicodeError:
        raise BadEntry(f"{what} {path[:80]!r} cannot be a file name") from None
    if size > MAX_PATH_BYTES or "\0" in path:
        raise BadEntry(f"{what} {path[:80]!r} is too long or holds NUL")
    parts = path.split("/")
    if len(parts) > MAX_DEPTH:
        raise BadEntry(f"{what} {path[:80]!r} is more than {MAX_DEPTH} levels deep")
    for part in parts:
        if part in ("", ".", "..", STATE_DIR):
            where = "the project" if what == "output path" else "its directory"
            raise BadEntry(f"{what} {path[:80]!r} is not inside {where}")
        # A name of at most 63 characters has at most 252 bytes: only longer ones are encoded.
        if len(part) > MAX_NAME_BYTES // 4 and len(os.fsencode(part)) > MAX_NAME_BYTES:
            raise BadEntry(f"{what} {path[:80]!r} has a name longer than {MAX_NAME_BYTES} bytes")


def file_mode_ok(mode: Any) -> bool:
    """A file mode an entry may hold: permissions without special or world-write bits."""
    return _is_int(mode) and mode & ~MODE_BITS == 0 and mode & 0o400 != 0


def dir_mode_ok(mode: Any) -> bool:
    """A directory mode an entry may hold: as a file's, and usable by its owner."""
    return _is_int(mode) and mode & ~MODE_BITS == 0 and mode & 0o700 == 0o700


def _show_mode(mode: Any) -> str:
    return f"{mode:#o}" if _is_int(mode) and 0 <= mode < 1 << 32 else repr(mode)[:20]


def _check_output(path: str, out: Any) -> int:
    """Check one output; the number of directory entries it lists."""
    if not isinstance(out, dict) or not isinstance(out.get("fingerprint"), str):
        raise BadEntry("it has no fingerprint")
    fingerprint = out["fingerprint"]
    kind, _, digest = fingerprint.partition(":")
    if kind == "file" and is_digest(digest) and set(out) == {"fingerprint", "mode"}:
        if not file_mode_ok(out["mode"]):
            raise BadEntry(f"file mode {_show_mode(out['mode'])} is not allowed")
        return 0
    if kind == "dir" and is_digest(digest) and set(out) == {"fingerprint", "mode", "tree"}:
        if not dir_mode_ok(out["mode"]):
            raise BadEntry(f"directory mode {_show_mode(out['mode'])} is not allowed")
        return _check_tree(out["tree"], digest)
    raise BadEntry(f"fingerprint {fingerprint[:80]!r} is not a file or directory digest")


def _check_tree(tree: Any, digest: str) -> int:
    if not isinstance(tree, list) or len(tree) > MAX_ITEMS:
        raise BadEntry("its directory tree is missing or too large")
    kinds: dict[str, str] = {}  # child -> "dir", "file" or "link"
    links: dict[str, str] = {}
    previous = ""
    for item in tree:
        if not isinstance(item, list) or len(item) != 4:
            raise BadEntry("a directory entry is malformed")
        child, value, mode, link = item
        _check_path(child, "directory entry")
        if child <= previous:
            raise BadEntry(f"directory entry {child[:80]!r} is out of order or repeated")
        previous = child
        parent = child.rpartition("/")[0]
        if parent and kinds.get(parent) != "dir":
            raise BadEntry(f"directory entry {child[:80]!r} does not lie below a directory")
        if not isinstance(value, str) or not isinstance(link, str):
            raise BadEntry(f"directory entry {child[:80]!r} is malformed")
        if value == "dir:" and link == "":
            if not dir_mode_ok(mode):
                raise BadEntry(f"directory {child[:80]!r}: mode {_show_mode(mode)} is not allowed")
            kinds[child] = "dir"
        elif value.startswith("file:") and is_digest(value[5:]) and link == "":
            if not file_mode_ok(mode):
                raise BadEntry(f"file {child[:80]!r}: mode {_show_mode(mode)} is not allowed")
            kinds[child] = "file"
        elif value.startswith("link:") and mode == 0 and not isinstance(mode, bool):
            _check_link(child, value[5:], link)
            kinds[child] = "link"
            links[child] = link
        else:
            raise BadEntry(f"directory entry {child[:80]!r} is malformed")
    for child, link in links.items():
        if not _link_stays_inside(kinds, links, child, link):
            raise BadEntry(f"symlink {child[:80]!r} leads out of its directory")
    text = "".join(f"{item[1]} {item[0]}\n" for item in tree)
    if hash_bytes(text.encode("utf-8", "surrogateescape")) != digest:
        raise BadEntry("its tree does not match its digest")
    return len(tree)


def _check_link(child: str, digest: str, link: str) -> None:
    try:
        raw = os.fsencode(link)
    except UnicodeError:
        raise BadEntry(f"symlink {child[:80]!r} has an unusable target") from None
    if not 0 < len(raw) <= MAX_PATH_BYTES or "\0" in link or link.startswith("/"):
        raise BadEntry(f"symlink {child[:80]!r} has an unusable target")
    if hash_bytes(raw) != digest:
        raise BadEntry(f"symlink {child[:80]!r} does not match its digest")


def _link_stays_inside(
    kinds: Mapping[str, str], links: Mapping[str, str], child: str, link: str
) -> bool:
    """Whether resolving `link` from `child`'s folder stays inside the tree's directory.

    Resolved as the kernel would, part by part, following the tree's other
    symlinks (`a -> b/..` then `c -> a/../x` leaves through `a`); a part the
    tree does not hold is taken as a plain directory.
    """
    here = child.split("/")[:-1]
    todo = link.split("/")[::-1]
    hops = 0
    while todo:
        part = todo.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if not here:
                return False
            here.pop()
            continue
        here.append(part)
        path = "/".join(here)
        if kinds.get(path) == "link":
            hops += 1
            target = links[path]
            if hops > MAX_LINK_HOPS or target.startswith("/"):
                return False
            here.pop()
            todo.extend(target.split("/")[::-1])
    return True


def cache_key(target_name: str, fingerprint: Fingerprint, output_paths: Iterable[str]) -> str:
    """The run-cache key: everything the outputs depend on, and where they go."""
    data = json.loads(fingerprint.to_json())
    data.pop("outputs", None)
    data["target"] = target_name
    data["output_paths"] = sorted(output_paths)
    return hash_bytes(json.dumps(data, sort_keys=True, separators=(",", ":")).encode())


def is_digest(text: str) -> bool:
    """A 64-character lowercase hex digest (anything else is never used as a path)."""
    return _DIGEST.fullmatch(text) is not None


# -- copying and hashing files ---------------------------------------------------------


def _extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of the data in a file, holes left out (SEEK_DATA/SEEK_HOLE)."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole from here on
                return
            yield pos, size  # no hole support here: all of it is data
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        pos = end


def _copy_extents(src: int, dst: int, size: int) -> None:
    """Copy a file's data into an empty file, in the kernel where possible, holes kept.

    `copy_file_range` clones extents (copy-on-write) on filesystems with
    reflinks (Btrfs, XFS) and copies in the kernel elsewhere; pread/pwrite
    covers the rest.
    """
    for start, end in _extents(src, size):
        pos = start
        try:
            while pos < end:
                n = os.copy_file_range(src, dst, end - pos, pos, pos)
                if n == 0:
                    break
                pos += n
        except OSError:
            pass
        while pos < end:
            chunk = os.pread(src, min(_CHUNK, end - pos), pos)
            if not chunk:
                break
            pos += _pwrite_all(dst, chunk, pos)
    os.ftruncate(dst, size)


def _pwrite_all(fd: int, data: bytes, offset: int) -> int:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
    return done


def _hash_extents(fd: int, size: int) -> str:
    """BLAKE3 of a file's bytes, reading only its data: holes are hashed as zeros."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    pos = 0
    for start, end in [*_extents(fd, size), (size, size)]:
        while pos < start:
            n = min(_CHUNK, start - pos)
            hasher.update(_ZEROS[:n])
            pos += n
        while pos < end:
            n = os.preadv(fd, [view[: min(_CHUNK, end - pos)]], pos)
            if n == 0:
                return ""  # shorter than its size: it changed underneath
            hasher.update(view[:n])
            pos += n
    return hasher.hexdigest()


def _read_all(fd: int, size: int) -> bytes:
    data = os.read(fd, size)
    while len(data) < size:
        more = os.read(fd, size - len(data))
        if not more:
            break
        data += more
    return data


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (once per restore)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def portable_mode(st_mode: int, directory: bool) -> int:
    """The mode an entry records for a built file or directory (see `file_mode_ok`)."""
    return _stat.S_IMODE(st_mode) & MODE_BITS | (0o700 if directory else 0o400)


class _Staged(NamedTuple):
    """A file to write during a restore: where in staging, from which object, and its mode."""

    path: str
    digest: str
    mode: int
    rel: str  # project-relative, once in place (for the stat cache)
    umask: int  # the process's: a mode it would mask needs an fchmod


_O_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_O_NEW_RW = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_O_READ = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)


def _workers() -> int:
    return min(16, (os.cpu_count() or 1) * 2)


def _in_parts(fn: Callable[[list[_T]], list[_R]], items: list[_T]) -> list[_R]:
    """`fn` over slices of `items` in threads (file I/O and BLAKE3 release the GIL).

    Slices are contiguous: items come sorted by path, so each thread mostly
    creates files in folders of its own (a folder takes one create at a time).
    """
    if len(items) < PARALLEL_MIN_FILES:
        return fn(items)
    from concurrent.futures import ThreadPoolExecutor

    workers = _workers()
    bounds = [len(items) * i // workers for i in range(workers + 1)]
    slices = [items[a:b] for a, b in itertools.pairwise(bounds)]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mlbuild-copy") as pool:
        return [item for part in pool.map(fn, slices) for item in part]


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
                return os.open(path, _O_NEW, mode), path
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
        entry = Entry(key, target, time.time(), duration, outputs, size)
        problem = check_entry(entry)
        if problem is not None:
            raise Uncacheable(f"`{target}` not cached: {problem}")
        try:
            _in_parts(self._put_some, list(files.items()))
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
        try:
            try:
                _write_all(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, self.entry_path(entry.key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

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
        try:
            fill(tmp)
            fd = os.open(tmp, _O_READ)
            try:
                actual = _hash_extents(fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)
            if actual != digest:
                raise CorruptObject(
                    f"blob {digest[:12]} is corrupted (its bytes hash to {actual[:12]})"
                )
            os.chmod(tmp, 0o444)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

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
            try:
                try:
                    source = os.open(src, _O_READ)
                    try:
                        if size < LARGE_FILE:
                            _write_all(fd, _read_all(source, size))
                        else:
                            _copy_extents(source, fd, size)
                    finally:
                        os.close(source)
                finally:
                    os.close(fd)
                os.replace(tmp, dest)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
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
        if entry is None and _older_version(raw):
            path.unlink(missing_ok=True)
        return entry

    def drop(self, key: str) -> None:
        self.entry_path(key).unlink(missing_ok=True)

    def restore(self, entry: Entry, project: Path, fp: Fingerprinter) -> dict[str, str]:
        """Put an entry's outputs in place, verified; return their fingerprints.

        Raises CorruptObject (the bad object is deleted) or CacheError (a
        missing object, an unusable entry, a destination outside the project);
        the outputs are then as they were, or removed.
        """
        problem = check_entry(entry)
        if problem is not None:
            raise BadEntry(problem)
        staging = _Staging(project)
        try:
            return self._restore(entry, project, fp, staging)
        finally:
            staging.remove()

    def _restore(
        self, entry: Entry, project: Path, fp: Fingerprinter, staging: _Staging
    ) -> dict[str, str]:
        umask = _umask()
        planned: list[tuple[str, str, str, bool]] = []  # (rel, destination, staged, is dir)
        files: list[_Staged] = []
        for path, out in entry.outputs.items():
            try:
                dest = writable_path(project, path)
            except OutsideProject as exc:
                raise CacheError(str(exc)) from None
            parent = os.path.dirname(dest)
            os.makedirs(parent, exist_ok=True)
            staged = staging.new_name(parent)
            fingerprint, mode = out["fingerprint"], out["mode"]
            if fingerprint.startswith("file:"):
                files.append(_Staged(staged, fingerprint[5:], mode, path, umask))
                planned.append((path, dest, staged, False))
                continue
            _make_dir(staged, mode, umask)
            for child, value, child_mode, link in out["tree"]:
                full = f"{staged}/{child}"
                if value == "dir:":
                    _make_dir(full, child_mode, umask)
                elif value.startswith("link:"):
                    os.symlink(link, full)
                else:
                    files.append(_Staged(full, value[5:], child_mode, f"{path}/{child}", umask))
            planned.append((path, dest, staged, True))
        stats = _in_parts(self._fill_some, files)
        for _, dest, staged, is_dir in planned:
            try:
                st = os.lstat(dest)
            except FileNotFoundError:
                st = None
            if st is not None and (is_dir or _stat.S_ISDIR(st.st_mode)):
                os.rename(dest, staging.new_name(os.path.dirname(dest)))
            os.replace(staged, dest)
        for rel, stat_entry in stats:
            fp.remember(rel, stat_entry)
        return {path: out["fingerprint"] for path, out in entry.outputs.items()}

    def _fill_some(self, files: list[_Staged]) -> list[tuple[str, StatEntry]]:
        """Write objects as new files, verifying each against its digest."""
        objects = str(self.objects_dir)
        done: list[tuple[str, StatEntry]] = []
        for path, digest, mode, rel, umask in files:
            checked_ns = time.time_ns()
            try:
                source = os.open(f"{objects}/{digest[:2]}/{digest[2:]}", _O_READ)
            except FileNotFoundError:
                raise CacheError(f"object {digest[:12]} is missing") from None
            try:
                size = os.fstat(source).st_size
                fd = os.open(path, _O_NEW if size < LARGE_FILE else _O_NEW_RW, mode)
                try:
                    if size < LARGE_FILE:
                        data = _read_all(source, size)
                        actual = blake3.blake3(data).hexdigest()
                        if actual == digest:
                            _write_all(fd, data)
                    else:
                        _copy_extents(source, fd, size)
                        actual = _hash_extents(fd, size)
                    if mode & umask:
                        os.fchmod(fd, mode)
                    st = os.fstat(fd)
                finally:
                    os.close(fd)
            finally:
                os.close(source)
            if actual != digest:
                self.object_path(digest).unlink(missing_ok=True)
                raise CorruptObject(
                    f"object {digest[:12]} is corrupted (its bytes hash to {actual[:12]})"
                )
            done.append((rel, StatEntry(st.st_size, st.st_mtime_ns, st.st_ino, checked_ns, digest)))
        return done

    def check_cost(self, entry: Entry) -> None:
        """Raise SlowerThanRunning when restoring `entry` should take longer than its step."""
        files, others = entry.counts()
        estimate = (
            files * RESTORE_SECONDS_PER_FILE
            + others * RESTORE_SECONDS_PER_OTHER
            + entry.size / RESTORE_BYTES_PER_SECOND
        )
        if estimate > entry.duration:
            raise SlowerThanRunning(
                f"restoring {files:,} file{'' if files == 1 else 's'}"
                f" ({entry.size / 1e6:,.1f} MB) would take about"
                f" {estimate:.2f} s, its step took {entry.duration:.2f} s"
            )

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


def _older_version(raw: bytes) -> bool:
    try:
        version = json.loads(raw).get("version")
    except (ValueError, RecursionError, AttributeError):
        return False
    return _is_int(version) and version < ENTRY_VERSION


def _make_dir(path: str, mode: int, umask: int) -> None:
    os.mkdir(path, mode)
    if mode & umask:
        os.chmod(path, mode)


_ELSEWHERE = ".elsewhere"


class _Staging:
    """The folders one restore assembles its outputs in, removed when it ends.

    One folder per filesystem: `.mlbuild/staging/<pid>-<random>` for the
    project's, a `.mlbuild-<pid>-<random>` folder beside the output for another
    (a mount inside the project), so that every final move is a rename. Such
    a folder is named in `.mlbuild/staging/<pid>-<random>.elsewhere` while it
    exists, for `clear_staging` to find it after a kill.
    """

    def __init__(self, project: Path) -> None:
        self.project = project
        self.folders: dict[int, str] = {}
        self.markers: list[str] = []
        self.count = 0

    def new_name(self, parent: str) -> str:
        """A short path, not yet existing, on the filesystem of folder `parent`."""
        device = os.stat(parent).st_dev
        folder = self.folders.get(device)
        if folder is None:
            folder = self._folder(parent, device)
            self.folders[device] = folder
        self.count += 1
        return f"{folder}/{self.count}"

    def _folder(self, parent: str, device: int) -> str:
        token = f"{os.getpid()}-{os.urandom(4).hex()}"
        home = staging_dir(self.project)
        home.mkdir(parents=True, exist_ok=True)
        if os.stat(home).st_dev == device:
            path = f"{home}/{token}"
        else:
            path = f"{parent}/.mlbuild-{token}"
            marker = f"{home}/{token}{_ELSEWHERE}"
            with open(marker, "w") as handle:
                handle.write(os.path.relpath(path, self.project))
            self.markers.append(marker)
        os.mkdir(path, 0o700)
        return path

    def remove(self) -> None:
        for folder in self.folders.values():
            _remove_tree(folder)
        for marker in self.markers:
            os.unlink(marker)


def _remove_tree(path: str) -> None:
    """Delete a folder of mlbuild's own, made writable first where a mode forbids it."""
    import shutil

    def retry(function: Callable[..., Any], failed: str, _: Any) -> None:
        for folder in (os.path.dirname(failed), failed):
            with contextlib.suppress(OSError):
                if os.path.isdir(folder) and not os.path.islink(folder):
                    os.chmod(folder, 0o700)
        function(failed)

    with contextlib.suppress(OSError):
        shutil.rmtree(path, onerror=retry)


def clear_staging(root: Path) -> int:
    """Remove what killed restores left in `.mlbuild/staging/`; how many folders.

    Meant for the start of every command that restores (it holds the
    workspace lock, so no other restore is under way; a folder whose pid is
    alive and not ours is left alone all the same). One failed `scandir` when
    there is nothing.
    """
    try:
        with os.scandir(staging_dir(root)) as found:
            leftovers = list(found)
    except (FileNotFoundError, NotADirectoryError):
        return 0
    removed = 0
    for leftover in leftovers:
        pid = leftover.name.partition("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        if leftover.is_dir(follow_symlinks=False):
            _remove_tree(leftover.path)
        else:
            if leftover.name.endswith(_ELSEWHERE):
                _remove_elsewhere(root, leftover.path, leftover.name[: -len(_ELSEWHERE)])
            os.unlink(leftover.path)
        removed += 1
    return removed


def _remove_elsewhere(root: Path, marker: str, token: str) -> None:
    """The staging folder a marker names, if it is one (in the project, named for it)."""
    try:
        with open(marker) as handle:
            rel = handle.read(MAX_PATH_BYTES + 1)
        if os.path.basename(rel) == f".mlbuild-{token}":
            _remove_tree(writable_path(root, rel))
    except (OSError, ValueError, OutsideProject):
        pass  # not ours to remove


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_outputs(
    project: Path, fingerprints: Mapping[str, str], listings: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, tuple[str, int]]]:
    """An entry's `outputs` for observed outputs, and the files behind them.

    Returns (outputs, files): `outputs` maps each path to its fingerprint and
    mode, and for a directory its tree `[relative path, "file:<digest>" |
    "dir:" | "link:<hash>", mode, link target]`; `files` maps each digest to
    (one absolute path holding those bytes, size). Raises Uncacheable for an
    output that is neither a file nor a directory, OSError when one vanished.
    """
    outputs: dict[str, Any] = {}
    files: dict[str, tuple[str, int]] = {}
    for path, fingerprint in fingerprints.items():
        full = os.path.join(project, path)
        if fingerprint.startswith("file:"):
            st = os.stat(full)
            files[fingerprint[5:]] = (full, st.st_size)
            outputs[path] = {"fingerprint": fingerprint, "mode": portable_mode(st.st_mode, False)}
        elif fingerprint.startswith("dir:"):
            tree: list[list[Any]] = []
            for rel, value in listings[fingerprint]:
                child = f"{full}/{rel}"
                if value.startswith("link:"):
                    tree.append([rel, value, 0, os.readlink(child)])
                    continue
                st = os.lstat(child)
                if value.startswith("file:"):
                    files[value[5:]] = (child, st.st_size)
                tree.append([rel, value, portable_mode(st.st_mode, value == "dir:"), ""])
            mode = portable_mode(os.stat(full).st_mode, True)
            outputs[path] = {"fingerprint": fingerprint, "mode": mode, "tree": tree}
        else:
            raise Uncacheable(f"output {path} cannot be cached ({fingerprint.split(':')[0]})")
    return outputs, files


# -- mlbuild gc and cache verify ---------------------------------------------------------


class GcReport(NamedTuple):
    """What `mlbuild gc` removed and kept."""

    entries_removed: int
    objects_removed: int
    bytes_freed: int
    entries_kept: int
    bytes_kept: int


def parse_size(text: str) -> int:
    """`--max-size`: config's sizes (`10GB`, `500M`), finite and not negative."""
    try:
        size = _parse_size(text)
    except OverflowError:
        raise ValueError(f"not a size: {text!r}") from None
    if size < 0:
        raise ValueError(f"{text!r} is negative")
    return size


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
    entry references (and leftover temp files, old and invalid entries) are
    removed. A negative limit is a UsageError.
    """
    if keep_runs is not None and keep_runs < 0:
        raise UsageError(f"--keep-runs {keep_runs}: must be 0 or more")
    if max_size is not None and max_size < 0:
        raise UsageError(f"--max-size {max_size}: must be 0 or more")
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
        fd = os.open(path, _O_READ)
        try:
            actual = _hash_extents(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        if actual != digest:
            path.unlink(missing_ok=True)
            corrupt.append(digest)
    return checked, corrupt
