"""What observing a Python step costs: the worker with and without its audit hook.

Runs real step functions through `python -m mlbuild.worker`, once with a
timing path in the call (the worker then records the files and modules the
step uses, see mlbuild/observed.py) and once without (nothing recorded),
alternating, and compares the medians of each one's wall time and CPU time
(user + system, of the worker process: less disturbed by other load on the
machine than wall time). Steps:

- `train`: imports scikit-learn, reads 300 small JSON files of the project,
  fits a random forest on the digits data set (one thread): what an ML step
  does.
- `files`: opens and reads 20,000 small project files and nothing else: the
  worst case for the hook, which runs on every open.

Usage: python bench/observe_overhead.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

STEPS = """
import json
from pathlib import Path


def train(o):
    from sklearn.datasets import load_digits
    from sklearn.ensemble import RandomForestClassifier

    meta = [json.loads(p.read_text()) for p in sorted(Path("data/meta").iterdir())]
    x, y = load_digits(return_X_y=True)
    model = RandomForestClassifier(n_estimators=150, random_state=0, n_jobs=1).fit(x, y)
    o.write_text(f"{model.score(x, y):.4f} {len(meta)}")


def files(o):
    total = 0
    for p in sorted(Path("data/many").iterdir()):
        with open(p, "rb") as handle:
            total += len(handle.read())
    o.write_text(str(total))
"""


def make_project(root: Path) -> None:
    (root / "steps").mkdir()
    (root / "steps/__init__.py").write_text("")
    (root / "steps/work.py").write_text(textwrap.dedent(STEPS))
    for folder, count in (("meta", 300), ("many", 20_000)):
        (root / "data" / folder).mkdir(parents=True)
        for i in range(count):
            (root / "data" / folder / f"{i:05d}.json").write_text(json.dumps({"i": i}))


def run_worker(root: Path, step: str, observed: bool) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one worker process running the step."""
    call: dict[str, object] = {"ref": f"steps.work:{step}", "root": str(root)}
    call.update(paths={"o": "out.txt"}, params={})
    if observed:
        call["timing"] = str(root / "step.timing.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "mlbuild.worker", json.dumps(call)], cwd=root, env=env, check=True
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp).resolve()
        make_project(root)
        for step in ("train", "files"):
            run_worker(root, step, True)  # warm the page cache and sklearn's .pyc files
            times: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
            for _ in range(args.repeat):
                for observed in (False, True):
                    times[observed].append(run_worker(root, step, observed))
            seen = json.loads((root / "step.observed.json").read_text())
            print(f"{step}: recorded {len(seen['reads'])} reads and {len(seen['modules'])} modules")
            for i, what in enumerate(("wall", "cpu")):
                off = statistics.median(t[i] for t in times[False])
                on = statistics.median(t[i] for t in times[True])
                print(
                    f"  {what:4}  without hook {off * 1000:8.1f} ms   with hook {on * 1000:8.1f} ms"
                    f"   difference {(on - off) * 1000:+7.1f} ms ({(on - off) / off:+.2%})"
                )


if __name__ == "__main__":
    main()
