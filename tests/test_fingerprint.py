"""fingerprint.py: file and directory digests, the stat cache and its racy window, refusals.

Real files in tmp_path throughout. The stat cache is observed through what a
Fingerprinter learns (`take_updates`): an entry it trusted is not learned again.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from mlbuild.errors import FingerprintError
from mlbuild.fingerprint import (
    COARSE_WINDOW_NS,
    FINE_WINDOW_NS,
    MMAP_THRESHOLD,
    DirStat,
    Fingerprinter,
    LazyStats,
    StatCache,
    StatEntry,
    diff_listings,
    hash_file,
    is_trusted,
)

OLD_NS = 1_600_000_000_123_456_789  # a fine-grained timestamp from long ago


def blake(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def write(root: Path, rel: str, data: bytes, mtime_ns: int | None = OLD_NS) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def settled(*paths: Path) -> None:
    """Wait until the paths' ctimes are out of the racy window (utime itself sets the ctime)."""
    newest = max(p.stat().st_ctime_ns for p in paths)
    while time.time_ns() < newest + FINE_WINDOW_NS + 10_000_000:
        time.sleep(0.02)


def persisted(fp: Fingerprinter) -> StatCache:
    """What a store would hand the next run: the file entries and directory records learned."""
    updates = fp.take_updates()
    files = {p: e for p, e in updates.items() if isinstance(e, StatEntry)}
    dirs = {p: e for p, e in updates.items() if isinstance(e, DirStat)}
    return StatCache(files, dirs.get)


@pytest.fixture
def alarm() -> Iterator[None]:
    """Fail instead of hanging if a FIFO is ever opened for reading."""

    def hung(signum: int, frame: object) -> None:
        raise AssertionError("fingerprinting blocked")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# --- hashing -----------------------------------------------------------------------------------


def test_hash_file_is_blake3_of_the_bytes(tmp_path: Path) -> None:
    small = write(tmp_path, "small", b"hello\n")
    large = write(tmp_path, "large", os.urandom(1024) * (MMAP_THRESHOLD // 1024 + 3))
    assert hash_file(small, 6) == blake(b"hello\n")
    assert hash_file(large, large.stat().st_size) == blake(large.read_bytes())
    assert hash_file(write(tmp_path, "empty", b""), 0) == blake(b"")


def test_file_digest_follows_content_not_name(tmp_path: Path) -> None:
    write(tmp_path, "a.txt", b"same")
    write(tmp_path, "b.txt", b"same")
    write(tmp_path, "c.txt", b"other")
    fp = Fingerprinter(tmp_path, {})
    assert fp.digest("a.txt") == fp.digest("b.txt") != fp.digest("c.txt")
    assert fp.digest("a.txt").kind == "file"
    assert fp.digest("nope.txt").kind == "missing"
    assert fp.digest("a.txt/under").kind == "missing"  # a file where a folder is expected


def test_symlinks_dangling_hash_their_target_text_and_others_read_through(tmp_path: Path) -> None:
    write(tmp_path, "data/x.txt", b"x")
    (tmp_path / "to_file").symlink_to("data/x.txt")
    (tmp_path / "to_dir").symlink_to("data")
    (tmp_path / "dangling").symlink_to("nowhere")
    fp = Fingerprinter(tmp_path, {})
    assert fp.digest("to_file") == fp.digest("data/x.txt")
    assert fp.digest("to_dir").digest == fp.digest("data").digest
    assert fp.digest("dangling") == ("link", blake(b"link:nowhere"), ())


# --- directories -------------------------------------------------------------------------------


def test_directory_digest_is_a_merkle_hash_of_its_listing(tmp_path: Path) -> None:
    write(tmp_path, "d/a.txt", b"a")
    write(tmp_path, "d/sub/b.txt", b"b")
    (tmp_path / "d/link").symlink_to("a.txt")
    digest = Fingerprinter(tmp_path, {}).digest("d")
    assert digest.kind == "dir"
    assert digest.listing == (
        ("a.txt", "file:" + blake(b"a")),
        ("link", "link:" + blake(b"a.txt")),
        ("sub", "dir:"),
        ("sub/b.txt", "file:" + blake(b"b")),
    )
    text = "".join(f"{value} {name}\n" for name, value in digest.listing)
    assert digest.digest == blake(text.encode())


@pytest.mark.parametrize("change", ["add", "remove", "modify", "rename", "empty dir"])
def test_any_change_below_a_directory_changes_its_digest(tmp_path: Path, change: str) -> None:
    write(tmp_path, "d/a.txt", b"a")
    write(tmp_path, "d/deep/er/b.txt", b"b")
    before = Fingerprinter(tmp_path, {}).digest("d")
    if change == "add":
        write(tmp_path, "d/deep/c.txt", b"c")
    elif change == "remove":
        (tmp_path / "d/deep/er/b.txt").unlink()
    elif change == "modify":
        write(tmp_path, "d/deep/er/b.txt", b"B")
    elif change == "rename":
        (tmp_path / "d/a.txt").rename(tmp_path / "d/A.txt")
    else:
        (tmp_path / "d/new").mkdir()
    after = Fingerprinter(tmp_path, {}).digest("d")
    assert after.digest != before.digest
    added, removed, modified = diff_listings(before.listing, after.listing)
    assert added or removed or modified


# --- the stat cache ----------------------------------------------------------------------------


def test_a_trusted_entry_is_reused_without_hashing(tmp_path: Path) -> None:
    path = write(tmp_path, "in.txt", b"data")
    settled(path)
    first = Fingerprinter(tmp_path, {})
    digest = first.digest("in.txt")
    (entry,) = first.updates.values()
    assert isinstance(entry, StatEntry) and entry.ctime_ns == path.stat().st_ctime_ns
    second = Fingerprinter(tmp_path, persisted(first))
    assert second.digest("in.txt") == digest
    assert second.updates == {}  # nothing learned: the entry was trusted


def test_an_entry_without_a_ctime_is_hashed_again(tmp_path: Path) -> None:
    path = write(tmp_path, "in.txt", b"data")
    settled(path)
    st = path.stat()
    old = StatEntry(st.st_size, st.st_mtime_ns, st.st_ino, time.time_ns(), blake(b"stale"))
    fp = Fingerprinter(tmp_path, {"in.txt": old})
    assert fp.digest("in.txt").digest == blake(b"data")


def test_edit_with_mtime_put_back_is_seen_through_the_ctime(tmp_path: Path) -> None:
    path = write(tmp_path, "in.txt", b"aaaa")
    settled(path)
    first = Fingerprinter(tmp_path, {})
    first.digest("in.txt")
    cache = persisted(first)
    before = path.stat()
    path.write_bytes(b"bbbb")  # same size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # as rsync -t, cp -p do
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )
    assert Fingerprinter(tmp_path, cache).digest("in.txt").digest == blake(b"bbbb")


def test_racy_window_an_entry_hashed_within_the_granularity_is_not_trusted(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, "in.txt", b"aaaa", mtime_ns=None)
    st = path.stat()
    stamp = max(st.st_mtime_ns, st.st_ctime_ns)
    racy = StatEntry(st.st_size, st.st_mtime_ns, st.st_ino, stamp + 1, "0" * 64, st.st_ctime_ns)
    later = stamp + FINE_WINDOW_NS + 1
    safe = StatEntry(st.st_size, st.st_mtime_ns, st.st_ino, later, "0" * 64, st.st_ctime_ns)
    assert not racy.matches(st)
    assert safe.matches(st)
    # The racy entry's digest is never used: the bytes are hashed again.
    assert Fingerprinter(tmp_path, {"in.txt": racy}).digest("in.txt").digest == blake(b"aaaa")
    assert Fingerprinter(tmp_path, {"in.txt": safe}).digest("in.txt").digest == "0" * 64


def test_racy_window_covers_both_timestamps_and_whole_second_filesystems() -> None:
    second = 1_700_000_000_000_000_000
    assert not is_trusted(second - 10**10, second, second + FINE_WINDOW_NS)  # ctime is recent
    assert not is_trusted(second, second - 10**10, second + FINE_WINDOW_NS)  # mtime is recent
    assert is_trusted(second + 1, second + 1, second + FINE_WINDOW_NS + 2)
    # A zero sub-second part suggests a coarse filesystem: the window is two seconds.
    assert not is_trusted(second, second, second + COARSE_WINDOW_NS)
    assert is_trusted(second, second, second + COARSE_WINDOW_NS + 1)


def test_a_directory_is_one_record_reused_whole_when_nothing_changed(tmp_path: Path) -> None:
    paths = [write(tmp_path, f"d/{i % 3}/f{i}.txt", b"x%d" % i) for i in range(40)]
    settled(*paths)
    first = Fingerprinter(tmp_path, {})
    digest = first.digest("d")
    cache = persisted(first)
    assert cache.files == {}  # no per-file rows for files inside a directory
    record = cache.load_dir("d")
    assert record is not None and record.summary and len(record.files) == 40
    second = Fingerprinter(tmp_path, cache)
    assert second.digest("d") == digest
    assert second.updates == {}


def test_one_edit_in_a_large_directory_is_found_and_only_that_file_hashed(tmp_path: Path) -> None:
    paths = [write(tmp_path, f"d/{i % 10}/f{i}.txt", b"%05d" % i) for i in range(500)]
    settled(*paths)
    first = Fingerprinter(tmp_path, {})
    before = first.digest("d")
    cache = persisted(first)
    old = cache.load_dir("d")
    assert old is not None
    edited = paths[123]
    st = edited.stat()
    edited.write_bytes(b"XXXXX")
    os.utime(edited, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = Fingerprinter(tmp_path, cache)
    after = second.digest("d")
    assert after.digest != before.digest
    _, _, modified = diff_listings(before.listing, after.listing)
    assert modified == ["3/f123.txt"]
    (record,) = second.take_updates().values()
    assert isinstance(record, DirStat)
    rehashed = [n for n, e in record.files.items() if e != old.files[n]]
    assert rehashed == ["3/f123.txt"]
    assert record.summary == ""  # just hashed, so racy: the summary waits for the next run


def test_a_racy_directory_record_is_not_trusted_by_its_summary(tmp_path: Path) -> None:
    write(tmp_path, "d/a.txt", b"fresh", mtime_ns=None)  # written just now
    first = Fingerprinter(tmp_path, {})
    first.digest("d")
    record = persisted(first).load_dir("d")
    assert record is not None
    assert record.summary == ""  # so the next run compares per file (and re-hashes a.txt)


def test_reuse_walks_keeps_a_directory_digest_until_expired(tmp_path: Path) -> None:
    write(tmp_path, "d/a.txt", b"a")
    fp = Fingerprinter(tmp_path, {}, reuse_walks=True)
    first = fp.digest("d")
    write(tmp_path, "d/a.txt", b"b")
    assert fp.digest("d") == first  # the contract: the caller expires when files may change
    fp.expire()
    second = fp.digest("d")
    assert second != first
    fp.remember("d/a.txt", StatEntry(1, 1, 1, 1, "0" * 64))  # a restore also expires
    write(tmp_path, "d/c.txt", b"c")
    assert fp.digest("d") != second
    plain = Fingerprinter(tmp_path, {})  # without reuse_walks every digest walks again
    before = plain.digest("d")
    write(tmp_path, "d/a.txt", b"z")
    assert plain.digest("d") != before


# --- what cannot be fingerprinted --------------------------------------------------------------


@pytest.mark.usefixtures("alarm")
@pytest.mark.parametrize("where", ["in", "dir/sub/in"])
def test_a_fifo_is_refused_without_being_opened(tmp_path: Path, where: str) -> None:
    (tmp_path / where).parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(tmp_path / where)
    fp = Fingerprinter(tmp_path, {})
    with pytest.raises(FingerprintError, match=f"'{where}': it is a FIFO"):
        fp.digest(where.split("/")[0])


@pytest.mark.usefixtures("alarm")
def test_a_symlink_to_a_fifo_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "link").symlink_to("pipe")
    with pytest.raises(FingerprintError, match="'link': it is a FIFO"):
        Fingerprinter(tmp_path, {}).digest("link")


@pytest.mark.usefixtures("alarm")
def test_hash_file_refuses_a_fifo_even_when_told_it_is_a_file(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(FingerprintError, match="FIFO"):
        hash_file(tmp_path / "pipe", 0)


def test_a_socket_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a relative name keeps the socket path short
    (tmp_path / "d").mkdir()
    with socket.socket(socket.AF_UNIX) as server:
        server.bind("d/sock")
        fp = Fingerprinter(tmp_path, {})
        with pytest.raises(FingerprintError, match="'d/sock': it is a socket"):
            fp.digest("d/sock")
        with pytest.raises(FingerprintError, match="'d/sock': it is a socket"):
            fp.digest("d")


def test_a_character_device_is_refused(tmp_path: Path) -> None:
    (tmp_path / "null").symlink_to("/dev/null")
    with pytest.raises(FingerprintError, match="'null': it is a character device"):
        Fingerprinter(tmp_path, {}).digest("null")


def test_lazy_stats_read_few_rows_one_by_one_then_all_at_once() -> None:
    """A build digesting one file of 10,000 reads its row only (store.lazy_stats)."""
    rows = {f"f{i}": StatEntry(i, i, i, i, f"d{i}", i) for i in range(200)}
    asked: list[str] = []
    bulk: list[int] = []

    def one(path: str) -> StatEntry | None:
        asked.append(path)
        return rows.get(path)

    def every() -> dict[str, StatEntry]:
        bulk.append(1)
        return rows

    stats = LazyStats(one, every)
    assert stats.get("f3") == rows["f3"] and stats.get("f3") == rows["f3"]
    assert stats.get("nothing") is None
    assert asked == ["f3", "nothing"] and bulk == []
    learned = StatEntry(1, 1, 1, 1, "new", 1)
    stats["f7"] = learned  # learned in this run: kept over the row read later
    for i in range(LazyStats.BULK_AFTER - 2):  # with f3 and nothing: BULK_AFTER rows
        stats.get(f"f{100 + i}")
    assert bulk == [] and stats.get("f199") == rows["f199"] and bulk == [1]
    assert stats.get("f7") == learned and stats.get("f150") == rows["f150"]
    assert stats.get("absent") is None and bulk == [1]
