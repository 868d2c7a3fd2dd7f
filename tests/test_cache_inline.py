"""Small outputs held in their cache entry: one file per save, restored exact, never trusted.

What a user sees, and what is on disk: a trivial target's save writes its
entry and no object (no `objects/` folder at all), a restore from the entry
gives the bytes and the mode back, a file above INLINE_MAX is still an
object, an entry whose inline bytes were changed is refused, deleted and the
step runs, a remote serves inline files with the record (no blob), gc counts
inline bytes, `cache verify` reads entries, and entries of version 2 (no
`inline`, every file an object) still restore after an upgrade.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest

from mlbuild.cache import INLINE_MAX, INLINE_TOTAL_MAX, Uncacheable
from mlbuild.cache.local import read_small
from mlbuild.fingerprint import hash_bytes
from tests.conftest import Project
from tests.entry_rows import EntryRow, rows

# `small` writes bytes no text step would (NUL, 0xff) with an unusual mode; `big` is one
# byte over INLINE_MAX; `tree` holds a small executable file, one of exactly INLINE_MAX
# bytes, an empty one and a big one.
PIPELINE = r"""
[params]
v = 1

[cache]
{cache}

[targets.small]
cmd = '''echo small >> ran.log; printf 'v%s\000\377\n' {{params.v}} > {{outputs.s}}
chmod 640 {{outputs.s}}'''
outputs = {{ s = "out/s.bin" }}
params = ["v"]

[targets.big]
cmd = '''echo big >> ran.log; head -c {over} /dev/zero > {{outputs.b}}
echo {{params.v}} >> {{outputs.b}}'''
outputs = {{ b = "out/b.bin" }}
params = ["v"]

[targets.tree]
cmd = '''echo tree >> ran.log; mkdir -p {{outputs.d}}/sub
printf '#!/bin/sh\necho %s\n' {{params.v}} > {{outputs.d}}/sub/run.sh
chmod 755 {{outputs.d}}/sub/run.sh; seq 1 3000 > {{outputs.d}}/big.txt
head -c {edge} /dev/zero > {{outputs.d}}/edge; echo {{params.v}} >> {{outputs.d}}/edge
: > {{outputs.d}}/empty'''
outputs = {{ d = "out/d" }}
params = ["v"]
"""


def make(project: Project, cache: str = "") -> Project:
    project.pipeline(PIPELINE.format(cache=cache, over=INLINE_MAX - 1, edge=INLINE_MAX - 2))
    return project


def ran(project: Project) -> list[str]:
    log = project.root / "ran.log"
    return log.read_text().split() if log.exists() else []


def entries(root: Path) -> dict[str, tuple[EntryRow, dict[str, Any]]]:
    """target -> (entry row, its JSON), of the local cache under project `root`."""
    return {data["target"]: (row, data) for row, data in rows(root)}


def entries_of(root: Path, target: str) -> list[tuple[EntryRow, dict[str, Any]]]:
    return [(row, data) for row, data in rows(root) if data["target"] == target]


def objects(root: Path) -> list[Path]:
    folder = root / ".mlbuild/cache/objects"
    return [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".tmp")]


def outputs(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under out/ with its bytes and permission bits."""
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mode & 0o7777)
        for p in sorted((root / "out").rglob("*"))
        if p.is_file()
    }


def test_a_small_output_is_saved_in_its_entry_and_restored_exact(project: Project) -> None:
    make(project)
    assert project.run("run", "small").code == 0
    # No file for the save: the entry is a row. No object, not even the objects/ folder.
    assert not (project.root / ".mlbuild/cache/objects").exists()
    built = outputs(project.root)
    assert built == {"out/s.bin": (b"v1\0\xff\n", 0o640)}
    (_, entry) = entries(project.root)["small"]
    assert entry["version"] == 3
    assert entry["inline"] == {hash_bytes(b"v1\0\xff\n"): base64.b64encode(b"v1\0\xff\n").decode()}
    assert entry["size"] == 5

    assert project.run("run", "small", "--set", "v=2").code == 0
    old = os.umask(0o077)  # a strict umask must not change the mode that comes back
    try:
        result = project.run("run", "small")
    finally:
        os.umask(old)
    assert result.code == 0, result.err
    assert "Step `small` restored from cache" in result.out
    assert outputs(project.root) == built
    assert ran(project) == ["small", "small"]
    assert project.run("run", "small").started() == []


def test_a_file_over_the_limit_is_still_an_object(project: Project) -> None:
    make(project)
    assert project.run("run", "big", "tree").code == 0
    (_, big) = entries(project.root)["big"]
    assert big["inline"] == {}
    (_, tree) = entries(project.root)["tree"]
    files = {c: v[5:] for c, v, _, _ in tree["outputs"]["out/d"]["tree"] if v != "dir:"}
    assert set(tree["inline"]) == {files["sub/run.sh"], files["edge"], files["empty"]}
    held = sorted(p.parent.name + p.name for p in objects(project.root))
    big_file = project.root / "out/b.bin"
    assert big_file.stat().st_size == INLINE_MAX + 1
    assert (project.root / "out/d/edge").stat().st_size == INLINE_MAX
    expected = [
        hash_bytes(big_file.read_bytes()),
        hash_bytes((project.root / "out/d/big.txt").read_bytes()),
    ]
    assert held == sorted(expected)

    built = outputs(project.root)
    assert project.run("run", "big", "tree", "--set", "v=2").code == 0
    result = project.run("run", "big", "tree")
    assert result.code == 0, result.err
    assert "Step `big` restored from cache" in result.out
    assert "Step `tree` restored from cache" in result.out
    assert outputs(project.root) == built
    assert built["out/d/sub/run.sh"][1] == 0o755


def test_an_entry_holds_at_most_its_inline_total(project: Project) -> None:
    count = INLINE_TOTAL_MAX // 4000 + 4  # 20 files of 4,000 bytes: 16 fit
    project.pipeline(
        f"""
        [params]
        v = 1

        [targets.many]
        cmd = '''mkdir -p {{outputs.d}}; for i in $(seq {count}); do
        head -c 3990 /dev/zero > {{outputs.d}}/$i; printf '%09d\\n' $i >> {{outputs.d}}/$i; done
        echo {{params.v}} > {{outputs.d}}/v'''
        outputs = {{ d = "out/d" }}
        params = ["v"]
        """
    )
    assert project.run().code == 0
    (_, entry) = entries(project.root)["many"]
    sizes = sorted(len(base64.b64decode(text)) for text in entry["inline"].values())
    assert sum(sizes) <= INLINE_TOTAL_MAX
    assert sizes == [2] + [4000] * 16  # the smallest first: `v`, then what fits
    assert len(objects(project.root)) == count - 16
    built = outputs(project.root)
    project.run("run", "--set", "v=2")
    result = project.run()
    assert "Step `many` restored from cache" in result.out
    assert outputs(project.root) == built


def tamper(entry: dict[str, Any]) -> None:
    """Change the bytes of every inline file (same length), keeping its digest."""
    for digest, text in entry["inline"].items():
        data = bytearray(base64.b64decode(text))
        data[0] ^= 0x01
        entry["inline"][digest] = base64.b64encode(bytes(data)).decode()


def test_a_tampered_inline_entry_is_refused_deleted_and_the_step_runs(project: Project) -> None:
    make(project)
    project.run("run", "small")
    (path, entry) = entries(project.root)["small"]
    tamper(entry)
    path.write_text(json.dumps(entry))
    (project.root / "out/s.bin").unlink()  # so that the run looks in the cache
    result = project.run("run", "small")
    assert result.code == 0
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert "cache entry of `small` not used: inline file " in lines[0]
    assert "does not match its digest; running it" in lines[0]
    assert "Step `small` has started" in result.out
    assert (project.root / "out/s.bin").read_bytes() == b"v1\0\xff\n"  # not the forged bytes
    # The bad entry was deleted; the rerun's save put a good one under the same key.
    again = json.loads(path.read_bytes())
    assert [base64.b64decode(t) for t in again["inline"].values()] == [b"v1\0\xff\n"]


def test_cache_verify_reads_entries_and_removes_a_tampered_one(project: Project) -> None:
    make(project)
    project.run("run", "small", "big")
    clean = project.run("cache", "verify")
    assert clean.code == 0
    assert "mlbuild cache verify: 1 object and 2 entries checked, 0 corrupted." in clean.out
    (path, entry) = entries(project.root)["small"]
    tamper(entry)
    path.write_text(json.dumps(entry))
    result = project.run("cache", "verify")
    assert result.code == 1
    key = path.key
    assert f"invalid entry {key} removed: inline file " in result.out
    assert "1 object and 2 entries checked, 1 corrupted." in result.out
    assert not path.exists()
    assert "small" not in entries(project.root)


def test_cache_verify_does_not_claim_to_remove_an_entry_it_left(project: Project) -> None:
    """A directory at an entry's name cannot be read, nor removed by an unlink: verify
    says so rather than "removed" (and says it again next time)."""
    make(project)
    project.run("run", "small")
    planted = project.root / ".mlbuild/cache/runs/ab" / ("c" * 62 + ".json")
    planted.mkdir(parents=True)
    for _ in range(2):
        result = project.run("cache", "verify")
        assert result.code == 1
        key = "ab" + "c" * 62
        assert f"invalid entry {key} removed" not in result.out
        assert f"invalid entry {key} could not be removed (remove it by hand): " in result.out
        assert "Is a directory" in result.out
        assert "2 entries checked, 1 corrupted." in result.out
    assert planted.is_dir()


def test_a_remote_serves_inline_files_with_the_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "remote"
    cache = f'remote = "file://{folder}"'
    first = make(Project(tmp_path / "a", capsys), cache)
    assert first.run("run", "small").code == 0
    (record,) = [json.loads(p.read_bytes()) for p in (folder / "ac").iterdir()]
    assert record["blobs"] == {}
    assert [base64.b64decode(t) for t in record["inline"].values()] == [b"v1\0\xff\n"]
    assert not (folder / "cas").exists()  # no blob at all

    second = make(Project(tmp_path / "b", capsys), cache)
    result = second.run("run", "small")
    assert result.code == 0, result.err
    assert "Step `small` restored from remote cache" in result.out
    assert outputs(second.root) == outputs(first.root)
    assert not (second.root / ".mlbuild/cache/objects").exists()
    (_, local) = entries(second.root)["small"]
    assert local["inline"] == record["inline"]

    # A record whose inline bytes were changed (digest kept) is refused whole.
    third = make(Project(tmp_path / "c", capsys), cache)
    (path,) = list((folder / "ac").iterdir())
    tamper(record)
    path.write_text(json.dumps(record))
    forged = third.run("run", "small")
    assert forged.code == 0
    assert "remote cache entry of `small` not used: its record is unusable: inline file" in (
        forged.err
    )
    assert "Step `small` has started" in forged.out
    assert (third.root / "out/s.bin").read_bytes() == b"v1\0\xff\n"


def test_gc_counts_inline_bytes_and_keeps_and_drops_entries(project: Project) -> None:
    project.pipeline(
        """
        [params]
        v = 1

        [targets.t]
        cmd = '''echo t >> ran.log; head -c 995 /dev/zero > {outputs.o}
        printf '%04d\\n' {params.v} >> {outputs.o}'''
        outputs = { o = "o.bin" }
        params = ["v"]
        """
    )
    for v in (1, 2, 3):
        assert project.run("run", "--set", f"v={v}").code == 0
    plain = project.run("gc")
    assert "removed 0 entries and 0 objects, freed 0 B; kept 3 entries (3.0 kB)." in plain.out
    # The current entry (v=3) and the newest other (v=2) fit in 2.5 kB; v=1 does not.
    trimmed = project.run("gc", "--max-size", "2500B")
    assert "removed 1 entry and 0 objects, freed 1.0 kB; kept 2 entries (2.0 kB)." in trimmed.out
    assert len(entries_of(project.root, "t")) == 2
    assert "restored from cache" in project.run("run", "--set", "v=2").out
    assert project.run("run", "--set", "v=1").started() == ["t"]
    assert ran(project) == ["t", "t", "t", "t"]


def test_entries_of_version_2_are_still_restored(project: Project) -> None:
    """As an older mlbuild wrote them: no `inline`, every file an object."""
    make(project)
    project.run("run", "small", "tree")
    built = outputs(project.root)
    cache = project.root / ".mlbuild/cache"
    for path, entry in entries(project.root).values():
        for digest, text in entry.pop("inline").items():
            obj = cache / "objects" / digest[:2] / digest[2:]
            obj.parent.mkdir(parents=True, exist_ok=True)
            obj.write_bytes(base64.b64decode(text))
        entry["version"] = 2
        path.write_text(json.dumps(entry))
    project.run("run", "small", "tree", "--set", "v=2")
    result = project.run("run", "small", "tree")
    assert result.code == 0
    assert result.err == ""
    assert "Step `small` restored from cache" in result.out
    assert "Step `tree` restored from cache" in result.out
    assert outputs(project.root) == built


def test_a_file_changed_since_it_was_fingerprinted_is_not_inlined(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"before")
    files = {hash_bytes(b"before"): (str(path), 6)}
    assert read_small(files) == {hash_bytes(b"before"): b"before"}
    path.write_bytes(b"after!")
    with pytest.raises(Uncacheable, match="changed since it was fingerprinted"):
        read_small(files)
