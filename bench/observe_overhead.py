"""What observing a Python step costs: the worker with and without observation.

Runs real step functions through `python -m mlbuild.exec.worker`, once with a
timing path in the call (the worker then records the files and modules the
step uses, see mlbuild/observed.py) and once without (nothing recorded: no
switch is needed, the call the runner builds always has one), alternating
which goes first, and compares the medians of each one's wall time and CPU
time (user + system of the worker process and its threads). Steps:

- `trainer`, `evaluator`: the MNIST demo's steps of the repository's own
  pipeline.toml (TensorFlow), with the call the runner would build, in a
  scratch copy whose importer and normalizer ran first: the project's target
  is an overhead under 1% of these.
- `deepcopy`: `copy.deepcopy` of 50,000 small nested dicts, nothing opened:
  the worst case for an audit hook (every `id()` is an audited event).
- `files`: opens and reads 20,000 small project files and nothing else: the
  worst case for any open-time recording.

Usage: python bench/observe_overhead.py [--repeat N] [--steps trainer,evaluator,deepcopy,files]
(run from the repository root with mlbuild importable, TensorFlow installed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

STEPS = """
import copy
from pathlib import Path


def deepcopy(o):
    tree = [{"a": {"b": i, "c": [i, i + 1]}, "d": str(i)} for i in range(50_000)]
    o.write_text(str(len(copy.deepcopy(tree))))


def files(o):
    total = 0
    for p in sorted(Path("data/many").iterdir()):
        with open(p, "rb") as handle:
            total += len(handle.read())
    o.write_text(str(total))
"""


def make_project(root: Path) -> None:
    """The MNIST demo (inputs of the trainer and evaluator built) plus the synthetic steps."""
    shutil.copy(REPO / "pipeline.toml", root / "pipeline.toml")
    steps = root / "examples" / "mnist" / "steps"
    steps.mkdir(parents=True)
    for source in (REPO / "examples" / "mnist" / "steps").glob("*.py"):
        shutil.copy(source, steps / source.name)
    subprocess.run(
        [sys.executable, "-m", "mlbuild", "run", "-q", "-j", "1", "trainer"],
        cwd=root,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    (root / "bench_steps").mkdir()
    (root / "bench_steps/__init__.py").write_text("")
    (root / "bench_steps/work.py").write_text(textwrap.dedent(STEPS))
    (root / "data/many").mkdir(parents=True)
    for i in range(20_000):
        (root / "data/many" / f"{i:05d}.json").write_text(json.dumps({"i": i}))


def calls(root: Path) -> dict[str, dict[str, object]]:
    """Each step's worker call, observed (with a timing path), as the runner builds it."""
    from mlbuild.exec.base import worker_call
    from mlbuild.pipeline.load import load_pipeline

    timing = root / "step.timing.json"
    pipeline = load_pipeline(root / "pipeline.toml")
    made = {
        name: json.loads(worker_call(pipeline.targets[name], root, timing))
        for name in ("trainer", "evaluator")
    }
    for name in ("deepcopy", "files"):
        made[name] = {
            "ref": f"bench_steps.work:{name}",
            "root": str(root),
            "paths": {"o": "out.txt"},
            "params": {},
            "timing": str(timing),
        }
    return made


def run_worker(root: Path, call: dict[str, object], observed: bool) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one worker process running the step."""
    if not observed:
        call = {k: v for k, v in call.items() if k != "timing"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "mlbuild.exec.worker", json.dumps(call)],
        cwd=root,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--steps", default="trainer,evaluator,deepcopy,files")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp).resolve()
        make_project(root)
        steps = calls(root)
        for step in args.steps.split(","):
            call = steps[step]
            run_worker(root, call, True)  # warm the page cache and the libraries' .pyc files
            times: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
            for i in range(args.repeat):
                for observed in (False, True) if i % 2 == 0 else (True, False):
                    times[observed].append(run_worker(root, call, observed))
            seen = json.loads((root / "step.observed.json").read_text())
            print(f"{step}: recorded {len(seen['reads'])} reads and {len(seen['modules'])} modules")
            for i, what in enumerate(("wall", "cpu")):
                off = statistics.median(t[i] for t in times[False])
                on = statistics.median(t[i] for t in times[True])
                runs_off = ", ".join(f"{t[i]:.2f}" for t in times[False])
                runs_on = ", ".join(f"{t[i]:.2f}" for t in times[True])
                print(
                    f"  {what:4}  off {off * 1000:8.1f} ms   on {on * 1000:8.1f} ms"
                    f"   difference {(on - off) * 1000:+7.1f} ms ({(on - off) / off:+.2%})"
                    f"   [off: {runs_off}] [on: {runs_on}]",
                    flush=True,
                )


if __name__ == "__main__":
    main()
