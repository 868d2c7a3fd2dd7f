"""Warm workers on the MNIST demo: its second run (epochs 1 -> 2) with and without warming.

The root pipeline.toml is the demo. A scratch copy runs `mlbuild run` once
(epochs=1: importer, normalizer, trainer, evaluator); that state (outputs,
.mlbuild with its cache) is the snapshot every measured run starts from, in
a copy of its own. The measured run is `mlbuild run -j N --set epochs=2`:
the importer and normalizer are skipped, the trainer and evaluator run (one
after the other: the evaluator needs the model).

- cold: `-j 1`, no free slot, so no warm worker: each of the two steps
  imports TensorFlow in its fresh worker (what every run did before warming).
- warm: `-j 2`: while the trainer trains, the evaluator's worker imports
  TensorFlow on the free slot and then waits for its call.
- keep-warm: `-j 2` with `[workers] keep_warm = "10m"`, after a priming run
  (not timed) left a kept worker for the trainer and the evaluator: neither
  imports TensorFlow in the timed run.
- baseline (with --baseline DIR): another checkout of mlbuild (e.g. the main
  branch before warming) at `-j 2`, for "today's" number.

Runs alternate between modes; medians of --repeat. Also reports the resident
memory (VmRSS, and Pss from smaps_rollup) of a warm worker that imported
what the evaluator's code imports (TensorFlow, NumPy), once it is idle.

Usage (from the repository root, TensorFlow installed):
    python bench/warm_bench.py [--repeat 3] [--baseline /path/to/other/checkout]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_snapshot(root: Path) -> None:
    """The demo after its first run (epochs=1), in `root`."""
    shutil.copy(REPO / "pipeline.toml", root / "pipeline.toml")
    for source in (REPO / "examples" / "mnist").glob("**/*.py"):
        dest = root / "examples" / "mnist" / source.relative_to(REPO / "examples" / "mnist")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, dest)
    run_mlbuild(root, REPO, ["run", "-q"])


def run_mlbuild(root: Path, checkout: Path, args: list[str]) -> tuple[float, str]:
    """Wall seconds of one `mlbuild` command run from `checkout`, and its output."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "mlbuild", *args],
        cwd=root,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return time.perf_counter() - start, done.stdout + done.stderr


def second_run(snapshot: Path, scratch: Path, checkout: Path, jobs: int) -> tuple[float, float]:
    """(wall, evaluator step seconds) of `run --set epochs=2` in a fresh copy of the snapshot."""
    if scratch.exists():
        shutil.rmtree(scratch)
    shutil.copytree(snapshot, scratch, symlinks=True)
    wall, out = run_mlbuild(scratch, checkout, ["run", "-j", str(jobs), "--set", "epochs=2"])
    ran = re.findall(r"`(\w+)` has finished in ([\d.]+)s", out)
    names = [name for name, _ in ran]
    assert names == ["trainer", "evaluator"], out
    return wall, float(dict(ran)["evaluator"])


def kept_run(snapshot: Path, scratch: Path) -> tuple[float, float]:
    """`second_run` with `[workers] keep_warm`: a primed keep-warm process holds both workers.

    Priming (not timed): `--force trainer evaluator` at epochs=1 (the same
    results), after which the keep-warm process keeps a worker for each;
    the timed run starts once both are idle (TensorFlow imported).
    """
    sys.path.insert(0, str(REPO))
    from mlbuild.exec.keepwarm import request

    if scratch.exists():
        shutil.rmtree(scratch)
    shutil.copytree(snapshot, scratch, symlinks=True)
    with open(scratch / "pipeline.toml", "a") as handle:
        handle.write('\n[workers]\nkeep_warm = "10m"\n')
    try:
        run_mlbuild(scratch, REPO, ["run", "-j", "2", "--force", "trainer", "evaluator"])
        kept = request(scratch, {"op": "list"}) or []
        assert len(kept) == 2, kept
        for entry in kept:
            wait_idle(int(entry["pid"]))
        wall, out = run_mlbuild(scratch, REPO, ["run", "-j", "2", "--set", "epochs=2"])
    finally:
        run_mlbuild(scratch, REPO, ["workers", "stop"])
    ran = re.findall(r"`(\w+)` has finished in ([\d.]+)s", out)
    assert [name for name, _ in ran] == ["trainer", "evaluator"], out
    return wall, float(dict(ran)["evaluator"])


def wait_idle(pid: int) -> None:
    """Until process `pid` used no CPU and no new memory for 2 s (done importing)."""
    last, still = (-1, -1), 0
    while still < 10:
        time.sleep(0.2)
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        now = (int(fields[11]) + int(fields[12]), int(fields[21]))
        still = still + 1 if now == last else 0
        last = now


def warm_memory(snapshot: Path) -> tuple[int, int]:
    """(VmRSS, Pss) in KiB of an idle warm worker holding the evaluator's imports."""
    sys.path.insert(0, str(REPO))
    from mlbuild.code import CodeScanner
    from mlbuild.exec.warm import warm_spec
    from mlbuild.exec.worker import WARM_FLAG
    from mlbuild.fingerprint import Fingerprinter
    from mlbuild.pipeline.load import load_pipeline

    target = load_pipeline(snapshot / "pipeline.toml").targets["evaluator"]
    files = CodeScanner(Fingerprinter(snapshot, {}), {}).fingerprint(target).files
    spec = warm_spec(str(snapshot), files)
    assert spec is not None
    call = json.dumps(
        {
            "root": str(snapshot),
            "imports": spec.imports,
            "env": dict((k, v) for k, v, _ in spec.env),
        }
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlbuild.exec.worker", WARM_FLAG, call],
        cwd=snapshot,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_idle(proc.pid)
        rss = _field(f"/proc/{proc.pid}/status", "VmRSS:")
        pss = _field(f"/proc/{proc.pid}/smaps_rollup", "Pss:")
        return rss, pss
    finally:
        assert proc.stdin is not None
        proc.stdin.close()  # end of file: it exits without running anything
        proc.wait()


def _field(path: str, name: str) -> int:
    with open(path) as handle:
        for line in handle:
            if line.startswith(name):
                return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="another mlbuild checkout, run at -j 2")
    args = parser.parse_args()
    modes: list[tuple[str, Path, int]] = [
        ("cold (-j 1)", REPO, 1),
        ("warm (-j 2)", REPO, 2),
        ("keep-warm (-j 2)", REPO, 0),  # jobs 0: kept_run
    ]
    if args.baseline is not None:
        modes.insert(0, ("baseline (-j 2)", args.baseline.resolve(), 2))
    with tempfile.TemporaryDirectory(prefix="warm-bench-") as tmp:
        snapshot = Path(tmp) / "snapshot"
        snapshot.mkdir()
        make_snapshot(snapshot)
        walls: dict[str, list[float]] = {name: [] for name, _, _ in modes}
        evaluator: dict[str, list[float]] = {name: [] for name, _, _ in modes}
        for i in range(args.repeat):
            order = modes if i % 2 == 0 else modes[::-1]
            for name, checkout, jobs in order:
                if jobs == 0:
                    wall, step = kept_run(snapshot, Path(tmp) / "run")
                else:
                    wall, step = second_run(snapshot, Path(tmp) / "run", checkout, jobs)
                walls[name].append(wall)
                evaluator[name].append(step)
                print(f"  {name}: wall {wall:.3f}s, evaluator {step:.3f}s", flush=True)
        rss, pss = warm_memory(snapshot)
    print(f"\nsecond run (epochs 1 -> 2), medians of {args.repeat}:")
    cold = statistics.median(walls["cold (-j 1)"])
    for name, _, _ in modes:
        wall = statistics.median(walls[name])
        step = statistics.median(evaluator[name])
        print(f"  {name:17} wall {wall:6.3f}s ({wall / cold:.2f}x cold)  evaluator {step:6.3f}s")
    print(f"warm evaluator worker, idle: VmRSS {rss / 1024:.0f} MiB, Pss {pss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
