"""A 2x2 `mlbuild exp run --sweep` of trivial steps against four sequential `mlbuild run --set`.

Goal (issue 16): the sweep at -j 1 costs at most 1.5x the four runs, and at
-j 2 it is faster than them. Each repeat starts from a fresh project whose
baseline was built (not timed), so every point's steps really run: none of the
four points is in the cache. Wall time of the whole CLI processes; medians.

    PYTHONPATH=$PWD python bench/sweep_bench.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PIPELINE = """
[params]
epochs = 1
lr = 0.1

[targets.prep]
cmd = "cp data.txt {outputs.0}"
inputs = ["data.txt"]
outputs = ["build/prep.txt"]

[targets.train]
cmd = "cat {inputs.0} > {outputs.0}; echo {params.epochs} {params.lr} >> {outputs.0}"
inputs = ["build/prep.txt"]
outputs = ["build/model.txt"]
params = ["epochs", "lr"]

[targets.evaluate]
cmd = "cat {inputs.0} > /dev/null; cp {inputs.1} {outputs.0}"
inputs = ["build/model.txt", "score.json"]
metrics = ["build/metrics.json"]
"""

EPOCHS = ("2", "3")
RATES = ("0.2", "0.3")


def mlbuild(root: Path, *args: str) -> None:
    argv = [sys.executable, "-m", "mlbuild", *args]
    subprocess.run(argv, cwd=root, check=True, stdout=subprocess.DEVNULL)


def fresh(base: Path) -> Path:
    """A project with its baseline built."""
    root = Path(tempfile.mkdtemp(dir=base))
    (root / "pipeline.toml").write_text(PIPELINE)
    (root / "data.txt").write_text("hello\n")
    (root / "score.json").write_text('{"acc": 0.5}\n')
    mlbuild(root, "run", "-q", "-j", "1")
    return root


def timed(root: Path, calls: list[list[str]]) -> float:
    start = time.perf_counter()
    for args in calls:
        mlbuild(root, *args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    repeat = parser.parse_args().repeat
    sequential = [
        ["run", "-q", "-j", "1", "--set", f"epochs={e}", "--set", f"lr={lr}"]
        for e in EPOCHS
        for lr in RATES
    ]
    sweep = ["exp", "run", "--sweep", f"epochs={','.join(EPOCHS)}"]
    sweep += ["--sweep", f"lr={','.join(RATES)}"]
    cases = {
        "4 x `mlbuild run --set` (-j 1)": sequential,
        "`exp run --sweep` 2x2, -j 1": [[*sweep, "-j", "1"]],
        "`exp run --sweep` 2x2, -j 2": [[*sweep, "-j", "2"]],
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    base = Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    try:
        for _ in range(repeat):
            for name, calls in cases.items():  # interleaved: the machine's noise hits all
                times[name].append(timed(fresh(base), calls))
    finally:
        shutil.rmtree(base)
    reference = statistics.median(times["4 x `mlbuild run --set` (-j 1)"])
    print(f"medians of {repeat}; {os.cpu_count()} CPUs; Python {sys.version.split()[0]}")
    print("| measurement | median | ratio to the four runs | samples (s) |")
    print("| --- | --- | --- | --- |")
    for name, samples in times.items():
        median = statistics.median(samples)
        shown = ", ".join(f"{s:.2f}" for s in sorted(samples))
        print(f"| {name} | {median:.2f} s | {median / reference:.2f}x | {shown} |")


if __name__ == "__main__":
    main()
