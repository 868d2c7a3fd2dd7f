"""The origin demo end to end, with real TensorFlow: skip, retrain, restore."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.conftest import Project

# Needs the `examples` extra (TensorFlow), which the `test` extra pulls in.
REPO = Path(__file__).resolve().parents[1]


def ran_functions(project: Project) -> set[str]:
    """Steps whose function executed in the last run (the worker's timing files)."""
    logs = project.root / ".mlbuild/logs"
    return {p.name.removesuffix(".timing.json") for p in logs.glob("*.timing.json")}


def test_mnist_demo_skips_data_steps_and_restores_the_trainer(project: Project) -> None:
    shutil.copy(REPO / "pipeline.toml", project.root / "pipeline.toml")
    shutil.copytree(
        REPO / "examples/mnist/steps",
        project.root / "examples/mnist/steps",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    first = project.run("run", "-j", "1")
    assert first.code == 0, first.err
    assert first.started() == ["importer", "normalizer", "trainer", "evaluator"]
    assert "using scikit-learn's handwritten digits" in first.out or "using MNIST" in first.out
    model = (project.root / "build/mnist/model.keras").read_bytes()

    # -j 2: the evaluator's worker is warmed (tensorflow imported) while the trainer runs.
    second = project.run("run", "-j", "2", "--set", "epochs=2")
    assert second.code == 0, second.err
    for result in (first, second):  # TensorFlow's start-up lines are not the user's business
        seen = result.out + result.err
        assert "absl::InitializeLog" not in seen and "oneDNN" not in seen, seen
        assert "cpu_feature_guard" not in seen, seen
    assert "Step `importer` is up to date (skipped)." in second.out
    assert "Step `normalizer` is up to date (skipped)." in second.out
    assert "Step `trainer` has started: param epochs changed 1 -> 2." in second.out
    assert second.started() == ["trainer", "evaluator"]

    for timing in (project.root / ".mlbuild/logs").glob("*.timing.json"):
        timing.unlink()
    third = project.run("run", "-j", "1")
    assert third.code == 0, third.err
    assert third.started() == []
    assert "Step `trainer` restored from cache in " in third.out
    assert "Step `evaluator` restored from cache in " in third.out
    assert ran_functions(project) == set()  # no step function executed
    assert (project.root / "build/mnist/model.keras").read_bytes() == model

    metrics = json.loads((project.root / "build/mnist/metrics.json").read_text())
    assert metrics["test_images"] > 100
    assert 0.1 < metrics["accuracy"] <= 1.0  # above chance (10 classes)
    assert metrics["loss"] > 0

    # Its metrics and plot files: a row per configuration built, the history drawn.
    rows = json.loads(project.run("exp", "show", "--json").out)
    assert sorted(row["params"]["epochs"] for row in rows) == [1, 2]
    assert all(0.1 < row["metrics"]["accuracy"] <= 1.0 for row in rows)
    drawn = project.run("plots")
    assert drawn.code == 0, drawn.err
    chart = project.root / "mlbuild_plots/index-build_mnist_history.json.png"
    assert chart.stat().st_size > 10_000
