"""pipeline.toml's JSON Schema agrees with the loader: what one accepts, so does the other.

The loader (mlbuild/pipeline/load.py) is the authority; the schema
(mlbuild/pipeline/pipeline.schema.json) is what an editor checks while typing.
Checked here: the schema is valid Draft 2020-12; it accepts every pipeline of
the repository and every pipeline the test suite writes that the loader
accepts; it rejects the mistakes of tests/test_bad_input.py that a JSON Schema
can express. The ones it cannot (they need the file system, other targets or
the command template) are listed in NOT_EXPRESSIBLE, each checked to be still
refused by the loader.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from mlbuild.cli import main
from mlbuild.errors import UserError
from mlbuild.graph import build_graph
from mlbuild.pipeline.load import load_pipeline
from mlbuild.pipeline.schema_file import SCHEMA_NAME, schema_text

REPO = Path(__file__).resolve().parent.parent
SCHEMA: dict[str, Any] = json.loads(schema_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def errors_of(text: str) -> list[str]:
    """The schema's complaints about a pipeline.toml text (empty: accepted)."""
    data = tomllib.loads(textwrap.dedent(text))
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATOR.iter_errors(data)
    ]


def loader_accepts(tmp_path: Path, text: str) -> bool:
    """Whether `load_pipeline` takes the text (the file alone: no graph, no files on disk)."""
    file = tmp_path / "pipeline.toml"
    file.write_text(textwrap.dedent(text))
    try:
        load_pipeline(file)
    except UserError:
        return False
    return True


# --- the schema itself -------------------------------------------------------------------------


def test_the_schema_is_valid_draft_2020_12() -> None:
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_every_key_has_a_description() -> None:
    """Editors show `description` on hover and in completion lists."""
    missing: list[str] = []

    def walk(node: Any, where: str) -> None:
        if not isinstance(node, dict):
            return
        for key, sub in node.get("properties", {}).items():
            if "description" not in sub:
                missing.append(f"{where}.{key}")
            walk(sub, f"{where}.{key}")
        for name, sub in node.get("$defs", {}).items():
            walk(sub, f"$defs.{name}")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{where}.*")

    walk(SCHEMA, "")
    assert not missing, f"keys without a description: {missing}"


def test_mlbuild_schema_prints_the_shipped_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    out = capsys.readouterr().out
    shipped = (REPO / "mlbuild" / "pipeline" / SCHEMA_NAME).read_text()
    assert out == shipped
    assert json.loads(out)["title"] == "mlbuild pipeline.toml"


def test_the_schema_file_is_package_data_in_pyproject() -> None:
    """Without this entry a wheel would ship no schema and `mlbuild schema` would fail."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    package_data = pyproject["tool"]["setuptools"]["package-data"]
    assert SCHEMA_NAME in package_data["mlbuild.pipeline"]
    assert "jsonschema" in " ".join(pyproject["project"]["optional-dependencies"]["test"])


# --- what it accepts -----------------------------------------------------------------------------


def static_pipelines() -> list[Path]:
    """Every pipeline.toml kept as a file in the repository (root, examples, tests, bench)."""
    found = [REPO / "pipeline.toml"]
    for folder in ("examples", "tests", "bench"):
        found += sorted((REPO / folder).rglob("*.toml"))
    return found


@pytest.mark.parametrize("path", static_pipelines(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_pipeline_file_of_the_repository_is_accepted(path: Path) -> None:
    load_pipeline(path)  # the loader takes it, so the schema must too
    assert errors_of(path.read_text()) == []


def _bench_pipelines(monkeypatch: pytest.MonkeyPatch) -> Any:
    name = "bench_pipelines"
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / "pipelines.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_pipelines_are_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = _bench_pipelines(monkeypatch)
    for spec in (bench.chain(5), bench.wide(5), bench.dir1g()):
        text = bench.render_mlbuild(spec)["pipeline.toml"]
        assert loader_accepts(tmp_path, text), spec.name
        assert errors_of(text) == [], spec.name


def fixture_pipelines() -> Iterator[tuple[str, str]]:
    """(where, text) for every plain string literal in tests/ that is a pipeline.toml.

    f-strings and strings edited before use are not seen; what is seen is a
    representative set (test_there_are_enough_fixture_pipelines counts them).
    """
    for path in sorted((REPO / "tests").glob("test_*.py")):
        if path.name == "test_schema.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
                continue
            if "[targets." not in node.value:
                continue
            text = textwrap.dedent(node.value)
            try:
                tomllib.loads(text)
            except tomllib.TOMLDecodeError:
                continue
            yield f"{path.name}:{node.lineno}", text


FIXTURES = dict(fixture_pipelines())


def test_there_are_enough_fixture_pipelines() -> None:
    assert len(FIXTURES) >= 40, sorted(FIXTURES)
    assert {where.split(":")[0] for where in FIXTURES} >= {
        "test_bad_input.py",
        "test_run.py",
        "test_python_targets.py",
        "test_config.py",
    }


@pytest.mark.parametrize("where", sorted(FIXTURES))
def test_a_pipeline_the_loader_accepts_the_schema_accepts(tmp_path: Path, where: str) -> None:
    text = FIXTURES[where]
    if not loader_accepts(tmp_path, text):
        pytest.skip("the loader refuses it (a bad-input case)")
    assert errors_of(text) == []


def readme_pipelines() -> list[str]:
    """The ```toml blocks of README.md that are pipelines (they have targets)."""
    blocks = (REPO / "README.md").read_text().split("```toml\n")[1:]
    return [block.split("```")[0] for block in blocks if "[targets." in block]


def test_the_pipelines_in_the_readme_are_accepted() -> None:
    """Including the side-by-side with DVC, Make and Snakemake (params_files, metrics)."""
    pipelines = readme_pipelines()
    assert len(pipelines) >= 2
    for text in pipelines:
        assert errors_of(text) == [], text


def test_the_scaffold_of_mlbuild_init_is_accepted(tmp_path: Path) -> None:
    assert main(["init", str(tmp_path / "new")]) == 0
    text = (tmp_path / "new" / "pipeline.toml").read_text()
    assert text.startswith(f"#:schema ./{SCHEMA_NAME}\n")
    assert errors_of(text) == []


TAPLO = Path(__file__).parent / "taplo" / "node_modules" / ".bin" / "taplo"


def taplo_check(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Taplo's `check`, the validation Even Better TOML runs in the editor, offline."""
    if shutil.which("node") is None or not TAPLO.exists():
        pytest.skip("Taplo is not installed: npm ci --prefix tests/taplo")
    return subprocess.run(
        [str(TAPLO), "check", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_taplo_follows_the_schema_line_that_init_writes(tmp_path: Path) -> None:
    assert main(["init", str(tmp_path)]) == 0
    good = taplo_check(tmp_path, "pipeline.toml")
    assert good.returncode == 0, good.stderr
    pipeline = tmp_path / "pipeline.toml"
    pipeline.write_text(
        pipeline.read_text().replace("outputs = { sorted", "ouputs = { sorted")
        + "always_run = 'yes'\n"
    )
    bad = taplo_check(tmp_path, "pipeline.toml")
    assert bad.returncode != 0
    assert "'ouputs' was unexpected" in bad.stderr
    assert '"yes" is not of type "boolean"' in bad.stderr


# Keys of the branches merged alongside (params files, metrics, plots, warm workers).
NEWER_KEYS = {
    "params_files": """
        params_files = ["params.yaml", "train.json"]
        [targets.train]
        cmd = "python train.py"
        outputs = ["model.pkl"]
        params = ["train.n_est", "featurize"]
        """,
    "metrics": """
        [targets.evaluate]
        python = "steps.evaluate:evaluate"
        outputs = { model = "build/eval" }
        metrics = ["eval/metrics.json", "eval/extra.YAML", "eval/more.toml"]
        """,
    "plots": """
        [targets.evaluate]
        cmd = "python evaluate.py"
        plots = ["eval/roc.csv", "eval/prc.tsv", "eval/loss.json"]
        """,
    "workers": """
        [workers]
        keep_warm = "10m"
        """,
}


@pytest.mark.parametrize("key", sorted(NEWER_KEYS))
def test_keys_of_the_branches_merged_alongside_are_accepted(key: str) -> None:
    assert errors_of(NEWER_KEYS[key]) == []


# --- what it rejects -----------------------------------------------------------------------------

# name -> (pipeline.toml, a fragment of the schema's complaint). The names of
# tests/test_bad_input.py where there is one; then wrong types and values.
REJECTED = {
    "unknown_top_level_key": (
        """
        [target.train]
        cmd = "echo hi > {outputs}"
        outputs = ["model.txt"]
        """,
        "'target' was unexpected",
    ),
    "unknown_target_key": (
        """
        [targets.train]
        cmd = "echo hi > model.txt"
        ouputs = ["model.txt"]
        """,
        "'ouputs' was unexpected",
    ),
    "target_with_neither_cmd_nor_python": (
        """
        [targets.train]
        outputs = ["model.txt"]
        """,
        "is not valid under any of the given schemas",
    ),
    "target_with_both_cmd_and_python": (
        """
        [targets.train]
        cmd = "echo hi > {outputs}"
        python = "steps.train:train"
        outputs = ["model.txt"]
        """,
        "is valid under each of",
    ),
    "absolute_input": (
        """
        [targets.train]
        cmd = "echo hi > model.txt"
        inputs = { data = "/tmp/model.txt" }
        """,
        "targets.train.inputs",
    ),
    "absolute_output": (
        """
        [targets.train]
        cmd = "echo hi > /tmp/model.txt"
        outputs = { data = "/tmp/model.txt" }
        """,
        "targets.train.outputs",
    ),
    "key_with_a_newline": (
        """
        [targets.train]
        cmd = "echo hi > {outputs}"
        outputs = ["model.txt"]
        "out\\nputs" = ["x"]
        """,
        "was unexpected",
    ),
    "boolean_as_a_string": (
        """
        [targets.train]
        cmd = "true"
        always_run = "yes"
        """,
        "'yes' is not of type 'boolean'",
    ),
    "negative_retries": (
        """
        [targets.train]
        cmd = "true"
        retries = -1
        """,
        "-1 is less than the minimum of 0",
    ),
    "empty_pool": (
        """
        [pools]
        gpu = 0
        """,
        "0 is less than the minimum of 1",
    ),
    "glob_output": (
        """
        [targets.train]
        cmd = "true"
        outputs = ["out/*.txt"]
        """,
        "targets.train.outputs",
    ),
    "unknown_executor": (
        """
        [executor]
        kind = "k8s"
        """,
        "'k8s' is not one of ['local', 'ray']",
    ),
    "params_as_a_number": (
        """
        [targets.train]
        cmd = "true"
        params = 3
        """,
        "targets.train.params",
    ),
    "python_without_a_function": (
        """
        [targets.train]
        python = "steps.train"
        """,
        "does not match",
    ),
    "strict_inputs_on_a_shell_step": (
        """
        [targets.train]
        cmd = "true"
        strict_inputs = true
        """,
        "'python' is a required property",
    ),
    "bad_target_name": (
        """
        [targets."train model"]
        cmd = "true"
        """,
        "does not match",
    ),
    "bad_port_name": (
        """
        [targets.train]
        cmd = "true"
        outputs = { "the-model" = "model.txt" }
        """,
        "targets.train.outputs",
    ),
    "bad_memory_size": (
        """
        [targets.train]
        cmd = "true"
        resources = { memory = "8 parsecs" }
        """,
        "targets.train.resources.memory",
    ),
    "empty_command": (
        """
        [targets.train]
        cmd = "  "
        """,
        "targets.train.cmd",
    ),
    "unknown_cache_key": (
        """
        [cache]
        remote = "s3://bucket/x"
        remote_read = true
        """,
        "'remote_read' was unexpected",
    ),
    "output_listed_twice": (
        """
        [targets.train]
        cmd = "true"
        outputs = ["model.txt", "model.txt"]
        """,
        "targets.train.outputs",
    ),
}


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_a_mistake_the_schema_can_express_is_rejected(tmp_path: Path, name: str) -> None:
    text, complaint = REJECTED[name]
    assert not loader_accepts(tmp_path, text), "the loader takes it: the schema must too"
    errors = errors_of(text)
    assert errors, "the schema accepted it"
    assert any(complaint in error for error in errors), errors


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ('[targets.t]\ncmd = "true"\nmetrics = ["eval/metrics.txt"]\n', "targets.t.metrics"),
        ('[targets.t]\ncmd = "true"\nplots = ["eval/roc.png"]\n', "targets.t.plots"),
        ('[targets.t]\ncmd = "true"\nmetrics = ["eval/*.json"]\n', "targets.t.metrics"),
        ('params_files = [""]\n', "params_files"),
        ('[workers]\nkeep_warm = "10 minutes"\n', "workers.keep_warm"),
        ("[workers]\nkeep_warm = 600\n", "workers.keep_warm"),
    ],
    ids=[
        "metrics-format",
        "plots-format",
        "metrics-glob",
        "empty-params-file",
        "keep-warm-words",
        "keep-warm-number",
    ],
)
def test_newer_keys_are_checked_too(text: str, complaint: str) -> None:
    errors = errors_of(text)
    assert any(complaint in error for error in errors), errors


# What a JSON Schema cannot say, with the reason; each is a test_bad_input.py case. The loader
# or the graph refuses it; the schema lets it through (an editor cannot flag it).
NOT_EXPRESSIBLE = {
    "cycle (needs the graph of all targets)": """
        [targets.a]
        cmd = "cat {inputs} > {outputs}"
        inputs = ["b.txt"]
        outputs = ["a.txt"]

        [targets.b]
        cmd = "cat {inputs} > {outputs}"
        inputs = ["a.txt"]
        outputs = ["b.txt"]
        """,
    "two targets writing one path (compares values across targets)": """
        [targets.a]
        cmd = "echo a > {outputs}"
        outputs = ["out/x.txt"]

        [targets.b]
        cmd = "echo b > {outputs}"
        outputs = ["out/x.txt"]
        """,
    "unknown global param named in params (a cross-reference)": """
        [params]
        epochs = 1
        [targets.train]
        cmd = "echo {params.epoch} > {outputs}"
        outputs = ["model.txt"]
        params = ["epoch"]
        """,
    "unknown placeholder in cmd (parsing the command template)": """
        [targets.train]
        cmd = "cat {inputs.dta} > {outputs}"
        inputs = { data = "data.csv" }
        outputs = ["model.txt"]
        """,
    "after names an unknown target (a cross-reference)": """
        [targets.report]
        cmd = "echo done > {outputs}"
        outputs = ["report.txt"]
        after = ["trian"]
        """,
    "a path that leaves the project through '..' (path normalization)": """
        [targets.train]
        cmd = "echo hi > model.txt"
        inputs = { data = "data/../../data.csv" }
        """,
}


@pytest.mark.parametrize("reason", sorted(NOT_EXPRESSIBLE))
def test_what_the_schema_cannot_express_is_left_to_the_loader(tmp_path: Path, reason: str) -> None:
    text = NOT_EXPRESSIBLE[reason]
    file = tmp_path / "pipeline.toml"
    file.write_text(textwrap.dedent(text))
    with pytest.raises(UserError):
        build_graph(load_pipeline(file))
    assert errors_of(text) == [], "the schema rejects it now: move it to REJECTED"
