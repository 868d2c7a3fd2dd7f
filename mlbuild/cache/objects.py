"""Content-addressed objects: bytes that enter and leave the cache whole and verified.

An object is the bytes of one output file, named by its BLAKE3 digest `d`
(`objects/<d[:2]>/<d[2:]>` under the local cache, `cas/` on a remote). Every
file the cache writes, object or entry, is first a temp file in the directory
of its final name and then renamed (`commit`), so no reader ever sees half of
one; holes of sparse files stay holes. Objects are copies, never hard links
into the workspace: a user editing a restored output cannot corrupt the
cache. Bytes that arrive from elsewhere (a download) are hashed before they
take their name (`install_verified`), and bytes that do not hash to their name
are `CorruptObject`, whichever direction they travel.

Small files are read and written in one go; files of `LARGE_FILE` bytes or
more are copied extent by extent in the kernel (`copy_file_range`, which
clones on Btrfs and XFS; holes skipped) and hashed from the copy, holes as
zeros.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import blake3

from mlbuild.cache.entry import CorruptObject
from mlbuild.fingerprint import PARALLEL_MIN_FILES

# Files at least this large are copied by extents in the kernel and hashed from the copy.
LARGE_FILE = 8 << 20
_CHUNK = 1 << 22
_ZEROS = memoryview(bytes(_CHUNK))

O_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
O_NEW_RW = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
O_READ = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)

_T = TypeVar("_T")
_R = TypeVar("_R")


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


def copy_extents(src: int, dst: int, size: int) -> None:
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


def hash_extents(fd: int, size: int) -> str:
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


def read_all(fd: int, size: int) -> bytes:
    data = os.read(fd, size)
    while len(data) < size:
        more = os.read(fd, size - len(data))
        if not more:
            break
        data += more
    return data


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _workers() -> int:
    return min(16, (os.cpu_count() or 1) * 2)


def in_parts(fn: Callable[[list[_T]], list[_R]], items: list[_T]) -> list[_R]:
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


def copy_file(src: str, fd: int, size: int) -> None:
    """Fill the new, empty file `fd` with the `size` bytes of the file `src`; close `fd`."""
    try:
        source = os.open(src, O_READ)
        try:
            if size < LARGE_FILE:
                write_all(fd, read_all(source, size))
            else:
                copy_extents(source, fd, size)
        finally:
            os.close(source)
    finally:
        os.close(fd)


def hash_path(path: str) -> str:
    """BLAKE3 of the file at `path` (holes read as zeros, without reading them)."""
    fd = os.open(path, O_READ)
    try:
        return hash_extents(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def corrupted(what: str, digest: str, actual: str) -> CorruptObject:
    """The error for bytes named `digest` that hash to `actual` (`what`: object or blob)."""
    return CorruptObject(f"{what} {digest[:12]} is corrupted (its bytes hash to {actual[:12]})")


def commit(tmp: str, dest: str, write: Callable[[], None]) -> None:
    """`write()` fills the temp file `tmp`, which then becomes `dest` by one rename.

    `tmp` must be in the directory of `dest`. If anything fails (or is
    interrupted) `tmp` is removed and `dest` is as it was.
    """
    try:
        write()
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def install_verified(
    tmp: str, dest: str, digest: str, fill: Callable[[str], None], mode: int
) -> None:
    """Let `fill(tmp)` write bytes (a download), and rename them to `dest` if they hash to `digest`.

    Raises CorruptObject when they do not; `tmp` is removed then, and on any
    other failure. `dest` gets `mode`.
    """

    def write() -> None:
        fill(tmp)
        actual = hash_path(tmp)
        if actual != digest:
            raise corrupted("blob", digest, actual)
        os.chmod(tmp, mode)

    commit(tmp, dest, write)
