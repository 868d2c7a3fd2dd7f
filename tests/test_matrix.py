"""Matrix targets (issue 16, item 1), through the real CLI: points run, cache, select, group.

A `matrix = {...}` target is expanded at load into one ordinary target per
point (`train@lr=0.1,epochs=1`); these tests check what a user sees of that:
which steps start, the bytes of their outputs, the lines of `list`, `status`
and `dag`, and the one-line error of each mistake.
"""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mlbuild.build.lock import hold_workspace
from mlbuild.build.results import BuildOptions
from mlbuild.build.runner import run_build
from mlbuild.graph import build_graph
from mlbuild.pipeline.load import load_pipeline
from mlbuild.ui.report import PlainReporter
from tests.conftest import Project

# Each point waits (up to 20 s) until two points have started: at -j 1 the first
# would time out and fail, so passing shows two points ran at once.
BARRIER = (
    "touch started/{matrix.lr}-{matrix.epochs};"
    " i=0; while [ $(ls started | wc -l) -lt 2 ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done;"
    " [ $(ls started | wc -l) -ge 2 ] &&"
)

TWO_BY_TWO = """
[targets.train]
cmd = "echo lr={matrix.lr} epochs={matrix.epochs} > {outputs.model}"
outputs = { model = "models/{matrix.lr}-{matrix.epochs}.txt" }
matrix = { lr = [0.1, 0.01], epochs = [1, 2] }

[targets.report]
cmd = "cat {inputs} > {outputs.0}"
inputs = ["{targets.train.outputs.model}"]
outputs = ["report.txt"]
"""

POINTS = [
    "train@lr=0.1,epochs=1",
    "train@lr=0.1,epochs=2",
    "train@lr=0.01,epochs=1",
    "train@lr=0.01,epochs=2",
]


def one_axis(values: str) -> str:
    """A matrix over `lr` alone with an aggregator reading every point's output."""
    return f"""
[targets.train]
cmd = "echo {{matrix.lr}} > {{outputs.model}}"
outputs = {{ model = "models/{{matrix.lr}}.txt" }}
matrix = {{ lr = [{values}] }}

[targets.report]
cmd = "cat {{inputs}} > {{outputs.0}}"
inputs = ["{{targets.train.outputs.model}}"]
outputs = ["report.txt"]
"""


def test_a_2x2_matrix_runs_four_points_two_at_once(project: Project) -> None:
    project.write("started/.keep", "")
    project.pipeline(
        f"""
        [targets.train]
        cmd = "{BARRIER} echo lr={{matrix.lr}} epochs={{matrix.epochs}} > {{outputs.model}}"
        outputs = {{ model = "models/{{matrix.lr}}-{{matrix.epochs}}.txt" }}
        matrix = {{ lr = [0.1, 0.01], epochs = [1, 2] }}
        """
    )
    result = project.run("run", "-j", "2")
    assert result.code == 0, result
    assert sorted(result.started()) == sorted(POINTS)
    for lr in ("0.1", "0.01"):
        for epochs in ("1", "2"):
            text = project.read(f"models/{lr}-{epochs}.txt")
            assert text == f"lr={lr} epochs={epochs}\n"
    assert project.run("run", "-j", "2").started() == []


def test_the_aggregator_reads_every_point_in_order(project: Project) -> None:
    project.pipeline(TWO_BY_TWO)
    result = project.run("run", "-j", "2")
    assert result.code == 0, result
    assert result.started()[-1] == "report"
    assert project.read("report.txt") == (
        "lr=0.1 epochs=1\nlr=0.1 epochs=2\nlr=0.01 epochs=1\nlr=0.01 epochs=2\n"
    )


def test_adding_a_value_runs_exactly_one_new_point(project: Project) -> None:
    project.pipeline(one_axis("0.1, 0.01"))
    assert project.run("run").code == 0
    project.pipeline(one_axis("0.1, 0.01, 0.001"))
    result = project.run("run")
    assert result.code == 0, result
    assert result.started() == ["train@lr=0.001", "report"]
    assert project.read("report.txt") == "0.1\n0.01\n0.001\n"


def test_removing_a_value_runs_no_point_and_keeps_its_output(project: Project) -> None:
    project.pipeline(one_axis("0.1, 0.01, 0.001"))
    assert project.run("run").code == 0
    project.pipeline(one_axis("0.1, 0.001"))
    result = project.run("run")
    assert result.started() == ["report"]  # its inputs lost a path; no point runs
    assert project.read("report.txt") == "0.1\n0.001\n"
    assert project.read("models/0.01.txt") == "0.01\n"  # not deleted
    clean = project.run("clean", "report")
    assert "train@lr=0.01" in clean.out  # pointed out as no longer in the pipeline
    assert project.run("clean", "train@lr=0.01").code == 0
    assert not (project.root / "models/0.01.txt").exists()


def test_the_aggregator_reruns_only_when_a_point_output_changes(project: Project) -> None:
    template = """
    [targets.train]
    cmd = "echo {{matrix.lr}} | cut -c1-3 > {{outputs.model}} # {note}"
    outputs = {{ model = "models/{{matrix.lr}}.txt" }}
    matrix = {{ lr = [0.1, 0.2] }}

    [targets.report]
    cmd = "cat {{inputs}} > {{outputs.0}}"
    inputs = ["{{targets.train.outputs.model}}"]
    outputs = ["report.txt"]
    """
    project.pipeline(template.format(note="a"))
    assert project.run("run").code == 0
    project.pipeline(template.format(note="b"))  # every point reruns, same bytes out
    result = project.run("run")
    assert sorted(result.started()) == ["train@lr=0.1", "train@lr=0.2"]
    project.pipeline(template.format(note="b").replace("cut -c1-3", "cut -c1-2"))
    result = project.run("run")
    assert result.started()[-1] == "report"
    assert project.read("report.txt") == "0.\n0.\n"


def test_one_point_or_all_points_by_name(project: Project) -> None:
    project.pipeline(TWO_BY_TWO)
    result = project.run("run", "train@lr=0.1,epochs=2")
    assert result.started() == ["train@lr=0.1,epochs=2"]
    result = project.run("run", "train")
    assert sorted(result.started()) == sorted(set(POINTS) - {"train@lr=0.1,epochs=2"})
    assert not (project.root / "report.txt").exists()
    result = project.run("run", "--force", "train")
    assert sorted(result.started()) == sorted(POINTS)  # forced, and report not selected
    status = project.run("status", "train@lr=0.01,epochs=1")
    assert status.out == "fresh  train@lr=0.01,epochs=1\n"


def test_show_and_log_take_a_point_and_refuse_the_matrix_name(project: Project) -> None:
    talking = 'cmd = "echo training; echo lr='  # a log to name (a silent step leaves none)
    project.pipeline(TWO_BY_TWO.replace('cmd = "echo lr=', talking))
    assert project.run("run").code == 0
    shown = project.run("show", "train@lr=0.1,epochs=1")
    assert shown.code == 0 and "lr" in shown.out
    log = project.run("log", "train@lr=0.1,epochs=1")
    assert log.code == 0 and ".mlbuild/logs/train_lr_0.1_epochs_1-" in log.out
    refused = project.run("show", "train")
    assert refused.code == 2
    assert "'train' is a matrix target of 4 points" in refused.err
    assert "train@lr=0.1,epochs=1" in refused.err


def test_clean_of_the_matrix_name_cleans_every_point(project: Project) -> None:
    project.pipeline(TWO_BY_TWO)
    assert project.run("run").code == 0
    result = project.run("clean", "train")
    assert result.code == 0
    assert sorted(result.out.splitlines()) == sorted(
        f"removed models/{p.split('=', 1)[1].replace(',epochs=', '-')}.txt" for p in POINTS
    )


def test_clean_of_a_removed_matrix_target_cleans_its_recorded_points(project: Project) -> None:
    project.pipeline(TWO_BY_TWO)
    assert project.run("run").code == 0
    project.pipeline('[targets.other]\ncmd = "true"\n')
    assert "train@lr=0.1,epochs=1" in project.run("clean").out  # pointed out, kept
    assert (project.root / "models/0.1-1.txt").exists()
    result = project.run("clean", "train")
    assert result.code == 0, result
    assert not any((project.root / "models").iterdir())
    assert "report" in project.run("clean").out  # the report's outputs are still kept


def test_the_experiment_table_has_no_column_per_point(project: Project) -> None:
    project.pipeline(
        """
        [params]
        seed = 1

        [targets.train]
        cmd = '''printf '{"acc": %s}' {matrix.lr} > {outputs.0}'''
        params = ["seed"]
        metrics = ["m/{matrix.lr}.json"]
        matrix = { lr = [0.5, 0.25] }
        """
    )
    assert project.run("run").code == 0
    table = project.run("exp", "show", "--all").out  # every parameter, varying or not
    assert "seed" in table and "m/0.5.json:acc" in table
    assert "train@" not in table


def test_values_are_named_canonically(project: Project) -> None:
    project.pipeline(one_axis("0.10, 1e-3, true"))
    result = project.run("run")
    assert result.code == 0, result
    assert result.started() == ["train@lr=0.1", "train@lr=0.001", "train@lr=true", "report"]
    project.pipeline(one_axis("0.1, 0.001, true"))  # the same values spelt otherwise
    assert project.run("run").started() == []


def test_a_python_point_gets_its_values_as_keyword_arguments(project: Project) -> None:
    project.write(
        "steps.py",
        """
        def train(model, lr, epochs, scale):
            model.write_text(f"{lr!r} {epochs!r} {scale!r}\\n")
        """,
    )
    project.pipeline(
        """
        [params]
        scale = 3

        [targets.train]
        python = "steps:train"
        outputs = { model = "m/{matrix.lr}-{matrix.epochs}.txt" }
        params = ["scale"]
        matrix = { lr = [0.5], epochs = [1, 2] }
        """
    )
    result = project.run("run")
    assert result.code == 0, result
    assert project.read("m/0.5-1.txt") == "0.5 1 3\n"
    assert project.read("m/0.5-2.txt") == "0.5 2 3\n"
    project.pipeline(project.read("pipeline.toml").replace("scale = 3", "scale = 4"))
    assert len(project.run("run").started()) == 2  # a global param still counts


def test_matrix_values_fill_local_params_and_reach_the_shell_quoted(project: Project) -> None:
    project.pipeline(
        """
        [targets.t]
        cmd = "echo {params.tag} {matrix.word} > {outputs.0}"
        outputs = ["out/{matrix.word}.txt"]
        params = { tag = "w-{matrix.word}" }
        matrix = { word = ["a+b", "c-d"] }
        """
    )
    assert project.run("run").code == 0
    assert project.read("out/a+b.txt") == "w-a+b a+b\n"
    assert project.read("out/c-d.txt") == "w-c-d c-d\n"


def test_after_a_matrix_name_waits_for_every_point(project: Project) -> None:
    project.pipeline(
        TWO_BY_TWO
        + """
[targets.last]
cmd = "ls models > {outputs.0}"
outputs = ["listing.txt"]
after = ["train"]
"""
    )
    assert project.run("run", "last").code == 0
    assert project.read("listing.txt").split() == sorted(
        ["0.1-1.txt", "0.1-2.txt", "0.01-1.txt", "0.01-2.txt"]
    )


# --- what a user reads -------------------------------------------------------------------------

SIX = """
[targets.prep]
cmd = "echo data > {outputs.0}"
outputs = ["data.txt"]

[targets.train]
cmd = "cat {inputs.data} > {outputs.model}; echo {matrix.lr} >> {outputs.model}"
inputs = { data = "data.txt" }
outputs = { model = "models/{matrix.lr}-{matrix.seed}.txt" }
matrix = { lr = [0.1, 0.01, 0.001], seed = [1, 2] }

[targets.report]
cmd = "cat {inputs} > {outputs.0}"
inputs = ["{targets.train.outputs.model}"]
outputs = ["report.txt"]
"""


def test_list_shows_a_matrix_target_once_with_its_axes(project: Project) -> None:
    project.pipeline(SIX)
    result = project.run("list")
    assert result.out == (
        "prep: echo data > {outputs.0}\n"
        "train: cat {inputs.data} > {outputs.model}; echo {matrix.lr} >> {outputs.model}"
        "  [6 points: lr = 0.1, 0.01, 0.001; seed = 1, 2]  (after prep)\n"
        "report: cat {inputs} > {outputs.0}  (after train)\n"
    )
    verbose = project.run("list", "-v").out.splitlines()
    assert verbose[2:8] == [
        f"  train@lr={lr},seed={s}" for lr in ("0.1", "0.01", "0.001") for s in (1, 2)
    ]
    names = project.run("list", "--names").out.split()
    assert names[0] == "train" and "train@lr=0.001,seed=2" in names


def test_status_counts_points_and_names_the_stale_ones(project: Project) -> None:
    project.pipeline(SIX)
    assert project.run("run").code == 0
    project.pipeline(SIX.replace("0.001", "0.002"))
    result = project.run("status")
    assert result.code == 1
    assert result.out == (
        "fresh  prep\n"
        "stale  train: 6 points: 4 fresh, 2 stale\n"
        "stale    train@lr=0.002,seed=1: never built\n"
        "stale    train@lr=0.002,seed=2: never built\n"
        "stale  report: input removed: models/0.001-1.txt; input removed: models/0.001-2.txt;"
        " input added: models/0.002-1.txt; input added: models/0.002-2.txt;"
        " upstream 'train' would run (2 points)\n"
    )
    verbose = project.run("status", "-v").out.splitlines()
    assert "fresh    train@lr=0.1,seed=1" in verbose
    assert len([line for line in verbose if "train@" in line]) == 6


def test_status_of_many_stale_points_stays_short(project: Project) -> None:
    values = ", ".join(str(i) for i in range(100))
    project.pipeline(
        f"""
        [targets.t]
        cmd = "echo {{matrix.i}} > {{outputs.0}}"
        outputs = ["out/{{matrix.i}}.txt"]
        matrix = {{ i = [{values}] }}
        """
    )
    lines = project.run("status").out.splitlines()
    assert lines[0] == "stale  t: 100 points: 0 fresh, 100 stale"
    assert lines[1:6] == [f"stale    t@i={i}: never built" for i in range(5)]
    assert lines[6].strip() == "... and 95 more stale points (-v lists all)"
    assert len(lines) == 7


def test_dag_draws_a_matrix_target_as_one_node(project: Project) -> None:
    project.pipeline(SIX)
    text = project.run("dag").out
    assert text.split(": ", 1)[1] == (
        "3 targets, 2 edges, 3 stages\n"
        "\n"
        "1  prep\n"
        "2  train [6 points]  <- prep\n"
        "3  report            <- train [6 points]\n"
    )
    dot = project.run("dag", "--dot").out
    assert '"train [6 points]" -> "report";' in dot and "train@" not in dot
    mermaid = project.run("dag", "--mermaid").out
    assert 't1["train [6 points]"]' in mermaid and "t1 --> t2" in mermaid
    assert "train@lr=0.1,seed=1" in project.run("dag", "-v").out


def test_dag_status_marks_a_matrix_stale_if_any_point_is(project: Project) -> None:
    project.pipeline(SIX)
    assert project.run("run", "prep", "train@lr=0.1,seed=1").code == 0
    text = project.run("dag", "--status").out
    assert "2  train [6 points]  STALE  <- prep\n" in text
    assert "     5 of 6 points stale\n" in text


# --- mistakes: one line, exit 2, naming file, target and key -----------------------------------


def target_with(matrix: str, outputs: str = '["o/{matrix.lr}.txt"]', extra: str = "") -> str:
    return f"""
{extra}
[targets.t]
cmd = "echo {{matrix.lr}} > {{outputs.0}}"
outputs = {outputs}
matrix = {matrix}
"""


BAD = [
    (target_with("{ lr = [] }"), "targets.t.matrix.lr: must be a non-empty list of values"),
    (target_with("{ lr = 0.1 }"), "targets.t.matrix.lr: must be a non-empty list of values"),
    (target_with("{ lr = [[1]] }"), "targets.t.matrix.lr: [1]: matrix values are strings"),
    (target_with("{ lr = [{ a = 1 }] }"), "targets.t.matrix.lr: {'a': 1}: matrix values are"),
    (target_with('{ lr = ["a b"] }'), "targets.t.matrix.lr: 'a b': a matrix string uses"),
    (target_with('{ lr = ["x/y"] }'), "targets.t.matrix.lr: 'x/y': a matrix string uses"),
    (target_with("{}"), "targets.t.matrix: must be a table of KEY = [values]"),
    (
        target_with("{ lr = [1] }", extra="[params]\nlr = 2"),
        "targets.t.matrix.lr: 'lr' is also a global parameter",
    ),
    (
        target_with("{ lr = [1] }").replace("matrix =", "params = { lr = 2 }\nmatrix ="),
        "targets.t.matrix.lr: 'lr' is also a local parameter of this target",
    ),
    (target_with("{ lr = [0.1, 0.10] }"), "targets.t.matrix.lr: 0.1 is listed twice"),
    (
        target_with('{ lr = [1, "1"] }'),
        "targets.t.matrix.lr: 1 and '1' give the same point name (lr=1)",
    ),
    (
        target_with("{ lr = [1, 2], seed = [3] }", outputs='["o/{matrix.seed}.txt"]'),
        "targets.t.outputs: points 't@lr=1,seed=3' and 't@lr=2,seed=3' both write 'o/3.txt'"
        " (put {matrix.lr} in the path)",
    ),
    (
        target_with("{ lr = [1] }", outputs='["o/{matrix.rate}.txt"]'),
        "targets.t.outputs: {matrix.rate}: no such matrix key (the matrix has lr)",
    ),
    (
        target_with("{ lr = [1] }").replace("echo {matrix.lr}", "echo {matrix.lrr}"),
        "targets.t.cmd: {matrix.lrr}: no such matrix key (the matrix has lr)",
    ),
    (
        target_with("{ lr = [1] }").replace("echo {matrix.lr}", "echo '{matrix.lr}'"),
        "targets.t.cmd: {matrix.lr} is inside single quotes",
    ),
    (
        '[targets.t]\ncmd = "echo {matrix.lr} > {outputs.0}"\noutputs = ["o.txt"]\n',
        "targets.t.cmd: {matrix.KEY} in a target without a matrix",
    ),
    (
        TWO_BY_TWO.replace("{targets.train.outputs.model}", "{targets.trian.outputs.model}"),
        "targets.report.inputs: {targets.trian.outputs.model}: unknown target 'trian'"
        " (did you mean 'train'?)",
    ),
    (
        TWO_BY_TWO.replace("{targets.train.outputs.model}", "{targets.train.outputs.mdl}"),
        "targets.report.inputs: {targets.train.outputs.mdl}: no such output of 'train' (model)",
    ),
    (
        TWO_BY_TWO.replace('["{targets.train.outputs.model}"]', '"x{targets.train.outputs.model}"'),
        "targets.report.inputs: 'x{targets.train.outputs.model}': write a reference alone",
    ),
    (
        TWO_BY_TWO.replace(
            '["{targets.train.outputs.model}"]', '{ m = "{targets.train.outputs.model}" }'
        ),
        "targets.report.inputs: {targets.NAME.outputs.X} stands for many paths:"
        " use the list form of inputs",
    ),
    (
        TWO_BY_TWO.replace("{targets.train.outputs.model}", "{targets.report.outputs.0}")
        .replace("[targets.report]", '[targets.other]\ncmd = "true"\n\n[targets.report]')
        .replace("{targets.report.outputs.0}", "{targets.other.outputs.0}"),
        "targets.report.inputs: {targets.other.outputs.0}: 'other' is not a matrix target;"
        " name its path instead",
    ),
]


@pytest.mark.parametrize(("text", "needle"), BAD)
def test_a_mistake_is_one_line_naming_file_target_and_key(
    project: Project, text: str, needle: str
) -> None:
    project.pipeline(text)
    result = project.run("run")
    assert result.code == 2, result
    assert "Traceback" not in result.err
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("mlbuild: error: ")
    assert "pipeline.toml: " in lines[0]
    assert needle in lines[0]
    assert not (project.root / "o").exists() and not (project.root / ".mlbuild").exists()


def test_an_unknown_point_suggests_a_near_name(project: Project) -> None:
    project.pipeline(TWO_BY_TWO)
    result = project.run("run", "trian")
    assert result.code == 2
    assert "unknown target 'trian'" in result.err and "(did you mean 'train'?)" in result.err


# --- cost --------------------------------------------------------------------------------------


def test_a_pipeline_without_a_matrix_imports_nothing_of_it(tmp_path: Path) -> None:
    (tmp_path / "pipeline.toml").write_text(
        textwrap.dedent(
            """
            [targets.a]
            cmd = "echo a > {outputs.0}"
            outputs = ["a.txt"]
            """
        )
    )
    script = (
        "import sys\n"
        "from mlbuild.cli import main\n"
        "for _ in range(2):\n"
        "    main(['run', '-q'])\n"
        "main(['status']); main(['list']); main(['dag'])\n"
        "print(sorted(m for m in sys.modules if 'matrix' in m))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    assert out.splitlines()[-1] == "[]"


def test_a_no_op_run_of_a_matrix_pipeline_imports_nothing_of_it(tmp_path: Path) -> None:
    (tmp_path / "pipeline.toml").write_text(textwrap.dedent(TWO_BY_TWO))
    script = (
        "import sys\n"
        "from mlbuild.cli import main\n"
        "main(['run', '-q']); main(['run', '-q'])  # the second one compiles the pipeline\n"
        "before = {m for m in sys.modules if 'matrix' in m}\n"
        "for m in before: del sys.modules[m]\n"
        "main(['run', '-q', 'train'])\n"
        "print(sorted(m for m in sys.modules if 'matrix' in m))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    assert out.splitlines()[-1] == "[]"


def test_forcing_a_matrix_name_in_the_build_api_forces_every_point(project: Project) -> None:
    """What `watch --force train` hands the build: the name, not the points."""
    project.pipeline(TWO_BY_TWO)
    assert project.run("run").code == 0
    graph = build_graph(load_pipeline(project.root / "pipeline.toml", {}))
    out = io.StringIO()
    reporter = PlainReporter(out, io.StringIO())
    options = BuildOptions(force=frozenset({"train"}))
    with hold_workspace(project.root, "run", wait=False, warn=reporter.warn) as store:
        assert run_build(graph, store, reporter, options).ok
    started = [line.split("`")[1] for line in out.getvalue().splitlines() if "has started" in line]
    assert sorted(started) == sorted(POINTS)
