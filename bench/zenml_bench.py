"""mlbuild's MNIST second run (epochs 1 -> 2) side by side with ZenML doing the same work.

Issue 20's last goal: with keep-warm or in watch mode, mlbuild's second run
takes at most 1.0x the wall time of ZenML's second run in one Python process
(ZenML's caching example: two pipeline runs in one process, the second with
the trainer's epochs changed, so the importer and normalizer are cached).

ZenML runs the demo's own step functions (examples/mnist/steps), each inside
a ZenML @step that passes file paths (str artifacts) between steps, with the
root pipeline.toml's params: the same data, model, epochs and learning rate,
the same files written. Passing paths rather than arrays spares ZenML the
materialising of the arrays, so its overhead here is a lower bound. ZenML
lives in its own venv (bench/.venv-zenml, made by venv_setup.ensure_zenml_venv)
and runs offline: a fresh local SQLite store per sample (ZENML_CONFIG_PATH in
the sample's scratch directory, `zenml init` there), analytics off, no server.

Modes, each a fresh copy per sample, alternating order, medians of --repeat:

- zenml one process: `python zenml_bench.py --zenml-run 1 2` (one process,
  two pipeline runs); the second run's wall is timed inside the process
  around the pipeline call, and its overhead is that wall less the seconds
  spent inside the demo's functions (timed in the @step wrappers).
- zenml per run: the same runs as two processes; the second is timed from
  outside (interpreter start, `import zenml`, the run, exit).
- mlbuild cold (-j 1), warm (-j 2), keep-warm: bench/warm_bench.py's runs.
- mlbuild watch: `mlbuild watch -j 2` in a fresh project builds everything at
  epochs = 1 (as a user's first save would); once its kept warm workers are
  idle, pipeline.toml is saved with epochs = 2 and the time runs until the
  watcher prints the build's `waiting for changes.` line (its 150 ms debounce
  included). Watch mode keeps warm workers for the first -j targets that ran,
  which after that first build are the importer and normalizer; so a second
  watch mode first saves epochs = 3 (untimed: the trainer and evaluator run
  and are kept warm) and then times the save of epochs = 2.

Usage (from the repository root, with mlbuild's venv, TensorFlow installed):
    PYTHONPATH=$PWD python bench/zenml_bench.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
ZENML_VENV = BENCH / ".venv-zenml"
WORK: dict[str, float] = {}  # seconds inside the demo's functions, per step, this run

try:  # only in the ZenML venv: the bench side (mlbuild's venv) has no ZenML
    from zenml import pipeline, step
except ModuleNotFoundError:
    pipeline = step = None


def _timed(name: str, call: object, **kwargs: object) -> None:
    """Run one demo function, recording its own seconds (the work, not ZenML's)."""
    start = time.perf_counter()
    call(**kwargs)  # type: ignore[operator]
    WORK[name] = time.perf_counter() - start


if step is not None and pipeline is not None:
    from examples.mnist.steps.evaluator import evaluate
    from examples.mnist.steps.importer import load_mnist
    from examples.mnist.steps.normalizer import normalize
    from examples.mnist.steps.trainer import train

    @step
    def importer(mnist_path: str, seed: int) -> str:
        out = Path("build/mnist/raw.npz").resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        _timed("importer", load_mnist, dataset=out, mnist_path=mnist_path, seed=seed)
        return str(out)

    @step
    def normalizer(raw: str, scale: float) -> str:
        out = Path("build/mnist/normalized.npz").resolve()
        _timed("normalizer", normalize, raw=Path(raw), normalized=out, scale=scale)
        return str(out)

    @step
    def trainer(data: str, epochs: int, batch_size: int, learning_rate: float, seed: int) -> str:
        out = Path(f"build/mnist/epochs-{epochs}").resolve()  # each run its own model
        out.mkdir(parents=True, exist_ok=True)
        _timed(
            "trainer",
            train,
            data=Path(data),
            model=out / "model.keras",
            history=out / "history.json",
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            seed=seed,
        )
        return str(out / "model.keras")

    @step
    def evaluator(data: str, model: str) -> str:
        out = Path(model).parent / "metrics.json"
        _timed("evaluator", evaluate, data=Path(data), model=Path(model), metrics=out)
        return str(out)

    @pipeline(enable_cache=True)
    def mnist(
        mnist_path: str,
        seed: int,
        scale: float,
        epochs: int,
        batch_size: int,
        learning_rate: float,
    ) -> None:
        data = normalizer(importer(mnist_path, seed), scale)
        evaluator(data, trainer(data, epochs, batch_size, learning_rate, seed))


def zenml_runs(epochs_list: list[int]) -> None:
    """In the ZenML venv: one pipeline run per epochs value, one JSON line each."""
    config = tomllib.loads(Path("pipeline.toml").read_text())
    params = config["params"]
    scale = float(config["targets"]["normalizer"]["params"]["scale"])
    for epochs in epochs_list:
        WORK.clear()
        start = time.perf_counter()
        run = mnist(
            mnist_path=params["mnist_path"],
            seed=params["seed"],
            scale=scale,
            epochs=epochs,
            batch_size=params["batch_size"],
            learning_rate=params["learning_rate"],
        )
        wall = time.perf_counter() - start
        metrics = json.loads((Path(f"build/mnist/epochs-{epochs}") / "metrics.json").read_text())
        line = {
            "epochs": epochs,
            "wall": wall,
            "work": dict(WORK),
            "status": str(run.status),
            "accuracy": metrics["accuracy"],
        }
        print("ZENML-BENCH " + json.dumps(line), flush=True)


# ---- the bench side (mlbuild's venv) ----


def zenml_env(scratch: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        ZENML_ANALYTICS_OPT_IN="false",
        ZENML_CONFIG_PATH=str(scratch / "zenml-config"),  # a fresh local SQLite store
        ZENML_LOGGING_COLORS_DISABLED="true",
    )
    return env


def zenml_project(snapshot: Path, scratch: Path) -> None:
    """A fresh ZenML project: the demo's pipeline.toml and steps, this script, `zenml init`."""
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir()
    shutil.copy(snapshot / "pipeline.toml", scratch / "pipeline.toml")
    shutil.copytree(snapshot / "examples", scratch / "examples")
    shutil.copy(Path(__file__), scratch / "zenml_bench.py")
    subprocess.run(
        [str(ZENML_VENV / "bin" / "zenml"), "init"],
        cwd=scratch,
        env=zenml_env(scratch),
        check=True,
        capture_output=True,
    )


def zenml_process(scratch: Path, epochs: list[int]) -> tuple[float, list[dict[str, object]]]:
    """Wall seconds of one ZenML process running `epochs`, and its per-run lines."""
    start = time.perf_counter()
    done = subprocess.run(
        [str(ZENML_VENV / "bin" / "python"), "zenml_bench.py", "--zenml-run", *map(str, epochs)],
        cwd=scratch,
        env=zenml_env(scratch),
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit("the ZenML run failed (its output above)")
    runs = [json.loads(m) for m in re.findall(r"^ZENML-BENCH (.*)$", done.stdout, re.M)]
    assert [r["epochs"] for r in runs] == epochs, done.stdout
    return wall, runs


class Sample:
    """One measured second run: wall seconds, the work inside it, the accuracy it gave."""

    def __init__(self, wall: float, work: float | None, accuracy: float) -> None:
        self.wall, self.work, self.accuracy = wall, work, accuracy


def zenml_one(snapshot: Path, scratch: Path) -> Sample:
    zenml_project(snapshot, scratch)
    _, runs = zenml_process(scratch, [1, 2])
    second = runs[1]
    work = second["work"]
    assert isinstance(work, dict) and sorted(work) == ["evaluator", "trainer"], second
    return Sample(float(second["wall"]), sum(work.values()), float(second["accuracy"]))


def zenml_per_run(snapshot: Path, scratch: Path) -> Sample:
    zenml_project(snapshot, scratch)
    zenml_process(scratch, [1])
    wall, runs = zenml_process(scratch, [2])
    work = runs[0]["work"]
    assert isinstance(work, dict) and sorted(work) == ["evaluator", "trainer"], runs
    return Sample(wall, sum(work.values()), float(runs[0]["accuracy"]))


def accuracy_of(root: Path) -> float:
    return float(json.loads((root / "build/mnist/metrics.json").read_text())["accuracy"])


def mlbuild_run(snapshot: Path, scratch: Path, jobs: int) -> Sample:
    from warm_bench import kept_run, second_run

    if jobs == 0:
        wall, _ = kept_run(snapshot, scratch)
    else:
        wall, _ = second_run(snapshot, scratch, REPO, jobs)
    return Sample(wall, None, accuracy_of(scratch))


def watch_run(snapshot: Path, scratch: Path, *, primed: bool) -> Sample:
    """Seconds from saving epochs = 2 to the watcher's `waiting for changes.` line.

    The watcher's first build runs all four steps at epochs = 1. Unprimed, the
    timed save (epochs 1 -> 2) comes next. Primed, an untimed save of epochs = 3
    comes first, so that the trainer and evaluator are the targets that ran
    last (the ones watch mode keeps warm); the timed save is then 3 -> 2, the
    same work (epochs = 2 was never built in this project).
    """
    from warm_bench import wait_idle
    from watch_bench import Watcher

    if scratch.exists():
        shutil.rmtree(scratch)
    shutil.copytree(snapshot, scratch, symlinks=True)
    shutil.rmtree(scratch / "build")  # a fresh project: the watcher's first build runs all
    shutil.rmtree(scratch / ".mlbuild")
    pipeline_toml = scratch / "pipeline.toml"
    watcher = Watcher(scratch, "-j", "2")
    try:
        watcher.wait_for("waiting for changes.", timeout=600)
        epochs = 1
        if primed:
            _set_epochs(pipeline_toml, epochs, 3)
            epochs = 3
            watcher.wait_for("waiting for changes.", timeout=600)
        for pid in _children(watcher.proc.pid):  # the kept warm workers: done importing
            wait_idle(pid)
        time.sleep(0.5)
        before = time.perf_counter()
        _set_epochs(pipeline_toml, epochs, 2)
        seen: list[str] = []
        while True:
            at, line = watcher.lines.get(timeout=600)
            seen.append(line)
            if "waiting for changes." in line:
                break
        ran = re.findall(r"`(\w+)` has finished in", "".join(seen))
        assert ran == ["trainer", "evaluator"], "".join(seen)
        return Sample(at - before, None, accuracy_of(scratch))
    finally:
        watcher.stop()


def _set_epochs(pipeline_toml: Path, old: int, new: int) -> None:
    text = pipeline_toml.read_text()
    edited = text.replace(f"\nepochs = {old}\n", f"\nepochs = {new}\n", 1)
    assert edited != text, f"pipeline.toml has no `epochs = {old}` line"
    pipeline_toml.write_text(edited)


def _children(pid: int) -> list[int]:
    pids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids.extend(int(p) for p in (task / "children").read_text().split())
    return pids


MODES = (
    "ZenML, one process (its example's shape)",
    "ZenML, one process per run",
    "mlbuild cold (`run -j 1`)",
    "mlbuild warm (`run -j 2`)",
    "mlbuild keep-warm (`run -j 2`, `[workers] keep_warm`)",
    "mlbuild watch (`watch -j 2`), first save after its first build",
    "mlbuild watch (`watch -j 2`), a later save (trainer, evaluator warm)",
)


def measure(mode: str, snapshot: Path, scratch: Path) -> Sample:
    if mode == MODES[0]:
        return zenml_one(snapshot, scratch)
    if mode == MODES[1]:
        return zenml_per_run(snapshot, scratch)
    if mode in MODES[5:]:
        return watch_run(snapshot, scratch, primed=mode == MODES[6])
    jobs = {MODES[2]: 1, MODES[3]: 2, MODES[4]: 0}[mode]
    return mlbuild_run(snapshot, scratch, jobs)


def table(samples: dict[str, list[Sample]], repeat: int) -> str:
    zenml = statistics.median(s.wall for s in samples[MODES[0]])
    rows = [
        f"| second run (epochs 1 -> 2), median of {repeat} | wall | overhead (wall - work)"
        " | vs ZenML one process | accuracy |",
        "| --- | --- | --- | --- | --- |",
    ]
    for mode in MODES:
        wall = statistics.median(s.wall for s in samples[mode])
        works = [s.wall - s.work for s in samples[mode] if s.work is not None]
        over = f"{statistics.median(works):.2f} s" if works else "-"
        accs = sorted({f"{s.accuracy:.4f}" for s in samples[mode]})
        rows.append(f"| {mode} | {wall:.2f} s | {over} | {wall / zenml:.2f}x | {', '.join(accs)} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--zenml-run", type=int, nargs="+", metavar="EPOCHS", help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.zenml_run:
        return zenml_runs(args.zenml_run)
    sys.path.insert(0, str(BENCH))
    from venv_setup import ensure_zenml_venv
    from warm_bench import make_snapshot

    ensure_zenml_venv(ZENML_VENV)
    loads = [os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="zenml-bench-") as tmp:
        snapshot = Path(tmp) / "snapshot"
        snapshot.mkdir()
        make_snapshot(snapshot)
        samples: dict[str, list[Sample]] = {mode: [] for mode in MODES}
        for i in range(args.repeat):
            for mode in MODES if i % 2 == 0 else MODES[::-1]:
                got = measure(mode, snapshot, Path(tmp) / "run")
                samples[mode].append(got)
                work = "" if got.work is None else f", work {got.work:.3f}s"
                print(f"  {mode}: wall {got.wall:.3f}s{work}, acc {got.accuracy:.4f}", flush=True)
            loads.append(os.getloadavg())
    print()
    print(table(samples, args.repeat))
    print("\nload averages (1/5/15 min), at the start and after each round:")
    for load in loads:
        print("  " + " / ".join(f"{x:.2f}" for x in load))


if __name__ == "__main__":
    main()
