"""The workspace lock: one `mlbuild run` at a time per `.mlbuild/`.

An advisory `flock` on `.mlbuild/lock`. The kernel releases it when its
holder exits or is killed (-9 included), so a lock left by a dead process is
simply free: there is nothing stale to detect or delete. The file holds the
holder's pid and command line, to tell a waiting user who holds it.
Read-only commands (`status`, `list`, `dag`) never take it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mlbuild.errors import MlbuildError, StateError
from mlbuild.store import Store, open_lock_file, open_store
from mlbuild.uptodate import Proof, forget
from mlbuild.workspace import running_dir, staging_dir, state_dir

POLL_SECONDS = 0.1


class LockBusy(MlbuildError):
    """Another mlbuild holds the workspace and the user asked not to wait."""


class WorkspaceLock:
    """Hold with `with WorkspaceLock(...)`; released on exit (or by the kernel on death)."""

    def __init__(
        self,
        state_dir: Path,
        command: str,
        *,
        wait: bool,
        notify: Callable[[str], None],
        proof: Proof | None = None,
    ) -> None:
        self.path = state_dir / "lock"
        self.command = command
        self.wait = wait
        self.notify = notify
        self.proof = proof  # confirmed (or not) by the stamp this lock removes
        self.fd = -1

    def __enter__(self) -> WorkspaceLock:
        self.fd = open_lock_file(self.path)  # a StateError line if .mlbuild is unusable
        told = False
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = self._holder()
                if not self.wait:
                    os.close(self.fd)
                    raise LockBusy(
                        f"another mlbuild is running in this workspace ({holder})"
                    ) from None
                if not told:
                    self.notify(f"waiting for another mlbuild in this workspace ({holder})")
                    told = True
                time.sleep(POLL_SECONDS)
        # Whatever this command changes, the stamp of the last no-op no longer holds.
        try:
            removed = forget(str(self.path.parent.parent))
        except OSError as exc:
            os.close(self.fd)
            raise StateError(f"cannot remove {exc.filename}: {exc.strerror}") from None
        if self.proof is not None:
            self.proof.confirm(removed)
        # Who holds the lock is only for a waiting user's message: a full disk
        # must not stop the command that would free space (`mlbuild gc`).
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()} {self.command}\n".encode(), 0)
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        os.close(self.fd)  # closing releases the flock

    def _holder(self) -> str:
        try:
            text = self.path.read_text().strip()
        except OSError:
            return "holder unknown"
        pid, _, command = text.partition(" ")
        return f"pid {pid}: mlbuild {command}" if pid else "holder unknown"


@contextmanager
def hold_workspace(
    root: Path,
    command: str,
    *,
    wait: bool,
    warn: Callable[[str], None],
    proof: Proof | None = None,
) -> Iterator[Store]:
    """Everything a build needs before it starts: the lock, no orphans, the open state.

    Steps left running by an mlbuild that was killed (-9) are stopped first;
    the executor (and subprocess with it) is imported only when there are any,
    keeping it off the no-op path. `proof` is confirmed by the stamp the lock removes.
    """
    state = state_dir(root)
    with WorkspaceLock(state, command, wait=wait, notify=warn, proof=proof):
        staging = staging_dir(root)
        if staging.is_dir() and any(staging.iterdir()):
            # What a killed restore left; the cache module only then (off the no-op path).
            from mlbuild.cache import clear_staging

            clear_staging(root)
        running = running_dir(root)
        if running.is_dir() and any(running.iterdir()):
            from mlbuild.exec.local import reap_orphans

            for name in reap_orphans(root):
                warn(f"stopped step `{name}` left running by an mlbuild that was killed")
        with open_store(state, warn) as store:
            store.check_writable()  # before any step runs, not when its result is recorded
            yield store
