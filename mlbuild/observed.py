"""What a Python step really used: recorded in its worker, turned into manifest entries after.

Static analysis (code.py) decides before anything ran, so it must stay; but
it cannot see a module imported through `sys.path.insert(0, "lib")`, a
sourceless `.pyc`, an extension module, or a JSON file the step opens without
declaring it. The worker sees all of these, the way a compiler's depfile
names the headers it opened (Ninja's `deps`), and writes them down:

- project modules it imported: every entry of `sys.modules` at the end whose
  file lies in the project (package `__init__.py` files, `.pyc`, `.so`);
- project files it opened for reading, by wrapping the functions that open a
  file by name: `builtins.open` (also `io.open`, which `pathlib` and the
  libraries built on them call: `np.load`, `zipfile`, `PIL`) and `os.open`.
  The wrappers replace the originals before the step's module is imported,
  and cost nothing to anything else the step does. An audit hook
  (`sys.addaudithook`, PEP 578) would see more, but it cannot be removed and
  runs on every audited event of the process, `id()` among them:
  `copy.deepcopy` of 50,000 small dicts took 55% more CPU under one.

Not seen: files opened by C code that bypasses Python (HDF5, TensorFlow's
readers), through `io.FileIO`, `_io.open` or an `open` bound before the
worker started (`tokenize`, hence `linecache`), by subprocesses, or by
forked children (a DataLoader's workers). Declared `inputs` remain the
contract; what is observed only adds to them.

File format (`.mlbuild/logs/<target>.observed.json`, beside the timing file,
written by the worker after the function returned, read and deleted by the
runner; paths relative to the project root):

    {"version": 1,
     "modules": {"lib/helper.py": [size, mtime_ns], ...},
     "reads": {"data/x.json": [size, mtime_ns], ...}}

Each file carries the stat it had when the step first opened it (a module:
when the worker's loader was about to read it; one loaded some other way, a
zip import: at the end). The runner digests the files
after the step and trusts a digest only if the stat is still the same, so a
file edited while the step ran is recorded as changed and reruns the step.

This module imports only the standard library at run time: the worker loads
it into every Python step.
"""

from __future__ import annotations

import json
import os
import stat as _stat
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from mlbuild.code import CodeScanner
    from mlbuild.fingerprint import Fingerprinter
    from mlbuild.pipeline.schema import Target
    from mlbuild.staleness import Observation

OBSERVED_VERSION = 1
# A digest that never equals a real one: the file changed while the step ran.
CHANGED_WHILE_RUNNING = "changed-while-running:"
_TIMING_SUFFIX = ".timing.json"
_OBSERVED_SUFFIX = ".observed.json"
_STATE_DIR = ".mlbuild"  # pipeline.schema.STATE_DIR; the worker imports this module: stdlib only

Stat = tuple[int, int]  # (size, mtime_ns)


def observed_path(timing: str) -> str:
    """The observation file beside a step's timing file (`x.timing.json` -> `x.observed.json`)."""
    return timing.removesuffix(_TIMING_SUFFIX) + _OBSERVED_SUFFIX


class Recorder:
    """Runs in the worker: records project files the step opens and modules it imports."""

    def __init__(self, root: str) -> None:
        self.root = os.path.normpath(root)
        self.prefix = self.root + os.sep
        # Never project files: mlbuild's state, an environment living in the project, and
        # mlbuild itself (its worker runs every step; a checkout of mlbuild may be the
        # project, as its own demo is: the worker's source is no step's code).
        ignored = {os.path.join(self.root, _STATE_DIR), os.path.dirname(os.path.abspath(__file__))}
        for prefix in (sys.prefix, sys.exec_prefix, sys.base_prefix):
            if prefix.startswith(self.prefix):
                ignored.add(os.path.normpath(prefix))
        self.ignored = tuple(p + os.sep for p in ignored)
        self.reads: dict[str, Stat] = {}  # absolute path -> stat when first opened
        self.written: set[str] = set()  # opened for writing first: the step's own files
        self.recording = True
        # (original open, original os.open, their wrappers) once started
        self._restore: tuple[Any, Any, Any, Any] | None = None

    def start(self) -> None:
        """Put the recording wrappers in place of `open`, `io.open` and `os.open`.

        Each records, then calls the original with the same arguments: what the
        step gets back and what it raises are the original's. The recording
        never fails the open (a path it cannot make sense of is the original's
        to reject).
        """
        import builtins
        import functools
        import io

        real_open = builtins.open
        real_os_open = os.open
        opened = self.opened

        def open(file: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                mode = args[0] if args else kwargs.get("mode", "r")
                opened(file, not ("w" in mode or "a" in mode or "x" in mode or "+" in mode))
            except Exception:
                pass
            return real_open(file, *args, **kwargs)

        def os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if kwargs.get("dir_fd") is None:  # else a relative path is not from the cwd
                # try/except: cheaper than contextlib.suppress on every open
                try:  # noqa: SIM105
                    opened(path, flags & os.O_ACCMODE == os.O_RDONLY)
                except Exception:
                    pass
            return real_os_open(path, flags, *args, **kwargs)

        functools.update_wrapper(open, real_open)
        functools.update_wrapper(os_open, real_os_open)
        self._restore = (real_open, real_os_open, open, os_open)
        builtins.open = io.open = open
        os.open = os_open

    def stop(self) -> None:
        """Stop recording; put the originals back unless the step replaced them in turn."""
        self.recording = False
        restore = self._restore
        if restore is None:
            return
        import builtins
        import io

        real_open, real_os_open, wrapped_open, os_open = restore
        if builtins.open is wrapped_open:
            builtins.open = real_open
        if io.open is wrapped_open:
            io.open = real_open
        if os.open is os_open:
            os.open = real_os_open

    def opened(self, path: Any, reading: bool) -> None:
        """The step is about to open `path` (`reading`: for reading only): note a project file.

        Also called by the worker's loader just before it reads a project module.
        """
        if not self.recording:
            return
        if type(path) is not str:
            if isinstance(path, int):
                return  # a file descriptor: its path was seen when it was opened
            path = os.fspath(path)  # a pathlib.Path
            if not isinstance(path, str):
                path = os.fsdecode(path)
        if path[:1] != "/":
            path = os.getcwd() + "/" + path  # the cwd now: the step may have changed it
        if "/." in path or "//" in path:
            path = os.path.normpath(path)
        if not path.startswith(self.prefix) or path.startswith(self.ignored):
            return
        if not reading:
            # Opened for writing (`w`, `a`, `r+`): a file the step makes or updates is
            # its own (a scratch file, a cache it keeps), not an input, even if read too.
            self.written.add(path)
            return
        if path in self.reads or path in self.written:
            return
        try:
            st = os.stat(path)
        except OSError:
            return  # a probe for a file that is not there
        if _stat.S_ISREG(st.st_mode):
            self.reads[path] = (st.st_size, st.st_mtime_ns)

    def report(self) -> dict[str, Any]:
        """The observation as written to the file (see the module docstring)."""
        modules: dict[str, Stat] = {}
        for name, module in list(sys.modules.items()):
            file = getattr(module, "__file__", None)
            if (
                not isinstance(file, str)
                or name == "__main__"
                or name.partition(".")[0] == "mlbuild"
            ):
                continue
            full = os.path.normpath(os.path.join(self.root, file))
            rel = self._relative(full)
            if rel is None or full in self.written:
                continue
            seen = self.reads.pop(full, None)
            if seen is None:
                try:
                    st = os.stat(full)
                except OSError:
                    continue
                seen = (st.st_size, st.st_mtime_ns)
            modules[rel] = seen
        reads: dict[str, Stat] = {}
        for full, seen in list(self.reads.items()):  # a leftover thread may still add
            rel = self._relative(full)
            if rel is not None and full not in self.written and "__pycache__" not in rel:
                reads[rel] = seen
        return {"version": OBSERVED_VERSION, "modules": modules, "reads": reads}

    def _relative(self, full: str) -> str | None:
        """A project-relative POSIX path, or None outside the project or in an ignored place."""
        if not full.startswith(self.prefix) or full.startswith(self.ignored):
            return None
        parts = full.split(os.sep)
        if "site-packages" in parts or "dist-packages" in parts:
            return None
        return full[len(self.prefix) :].replace(os.sep, "/")

    def write(self, timing: str) -> None:
        self.stop()
        with open(observed_path(timing), "w", encoding="utf-8") as handle:
            json.dump(self.report(), handle)


class Seen(NamedTuple):
    """An observation read back: project-relative path -> stat when the step used it."""

    modules: Mapping[str, Stat]
    reads: Mapping[str, Stat]


def read_observed(path: str, not_before: float) -> Seen | None:
    """The observation a step's worker wrote, then deleted; None if absent, stale or unreadable.

    `not_before` (a time.time()) is when the step started: a file older than
    that was left by an earlier run (an mlbuild killed before reading it).
    """
    try:
        if os.stat(path).st_mtime < not_before:
            return None
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        os.unlink(path)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != OBSERVED_VERSION:
        return None
    return Seen(
        {p: (int(s[0]), int(s[1])) for p, s in data["modules"].items()},
        {p: (int(s[0]), int(s[1])) for p, s in data["reads"].items()},
    )


class Settled(NamedTuple):
    """An observation merged into a target's manifest, and the reads it did not declare."""

    observation: Observation
    undeclared: tuple[str, ...]


def settle(
    target: Target,
    before: Observation,
    seen: Seen,
    fp: Fingerprinter,
    scanner: CodeScanner,
    counted: tuple[str, ...] = (),
) -> Settled:
    """Add what the step was seen using to the fingerprint taken before it ran.

    Modules the static closure missed join `code` (and `imported`, so the next
    observation digests them too); files read but not declared, written or
    already counted as code become `discovered` inputs. `counted`: files that
    count another way and are never discovered (params files: by the keys a
    target lists, so that editing another key of the file reruns nothing).
    """
    from mlbuild.code import AT_RUN_TIME

    fingerprint = before.fingerprint
    declared = [*fingerprint.inputs, *(p.path for p in target.outputs)]
    # The static closure, plus the modules seen last time that were seen again (their
    # digests taken before the step, as all of `code`).
    code = {
        path: digest
        for path, digest in fingerprint.code.items()
        if before.imported_by.get(path) != AT_RUN_TIME or path in seen.modules
    }
    imported_by = {path: by for path, by in before.imported_by.items() if path in code}
    imported = [path for path in code if imported_by.get(path) == AT_RUN_TIME]
    for rel, used in sorted(seen.modules.items()):
        if rel in code or rel in counted or _covered(rel, declared):
            continue
        digest = _unchanged(fp, rel, used, scanner.digest_code)
        if digest is None:
            continue
        code[rel] = digest
        imported_by[rel] = AT_RUN_TIME
        imported.append(rel)
    discovered: dict[str, str] = {}
    for rel, used in sorted(seen.reads.items()):
        if rel in code or rel in counted or _covered(rel, declared):
            continue
        digest = _unchanged(fp, rel, used, lambda r: _file_text(fp, r))
        if digest is not None:
            discovered[rel] = digest
    fingerprint = fingerprint._replace(
        code=code, discovered=discovered, imported=tuple(sorted(imported))
    )
    observation = before._replace(fingerprint=fingerprint, imported_by=imported_by)
    return Settled(observation, tuple(discovered))


def _covered(rel: str, declared: list[str]) -> bool:
    """A declared path, or a file inside a declared directory."""
    return any(rel == path or rel.startswith(path + "/") for path in declared)


def _file_text(fp: Fingerprinter, rel: str) -> str | None:
    digest = fp.digest(rel)
    from mlbuild.manifest import DigestKind  # not at the top: the worker imports this module

    return None if digest.kind is DigestKind.MISSING else digest.text


def _unchanged(
    fp: Fingerprinter, rel: str, used: Stat, digest_of: Callable[[str], str | None]
) -> str | None:
    """`digest_of(rel)` if the file is as the step found it; CHANGED_WHILE_RUNNING if not.

    None when the file is gone (a temporary file the step removed). The stat is
    taken before and after digesting: an edit during either shows as a change.
    """
    full = os.path.join(str(fp.root), rel)
    try:
        st = os.stat(full)
        digest = digest_of(rel)
        after = os.stat(full)
    except OSError:
        return None
    if digest is None:
        return None
    if (st.st_size, st.st_mtime_ns) != used or after.st_mtime_ns != st.st_mtime_ns:
        return CHANGED_WHILE_RUNNING
    return digest
