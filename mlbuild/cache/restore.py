"""Restoring an entry: its outputs assembled aside, verified, then renamed into the project.

Restoring assembles every output in `.mlbuild/staging/<pid>-<random>/` (the
same filesystem as the project, so the final step is a rename; a private
folder beside the output when that is another filesystem), under short names
whatever the output's name. Each file is copied from its object and checked
against its digest: small files are read, hashed and written in one pass,
large ones are copied extent by extent in the kernel (objects.py) and the
copy hashed. A mismatch means a corrupted object, which is deleted, and the
target simply runs. A file the entry holds itself (inline) is written from
the entry's bytes, which `check_entry` hashed just before, into the same
staging folder. Only when every output is staged are they renamed into place
(what they replace goes into the staging folder, deleted with it). A
restore killed midway leaves its folder in `.mlbuild/staging/`, never in the
project: `clear_staging` removes it at the next start.

Whether a restore is worth it at all is `check_cost`'s estimate, from a cost
model measured on real restores.
"""

from __future__ import annotations

import contextlib
import functools
import os
import stat as _stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import blake3

from mlbuild.cache.entry import MAX_PATH_BYTES, BadEntry, CacheError, Entry, check_entry
from mlbuild.cache.objects import (
    LARGE_FILE,
    O_NEW,
    O_NEW_RW,
    O_READ,
    copy_extents,
    corrupted,
    hash_extents,
    in_parts,
    read_all,
    write_all,
)
from mlbuild.errors import MlbuildError
from mlbuild.fingerprint import Fingerprinter, StatEntry
from mlbuild.manifest import DigestKind, split
from mlbuild.workspace import OutsideProject, staging_dir, writable_path

# Restore cost model (measured with bench/features.py on a 2-CPU VM, ext4):
# per file, per directory or symlink, and per byte of file data.
RESTORE_SECONDS_PER_FILE = 40e-6
RESTORE_SECONDS_PER_OTHER = 15e-6
RESTORE_BYTES_PER_SECOND = 400e6
SLOWER_SLACK_SECONDS = 1.0


class SlowerThanRunning(MlbuildError):
    """Restoring an entry is expected to take longer than its step did."""


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


class _Staged(NamedTuple):
    """A file to write during a restore: where in staging, from which object, and its mode."""

    path: str
    digest: str
    mode: int
    rel: str  # project-relative, once in place (for the stat cache)
    umask: int  # the process's: a mode it would mask needs an fchmod
    data: bytes | None  # the bytes, when the entry holds them (inline); else from the object


def restore_entry(objects: str, entry: Entry, project: Path, fp: Fingerprinter) -> dict[str, str]:
    """Put an entry's outputs in place from the folder `objects`, verified; their fingerprints.

    Raises CorruptObject (the bad object is deleted) or CacheError (a
    missing object, an unusable entry, a destination outside the project);
    the outputs are then as they were, or removed. The stat of every file
    written enters `fp`'s stat cache: its bytes were just hashed.
    """
    problem = check_entry(entry)
    if problem is not None:
        raise BadEntry(problem)
    staging = _Staging(project)
    try:
        return _restore(objects, entry, project, fp, staging)
    finally:
        staging.remove()


def _restore(
    objects: str, entry: Entry, project: Path, fp: Fingerprinter, staging: _Staging
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
        kind, digest = split(fingerprint)
        if kind is DigestKind.FILE:
            files.append(_Staged(staged, digest, mode, path, umask, entry.inline.get(digest)))
            planned.append((path, dest, staged, False))
            continue
        _make_dir(staged, mode, umask)
        for child, value, child_mode, link in out["tree"]:
            full = f"{staged}/{child}"
            kind, digest = split(value)
            if kind is DigestKind.DIR:
                _make_dir(full, child_mode, umask)
            elif kind is DigestKind.LINK:
                os.symlink(link, full)
            else:
                rel = f"{path}/{child}"
                files.append(
                    _Staged(full, digest, child_mode, rel, umask, entry.inline.get(digest))
                )
        planned.append((path, dest, staged, True))
    stats = in_parts(lambda part: _fill_some(objects, part), files)
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


def _fill_some(objects: str, files: list[_Staged]) -> list[tuple[str, StatEntry]]:
    """Write objects (or inline bytes) as new files, verifying each against its digest."""
    done: list[tuple[str, StatEntry]] = []
    for path, digest, mode, rel, umask, inline in files:
        checked_ns = time.time_ns()
        if inline is not None:
            st = _write_new(path, O_NEW, mode, umask, functools.partial(_write_to, inline))
        else:
            st = _from_object(f"{objects}/{digest[:2]}/{digest[2:]}", path, digest, mode, umask)
        done.append((rel, StatEntry(st.st_size, st.st_mtime_ns, st.st_ino, checked_ns, digest)))
    return done


def _write_new(
    path: str, flags: int, mode: int, umask: int, write: Callable[[int], None]
) -> os.stat_result:
    """Create `path` (it must not exist), fill it with `write(fd)`, give it `mode`."""
    fd = os.open(path, flags, mode)
    try:
        write(fd)
        if mode & umask:
            os.fchmod(fd, mode)
        return os.fstat(fd)
    finally:
        os.close(fd)


def _write_to(data: bytes, fd: int) -> None:
    write_all(fd, data)


def _from_object(obj: str, path: str, digest: str, mode: int, umask: int) -> os.stat_result:
    """Copy object `obj` to the new file `path`, checked against `digest` as it is copied:
    a small one read, hashed and then written; a large one copied by extents, then hashed.
    A corrupted object is deleted (CorruptObject)."""
    try:
        source = os.open(obj, O_READ)
    except FileNotFoundError:
        raise CacheError(f"object {digest[:12]} is missing") from None
    actual = digest

    def fill(fd: int) -> None:
        nonlocal actual
        if size < LARGE_FILE:
            data = read_all(source, size)
            actual = blake3.blake3(data).hexdigest()
            if actual == digest:
                write_all(fd, data)
        else:
            copy_extents(source, fd, size)
            actual = hash_extents(fd, size)

    try:
        size = os.fstat(source).st_size
        st = _write_new(path, O_NEW if size < LARGE_FILE else O_NEW_RW, mode, umask, fill)
    finally:
        os.close(source)
    if actual != digest:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(obj)
        raise corrupted("object", digest, actual)
    return st


def check_cost(entry: Entry) -> None:
    """Raise SlowerThanRunning when restoring `entry` should take longer than its step."""
    files, others = entry.counts()
    estimate = (
        files * RESTORE_SECONDS_PER_FILE
        + others * RESTORE_SECONDS_PER_OTHER
        + entry.size / RESTORE_BYTES_PER_SECOND
    )
    # The slack keeps small restores from flipping with the machine's load: a restore
    # is skipped only when it would cost noticeably more than running the step.
    if estimate > entry.duration + SLOWER_SLACK_SECONDS:
        raise SlowerThanRunning(
            f"restoring {files:,} file{'' if files == 1 else 's'}"
            f" ({entry.size / 1e6:,.1f} MB) would take about"
            f" {estimate:.2f} s, its step took {entry.duration:.2f} s"
        )


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
