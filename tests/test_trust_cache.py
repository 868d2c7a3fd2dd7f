"""Restores that leave nothing behind, keep modes and long names, and trust no record.

What a user sees: a killed restore leaves the project as it was (its staging
lives in `.mlbuild/staging/`, cleared at the next start), restored trees have
the modes the step gave them, 255-byte names restore, a record that is
malformed or hostile is refused whole with one warning and the target runs,
and a restore expected to be slower than the step is skipped for a rerun.
Remotes here are plain directories (the fast way to forge records).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import mlbuild.cache.restore
from mlbuild.cache import ENTRY_VERSION
from mlbuild.fingerprint import hash_bytes
from tests.conftest import Project
from tests.entry_rows import EntryRow, rows

TREE = """
[params]
v = 1

[cache]
{cache}

[targets.tree]
cmd = '''echo tree >> ran.log; mkdir -p {{outputs.d}}/sub {{outputs.d}}/priv
echo {{params.v}} > {{outputs.d}}/sub/f.txt; printf 'x' > {{outputs.d}}/run.sh
echo ro > {{outputs.d}}/ro.txt; echo secret > {{outputs.d}}/priv/key
chmod 755 {{outputs.d}} {{outputs.d}}/run.sh; chmod 775 {{outputs.d}}/sub
chmod 750 {{outputs.d}}/priv; chmod 444 {{outputs.d}}/ro.txt; chmod 600 {{outputs.d}}/priv/key
ln -s sub/f.txt {{outputs.d}}/link; echo {{params.v}} > {{outputs.f}}; chmod 640 {{outputs.f}}'''
outputs = {{ d = "build/d", f = "build/f.txt" }}
params = ["v"]

[targets.count]
cmd = "echo count >> ran.log; find {{inputs.b}} | sort > {{outputs.n}}"
inputs = {{ b = "build" }}
outputs = {{ n = "out/n.txt" }}
"""


def ran(project: Project) -> list[str]:
    log = project.root / "ran.log"
    return log.read_text().split() if log.exists() else []


def modes(root: Path) -> dict[str, Any]:
    """Mode of every path under `root` (root included), and each symlink's target."""
    found: dict[str, Any] = {".": oct(root.stat().st_mode)}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        st = path.lstat()
        found[rel] = os.readlink(path) if path.is_symlink() else oct(st.st_mode)
    return found


def entry_files(project: Project) -> list[EntryRow]:
    """The entries of the local cache (rows, read and rewritten as entry files were)."""
    return [row for row, _ in rows(project.root)]


def edit_entries(
    project: Project, change: Callable[[dict[str, Any]], None], target: str | None = None
) -> None:
    """Apply `change` to the entries of the local cache (of `target`, or all), on disk."""
    for path in entry_files(project):
        data = json.loads(path.read_bytes())
        if target is None or data["target"] == target:
            change(data)
            path.write_text(json.dumps(data))


def set_duration(seconds: float) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        data["duration"] = seconds

    return change


def one_warning(err: str, *parts: str) -> str:
    """The only warning line of `err`, checked to contain `parts`."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for part in parts:
        assert part in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def tree(project: Project) -> Project:
    project.pipeline(TREE.format(cache=""))
    return project


# -- 2. modes, 3. long names, and old entries -----------------------------------------


def test_restored_tree_has_the_modes_the_step_gave_it(tree: Project) -> None:
    assert tree.run().code == 0
    built = modes(tree.root / "build")
    edit_entries(tree, set_duration(1e6))  # restoring is always worth it here
    tree.run("run", "--set", "v=2")
    old = os.umask(0o077)  # a strict umask must not change what comes back
    try:
        result = tree.run()
    finally:
        os.umask(old)
    assert "Step `tree` restored from cache" in result.out, result.out + result.err
    assert modes(tree.root / "build") == built
    assert built["d"] == oct(0o40755)
    assert built["d/priv"] == oct(0o40750)
    assert built["d/ro.txt"] == oct(0o100444)
    assert built["f.txt"] == oct(0o100640)
    assert tree.run().started() == []


def test_entries_of_the_old_format_are_a_quiet_miss(tree: Project) -> None:
    tree.run()

    def version_one(data: dict[str, Any]) -> None:
        data["version"] = 1  # which had no directory modes
        data["duration"] = 1e6
        for out in data["outputs"].values():
            if "tree" in out:
                out.pop("mode", None)

    edit_entries(tree, version_one)
    tree.run("run", "--set", "v=2")
    result = tree.run()
    assert result.code == 0
    assert result.err == ""
    assert result.started() == ["tree", "count"]
    versions = {json.loads(p.read_bytes())["version"] for p in entry_files(tree)}
    assert versions == {ENTRY_VERSION}


def test_255_byte_names_are_restored(project: Project) -> None:
    name = "n" * 255
    project.pipeline(
        f"""
        [params]
        v = 1

        [targets.long]
        cmd = '''mkdir -p {{outputs.d}} && echo {{params.v}} > {{outputs.d}}/{name}
        echo {{params.v}} > {{outputs.f}}'''
        outputs = {{ d = "build/{name}", f = "out/{name}" }}
        params = ["v"]
        """
    )
    assert project.run().code == 0
    edit_entries(project, set_duration(1e6))
    project.run("run", "--set", "v=2")
    result = project.run()
    assert result.err == ""
    assert "Step `long` restored from cache" in result.out
    assert (project.root / "out" / name).read_text() == "1\n"
    assert (project.root / "build" / name / name).read_text() == "1\n"


# -- 5. a restore slower than the step runs it, and sparse files -----------------------


def test_restore_expected_slower_than_the_step_runs_it(
    tree: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mlbuild.cache.restore, "RESTORE_SECONDS_PER_FILE", 1.0)  # 5 s
    tree.pipeline(TREE.format(cache=f'remote = "{tree.root / "remote"}"'))  # for pull
    tree.run()
    edit_entries(tree, set_duration(0.0), "tree")
    tree.run("run", "--set", "v=2")
    result = tree.run()
    one_warning(
        result.err,
        "`tree` runs instead of being restored: restoring 5 files",
        "its step took 0.00 s",
    )
    assert "Step `tree` has started" in result.out
    assert ran(tree)[-1] == "tree"
    assert "Step `count` restored from cache" in result.out  # tree came out as before
    # `mlbuild pull` restores whatever it costs: it never runs a step.
    edit_entries(tree, set_duration(0.0), "tree")
    tree.run("run", "--set", "v=2")
    pulled = tree.run("pull")
    assert pulled.code == 0, pulled.err
    assert "Step `tree` restored from cache" in pulled.out
    assert (tree.root / "build/f.txt").read_text() == "1\n"


def sparse_supported(folder: Path) -> bool:
    probe = folder / "probe"
    with open(probe, "wb") as handle:
        handle.truncate(16 << 20)
    try:
        return probe.stat().st_blocks * 512 < (1 << 20)
    finally:
        probe.unlink()


SPARSE = """
import os, sys
with open(sys.argv[1], "wb") as f:
    f.truncate(64 << 20)
    f.seek(32 << 20)
    f.write(os.urandom(1 << 20))
"""


def test_sparse_files_stay_sparse_in_the_cache_and_when_restored(project: Project) -> None:
    if not sparse_supported(project.root):
        pytest.skip("this filesystem keeps no holes")
    project.write("make.py", SPARSE)
    project.pipeline(
        f"""
        [params]
        v = 1

        [targets.sparse]
        cmd = "{sys.executable} make.py {{outputs.f}}; echo {{params.v}} > {{outputs.v}}"
        outputs = {{ f = "big.bin", v = "v.txt" }}
        params = ["v"]
        """
    )
    assert project.run().code == 0
    built = (project.root / "big.bin").read_bytes()
    objects = [p for p in (project.root / ".mlbuild/cache/objects").rglob("*") if p.is_file()]
    assert max(p.stat().st_size for p in objects) == 64 << 20
    assert max(p.stat().st_blocks * 512 for p in objects) < 4 << 20
    edit_entries(project, set_duration(1e6))
    project.run("run", "--set", "v=2")
    result = project.run()
    assert "Step `sparse` restored from cache" in result.out, result.err
    restored = project.root / "big.bin"
    assert restored.stat().st_blocks * 512 < 4 << 20
    assert restored.read_bytes() == built


def test_corrupted_large_object_is_detected(project: Project) -> None:
    project.pipeline(
        """
        [params]
        v = 1

        [targets.big]
        cmd = "head -c 9000000 /dev/urandom > {outputs.f}; echo {params.v} > {outputs.v}"
        outputs = { f = "big.bin", v = "v.txt" }
        params = ["v"]
        """
    )
    project.run()
    edit_entries(project, set_duration(1e6))
    objects = [p for p in (project.root / ".mlbuild/cache/objects").rglob("*") if p.is_file()]
    victim = max(objects, key=lambda p: p.stat().st_size)  # v=1's big.bin
    project.run("run", "--set", "v=2")
    victim.chmod(0o644)
    with open(victim, "r+b") as handle:
        handle.seek(8_000_000)
        handle.write(b"bit rot")
    result = project.run()
    assert result.code == 0
    one_warning(result.err, "cache entry of `big` not used: object", "is corrupted (its bytes")
    assert "Step `big` has started" in result.out
    assert not victim.exists()


# -- 4. hostile entries and records ------------------------------------------------------


def test_invalid_local_entry_is_dropped_with_a_warning(tree: Project) -> None:
    tree.run()

    def yesterday(data: dict[str, Any]) -> None:
        data["created"] = "yesterday"

    edit_entries(tree, yesterday)
    tree.run("run", "--set", "v=2")
    result = tree.run()
    assert result.code == 0
    assert "Traceback" not in result.err
    assert "cache entry of `tree` not used: created 'yesterday' is not a number" in result.err
    assert "Step `tree` has started" in result.out
    created = {type(json.loads(p.read_bytes())["created"]) for p in entry_files(tree)}
    assert created == {float}


def reseal(record: dict[str, Any]) -> None:
    """Recompute each directory output's digest from its tree, as a forger would."""
    for out in record["outputs"].values():
        if "tree" in out:
            text = "".join(f"{value} {child}\n" for child, value, _, _ in out["tree"])
            out["fingerprint"] = "dir:" + hash_bytes(text.encode("utf-8", "surrogateescape"))


def link(child: str, target: str) -> list[Any]:
    return [child, "link:" + hash_bytes(os.fsencode(target)), 0, target]


def add_items(*items: list[Any]) -> Callable[[dict[str, Any]], None]:
    def change(record: dict[str, Any]) -> None:
        tree = record["outputs"]["build/d"]["tree"]
        tree.extend(items)
        tree.sort(key=lambda item: item[0])

    return change


def set_field(name: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(record: dict[str, Any]) -> None:
        record[name] = value

    return change


def file_mode(mode: int) -> Callable[[dict[str, Any]], None]:
    def change(record: dict[str, Any]) -> None:
        record["outputs"]["build/f.txt"]["mode"] = mode

    return change


def tree_mode(child: str, mode: int) -> Callable[[dict[str, Any]], None]:
    def change(record: dict[str, Any]) -> None:
        for item in record["outputs"]["build/d"]["tree"]:
            if item[0] == child:
                item[2] = mode

    return change


def inline_bytes(change: Callable[[bytes], bytes]) -> Callable[[dict[str, Any]], None]:
    """Change the bytes of every inline file, keeping its digest."""

    def edit(record: dict[str, Any]) -> None:
        for digest, text in record["inline"].items():
            record["inline"][digest] = base64.b64encode(change(base64.b64decode(text))).decode()

    return edit


def add_inline(*files: bytes) -> Callable[[dict[str, Any]], None]:
    def change(record: dict[str, Any]) -> None:
        for data in files:
            record["inline"][hash_bytes(data)] = base64.b64encode(data).decode()

    return change


def inline_too_large(record: dict[str, Any]) -> None:
    """An output whose file, of 5,000 bytes, is inline (its digest right)."""
    data = b"x" * 5000
    record["outputs"]["build/f.txt"]["fingerprint"] = "file:" + hash_bytes(data)
    record["inline"][hash_bytes(data)] = base64.b64encode(data).decode()


def deep_path(record: dict[str, Any]) -> None:
    digest = record["outputs"]["build/f.txt"]["fingerprint"]
    deep = "/".join(["a"] * 2000) + "/f"
    record["outputs"]["build/d"]["tree"].append([deep, digest, 0o644, ""])


HOSTILE: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "created-text": (set_field("created", "yesterday"), "created 'yesterday' is not a number"),
    "created-huge": (set_field("created", 1e300), "created 1e+300 is out of range"),
    "duration-nan": (set_field("duration", float("nan")), "duration nan is out of range"),
    "duration-negative": (set_field("duration", -1), "duration -1 is out of range"),
    "size-bool": (set_field("size", True), "size True is not a byte count"),
    "target-other": (set_field("target", "count"), "the record of another target"),
    "unknown-field": (set_field("extra", 1), "unknown field 'extra'"),
    "blobs-other": (set_field("blobs", {"0" * 64: 1}), "its record lists malformed blob sizes"),
    "producer-time": (set_field("producer", {"time": "now"}), "has a malformed producer"),
    "inline-tampered": (
        inline_bytes(lambda data: bytes([data[0] ^ 1]) + data[1:]),
        "does not match its digest",
    ),
    "inline-stray": (add_inline(b"evil"), "is not one of its files"),
    "inline-too-large": (inline_too_large, "is malformed or too large"),
    "inline-total": (
        add_inline(*(bytes([i]) * 4096 for i in range(17))),
        "its inline files hold more than 65536 bytes",
    ),
    "inline-not-base64": (set_field("inline", {"0" * 64: "***"}), "is not base64"),
    "inline-in-version-2": (set_field("version", 2), "unknown field 'inline'"),
    "deep-path": (deep_path, "is more than 128 levels deep"),
    "link-absolute": (add_items(link("evil", "/etc")), "has an unusable target"),
    "link-up": (add_items(link("evil", "../../../etc")), "symlink 'evil' leads out"),
    "link-chain": (
        add_items(link("a", "sub/.."), link("b", "a/../x")),
        "symlink 'b' leads out of its directory",
    ),
    "mode-777": (file_mode(0o777), "file mode 0o777 is not allowed"),
    "mode-setuid": (file_mode(0o4755), "file mode 0o4755 is not allowed"),
    "dir-mode-777": (tree_mode("sub", 0o777), "directory 'sub': mode 0o777 is not allowed"),
    "name-dotdot": (add_items(["..", "dir:", 0o755, ""]), "'..' is not inside its directory"),
    "name-mlbuild": (
        add_items([".mlbuild", "dir:", 0o755, ""]),
        "'.mlbuild' is not inside its directory",
    ),
    "name-nul": (add_items(["x\0y", "dir:", 0o755, ""]), "is too long or holds NUL"),
    "name-absolute": (add_items(["/x", "dir:", 0o755, ""]), "is not inside its directory"),
    "below-link": (
        add_items(link("l", "sub"), ["l/x", "dir:", 0o755, ""]),
        "'l/x' does not lie below a directory",
    ),
}


def hostile_record(remote: Path, target: str) -> Path:
    for path in (remote / "ac").iterdir():
        if json.loads(path.read_bytes())["target"] == target:
            return path
    raise AssertionError(f"no record of {target}")


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_records_are_refused_whole(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    change, problem = HOSTILE[case]
    folder = tmp_path / "remote"
    first = Project(tmp_path / "a", capsys)
    first.pipeline(TREE.format(cache=f'remote = "{folder}"'))
    assert first.run().code == 0
    path = hostile_record(folder, "tree")
    record = json.loads(path.read_bytes())
    good_outputs = json.loads(json.dumps(record["outputs"]))
    change(record)
    reseal(record)
    path.write_text(json.dumps(record))
    second = Project(tmp_path / "b", capsys)
    second.pipeline(TREE.format(cache=f'remote = "{folder}"'))
    result = second.run()
    assert result.code == 0, result.err
    one_warning(result.err, "remote cache entry of `tree` not used: its record ", problem)
    assert "Step `tree` has started" in result.out
    assert not (second.root / "build/d/evil").exists()
    assert not (tmp_path / "x").exists()
    # Only the step's own outputs reached the local cache, never the record.
    (local,) = [
        json.loads(p.read_bytes())
        for p in entry_files(second)
        if json.loads(p.read_bytes())["target"] == "tree"
    ]
    assert local["outputs"] == good_outputs
    assert isinstance(local["created"], float)


def test_too_many_entries_and_deep_json_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlbuild.cache

    folder = tmp_path / "remote"
    checkouts = [Project(tmp_path / name, capsys) for name in "abc"]
    for checkout in checkouts:
        checkout.pipeline(TREE.format(cache=f'remote = "{folder}"'))
    assert checkouts[0].run().code == 0
    monkeypatch.setattr(mlbuild.cache.entry, "MAX_ITEMS", 3)  # the tree has 7 entries
    result = checkouts[1].run()
    assert result.code == 0
    assert (
        "remote cache entry of `tree` not used: its record is unusable: output build/d:"
        " its directory tree is missing or too large; running it"
    ) in result.err
    assert "Step `tree` has started" in result.out
    monkeypatch.undo()
    hostile_record(folder, "tree").write_text("[" * 100_000 + "]" * 100_000)
    deep = checkouts[2].run()
    assert deep.code == 0
    one_warning(deep.err, "`tree` not used: its record is unusable: it is not JSON")
    assert "Step `tree` has started" in deep.out


def test_remote_restore_slower_than_the_step_runs_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mlbuild.cache.restore, "RESTORE_SECONDS_PER_FILE", 1.0)  # 5 s
    folder = tmp_path / "remote"
    first = Project(tmp_path / "a", capsys)
    first.pipeline(TREE.format(cache=f'remote = "{folder}"'))
    first.run()
    path = hostile_record(folder, "tree")
    record = json.loads(path.read_bytes())
    record["duration"] = 0.0
    path.write_text(json.dumps(record))
    second = Project(tmp_path / "b", capsys)
    second.pipeline(TREE.format(cache=f'remote = "{folder}"'))
    result = second.run()
    one_warning(result.err, "`tree` runs instead of being restored: restoring 5 files")
    assert "Step `tree` has started" in result.out
    assert "Step `count` restored from remote cache" in result.out


def test_outputs_with_a_link_leading_out_are_not_cached(project: Project) -> None:
    project.pipeline(
        """
        [params]
        v = 1

        [targets.out]
        cmd = '''mkdir -p {outputs.d}; ln -sf ../../etc {outputs.d}/up
        echo {params.v} > {outputs.d}/v'''
        outputs = { d = "build/d" }
        params = ["v"]

        [targets.ok]
        cmd = "echo {params.v} > {outputs.f}"
        outputs = { f = "ok.txt" }
        params = ["v"]
        """
    )
    result = project.run()
    assert result.code == 0
    one_warning(result.err, "`out` not cached: output build/d: symlink 'up' leads out")
    edit_entries(project, set_duration(1e6))
    project.run("run", "--set", "v=2")
    back = project.run()
    assert "Step `out` has started" in back.out
    assert "Step `ok` restored from cache" in back.out


def test_sandbox_fetch_takes_255_byte_names(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from mlbuild.remote import Remote

    remote = Remote(str(tmp_path / "remote"))
    src = tmp_path / "src.txt"
    src.write_text("hello\n")
    digest = hash_bytes(b"hello\n")
    remote.put_blob(str(src), digest)
    dest = tmp_path / "sandbox" / ("n" * 255)
    dest.parent.mkdir()
    with ThreadPoolExecutor(2) as pool:
        remote.fetch_verified([(digest, str(dest), 0o644)], pool, {digest: 6})
    assert dest.read_text() == "hello\n"
    assert os.listdir(dest.parent) == ["n" * 255]


# -- 1. a restore killed midway ------------------------------------------------------------

MANY = 6_000
MAKE_MANY = f"""
import os, sys
out, v = sys.argv[1], sys.argv[2]
for d in range(30):
    os.makedirs(f"{{out}}/d{{d}}")
    for i in range({MANY // 30}):
        with open(f"{{out}}/d{{d}}/{{i}}", "w") as f:
            f.write(f"{{d}} {{i}} {{v}}\\n")
"""


def staging_leftovers(root: Path) -> list[str]:
    """Anything a restore stages: in `.mlbuild/staging/`, or beside the output (old code)."""
    found = []
    try:
        for folder in (root / ".mlbuild/staging").iterdir():
            found += [str(p) for p in folder.iterdir()]
    except FileNotFoundError:  # none yet, or the restore just removed it
        pass
    build = root / "build"
    if build.is_dir():
        found += [str(p) for p in build.iterdir() if "mlbuild-" in p.name]
    return found


def test_killed_restore_leaves_nothing_in_the_project(project: Project) -> None:
    project.write("make.py", MAKE_MANY)
    project.pipeline(
        f"""
        [params]
        v = 1

        [targets.many]
        cmd = "{sys.executable} make.py {{outputs.d}} {{params.v}}"
        outputs = {{ d = "build/d" }}
        params = ["v"]

        [targets.count]
        cmd = "find {{inputs.b}} | sort > {{outputs.n}}"
        inputs = {{ b = "build" }}
        outputs = {{ n = "out/n.txt" }}
        """
    )
    assert project.run().code == 0
    expected = project.read("out/n.txt")
    edit_entries(project, set_duration(1e6))  # the restore is always chosen
    assert project.run("run", "--set", "v=2").code == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlbuild", "run", "-q", "-f", str(project.root / "pipeline.toml")],
        cwd=project.root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not staging_leftovers(project.root):
        assert proc.poll() is None, "the restore ended before it was killed"
        assert time.monotonic() < deadline, "no restore started"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert set(os.listdir(project.root / "build")) <= {"d"}
    assert os.listdir(project.root / ".mlbuild/staging") != []  # killed midway indeed
    result = project.run()
    assert result.code == 0, result.err
    assert os.listdir(project.root / ".mlbuild/staging") == []
    assert set(os.listdir(project.root / "build")) == {"d"}
    assert (project.root / "build/d/d0/0").read_text() == "0 0 1\n"
    assert project.read("out/n.txt") == expected
    assert project.run().started() == []


def test_clear_staging_removes_only_dead_processes_folders(tmp_path: Path) -> None:
    from mlbuild.cache import clear_staging

    assert clear_staging(tmp_path) == 0
    staging = tmp_path / ".mlbuild/staging"
    (staging / "999999999-dead/1/sub").mkdir(parents=True)
    (staging / "999999999-dead/1/sub").chmod(0o500)
    (staging / f"{os.getppid()}-alive").mkdir()
    assert clear_staging(tmp_path) == 1
    assert os.listdir(staging) == [f"{os.getppid()}-alive"]


def test_clear_staging_removes_folders_staged_on_another_filesystem(tmp_path: Path) -> None:
    from mlbuild.cache import clear_staging

    staging = tmp_path / ".mlbuild/staging"
    staging.mkdir(parents=True)
    (tmp_path / "build/.mlbuild-999999999-ab/1").mkdir(parents=True)
    (staging / "999999999-ab.elsewhere").write_text("build/.mlbuild-999999999-ab")
    (tmp_path / "build/keep").mkdir()
    (staging / "999999999-cd.elsewhere").write_text("build/keep")  # not a staging name
    assert clear_staging(tmp_path) == 2
    assert os.listdir(tmp_path / "build") == ["keep"]
    assert os.listdir(staging) == []


def test_restore_onto_another_filesystem_stages_beside_the_output(
    tree: Project, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    import tempfile

    import mlbuild.cache
    from mlbuild.cache import clear_staging

    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == tree.root.stat().st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the project")
    other = Path(tempfile.mkdtemp(dir="/dev/shm"))
    request.addfinalizer(lambda: shutil.rmtree(other, ignore_errors=True))
    monkeypatch.setattr(mlbuild.cache.restore, "staging_dir", lambda root: other / "staging")
    tree.run()
    edit_entries(tree, set_duration(1e6))
    tree.run("run", "--set", "v=2")
    result = tree.run()
    assert "Step `tree` restored from cache" in result.out, result.err
    assert sorted(os.listdir(tree.root / "build")) == ["d", "f.txt"]
    assert os.listdir(other / "staging") == []
    # A restore killed midway: its folder beside the output is found through its marker.
    monkeypatch.setattr(mlbuild.cache.restore._Staging, "remove", lambda self: None)
    tree.run("run", "--set", "v=2")
    assert [n for n in os.listdir(tree.root / "build") if n.startswith(".mlbuild-")]
    assert clear_staging(tree.root) >= 1
    assert sorted(os.listdir(tree.root / "build")) == ["d", "f.txt"]
    assert not [p for p in tree.root.rglob(".mlbuild-*")]
    assert os.listdir(other / "staging") == []
