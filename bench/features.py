"""Feature benchmarks: Python-target no-op, -j scaling, cache restore against `cp -r`.

    .venv/bin/python bench/features.py [--repeat N] [--skip-big]

Runs mlbuild with the interpreter running this script (`python -m mlbuild`),
medians of N runs, and writes the `## Features` section of bench/RESULTS.md.
Goals checked (issue numbers in brackets):
- [3] no-op of 200 Python-function targets <= 1.5x the no-op of 200 shell targets;
- [5] 200 targets sleeping 50 ms: -j 2 takes <= 0.55x the time of -j 1;
- [4] restoring a 1 GB directory output (5,000 files) <= 2x `cp -r` of it.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report import replace_section  # noqa: E402

N = 200
BIG_FILES = 5000
BIG_FILE_SIZE = (1 << 30) // BIG_FILES


def env() -> dict[str, str]:
    """The user's environment, minus a setting that would recompile mlbuild on every run."""
    result = dict(os.environ)
    result.pop("PYTHONDONTWRITEBYTECODE", None)
    return result


def mlbuild(cwd: Path, *args: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "mlbuild", "run", "-q", *args],
        cwd=cwd,
        env=env(),
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"mlbuild failed in {cwd}:\n{proc.stdout}{proc.stderr}")
    return elapsed


def median_of(repeat: int, setup: Callable[[], None], measure: Callable[[], float]) -> float:
    samples = []
    for _ in range(repeat):
        setup()
        samples.append(measure())
    return statistics.median(samples)


def write_shell(ws: Path) -> None:
    (ws / "src").mkdir(parents=True)
    parts = []
    for i in range(N):
        (ws / f"src/{i}.txt").write_text(f"{i}\n")
        parts.append(
            f'[targets.t{i:03d}]\ncmd = "cp {{inputs.src}} {{outputs.dst}}"\n'
            f'inputs = {{ src = "src/{i}.txt" }}\noutputs = {{ dst = "out/{i}.txt" }}\n'
        )
    (ws / "pipeline.toml").write_text("\n".join(parts))


def write_python(ws: Path) -> None:
    (ws / "src").mkdir(parents=True)
    (ws / "steps").mkdir()
    (ws / "steps/__init__.py").write_text("")
    (ws / "steps/helpers.py").write_text("def transform(text):\n    return text.upper()\n")
    (ws / "steps/copy.py").write_text(
        "from steps.helpers import transform\n\n\n"
        "def copy(src, dst):\n    dst.write_text(transform(src.read_text()))\n"
    )
    parts = []
    for i in range(N):
        (ws / f"src/{i}.txt").write_text(f"{i}\n")
        parts.append(
            f'[targets.t{i:03d}]\npython = "steps.copy:copy"\n'
            f'inputs = {{ src = "src/{i}.txt" }}\noutputs = {{ dst = "out/{i}.txt" }}\n'
        )
    (ws / "pipeline.toml").write_text("\n".join(parts))


def write_sleepers(ws: Path) -> None:
    ws.mkdir(parents=True, exist_ok=True)
    parts = [
        f'[targets.s{i:03d}]\ncmd = "sleep 0.05; touch {{outputs}}"\noutputs = ["out/{i}"]\n'
        for i in range(N)
    ]
    (ws / "pipeline.toml").write_text("\n".join(parts))


def bench_python_noop(base: Path, repeat: int) -> tuple[float, float]:
    shell, python = base / "shell", base / "python"
    write_shell(shell)
    write_python(python)
    for ws in (shell, python):
        mlbuild(ws)
        mlbuild(ws)  # a second run settles racy stat entries of fresh outputs
    return (
        median_of(repeat, lambda: None, lambda: mlbuild(shell)),
        median_of(repeat, lambda: None, lambda: mlbuild(python)),
    )


def bench_jobs(base: Path, repeat: int) -> tuple[float, float]:
    ws = base / "sleep"
    write_sleepers(ws)

    def clean() -> None:
        shutil.rmtree(ws / ".mlbuild", ignore_errors=True)
        shutil.rmtree(ws / "out", ignore_errors=True)

    one = median_of(repeat, clean, lambda: mlbuild(ws, "-j", "1"))
    two = median_of(repeat, clean, lambda: mlbuild(ws, "-j", "2"))
    return one, two


def bench_restore(base: Path, repeat: int) -> tuple[float, float]:
    """Restore of a 1 GB directory output from the cache, against `cp -r` of the same tree."""
    ws = base / "big"
    ws.mkdir()
    source = base / "source"
    source.mkdir()
    for i in range(BIG_FILES):
        (source / f"f{i:04d}.bin").write_bytes(os.urandom(BIG_FILE_SIZE))
    (ws / "pipeline.toml").write_text(
        "[params]\nv = 1\n\n[targets.big]\n"
        f'cmd = "cp -r {source} {{outputs.d}}; echo {{params.v}} > {{outputs.d}}/v"\n'
        'outputs = { d = "big" }\nparams = ["v"]\n'
    )
    mlbuild(ws)  # v=1, stored in the cache
    mlbuild(ws, "--set", "v=2")

    def switch_back() -> float:
        elapsed = mlbuild(ws)  # v=1: restored
        mlbuild(ws, "--set", "v=2")  # v=2: restored too, ready for the next sample
        return elapsed

    restore = median_of(repeat, lambda: None, switch_back)
    copy_dest = base / "copy"

    def copy() -> float:
        shutil.rmtree(copy_dest, ignore_errors=True)
        start = time.perf_counter()
        subprocess.run(["cp", "-r", str(ws / "big"), str(copy_dest)], check=True)
        return time.perf_counter() - start

    cp = median_of(repeat, lambda: None, copy)
    return restore, cp


def row(label: str, ours: str, reference: str, ratio: float, goal: float) -> str:
    verdict = "met" if ratio <= goal else "NOT met"
    return f"| {label} | {ours} | {reference} | {ratio:.2f}x | <= {goal}x: {verdict} |"


def main() -> None:
    parser = argparse.ArgumentParser(description="mlbuild feature benchmarks")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip-big", action="store_true", help="skip the 1 GB restore")
    args = parser.parse_args()
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with "
        f"`python bench/features.py --repeat {args.repeat}`; medians of {args.repeat};"
        f" {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}.",
        "",
        "| measurement | mlbuild | reference | ratio | goal |",
        "| --- | --- | --- | --- | --- |",
    ]
    with tempfile.TemporaryDirectory(prefix="mlbuild-bench-") as tmp:
        base = Path(tmp)
        shell, python = bench_python_noop(base, args.repeat)
        lines.append(
            row(
                "no-op, 200 Python-function targets vs 200 shell targets",
                f"{python * 1000:.1f} ms",
                f"{shell * 1000:.1f} ms",
                python / shell,
                1.5,
            )
        )
        one, two = bench_jobs(base, args.repeat)
        lines.append(
            row(
                "200 targets sleeping 50 ms, -j 2 vs -j 1",
                f"{two:.2f} s",
                f"{one:.2f} s",
                two / one,
                0.55,
            )
        )
        overhead = (one - N * 0.05) / N
        lines.append(
            f"| overhead per target at -j 1: (wall - 200 x 50 ms) / 200 |"
            f" {overhead * 1000:.2f} ms | | | |"
        )
        if not args.skip_big:
            restore, cp = bench_restore(base, args.repeat)
            lines.append(
                row(
                    "restore 1 GB directory (5,000 files) from the cache vs `cp -r`",
                    f"{restore:.2f} s",
                    f"{cp:.2f} s",
                    restore / cp,
                    2.0,
                )
            )
    body = "\n".join(lines)
    print(body)
    replace_section(HERE / "RESULTS.md", "Features", body, "Benchmarks")


if __name__ == "__main__":
    main()
