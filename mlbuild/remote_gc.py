"""`mlbuild gc --remote`: trimming a team's remote cache by age and size while others use it.

The remote is shared: while gc runs, other builders read records and
download their blobs, and upload blobs, then records (remote.py). So gc
deletes in the order that keeps every remaining record whole:

1. It lists `ac/` and reads every record (the only command that lists the
   remote). Records uploaded longer ago than `max_age`, then the oldest
   beyond `max_size` bytes of blobs (the newest kept first, as the local
   gc does), are deleted. A record that does not parse names nothing and
   goes once it is older than the grace period; one of another mlbuild
   version is kept alike and its `blobs` protected.
2. It lists `cas/` and deletes the blobs no remaining record names, if they
   are older than `grace`: an uploader writes its blobs before its record,
   so a young blob named by nothing may be one whose record is on its way.
3. It lists `ac/` again: a record written (or rewritten) while gc ran that
   names a blob gc just deleted is broken, and is deleted too, unless its
   writer already put the blob back. A writer that found such a blob
   rather than uploaded it checks again after writing its record and
   uploads it if it went (remote.Remote.recheck_blobs): either that check
   sees the blob gone, or the deletion came after the record and this
   step sees the record.

What is left is never a record naming a missing blob. A builder that read
a record just before gc deleted it may then find a blob gone: that is a
miss with a warning (the step runs), never a wrong output, since every
blob is verified against its digest when it is downloaded.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, NamedTuple

from mlbuild.cache import MAX_ENTRY_BYTES, is_digest
from mlbuild.remote import IO_THREADS, Remote

GRACE_SECONDS = 3600.0  # default: no upload between a blob and its record takes an hour
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DELETE_BATCH = 1000  # paths per delete call (S3 deletes up to 1000 objects in one request)


class RemoteGcReport(NamedTuple):
    """What `mlbuild gc --remote` removed and kept."""

    records_removed: int
    blobs_removed: int
    bytes_freed: int
    records_kept: int
    bytes_kept: int
    broken_removed: int  # records written during gc naming a blob it deleted


class _Record(NamedTuple):
    path: str
    time: float  # when uploaded
    blobs: frozenset[str]
    ok: bool  # parsed; a record that did not is deleted once old


def parse_age(text: str) -> float:
    """`--max-age` and `--grace`: `30d`, `12h`, `90m`, `45s`, `2w`, or plain seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if match is None:
        raise ValueError(f"not an age: {text!r} (use e.g. 30d, 12h, 90m)")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def _modified(info: Mapping[str, Any]) -> float:
    """A listed object's modification time, whatever the backend calls it (0: unknown)."""
    for name in ("LastModified", "mtime", "updated", "created", "last_modified"):
        value = info.get(name)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return 0.0


def _stamp(info: Mapping[str, Any]) -> tuple[Any, ...]:
    """What changes when an object is rewritten (S3's times have whole seconds: the ETag too)."""
    return (_modified(info), info.get("ETag"), info.get("size"))


def _listing(remote: Remote, folder: str) -> dict[str, Mapping[str, Any]]:
    """Every object under `folder` of the remote (path -> info), temp files included."""
    try:
        found = remote._call("listing", remote.fs.find, f"{remote.base}/{folder}", detail=True)
    except FileNotFoundError:
        return {}
    return {str(path): info for path, info in found.items() if info.get("type") != "directory"}


def _read(remote: Remote, path: str, listed_time: float) -> _Record:
    """A record's upload time and the blobs it names, read loosely (any mlbuild version)."""
    try:
        raw = remote._call(
            "reading a record", remote.fs.cat_file, path, start=0, end=MAX_ENTRY_BYTES + 1
        )
        data = json.loads(raw) if len(raw) <= MAX_ENTRY_BYTES else None
    except (FileNotFoundError, ValueError):
        return _Record(path, listed_time, frozenset(), False)
    if not isinstance(data, dict):
        return _Record(path, listed_time, frozenset(), False)
    blobs = data.get("blobs")
    names = frozenset(d for d in blobs if is_digest(d)) if isinstance(blobs, dict) else frozenset()
    producer = data.get("producer")
    when = producer.get("time") if isinstance(producer, dict) else None
    if not isinstance(when, int | float) or isinstance(when, bool):
        when = listed_time
    return _Record(path, float(when), names, isinstance(blobs, dict))


def _records(
    remote: Remote, listed: Mapping[str, Mapping[str, Any]], pool: ThreadPoolExecutor
) -> list[_Record]:
    paths = [p for p in listed if not p.rsplit("/", 1)[-1].startswith(".tmp-")]
    return list(pool.map(lambda p: _read(remote, p, _modified(listed[p])), paths))


def _delete(remote: Remote, paths: list[str], pool: ThreadPoolExecutor) -> None:
    batches = [paths[i : i + _DELETE_BATCH] for i in range(0, len(paths), _DELETE_BATCH)]

    def one(batch: list[str]) -> None:
        try:
            remote._call("deleting", remote.fs.rm, batch)
        except FileNotFoundError:  # someone else deleted one first: delete the rest one by one
            for path in batch:
                try:
                    remote._call("deleting", remote.fs.rm_file, path)
                except FileNotFoundError:
                    continue

    list(pool.map(one, batches))


def _digest_of(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def trim_remote(
    remote: Remote,
    *,
    max_age: float | None = None,
    max_size: int | None = None,
    grace: float = GRACE_SECONDS,
    now: float | None = None,
) -> RemoteGcReport:
    """Delete old records, then the blobs no record names (see the module docstring)."""
    now = time.time() if now is None else now
    with ThreadPoolExecutor(IO_THREADS, thread_name_prefix="mlbuild-gc") as pool:
        first = _listing(remote, "ac")
        records = sorted(_records(remote, first, pool), key=lambda r: r.time, reverse=True)
        blobs = _listing(remote, "cas")
        sizes = {_digest_of(p): int(info.get("size") or 0) for p, info in blobs.items()}
        doomed = [p for p in first if _is_old_temp(p, first[p], now, grace)]
        temps = len(doomed)
        named: set[str] = set()
        for record in records:
            age = now - record.time
            too_old = max_age is not None and age > max_age
            grown = named | record.blobs
            too_big = max_size is not None and sum(sizes.get(d, 0) for d in grown) > max_size
            unusable = not record.ok and age > grace
            if too_old or too_big or unusable:
                doomed.append(record.path)
            else:
                named = grown
        _delete(remote, doomed, pool)
        # Blobs: named by no kept record, and old enough that no upload can be on its way.
        gone: dict[str, str] = {}
        freed = 0
        for path, info in blobs.items():
            digest = _digest_of(path)
            young = now - _modified(info) <= grace
            if young or (digest in named and is_digest(digest)):
                continue
            if is_digest(digest) or digest.startswith(".tmp-"):  # temp files of dead writers
                gone[digest] = path
                freed += sizes.get(digest, 0)
        _delete(remote, list(gone.values()), pool)
        remote.known.difference_update(gone)
        broken = _broken_newcomers(remote, first, set(gone), pool)
        _delete(remote, broken, pool)
    kept_bytes = sum(sizes.get(d, 0) for d in named)
    removed = len(doomed) - temps
    return RemoteGcReport(
        removed, len(gone), freed, len(records) - removed, kept_bytes, len(broken)
    )


def _is_old_temp(path: str, info: Mapping[str, Any], now: float, grace: float) -> bool:
    """A temp file a writer of a directory remote left when it died."""
    return _digest_of(path).startswith(".tmp-") and now - _modified(info) > grace


def _broken_newcomers(
    remote: Remote,
    first: Mapping[str, Mapping[str, Any]],
    deleted: set[str],
    pool: ThreadPoolExecutor,
) -> list[str]:
    """Records written or rewritten since `first` that name a blob gc deleted, still missing."""
    if not deleted:
        return []
    second = _listing(remote, "ac")
    changed = {
        p: info for p, info in second.items() if p not in first or _stamp(info) != _stamp(first[p])
    }
    broken = []
    for record in _records(remote, changed, pool):
        lost = sorted(record.blobs & deleted)
        if lost and not all(remote.fs.exists(remote.blob_path(d)) for d in lost):
            broken.append(record.path)
    return broken
