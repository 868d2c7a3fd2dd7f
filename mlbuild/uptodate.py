"""A no-op `mlbuild run` told from one file, before the rest of mlbuild is imported.

Importing the command line, the store and the graph costs a no-op three times
what deciding it does, and at 10,000 targets loading the snapshot and the
manifests costs more than the stat calls that decide. So a full `mlbuild run`
that ends with every target fresh leaves a stamp, `.mlbuild/uptodate`, and the
next `mlbuild run` reads it first:

- the key of the pipeline as it was loaded (mlbuild's version and source
  stamp, Python's version, the pipeline file's path and bytes, no `--set`;
  the snapshot is keyed by the same) and the digest of each params file;
- every environment variable a signed target declares, with its digest;
- the stat of `state.db` (inode, size, mtime_ns, ctime_ns) once the run closed
  it, and that no `state.db-wal` was left: a database deleted, replaced or
  written over in place (a backup copied back) is a miss;
- per target, in build order: the stat its signature holds of each input and
  output (path, size, mtime_ns, ctime_ns, inode; taken when its digest was,
  never racy) and the counts `--explain` tells; or nothing, for a target that
  ran or was restored in that run (its outputs are too new to be signed yet);
- what a run deciding everything fresh printed: its skipped lines and its
  summary around the time;
- the experiment row the targets are in, when the run knew it (the row it
  recorded, or the one its own proof's stamp named, nothing made since): the
  next run under the proof keeps its row as the difference from that one.

When all of it is equal now and every target has its stats, every target's
signature would find it fresh again (signature.py's rule, with the target
fixed by the key), so the answer is the same: the same lines, the summary
with this run's time, exit 0, and nothing written. When only some targets'
files moved, the stamp still proves the others fresh: the full command gets
that `Proof` and skips them without a look, once it holds the lock and has
found the stamp unchanged (no other command ran in between; any command that
takes the workspace lock removes the stamp first, `build/lock.py`). Anything
else (an option not listed in `_options`, another key, environment or
state database, a state directory this user cannot write, where the full
command would fail, or without the `.gitignore` it writes again; a stamp
unreadable, corrupt or of another format) is a miss,
and the full command decides as if the stamp were not there.

The stamp is written only by a run that decided every target (no target
named, nothing failed), while it holds the lock. A no-op is thus not in
`mlbuild log`: the history lists runs that did something (the full command
records none either).

Format (`FORMAT` 4): MAGIC, then a CRC-32 (4 bytes, big endian) of the
payload, then the payload, `marshal` version 2 of `Stamp.fields()`. The
targets' entries are in chunks of `CHUNK`, each its own `marshal` bytes: a run
that changed one input of 10,000 targets writes again as read every chunk
whose targets this stamp proved and the run skipped (`Proof.next_chunks`),
rather than marshalling all 10,000 entries anew.
"""

from __future__ import annotations

import gc
import marshal
import os
import sys
import time
import zlib
from stat import S_ISREG

from mlbuild import __version__

TYPE_CHECKING = False  # typing itself costs the no-op 3 ms: only for the type checker
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any, BinaryIO, TypeAlias

    # (path, size, mtime_ns, ctime_ns, inode) of one signed file, relative to the project.
    SignedFile: TypeAlias = tuple[str, int, int, int, int]
    # Counts of (code files, params, env vars, packages, inputs, discovered, outputs),
    # the shape staleness.compared_text describes for --explain.
    Counts: TypeAlias = tuple[int, int, int, int, int, int, int]
    # One target of a stamp: its name, and its counts and files (None: not proven).
    Entry: TypeAlias = tuple[str, Counts | None, tuple[SignedFile, ...]]
    # What a stamp proves of a target: its counts and files, and its entry's chunk.
    Proven: TypeAlias = tuple[Counts, tuple[SignedFile, ...], int]

PIPELINE_FILE = "pipeline.toml"
STATE_DIR = ".mlbuild"
STAMP_FILE = "uptodate"
FORMAT = 4
MAGIC = f"mlbuild-uptodate {FORMAT}\n".encode()
_MARSHAL = 2
_CRC = 4
CHUNK = 256  # target entries per chunk (see the format above)
_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_BOOLEAN_OPTIONS = frozenset({"-k", "--keep-going", "--no-cache"})


class Stamp:
    """What a run decided, and everything that decision rested on (module docstring).

    A plain class, not a NamedTuple: see TYPE_CHECKING above."""

    __slots__ = ("chunks", "env", "head", "key", "lines", "note", "row", "sources", "state")

    def __init__(
        self,
        key: str,  # pipeline_key of the pipeline file as loaded
        sources: tuple[tuple[str, str], ...],  # (absolute path, digest) of each params file
        env: tuple[tuple[str, str | None], ...],  # (variable, env_digest of its value)
        state: tuple[int, ...],  # `state_identity` of .mlbuild, the database closed
        chunks: tuple[bytes, ...],  # every target's Entry, CHUNK a chunk (`pack_entries`)
        lines: str,  # the skipped lines of the plain log, newline-terminated
        head: str,  # the summary before its time: `mlbuild: 200 skipped`
        note: str,  # the summary after its time: ` (saved 0.432s by skipping)` or ""
        row: str | None,  # the experiment row the targets are in (experiments.py), if known
    ) -> None:
        self.key = key
        self.sources = sources
        self.env = env
        self.state = state
        self.chunks = chunks
        self.lines = lines
        self.head = head
        self.note = note
        self.row = row

    def fields(self) -> tuple[Any, ...]:
        """The values in the order `__init__` takes them (what is marshalled)."""
        return (
            self.key,
            self.sources,
            self.env,
            self.state,
            self.chunks,
            self.lines,
            self.head,
            self.note,
            self.row,
        )


class Proof:
    """The targets a stamp proves fresh in a run it cannot tell alone, for the full command.

    Valid only once `confirm` is given, under the workspace lock, the stamp file it
    removed and it is the very file this proof was read from: no command ran between.
    """

    __slots__ = ("chunks", "env", "fresh", "row", "seen", "unproven", "valid")

    def __init__(
        self,
        fresh: dict[str, Proven],
        env: tuple[tuple[str, str | None], ...],
        seen: tuple[int, ...],
        chunks: tuple[tuple[bytes, tuple[Entry, ...]], ...] = (),
        unproven: dict[str, int] | None = None,
        row: str | None = None,
    ) -> None:
        self.fresh = fresh  # target -> its counts, files and chunk, all as the stamp has them
        self.env = env  # the stamp's environment digests (equal now)
        self.seen = seen  # identity of the stamp file read (see _identity)
        self.chunks = chunks  # each chunk as read, and its entries
        self.unproven = unproven or {}  # the stamp's other targets -> their chunk
        self.row = row  # the experiment row the stamp's targets are in (Stamp.row)
        self.valid = False

    def confirm(self, removed: tuple[int, ...] | None) -> None:
        self.valid = removed is not None and removed == self.seen

    def next_chunks(
        self, decided: int, skipped: set[str], entry_of: Callable[[str], Entry]
    ) -> tuple[bytes, ...] | None:
        """The next stamp's chunks after a run that decided every target (`decided` of
        them) and skipped `skipped` by this proof: a chunk all of whose targets are among
        them is kept as read (their entries are the ones it holds), any other is made
        again of `entry_of` its targets. None when the run's targets are not the stamp's."""
        fresh, unproven = self.fresh, self.unproven
        if len(fresh) + len(unproven) != decided or not fresh.keys() >= skipped:
            return None
        dirty = set(unproven.values())
        dirty.update(fresh[name][2] for name in fresh.keys() - skipped)
        dumps = marshal.dumps
        return tuple(
            [
                dumps(tuple([entry_of(entry[0]) for entry in entries]), _MARSHAL)
                if k in dirty
                else raw
                for k, (raw, entries) in enumerate(self.chunks)
            ]
        )


def pack_entries(entries: Sequence[Entry]) -> tuple[bytes, ...]:
    """`entries` in chunks of CHUNK, each marshalled on its own (the stamp's format)."""
    dumps = marshal.dumps
    return tuple(
        [dumps(tuple(entries[i : i + CHUNK]), _MARSHAL) for i in range(0, len(entries), CHUNK)]
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


def forget(root: str) -> tuple[int, ...] | None:
    """Remove the stamp, with the workspace lock held, before anything changes; the
    identity of the file removed (None: there was none), for `Proof.confirm`."""
    path = stamp_path(root)
    try:
        seen = _identity(os.lstat(path))
        os.unlink(path)
    except FileNotFoundError:
        return None
    return seen


def state_identity(root: str) -> tuple[int, ...] | None:
    """(inode, size, mtime_ns, ctime_ns) of `state.db`, or None while a `-wal` holds
    part of it: any write to the database, even in place, changes one of them."""
    folder = os.path.join(root, STATE_DIR)
    try:
        st = os.lstat(os.path.join(folder, "state.db"))
    except OSError:
        return None
    if os.path.lexists(os.path.join(folder, "state.db-wal")):
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _identity(st: os.stat_result) -> tuple[int, ...]:
    """What tells one stamp file from any other: each is written anew and renamed in."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def open_new(path: str) -> BinaryIO:
    """A new file at `path` to write, never through a symlink planted there: a name left
    by an earlier process of this pid is removed (unlink takes the link, not its target)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except FileExistsError:
        os.unlink(path)
        fd = os.open(path, flags, 0o644)
    return os.fdopen(fd, "wb")


def write(root: str, stamp: Stamp) -> None:
    """Keep `stamp` atomically (temporary file, then rename); silently nothing on failure."""
    path = stamp_path(root)
    tmp = f"{path}.{os.getpid()}.tmp"
    payload = marshal.dumps(stamp.fields(), _MARSHAL)
    try:
        with open_new(tmp) as handle:
            handle.write(MAGIC + zlib.crc32(payload).to_bytes(_CRC, "big") + payload)
        os.replace(tmp, path)
    except OSError:
        try:  # noqa: SIM105 (as in forget)
            os.unlink(tmp)
        except OSError:
            pass


def answer(words: list[str]) -> int | Proof | None:
    """Exit code of `mlbuild WORDS` when the stamp tells it (after printing what the full
    command would); a `Proof` of the targets it proves fresh when it cannot tell it all;
    None when it proves nothing. Not 0: the full command runs."""
    start = time.perf_counter()
    options = _options(words)
    if options is None:
        return None
    file, quiet, plain = options
    try:
        file = _pipeline_file(file)
        if file is None:
            return None
        root = os.path.dirname(file)
        read = _read(root)
        if read is None:
            return None
        stamp, seen = read
        collecting = gc.isenabled()
        gc.disable()  # entries by the ten thousand, and no cycles (snapshot.load_graph too)
        try:
            checked = _fresh(stamp, root, file)
            gc.freeze()  # they live as long as the command: never worth scanning
        finally:
            if collecting:
                gc.enable()
    except OSError:  # the working directory is gone, say: the full command tells
        return None
    if checked is None:
        return None
    fresh, chunks, unproven = checked
    if unproven:
        return Proof(fresh, stamp.env, seen, chunks, unproven, stamp.row)
    terminal = sys.stdout.isatty() and os.environ.get("TERM") != "dumb"
    text = "" if quiet or (terminal and not plain) else stamp.lines
    text += summary_text(stamp.head, time.perf_counter() - start, stamp.note) + "\n"
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


def _read(root: str) -> tuple[Stamp, tuple[int, ...]] | None:
    """The stamp and its identity; None unless it is a regular file (a FIFO put in its
    place must not hang a command the full engine would run: it only unlinks it)."""
    try:
        fd = os.open(stamp_path(root), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not S_ISREG(st.st_mode):
            return None
        seen = _identity(st)
        with open(fd, "rb", closefd=False) as handle:
            data = handle.read()
    except OSError:
        return None
    finally:
        os.close(fd)
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
    return stamp, seen


def _fresh(
    stamp: Stamp, root: str, file: str
) -> tuple[dict[str, Proven], tuple[tuple[bytes, tuple[Entry, ...]], ...], dict[str, int]] | None:
    """The targets whose every file is as the stamp has it, with their counts, files and
    chunk; the chunks as read with their entries; the other targets with their chunk.
    None when what the whole stamp rests on moved (module docstring), or a chunk is
    unreadable."""
    if state_identity(root) != stamp.state:
        return None
    folder = os.path.join(root, STATE_DIR)
    access, writable = os.access, os.W_OK
    if not (
        access(folder, writable)
        and access(os.path.join(folder, "state.db"), writable)
        and access(os.path.join(folder, "lock"), writable | os.R_OK)
    ):
        return None  # the full command fails (its lock, `Store.check_writable`): it says so
    if not os.path.lexists(os.path.join(folder, ".gitignore")):
        return None  # the full command writes it again (store.open_store)
    environ = os.environ
    if any(env_digest(environ.get(name)) != value for name, value in stamp.env):
        return None
    for path, known in stamp.sources:
        with open(path, "rb") as handle:
            if digest(handle.read()) != known:
                return None
    with open(file, "rb") as handle:
        if pipeline_key(file, handle.read(), "[]") != stamp.key:
            return None
    fresh: dict[str, Proven] = {}
    unproven: dict[str, int] = {}
    chunks: list[tuple[bytes, tuple[Entry, ...]]] = []
    lstat, loads = os.lstat, marshal.loads
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for k, raw in enumerate(stamp.chunks):
            entries = loads(raw)
            chunks.append((raw, entries))
            for name, counts, files in entries:
                if counts is None:
                    unproven[name] = k
                    continue
                for path, size, mtime_ns, ctime_ns, ino in files:
                    try:
                        st = lstat(path, dir_fd=fd)
                    except (OSError, ValueError):
                        break
                    if (
                        st.st_mtime_ns != mtime_ns
                        or st.st_ctime_ns != ctime_ns
                        or st.st_size != size
                        or st.st_ino != ino
                    ):
                        break
                else:
                    fresh[name] = (counts, files, k)
                    continue
                unproven[name] = k
    except (EOFError, ValueError, TypeError):  # a chunk marshal cannot read, or not entries
        return None
    finally:
        os.close(fd)
    return fresh, tuple(chunks), unproven
