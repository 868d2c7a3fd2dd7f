"""Many builders on one remote cache: the load run of tests/test_team.py and bench/team_bench.py.

N builders (`python -m mlbuild run` processes, each in its own checkout with
its own `.mlbuild/`) start at once against one S3 remote, each with one of
four configurations (`--set scale=.. --set epochs=..`) of one pipeline, so
that some cache keys are shared by all builders, some by half of them, and
some by the two builders of one configuration. A few builders are SIGKILLed
right after one of their steps finished, while its outputs are being
uploaded in the background; they are then run again. Afterwards every
checkout must hold exactly the outputs of a clean build of its
configuration, and every record on the remote must name blobs that exist
and hash to their names (`verify_remote`). A second round in fresh
checkouts must restore everything and run nothing.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = [(1, 1), (1, 2), (2, 1), (2, 2)]  # (scale, epochs)

PIPELINE = """
[params]
scale = 1
epochs = 1
size = {size}

[cache]
{cache}

[targets.prep]
cmd = "sleep {pause}; yes \\"$(cat {{inputs}})\\" | head -c {{params.size}} > {{outputs.o}}"
inputs = ["data/seed.txt"]
outputs = {{ o = "build/prep.txt" }}
params = ["size"]

[targets.feat]
cmd = "sleep {pause}; sed s/seed/s{{params.scale}}/ {{inputs}} > {{outputs.o}}"
inputs = ["build/prep.txt"]
outputs = {{ o = "build/feat.txt" }}
params = ["scale"]

[targets.train]
cmd = '''sleep {pause}; mkdir -p {{outputs.model}}
for i in $(seq {{params.epochs}}); do cat {{inputs}}; done > {{outputs.model}}/w.bin
echo {{params.scale}} {{params.epochs}} > {{outputs.model}}/meta.txt'''
inputs = ["build/feat.txt"]
outputs = {{ model = "build/model" }}
params = ["scale", "epochs"]

[targets.eval]
cmd = "sleep {pause}; wc -c < {{inputs}}/w.bin > {{outputs.o}}"
inputs = ["build/model"]
outputs = {{ o = "build/eval.txt" }}
{shards}
"""

SHARD = """
[targets.shard{i}]
cmd = '''sleep {pause}; tr 'a-z' 'b-za' < {{inputs}} | head -c {cut} > {{outputs.o}}
echo {{params.{p}}} >> {{outputs.o}}'''
inputs = ["build/{src}.txt"]
outputs = {{ o = "build/shard{i}.txt" }}
params = ["{p}"]
"""


def pipeline_text(cache: str, shards: int, size: int, pause: float) -> str:
    """The pipeline: 4 targets plus `shards` more; prep and half the shards share every key."""
    parts = []
    for i in range(shards):
        # Even shards read prep and a param no config changes (one key for everyone);
        # odd ones read feat (one key per scale).
        src, p = ("prep", "size") if i % 2 == 0 else ("feat", "scale")
        parts.append(SHARD.format(i=i, pause=pause, cut=size // (i + 2), src=src, p=p))
    return PIPELINE.format(cache=cache, size=size, pause=pause, shards="".join(parts))


def write_checkout(folder: Path, text: str) -> None:
    folder.mkdir(parents=True)
    (folder / "pipeline.toml").write_text(text)
    (folder / "data").mkdir()
    (folder / "data/seed.txt").write_text("seed of the team\n")


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` and its bytes."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


class Run(NamedTuple):
    """One mlbuild process of a builder."""

    builder: int
    config: tuple[int, int]
    code: int
    killed: bool
    ran: int
    restored_remote: int
    restored_local: int
    out: str


def _argv(config: tuple[int, int]) -> list[str]:
    scale, epochs = config
    return [
        sys.executable,
        "-m",
        "mlbuild",
        "run",
        "-j",
        "2",
        "--set",
        f"scale={scale}",
        "--set",
        f"epochs={epochs}",
    ]


def _count(out: str) -> tuple[int, int, int]:
    lines = out.splitlines()
    ran = sum("has finished in" in ln for ln in lines)
    remote = sum("restored from remote cache" in ln for ln in lines)
    local = sum("restored from cache" in ln for ln in lines)
    return ran, remote, local


def run_builder(
    builder: int,
    folder: Path,
    config: tuple[int, int],
    env: Mapping[str, str],
    kill_after: int | None,
) -> Run:
    """Run one build; with `kill_after = k`, SIGKILL it right after its k-th step finished."""
    proc = subprocess.Popen(
        _argv(config),
        cwd=folder,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    killed = False
    with proc.stdout:
        for line in proc.stdout:
            lines.append(line)
            if kill_after is not None and not killed and _count("".join(lines))[0] >= kill_after:
                proc.send_signal(signal.SIGKILL)  # its upload of that step is under way
                killed = True
    code = proc.wait()
    out = "".join(lines)
    return Run(builder, config, code, killed, *_count(out), out)


def run_round(
    builders: list[int],
    folders: list[Path],
    configs: list[tuple[int, int]],
    env: Mapping[str, str],
    kills: Mapping[int, int],
) -> list[Run]:
    """Start these builders at once (threads waiting on processes); their runs in order."""
    runs: list[Run | None] = [None] * len(builders)

    def one(n: int) -> None:
        i = builders[n]
        runs[n] = run_builder(i, folders[i], configs[i], env, kills.get(i))

    threads = [threading.Thread(target=one, args=(n,)) for n in range(len(builders))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [r for r in runs if r is not None]


def verify_remote(url: str, options: Mapping[str, Any]) -> tuple[int, int, list[str]]:
    """Every record on the remote, checked whole; (records, blobs, problems).

    Lists `ac/` (mlbuild itself never lists), reads each record through
    mlbuild's own checks, then downloads every blob it names and checks its
    size and BLAKE3 digest.
    """
    from mlbuild.fingerprint import hash_bytes
    from mlbuild.remote import BadRecord, Remote

    remote = Remote(url, options)
    problems: list[str] = []
    records = blobs = 0
    checked: dict[str, bool] = {}
    listed = remote.fs.find(f"{remote.base}/ac", detail=True)
    for path, info in listed.items():
        key = str(path).rsplit("/", 1)[-1]
        if key.startswith(".tmp-") or info.get("type") == "directory":
            continue
        records += 1
        try:
            found = remote.read_record(key)
        except BadRecord as exc:
            problems.append(f"record {key[:12]}: {exc}")
            continue
        if found is None:
            problems.append(f"record {key[:12]}: unreadable")
            continue
        _, sizes = found
        for digest, size in sizes.items():
            if digest not in checked:
                blobs += 1
                try:
                    data = remote.fs.cat_file(remote.blob_path(digest))
                except FileNotFoundError:
                    data = None
                checked[digest] = (
                    data is not None and len(data) == size and hash_bytes(data) == digest
                )
            if not checked[digest]:
                problems.append(f"record {key[:12]}: blob {digest[:12]} missing or wrong")
    return records, blobs, problems


class LoadResult(NamedTuple):
    builders: int
    targets: int  # per pipeline
    keys: int  # distinct cache keys over all configurations
    kills: int
    first: list[Run]  # the first round, kills included
    reruns: list[Run]  # the killed builders run again
    fresh: list[Run]  # new checkouts, every output from the remote
    wrong: list[str]  # outputs differing from a clean build (must be empty)
    problems: list[str]  # records naming a missing or wrong blob (must be empty)
    records: int
    blobs: int
    seconds: float  # wall time of the first round


def load_run(
    work: Path,
    url: str,
    options: Mapping[str, Any],
    env: Mapping[str, str],
    *,
    builders: int,
    kills: int,
    shards: int = 4,
    size: int = 300_000,
    pause: float = 0.1,
    seed: int = 0,
) -> LoadResult:
    """The whole load run (see the module docstring)."""
    rng = random.Random(seed)
    table = ", ".join(f"{k} = {json.dumps(v)}" for k, v in options.items())
    cache = f'remote = "{url}"\nremote_options = {{ {table} }}'
    text = pipeline_text(cache, shards, size, pause)
    targets = 4 + shards
    configs = [CONFIGS[i % len(CONFIGS)] for i in range(builders)]
    # Clean builds, one per configuration, with no remote: what every checkout must hold.
    clean: dict[tuple[int, int], dict[str, bytes]] = {}
    for config in CONFIGS[: min(builders, len(CONFIGS))]:
        folder = work / f"clean-{config[0]}-{config[1]}"
        write_checkout(folder, pipeline_text("", shards, size, pause))
        proc = subprocess.run(_argv(config), cwd=folder, env=dict(env), capture_output=True)
        if proc.returncode != 0:
            raise RuntimeError(f"clean build failed: {proc.stdout!r} {proc.stderr!r}")
        clean[config] = tree(folder / "build")
    folders = [work / f"builder{i}" for i in range(builders)]
    for folder in folders:
        write_checkout(folder, text)
    victims = rng.sample(range(builders), kills)
    kill_at = {i: rng.randint(1, targets // 2) for i in victims}
    start = time.perf_counter()
    everyone = list(range(builders))
    first = run_round(everyone, folders, configs, env, kill_at)
    seconds = time.perf_counter() - start
    again = [r.builder for r in first if r.killed or r.code != 0]
    reruns = run_round(again, folders, configs, env, {})
    fresh_folders = [work / f"fresh{i}" for i in range(builders)]
    for folder in fresh_folders:
        write_checkout(folder, text)
    fresh = run_round(everyone, fresh_folders, configs, env, {})
    wrong: list[str] = []
    pairs = [*zip(folders, configs, strict=True), *zip(fresh_folders, configs, strict=True)]
    for folder, config in pairs:
        got = tree(folder / "build") if (folder / "build").exists() else {}
        if got != clean[config]:
            differ = sorted(set(got) ^ set(clean[config]))
            differ += [p for p in got if p in clean[config] and got[p] != clean[config][p]]
            wrong.append(f"{folder.name}: {', '.join(differ) or 'differs'}")
    for run in [*reruns, *fresh]:
        if run.code != 0:
            wrong.append(f"builder{run.builder}: exit {run.code}: {run.out[-500:]}")
    records, blobs, problems = verify_remote(url, options)
    scales = len({scale for scale, _ in configs})
    keys = 1 + scales + 2 * len(set(configs)) + (shards + 1) // 2 + scales * (shards // 2)
    return LoadResult(
        builders,
        targets,
        keys,
        len(victims),
        first,
        reruns,
        fresh,
        wrong,
        problems,
        records,
        blobs,
        seconds,
    )


def copy_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The builders' environment: this mlbuild on PYTHONPATH, plus `extra` (credentials)."""
    env = {**os.environ, **extra, "PYTHONPATH": str(ROOT)}
    env.pop("MLBUILD_STEP_ID", None)
    return env


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
