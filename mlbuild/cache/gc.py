"""Maintenance of the local cache: `mlbuild gc` and `mlbuild cache verify`.

gc keeps the entries of every target's current outputs, then the newest
others within `--max-size` and `--keep-runs`, and deletes every object no kept
entry names. Sizes are bytes of output files: each object once, and each
entry's inline files (entry.py) with the entry, since entries do not share
them. verify hashes every object and deletes the corrupted ones (a missing
object is a cache miss, a wrong one would be a wrong output), and reads every
entry, which checks its inline files, deleting the bad ones.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from mlbuild.cache.entry import BadEntry, Entry
from mlbuild.cache.objects import hash_path
from mlbuild.errors import UsageError

# parse_size lives in config (resource sizes); wrapped here for `mlbuild gc --max-size`.
from mlbuild.pipeline.load import parse_size as _parse_size

if TYPE_CHECKING:
    from mlbuild.cache.local import Cache


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
    entries = [entry for _, entry in cache.entries()]
    sizes = {digest: path.stat().st_size for digest, path in cache.object_files()}
    kept: list[Entry] = []
    others: list[Entry] = []
    for entry in entries:
        outputs = {p: o["fingerprint"] for p, o in entry.outputs.items()}
        if current.get(entry.target) == outputs:
            kept.append(entry)
        else:
            others.append(entry)
    others.sort(key=lambda entry: entry.created, reverse=True)
    kept_objects = set().union(*(e.objects() for e in kept)) if kept else set()
    kept_inline = sum(e.inline_bytes() for e in kept)
    per_target: dict[str, int] = {}
    removed_entries = bytes_freed = 0
    for entry in others:
        count = per_target.get(entry.target, 0)
        objects = entry.objects()
        grown = kept_objects | objects
        inline = kept_inline + entry.inline_bytes()
        too_many = keep_runs is not None and count >= keep_runs
        too_big = max_size is not None and sum(sizes.get(d, 0) for d in grown) + inline > max_size
        if too_many or too_big:
            cache.drop(entry.key)
            removed_entries += 1
            bytes_freed += entry.inline_bytes()
            continue
        per_target[entry.target] = count + 1
        kept.append(entry)
        kept_objects = grown
        kept_inline = inline
    objects_removed = 0
    for digest, path in cache.object_files():
        if digest not in kept_objects:
            bytes_freed += sizes.get(digest, 0)
            path.unlink(missing_ok=True)
            objects_removed += 1
    _remove_stale_temp_files(cache.root)
    bytes_kept = sum(sizes.get(d, 0) for d in kept_objects) + kept_inline
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


class VerifyReport(NamedTuple):
    """What `mlbuild cache verify` checked and removed."""

    objects: int
    corrupt: list[str]  # digests of the objects removed
    entries: int
    bad: list[tuple[str, str]]  # (key, why) of the entries removed
    # (key, path) of bad ones that are still there: not a file (a directory), so not
    # removed, and not to be reported as removed
    kept: tuple[tuple[str, str], ...] = ()


def verify_objects(cache: Cache) -> VerifyReport:
    """Hash every object and read every entry; delete the corrupted ones (and say which)."""
    checked = 0
    corrupt: list[str] = []
    for digest, path in cache.object_files():
        checked += 1
        if hash_path(str(path)) != digest:
            path.unlink(missing_ok=True)
            corrupt.append(digest)
    entries = 0
    bad: list[tuple[str, str]] = []
    kept: list[tuple[str, str]] = []
    for key in cache.entry_keys():
        entries += 1
        try:
            cache.lookup(key)  # deletes an entry that is not valid
        except BadEntry as exc:
            file = cache.legacy_file(key)
            if file is not None and (file.exists() or file.is_symlink()):  # a file of before
                kept.append((key, f"{file}: {exc}"))
            elif cache.has_entry(key):  # a row the database would not let go
                kept.append((key, f"{cache.db.path}: {exc}"))
            else:
                bad.append((key, str(exc)))
    return VerifyReport(checked, corrupt, entries, bad, tuple(kept))
