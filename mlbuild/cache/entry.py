"""The cache entry: what one target's run produced, its JSON form, and its validation.

An entry is written to `entries.db` by the local cache (local.py, entrydb.py) and, extended
with `blobs` and `producer`, to a remote's `ac/` (remote.py). Format version 3,
the JSON of `entry_payload`:
`{"version": 3, "key", "target", "created", "duration", "size", "outputs", "inline"}`
where `key` is the target's cache key (`manifest.cache_key`: a digest over the
target's name, action, code, params, env, packages, input digests and output
paths), and `outputs` maps each output path to `{"fingerprint": "file:<d>",
"mode"}` or `{"fingerprint": "dir:<d>", "mode", "tree"}`, and a tree lists
`[relative path, "file:<d>" | "dir:" | "link:<hash>", mode, link target]`
sorted by path. `size` counts the bytes of its distinct files.

`inline` maps the digest `d` of some of its files to their bytes in base64:
files of at most `INLINE_MAX` bytes, `INLINE_TOTAL_MAX` in all, smallest first
(local.py chooses). They have no object: saving a trivial target creates one
file, the entry, not two, and a remote serves them with the record, no blob
request. 4 KiB because a smaller object still takes an inode and a 4 KiB block
(ext4, XFS), so the entry holding it costs no more disk, while larger files
gain little (the create they save is the same) and lose the sharing of one
object between entries; the total bounds what every lookup parses.

Version 2 is version 3 without `inline`: it is still read (an upgrade keeps
the cache warm), and the version was raised so that an older mlbuild takes a
new entry as a quiet miss, not as a malformed one. Entries of other versions
are a miss (version 1 had no directory modes); an older one is deleted when met.

Nothing in an entry is used before `parse_entry` accepted all of it, for
entries read here as for records from a remote (remote.py): its types and
ranges, every path (relative, no `.`, `..`, empty or `.mlbuild` component, no
NUL, at most 128 levels and 4,095 bytes, names of at most 255 bytes), every
directory entry below a directory of the same tree, symlinks whose targets
resolve inside their output (other links of the tree followed), modes that are
permissions without setuid, setgid, sticky or world-write bits, the
directory digest recomputed from the tree, and every inline file's size and
BLAKE3 digest, which must be a file the outputs name. Outputs that do not fit
(a symlink leading out of its directory, say) are not cached at all
(`Uncacheable`). Modes are recorded as they are minus those bits: a file must
be readable and a directory usable by its owner.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import math
import os
import re
import stat as _stat
import time
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

from mlbuild.errors import MlbuildError
from mlbuild.fingerprint import hash_bytes
from mlbuild.manifest import DIR_IN_LISTING, DigestKind, file_hex, split
from mlbuild.pipeline.schema import STATE_DIR

ENTRY_VERSION = 3
_READABLE = frozenset({2, 3})  # 2: no `inline` field
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
# Output files kept in the entry itself (see the module docstring).
INLINE_MAX = 4096  # bytes of one file
INLINE_TOTAL_MAX = 64 << 10  # bytes of one entry's inline files together
_INLINE_TEXT_MAX = 4 * ((INLINE_MAX + 2) // 3)  # its base64
_NO_INLINE: Mapping[str, bytes] = MappingProxyType({})
# Permission bits an entry may record: no setuid, setgid, sticky or world-write.
MODE_BITS = 0o775


# The cache's errors, at the bottom of the package so that every module can raise them.


class CacheError(MlbuildError):
    """The cache cannot be used for this operation (unwritable, full disk, bad entry)."""


class CorruptObject(CacheError):
    """An object's bytes do not match its digest."""


class BadEntry(CacheError):
    """An entry that must not be used: malformed, out of bounds or unsafe."""


class Uncacheable(CacheError):
    """One target's outputs cannot be cached (the cache itself is fine)."""


class Entry(NamedTuple):
    """A run-cache entry: the outputs a target produced for one key."""

    key: str
    target: str
    created: float
    duration: float
    outputs: Mapping[str, Any]  # path -> {"fingerprint", "mode"[, "tree"]}
    size: int  # bytes of its distinct files, inline ones included
    inline: Mapping[str, bytes] = _NO_INLINE  # digest -> bytes of a file held in the entry

    def files(self) -> set[str]:
        """Digests of every file of its outputs."""
        found: set[str] = set()
        for out in self.outputs.values():
            for value in (out["fingerprint"], *(item[1] for item in out.get("tree", ()))):
                digest = file_hex(value)
                if digest is not None:
                    found.add(digest)
        return found

    def objects(self) -> set[str]:
        """Digests of every object the entry needs: its files but the inline ones."""
        return self.files() - self.inline.keys()

    def inline_bytes(self) -> int:
        """Bytes of the files it holds itself (what it weighs beyond its objects)."""
        return sum(len(data) for data in self.inline.values())

    def counts(self) -> tuple[int, int]:
        """(files, other tree entries: directories and symlinks) a restore creates."""
        files = others = 0
        for out in self.outputs.values():
            if "tree" not in out:
                files += 1
                continue
            others += 1
            for _, value, _, _ in out["tree"]:
                if file_hex(value) is not None:
                    files += 1
                else:
                    others += 1
        return files, others


def entry_payload(entry: Entry) -> dict[str, Any]:
    """The JSON form of an entry, as stored locally (and, extended, in a remote's `ac/`)."""
    return {
        "version": ENTRY_VERSION,
        "key": entry.key,
        "target": entry.target,
        "created": entry.created,
        "duration": entry.duration,
        "size": entry.size,
        "outputs": entry.outputs,
        "inline": {d: base64.b64encode(data).decode("ascii") for d, data in entry.inline.items()},
    }


_FIELDS = frozenset(entry_payload(Entry("", "", 0.0, 0.0, {}, 0))) - {"inline"}


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
    if data["version"] not in _READABLE:
        return None
    allowed = _FIELDS | {"inline"} if data["version"] == ENTRY_VERSION else _FIELDS
    unknown = set(data) - allowed - extra
    if unknown:
        raise BadEntry(f"unknown field {sorted(unknown)[0][:40]!r}")
    missing = _FIELDS - set(data)
    if missing:
        raise BadEntry(f"field {sorted(missing)[0]!r} is missing")
    if data["key"] != key:
        raise BadEntry("it is the entry of another key")
    inline = _decode_inline(data.get("inline", {}))
    entry = Entry(
        key,
        data["target"],
        data["created"],
        data["duration"],
        data["outputs"],
        data["size"],
        inline,
    )
    _check(entry)
    return entry


def _decode_inline(found: Any) -> dict[str, bytes]:
    """The bytes of an entry's `inline` field (their digests and sizes are `_check`'s)."""
    if not isinstance(found, dict):
        raise BadEntry("its inline files are malformed")
    inline: dict[str, bytes] = {}
    total = 0
    for digest, text in found.items():
        if not isinstance(text, str) or len(text) > _INLINE_TEXT_MAX:
            raise BadEntry(f"inline file {str(digest)[:12]!r} is malformed or too large")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise BadEntry(f"inline file {str(digest)[:12]!r} is not base64") from None
        total += len(data)
        if total > INLINE_TOTAL_MAX:
            raise BadEntry(f"its inline files hold more than {INLINE_TOTAL_MAX} bytes")
        inline[digest] = data
    return inline


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
    if entry.inline:
        _check_inline(entry)


def _check_inline(entry: Entry) -> None:
    """Each inline file one of its files, within the bounds, its bytes hashing to its digest."""
    inline = entry.inline
    if not isinstance(inline, Mapping):
        raise BadEntry("its inline files are malformed")
    files = entry.files()
    total = 0
    for digest, data in inline.items():
        if not isinstance(digest, str) or digest not in files:
            raise BadEntry(f"inline file {str(digest)[:12]!r} is not one of its files")
        if not isinstance(data, bytes) or len(data) > INLINE_MAX:
            raise BadEntry(f"inline file {digest[:12]} is larger than {INLINE_MAX} bytes")
        total += len(data)
        if total > INLINE_TOTAL_MAX:
            raise BadEntry(f"its inline files hold more than {INLINE_TOTAL_MAX} bytes")
        if hash_bytes(data) != digest:
            raise BadEntry(f"inline file {digest[:12]} does not match its digest")


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
    kind, digest = split(fingerprint)
    if kind is DigestKind.FILE and is_digest(digest) and set(out) == {"fingerprint", "mode"}:
        if not file_mode_ok(out["mode"]):
            raise BadEntry(f"file mode {_show_mode(out['mode'])} is not allowed")
        return 0
    if kind is DigestKind.DIR and is_digest(digest) and set(out) == {"fingerprint", "mode", "tree"}:
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
        kind, hex_ = split(value)
        if value == DIR_IN_LISTING and link == "":
            if not dir_mode_ok(mode):
                raise BadEntry(f"directory {child[:80]!r}: mode {_show_mode(mode)} is not allowed")
            kinds[child] = "dir"
        elif kind is DigestKind.FILE and is_digest(hex_) and link == "":
            if not file_mode_ok(mode):
                raise BadEntry(f"file {child[:80]!r}: mode {_show_mode(mode)} is not allowed")
            kinds[child] = "file"
        elif kind is DigestKind.LINK and mode == 0 and not isinstance(mode, bool):
            _check_link(child, hex_, link)
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


def is_digest(text: str) -> bool:
    """A 64-character lowercase hex digest (anything else is never used as a path)."""
    return _DIGEST.fullmatch(text) is not None


def portable_mode(st_mode: int, directory: bool) -> int:
    """The mode an entry records for a built file or directory (see `file_mode_ok`)."""
    return _stat.S_IMODE(st_mode) & MODE_BITS | (0o700 if directory else 0o400)


def is_older_version(raw: bytes) -> bool:
    """Whether the bytes of an entry file are an entry of an older version (deleted when met)."""
    try:
        version = json.loads(raw).get("version")
    except (ValueError, RecursionError, AttributeError):
        return False
    return _is_int(version) and version < min(_READABLE)


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
        kind, digest = split(fingerprint)
        if kind is DigestKind.FILE:
            st = os.stat(full)
            files[digest] = (full, st.st_size)
            outputs[path] = {"fingerprint": fingerprint, "mode": portable_mode(st.st_mode, False)}
        elif kind is DigestKind.DIR:
            tree: list[list[Any]] = []
            for rel, value in listings[fingerprint]:
                child = f"{full}/{rel}"
                child_kind, child_digest = split(value)
                if child_kind is DigestKind.LINK:
                    tree.append([rel, value, 0, os.readlink(child)])
                    continue
                st = os.lstat(child)
                if child_kind is DigestKind.FILE:
                    files[child_digest] = (child, st.st_size)
                is_dir = child_kind is DigestKind.DIR
                tree.append([rel, value, portable_mode(st.st_mode, is_dir), ""])
            mode = portable_mode(os.stat(full).st_mode, True)
            outputs[path] = {"fingerprint": fingerprint, "mode": mode, "tree": tree}
        else:
            raise Uncacheable(f"output {path} cannot be cached ({kind or 'unknown'})")
    return outputs, files
