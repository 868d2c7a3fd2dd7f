"""Metrics files and the experiment table, end to end through the real CLI.

The project is laid out as DVC's example is: a prepare step, a trainer reading a
parameter, and an evaluator writing a metrics file; each test asserts what a user
sees (stdout, stderr, exit code) or what is on disk.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import blake3
import pytest

from mlbuild.experiments import row_id
from tests.conftest import Project, Result

PIPELINE = """\
[params]
n_est = 10   # number of trees: kept through `exp apply`
seed = 1

[targets.prepare]
cmd = "python3 prepare.py"
inputs = ["prepare.py"]
outputs = ["build/data.txt"]
params = ["seed"]

[targets.train]
cmd = "python3 train.py {params.n_est} > {outputs.0}"
inputs = ["build/data.txt", "train.py"]
outputs = ["build/model.txt"]
params = ["n_est"]

[targets.evaluate]
cmd = "python3 evaluate.py"
inputs = ["build/model.txt", "evaluate.py"]
metrics = ["eval/metrics.json"]
"""

PREPARE = """\
import os
os.makedirs("build", exist_ok=True)
open("build/data.txt", "w").write("data\\n")
"""

TRAIN = """\
import sys
print("model", sys.argv[1])
"""

EVALUATE = """\
import json, os
n = int(open("build/model.txt").read().split()[1])
os.makedirs("eval", exist_ok=True)
metrics = {"acc": 1 - 1 / n, "loss": {"train": 1 / n, "test": 2 / n}, "epochs": n}
json.dump(metrics, open("eval/metrics.json", "w"))
"""


@pytest.fixture
def dvc_project(project: Project) -> Project:
    project.pipeline(PIPELINE)
    project.write("prepare.py", PREPARE)
    project.write("train.py", TRAIN)
    project.write("evaluate.py", EVALUATE)
    return project


def show(project: Project, *args: str) -> list[dict[str, Any]]:
    result = project.run("exp", "show", "--json", *args)
    assert result.code == 0, result
    rows: list[dict[str, Any]] = json.loads(result.out)
    return rows


def one_line_error(result: Result, *needles: str) -> None:
    """Exit 2, one line on stderr holding every needle, no traceback."""
    assert result.code == 2, result
    assert "Traceback" not in result.out + result.err
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("mlbuild: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_metrics_are_recorded_with_the_configuration_after_a_run(dvc_project: Project) -> None:
    assert dvc_project.run().code == 0
    assert dvc_project.run("run", "--set", "n_est=20").code == 0
    rows = show(dvc_project)
    assert [(r["params"], r["metrics"]) for r in rows] == [
        ({"n_est": 10, "seed": 1}, {"acc": 0.9, "epochs": 10, "loss.test": 0.2, "loss.train": 0.1}),
        (
            {"n_est": 20, "seed": 1},
            {"acc": 0.95, "epochs": 20, "loss.test": 0.1, "loss.train": 0.05},
        ),
    ]
    assert [r["current"] for r in rows] == [False, True]
    assert all(r["restorable"] for r in rows)
    assert len({r["id"] for r in rows}) == 2 and all(len(r["id"]) == 7 for r in rows)
    assert rows[0]["created"] < rows[1]["created"]


def test_metrics_are_read_after_a_restore_from_the_cache(dvc_project: Project) -> None:
    """A fresh state over the same cache: every target is restored, and its metrics read."""
    dvc_project.run()
    for suffix in ("", "-wal", "-shm"):
        (dvc_project.root / f".mlbuild/state.db{suffix}").unlink(missing_ok=True)
    (dvc_project.root / "eval/metrics.json").unlink()
    result = dvc_project.run()
    assert result.code == 0 and result.started() == []
    assert "Step `evaluate` restored from cache" in result.out
    (row,) = show(dvc_project)
    assert row["metrics"]["acc"] == 0.9 and row["current"]


def test_a_rerun_of_the_same_configuration_adds_no_row(dvc_project: Project) -> None:
    dvc_project.run()
    dvc_project.run("run", "--set", "n_est=20")
    forced = dvc_project.run("run", "--force", "--set", "n_est=20")
    assert forced.started() == ["prepare", "train", "evaluate"]
    back = dvc_project.run("run")
    assert back.started() == [] and "Step `train` restored from cache" in back.out
    rows = show(dvc_project)
    assert [r["params"]["n_est"] for r in rows] == [10, 20]
    assert [r["current"] for r in rows] == [True, False]


def test_a_rows_id_is_the_digest_of_its_targets_and_keys_in_name_order(project: Project) -> None:
    """The identity rows recorded by any version share: names in code-point order."""
    project.pipeline(
        """\
[targets.beta]
cmd = "echo b > {outputs}"
outputs = ["b.txt"]

[targets.Alpha]
cmd = "echo a > {outputs}"
outputs = ["a.txt"]
cache = false
"""
    )
    assert project.run().code == 0
    (row,) = show(project)
    assert list(row["targets"]) == ["Alpha", "beta"]
    text = json.dumps(sorted(row["targets"].items()), separators=(",", ":"))
    assert row["full_id"] == blake3.blake3(text.encode()).hexdigest() == row_id(row["targets"])
    with sqlite3.connect(project.root / ".mlbuild" / "state.db") as conn:
        (stored,) = conn.execute("SELECT targets FROM experiments").fetchone()
    keys = row["targets"]
    assert stored == json.dumps(
        {"beta": [keys["beta"], True], "Alpha": [keys["Alpha"], False]}, sort_keys=True
    )


def test_cache_keys_are_kept_beside_manifests_and_follow_each_rewrite(
    dvc_project: Project,
) -> None:
    """A row's identity needs every target's cache key: each is computed from its
    manifest once, kept, and dropped with the manifest it was computed from."""
    from mlbuild.experiments import key_of
    from mlbuild.store import open_store

    def kept() -> dict[str, str | None]:
        with open_store(dvc_project.root / ".mlbuild", print) as store:
            keys = store.load_manifest_keys()
            assert {t: key_of(t, m) for t, m in store.load_manifests().items()} == keys
            return keys

    dvc_project.run()
    first = kept()
    assert set(first) == {"prepare", "train", "evaluate"} and all(first.values())
    assert dvc_project.run("run", "--set", "n_est=20").started() == ["train", "evaluate"]
    second = kept()
    assert second["prepare"] == first["prepare"]
    assert second["train"] != first["train"] and second["evaluate"] != first["evaluate"]
    assert [r["current"] for r in show(dvc_project)] == [False, True]
    back = dvc_project.run()
    assert back.started() == [] and kept() == first
    assert [r["current"] for r in show(dvc_project)] == [True, False]


def test_name_names_the_row_and_moves_from_an_older_one(dvc_project: Project) -> None:
    dvc_project.run("run", "--name", "baseline")
    dvc_project.run("run", "--set", "n_est=20", "--name", "wide")
    assert [r["name"] for r in show(dvc_project)] == ["baseline", "wide"]
    # Naming a configuration that is already built (a no-op) names its row.
    dvc_project.run("run", "--set", "n_est=20", "--name", "baseline")
    assert [r["name"] for r in show(dvc_project)] == [None, "baseline"]


def test_non_numeric_values_are_skipped_with_a_note(dvc_project: Project) -> None:
    dvc_project.write(
        "evaluate.py",
        """\
        import json, os
        os.makedirs("eval", exist_ok=True)
        json.dump({"acc": 0.5, "model": "rf", "ok": True, "per_class": [0.25, "n/a"]},
                  open("eval/metrics.json", "w"))
        """,
    )
    result = dvc_project.run()
    assert result.code == 0
    assert (
        "mlbuild: warning: `evaluate`: 'eval/metrics.json': skipped values that are not"
        " numbers: model, ok, per_class.1" in result.err
    )
    (row,) = show(dvc_project)
    assert row["metrics"] == {"acc": 0.5, "per_class.0": 0.25}


def test_an_unreadable_metrics_file_is_a_warning_not_a_failed_build(dvc_project: Project) -> None:
    dvc_project.write(
        "evaluate.py",
        """\
        import os
        os.makedirs("eval", exist_ok=True)
        open("eval/metrics.json", "w").write("{acc: 0.5")
        """,
    )
    result = dvc_project.run()
    assert result.code == 0, result
    assert "`evaluate`: metrics file 'eval/metrics.json' not recorded: it is not valid JSON" in (
        result.err
    )
    (row,) = show(dvc_project)
    assert row["metrics"] == {} and row["current"]


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("m.yaml", "eval:\n  acc: 0.75  # top-1\n  f1: 0.5\nsteps: 3\n"),
        ("m.toml", "steps = 3\n[eval]\nacc = 0.75\nf1 = 0.5\n"),
    ],
)
def test_yaml_and_toml_metrics_flatten_to_dotted_names(
    project: Project, name: str, text: str
) -> None:
    project.write("m.src", text)
    project.pipeline(
        f"""\
        [targets.evaluate]
        cmd = "cp m.src {name}"
        inputs = ["m.src"]
        metrics = ["{name}"]
        """
    )
    assert project.run().code == 0
    (row,) = show(project)
    assert row["metrics"] == {"eval.acc": 0.75, "eval.f1": 0.5, "steps": 3}


def test_two_metrics_files_sharing_a_name_are_prefixed_with_the_file(project: Project) -> None:
    project.pipeline(
        """\
        [targets.train]
        cmd = "echo '{\\"loss\\": 0.5, \\"lr\\": 0.1}' > train.json"
        metrics = ["train.json"]

        [targets.test]
        cmd = "echo '{\\"loss\\": 0.75}' > test.json"
        metrics = ["test.json"]
        """
    )
    assert project.run().code == 0
    (row,) = show(project)
    assert row["metrics"] == {"train.json:loss": 0.5, "lr": 0.1, "test.json:loss": 0.75}


def test_a_metrics_file_of_an_unknown_format_is_a_pipeline_error(project: Project) -> None:
    project.pipeline(
        """\
        [targets.evaluate]
        cmd = "echo 1 > m.csv"
        metrics = ["m.csv"]
        """
    )
    one_line_error(
        project.run(),
        "pipeline.toml: targets.evaluate.metrics: 'm.csv': unknown metrics format",
        ".json",
    )
    assert not (project.root / ".mlbuild").exists() and not (project.root / "m.csv").exists()


def test_a_metrics_file_is_an_output_but_not_an_argument_of_a_python_step(
    project: Project,
) -> None:
    """With named outputs the function still receives only the names it declared."""
    project.write(
        "steps.py",
        """\
        import json
        def evaluate(model, score):
            score.write_text("ok")
            open("metrics.json", "w").write(json.dumps({"acc": 0.5}))
        """,
    )
    project.write("model.txt", "m")
    project.pipeline(
        """\
        [targets.evaluate]
        python = "steps:evaluate"
        inputs = { model = "model.txt" }
        outputs = { score = "score.txt" }
        metrics = ["metrics.json"]
        """
    )
    result = project.run()
    assert result.code == 0, result
    (row,) = show(project)
    assert row["metrics"] == {"acc": 0.5}
    (project.root / "metrics.json").unlink()  # an output: missing makes the target stale
    assert "Step `evaluate` restored from cache" in project.run().out


def test_exp_show_plain_table_marks_the_workspace_row(dvc_project: Project) -> None:
    dvc_project.run("run", "--name", "baseline")
    dvc_project.run("run", "--set", "n_est=20")
    out = dvc_project.run("exp", "show").out.splitlines()
    columns = ["id", "name", "created", "n_est", "acc", "epochs", "loss.test", "loss.train"]
    assert out[0].split() == [*columns, "restorable"]
    first, second = show(dvc_project)
    assert out[1].startswith(f"   {first['id']}  baseline  ")
    assert out[1].split()[-6:] == ["10", "0.9", "10", "0.2", "0.1", "yes"]
    assert out[2].startswith(f"*  {second['id']}")
    assert "seed" not in out[0]  # the same in every row
    assert "seed" in dvc_project.run("exp", "show", "--all").out.splitlines()[0]
    by_acc = dvc_project.run("exp", "show", "--sort", "acc", "--reverse").out.splitlines()
    assert by_acc[1].startswith(f"*  {second['id']}")
    one_line_error(
        dvc_project.run("exp", "show", "--sort", "acu"),
        "--sort acu: no such metric or parameter",
        "did you mean 'acc'",
    )


def test_restorable_flips_when_gc_drops_a_rows_outputs(dvc_project: Project) -> None:
    dvc_project.run()
    dvc_project.run("run", "--set", "n_est=20")
    assert [r["restorable"] for r in show(dvc_project)] == [True, True]
    assert dvc_project.run("gc", "--max-size", "0").code == 0
    assert [r["restorable"] for r in show(dvc_project)] == [False, True]


def test_exp_diff_shows_params_and_metrics_with_deltas(dvc_project: Project) -> None:
    dvc_project.run("run", "--name", "baseline")
    dvc_project.run("run", "--set", "n_est=20")
    first, second = show(dvc_project)
    result = dvc_project.run("exp", "diff")
    assert result.code == 0, result
    lines = [line.split() for line in result.out.splitlines()]
    assert lines[0] == [first["id"], "(baseline)", f"*{second['id']}", "change"]
    assert ["n_est", "10", "20", "+10", "(+100.0%)"] in lines
    assert ["seed", "1", "1"] in lines
    assert ["acc", "0.9", "0.95", "+0.05", "(+5.6%)"] in lines
    assert ["loss.test", "0.2", "0.1", "-0.1", "(-50.0%)"] in lines
    named = dvc_project.run("exp", "diff", second["id"], "baseline")
    header = [f"*{second['id']}", first["id"], "(baseline)", "change"]
    assert named.out.splitlines()[0].split() == header
    assert ["n_est", "20", "10", "-10", "(-50.0%)"] in [r.split() for r in named.out.splitlines()]


def test_exp_apply_restores_a_row_without_running_a_step(dvc_project: Project) -> None:
    dvc_project.run("run", "--name", "baseline")
    dvc_project.write("pipeline.toml", PIPELINE.replace("n_est = 10", "n_est = 20"))
    assert dvc_project.run().started() == ["train", "evaluate"]
    result = dvc_project.run("exp", "apply", "baseline")
    assert result.code == 0, result
    assert "exp apply: set params.n_est = 10 in " in result.out
    assert result.started() == []
    assert "Step `train` restored from cache" in result.out
    assert "Step `evaluate` restored from cache" in result.out
    assert dvc_project.read("pipeline.toml") == PIPELINE  # the comment and layout kept
    assert dvc_project.read("build/model.txt") == "model 10\n"
    assert json.loads(dvc_project.read("eval/metrics.json"))["acc"] == 0.9
    rows = show(dvc_project)
    assert [(r["name"], r["current"]) for r in rows] == [("baseline", True), (None, False)]


def test_exp_apply_of_a_local_parameter_writes_it_in_its_target(project: Project) -> None:
    project.pipeline(
        """\
        [targets.train]
        cmd = "echo {params.depth} > out.txt"
        outputs = ["out.txt"]
        params = { depth = 3 }
        """
    )
    project.run()
    project.run("run", "--set", "train.depth=5")
    first = show(project)[0]
    assert first["params"] == {"train.depth": 3}
    project.pipeline(
        """\
        [targets.train]
        cmd = "echo {params.depth} > out.txt"
        outputs = ["out.txt"]
        params = { depth = 5 }
        """
    )
    result = project.run("exp", "apply", first["id"])
    assert result.code == 0 and result.started() == []
    assert "params = { depth = 3 }" in project.read("pipeline.toml")
    assert project.read("out.txt") == "3\n"


def test_exp_apply_of_an_unknown_id_changes_nothing(dvc_project: Project) -> None:
    dvc_project.run()
    before = dvc_project.read("pipeline.toml")
    one_line_error(
        dvc_project.run("exp", "apply", "zzz"),
        "exp apply zzz: no experiment row has that id or name",
    )
    assert dvc_project.read("pipeline.toml") == before
    assert len(show(dvc_project)) == 1


def test_exp_diff_with_one_row_is_a_usage_error(dvc_project: Project) -> None:
    dvc_project.run()
    one_line_error(dvc_project.run("exp", "diff"), "exp diff: 1 experiment row recorded")
    one_line_error(dvc_project.run("exp", "diff", "nope", "x"), "exp diff")


def test_exp_show_before_any_build(dvc_project: Project) -> None:
    result = dvc_project.run("exp", "show")
    assert result.code == 0 and result.out.startswith("No experiments recorded yet")
    assert show(dvc_project) == []
    assert not (dvc_project.root / ".mlbuild").exists()


def test_a_failed_build_records_no_row(dvc_project: Project) -> None:
    dvc_project.write("evaluate.py", "raise SystemExit(3)\n")
    result = dvc_project.run("run", "--name", "broken")
    assert result.code == 1
    assert "--name broken: the build failed, so no experiment row was recorded" in result.err
    assert show(dvc_project) == []


def test_schema_3_is_upgraded_keeping_manifests_and_history(dvc_project: Project) -> None:
    dvc_project.run()
    db = dvc_project.root / ".mlbuild/state.db"
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TABLE experiments")
        conn.execute("DROP TABLE metrics")
        conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    result = dvc_project.run("run", "--set", "n_est=20")
    assert result.code == 0 and "moved" not in result.err
    assert result.started() == ["train", "evaluate"]  # prepare's manifest was kept
    assert [r["params"]["n_est"] for r in show(dvc_project)] == [20]
    assert "run 1" in dvc_project.run("log").out


def test_the_no_op_imports_nothing_for_metrics_or_experiments(dvc_project: Project) -> None:
    dvc_project.run()
    script = textwrap.dedent(
        """
        import sys
        from mlbuild.cli import main
        code = main(["run"])
        print(sorted(m for m in sys.modules if m in ("mlbuild.experiments", "mlbuild.metrics")))
        sys.exit(code)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=dvc_project.root,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "3 skipped" in done.stdout
    assert done.stdout.splitlines()[-1] == "[]"


PARAMS_YAML = """\
# DVC-style parameters
train:
  n_est: 50     # number of trees
  seed: 1
"""

PARAMS_PIPELINE = f"""\
params_files = ["params.yaml"]

[targets.train]
cmd = "{sys.executable} train.py {{outputs.0}}"
inputs = ["train.py"]
outputs = ["model.txt"]
params = ["train.n_est"]

[targets.evaluate]
cmd = "{sys.executable} evaluate.py"
inputs = ["model.txt", "evaluate.py"]
metrics = ["eval/metrics.yaml"]
"""


def test_exp_apply_writes_a_params_file_key_back_with_its_comments(project: Project) -> None:
    project.write("params.yaml", PARAMS_YAML)
    project.pipeline(PARAMS_PIPELINE)
    project.write(
        "train.py",
        """\
        import sys
        from ruamel.yaml import YAML
        n = YAML(typ="safe", pure=True).load(open("params.yaml"))["train"]["n_est"]
        open(sys.argv[1], "w").write(f"{n}\\n")
        """,
    )
    project.write(
        "evaluate.py",
        """\
        import os
        n = int(open("model.txt").read())
        os.makedirs("eval", exist_ok=True)
        open("eval/metrics.yaml", "w").write(f"acc: {1 - 1 / n}\\nrun: {{name: x}}\\n")
        """,
    )
    assert project.run("run", "--name", "baseline").code == 0
    changed = project.run("run", "--set", "train.n_est=100")
    assert changed.started() == ["train", "evaluate"]
    assert [(r["params"], r["metrics"]) for r in show(project)] == [
        ({"train.n_est": 50}, {"acc": 0.98}),
        ({"train.n_est": 100}, {"acc": 0.99}),
    ]
    result = project.run("exp", "apply", "baseline")
    assert result.code == 0, result
    assert "exp apply: set train.n_est = 50 in " in result.out
    assert result.started() == []
    assert project.read("params.yaml") == PARAMS_YAML
    assert project.read("model.txt") == "50\n"
    assert [r["current"] for r in show(project)] == [True, False]


def test_naming_a_built_configuration_reads_metrics_not_yet_recorded(
    dvc_project: Project,
) -> None:
    """A state from before the metrics were recorded (here: the table emptied)."""
    dvc_project.run()
    with sqlite3.connect(dvc_project.root / ".mlbuild/state.db") as conn:
        conn.execute("DELETE FROM metrics")
        conn.execute("DELETE FROM experiments")
    result = dvc_project.run("run", "--name", "kept")
    assert result.code == 0 and result.started() == []
    (row,) = show(dvc_project)
    assert (row["name"], row["metrics"]["acc"], row["current"]) == ("kept", 0.9, True)


def test_exp_show_on_a_terminal_is_drawn_by_rich_with_the_current_row_bold(
    dvc_project: Project,
) -> None:
    from tests.test_progress import on_terminal

    dvc_project.run("run", "--name", "baseline")
    dvc_project.run("run", "--set", "n_est=20")
    current = show(dvc_project)[1]["id"]
    screen = on_terminal(dvc_project.root, "exp", "show")
    lines = screen.splitlines()
    assert "restorable" in lines[0] and "\x1b[1" in lines[0]  # the header, styled
    (row,) = [line for line in lines if current in line]
    assert row.startswith("\x1b[1m*  " + current), repr(row)  # bold, marked
    assert "baseline" in screen


def test_metrics_are_read_after_a_restore_from_the_remote_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second checkout gets every output from the team's remote (a directory) and
    records the evaluator's metrics without running it."""
    remote = tmp_path / "remote"
    checkouts = []
    for name in ("ci", "dev"):
        checkout = Project(tmp_path / name, capsys)
        checkout.pipeline(PIPELINE + f'\n[cache]\nremote = "{remote}"\n')
        checkout.write("prepare.py", PREPARE)
        checkout.write("train.py", TRAIN)
        checkout.write("evaluate.py", EVALUATE)
        checkouts.append(checkout)
    ci, dev = checkouts
    assert ci.run().code == 0
    result = dev.run()
    assert result.code == 0 and result.started() == []
    assert "Step `evaluate` restored from remote cache" in result.out
    (row,) = show(dev)
    assert row["metrics"]["acc"] == 0.9 and row["current"] and row["restorable"]


def test_no_row_for_outputs_whose_input_changed_while_the_step_ran(project: Project) -> None:
    project.write("in.txt", "a\n")
    project.pipeline(
        """\
        [targets.copy]
        cmd = "cat in.txt > out.txt; echo changed >> in.txt"
        inputs = ["in.txt"]
        outputs = ["out.txt"]
        """
    )
    result = project.run("run", "--name", "racy")
    assert result.code == 0
    assert "input 'in.txt' changed while the step ran" in result.err
    assert "--name racy: an input changed while a step ran, so no experiment row" in result.err
    assert show(project) == []


def test_keys_written_with_manifests_are_the_ones_the_table_computes(project: Project) -> None:
    """A build writes each manifest's cache key with it (it looked the key up already): the
    same key `key_of` derives from the manifest, for every shape of target, and none where
    the inputs changed under the step (its manifest records the change, so its key differs)."""
    from mlbuild.experiments import key_of
    from mlbuild.store import open_store

    project.write("in.txt", "a\n")
    project.write("shared.txt", "one\n")
    project.pipeline(
        """
        [targets.two]
        cmd = "cp {inputs.src} {outputs.a} && cp {inputs.src} {outputs.b}"
        inputs = { src = "in.txt" }
        outputs = { a = "two/a.txt", b = "two/b.txt" }

        [targets.tree]
        cmd = "mkdir -p {outputs.d} && cp {inputs.a} {outputs.d}/x.txt"
        inputs = { a = "two/a.txt" }
        outputs = { d = "tree" }

        [targets.uncached]
        cmd = "cp {inputs.src} {outputs.o}"
        cache = false
        inputs = { src = "in.txt" }
        outputs = { o = "uncached.txt" }

        [targets.moved]
        cmd = "cat {inputs.s} > {outputs.o}; printf 'two\\n' > {inputs.s}"
        inputs = { s = "shared.txt" }
        outputs = { o = "moved.txt" }
        """
    )

    def kept() -> dict[str, str | None]:
        with open_store(project.root / ".mlbuild", print) as store:
            keys = store.load_manifest_keys()
            manifests = store.load_manifests()
        assert set(keys) == {"two", "tree", "uncached", "moved"}
        for target, key in keys.items():
            assert key is None or key == key_of(target, manifests[target]), target
        return keys

    first = project.run("run", "-j", "1")
    assert first.code == 0, first.err
    keys = kept()
    assert keys["two"] and keys["tree"]
    assert keys["moved"] is None  # changed while its step ran: not the key it was looked up by
    project.run("clean")
    again = project.run("run", "-j", "1")  # restored from the cache this time
    assert "restored" in again.out
    assert kept()["two"] == keys["two"]
