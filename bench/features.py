"""Feature benchmarks: Python-target no-op, -j scaling, cache restore against `cp -r`.

    .venv/bin/python bench/features.py [--repeat N] [--skip-big] [--only many,sparse]

Runs mlbuild with the interpreter running this script (`python -m mlbuild`),
medians of N runs, and writes the `## Features` section of bench/RESULTS.md.
Goals checked (issue numbers in brackets):
- [3] no-op of 200 Python-function targets <= 1.5x the no-op of 200 shell targets;
- [5] 200 targets sleeping 50 ms: -j 2 takes <= 0.55x the time of -j 1;
- [4] restoring a 1 GB directory output (5,000 files) <= 2x `cp -r` of it;
- a 100,000-file directory output: first run, no-op, switching back to a cached
  configuration (restored, or run again when that is cheaper) against `cp -r`,
  and a forced restore of it (a step slow enough that restoring pays);
- a 1 GiB sparse file: disk use of its cache object and of the restored file.
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
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report import replace_section  # noqa: E402

N = 200
BIG_FILES = 5000
BIG_FILE_SIZE = (1 << 30) // BIG_FILES
MANY_FILES = 100_000
SLOW_STEP_SECONDS = 25  # the forced-restore variant: longer than any restore of MANY_FILES
SPARSE_SIZE = 1 << 30
SPARSE_DATA = [(0, 8 << 20), (512 << 20, 8 << 20), (SPARSE_SIZE - (1 << 20), 1 << 20)]

# Writes MANY_FILES small files in 100 folders under argv[1] (the step of the 100,000-file bench).
MAKE_MANY = """import os, sys
out = sys.argv[1]
for d in range(100):
    os.makedirs(f"{out}/d{d:02d}")
    for i in range(PER_FOLDER):
        with open(f"{out}/d{d:02d}/f{i:04d}.txt", "w") as f:
            f.write(f"file {d} {i}\\n" * 4)
""".replace("PER_FOLDER", str(MANY_FILES // 100))

# Writes a SPARSE_SIZE file whose only data are the SPARSE_DATA extents (random bytes).
MAKE_SPARSE = f"""import os, sys
with open(sys.argv[1], "wb") as f:
    f.truncate({SPARSE_SIZE})
    for offset, length in {SPARSE_DATA!r}:
        f.seek(offset)
        f.write(os.urandom(length))
"""


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


def mlbuild_out(cwd: Path, *args: str) -> tuple[float, str]:
    """Like `mlbuild`, with what it printed (plain, not quiet): the bench says what happened."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "mlbuild", "run", "--plain", *args],
        cwd=cwd,
        env=env(),
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"mlbuild failed in {cwd}:\n{proc.stdout}{proc.stderr}")
    return elapsed, proc.stdout + proc.stderr


def what_happened(output: str, target: str) -> str:
    """`restored`, `ran` or `skipped`, from mlbuild's plain output for `target`."""
    if f"`{target}` restored from" in output:
        return "restored"
    if f"`{target}` has started" in output:
        return "ran"
    return "skipped"


def many_pipeline(ws: Path, sleep: int) -> None:
    (ws / "make_many.py").write_text(MAKE_MANY)
    (ws / "pipeline.toml").write_text(
        "[params]\nv = 1\n\n[targets.many]\n"
        f'cmd = "sleep {sleep}; {sys.executable} make_many.py {{outputs.d}};'
        ' echo {params.v} > {outputs.d}/v"\n'
        'outputs = { d = "many" }\nparams = ["v"]\n'
    )


def bench_many(base: Path, repeat: int) -> dict[str, Any]:
    """The 100,000-file directory: first run, no-op, switch back, `cp -r`; forced restore."""
    ws = base / "many"
    ws.mkdir()
    many_pipeline(ws, 0)
    found: dict[str, Any] = {}

    def fresh() -> None:
        shutil.rmtree(ws / ".mlbuild", ignore_errors=True)
        shutil.rmtree(ws / "many", ignore_errors=True)

    found["first"] = median_of(repeat, fresh, lambda: mlbuild(ws))
    mlbuild(ws)  # settles racy stat entries
    found["noop"] = median_of(repeat, lambda: None, lambda: mlbuild(ws))
    mlbuild(ws, "--set", "v=2")
    outcomes: list[str] = []

    def switch_back() -> float:
        elapsed, out = mlbuild_out(ws)  # v=1: restored or run again
        outcomes.append(what_happened(out, "many"))
        mlbuild(ws, "--set", "v=2")
        return elapsed

    found["switch"] = median_of(repeat, lambda: None, switch_back)
    found["switch_outcomes"] = outcomes
    copy_dest = base / "many-copy"

    def copy() -> float:
        shutil.rmtree(copy_dest, ignore_errors=True)
        start = time.perf_counter()
        subprocess.run(["cp", "-r", str(ws / "many"), str(copy_dest)], check=True)
        return time.perf_counter() - start

    found["cp"] = median_of(repeat, lambda: None, copy)
    shutil.rmtree(copy_dest, ignore_errors=True)
    # The same tree behind a step that sleeps first: restoring it is the cheaper choice.
    slow = base / "many-slow"
    slow.mkdir()
    many_pipeline(slow, SLOW_STEP_SECONDS)
    mlbuild(slow)
    mlbuild(slow, "--set", "v=2")
    forced: list[str] = []

    def restore() -> float:
        elapsed, out = mlbuild_out(slow)
        forced.append(what_happened(out, "many"))
        mlbuild_out(slow, "--set", "v=2")
        return elapsed

    found["restore"] = median_of(repeat, lambda: None, restore)
    found["restore_outcomes"] = forced
    shutil.rmtree(ws, ignore_errors=True)
    shutil.rmtree(slow, ignore_errors=True)
    return found


def disk_use(path: Path) -> int:
    """Bytes of disk a file takes (allocated blocks), not its length."""
    return os.stat(path).st_blocks * 512


def bench_sparse(base: Path, repeat: int) -> dict[str, Any]:
    """A 1 GiB sparse file: disk use in the cache and after a restore, restore time."""
    ws = base / "sparse"
    ws.mkdir()
    (ws / "make_sparse.py").write_text(MAKE_SPARSE)
    (ws / "pipeline.toml").write_text(
        "[params]\nv = 1\n\n[targets.sparse]\n"
        f'cmd = "sleep {SLOW_STEP_SECONDS}; {sys.executable} make_sparse.py {{outputs.f}};'
        ' echo {params.v} > {outputs.v}"\n'
        'outputs = { f = "sparse.bin", v = "v.txt" }\nparams = ["v"]\n'
    )
    mlbuild(ws)
    found: dict[str, Any] = {"built": disk_use(ws / "sparse.bin")}
    objects = [p for p in (ws / ".mlbuild/cache/objects").rglob("*") if p.is_file()]
    found["cached"] = max(disk_use(p) for p in objects)
    mlbuild(ws, "--set", "v=2")
    outcomes: list[str] = []

    def restore() -> float:
        elapsed, out = mlbuild_out(ws)
        outcomes.append(what_happened(out, "sparse"))
        mlbuild(ws, "--set", "v=2")
        return elapsed

    found["restore"] = median_of(repeat, lambda: None, restore)
    found["restore_outcomes"] = outcomes
    mlbuild(ws)
    found["restored"] = disk_use(ws / "sparse.bin")
    shutil.rmtree(ws, ignore_errors=True)
    return found


def mib(n: int) -> str:
    return f"{n / (1 << 20):,.0f} MiB"


def row(label: str, ours: str, reference: str, ratio: float, goal: float) -> str:
    verdict = "met" if ratio <= goal else "NOT met"
    return f"| {label} | {ours} | {reference} | {ratio:.2f}x | <= {goal}x: {verdict} |"


def main() -> None:
    parser = argparse.ArgumentParser(description="mlbuild feature benchmarks")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip-big", action="store_true", help="skip the 1 GB restore")
    parser.add_argument(
        "--only", help="comma-separated parts: noop, jobs, big, many, sparse (default: all)"
    )
    args = parser.parse_args()
    parts = set(args.only.split(",")) if args.only else {"noop", "jobs", "big", "many", "sparse"}
    if args.skip_big:
        parts.discard("big")
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with "
        f"`python bench/features.py --repeat {args.repeat}"
        f"{' --only ' + args.only if args.only else ''}`; medians of {args.repeat};"
        f" {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}.",
        "",
        "| measurement | mlbuild | reference | ratio | goal |",
        "| --- | --- | --- | --- | --- |",
    ]
    with tempfile.TemporaryDirectory(prefix="mlbuild-bench-") as tmp:
        base = Path(tmp)
        if "noop" in parts:
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
        if "jobs" in parts:
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
        if "big" in parts:
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
        if "many" in parts:
            many = bench_many(base, args.repeat)
            cp = many["cp"]
            outcomes = ", ".join(many["switch_outcomes"])
            lines += [
                f"| 100,000-file directory: first run (step + cache save) | {many['first']:.2f} s"
                " | | | |",
                f"| 100,000-file directory: no-op | {many['noop'] * 1000:.0f} ms | | | |",
                f"| 100,000-file directory: back to a cached configuration ({outcomes})"
                f" vs `cp -r` | {many['switch']:.2f} s | {cp:.2f} s | {many['switch'] / cp:.2f}x"
                " | |",
                f"| 100,000-file directory: restore, step sleeping {SLOW_STEP_SECONDS} s first"
                f" ({', '.join(many['restore_outcomes'])}) vs `cp -r` | {many['restore']:.2f} s"
                f" | {cp:.2f} s | {many['restore'] / cp:.2f}x | |",
            ]
        if "sparse" in parts:
            sparse = bench_sparse(base, args.repeat)
            data = sum(n for _, n in SPARSE_DATA)
            lines += [
                f"| 1 GiB sparse file ({mib(data)} of data): disk use built / cache object /"
                f" restored | {mib(sparse['built'])} / {mib(sparse['cached'])} /"
                f" {mib(sparse['restored'])} | | | |",
                f"| 1 GiB sparse file: restore ({', '.join(sparse['restore_outcomes'])})"
                f" | {sparse['restore']:.2f} s | | | |",
            ]
    body = "\n".join(lines)
    print(body)
    if not args.only:  # a partial run never replaces the whole section
        replace_section(HERE / "RESULTS.md", "Features", body, "Benchmarks")


if __name__ == "__main__":
    main()
