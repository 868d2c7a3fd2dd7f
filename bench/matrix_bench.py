"""100 matrix points against the same 100 targets written out by hand (goal: at most 1.2x).

    .venv/bin/python bench/matrix_bench.py [--points N] [--repeat N] [--no-write]

Two scratch projects run the same N trivial shell steps (`echo VALUE > out/VALUE.txt`):
one declares a single target with `matrix = { i = [0, ..., N-1] }`, the other
N targets `t_0` ... `t_N-1`, each with `params = { i = K }`. Timed: the whole
CLI process (`python -m mlbuild run -q`), first run in a fresh copy (nothing
built, no compiled pipeline yet) and a no-op run (everything fresh; the
compiled pipeline is reused), median of N rounds, the two projects alternating
within each round. Writes the `## Matrix targets` section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from report import replace_section  # noqa: E402

GOAL = 1.2


def matrix_pipeline(n: int) -> str:
    values = ", ".join(str(i) for i in range(n))
    return (
        "[targets.t]\n"
        'cmd = "echo {matrix.i} > {outputs.0}"\n'
        'outputs = ["out/{matrix.i}.txt"]\n'
        f"matrix = {{ i = [{values}] }}\n"
    )


def hand_pipeline(n: int) -> str:
    return "".join(
        f"[targets.t_{i}]\n"
        'cmd = "echo {params.i} > {outputs.0}"\n'
        f'outputs = ["out/{i}.txt"]\n'
        f"params = {{ i = {i} }}\n\n"
        for i in range(n)
    )


def run(root: Path, jobs: int) -> tuple[float, float]:
    """Wall seconds, and CPU seconds (user + system) of mlbuild and its steps."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "mlbuild", "run", "-q", "-j", str(jobs)],
        cwd=root,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = parser.parse_args()
    kinds = {"matrix": matrix_pipeline(args.points), "by hand": hand_pipeline(args.points)}
    first: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    noop: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="mlbuild-matrix-bench-") as scratch:
        for round_ in range(args.repeat):
            order = list(kinds) if round_ % 2 == 0 else list(reversed(kinds))
            for kind in order:
                root = Path(scratch) / f"{kind.replace(' ', '_')}-{round_}"
                root.mkdir()
                (root / "pipeline.toml").write_text(kinds[kind])
                first[kind].append(run(root, args.jobs))
                outputs = sorted(p.read_text() for p in (root / "out").iterdir())
                assert outputs == sorted(f"{i}\n" for i in range(args.points)), kind
                noop[kind].append(min(run(root, args.jobs) for _ in range(3)))  # best wall
                shutil.rmtree(root)
    rows = [
        "| run, median | matrix (1 target, N points) | by hand (N targets) | ratio | goal |",
        "| --- | --- | --- | --- | --- |",
    ]
    for scenario, samples in (("first run", first), ("no-op", noop)):
        for index, what in ((0, "wall"), (1, "CPU")):
            a = statistics.median(x[index] for x in samples["matrix"])
            b = statistics.median(x[index] for x in samples["by hand"])
            ratio = a / b
            rows.append(
                f"| {scenario}, {what} | {a * 1000:.0f} ms | {b * 1000:.0f} ms | {ratio:.2f}x |"
                f" {'met' if ratio <= GOAL else 'NOT met'} (<= {GOAL}x) |"
            )
    table = "\n".join(rows)
    print(table)
    if args.no_write:
        return
    body = [
        f"{args.points} trivial shell steps declared as one matrix target against the same"
        f" {args.points} targets written out by hand; whole CLI process (`mlbuild run -q"
        f" -j {args.jobs}`), median of {args.repeat} rounds (the no-op: best of 3 per"
        " round), wall time and CPU time (user + system of mlbuild and its steps, less"
        " disturbed by the other processes of a shared machine), measured with",
        "",
        f"    python bench/matrix_bench.py --points {args.points} --repeat {args.repeat}",
        "",
        f"on {platform.machine()}, Python {platform.python_version()}, {os.cpu_count()} cores"
        " shared with other helpers' test runs.",
        "",
        table,
        "",
        "The first run includes loading and expanding the pipeline (the matrix module is"
        " imported only then) and compiling it; the no-op reads the compiled pipeline,"
        " in which the points are ordinary targets, so both projects do the same work.",
    ]
    replace_section(HERE / "RESULTS.md", "Matrix targets", "\n".join(body), "Benchmarks")


if __name__ == "__main__":
    main()
