"""The caching demo, measured: three runs of the MNIST pipeline in a scratch copy.

Run 1 builds everything (epochs=1); run 2 (`--set epochs=2`) skips the importer
and normalizer; run 3 (back to epochs=1) restores the trainer and evaluator
from the output cache. Prints every step's time in every run, the speed-up of
each skipped or restored step, and mlbuild's own overhead per run: wall time
minus the time spent in the steps' own code (importing the step module and
calling the function, as the worker measured it).

    .venv/bin/python examples/mnist/demo.py [--keep DIR] [--epochs N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STEPS = ("importer", "normalizer", "trainer", "evaluator")


def prepare(scratch: Path) -> None:
    """A copy of the root pipeline and its step modules, with no state."""
    shutil.copy(REPO / "pipeline.toml", scratch / "pipeline.toml")
    steps = scratch / "examples" / "mnist" / "steps"
    steps.mkdir(parents=True)
    for source in (REPO / "examples" / "mnist" / "steps").glob("*.py"):
        shutil.copy(source, steps / source.name)


def run(scratch: Path, *args: str) -> tuple[float, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "mlbuild", "run", "-j", "1", *args],
        cwd=scratch,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"mlbuild run {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return wall, proc.stdout


def last_run(scratch: Path) -> dict[str, tuple[str, float]]:
    """Each step's outcome and duration in the latest run, from mlbuild's history."""
    with sqlite3.connect(scratch / ".mlbuild" / "state.db") as conn:
        (run_id,) = conn.execute("SELECT max(id) FROM runs").fetchone()
        rows = conn.execute(
            "SELECT target, status, duration FROM run_targets WHERE run_id = ?", (run_id,)
        )
        return {target: (status, duration) for target, status, duration in rows}


def function_seconds(scratch: Path, steps: dict[str, tuple[str, float]]) -> float:
    """Time spent in the steps' own code that ran: importing their module and calling
    the function (the worker's own measurement)."""
    total = 0.0
    for step, (status, _) in steps.items():
        if status == "ran":
            timing = json.loads((scratch / ".mlbuild" / "logs" / f"{step}.timing.json").read_text())
            total += timing["import_seconds"] + timing["call_seconds"]
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="run in this directory and keep it")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the second run")
    args = parser.parse_args()
    scratch = args.keep or Path(tempfile.mkdtemp(prefix="mlbuild-demo-"))
    scratch.mkdir(parents=True, exist_ok=True)
    prepare(scratch)
    runs = [
        ("run 1: epochs=1", ()),
        (f"run 2: epochs={args.epochs}", ("--set", f"epochs={args.epochs}")),
        ("run 3: epochs=1", ()),
    ]
    table: list[tuple[str, float, float, dict[str, tuple[str, float]]]] = []
    for title, extra in runs:
        wall, output = run(scratch, *extra)
        steps = last_run(scratch)
        inside = function_seconds(scratch, steps)
        table.append((title, wall, inside, steps))
        print(f"== {title}: {wall:.2f}s wall")
        print("   " + output.strip().replace("\n", "\n   "))
    print()
    print(f"{'step':<11}" + "".join(f"{title:>26}" for title, *_ in table))
    first = table[0][3]
    for step in STEPS:
        cells = []
        for _, _, _, steps in table:
            status, seconds = steps[step]
            speedup = ""
            if status in ("skipped", "restored") and seconds > 0:
                speedup = f" ({first[step][1] / seconds:,.0f}x)"
            cells.append(f"{status} {seconds * 1000:,.1f} ms{speedup}")
        print(f"{step:<11}" + "".join(f"{cell:>26}" for cell in cells))
    print()
    for title, wall, inside, _ in table:
        print(
            f"{title}: wall {wall:.3f}s, inside step functions {inside:.3f}s,"
            f" mlbuild overhead {wall - inside:.3f}s"
        )
    if args.keep is None:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
