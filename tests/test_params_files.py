"""Params files end to end: a DVC-style project (prepare -> featurize -> train -> evaluate,
scripts reading params.yaml themselves) built through the real CLI.

What a user sees: which steps start after an edit of params.yaml, what `--set`
writes into the file (comments kept), and one line with exit 2 for each
mistake, with nothing changed on disk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import Project, Result

PY = sys.executable

PARAMS_YAML = """\
# Parameters of the DVC example project, ported.
prepare:
  split: 0.20   # fraction held out
  seed: 20170428

featurize:
  max_features: 100
  ngrams: 1

train:
  n_est: 50     # number of trees
  seed: 1       # not listed by any target
"""

# Each script reads params.yaml itself, as DVC's scripts do: argv is (input,) output.
READ = """\
import json, sys
from ruamel.yaml import YAML
p = YAML(typ="safe", pure=True).load(open("params.yaml"))
before = open(sys.argv[1]).read() if len(sys.argv) > 2 else ""
"""
WRITE = "open(sys.argv[-1], 'w').write(before + {})\n"
SCRIPTS = {
    "scripts/prepare.py": READ + WRITE.format("f\"split {p['prepare']['split']}\\n\""),
    "scripts/featurize.py": READ + WRITE.format("json.dumps(p['featurize']) + '\\n'"),
    "scripts/train.py": READ + WRITE.format("f\"n_est {p['train']['n_est']}\\n\""),
    "scripts/evaluate.py": READ + WRITE.format("'scored'"),
}

PIPELINE = f"""\
params_files = ["params.yaml"]

[targets.prepare]
cmd = "{PY} scripts/prepare.py {{outputs.0}}"
outputs = ["data/prepared.txt"]
params = ["prepare.split", "prepare.seed"]

[targets.featurize]
cmd = "{PY} scripts/featurize.py {{inputs.0}} {{outputs.0}}"
inputs = ["data/prepared.txt"]
outputs = ["data/features.txt"]
params = ["featurize"]

[targets.train]
cmd = "{PY} scripts/train.py {{inputs.0}} {{outputs.0}}"
inputs = ["data/features.txt"]
outputs = ["model.txt"]
params = ["train.n_est"]

[targets.evaluate]
cmd = "{PY} scripts/evaluate.py {{inputs.0}} {{outputs.0}}"
inputs = ["model.txt"]
outputs = ["eval/metrics.txt"]
"""


@pytest.fixture
def dvc(project: Project) -> Project:
    """The DVC-style project, built once."""
    for rel, text in SCRIPTS.items():
        project.write(rel, text)
    project.write("params.yaml", PARAMS_YAML)
    project.pipeline(PIPELINE)
    first = project.run("run", "--plain")
    assert first.code == 0, first
    assert first.started() == ["prepare", "featurize", "train", "evaluate"]
    return project


def edit(project: Project, rel: str, old: str, new: str) -> None:
    text = project.read(rel)
    assert old in text
    (project.root / rel).write_text(text.replace(old, new))


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file of the project outside .mlbuild/, with its bytes."""
    found: dict[str, bytes] = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".mlbuild"]
        for name in files:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = Path(path).read_bytes()
    return found


def one_line_error(result: Result, *needles: str) -> str:
    """Exit 2, one line on stderr holding every needle, no traceback, no step started."""
    assert result.code == 2, result
    assert "Traceback" not in result.err + result.out
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not result.started()
    return lines[0]


# --- per-key invalidation -------------------------------------------------------


def test_editing_a_listed_key_reruns_its_target_and_downstream_only(dvc: Project) -> None:
    edit(dvc, "params.yaml", "n_est: 50", "n_est: 60")
    result = dvc.run("run", "--plain")
    assert result.code == 0, result
    assert result.started() == ["train", "evaluate"]
    assert "Step `train` has started: param train.n_est changed 50 -> 60." in result.out
    assert dvc.read("eval/metrics.txt").endswith("n_est 60\nscored")


def test_editing_a_key_no_target_lists_reruns_nothing(dvc: Project) -> None:
    edit(dvc, "params.yaml", "seed: 1 ", "seed: 7 ")
    edit(dvc, "params.yaml", "# Parameters", "# Edited parameters")
    result = dvc.run("run", "--plain")
    assert result.code == 0, result
    assert result.started() == []


def test_a_listed_section_counts_every_key_below_it(dvc: Project) -> None:
    edit(dvc, "params.yaml", "ngrams: 1", "ngrams: 2")
    result = dvc.run("run", "--plain")
    assert result.started() == ["featurize", "train", "evaluate"]
    assert "param featurize.ngrams changed 1 -> 2" in result.out
    edit(dvc, "params.yaml", "ngrams: 2", "ngrams: 2\n  stop_words: true")
    result = dvc.run("run", "--plain")
    assert result.started() == ["featurize", "train", "evaluate"]
    assert "param featurize.stop_words added (= true)" in result.out


# --- --set writes into the file --------------------------------------------------


def test_set_writes_the_value_into_the_yaml_file_keeping_comments(dvc: Project) -> None:
    result = dvc.run("run", "--plain", "--set", "train.n_est=100")
    assert result.code == 0, result
    assert result.out.splitlines()[0] == "mlbuild: params.yaml: set train.n_est = 100 (was 50)"
    assert dvc.read("params.yaml") == PARAMS_YAML.replace("n_est: 50 ", "n_est: 100")
    assert result.started() == ["train", "evaluate"]
    assert dvc.read("model.txt").endswith("n_est 100\n")  # the script read the file
    again = dvc.run("run", "--plain")
    assert again.started() == [] and "mlbuild: params.yaml" not in again.out
    same = dvc.run("run", "--plain", "--set", "train.n_est=100")  # already so: not rewritten
    assert "set train.n_est" not in same.out and same.started() == []


def test_set_writes_into_a_toml_params_file_keeping_comments(project: Project) -> None:
    toml = '# knobs\n[train]\nn_est = 50  # trees\nlr = 0.1\n\n[other]\nx = "y"\n'
    project.write("params.toml", toml)
    project.pipeline(
        """\
        params_files = ["params.toml"]
        [targets.train]
        cmd = "echo {params.train.n_est} {params.train.lr} > {outputs.0}"
        outputs = ["model.txt"]
        params = ["train"]
        """
    )
    assert project.run("run").code == 0
    result = project.run("run", "--plain", "--set", "train.lr=0.5")
    assert "mlbuild: params.toml: set train.lr = 0.5 (was 0.1)" in result.out
    assert project.read("params.toml") == toml.replace("lr = 0.1", "lr = 0.5")
    assert project.read("model.txt") == "50 0.5\n"
    edit(project, "params.toml", 'x = "y"', 'x = "z"')
    assert project.run("run", "--plain").started() == []


def test_json_params_file_keeps_order_and_indent(project: Project) -> None:
    text = '{\n    "train": {\n        "n_est": 50,\n        "lr": 0.1\n    },\n    "seed": 3\n}\n'
    project.write("params.json", text)
    project.pipeline(
        """\
        params_files = ["params.json"]
        [targets.train]
        cmd = "echo {params.train.n_est} > {outputs.0}"
        outputs = ["model.txt"]
        params = ["train.n_est"]
        """
    )
    assert project.run("run").code == 0
    result = project.run("run", "--plain", "--set", "train.n_est=7")
    assert "mlbuild: params.json: set train.n_est = 7 (was 50)" in result.out
    assert project.read("params.json") == text.replace("50", "7")
    assert project.read("model.txt") == "7\n"
    edit(project, "params.json", '"seed": 3', '"seed": 4')
    assert project.run("run", "--plain").started() == []


def test_status_and_dry_run_apply_set_without_writing(dvc: Project) -> None:
    before = snapshot(dvc.root)
    status = dvc.run("status", "--set", "train.n_est=3")
    assert status.code == 1
    assert "stale  train: param train.n_est changed 50 -> 3" in status.out
    dry = dvc.run("run", "-n", "--set", "train.n_est=3")
    assert dry.code == 0 and "set train.n_est" not in dry.out
    assert snapshot(dvc.root) == before


def test_a_bad_set_among_good_ones_changes_nothing(dvc: Project) -> None:
    before = snapshot(dvc.root)
    result = dvc.run("run", "--set", "train.n_est=100", "--set", "train.n_estt=1")
    one_line_error(result, "--set train.n_estt", "did you mean 'train.n_est'?")
    section = dvc.run("run", "--set", "train.n_est=100", "--set", "featurize=3")
    one_line_error(section, "--set featurize: a section of params.yaml")
    assert snapshot(dvc.root) == before


def test_a_python_step_receives_a_params_file_section_as_a_nested_table(
    project: Project,
) -> None:
    project.write("params.yaml", "train:\n  n_est: 5\n  opt:\n    lr: 0.1\n")
    project.write(
        "steps.py",
        """\
        import json

        def train(outputs, train):
            outputs[0].write_text(json.dumps(train, sort_keys=True))
        """,
    )
    project.pipeline(
        """\
        params_files = ["params.yaml"]
        [targets.train]
        python = "steps:train"
        outputs = ["model.json"]
        params = ["train.n_est", "train.opt"]
        """
    )
    result = project.run("run", "--plain")
    assert result.code == 0, result
    assert json.loads(project.read("model.json")) == {"n_est": 5, "opt": {"lr": 0.1}}


def test_a_python_step_reading_the_params_file_itself_reruns_only_for_its_keys(
    project: Project,
) -> None:
    project.write("params.yaml", PARAMS_YAML)
    project.write(
        "steps.py",
        """\
        from ruamel.yaml import YAML

        def train(outputs, train):  # `train` holds the listed keys; read the file anyway
            with open("params.yaml") as handle:
                p = YAML(typ="safe", pure=True).load(handle)
            outputs[0].write_text(str(p["train"]["n_est"]))
        """,
    )
    project.pipeline(
        """\
        params_files = ["params.yaml"]
        [targets.train]
        python = "steps:train"
        outputs = ["model.txt"]
        params = ["train.n_est"]
        """
    )
    assert project.run("run", "--plain").code == 0
    edit(project, "params.yaml", "seed: 1 ", "seed: 2 ")
    assert project.run("run", "--plain").started() == []  # not a discovered input
    edit(project, "params.yaml", "n_est: 50", "n_est: 51")
    result = project.run("run", "--plain")
    assert result.started() == ["train"]
    assert project.read("model.txt") == "51"


# --- bad input: one line, exit 2, nothing changed on disk ---------------------------


SIMPLE = """\
params_files = ["{file}"]
[targets.train]
cmd = "echo x > {{outputs.0}}"
outputs = ["model.txt"]
params = ["{key}"]
"""


@pytest.mark.parametrize(
    ("file", "text", "needles"),
    [
        ("params.yaml", "train:\n  n_est: [1, 2\n", ("params.yaml:3:", "invalid YAML")),
        ("params.yaml", "train:\n  n_est: 1\n  n_est: 2\n", ("params.yaml:3:", "invalid YAML")),
        ("params.json", '{\n  "train": {"n_est": 1,}\n}\n', ("params.json:2:", "invalid JSON")),
        ("params.toml", "[train]\nn_est = \n", ("params.toml:2:", "invalid TOML")),
        ("params.yaml", "- 1\n- 2\n", ("params.yaml: the top level must be a mapping",)),
        ("params.yaml", "train:\n  a.b: 1\n", ("params.yaml: train: key 'a.b'",)),
    ],
)
def test_a_params_file_that_does_not_parse(
    project: Project, file: str, text: str, needles: tuple[str, ...]
) -> None:
    project.write(file, text)
    project.pipeline(SIMPLE.format(file=file, key="train.n_est"))
    before = snapshot(project.root)
    one_line_error(project.run("run", "--set", "train.n_est=3"), *needles)
    assert snapshot(project.root) == before


def test_a_listed_key_that_does_not_exist_names_file_and_key(project: Project) -> None:
    project.write("params.yaml", PARAMS_YAML)
    project.pipeline(SIMPLE.format(file="params.yaml", key="train.n_estimators"))
    before = snapshot(project.root)
    line = one_line_error(
        project.run("run"),
        "pipeline.toml: targets.train.params:",
        "unknown parameter 'train.n_estimators'",
        "params.yaml",
        "(did you mean 'train.n_est'?)",
    )
    assert line
    assert snapshot(project.root) == before


@pytest.mark.parametrize(
    ("entry", "needles"),
    [
        ("params.ini", ("params_files: 'params.ini': unknown format",)),
        ("missing.yaml", ("params_files: 'missing.yaml': no such file",)),
        ("../outside.yaml", ("params_files", "leaves the project")),
        ("linked.yaml", ("params_files: 'linked.yaml': resolves outside the project",)),
        (".mlbuild/p.yaml", ("params_files", "inside mlbuild's own .mlbuild/")),
    ],
)
def test_a_params_file_of_unknown_format_missing_or_outside(
    project: Project, entry: str, needles: tuple[str, ...]
) -> None:
    project.write("params.ini", "a=1\n")
    outside = project.root.parent / "outside.yaml"
    outside.write_text("train:\n  n_est: 1\n")
    (project.root / "linked.yaml").symlink_to(outside)
    project.pipeline(SIMPLE.format(file=entry, key="train.n_est"))
    before = snapshot(project.root)
    one_line_error(project.run("run", "--set", "train.n_est=2"), "pipeline.toml", *needles)
    assert snapshot(project.root) == before
    assert outside.read_text() == "train:\n  n_est: 1\n"


def test_a_value_a_command_line_cannot_carry_names_the_params_file(project: Project) -> None:
    project.write("params.yaml", 'train:\n  n_est: "a\\0b"\n')
    project.pipeline(SIMPLE.format(file="params.yaml", key="train"))
    one_line_error(project.run("run"), "params.yaml: train.n_est: contains a NUL character")


def test_a_params_file_listed_twice(project: Project) -> None:
    project.write("params.yaml", PARAMS_YAML)
    project.pipeline(
        SIMPLE.replace('["{file}"]', '["params.yaml", "./params.yaml"]').format(key="train")
    )
    one_line_error(project.run("run"), "params_files: 'params.yaml' is listed twice")


def test_set_into_a_read_only_params_file_is_refused(dvc: Project) -> None:
    (dvc.root / "params.yaml").chmod(0o444)
    before = snapshot(dvc.root)
    one_line_error(
        dvc.run("run", "--set", "train.n_est=1"), "params.yaml: is read-only; not written"
    )
    assert snapshot(dvc.root) == before


def test_a_key_that_is_also_a_targets_local_parameter_is_an_error_naming_both(
    project: Project,
) -> None:
    project.write("params.yaml", PARAMS_YAML)
    project.pipeline(
        """\
        params_files = ["params.yaml"]
        [targets.train]
        cmd = "echo {params.n_est} > {outputs.0}"
        outputs = ["model.txt"]
        params = { n_est = 5 }
        """
    )
    one_line_error(
        project.run("run"),
        "pipeline.toml: targets.train.params.n_est:",
        "'train.n_est' is both a key of params.yaml and the local parameter 'n_est'"
        " of target 'train'",
    )


def test_a_key_that_is_also_a_params_table_name_is_an_error_naming_both(
    project: Project,
) -> None:
    project.write("params.yaml", PARAMS_YAML)
    project.pipeline(
        """\
        params_files = ["params.yaml"]
        [params]
        train = 3
        [targets.t]
        cmd = "echo > {outputs.0}"
        outputs = ["o.txt"]
        params = ["train"]
        """
    )
    one_line_error(
        project.run("run"),
        "params.yaml: train: 'train' is also a parameter of [params] in",
        "pipeline.toml; rename one",
    )


def test_one_key_in_two_params_files(project: Project) -> None:
    project.write("a.yaml", "train:\n  n_est: 1\n")
    project.write("b.json", '{"train": {"n_est": 2}}')
    project.pipeline(SIMPLE.replace('["{file}"]', '["a.yaml", "b.json"]').format(key="train"))
    one_line_error(project.run("run"), "b.json: train.n_est: 'train.n_est' is also a key of a.yaml")


# --- cost: nothing new on the path of a pipeline without params files ------------------


def test_a_pipeline_without_params_files_imports_no_parser(tmp_path: Path) -> None:
    (tmp_path / "pipeline.toml").write_text(
        textwrap.dedent(
            """\
            [params]
            n = 1
            [targets.t]
            cmd = "echo {params.n} > {outputs.0}"
            outputs = ["o.txt"]
            params = ["n"]
            """
        )
    )
    code = (
        "import sys; from mlbuild.cli import main; main(['run', '-q', '--set', 'n=2']);"
        " print(sorted(m for m in sys.modules if m.split('.')[0] in ('ruamel', 'tomlkit')"
        " or m.startswith(('mlbuild.pipeline.paramfiles', 'mlbuild.pipeline.edit'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert done.stdout.splitlines()[-1] == "[]", done.stdout


# --- watch mode -----------------------------------------------------------------------


def test_watch_reloads_on_a_params_file_edit_and_reruns_only_its_readers(tmp_path: Path) -> None:
    from tests.test_watch import started, watching, write

    write(tmp_path, "params.yaml", "a:\n  x: 1  # listed\n  y: 1\nb: 1\n")
    write(
        tmp_path,
        "pipeline.toml",
        """\
        params_files = ["params.yaml"]
        [targets.ax]
        cmd = "echo {params.a.x} > {outputs.0}"
        outputs = ["ax.txt"]
        params = ["a.x"]
        [targets.b]
        cmd = "echo {params.b} > {outputs.0}"
        outputs = ["b.txt"]
        params = ["b"]
        """,
    )
    with watching(tmp_path) as w:
        assert started(w.since(0)) == ["ax", "b"]
        mark = w.mark()
        write(tmp_path, "params.yaml", "a:\n  x: 2  # listed\n  y: 1\nb: 1\n")
        seen = w.wait_text("waiting for changes.", mark)
        assert "mlbuild watch: params.yaml changed; checking ax, b." in seen
        assert started(seen) == ["ax"]
        assert (tmp_path / "ax.txt").read_text() == "2\n"
        mark = w.mark()
        write(tmp_path, "params.yaml", "a:\n  x: [2\n")
        seen = w.wait_text("keeping the last good pipeline", mark)
        assert "params.yaml:3:" in seen and "invalid YAML" in seen
        mark = w.mark()
        write(tmp_path, "params.yaml", "a:\n  x: 2  # listed\n  y: 5\nb: 3\n")
        seen = w.wait_text("waiting for changes.", mark)
        assert started(seen) == ["b"]  # a.y is listed by no target
