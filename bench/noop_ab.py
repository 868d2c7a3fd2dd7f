"""No-op A/B: mlbuild at a git revision against the work tree, on chain200 and wide200.

A change that adds work to every no-op (a check per target, an import) shows up
here before it shows up in the peer tables of run.py. Both trees are exported,
byte-compiled and run alternately, so load on a shared machine hits both alike.

    python bench/noop_ab.py a54aa15 --repeat 21
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

import pipelines as pl  # noqa: E402


def export(revision: str, dest: Path) -> Path:
    """`mlbuild/` of `revision` (or of the work tree for "WORKTREE"), byte-compiled."""
    dest.mkdir(parents=True)
    if revision == "WORKTREE":
        subprocess.run(["cp", "-r", str(REPO / "mlbuild"), str(dest)], check=True)
    else:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", revision, "mlbuild"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(dest)], check=True)
    return dest


def workspace(pipeline: pl.Pipeline, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for rel, text in {**pl.render_mlbuild(pipeline), **pipeline.sources}.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_text(text)
    return dest


def run(tree: Path, ws: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(tree)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "mlbuild", "run", "-q", "-j", "1"],
        cwd=ws,
        env=env,
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revision", help="the revision to compare the work tree with")
    parser.add_argument("--repeat", type=int, default=21)
    args = parser.parse_args()
    print(
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with"
        f" `python bench/noop_ab.py {args.revision} --repeat {args.repeat}`; medians;"
        f" {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}.\n"
    )
    print(f"| pipeline | {args.revision} | work tree | ratio |")
    print("| --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="mlbuild-ab-") as tmp:
        base = Path(tmp)
        trees = {
            "old": export(args.revision, base / "old"),
            "new": export("WORKTREE", base / "new"),
        }
        for pipeline in (pl.chain(), pl.wide()):
            spaces = {k: workspace(pipeline, base / f"{pipeline.name}-{k}") for k in trees}
            times: dict[str, list[float]] = {k: [] for k in trees}
            for key in trees:
                run(trees[key], spaces[key])  # the first build
            for _ in range(args.repeat):
                for key in trees:
                    times[key].append(run(trees[key], spaces[key]))
            old, new = (statistics.median(times[k]) for k in ("old", "new"))
            print(
                f"| {pipeline.name} no-op | {old * 1000:.1f} ms | {new * 1000:.1f} ms |"
                f" {new / old:.2f}x |"
            )


if __name__ == "__main__":
    main()
