"""A `gs://` remote cache against an offline GCS emulator (gcp-storage-emulator, on loopback).

The emulator speaks GCS's JSON API over plain HTTP; gcsfs reaches it through
`remote_options = { endpoint_url = ..., token = "anon" }`. gcsfs's
experimental bucket-layout lookup (gRPC, TLS) cannot reach an emulator, so
the builders run with GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false. The team
scenario: one checkout builds and uploads, another restores every output
byte-identical, and every record's blobs exist and hash right.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.seaweed import free_port
from tests.team import ROOT, tree, verify_remote

# Read when gcsfs is imported: its bucket-layout lookup (gRPC over TLS) would wait a
# minute per call for an emulator that cannot answer it.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
pytest.importorskip("gcsfs")
pytest.importorskip("gcp_storage_emulator")

BUCKET = "mlbuild"
PIPELINE = """
[cache]
remote = "gs://{bucket}/{prefix}"
remote_options = {{ endpoint_url = "{endpoint}", token = "anon", project = "test" }}

[targets.raw]
cmd = "seq 1 20000 > {{outputs.o}}"
outputs = {{ o = "build/raw.txt" }}

[targets.model]
cmd = "mkdir -p {{outputs.d}}; sort -r {{inputs}} > {{outputs.d}}/w.txt; echo m > {{outputs.d}}/m"
inputs = ["build/raw.txt"]
outputs = {{ d = "build/model" }}
"""


@pytest.fixture(scope="module")
def gcs() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gcp_storage_emulator",
            "start",
            "--host=127.0.0.1",
            f"--port={port}",
            "--in-memory",
            f"--default-bucket={BUCKET}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    import urllib.request

    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/storage/v1/b/{BUCKET}", timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("the GCS emulator did not start") from None
            time.sleep(0.2)
    try:
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _run(folder: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path[1:]])}
    return subprocess.run(
        [sys.executable, "-m", "mlbuild", "run"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_gs_remote_serves_a_second_checkout(tmp_path: Path, gcs: str) -> None:
    prefix = f"t{time.time_ns()}"
    text = PIPELINE.format(bucket=BUCKET, prefix=prefix, endpoint=gcs)
    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        folder.mkdir()
        (folder / "pipeline.toml").write_text(text)
    built = _run(first)
    assert built.returncode == 0, built.stderr
    assert "warning" not in built.stderr
    restored = _run(second)
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout.count("restored from remote cache") == 2
    assert "has started" not in restored.stdout
    assert tree(second / "build") == tree(first / "build")
    options = {"endpoint_url": gcs, "token": "anon", "project": "test"}
    records, blobs, problems = verify_remote(f"gs://{BUCKET}/{prefix}", options)
    assert (records, problems) == (2, [])
    assert blobs == 2  # raw.txt and w.txt; m (2 bytes) is inline in its record
