"""Cost of the live view: a no-op against a baseline checkout, and a chatty step.

    .venv/bin/python bench/progress_bench.py --before /tmp/head [--repeat 10]
    .venv/bin/python bench/progress_bench.py --chatty 50 [--before /tmp/head] [--repeat 5]

`--before` is a checkout of the baseline commit (`git worktree add /tmp/head
HEAD`); nothing is installed from it: it runs as `python -m mlbuild` with
PYTHONPATH pointing at it, and this tree the same way, so both use the same
interpreter and packages. Each side gets its own copy of a 200-target shell
pipeline (bench/features.py's), built twice first so that racy stat entries
settle. Samples alternate between the two sides, so that drift of the machine
hits both alike. Measured:

- `mlbuild run -q` with output to a pipe (the goal: within 10% of before);
- `mlbuild run` on a pseudo-terminal, where this tree chooses the live
  reporter (it must not import rich on a no-op) and the baseline prints a line
  per target.

Each sample records wall time and the CPU time (user + system) of the
mlbuild process: on a machine shared with other work, CPU time shows the cost
of the code with much less noise than wall time.

Writes the `## Progress and history` section of bench/RESULTS.md.

With `--chatty MB`, measures instead one step that prints MB megabytes of
80-byte lines, forced to run, on a pseudo-terminal: `mlbuild run` (the live
view) against `mlbuild run --plain`, alternating, for this tree (and for the
`--before` tree when given). The goal is live <= 1.2x plain. It prints its
table and writes nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import pty
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from features import write_shell  # noqa: E402
from report import replace_section  # noqa: E402

GOAL = 1.10
CHATTY_GOAL = 1.20
CHATTY_STEP = """\
import sys

line = "step %08d loss 0.123456 accuracy 0.987654 lr 0.001000 ...................\\n"
write = sys.stdout.write
for i in range(int(sys.argv[1]) * 1_000_000 // 80):
    write(line % i)
"""


def side_env(tree: Path) -> dict[str, str]:
    """The user's environment with `tree` first on the path, writing bytecode as usual."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPATH"] = str(tree)
    return env


def check_import(tree: Path) -> None:
    """Fail unless `python -m mlbuild` with this environment really runs `tree`'s code."""
    where = subprocess.run(
        [sys.executable, "-c", "import mlbuild; print(mlbuild.__file__)"],
        env=side_env(tree),
        cwd="/",
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not where.startswith(str(tree) + os.sep):
        raise SystemExit(f"PYTHONPATH={tree} imports mlbuild from {where}")


def describe(tree: Path) -> str:
    """`commit abc1234` for a git checkout (with `+ changes` when its files differ)."""
    git = ["git", "-C", str(tree)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return str(tree)
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    ).stdout.strip()
    return f"commit {head.stdout.strip()}" + (" + uncommitted changes" if dirty else "")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_piped(tree: Path, ws: Path) -> tuple[float, float]:
    """Wall and CPU seconds of one `mlbuild run -q` with output to a pipe."""
    cpu = children_cpu()
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "mlbuild", "run", "-q"],
        cwd=ws,
        env=side_env(tree),
        capture_output=True,
        check=False,
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"mlbuild failed in {ws}:\n{proc.stdout!r}{proc.stderr!r}")
    return elapsed, children_cpu() - cpu


def run_on_terminal(tree: Path, ws: Path, *args: str) -> tuple[float, float]:
    """Wall and CPU seconds of `mlbuild run` on a pseudo-terminal, read until it exits."""
    leader, follower = pty.openpty()
    cpu = children_cpu()
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlbuild", "run", *args],
        cwd=ws,
        env=side_env(tree),
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    seen = bytearray()
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the terminal's other side is closed
            break
        if not chunk:
            break
        seen += chunk
    code = proc.wait()
    elapsed = time.perf_counter() - start
    os.close(leader)
    if code != 0:
        raise SystemExit(f"mlbuild failed on a terminal in {ws}:\n{seen.decode(errors='replace')}")
    return elapsed, children_cpu() - cpu


def write_chatty(ws: Path, megabytes: int) -> None:
    ws.mkdir(parents=True)
    (ws / "chatty.py").write_text(CHATTY_STEP)
    (ws / "pipeline.toml").write_text(
        "[targets.chatty]\n"
        f'cmd = "{sys.executable} chatty.py {megabytes} && echo done > {{outputs.done}}"\n'
        'outputs = { done = "done.txt" }\n'
    )


def chatty(trees: dict[str, Path], megabytes: int, repeat: int) -> None:
    """Live view against --plain for one step printing `megabytes` MB, per tree."""
    samples: dict[tuple[str, str], list[tuple[float, float]]] = {}
    modes = {"live": ("--force",), "plain": ("--force", "--plain")}
    with tempfile.TemporaryDirectory(prefix="mlbuild-chatty-bench-") as tmp:
        for side in trees:
            write_chatty(Path(tmp) / side, megabytes)
        for _ in range(repeat):
            for side, tree in trees.items():
                for mode, args in modes.items():
                    got = run_on_terminal(tree, Path(tmp) / side, *args)
                    samples.setdefault((side, mode), []).append(got)
    print(
        f"`mlbuild run --force` of one step printing {megabytes} MB of 80-byte lines, on a"
        f" pseudo-terminal; medians of {repeat}, modes alternating; {platform.node()},"
        f" {os.cpu_count()} CPUs, Python {platform.python_version()}.\n"
    )
    print("| tree | live view wall | --plain wall | live / plain | live CPU | plain CPU | goal |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for side, tree in trees.items():
        live = statistics.median(w for w, _ in samples[(side, "live")])
        plain = statistics.median(w for w, _ in samples[(side, "plain")])
        live_cpu = statistics.median(c for _, c in samples[(side, "live")])
        plain_cpu = statistics.median(c for _, c in samples[(side, "plain")])
        met = "met" if live / plain <= CHATTY_GOAL else "NOT met"
        print(
            f"| {side}: {describe(tree)} | {live:.2f} s | {plain:.2f} s | {live / plain:.2f}x"
            f" | {live_cpu:.2f} s | {plain_cpu:.2f} s | <= {CHATTY_GOAL}x: {met} |"
        )
    print("\nSamples, wall / CPU (s):")
    for (side, mode), values in samples.items():
        print(f"- {side}, {mode}: " + ", ".join(f"{w:.2f}/{c:.2f}" for w, c in values))


def main() -> None:
    parser = argparse.ArgumentParser(description="mlbuild live view: no-op and chatty-step cost")
    parser.add_argument("--before", type=Path, help="checkout of the baseline")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--chatty", type=int, metavar="MB", help="measure a step printing MB MB")
    args = parser.parse_args()
    if args.chatty is not None:
        trees = {"after": HERE.parent}
        if args.before is not None:
            trees = {"before": args.before.resolve(), **trees}
        for tree in trees.values():
            check_import(tree)
        return chatty(trees, args.chatty, args.repeat)
    if args.before is None:
        parser.error("--before is required (except with --chatty)")
    before, after = args.before.resolve(), HERE.parent
    for tree in (before, after):
        check_import(tree)
    # (kind, side) -> samples of (wall, cpu) seconds
    samples: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="mlbuild-progress-bench-") as tmp:
        spaces = {"before": Path(tmp) / "before", "after": Path(tmp) / "after"}
        trees = {"before": before, "after": after}
        for side, ws in spaces.items():
            write_shell(ws)
            run_piped(trees[side], ws)
            run_piped(trees[side], ws)  # settles racy stat entries of fresh outputs
        for _ in range(args.repeat):
            for side in ("before", "after"):
                ws, tree = spaces[side], trees[side]
                samples.setdefault(("piped", side), []).append(run_piped(tree, ws))
                samples.setdefault(("tty", side), []).append(run_on_terminal(tree, ws))

    def med(kind: str, side: str, which: int) -> float:
        return statistics.median(sample[which] for sample in samples[(kind, side)])

    def paired(kind: str, which: int) -> float:
        """Median of after/before within each round: drift of the machine cancels out."""
        pairs = zip(samples[(kind, "before")], samples[(kind, "after")], strict=True)
        return statistics.median(a[which] / b[which] for b, a in pairs)

    def least(kind: str, side: str, which: int) -> float:
        return min(sample[which] for sample in samples[(kind, side)])

    def row(label: str, kind: str, which: int, goal: str, pick: str = "median") -> str:
        take = med if pick == "median" else least
        b, a = take(kind, "before", which), take(kind, "after", which)
        if goal == "check":
            goal = f"<= {GOAL}x: {'met' if a / b <= GOAL else 'NOT met'}"
        return f"| {label} | {b * 1000:.1f} ms | {a * 1000:.1f} ms | {a / b:.3f}x | {goal} |"

    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with"
        f" `python bench/progress_bench.py --before <checkout of the baseline> --repeat"
        f" {args.repeat}`; medians of {args.repeat}, before and after alternating;"
        f" {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}."
        " No-op of 200 shell targets (bench/features.py's pipeline)."
        f" Before: {describe(before)}; after: {describe(after)}.",
        "",
        "| measurement | before | after | after / before | goal |",
        "| --- | --- | --- | --- | --- |",
        row("`mlbuild run -q` to a pipe, wall time", "piped", 0, "check"),
        row("`mlbuild run -q` to a pipe, CPU time", "piped", 1, "check"),
        row("`mlbuild run -q` to a pipe, CPU time, fastest sample", "piped", 1, "", "min"),
        f"| `mlbuild run -q` to a pipe, CPU time, median of the {args.repeat} paired ratios"
        f" | | | {paired('piped', 1):.3f}x | |",
        row("`mlbuild run` on a pseudo-terminal, wall time", "tty", 0, "(for information)"),
        row("`mlbuild run` on a pseudo-terminal, CPU time", "tty", 1, "(for information)"),
        "",
        "Medians except where marked. The machine was shared with other work (other"
        " benchmarks), which shows in the spread of the samples below; the fastest sample"
        " is the one least disturbed, and the paired ratio compares the before and after"
        " samples of the same round, taken a fraction of a second apart.",
        "",
        "On a terminal, before prints one line per skipped target; after chooses the live"
        " reporter, which prints only the summary on a no-op and never imports rich (rich is"
        " imported when a step starts or a line is drawn).",
        "",
        "Samples, wall / CPU (ms):",
        "",
    ]
    for (kind, side), values in sorted(samples.items()):
        shown = ", ".join(f"{w * 1000:.0f}/{c * 1000:.0f}" for w, c in values)
        lines.append(f"- {kind}, {side}: {shown}")
    body = "\n".join(lines)
    print(body)
    replace_section(HERE / "RESULTS.md", "Progress and history", body, "Benchmarks")


if __name__ == "__main__":
    main()
