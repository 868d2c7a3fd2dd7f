"""Create and refresh the bench-only virtualenv holding the peer tools and mlbuild."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# Versions verified to install together on Python 3.11 (pip check clean).
PEER_PINS: tuple[str, ...] = ("doit==0.37.0", "snakemake==9.27.1", "dvc==3.67.1")

STAMP_NAME = "bench-stamp.json"

# setuptools' default editable mode installs an import-hook module that every Python process
# in the venv imports at startup (~20 ms of pathlib/re/urllib imports, paid by mlbuild and the
# Python peers alike, and absent from a normal install). "compat" mode is a plain .pth path entry.
EDITABLE_ARGS: tuple[str, ...] = ("--config-settings", "editable_mode=compat")


@dataclass
class VenvInfo:
    """Where the bench venv lives and whether mlbuild got installed into it."""

    root: Path
    mlbuild_ok: bool
    mlbuild_note: str

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def python(self) -> Path:
        return self.bin / "python"


def _pyproject_digest(repo: Path) -> str | None:
    pyproject = repo / "pyproject.toml"
    if not pyproject.is_file():
        return None
    digest = hashlib.sha256(pyproject.read_bytes())
    digest.update(" ".join(EDITABLE_ARGS).encode())
    return digest.hexdigest()


def _read_stamp(venv: Path) -> dict[str, object]:
    try:
        data = json.loads((venv / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_stamp(venv: Path, stamp: dict[str, object]) -> None:
    (venv / STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n")


def _pip(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def _peer_key() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}|" + "|".join(PEER_PINS)


def ensure_venv(venv: Path, repo: Path, *, log: bool = True) -> VenvInfo:
    """Make sure `venv` has the pinned peers and an editable install of mlbuild."""

    def say(msg: str) -> None:
        if log:
            print(f"[venv] {msg}", flush=True)

    stamp = _read_stamp(venv)
    healthy = (venv / "bin" / "python").exists() and stamp.get("peers") == _peer_key()
    if not healthy:
        if venv.exists():
            say(f"stale or broken venv at {venv}; recreating")
            shutil.rmtree(venv)
        say(f"creating {venv} (python3 -m venv) and installing {' '.join(PEER_PINS)}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        res = _pip(venv, "install", "--quiet", *PEER_PINS)
        if res.returncode != 0:
            sys.stderr.write(res.stdout + res.stderr)
            raise SystemExit("pip install of the peer tools failed")
        stamp = {"peers": _peer_key()}
        _write_stamp(venv, stamp)

    digest = _pyproject_digest(repo)
    if digest is None:
        note = f"no pyproject.toml in {repo}; mlbuild not installed"
        say(note)
        return VenvInfo(venv, False, note)
    if stamp.get("mlbuild") != digest or not _has_mlbuild(venv):
        say(f"pip install {' '.join(EDITABLE_ARGS)} -e {repo}")
        res = _pip(venv, "install", "--quiet", *EDITABLE_ARGS, "-e", str(repo))
        if res.returncode != 0:
            note = "pip install -e failed: " + (res.stderr.strip().splitlines() or ["?"])[-1]
            say(note)
            return VenvInfo(venv, False, note)
        stamp["mlbuild"] = digest
        _write_stamp(venv, stamp)
    if not _has_mlbuild(venv):
        return VenvInfo(
            venv, False, "mlbuild installed but neither bin/mlbuild nor the module works"
        )
    return VenvInfo(venv, True, "")


def _has_mlbuild(venv: Path) -> bool:
    if (venv / "bin" / "mlbuild").exists():
        return True
    res = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import mlbuild"],
        capture_output=True,
        check=False,
    )
    return res.returncode == 0


def mlbuild_command(venv: Path) -> list[str]:
    """The argv prefix that starts mlbuild's CLI from the bench venv."""
    exe = venv / "bin" / "mlbuild"
    if exe.exists():
        return [str(exe)]
    return [str(venv / "bin" / "python"), "-m", "mlbuild"]


# ZenML's own bench venv (issue 20), apart from the peers' so its dependency tree (SQLAlchemy,
# pydantic, click pins) cannot move theirs. The demo's work needs TensorFlow and scikit-learn:
# the same pins as pyproject.toml's `examples` extra, so both tools train the same model.
ZENML_PINS: tuple[str, ...] = (
    "zenml[local]==0.98.0",  # [local]: SQLAlchemy etc. for the local SQLite store
    "tensorflow-cpu==2.21.0; platform_machine == 'x86_64'",
    "tensorflow==2.21.0; platform_machine != 'x86_64'",
    "scikit-learn>=1.3",
)


def _zenml_key() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}|" + "|".join(ZENML_PINS)


def ensure_zenml_venv(venv: Path, *, log: bool = True) -> Path:
    """Make sure `venv` has ZenML with the demo's TensorFlow; return its python.

    Raises SystemExit with pip's own error lines when the install fails, so a
    bench never reports a ZenML number it could not measure.
    """
    stamp = _read_stamp(venv)
    if (venv / "bin" / "python").exists() and stamp.get("zenml") == _zenml_key():
        return venv / "bin" / "python"
    if venv.exists():
        shutil.rmtree(venv)
    if log:
        print(f"[venv] creating {venv} and installing {' '.join(ZENML_PINS)}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    res = _pip(venv, "install", "--quiet", *ZENML_PINS)
    if res.returncode != 0:
        sys.stderr.write(res.stdout + res.stderr)
        raise SystemExit("pip install of ZenML failed (pip's error above)")
    check = _pip(venv, "check")
    if log and check.returncode != 0:
        print("[venv] pip check: " + check.stdout.strip(), flush=True)
    _write_stamp(venv, {"zenml": _zenml_key()})
    return venv / "bin" / "python"
