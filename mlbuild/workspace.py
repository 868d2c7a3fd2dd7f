"""The workspace: where mlbuild may write, and the layout of its own `.mlbuild/` directory.

Two rules live here so that every command applies them the same way:

- *Inside the project, never beyond.* `writable_path` is the one check run,
  clean, restore, pull, watch, gc and the executors use before they write,
  delete, move or restore a path. It resolves symlinks in every parent
  directory, so `out -> /elsewhere` cannot carry a write to `out/sub` out of
  the project; the last component itself is never followed (a symlink output
  is replaced as a link, not through it).
- *What mlbuild did not make, it does not delete.* `move_aside` renames such a
  file into `.mlbuild/trash/` (same filesystem, so a rename: instant, and the
  bytes are kept) and says where; `mlbuild gc` empties trash older than a week.

Every path under `.mlbuild/` is built by a function of this module, so the
layout is written down once. Names derived from user input (logs, staging)
are short digests when the name is long or unusual: a 255-byte target name is
legal in pipeline.toml but not as `NAME.log` on most filesystems.
"""

from __future__ import annotations

import errno
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path

from mlbuild.errors import StateError, UserError
from mlbuild.pipeline.schema import STATE_DIR

TRASH_KEEP_SECONDS = 7 * 24 * 3600.0  # what `mlbuild gc` keeps of the trash by default
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,80}")


class OutsideProject(UserError):
    """A path mlbuild was asked to write resolves outside the project (or into `.mlbuild/`)."""


def state_dir(root: Path) -> Path:
    return root / STATE_DIR


def cache_dir(root: Path) -> Path:
    return root / STATE_DIR / "cache"


def snapshot_dir(root: Path) -> Path:
    """Compiled pipelines (`snapshot.py`): one file per pipeline file, rebuilt at will."""
    return root / STATE_DIR / "snapshot"


def ray_dir(root: Path) -> Path:
    """Token files the Ray executor writes to learn which nodes share the filesystem."""
    return root / STATE_DIR / "ray"


def running_dir(root: Path) -> Path:
    """Markers naming the process groups of running steps (for orphan reaping)."""
    return root / STATE_DIR / "running"


def trash_dir(root: Path) -> Path:
    return root / STATE_DIR / "trash"


def staging_dir(root: Path) -> Path:
    """Where restores assemble files before renaming them into place (same filesystem)."""
    return root / STATE_DIR / "staging"


def short_name(name: str) -> str:
    """`name` itself when it is short and plain, else a prefix of it and a digest."""
    if _SAFE_NAME.fullmatch(name) and not name.startswith("."):
        return name
    from blake3 import blake3

    plain = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:40].lstrip(".")
    return f"{plain}-{blake3(name.encode()).hexdigest()[:16]}"


def log_path(root: Path, target: str) -> Path:
    """The log of `target`'s last step: `.mlbuild/logs/<short name>.log`."""
    return Path(f"{root}/{STATE_DIR}/logs/{short_name(target)}.log")  # one Path, not three


def made_path(root: Path, target: str) -> Path:
    """Digests of the outputs a failed or interrupted step left: mlbuild's own, deletable."""
    return Path(f"{root}/{STATE_DIR}/made/{short_name(target)}.json")


def save_made(root: Path, target: str, outputs: Mapping[str, str]) -> None:
    """Remember `outputs` (path -> digest text) as made by `target`'s unrecorded step."""
    import json

    path = made_path(root, target)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"target": target, "outputs": dict(outputs)}))
    os.replace(tmp, path)


def load_made(root: Path, target: str) -> dict[str, str]:
    """What `save_made` remembered for `target` (empty if nothing, or unreadable)."""
    import json

    try:
        data = json.loads(made_path(root, target).read_text())
    except (OSError, ValueError):
        return {}
    outputs = data.get("outputs") if isinstance(data, dict) else None
    if data.get("target") != target or not isinstance(outputs, dict):
        return {}
    return {k: v for k, v in outputs.items() if isinstance(k, str) and isinstance(v, str)}


def forget_made(root: Path, target: str) -> None:
    made_path(root, target).unlink(missing_ok=True)


def writable_path(root: Path, rel: str) -> str:
    """The absolute path of project path `rel`, if mlbuild may write or delete it.

    Raises OutsideProject when a parent directory of `rel` is a symlink (or a
    chain of them) leading outside the project, or when `rel` is or lies inside
    `.mlbuild/`. The last component is not resolved: callers act on it with
    lstat, unlink and rename, which never follow it.
    """
    full = os.path.join(root, rel)
    parent, _ = os.path.split(os.path.normpath(full))
    real_root = os.path.realpath(root)
    real_parent = os.path.realpath(parent)
    if real_parent != real_root and not real_parent.startswith(real_root + os.sep):
        raise OutsideProject(
            f"'{rel}' resolves outside the project (to {os.path.join(real_parent, '')}"
            f"{os.path.basename(full)}) through a symlink; mlbuild writes only inside the project"
        )
    inside = os.path.relpath(os.path.join(real_parent, os.path.basename(full)), real_root)
    if inside == STATE_DIR or inside.startswith(STATE_DIR + os.sep):
        raise OutsideProject(f"'{rel}' is inside mlbuild's own {STATE_DIR}/")
    return full


def move_aside(root: Path, rel: str) -> str:
    """Rename project path `rel` into the trash; returns where it went, relative to `root`.

    Each call gets its own directory (`trash/<time>-<pid>-<n>/`), so the same
    path moved aside twice keeps both copies.
    """
    src = writable_path(root, rel)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = trash_dir(root)
    n = 0
    while True:
        slot = base / f"{stamp}-{os.getpid()}-{n}"
        try:
            slot.mkdir(parents=True)
            break
        except FileExistsError:
            n += 1
    dest = slot / rel
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(src, dest)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            _copy_then_remove(src, str(dest))  # another filesystem (a volume, a mount)
    except OSError as exc:
        import shutil

        shutil.rmtree(slot, ignore_errors=True)
        raise StateError(
            f"cannot move '{rel}' aside into {STATE_DIR}/trash/ ({exc.strerror or exc});"
            " mlbuild did not make it and will not delete it: move or remove it yourself"
        ) from None
    return os.path.relpath(dest, root)


def _copy_then_remove(src: str, dest: str) -> None:
    """A rename across filesystems: copy everything (links as links), then delete the source."""
    import shutil

    if os.path.isdir(src) and not os.path.islink(src):
        shutil.copytree(src, dest, symlinks=True)
        shutil.rmtree(src)
    else:
        shutil.copy2(src, dest, follow_symlinks=False)
        os.unlink(src)


def empty_trash(root: Path, older_than: float = TRASH_KEEP_SECONDS) -> int:
    """Delete trash slots moved aside more than `older_than` seconds ago; returns how many."""
    import shutil

    removed = 0
    now = time.time()
    try:
        slots = list(os.scandir(trash_dir(root)))
    except FileNotFoundError:
        return 0
    for slot in slots:
        try:
            if now - slot.stat(follow_symlinks=False).st_mtime < older_than:
                continue
        except OSError:
            continue
        if slot.is_dir(follow_symlinks=False):
            shutil.rmtree(slot.path, ignore_errors=True)
        else:
            os.unlink(slot.path)
        removed += 1
    return removed
