"""Scale bench (issue 14): mlbuild against make, ninja and doit from 200 to 100,000 targets.

Wide pipelines of trivial copy targets (and a 200-target chain), each tool run as
a user would (the rules of bench/run.py, whose workspaces, checks and timer this
reuses), plus mlbuild's read-only commands, its peak memory on a no-op and the
watch mode's write-to-start latency. The mlbuild under test comes from
--mlbuild-src (default: the checkout this script is in), copied and byte-compiled,
so the same bench compares branches:

    python bench/scale.py --sizes 200,1000,10000 --label before
    python bench/scale.py --mlbuild-src /work/wt/scale --label after --no-write

It re-executes itself under the bench venv (bench/.venv: doit, snakemake, dvc and
mlbuild's dependencies), and writes the `## Scale: LABEL` section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

import pipelines as pl  # noqa: E402
import report  # noqa: E402
import run as engine  # noqa: E402
import watch_bench  # noqa: E402
from report import Measurement, Results, Row  # noqa: E402
from venv_setup import VenvInfo, ensure_venv  # noqa: E402

DEFAULT_SIZES = "200,1000,10000,100000"
# Largest wide pipeline each tool runs by default. Past these a peer's runs take many
# minutes each on this 2-core machine (doit's first run at 10,000 targets: ~20 s, a
# no-op ~1 s, so ~4 min and ~10 s at 100,000; snakemake's 200-target no-op is 1.5 s and
# its DAG work grows faster than the targets; DVC rewrites dvc.lock after every stage,
# quadratic: 80 s for 200 stages).
MAX_SIZE = {
    "mlbuild": 100_000,
    "make": 100_000,
    "ninja": 100_000,
    "doit": 10_000,
    "snakemake": 1_000,
    "dvc": 200,
}
WHY_SKIPPED = {
    "doit": "its first run would take minutes (about 20 s at 10,000)",
    "snakemake": "its DAG work grows faster than the targets (1.5 s no-op at 200)",
    "dvc": "it rewrites dvc.lock after each stage (quadratic: 80 s for 200 stages)",
}
# mlbuild's read-only commands, timed in a built workspace; "{one}" is a middle target.
COMMANDS: dict[str, list[str]] = {
    "status": ["status"],
    "list": ["list"],
    "dag --status": ["dag", "--status"],
    "show one": ["show", "{one}"],
}
BASELINE = 1  # the 1-target pipeline whose times are each command's start-up
PER_TARGET_SIZES = (1_000, 10_000, 100_000)
WATCH_WRITES = 5


# ---------------------------------------------------------------- the mlbuild under test


def install_under_test(src: Path) -> tuple[Path, str]:
    """Copy src's mlbuild/ (work tree as it is) into the bench, byte-compiled.

    The copy, on PYTHONPATH ahead of the venv's editable install, is what every
    mlbuild process imports; compiling it first keeps the first timed run from
    paying for bytecode (this environment sets PYTHONDONTWRITEBYTECODE, which the
    timed processes run without).
    """
    package = src / "mlbuild"
    if not (package / "__init__.py").is_file():
        raise SystemExit(f"scale bench: {package} is not an mlbuild package")
    dest = engine.WORK / "mlbuild-under-test"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(package, dest / "mlbuild", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(dest)], check=True)
    rev = subprocess.run(
        ["git", "-C", str(src), "log", "-1", "--format=%h %s"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(src), "status", "--porcelain", "--", "mlbuild"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    branch = subprocess.run(
        ["git", "-C", str(src), "branch", "--show-current"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    where = f"{src} (branch {branch or '?'}, {rev or 'no git revision'}"
    where += ", plus uncommitted changes to mlbuild/)" if dirty else ")"
    return dest, where


def use_under_test(tree: Path) -> None:
    """Every timed process (run.py's ENV) and the watcher (os.environ) import `tree`."""
    for env in (engine.ENV, os.environ):
        env["PYTHONPATH"] = str(tree)
        env.pop("PYTHONDONTWRITEBYTECODE", None)


# ---------------------------------------------------------------- measuring


def with_jobs(tool: engine.Tool, jobs: int) -> engine.Tool:
    """run.py's argv for `tool` with `jobs` parallel steps (DVC has no parallel repro)."""
    argv = list(tool.argv)
    if tool.name in ("mlbuild", "snakemake"):
        argv[-1] = str(jobs)
    elif tool.name in ("make", "ninja"):
        argv[-1] = f"-j{jobs}"
    elif tool.name == "doit" and jobs > 1:
        argv += ["-n", str(jobs)]
    return engine.Tool(tool.name, argv, tool.version)


def timed_rss(argv: list[str], cwd: Path) -> tuple[float, int]:
    """Wall time and peak resident memory (bytes) of one process, from wait4's rusage."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=engine.ENV,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    timer = threading.Timer(engine.RUN_TIMEOUT, proc.kill)
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    elapsed = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise engine.BenchError(f"exit {proc.returncode}")
    return elapsed, usage.ru_maxrss * 1024  # Linux reports KiB


class Cells:
    """Results of the whole bench: medians per (pipeline, scenario, tool), peaks, skips."""

    def __init__(self, repeat: int, budget: float) -> None:
        self.repeat = repeat
        self.budget = budget
        self.results: Results = {}
        self.rows: list[Row] = []
        self.rss: dict[int, int] = {}
        self.skipped: list[str] = []

    def measure(
        self, pipe: str, scenario: str, label: str, runs: Mapping[str, Callable[[], float]], n: int
    ) -> set[str]:
        """Up to `n` samples of each tool's run, taken in rounds (tool after tool).

        Rounds rather than one tool's samples in a row: on this shared machine a
        burst of load then hits every tool alike instead of one tool's whole cell.
        A tool stops early once one more sample would take its cell past the budget,
        or at its first failure. Returns the tools that did not fail.
        """
        if Row(pipe, scenario, label) not in self.rows:
            self.rows.append(Row(pipe, scenario, label))
        cells = {tool: Measurement() for tool in runs}
        for tool, m in cells.items():
            self.results.setdefault((pipe, scenario), {})[tool] = m
        for _ in range(n):
            for tool, once in runs.items():
                m = cells[tool]
                if m.error is not None or sum(m.samples) + max(m.samples, default=0) > self.budget:
                    continue
                try:
                    m.samples.append(once())
                except (engine.BenchError, subprocess.TimeoutExpired) as exc:
                    m.error = f"{scenario}: {exc}"
        for tool, m in cells.items():
            status = m.error or f"median {report.fmt_ms(m.median)} (n={len(m.samples)})"
            print(f"  {pipe:11s} {tool:10s} {label:22s} {status}", flush=True)
        return {tool for tool, m in cells.items() if m.error is None}

    def median(self, pipe: str, scenario: str, tool: str) -> float | None:
        m = self.results.get((pipe, scenario), {}).get(tool)
        return m.median if m else None


def bench_pipeline(
    p: pl.Pipeline, tools: list[engine.Tool], cells: Cells, commands_max: int
) -> None:
    """First runs, then no-ops and (wide) one change in rounds; mlbuild's commands and RSS."""
    size = len(p.targets)
    jobs = 1 if size <= 200 else 2
    tools = [with_jobs(t, jobs) for t in tools]
    spaces = {t.name: engine.prepare_workspace(p, t) for t in tools}
    first_n = cells.repeat if size <= 1_000 else 1  # a big first run is minutes; once
    ok: set[str] = set()
    for tool in tools:  # one tool at a time: a first run at -j2 wants both cores
        first = functools.partial(engine.run_first, p, tool, spaces[tool.name])
        ok |= cells.measure(p.name, "first", f"first run (-j{jobs})", {tool.name: first}, first_n)
    built = [t for t in tools if t.name in ok]
    ok = cells.measure(
        p.name,
        "noop",
        "no-op",
        {t.name: functools.partial(engine.run_noop, p, t, spaces[t.name]) for t in built},
        cells.repeat,
    )
    ml = next((t for t in built if t.name == "mlbuild" and t.name in ok), None)
    if ml is not None and size <= commands_max:
        one = p.targets[size // 2].name
        for scenario, args in COMMANDS.items():
            words = [a.format(one=one) for a in args]
            argv = [*ml.argv[:-3], *words]  # ml.argv ends with `run -j N`
            once = functools.partial(engine.timed_run, argv, spaces[ml.name])
            cells.measure(p.name, scenario, f"`{' '.join(words)}`", {ml.name: once}, cells.repeat)
    if ml is not None and not p.name.startswith("chain"):
        try:
            _, cells.rss[size] = timed_rss(ml.argv, spaces[ml.name])
        except engine.BenchError as exc:
            print(f"  peak RSS of the no-op: {exc}", flush=True)
    if not p.name.startswith("chain"):
        changes = {
            t.name: functools.partial(engine.make_change_runner(), p, t, spaces[t.name])
            for t in built
            if t.name in ok
        }
        cells.measure(p.name, "change", "one input changed", changes, cells.repeat)
    for ws in spaces.values():
        shutil.rmtree(ws, ignore_errors=True)


def watch_latency(size: int, writes: int) -> tuple[list[float], str | None]:
    """Write-to-step-start latency of `mlbuild watch -j 2` on a built wide pipeline.

    Reuses watch_bench's Watcher (timestamped stdout lines of the watcher process,
    which imports the mlbuild under test through PYTHONPATH).
    """
    p = pl.wide(size)
    with tempfile.TemporaryDirectory(prefix="mlbuild-scale-watch-", dir=engine.WORK) as tmp:
        root = Path(tmp)
        for rel, text in {**pl.render_mlbuild(p), **p.sources}.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
        (root / "out").mkdir()
        watcher = watch_bench.Watcher(root, "-j", "2")
        samples: list[float] = []
        try:
            watcher.wait_for("waiting for changes.", timeout=engine.RUN_TIMEOUT)
            for i in range(writes):
                target = p.targets[(i * 37 + 11) % size]
                time.sleep(0.3)
                before = time.perf_counter()
                (root / target.inputs[0]).write_text(f"watch write {i}\n")
                started = watcher.wait_for(f"Step `{target.name}` has started", timeout=120)
                samples.append(started - before)
                watcher.wait_for("waiting for changes.", timeout=120)
        except SystemExit as exc:  # Watcher.wait_for gives up with SystemExit
            return samples, str(exc)
        finally:
            try:
                watcher.stop()
            except subprocess.TimeoutExpired:
                watcher.proc.kill()
                watcher.proc.wait()
        return samples, None


def watch_only(sizes: list[int], writes: int, load_before: str) -> int:
    """`--watch-only`: the watch latency at each size, printed (median, samples, load)."""
    for size in sizes:
        samples, error = watch_latency(size, writes)
        ms = ", ".join(f"{s * 1000:.0f}" for s in samples)
        median = f"{statistics.median(samples) * 1000:.0f} ms" if samples else "-"
        print(f"  watch wide{size}: median {median} of {len(samples)}; ms: {ms}", flush=True)
        if error:
            print(f"  watch wide{size}: {error}", flush=True)
    print(f"  load average before: {load_before}; after: {engine.load_average()}", flush=True)
    shutil.rmtree(engine.WORK, ignore_errors=True)
    return 0


# ---------------------------------------------------------------- goals and tables


def per_target(cells: Cells, size: int, pipe: str, scenario: str, tool: str) -> float | None:
    """(median at `size` - median of the 1-target pipeline) / size, in seconds."""
    big = cells.median(pipe, scenario, tool)
    small = cells.median(f"wide{BASELINE}", scenario, tool)
    if big is None or small is None:
        return None
    return (big - small) / size


def evaluate_goals(cells: Cells, watch: list[float]) -> list[tuple[str, str, str]]:
    """Issue 14's goals as (goal, verdict, numbers); verdict: met, NOT met, not measured."""
    goals: list[tuple[str, str, str]] = []
    ml = "mlbuild"

    def add(goal: str, value: float | None, limit: float, detail: str) -> None:
        if value is None:
            goals.append((goal, "not measured", detail or "-"))
        else:
            goals.append((goal, "met" if value <= limit else "NOT met", detail))

    def ratio(goal: str, pipe: str, scen: str, peer: str, limit: float) -> None:
        a, b = cells.median(pipe, scen, ml), cells.median(pipe, scen, peer)
        r = a / b if a is not None and b is not None else None
        detail = f"{r:.2f}x ({report.fmt_ms(a)} vs {report.fmt_ms(b)})" if r is not None else ""
        add(goal, r, limit, detail)

    def under(goal: str, pipe: str, scen: str, limit: float) -> None:
        a = cells.median(pipe, scen, ml)
        add(goal, a, limit, report.fmt_ms(a) if a is not None else "")

    for pipe in ("chain200", "wide200"):
        ratio(f"{pipe} no-op <= 0.35x doit", pipe, "noop", "doit", 0.35)
        under(f"{pipe} no-op < 40 ms", pipe, "noop", 0.040)
    ratio("wide10000 no-op <= 0.3x doit", "wide10000", "noop", "doit", 0.3)
    under("wide100000 no-op < 3 s", "wide100000", "noop", 3.0)
    rss = cells.rss.get(100_000)
    add(
        "wide100000 no-op peak RSS < 500 MB",
        None if rss is None else rss / 1e6,
        500,
        f"{rss / 1e6:.0f} MB" if rss is not None else "",
    )
    for size in PER_TARGET_SIZES:
        cost = per_target(cells, size, f"wide{size}", "noop", ml)
        detail = f"{cost * 1e6:.1f} µs/target" if cost is not None else ""
        add(f"wide{size} no-op beyond start-up <= 20 µs/target", cost, 20e-6, detail)
    ratio("wide10000 one input changed <= 0.3x doit", "wide10000", "change", "doit", 0.3)
    for pipe in ("chain200", "wide200"):
        ratio(f"{pipe} first run -j1 <= 1.3x make", pipe, "first", "make", 1.3)
    ratio("wide10000 first run -j2 <= 1.3x ninja", "wide10000", "first", "ninja", 1.3)
    for scenario in COMMANDS:
        under(f"wide10000 `{scenario}` < 0.5 s", "wide10000", scenario, 0.5)
    lat = statistics.median(watch) if watch else None
    add(
        "watch, 10,000 targets: write to step start <= 300 ms",
        lat,
        watch_bench.LATENCY_LIMIT,
        f"{lat * 1000:.0f} ms (median of {len(watch)})" if lat is not None else "",
    )
    return goals


def per_target_table(cells: Cells, tools: list[str]) -> str:
    """Cost per target beyond start-up for each wide scenario measured at 1k/10k/100k."""
    header = ["tool", "scenario", *(f"{s:,}" for s in PER_TARGET_SIZES)]
    body: list[list[str]] = []
    for tool in tools:
        for scenario in ("noop", "change", *COMMANDS):
            costs = [per_target(cells, s, f"wide{s}", scenario, tool) for s in PER_TARGET_SIZES]
            if all(c is None for c in costs):
                continue
            label = {"noop": "no-op", "change": "one input changed"}.get(scenario, scenario)
            body.append([tool, label, *("-" if c is None else f"{c * 1e6:.1f} µs" for c in costs)])
    return report._table(header, body)


def render(
    args: argparse.Namespace,
    command: str,
    where: str,
    tools: list[engine.Tool],
    cells: Cells,
    watch: tuple[list[float], str | None] | None,
    loads: tuple[str, str],
    seconds: float,
) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    names = [t.name for t in tools]
    peers = [n for n in names if n != "mlbuild"]
    out = [
        f"Measured {now} with `{command}`; the mlbuild under test: {where}.",
        "",
        *engine.machine_lines(tools),
        f"- nproc: {os.cpu_count()}; load average (1/5/15 min) before: {loads[0]}; "
        f"after: {loads[1]} (a shared machine: other jobs ran beside the bench).",
        f"- whole bench: {seconds / 60:.1f} min",
        "",
        f"Wall time of the whole CLI process, output to /dev/null, median of {args.repeat} "
        f"runs (fewer, shown as (n=...), where one more would take a cell past "
        f"{args.cell_budget:.0f} s; first runs at 10,000 targets and more run once). "
        "wideN: target i copies src/i.txt to out/i.txt; chain200: target i copies target "
        "i-1's output. Steps run with -j1 up to 200 targets and -j2 above (make -jN, ninja "
        "-jN, doit -n N, snakemake --cores N, mlbuild -j N; dvc repro is serial). As in the "
        f"engine bench (run.py): {engine.PEERS_NOTE} mlbuild's "
        "`status`, `list`, `dag --status` and `show` (of the middle target) run in the "
        "built workspace. wide1 is the start-up baseline for the cost per target. No-op "
        "and one-change samples are taken in rounds, tool after tool, so that the load of "
        "other jobs on this shared machine hits every tool alike; first runs go one tool at "
        "a time (a -j2 run wants both cores), so their ratios move with the load more.",
        "",
    ]
    if cells.skipped:
        out += [*(f"- not run: {s}" for s in cells.skipped), ""]
    out += ["### Median wall time", ""]
    out += [report.times_table(cells.rows, names, cells.results, args.repeat), ""]
    if "mlbuild" in names and peers:
        out += ["### mlbuild / peer (below 1: mlbuild is faster)", ""]
        compared = [r for r in cells.rows if r.scenario not in COMMANDS]
        out += [report.ratio_table(compared, peers, cells.results, inverse=True), ""]
    out += [
        "### Cost per target beyond start-up",
        "",
        "(median at N - median of the 1-target pipeline) / N.",
        "",
        per_target_table(cells, names),
        "",
    ]
    if cells.rss:
        out += ["### mlbuild no-op: peak resident memory (wait4 ru_maxrss)", ""]
        out += ["| targets | peak RSS |", "|---|---|"]
        out += [f"| {s:,} | {b / 1e6:.0f} MB |" for s, b in sorted(cells.rss.items())]
        out.append("")
    if watch is not None:
        samples, error = watch
        ms = ", ".join(f"{s * 1000:.0f}" for s in samples)
        out += [
            f"### Watch mode, {args.watch_size:,} targets",
            "",
            f"`mlbuild watch -j 2` (default debounce) on a built wide{args.watch_size}: time "
            "from writing new bytes to one input until the watcher prints that target's "
            f"step starting (bench/watch_bench.py's Watcher). Samples (ms): {ms or 'none'}"
            + (f"; stopped: {error}" if error else "")
            + ".",
            "",
        ]
    goals = evaluate_goals(cells, watch[0] if watch else [])
    out += ["### Issue 14's goals", "", "| goal | verdict | numbers |", "|---|---|---|"]
    out += [f"| {g} | {v} | {d} |" for g, v, d in goals]
    out += [
        "",
        "<details><summary>All samples</summary>",
        "",
        report.samples_table(cells.rows, names, cells.results),
        "",
        "</details>",
    ]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- driver


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help="comma list of wide sizes")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per cell (median)")
    ap.add_argument("--only", default="", help=f"comma list out of {','.join(pl.TOOLS)}")
    ap.add_argument(
        "--max",
        action="append",
        default=[],
        metavar="TOOL=N",
        help="largest size to run TOOL at (defaults: "
        + ", ".join(f"{k}={v}" for k, v in MAX_SIZE.items())
        + ")",
    )
    ap.add_argument("--cell-budget", type=float, default=120.0, help="seconds per cell")
    ap.add_argument("--timeout", type=float, default=engine.RUN_TIMEOUT, help="per process")
    ap.add_argument(
        "--commands-max",
        type=int,
        default=100_000,
        help="largest size at which mlbuild's status/list/dag/show are timed",
    )
    ap.add_argument("--no-chain", action="store_true", help="skip chain200")
    ap.add_argument(
        "--watch-size",
        type=int,
        default=None,
        help="watch-mode pipeline size (default 10000 when that size is run; 0: skip)",
    )
    ap.add_argument(
        "--watch-only",
        action="store_true",
        help="measure only watch mode, at each of --sizes; prints, writes nothing",
    )
    ap.add_argument("--watch-writes", type=int, default=WATCH_WRITES, help="writes per watch size")
    ap.add_argument("--mlbuild-src", type=Path, default=REPO, help="checkout to test")
    ap.add_argument("--label", default="", help="RESULTS.md section is `Scale: LABEL`")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    try:
        args.size_list = sorted({int(s.replace("_", "")) for s in args.sizes.split(",") if s})
    except ValueError:
        ap.error(f"--sizes: not a comma list of numbers: {args.sizes}")
    names = [x.strip() for x in args.only.split(",") if x.strip()] or list(pl.TOOLS)
    bad = [x for x in names if x not in pl.TOOLS]
    if bad:
        ap.error(f"unknown tool(s) {bad}; choose from {','.join(pl.TOOLS)}")
    args.tools = [t for t in pl.TOOLS if t in names]
    if args.watch_size is None:
        args.watch_size = 10_000 if 10_000 in args.size_list else 0
    args.max_size = dict(MAX_SIZE)
    for item in args.max:
        tool, _, num = item.partition("=")
        if tool not in MAX_SIZE or not num.isdigit():
            ap.error(f"--max {item}: want TOOL=N with TOOL one of {','.join(pl.TOOLS)}")
        args.max_size[tool] = int(num)
    return args


def in_bench_venv(argv: list[str]) -> VenvInfo:
    """Re-execute under the bench venv's Python (peers, mlbuild's dependencies) if needed."""
    info = ensure_venv(engine.VENV, REPO)
    if not info.mlbuild_ok:
        raise SystemExit(f"scale bench: {info.mlbuild_note}")
    if Path(sys.prefix).resolve() != engine.VENV.resolve():
        os.execv(info.python, [str(info.python), str(Path(__file__).resolve()), *argv])
    return info


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    info = in_bench_venv(argv)
    command = "python bench/scale.py " + shlex.join(argv)
    engine.RUN_TIMEOUT = args.timeout
    # A directory of this run's own, so that two benches (a smoke run beside a long
    # one) never delete each other's workspaces or the mlbuild under test.
    engine.WORK = engine.WORK / f"scale-{os.getpid()}"
    engine.WORK.mkdir(parents=True)
    started, load_before = time.perf_counter(), engine.load_average()
    tree, where = install_under_test(args.mlbuild_src.resolve())
    use_under_test(tree)
    tools, missing = engine.discover_tools(info, args.tools)
    cells = Cells(args.repeat, args.cell_budget)
    cells.skipped += [f"{name}: {why}" for name, why in missing.items()]
    print(f"mlbuild under test: {where}", flush=True)
    if args.watch_only:
        return watch_only(args.size_list, args.watch_writes, load_before)

    pipes = [pl.wide(BASELINE)]
    if 200 in args.size_list and not args.no_chain:
        pipes.append(pl.chain(200))
    pipes += [pl.wide(n) for n in args.size_list]
    for p in pipes:
        size = len(p.targets)
        for tool in tools:
            if size > args.max_size[tool.name]:
                why = WHY_SKIPPED.get(tool.name, "--max")
                cells.skipped.append(f"{tool.name} at {p.name}: {why}")
                print(f"  {p.name:11s} {tool.name:10s} skipped: {why}", flush=True)
        chosen = [t for t in tools if size <= args.max_size[t.name]]
        bench_pipeline(p, chosen, cells, args.commands_max)
        shutil.rmtree(engine.WORK / p.name, ignore_errors=True)

    watch = None
    if args.watch_size and any(t.name == "mlbuild" for t in tools):
        print(f"  watch mode at {args.watch_size:,} targets ...", flush=True)
        watch = watch_latency(args.watch_size, WATCH_WRITES)
        print(f"  watch: {[round(s * 1000) for s in watch[0]]} ms {watch[1] or ''}", flush=True)

    shutil.rmtree(engine.WORK, ignore_errors=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"(largest child RSS of the whole bench: {peak / 1024:.0f} MB)", flush=True)
    body = render(
        args,
        command,
        where,
        tools,
        cells,
        watch,
        (load_before, engine.load_average()),
        time.perf_counter() - started,
    )
    print("\n" + body)
    if not args.no_write:
        section = f"Scale: {args.label}" if args.label else "Scale"
        report.replace_section(engine.RESULTS_MD, section, body, "mlbuild benchmarks")
        print(f"wrote section '{section}' of {engine.RESULTS_MD}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
