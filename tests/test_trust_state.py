"""What a user sees when the files or the state cannot be trusted as they are.

Edits that put the mtime back, inputs that are FIFOs, sockets or unreadable,
and a state database that is corrupt, read-only, in the way or holding a
damaged manifest: each is either handled (the step reruns) or one line on
stderr naming the path and what to do, never a traceback and never a hang.

The CLI runs in a forked child (`run_cli`), so that a hang is killed after a
timeout rather than blocking the suite, and so that permissions can be tested
as a user other than root: root reads any file whatever its mode, so as root
the child drops to `nobody` before calling `main`, on a project it owns.
"""

from __future__ import annotations

import importlib
import os
import selectors
import shutil
import signal
import socket
import sqlite3
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from mlbuild.cli import main
from mlbuild.fingerprint import FINE_WINDOW_NS

# As `nobody` the forked child may not read the interpreter's own library (here it
# lives under /root), so every module a run may import is loaded before any fork.
for _module in (
    "mlbuild.build.background",
    "mlbuild.cache",
    "mlbuild.commands",
    "mlbuild.exec.local",
    "mlbuild.snapshot",
    "mlbuild.ui.history",
):
    importlib.import_module(_module)

NOBODY = 65534
CANNOT_SWITCH = 77
TIMEOUT = 60.0


class Result(NamedTuple):
    code: int
    out: str
    err: str

    def started(self) -> list[str]:
        return [line.split("`")[1] for line in self.out.splitlines() if "` has started" in line]


def run_cli(root: Path, *argv: str, as_nobody: bool = False) -> Result:
    """`mlbuild ARGV` in a forked child in `root`; fails the test if it does not end in time."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12 warns about forking a process with threads (an earlier test may
        # leave some); the child only runs mlbuild, so no lock of theirs is needed.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            if as_nobody:
                try:
                    os.setgroups([])
                    os.setgid(NOBODY)
                    os.setuid(NOBODY)
                except PermissionError:
                    os._exit(CANNOT_SWITCH)  # no CAP_SETUID here (a restricted container)
            os.chdir(root)
            code = main(list(argv))
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(out_w)
    os.close(err_w)
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
    deadline = time.monotonic() + TIMEOUT
    with selectors.DefaultSelector() as sel:
        for fd in chunks:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail(f"mlbuild {' '.join(argv)} did not finish in {TIMEOUT:.0f}s")
            for key, _ in sel.select(left):
                data = os.read(key.fd, 65536)
                if data:
                    chunks[key.fd].append(data)
                else:
                    sel.unregister(key.fd)
    os.close(out_r)
    os.close(err_r)
    _, status = os.waitpid(pid, 0)
    out, err = (b"".join(chunks[fd]).decode() for fd in (out_r, err_r))
    code = os.waitstatus_to_exitcode(status)
    if as_nobody and code == CANNOT_SWITCH:
        pytest.skip("cannot switch to an unprivileged user here, and root reads any file")
    return Result(code, out, err)


def assert_one_line(result: Result, code: int, *needles: str) -> str:
    """Exit `code`, exactly one line on stderr holding every needle, no traceback."""
    assert result.code == code, result
    assert "Traceback" not in result.err + result.out, result.err
    lines = result.err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.err}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


COPY = """
    [targets.copy]
    cmd = "cat {inputs.src} > {outputs.out}"
    inputs = { src = "in.txt" }
    outputs = { out = "out.txt" }
"""

COPY_DIR = """
    [targets.list]
    cmd = "cat {inputs.data}/*/* > {outputs.out}"
    inputs = { data = "data" }
    outputs = { out = "out.txt" }
"""


def settle(*paths: Path) -> None:
    """Wait until the paths' timestamps are out of the racy window, so the cache trusts them."""
    newest = max(max(p.stat().st_mtime_ns, p.stat().st_ctime_ns) for p in paths)
    while time.time_ns() < newest + FINE_WINDOW_NS + 20_000_000:
        time.sleep(0.02)


@pytest.fixture
def owned_by_nobody() -> Iterator[Path]:
    """A project directory the child can use as `nobody` (tmp_path's parents are root-only)."""
    if not hasattr(os, "fork"):
        pytest.skip("needs fork")
    root = Path(tempfile.mkdtemp(prefix="mlbuild-perm-"))
    root.chmod(0o755)
    yield root
    for folder, dirs, _ in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o755)
    shutil.rmtree(root)


def as_nobody(root: Path) -> bool:
    """Hand the project to `nobody` when running as root; True if the child must switch."""
    if os.geteuid() != 0:
        return False  # permissions already apply to us
    for folder, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            os.lchown(os.path.join(folder, name), NOBODY, NOBODY)
    os.lchown(root, NOBODY, NOBODY)
    return True


# --- 1. an edit whose mtime is put back ---------------------------------------------------------


@pytest.mark.parametrize("layout", ["file", "directory"])
def test_edit_with_mtime_put_back_reruns_the_step(tmp_path: Path, layout: str) -> None:
    if layout == "file":
        write(tmp_path, "pipeline.toml", COPY)
        src = write(tmp_path, "in.txt", "old content\n")
    else:
        write(tmp_path, "pipeline.toml", COPY_DIR)
        for i in range(30):
            write(tmp_path, f"data/{i % 3}/f{i:02d}.txt", f"line {i}\n")
        src = tmp_path / "data/1/f13.txt"
    assert run_cli(tmp_path, "run").started() != []
    settle(*tmp_path.rglob("*.txt"))
    assert run_cli(tmp_path, "run", "--no-cache").started() == []  # the cache is trusted now
    before = src.stat()
    src.write_text(src.read_text().upper())  # same size, new bytes
    os.utime(src, ns=(before.st_atime_ns, before.st_mtime_ns))  # rsync -t, tar -x, cp -p
    assert (src.stat().st_size, src.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    result = run_cli(tmp_path, "run", "--no-cache")
    assert result.code == 0, result
    assert result.started() == ["copy" if layout == "file" else "list"]
    assert "input changed" in result.out
    assert src.read_text() in (tmp_path / "out.txt").read_text()
    assert run_cli(tmp_path, "run").started() == []


# --- 2. FIFOs, sockets and devices are not inputs -----------------------------------------------


@pytest.mark.parametrize("command", ["run", "status"])
@pytest.mark.parametrize("where", ["in.txt", "data/sub/in.txt"])
def test_a_fifo_input_is_one_line_not_a_hang(tmp_path: Path, command: str, where: str) -> None:
    write(tmp_path, "pipeline.toml", COPY if where == "in.txt" else COPY_DIR)
    (tmp_path / where).parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(tmp_path / where)
    result = run_cli(tmp_path, command)
    assert_one_line(result, 2, f"'{where}'", "FIFO", "only regular files")
    assert "has started" not in result.out


@pytest.mark.parametrize("where", ["in.txt", "data/s"])
def test_a_socket_input_is_one_line_not_a_traceback(tmp_path: Path, where: str) -> None:
    write(tmp_path, "pipeline.toml", COPY if where == "in.txt" else COPY_DIR)
    (tmp_path / "data").mkdir()
    short = Path(tempfile.mkdtemp(prefix="s"))  # AF_UNIX paths are limited to ~108 bytes
    try:
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(str(short / "s"))
            (short / "s").rename(tmp_path / where)  # a bound socket keeps working when moved
            for command in ("run", "status"):
                assert_one_line(run_cli(tmp_path, command), 2, f"'{where}'", "socket")
    finally:
        shutil.rmtree(short)


def test_a_device_input_is_one_line(tmp_path: Path) -> None:
    write(tmp_path, "pipeline.toml", COPY)
    (tmp_path / "in.txt").symlink_to("/dev/zero")  # read whole, it would never end
    assert_one_line(run_cli(tmp_path, "run"), 2, "'in.txt'", "character device")


# --- 3. unreadable inputs ----------------------------------------------------------------------


@pytest.mark.parametrize("what", ["file", "directory", "file in a directory"])
def test_an_unreadable_input_is_one_line_saying_what_to_do(
    owned_by_nobody: Path, what: str
) -> None:
    root = owned_by_nobody
    if what == "file":
        write(root, "pipeline.toml", COPY)
        locked = write(root, "in.txt", "secret\n")
        mode, needles = 0o000, ("'in.txt'", "chmod u+r")
    else:
        write(root, "pipeline.toml", COPY_DIR)
        write(root, "data/0/a.txt", "a\n")
        locked = write(root, "data/1/b.txt", "b\n")
        if what == "directory":
            locked = locked.parent
            mode, needles = 0o000, ("'data/1'", "chmod u+rx")
        else:
            mode, needles = 0o000, ("'data/1/b.txt'", "chmod u+r")
    switch = as_nobody(root)
    locked.chmod(mode)
    for command in ("run", "status"):
        result = run_cli(root, command, as_nobody=switch)
        assert_one_line(result, 2, *needles, "permission denied")
        assert "has started" not in result.out
    locked.chmod(0o755 if locked.is_dir() else 0o644)
    assert run_cli(root, "run", as_nobody=switch).started() != []


# --- 4. the state database ---------------------------------------------------------------------


def many_rows(root: Path, n: int = 60) -> None:
    """A pipeline whose state has many rows in every table (stats, manifests, dirs, history)."""
    targets = "".join(
        f"""
        [targets.t{i:02d}]
        cmd = "cat {{inputs.src}} > {{outputs.out}}"
        inputs = {{ src = "src/{i:02d}.txt" }}
        outputs = {{ out = "out/{i:02d}.txt" }}
        """
        for i in range(n)
    )
    write(root, "pipeline.toml", targets)
    for i in range(n):
        write(root, f"src/{i:02d}.txt", f"source {i} " + "x" * 200 + "\n")


def corrupt_middle(db: Path) -> None:
    """Overwrite the pages in the middle of a valid database, leaving its header intact."""
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    assert pages >= 8, "too small a database to damage in the middle"
    data = bytearray(db.read_bytes())
    for n in range(2, pages - 1):
        start = n * page + page // 4
        data[start : start + page // 2] = b"\x5a" * (page // 2)
    db.write_bytes(bytes(data))
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


def test_a_corrupt_page_in_the_middle_starts_over_with_one_warning(tmp_path: Path) -> None:
    many_rows(tmp_path)
    assert run_cli(tmp_path, "run").code == 0
    db = tmp_path / ".mlbuild/state.db"
    corrupt_middle(db)
    status = run_cli(tmp_path, "status")
    assert "Traceback" not in status.err
    result = run_cli(tmp_path, "run", "--no-cache")
    assert result.code == 0, result
    assert "Traceback" not in result.err
    backups = sorted(p.name for p in db.parent.glob("state.db.bad-*") if "-wal" not in p.name)
    assert len(backups) >= 1
    warnings = [line for line in status.err.splitlines() + result.err.splitlines() if line]
    # One line for the database; the outputs it no longer vouches for are moved aside
    # (kept in .mlbuild/trash/, each named), never deleted.
    about_db = [line for line in warnings if "state.db" in line]
    assert len(about_db) == 1 and "was moved to state.db.bad-" in about_db[0], warnings
    assert all("moved it to .mlbuild/trash/" in line for line in warnings if line not in about_db)
    assert run_cli(tmp_path, "run").started() == []
    assert run_cli(tmp_path, "log").code == 0


@pytest.mark.parametrize("locked", ["state.db", ".mlbuild"])
def test_a_read_only_state_is_one_line(owned_by_nobody: Path, locked: str) -> None:
    root = owned_by_nobody
    write(root, "pipeline.toml", COPY)
    write(root, "in.txt", "x\n")
    switch = as_nobody(root)
    assert run_cli(root, "run", as_nobody=switch).code == 0
    write(root, "in.txt", "y\n")
    os.chown(root / "in.txt", NOBODY, NOBODY) if switch else None
    target = root / ".mlbuild" / ("state.db" if locked == "state.db" else "")
    target.chmod(0o555 if target.is_dir() else 0o444)
    try:
        result = run_cli(root, "run", as_nobody=switch)
        line = assert_one_line(result, 1, ".mlbuild")
        assert "writable" in line
        assert result.out == ""  # refused before any target was even checked
        status = run_cli(root, "status", as_nobody=switch)
        if locked == "state.db":  # reading needs no write: status still answers
            assert (status.code, status.err) == (1, "")
            assert status.out == "stale  copy: input changed: in.txt\n"
        else:
            assert_one_line(status, 1, ".mlbuild", "writable")
    finally:
        target.chmod(0o755 if target.is_dir() else 0o644)


@pytest.mark.parametrize("command", ["run", "status", "clean"])
def test_state_dir_that_is_a_file_is_one_line(tmp_path: Path, command: str) -> None:
    write(tmp_path, "pipeline.toml", COPY)
    write(tmp_path, "in.txt", "x\n")
    write(tmp_path, ".mlbuild", "not a folder\n")
    assert_one_line(run_cli(tmp_path, command), 1, ".mlbuild", "not a directory")
    assert (tmp_path / ".mlbuild").read_text() == "not a folder\n"


@pytest.mark.parametrize(
    "data", ["{not json", '{"version": 1}', "[1, 2]", '"text"', '{"version": 1, "action": 3}']
)
def test_a_damaged_manifest_row_makes_its_target_stale(tmp_path: Path, data: str) -> None:
    write(tmp_path, "pipeline.toml", COPY)
    write(tmp_path, "in.txt", "x\n")
    assert run_cli(tmp_path, "run").code == 0
    with sqlite3.connect(tmp_path / ".mlbuild/state.db") as conn:
        conn.execute("UPDATE manifests SET data = ? WHERE target = 'copy'", (data,))
    status = run_cli(tmp_path, "status")
    assert "Traceback" not in status.err
    assert status.code == 1 and "stale  copy" in status.out
    show = run_cli(tmp_path, "show", "copy", "--json")
    assert "Traceback" not in show.err
    result = run_cli(tmp_path, "run", "--no-cache")
    assert result.code == 0, result
    assert result.started() == ["copy"]
    assert run_cli(tmp_path, "run").started() == []


# --- 5. large output directories ---------------------------------------------------------------

PRODUCER_CONSUMER = """
    [targets.gen]
    cmd = "mkdir {outputs.o}; for i in $(seq 300); do cat {inputs.src} > {outputs.o}/f$i.txt; done"
    inputs = { src = "in.txt" }
    outputs = { o = "out" }

    [targets.count]
    cmd = "cat {inputs.dir}/f1*.txt > {outputs.n}"
    inputs = { dir = "out" }
    outputs = { n = "n.txt" }
"""


def test_a_directory_one_target_writes_and_the_next_reads_stays_right(tmp_path: Path) -> None:
    write(tmp_path, "pipeline.toml", PRODUCER_CONSUMER)
    write(tmp_path, "in.txt", "one\n")
    assert run_cli(tmp_path, "run").started() == ["gen", "count"]
    settle(*tmp_path.rglob("*.txt"))
    for _ in range(2):  # the first no-op re-hashes racy files, the second trusts the summary
        assert run_cli(tmp_path, "run").started() == []
    write(tmp_path, "in.txt", "two\n")
    result = run_cli(tmp_path, "run", "--no-cache")
    assert result.started() == ["gen", "count"]
    assert set((tmp_path / "n.txt").read_text().splitlines()) == {"two"}
    assert run_cli(tmp_path, "run").started() == []


def test_one_edit_inside_a_large_output_directory_is_found(tmp_path: Path) -> None:
    write(tmp_path, "pipeline.toml", PRODUCER_CONSUMER)
    write(tmp_path, "in.txt", "one\n")
    assert run_cli(tmp_path, "run").code == 0
    settle(*tmp_path.rglob("*.txt"))
    for _ in range(2):
        assert run_cli(tmp_path, "run").started() == []
    edited = tmp_path / "out/f123.txt"
    before = edited.stat()
    edited.write_text("ONE\n")
    os.utime(edited, ns=(before.st_atime_ns, before.st_mtime_ns))
    result = run_cli(tmp_path, "run", "--no-cache")
    assert result.code == 0, result
    assert result.started() == ["gen"]
    assert "output modified: out" in result.out
    assert edited.read_text() == "one\n"
