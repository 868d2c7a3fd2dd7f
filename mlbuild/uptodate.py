"""A no-op `mlbuild run` told from one file, before the rest of mlbuild is imported.

Importing the command line, the store and the graph costs a no-op three times
what deciding it does, and at 10,000 targets loading the snapshot and the
manifests costs more than the stat calls that decide. So a full `mlbuild run`
that found every target fresh by its stat signature (signature.py) leaves a
stamp, `.mlbuild/uptodate`, and the next `mlbuild run` reads it first:

- the key of the pipeline as it was loaded (mlbuild's version and source
  stamp, Python's version, the pipeline file's path and bytes, no `--set`;
  the snapshot is keyed by the same) and the digest of each params file;
- every environment variable a target declares, with the digest of its value;
- the inode of `state.db` (a deleted or replaced state database is a miss);
- the stat every signature holds: (path, size, mtime_ns, ctime_ns, inode) of
  each input and output, taken when its digest was, never racy;
- what that run printed: its skipped lines and its summary around the time.

When all of it is equal now, every target's signature would find it fresh
again (signature.py's rule, with the target fixed by the key), so the answer
is the same: the same lines, the summary with this run's time, exit 0, and
nothing written. Anything else (an option not listed in `_options`, a file
that moved, a stamp unreadable, corrupt or of another format) is a miss, and
the full command decides as if the stamp were not there.

Any command that takes the workspace lock removes the stamp first
(`build/lock.py`), before it can change an output or a manifest; a new one is
written only by the next run that decides everything fresh, while it holds the
lock. A no-op is thus not in `mlbuild log`: the history lists runs that did
something (the full command records none either).

Format (`FORMAT` 1): MAGIC, then a CRC-32 (4 bytes, big endian) of the
payload, then the payload, `marshal` version 2 of `Stamp` as a plain tuple.
"""

from __future__ import annotations

import marshal
import os
import sys
import time
import zlib

from mlbuild import __version__

TYPE_CHECKING = False  # typing itself costs the no-op 3 ms: only for the type checker
if TYPE_CHECKING:
    from typing import Any, TypeAlias

    # (path, size, mtime_ns, ctime_ns, inode) of one signed file, relative to the project.
    SignedFile: TypeAlias = tuple[str, int, int, int, int]

PIPELINE_FILE = "pipeline.toml"
STATE_DIR = ".mlbuild"
STAMP_FILE = "uptodate"
FORMAT = 1
MAGIC = f"mlbuild-uptodate {FORMAT}\n".encode()
_MARSHAL = 2
_CRC = 4
_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_BOOLEAN_OPTIONS = frozenset({"-k", "--keep-going", "--no-cache"})


class Stamp:
    """What a no-op run decided, and everything that decision rested on (module docstring).

    A plain class, not a NamedTuple: see TYPE_CHECKING above."""

    __slots__ = ("env", "files", "head", "key", "lines", "note", "sources", "state_ino")

    def __init__(
        self,
        key: str,  # pipeline_key of the pipeline file as loaded
        sources: tuple[tuple[str, str], ...],  # (absolute path, digest) of each params file
        env: tuple[tuple[str, str | None], ...],  # (variable, env_digest of its value)
        state_ino: int,  # inode of .mlbuild/state.db
        files: tuple[SignedFile, ...],
        lines: str,  # the skipped lines of the plain log, newline-terminated
        head: str,  # the summary before its time: `mlbuild: 200 skipped`
        note: str,  # the summary after its time: ` (saved 0.432s by skipping)` or ""
    ) -> None:
        self.key = key
        self.sources = sources
        self.env = env
        self.state_ino = state_ino
        self.files = files
        self.lines = lines
        self.head = head
        self.note = note

    def fields(self) -> tuple[Any, ...]:
        """The values in the order `__init__` takes them (what is marshalled)."""
        return (
            self.key,
            self.sources,
            self.env,
            self.state_ino,
            self.files,
            self.lines,
            self.head,
            self.note,
        )


def digest(data: bytes) -> str:
    """Hex BLAKE3 of `data`: what snapshot keys and environment values are kept as."""
    from blake3 import blake3

    return blake3(data).hexdigest()


def env_digest(value: str | None) -> str | None:
    """What a manifest keeps of an environment value: its BLAKE3, None when unset."""
    if value is None:
        return None
    return digest(value.encode("utf-8", "surrogateescape"))


def code_stamp() -> str:
    """Names, sizes and mtimes of mlbuild's own source files: changes whenever its code does."""
    parts: list[str] = []
    stack = [_PACKAGE]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            parts.append(f"{folder} unreadable")
            continue
        for entry in entries:
            if entry.name.endswith(".py"):
                st = entry.stat()
                parts.append(f"{entry.path} {st.st_size} {st.st_mtime_ns} {st.st_ino}")
            elif entry.name != "__pycache__" and entry.is_dir():
                stack.append(entry.path)
    return "\n".join(parts)


def pipeline_key(file: str, data: bytes, settings: str) -> str:
    """The key of pipeline `file` (resolved) with bytes `data` and `--set` overrides `settings`
    (their repr): equal only when loading it again must give the same value."""
    head = "\0".join(("pipeline-key 1", __version__, sys.version, code_stamp(), file, settings))
    return digest(head.encode() + b"\0" + data)


def stamp_path(root: str) -> str:
    return os.path.join(root, STATE_DIR, STAMP_FILE)


def forget(root: str) -> None:
    """Remove the stamp: called with the workspace lock held, before anything changes."""
    try:  # noqa: SIM105 (contextlib would be one more import on the no-op path)
        os.unlink(stamp_path(root))
    except FileNotFoundError:
        pass


def write(root: str, stamp: Stamp) -> None:
    """Keep `stamp` atomically (temporary file, then rename); silently nothing on failure."""
    path = stamp_path(root)
    tmp = f"{path}.{os.getpid()}.tmp"
    payload = marshal.dumps(stamp.fields(), _MARSHAL)
    try:
        with open(tmp, "wb") as handle:
            handle.write(MAGIC + zlib.crc32(payload).to_bytes(_CRC, "big") + payload)
        os.replace(tmp, path)
    except OSError:
        try:  # noqa: SIM105 (as in forget)
            os.unlink(tmp)
        except OSError:
            pass


def answer(words: list[str]) -> int | None:
    """Exit code of `mlbuild WORDS` when the stamp tells it (after printing what the full
    command would), else None: then the full command runs."""
    start = time.perf_counter()
    options = _options(words)
    if options is None:
        return None
    file, quiet, plain = options
    file = _pipeline_file(file)
    if file is None:
        return None
    root = os.path.dirname(file)
    stamp = _read(root)
    if stamp is None or not _holds(stamp, root, file):
        return None
    terminal = sys.stdout.isatty() and os.environ.get("TERM") != "dumb"
    text = "" if quiet or (terminal and not plain) else stamp.lines
    text += f"{stamp.head} in {time.perf_counter() - start:.3f}s{stamp.note}.\n"
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except (OSError, ValueError):
        return None  # the full command tells a closed stdout its own way
    return 0


def summary_text(head: str, seconds: float, note: str) -> str:
    """`mlbuild: 2 skipped, 1 ran in 3.104s (saved 1m 12s by skipping).` (ui/report.py)."""
    return f"{head} in {seconds:.3f}s{note}."


def _options(words: list[str]) -> tuple[str | None, bool, bool] | None:
    """(`-f` file, `-q`, `--plain`) of `run` with options that cannot change a no-op's answer,
    or None for anything else, including what the full parser would refuse."""
    file: str | None = None
    quiet = plain = False
    command = False
    rest = iter(words)
    for word in rest:
        if word == "run" and not command:
            command = True
        elif word in ("-f", "--file"):
            file = next(rest, None)
            if file is None or file.startswith("-") or not file:
                return None
        elif word.startswith("--file="):
            file = word[len("--file=") :]
            if not file:
                return None
        elif not command:
            return None  # before `run` only the file is ours to take
        elif word in ("-q", "--quiet"):
            quiet = True
        elif word == "--plain":
            plain = True
        elif word in _BOOLEAN_OPTIONS:
            pass
        elif word in ("-j", "--jobs"):
            if not _jobs(next(rest, "")):
                return None
        elif word.startswith("--jobs="):
            if not _jobs(word[len("--jobs=") :]):
                return None
        elif word.startswith("-j") and word[2:3].isdigit():
            if not _jobs(word[2:]):
                return None
        else:
            return None
    return (file, quiet, plain) if command else None


def _jobs(text: str) -> bool:
    return text.isascii() and text.isdigit() and int(text) >= 1


def _pipeline_file(file: str | None) -> str | None:
    """The resolved path of the pipeline file `-f` names or the nearest one upward."""
    if file is None:
        folder = os.getcwd()
        while True:
            candidate = os.path.join(folder, PIPELINE_FILE)
            if os.path.isfile(candidate):
                file = candidate
                break
            parent = os.path.dirname(folder)
            if parent == folder:
                return None
            folder = parent
    return os.path.realpath(file)


def _read(root: str) -> Stamp | None:
    try:
        with open(stamp_path(root), "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    if not data.startswith(MAGIC):
        return None
    body = data[len(MAGIC) :]
    payload = body[_CRC:]
    if zlib.crc32(payload).to_bytes(_CRC, "big") != body[:_CRC]:
        return None
    try:
        stamp = Stamp(*marshal.loads(payload))
    except (EOFError, ValueError, TypeError):
        return None
    return stamp


def _holds(stamp: Stamp, root: str, file: str) -> bool:
    """Whether everything the stamp's decision rested on is as it was (module docstring)."""
    try:
        st = os.lstat(os.path.join(root, STATE_DIR, "state.db"))
        if st.st_ino != stamp.state_ino:
            return False
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        for path, size, mtime_ns, ctime_ns, ino in stamp.files:
            st = os.lstat(path, dir_fd=fd)
            if (
                st.st_mtime_ns != mtime_ns
                or st.st_ctime_ns != ctime_ns
                or st.st_size != size
                or st.st_ino != ino
            ):
                return False
    except (OSError, ValueError):
        return False
    finally:
        os.close(fd)
    environ = os.environ
    if any(env_digest(environ.get(name)) != value for name, value in stamp.env):
        return False
    try:
        for path, known in stamp.sources:
            with open(path, "rb") as handle:
                if digest(handle.read()) != known:
                    return False
        with open(file, "rb") as handle:
            data = handle.read()
    except OSError:
        return False
    return pipeline_key(file, data, "[]") == stamp.key
