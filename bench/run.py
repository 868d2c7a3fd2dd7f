"""Engine bench: mlbuild vs make, ninja, doit, snakemake and DVC on trivial and 1 GiB pipelines."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import secrets
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

import pipelines as pl  # noqa: E402
import report  # noqa: E402
from report import Measurement, Results, Row  # noqa: E402
from venv_setup import (  # noqa: E402
    EDITABLE_ARGS,
    PEER_PINS,
    VenvInfo,
    ensure_venv,
    mlbuild_command,
)

VENV = BENCH / ".venv"
WORK = BENCH / ".work"
MASTER_DATA = WORK / "data1g"
RESULTS_MD = BENCH / "RESULTS.md"
SECTION = "Engine: pipelines of trivial targets"
RUN_TIMEOUT = 600.0
CHANGE_PAUSE = 0.05

SEQUENTIAL_NOTE = (
    "All tools run one job at a time: make -j1, ninja -j1, snakemake --cores 1, "
    "doit (serial by default), dvc repro (serial), mlbuild -j 1."
)
NOISE_NOTE = (
    "On this VM, Python CLI runs of 150-300 ms land in ~50 ms steps (e.g. 164, 215, 265 ms; "
    "CPU time shows the same steps), so a median there can move by one step between bench runs."
)
PEERS_NOTE = (
    "Peers as a user would write them, one explicit rule/task/stage per target: the Makefile "
    "turns off make's built-in implicit rules (MAKEFLAGS += --no-builtin-rules, .SUFFIXES:), "
    "which otherwise cost ~35 ms on a 200-target no-op; ninja uses one `rule run` with a per-edge "
    "command; doit one task generator with file_dep/targets and its default checker (MD5, "
    "skipped when mtime and size match); snakemake one rule per target plus `rule all`, "
    "default rerun triggers."
)
DVC_NOTE = (
    "DVC: `dvc init --no-scm`, default cache (cache.type reflink,copy; on this ext4 that means "
    "outputs are copied into .dvc/cache), run-cache on (never hit: every change writes new bytes), "
    "core.site_cache_dir moved beside the workspace so that a cold run really has no hash state, "
    "analytics and update checks off. Stages written straight into dvc.yaml (what `dvc stage add` "
    "writes). DVC's 200-stage runs are slow because it rewrites dvc.lock through ruamel.yaml "
    "after every stage (quadratic in stages; in a cProfile of a 50-stage chain that was 31 of "
    "37 s)."
)


class BenchError(Exception):
    """A tool run that failed or did not do what the scenario requires."""


@dataclass
class Tool:
    name: str
    argv: list[str]
    version: str


# ---------------------------------------------------------------- processes


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # Every tool may write its bytecode caches, as on a user's machine; with this
    # set, an editable mlbuild would recompile its modules on every run.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["DVC_NO_ANALYTICS"] = "1"
    env["PATH"] = f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


ENV = _env()


def timed_run(argv: list[str], cwd: Path) -> float:
    """Wall time of one whole CLI process, output discarded.

    The wait is a plain blocking waitpid with the timeout enforced by a timer
    thread: `subprocess.run(timeout=...)` polls with sleeps of up to 50 ms,
    which rounded every short run up to the next poll (166, 215, 265 ms...).
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=ENV,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    timer = threading.Timer(RUN_TIMEOUT, proc.kill)
    timer.start()
    try:
        returncode = proc.wait()
    finally:
        timer.cancel()
    elapsed = time.perf_counter() - t0
    if returncode != 0:
        # Re-run (untimed) only to show why it failed.
        again = subprocess.run(
            argv, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
        )
        tail = (again.stderr + again.stdout).strip().splitlines()[-6:]
        raise BenchError(f"exit {returncode}: {' / '.join(tail)}")
    return elapsed


def _version(argv: list[str]) -> str:
    try:
        res = subprocess.run(
            argv, capture_output=True, text=True, env=ENV, timeout=120, check=False
        )
    except OSError as exc:
        return f"unavailable ({exc})"
    text = (res.stdout or res.stderr).strip().splitlines()
    return text[0].strip() if text and res.returncode == 0 else "unknown"


def discover_tools(info: VenvInfo, wanted: list[str]) -> tuple[list[Tool], dict[str, str]]:
    vbin = info.bin
    argvs = {
        "mlbuild": [*mlbuild_command(info.root), "run", "-j", "1"],
        "make": [shutil.which("make") or "make", "-j1"],
        "ninja": [shutil.which("ninja") or "ninja", "-j1"],
        "doit": [str(vbin / "doit")],
        "snakemake": [str(vbin / "snakemake"), "--cores", "1"],
        "dvc": [str(vbin / "dvc"), "repro"],
    }
    tools: list[Tool] = []
    missing: dict[str, str] = {}
    for name in wanted:
        if name == "mlbuild" and not info.mlbuild_ok:
            missing[name] = info.mlbuild_note
            continue
        exe = argvs[name][0]
        if name != "mlbuild" and not Path(exe).exists():
            missing[name] = f"{exe} not found"
            continue
        version = _version(
            [*argvs[name][:-1], "--version"] if name == "mlbuild" else [exe, "--version"]
        )
        if name == "mlbuild" and version == "unknown":
            version = _version(
                [
                    str(info.python),
                    "-c",
                    "import importlib.metadata as m; print(m.version('mlbuild'))",
                ]
            )
        if name == "doit":
            version = f"doit {version}"
        elif name in ("snakemake", "ninja"):
            version = f"{name} {version}"
        tools.append(Tool(name, argvs[name], version))
    return tools, missing


# ---------------------------------------------------------------- workspace


def _snapshot(ws: Path, outputs: list[str]) -> dict[str, tuple[int, bytes] | None]:
    snap: dict[str, tuple[int, bytes] | None] = {}
    for out in outputs:
        path = ws / out
        try:
            snap[out] = (path.stat().st_mtime_ns, path.read_bytes())
        except FileNotFoundError:
            snap[out] = None
    return snap


def _dvc_site(p: pl.Pipeline) -> Path:
    return WORK / "dvc-site" / p.name


def prepare_workspace(p: pl.Pipeline, tool: Tool) -> Path:
    ws = WORK / p.name / tool.name
    if ws.exists():
        shutil.rmtree(ws)
    (ws / "out").mkdir(parents=True)
    for rel, text in p.sources.items():
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).write_text(text)
    if p.dir_input:
        pl.link_data(MASTER_DATA, ws / "data")
    for fname, content in pl.RENDERERS[tool.name](p).items():
        (ws / fname).write_text(content)
    if tool.name == "dvc":
        dvc = str(VENV / "bin" / "dvc")
        site = _dvc_site(p)
        for argv in (
            [dvc, "init", "--no-scm", "-q"],
            [dvc, "config", "core.site_cache_dir", str(site)],
            [dvc, "config", "core.analytics", "false"],
            [dvc, "config", "core.check_update", "false"],
        ):
            subprocess.run(argv, cwd=ws, env=ENV, check=True, capture_output=True)
    return ws


def reset_cold(p: pl.Pipeline, tool: Tool, ws: Path) -> None:
    extra = (_dvc_site(p),) if tool.name == "dvc" else ()
    pl.remove_state(tool.name, ws, extra)
    pl.remove_outputs(p, ws)


# ---------------------------------------------------------------- scenarios


def check_contents(p: pl.Pipeline, ws: Path, snap: dict[str, tuple[int, bytes] | None]) -> None:
    """Every output exists and holds what its command must have written."""
    if p.dir_input:
        want = {"out/count.txt": f"{pl.DIR_FILES}\n".encode()}
    elif p.name.startswith("chain"):
        head = (ws / "src/0.txt").read_bytes()
        want = {out: head for out in p.outputs}
    else:
        want = {t.output: (ws / t.inputs[0]).read_bytes() for t in p.targets}
    for out, data in want.items():
        got = snap.get(out)
        if got is None:
            raise BenchError(f"{out} missing after run")
        if got[1].strip() != data.strip() if p.dir_input else got[1] != data:
            raise BenchError(f"{out} holds {got[1]!r}, expected {data!r}")


def run_first(p: pl.Pipeline, tool: Tool, ws: Path) -> float:
    reset_cold(p, tool, ws)
    elapsed = timed_run(tool.argv, ws)
    check_contents(p, ws, _snapshot(ws, p.outputs))
    return elapsed


def run_noop(p: pl.Pipeline, tool: Tool, ws: Path) -> float:
    before = _snapshot(ws, p.outputs)
    elapsed = timed_run(tool.argv, ws)
    after = _snapshot(ws, p.outputs)
    touched = [o for o in p.outputs if before[o] != after[o]]
    if touched:
        raise BenchError(f"no-op run rewrote {len(touched)} output(s), e.g. {touched[0]}")
    return elapsed


def _change_source(p: pl.Pipeline, ws: Path, rep: int) -> list[str]:
    """Give one input new bytes; return the outputs that must be rebuilt."""
    if p.dir_input:
        name = pl.data_files()[(rep * 997 + 13) % pl.DIR_FILES]
        with open(ws / "data" / name, "r+b") as fh:
            fh.seek(4096)
            fh.write(secrets.token_bytes(64))
        return list(p.outputs)
    if p.name.startswith("chain"):
        (ws / "src/0.txt").write_text(f"changed head, repeat {rep}, {secrets.token_hex(8)}\n")
        return list(p.outputs)
    k = (rep * 37 + 11) % len(p.targets)
    target = p.targets[k]
    (ws / target.inputs[0]).write_text(f"changed {k}, repeat {rep}, {secrets.token_hex(8)}\n")
    return [target.output]


def make_change_runner() -> Callable[[pl.Pipeline, Tool, Path], float]:
    counter = {"rep": 0}

    def run_change(p: pl.Pipeline, tool: Tool, ws: Path) -> float:
        counter["rep"] += 1
        before = _snapshot(ws, p.outputs)
        # Untimed: file mtimes here tick in ~4 ms steps, so an edit made right after the
        # previous run can carry the same mtime as that run's output, and mtime-based tools
        # (make) then rightly see nothing newer. A person never edits that fast.
        time.sleep(CHANGE_PAUSE)
        must = set(_change_source(p, ws, counter["rep"]))
        elapsed = timed_run(tool.argv, ws)
        after = _snapshot(ws, p.outputs)
        check_contents(p, ws, after)
        for out in p.outputs:
            rebuilt = before[out] != after[out]
            if out in must and not rebuilt:
                raise BenchError(f"{out} was not rebuilt after its input changed")
            if out not in must and rebuilt:
                raise BenchError(f"{out} was rebuilt though nothing it reads changed")
        return elapsed

    return run_change


# ---------------------------------------------------------------- driver


def scenario_rows(p: pl.Pipeline) -> list[tuple[str, str]]:
    if p.dir_input:
        return [
            ("first", "cold hash (no tool state)"),
            ("noop", "no-op"),
            ("change", "one of 5,000 files changed"),
        ]
    change = (
        "one change (head source: all 200 rerun)"
        if p.name.startswith("chain")
        else "one change (1 source: 1 reruns)"
    )
    return [("first", "first run (clean)"), ("noop", "no-op"), ("change", change)]


def bench_tool(p: pl.Pipeline, tool: Tool, repeat: int, budget: float, results: Results) -> None:
    ws = prepare_workspace(p, tool)
    runners: dict[str, Callable[[pl.Pipeline, Tool, Path], float]] = {
        "first": run_first,
        "noop": run_noop,
        "change": make_change_runner(),
    }
    failed: str | None = None
    for scenario, _label in scenario_rows(p):
        m = Measurement()
        results.setdefault((p.name, scenario), {})[tool.name] = m
        if failed is not None:
            m.error = f"skipped: {failed}"
            continue
        try:
            for _ in range(repeat):
                m.samples.append(runners[scenario](p, tool, ws))
                # Stop early only when one more run would push the cell past its budget.
                if sum(m.samples) + m.samples[-1] > budget:
                    break
        except (BenchError, subprocess.TimeoutExpired) as exc:
            m.error = f"{scenario}: {exc}"
            failed = f"earlier {scenario} failed"
        status = m.error or f"median {report.fmt_ms(m.median)} (n={len(m.samples)})"
        print(f"  {p.name:8s} {tool.name:10s} {scenario:7s} {status}", flush=True)


def evaluate_goals(results: Results, trivial: list[str], big: bool) -> list[tuple[str, str, str]]:
    """(goal, verdict, detail) rows; verdict is PASS, FAIL or SKIP."""
    goals: list[tuple[str, str, str]] = []

    def med(pipe: str, scen: str, tool: str) -> float | None:
        m = results.get((pipe, scen), {}).get(tool)
        return m.median if m else None

    def ratio_goal(name: str, pipe: str, scen: str, peer: str, limit: float) -> None:
        ml, other = med(pipe, scen, "mlbuild"), med(pipe, scen, peer)
        if ml is None or other is None:
            goals.append((name, "SKIP", "no measurement for mlbuild or " + peer))
            return
        r = ml / other
        verdict = "PASS" if r <= limit else "FAIL"
        goals.append((name, verdict, f"{r:.3f}x ({report.fmt_ms(ml)} vs {report.fmt_ms(other)})"))

    for pipe in trivial:
        ratio_goal(f"{pipe} no-op <= 0.35x doit", pipe, "noop", "doit", 0.35)
        ratio_goal(f"{pipe} no-op <= 0.02x DVC", pipe, "noop", "dvc", 0.02)
        ml = med(pipe, "noop", "mlbuild")
        if ml is None:
            goals.append((f"{pipe} no-op < 60 ms", "SKIP", "no mlbuild measurement"))
        else:
            goals.append(
                (f"{pipe} no-op < 60 ms", "PASS" if ml < 0.060 else "FAIL", report.fmt_ms(ml))
            )
        ratio_goal(f"{pipe} first run <= 1.3x make", pipe, "first", "make", 1.3)
    if big:
        ratio_goal("dir1g cold hash <= 0.15x DVC", "dir1g", "first", "dvc", 0.15)
        ratio_goal("dir1g no-op <= 0.1x DVC", "dir1g", "noop", "dvc", 0.1)
    return goals


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def machine_lines(tools: list[Tool]) -> list[str]:
    u = platform.uname()
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return [
        f"- uname: `{u.system} {u.node} {u.release} {u.version} {u.machine}`",
        f"- CPU: {cpu}; CPU count: {os.cpu_count()}",
        f"- Python: {platform.python_version()} ({sys.executable})",
        "- tools: " + "; ".join(f"{t.name}: {t.version}" for t in tools),
        f"- bench venv pins: {', '.join(PEER_PINS)}, plus "
        f"`pip install {' '.join(EDITABLE_ARGS)} -e {REPO}` (a .pth path entry, no import hook)",
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per scenario (median taken)")
    ap.add_argument("--only", default="", help=f"comma list of tools out of {','.join(pl.TOOLS)}")
    ap.add_argument(
        "--cell-budget",
        type=float,
        default=60.0,
        help="seconds per tool and scenario; fewer repeats once one more would pass it",
    )
    ap.add_argument("--skip-big", action="store_true", help="skip the 1 GiB directory pipeline")
    ap.add_argument(
        "--pipelines",
        default="chain200,wide200,dir1g",
        help="comma list of pipelines to run (default all three)",
    )
    ap.add_argument("--no-write", action="store_true", help=f"do not update {RESULTS_MD.name}")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.only:
        names = [x.strip() for x in args.only.split(",") if x.strip()]
        bad = [x for x in names if x not in pl.TOOLS]
        if bad:
            ap.error(f"unknown tool(s) {bad}; choose from {','.join(pl.TOOLS)}")
        args.tools = [t for t in pl.TOOLS if t in names]
    else:
        args.tools = list(pl.TOOLS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python3 " + shlex.join(
        [os.path.relpath(__file__, REPO) if Path.cwd() == REPO else sys.argv[0], *sys.argv[1:]]
    )
    started = time.perf_counter()
    load_before = load_average()
    info = ensure_venv(VENV, REPO)
    tools, missing = discover_tools(info, args.tools)
    for name, why in missing.items():
        print(f"[skip] {name}: {why}", flush=True)
    WORK.mkdir(exist_ok=True)

    chosen = {x.strip() for x in args.pipelines.split(",")}
    pipes = [p for p in (pl.chain(), pl.wide()) if p.name in chosen]
    big = not args.skip_big and "dir1g" in chosen
    if big:
        pl.ensure_master_data(MASTER_DATA)
        pipes.append(pl.dir1g())
    print(SEQUENTIAL_NOTE, flush=True)
    print(f"median of {args.repeat} run(s) per cell\n", flush=True)

    results: Results = {}
    for p in pipes:
        for tool in tools:
            bench_tool(p, tool, args.repeat, args.cell_budget, results)
        shutil.rmtree(WORK / p.name, ignore_errors=True)

    rows = [Row(p.name, scen, label) for p in pipes for scen, label in scenario_rows(p)]
    names = [t.name for t in tools]
    peers = [n for n in names if n != "mlbuild"]
    goals = evaluate_goals(results, [p.name for p in pipes if not p.dir_input], big)
    body = render(args, command, tools, missing, rows, names, peers, results, goals)
    body += (
        f"\nWhole bench took {time.perf_counter() - started:.0f} s. Load average (1/5/15 min) "
        f"before: {load_before}; after: {load_average()}.\n"
    )
    print("\n" + body)
    if not args.no_write:
        report.replace_section(RESULTS_MD, SECTION, body, "mlbuild benchmarks")
        print(f"wrote section '{SECTION}' of {RESULTS_MD}")
    return 0


def render(
    args: argparse.Namespace,
    command: str,
    tools: list[Tool],
    missing: dict[str, str],
    rows: list[Row],
    names: list[str],
    peers: list[str],
    results: Results,
    goals: list[tuple[str, str, str]],
) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        f"Measured {now} with `{command}` (from the repository root).",
        "",
        *machine_lines(tools),
    ]
    for name, why in missing.items():
        out.append(f"- not measured: {name} ({why})")
    out += [
        "",
        f"Wall time of the whole CLI process (time.perf_counter around subprocess.run, output "
        f"to /dev/null), median of {args.repeat} runs, except where one more run would have "
        f"taken a cell past {args.cell_budget:.0f} s: those show (n=...) with fewer runs "
        f"(DVC's 200-stage runs take minutes each). {SEQUENTIAL_NOTE}",
        "",
        "- chain200: target i copies target i-1's output (target 0 copies src/0.txt); `cp`.",
        "- wide200: target i copies src/i.txt to out/i.txt; 200 independent targets.",
        f"- dir1g: one target reading data/ ({pl.DIR_FILES:,} random files x "
        f"{pl.DIR_FILE_SIZE:,} B = 1 GiB), command `{pl.DIR_CMD}`. mlbuild and DVC take the "
        "directory as the input; make "
        "(`$(wildcard data/*)`), ninja (explicit list), doit and snakemake (glob) list the 5,000 "
        "files, since a directory's mtime does not change when a file inside it is rewritten. "
        "Files are hard links to one generated set, so the page cache is warm for every tool: "
        "'cold' means no tool state, not a cold disk.",
        "- first run / cold: outputs and the tool's state deleted before each repeat. no-op: "
        "consecutive runs right after a build (the first is the build's second run). one change: "
        "new bytes in one input before each repeat (written 50 ms after the previous run ended, "
        "since mtimes here move in ~4 ms ticks); each run is checked to rebuild exactly the "
        "outputs that depend on it, and no-op runs to touch no output.",
        f"- {NOISE_NOTE}",
        f"- {PEERS_NOTE}",
        f"- {DVC_NOTE}",
        "",
        "### Median wall time",
        "",
        report.times_table(rows, names, results, args.repeat),
        "",
    ]
    if "mlbuild" in names and peers:
        out += [
            "### peer / mlbuild (above 1: mlbuild is faster)",
            "",
            report.ratio_table(rows, peers, results, inverse=False),
            "",
            "### mlbuild / peer (below 1: mlbuild is faster)",
            "",
            report.ratio_table(rows, peers, results, inverse=True),
            "",
        ]
    out += ["### Goals", "", "| goal | verdict | mlbuild / peer |", "|---|---|---|"]
    out += [f"| {g} | {v} | {d} |" for g, v, d in goals]
    out += [
        "",
        "<details><summary>All samples</summary>",
        "",
        report.samples_table(rows, names, results),
        "",
        "</details>",
    ]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
