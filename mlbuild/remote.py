"""The remote cache: a team's shared store of outputs on fsspec storage (S3, GCS, a directory).

Layout under the configured URL, in the style of Bazel's remote cache:

- `cas/<d[:2]>/<d>`: the bytes of one file, named by its BLAKE3 digest `d`.
- `ac/<key>`: the record of one target's run for cache key `key` (cache.py's
  `manifest.cache_key`): the local cache's entry (outputs with fingerprints, modes and
  directory trees, small files inline) plus `blobs` (digest -> size, every
  file but the inline ones) and `producer` (host, mlbuild version, upload
  time). It is written after every blob it names, so a record never names a
  blob that was not complete: the record is the commit point. In a
  directory (local, NFS, `file://`) every file is written as a temp file
  beside its final name and renamed; an object store's PUT is atomic by
  itself.

Reading costs one `ac/` lookup per stale target (a missing record is a miss;
nothing is ever listed), then downloads of the blobs the local cache lacks,
concurrently, each verified against its digest before it enters the local
cache. Nothing read is trusted: a record is checked whole before any use by
the local cache's own rules (`cache.parse_entry`: types, ranges, paths, modes,
symlinks, the directory digest, inline files hashed), its blob sizes and
producer too, and must be the target's and name exactly its declared outputs;
a corrupted or missing blob makes the target run, with a warning. Writing
checks which blobs exist (concurrently), uploads the others (each hashed again
first, so a file that changed since it was fingerprinted never lands under the
wrong name), then writes the record, then checks again the blobs it found
rather than uploaded (one request each) and uploads any that `mlbuild gc
--remote` deleted meanwhile (remote_gc.py says why that closes the race). Two
writers of one key each write whole records over whole blobs: the last record
wins, and either is valid.

An unreachable remote is a warning, never a failed build: the first error
disables the remote for the rest of the build. fsspec and its backends
(s3fs, gcsfs) are imported only when a remote is configured.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from mlbuild import __version__
from mlbuild.cache import (
    MAX_BYTES,
    MAX_ENTRY_BYTES,
    MODE_BITS,
    BadEntry,
    Cache,
    CacheError,
    CorruptObject,
    Entry,
    entry_payload,
    install_verified,
    is_digest,
    load_entry,
)
from mlbuild.errors import MlbuildError
from mlbuild.fingerprint import hash_file
from mlbuild.manifest import Fingerprint, is_dir, target_key
from mlbuild.pipeline.schema import CacheSettings, Pipeline
from mlbuild.staleness import Observation
from mlbuild.store import Store
from mlbuild.workspace import cache_dir

IO_THREADS = 8  # concurrent blob transfers and existence checks
UPLOAD_THREADS = 2  # targets uploaded at once in the background
# Object stores whose PUT is atomic: no temp name and rename needed.
_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory", "oss"})
# Extras that bring fsspec backends, for the message when one is missing.
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
# What a record holds beyond a local entry's fields.
_RECORD_FIELDS = frozenset({"blobs", "producer"})


def _producer_ok(producer: Any) -> bool:
    """`producer` as write_record makes it: short strings, and a finite time."""
    if not isinstance(producer, dict) or set(producer) - {"host", "mlbuild", "time"}:
        return False
    texts = [producer.get("host", ""), producer.get("mlbuild", "")]
    if not all(isinstance(t, str) and len(t) <= 255 for t in texts):
        return False
    when = producer.get("time", 0.0)
    return isinstance(when, int | float) and not isinstance(when, bool) and math.isfinite(when)


def _is_count(value: Any) -> bool:
    """A byte count: an int (not a bool) in 0..MAX_BYTES."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_BYTES


class RemoteError(MlbuildError):
    """The remote cannot be used: unreachable, refused, or its backend is not installed."""


class BadRecord(MlbuildError):
    """A record or blob on the remote that must not be used (malformed, unsafe, missing)."""


class CorruptBlob(BadRecord):
    """A downloaded blob whose bytes do not hash to its name."""

    def __init__(self, digest: str, message: str) -> None:
        super().__init__(message)
        self.digest = digest


@dataclass(frozen=True)
class Transfer:
    """What one upload or download moved."""

    blobs: int = 0
    bytes: int = 0
    digests: frozenset[str] = frozenset()  # of the blobs uploaded (put_blobs)


def open_fs(url: str, options: Mapping[str, Any]) -> tuple[Any, str]:
    """The fsspec filesystem and base path of `url`; RemoteError with a hint if unusable."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    try:
        import fsspec
    except ImportError:  # a base install has it; only a broken environment gets here
        extra = _EXTRAS.get(protocol)
        hint = f"pip install 'mlbuild[{extra}]'" if extra else "pip install fsspec"
        raise RemoteError(f"fsspec is not installed ({hint})") from None
    kwargs = dict(options)
    if protocol in ("s3", "s3a") and "config_kwargs" not in kwargs:
        # botocore's defaults retry an unreachable endpoint for ~10 s per call.
        kwargs["config_kwargs"] = {"connect_timeout": 5, "retries": {"max_attempts": 3}}
    try:
        fs, path = fsspec.core.url_to_fs(url, **kwargs)
    except ImportError as exc:
        extra = _EXTRAS.get(protocol)
        hint = f" (pip install 'mlbuild[{extra}]')" if extra else ""
        raise RemoteError(f"{exc}{hint}") from None
    except (ValueError, TypeError, OSError) as exc:
        raise RemoteError(f"cannot open {url}: {exc}") from None
    return fs, str(path).rstrip("/")


class Remote:
    """One remote location holding `cas/` and `ac/`, with blob- and record-level operations.

    Every storage error other than "not found" is raised as RemoteError.
    Methods are safe to call from several threads at once (fsspec's
    filesystems are; s3fs runs its requests on one event loop thread).
    """

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        self.url = url
        self.fs, self.base = open_fs(url, options or {})
        protocols = self.fs.protocol
        protocols = (protocols,) if isinstance(protocols, str) else tuple(protocols)
        self.atomic_put = any(p in _OBJECT_STORES for p in protocols)
        self._made: set[str] = set()
        # Blobs seen on the remote by this process (content-addressed: they stay valid),
        # so a build that ships the same code file with every target checks it once.
        self.known: set[str] = set()

    def blob_path(self, digest: str) -> str:
        if not is_digest(digest):  # digests become paths: never anything but hex
            raise BadRecord(f"not a digest: {digest[:70]!r}")
        return f"{self.base}/cas/{digest[:2]}/{digest}"

    def record_path(self, key: str) -> str:
        if not is_digest(key):
            raise BadRecord(f"not a cache key: {key[:70]!r}")
        return f"{self.base}/ac/{key}"

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as exc:  # network, permissions, throttling: any backend's error
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            name = type(exc).__name__
            raise RemoteError(
                f"{self.url}: {what} failed ({name}{': ' + detail if detail else ''})"
            ) from exc

    # -- records ------------------------------------------------------------

    def read_record(self, key: str) -> tuple[Entry, dict[str, int]] | None:
        """The entry and blob sizes recorded for `key`; None when there is none (or old).

        Raises BadRecord for a record that is malformed or unsafe: it is
        checked whole (cache.parse_entry, then its blobs and producer) before
        any of it is used.
        """
        try:
            raw = self._call(
                "reading a record",
                self.fs.cat_file,
                self.record_path(key),
                start=0,
                end=MAX_ENTRY_BYTES + 1,
            )
        except FileNotFoundError:
            return None
        try:
            entry = load_entry(raw, key, _RECORD_FIELDS)
        except BadEntry as exc:
            raise BadRecord(f"its record is unusable: {exc}") from None
        if entry is None:
            return None  # written by another version of mlbuild: a miss
        data = json.loads(raw)
        blobs = data.get("blobs")
        if (
            not isinstance(blobs, dict)
            or set(blobs) != entry.objects()
            or not all(_is_count(n) for n in blobs.values())
        ):
            raise BadRecord("its record lists malformed blob sizes")
        if not _producer_ok(data.get("producer", {})):
            raise BadRecord("its record has a malformed producer")
        return entry, blobs

    def write_record(self, entry: Entry, blobs: Mapping[str, int]) -> None:
        """Write the record of `entry` (all its blobs uploaded already): the commit point."""
        payload = entry_payload(entry)
        payload["blobs"] = dict(blobs)
        payload["producer"] = {
            "host": socket.gethostname(),
            "mlbuild": __version__,
            "time": time.time(),  # when uploaded; `created` is when the step finished
        }
        self._write(self.record_path(entry.key), json.dumps(payload).encode())

    # -- blobs --------------------------------------------------------------

    def has_blobs(self, digests: Iterable[str], pool: ThreadPoolExecutor) -> set[str]:
        """Which of `digests` the remote holds (one existence check each, concurrently)."""
        wanted = sorted(set(digests) - self.known)
        found = pool.map(
            lambda d: self._call("checking a blob", self.fs.exists, self.blob_path(d)), wanted
        )
        present = {d for d, there in zip(wanted, found, strict=True) if there}
        self.known |= present
        return present | (set(digests) & self.known)

    def put_blobs(self, files: Mapping[str, tuple[str, int]], pool: ThreadPoolExecutor) -> Transfer:
        """Upload the blobs the remote lacks: `files` maps digest -> (local path, size)."""
        present = self.has_blobs(files, pool)
        missing = [d for d in files if d not in present]
        list(pool.map(lambda d: self.put_blob(files[d][0], d), missing))
        self.known.update(missing)
        return Transfer(len(missing), sum(files[d][1] for d in missing), frozenset(missing))

    def recheck_blobs(
        self, files: Mapping[str, tuple[str, int]], pool: ThreadPoolExecutor
    ) -> Transfer:
        """Upload again any of `files` gone since it was seen (after its record is written).

        A blob found on the remote instead of uploaded may be old and named by
        no record, so `mlbuild gc --remote` may delete it between the check
        and the record: checked again after the record, one request each, and
        put back if it went. Either this sees it missing, or the deletion came
        after the record, and gc, which looks at every record written while it
        deletes, removes that record (remote_gc.py). Blobs this process
        uploaded are young; gc's grace period keeps them.
        """
        digests = sorted(files)
        found = pool.map(
            lambda d: self._call("checking a blob", self.fs.exists, self.blob_path(d)), digests
        )
        gone = [d for d, there in zip(digests, found, strict=True) if not there]
        list(pool.map(lambda d: self.put_blob(files[d][0], d), gone))
        return Transfer(len(gone), sum(files[d][1] for d in gone))

    def put_blob(self, src: str, digest: str) -> None:
        """Upload one file as blob `digest`, after checking that its bytes hash to it.

        The file's stat is compared after the upload too: a file rewritten
        during the upload is removed from the remote again and refused.
        """
        before = os.stat(src)
        actual = hash_file(src, before.st_size)
        if actual != digest:
            raise CacheError(f"{src} changed since it was fingerprinted (now {actual[:12]})")
        dest = self.blob_path(digest)
        self._upload(src, dest)
        after = os.stat(src)
        if (after.st_size, after.st_mtime_ns, after.st_ino) != (
            before.st_size,
            before.st_mtime_ns,
            before.st_ino,
        ):
            self._remove_if_wrong(digest)
            raise CacheError(f"{src} changed while it was uploaded")

    def _remove_if_wrong(self, digest: str) -> None:
        """Remove blob `digest` if its bytes do not hash to it.

        Not unconditionally: another builder may have put good bytes there
        (and a record naming them) since, and removing them would break that
        record.
        """
        import tempfile

        with tempfile.TemporaryDirectory(prefix="mlbuild-check-") as folder:
            local = os.path.join(folder, "blob")
            try:
                self._call("checking a blob", self.fs.get_file, self.blob_path(digest), local)
            except FileNotFoundError:
                return
            if hash_file(local, os.path.getsize(local)) != digest:
                self.delete_blob(digest)

    def get_blob(self, digest: str, dest: str, size: int | None = None) -> None:
        """Download blob `digest` to the path `dest` (its bytes unchecked: callers verify)."""
        try:
            self._call("downloading a blob", self.fs.get_file, self.blob_path(digest), dest)
        except FileNotFoundError:
            raise BadRecord(f"blob {digest[:12]} is missing") from None
        if size is not None and os.path.getsize(dest) != size:
            got = os.path.getsize(dest)
            raise CorruptObject(f"blob {digest[:12]} is corrupted (it has {got} bytes, not {size})")

    def delete_blob(self, digest: str) -> None:
        """Remove a blob found corrupted, so that the next upload puts good bytes there."""
        self.known.discard(digest)
        with contextlib.suppress(FileNotFoundError):
            self._call("removing a blob", self.fs.rm_file, self.blob_path(digest))

    def fetch_verified(
        self,
        items: Sequence[tuple[str, str, int]],
        pool: ThreadPoolExecutor,
        sizes: Mapping[str, int],
    ) -> Transfer:
        """Download blobs to final paths: `items` are (digest, destination, mode).

        Each goes to a temp file beside its destination, is hashed, and is
        renamed into place only if it matches (CorruptObject otherwise). The
        local cache uses `Cache.receive` instead, a Ray sandbox the node's
        cache (exec/ray.py NodeCache).
        """

        def one(item: tuple[str, str, int]) -> int:
            digest, dest, mode = item
            # A short name: `dest` itself may have a name of 255 bytes.
            tmp = os.path.join(os.path.dirname(dest), f".mlbuild-{uuid.uuid4().hex}")
            try:
                install_verified(
                    tmp,
                    dest,
                    digest,
                    lambda path: self.get_blob(digest, path, sizes.get(digest)),
                    mode & MODE_BITS,
                )
            except CorruptObject as exc:
                raise CorruptBlob(digest, str(exc)) from None
            return os.path.getsize(dest)

        moved = list(pool.map(one, items))
        return Transfer(len(moved), sum(moved))

    # -- writing files ------------------------------------------------------

    def _upload(self, src: str, dest: str) -> None:
        if self.atomic_put:
            self._call("uploading a blob", self.fs.put_file, src, dest)
            return
        tmp = self._temp_beside(dest)
        try:
            self._call("uploading a blob", self.fs.put_file, src, tmp)
            self._call("renaming a blob", self.fs.mv, tmp, dest)
        except BaseException:
            self._discard(tmp)
            raise

    def _write(self, dest: str, data: bytes) -> None:
        if self.atomic_put:
            self._call("writing a record", self.fs.pipe_file, dest, data)
            return
        tmp = self._temp_beside(dest)
        try:
            self._call("writing a record", self.fs.pipe_file, tmp, data)
            self._call("renaming a record", self.fs.mv, tmp, dest)
        except BaseException:
            self._discard(tmp)
            raise

    def _temp_beside(self, dest: str) -> str:
        parent, _, name = dest.rpartition("/")
        if parent not in self._made:
            self._call("creating a directory", self.fs.makedirs, parent, exist_ok=True)
            self._made.add(parent)
        return f"{parent}/.tmp-{name[:16]}-{uuid.uuid4().hex}"

    def _discard(self, path: str) -> None:
        with contextlib.suppress(Exception):  # best effort: a leftover temp file is never read
            self.fs.rm_file(path)


def fetch_entry(
    remote: Remote,
    cache: Cache,
    key: str,
    output_paths: Iterable[str],
    pool: ThreadPoolExecutor,
    *,
    target: str | None = None,
    admit: Callable[[Entry], None] | None = None,
) -> tuple[Entry, Transfer] | None:
    """Copy the remote's entry for `key` into the local cache, every blob verified.

    None on a miss. The record must be valid (read_record), name exactly
    `output_paths`, and be `target`'s when given; `admit(entry)` may then
    refuse it by raising (before any download). Raises BadRecord (unsafe
    record, missing blob), CorruptObject (a blob whose bytes do not match),
    RemoteError or CacheError (the local cache cannot be written). Nothing of
    a refused record enters the local cache: the entry is written last.
    """
    found = remote.read_record(key)
    if found is None:
        return None
    entry, sizes = found
    declared = sorted(output_paths)
    if sorted(entry.outputs) != declared:
        raise BadRecord("its record names other outputs than the target declares")
    if target is not None and entry.target != target:
        raise BadRecord(f"its record is the record of another target ({entry.target[:80]!r})")
    if admit is not None:
        admit(entry)
    moved = receive_blobs(remote, cache, entry, sizes, pool)
    try:
        cache.write_entry(entry)
    except OSError as exc:  # the local cache: full disk, not writable
        raise CacheError(f"cannot write the cache in {cache.root}: {exc.strerror}") from exc
    return entry, moved


def receive_blobs(
    remote: Remote, cache: Cache, entry: Entry, sizes: Mapping[str, int], pool: ThreadPoolExecutor
) -> Transfer:
    """Copy the blobs of `entry` the local cache lacks into it, each verified by its digest.

    The one way bytes come from the remote into the local cache: for a
    record (fetch_entry) and for a Ray worker's outputs (RemoteCache.receive).
    Raises CorruptBlob, RemoteError, or CacheError (the local cache cannot
    be written).
    """
    missing = [d for d in sorted(entry.objects()) if not os.path.exists(cache.object_path(d))]

    def one(digest: str) -> None:
        try:
            cache.receive(digest, lambda tmp: remote.get_blob(digest, tmp, sizes.get(digest)))
        except CorruptObject as exc:
            raise CorruptBlob(digest, str(exc)) from None

    try:
        list(pool.map(one, missing))
    except OSError as exc:  # the local cache: full disk, not writable
        raise CacheError(f"cannot write the cache in {cache.root}: {exc.strerror}") from exc
    return Transfer(len(missing), sum(sizes.get(d, 0) for d in missing))


def upload_entry(remote: Remote, cache: Cache, entry: Entry, pool: ThreadPoolExecutor) -> Transfer:
    """Upload an entry of the local cache: the blobs the remote lacks, then its record."""
    files = {}
    for digest in entry.objects():
        path = cache.object_path(digest)
        files[digest] = (str(path), path.stat().st_size)
    moved = remote.put_blobs(files, pool)
    remote.write_record(entry, {d: n for d, (_, n) in files.items()})
    # The blobs found rather than uploaded: seen again now that the record names them.
    seen = {d: files[d] for d in files if d not in moved.digests}
    again = remote.recheck_blobs(seen, pool) if seen else Transfer()
    return Transfer(moved.blobs + again.blobs, moved.bytes + again.bytes, moved.digests)


@dataclass
class _Upload:
    target: str
    future: Future[Transfer]


@dataclass
class RemoteCache:
    """The remote as one build uses it: lookups and verified fetches, background uploads.

    Problems become warnings through `warn` (called from the build's thread
    only: failed background uploads are reported by `finish`). The first
    error reaching the remote disables it for the rest of the build.
    """

    settings: CacheSettings
    cache: Cache
    warn: Callable[[str], None]
    write: bool = True
    disabled: bool = False
    uploaded: int = 0
    _remote: Remote | None = None
    _io: ThreadPoolExecutor | None = None
    _uploader: ThreadPoolExecutor | None = None
    _uploads: list[_Upload] = field(default_factory=list)

    @property
    def url(self) -> str:
        assert self.settings.remote is not None
        return self.settings.remote

    def remote(self) -> Remote | None:
        """The open remote, or None once it proved unusable (warned once)."""
        if self.disabled:
            return None
        if self._remote is None:
            try:
                self._remote = Remote(self.url, self.settings.remote_options)
            except RemoteError as exc:
                self.unreachable(exc)
                return None
        return self._remote

    @property
    def io(self) -> ThreadPoolExecutor:
        if self._io is None:
            self._io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="mlbuild-remote")
        return self._io

    def unreachable(self, exc: Exception) -> None:
        if not self.disabled:
            self.disabled = True
            self.warn(f"remote cache not used: {exc}; the build goes on without it")

    def fetch(
        self, target: str, key: str, output_paths: Iterable[str], *, quick: bool = False
    ) -> Entry | None:
        """The remote's entry for `key`, now in the local cache; None on a miss or a problem.

        With `quick`, raises cache.SlowerThanRunning (before downloading
        anything) when restoring the entry should take longer than its step.
        """
        remote = self.remote()
        if remote is None or self.cache.db.problem is not None:
            return None  # no local entry database: its first save says why, once
        admit = self.cache.check_cost if quick else None
        try:
            found = fetch_entry(
                remote, self.cache, key, output_paths, self.io, target=target, admit=admit
            )
        except RemoteError as exc:
            self.unreachable(exc)
            return None
        except (BadRecord, CacheError) as exc:
            if isinstance(exc, CorruptBlob) and self.write:
                # Gone, so that the upload after the rerun puts good bytes there
                # (an upload skips blobs that exist).
                try:
                    remote.delete_blob(exc.digest)
                except RemoteError as error:
                    self.unreachable(error)
            self.warn(f"remote cache entry of `{target}` not used: {exc}; running it")
            return None
        return found[0] if found is not None else None

    def receive(self, entry: Entry, sizes: Mapping[str, int]) -> bool:
        """Bring the blobs of `entry` into the local cache, verified; False if unreachable.

        For outputs a Ray worker uploaded (no record names them yet: the
        driver's upload writes it once the runner recorded the step). Raises
        as receive_blobs; the caller decides what a failure means.
        """
        remote = self.remote()
        if remote is None:
            return False
        receive_blobs(remote, self.cache, entry, sizes, self.io)
        return True

    def upload_later(self, target: str, entry: Entry) -> None:
        """Queue an entry's upload (blobs, then record); the build does not wait for it here."""
        if not self.write or self.remote() is None:
            return
        if self._uploader is None:
            self._uploader = ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="mlbuild-up")
        remote = self._remote
        assert remote is not None
        future = self._uploader.submit(upload_entry, remote, self.cache, entry, self.io)
        self._uploads.append(_Upload(target, future))

    def finish(self, *, wait: bool = True) -> None:
        """Wait for queued uploads (warning once per failure) and stop the threads.

        With `wait` false (an interrupted build) queued uploads are dropped;
        running ones finish in the background threads' own time, and since a
        record is written last, a dropped upload leaves nothing half-visible.
        """
        if self._uploader is not None:
            if wait:
                for upload in self._uploads:
                    try:
                        upload.future.result()
                        self.uploaded += 1
                    except (RemoteError, CacheError, BadRecord, OSError) as exc:
                        self.warn(f"uploading `{upload.target}` to the remote cache failed: {exc}")
            self._uploader.shutdown(wait=wait, cancel_futures=not wait)
            self._uploader = None
        self._uploads.clear()
        if self._io is not None:
            self._io.shutdown(wait=wait, cancel_futures=not wait)
            self._io = None


# -- mlbuild push -------------------------------------------------------------


@dataclass(frozen=True)
class Pushed:
    """What `mlbuild push` did for one target: `note` says it as `mlbuild push` prints it."""

    target: str
    ok: bool
    note: str


def push_targets(
    pipeline: Pipeline, store: Store, names: Sequence[str], remote: RemoteCache
) -> list[Pushed]:
    """Upload the current outputs of up-to-date targets `names` (entries made where missing).

    A target's entry is taken from the local cache by the key of its current
    manifest; a target whose entry was pruned is saved to the local cache
    from its outputs first (they are current: the caller checked). Stops at
    the first error reaching the remote (which `remote` then warns about).
    """
    manifests = store.load_manifests()
    results: list[Pushed] = []
    for name in names:
        target = pipeline.targets[name]
        stored = manifests.get(name)
        fingerprint = Fingerprint.from_json(stored.data) if stored is not None else None
        if not target.cache or target.always_run:
            why = "cache = false" if not target.cache else "always_run = true"
            results.append(Pushed(name, True, f"not pushed: {why} (never cached)"))
            continue
        open_remote = remote.remote()
        if open_remote is None:
            break
        if stored is None or fingerprint is None:
            results.append(Pushed(name, False, "not pushed: no manifest"))
            continue
        key = target_key(target, fingerprint)
        try:
            entry = remote.cache.lookup(key)
            if entry is None:
                listings: dict[str, tuple[tuple[str, str], ...]] = {}
                for value in fingerprint.outputs.values():
                    if is_dir(value):
                        listings[value] = tuple(store.load_tree(value) or ())
                observation = Observation(fingerprint, listings)
                entry = remote.cache.save(key, name, pipeline.root, observation, stored.duration)
            moved = upload_entry(open_remote, remote.cache, entry, remote.io)
        except RemoteError as exc:
            remote.unreachable(exc)
            break
        except (CacheError, BadRecord, OSError) as exc:
            results.append(Pushed(name, False, f"not pushed: {exc}"))
            continue
        results.append(Pushed(name, True, f"pushed: {moved.blobs} blobs, {moved.bytes:,} bytes"))
    return results


def local_cache(pipeline: Pipeline) -> Cache:
    """The workspace's local cache (`.mlbuild/cache`), for commands that run no build."""
    return Cache(cache_dir(pipeline.root))
