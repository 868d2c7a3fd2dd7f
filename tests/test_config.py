"""The pipeline loader and command templates (pipeline/load.py, interpolate.py); no step runs."""

from __future__ import annotations

import textwrap
import unicodedata
from collections.abc import Mapping
from pathlib import Path

import pytest

from mlbuild.errors import PipelineError, UsageError
from mlbuild.exec.base import render_command
from mlbuild.pipeline.interpolate import Ref, TemplateError, parse_template
from mlbuild.pipeline.load import load_pipeline, missing_hint, parse_overrides
from mlbuild.pipeline.schema import Pipeline, Port


def load(tmp_path: Path, toml: str, overrides: Mapping[str, object] | None = None) -> Pipeline:
    file = tmp_path / "pipeline.toml"
    file.write_text(textwrap.dedent(toml))
    return load_pipeline(file, overrides)


def load_error(tmp_path: Path, toml: str) -> PipelineError:
    with pytest.raises(PipelineError) as caught:
        load(tmp_path, toml)
    return caught.value


# -- the loader -------------------------------------------------------------------------


def test_ports_are_normalized_and_globs_marked(tmp_path: Path) -> None:
    pipeline = load(
        tmp_path,
        """
        [targets.t]
        cmd = "true"
        inputs = { raw = "./data//raw.csv", parts = "parts/**/*.txt" }
        outputs = ["out/../model.bin"]
        """,
    )
    target = pipeline.targets["t"]
    assert target.inputs == (Port("raw", "data/raw.csv"), Port("parts", "parts/**/*.txt", True))
    assert target.outputs == (Port(None, "model.bin"),)


def test_global_and_local_overrides(tmp_path: Path) -> None:
    toml = """
        [params]
        lr = 0.1

        [targets.t]
        cmd = "echo {params.k}"
        params = { k = 1 }

        [targets.u]
        cmd = "echo {params.lr}"
        params = ["lr"]
    """
    pipeline = load(tmp_path, toml, parse_overrides(["lr=0.5", "t.k:='x y'"]))
    assert pipeline.targets["t"].params == {"k": "x y"}
    assert pipeline.targets["u"].params == {"lr": 0.5}
    assert pipeline.targets["t"].command == "echo 'x y'"
    assert pipeline.targets["u"].command == "echo 0.5"
    with pytest.raises(UsageError, match="did you mean 'lr'"):
        load(tmp_path, toml, {"lrr": 1})


def test_command_is_the_display_form(tmp_path: Path) -> None:
    pipeline = load(
        tmp_path,
        """
        [targets.t]
        cmd = "train {inputs} --name {params.name} > {outputs.log}"
        inputs = ["my data.csv", "-x.csv", "parts/*.txt"]
        outputs = { log = "log.txt" }
        params = { name = "it's" }
        """,
    )
    assert pipeline.targets["t"].command == (
        "train 'my data.csv' ./-x.csv parts/*.txt --name 'it'\"'\"'s' > log.txt"
    )


@pytest.mark.parametrize(
    ("toml", "key", "message"),
    [
        ('cmd = "true"\noutputs = ["pipeline.toml/.."]', "targets.t.outputs", "whole project"),
        ('cmd = "true"\ninputs = ["a\\u0000b"]', "targets.t.inputs", "NUL"),
        ('cmd = "echo {params.p}"\nparams = { p = "a\\u0000" }', "targets.t.params.p", "NUL"),
        ("cmd = \"echo '{inputs}'\"", "targets.t.cmd", "remove the quotes around {inputs}"),
        ('cmd = "echo {outputs.}"', "targets.t.cmd", "must follow 'outputs.'"),
        ('cmd = "echo {params.nope}"', "targets.t.cmd", "does not read parameter 'nope'"),
    ],
)
def test_load_errors_name_the_key(tmp_path: Path, toml: str, key: str, message: str) -> None:
    error = load_error(tmp_path, "[targets.t]\n" + toml + "\n")
    assert error.key == key
    assert message in error.message


def test_global_param_with_nul_is_named_where_it_is_defined(tmp_path: Path) -> None:
    error = load_error(
        tmp_path,
        """
        [params]
        p = "a\\u0000"

        [targets.t]
        cmd = "true"
        params = ["p"]
        """,
    )
    assert error.key == "params.p"


# -- templates --------------------------------------------------------------------------

ALLOWED = [
    "awk '{print $1}' {inputs}",
    "echo ${HOME} {a,b} {inputs}",
    'echo "$(cat {inputs})"',
    'echo "`cat {inputs}`"',
    "echo $((1 << 2)) {inputs}",
    "echo it\\'s {inputs}",
    "echo hi # it's a comment\ncat {inputs}",
    "cat <<'EOF' > x\nit's {not a placeholder}\nEOF\necho {inputs}",
    "jq '{inputs: .x}' {inputs}",
    "( cd sub && cat {inputs} )",
]


@pytest.mark.parametrize("template", ALLOWED)
def test_placeholders_outside_quotes_are_found(template: str) -> None:
    refs = [p for p in parse_template(template) if isinstance(p, Ref)]
    assert [r.text for r in refs] == ["{inputs}"]
    assert "".join(p if isinstance(p, str) else p.text for p in parse_template(template)) == (
        template
    )


REFUSED = {
    "echo '{params.y}'": "inside single quotes",
    'echo "{params.y}"': "inside double quotes",
    'echo "${X:-{params.y}}"': "inside double quotes",
    'echo "$(echo "{params.y}")"': "inside double quotes",
    "echo 'a'\"{params.y}\"": "inside double quotes",
    "cat <<EOF\n{params.y}\nEOF": "here-document <<EOF",
    "cat <<-'END'\n\t{params.y}\n\tEND": "here-document <<-'END'",
    "echo {inputs.}": "a name or position must follow 'inputs.'",
    "echo {params.}": "a name or position must follow 'params.'",
    "echo {params}": "name the parameter",
    "echo { inputs }": "did you mean '{inputs}'?",
    "echo {params . lr}": "did you mean '{params.lr}'?",
    "echo {inputs[2]}": "did you mean '{inputs.2}'?",
    "echo {output.x}": "did you mean 'outputs'? as in {outputs.x}",
    "echo {PARAMS.x}": "did you mean 'params'?",
    "echo {inptus.x}": "did you mean 'inputs'?",
    "echo ${params.y}": "mixes shell and mlbuild syntax: write {params.y}",
}


@pytest.mark.parametrize("template", sorted(REFUSED))
def test_unsafe_or_near_miss_placeholders_are_refused(template: str) -> None:
    with pytest.raises(TemplateError) as caught:
        parse_template(template)
    assert REFUSED[template] in str(caught.value)


def test_word_start_decides_the_dot_slash(tmp_path: Path) -> None:
    pipeline = load(
        tmp_path,
        """
        [targets.t]
        cmd = "cat {inputs.0} --in={inputs.0} x{inputs}"
        inputs = ["-a", "-b"]
        """,
    )
    # Only a word of its own could read as an option; after the first path of a
    # list, every path starts a word.
    assert pipeline.targets["t"].command == "cat ./-a --in=-a x-a ./-b"


def test_render_command_expands_globs_now_and_quotes_each_match(tmp_path: Path) -> None:
    pipeline = load(
        tmp_path,
        """
        [targets.t]
        cmd = "cat {inputs.parts} {inputs.one} > {outputs}"
        inputs = { parts = "in dir/**/*.txt", one = "x.txt" }
        outputs = ["out.txt"]
        """,
    )
    target = pipeline.targets["t"]
    assert render_command(target, tmp_path) == "cat  x.txt > out.txt"
    for rel in ("in dir/a.txt", "in dir/s/-b.txt", "in dir/s/t/c.txt", "in dir/.hidden.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    assert render_command(target, tmp_path) == (
        "cat 'in dir/a.txt' 'in dir/s/-b.txt' 'in dir/s/t/c.txt' x.txt > out.txt"
    )


# -- hints for missing inputs --------------------------------------------------------------


def test_missing_hint_unicode_normalization(tmp_path: Path) -> None:
    nfd = unicodedata.normalize("NFD", "données/café.csv")
    (tmp_path / nfd).parent.mkdir()
    (tmp_path / nfd).write_text("")
    nfc = unicodedata.normalize("NFC", nfd)
    hint = missing_hint(tmp_path, nfc)
    assert hint == (
        " (a file 'donne\\u0301es/cafe\\u0301.csv' exists with a different Unicode normalization)"
    )


def test_missing_hint_case(tmp_path: Path) -> None:
    (tmp_path / "Data").mkdir()
    (tmp_path / "Data" / "Raw.CSV").write_text("")
    if (tmp_path / "data").exists():
        pytest.skip("this filesystem ignores case")
    assert missing_hint(tmp_path, "data/raw.csv") == (
        " (did you mean 'Data/Raw.CSV'? names are case-sensitive)"
    )


def test_missing_hint_none_when_nothing_is_close(tmp_path: Path) -> None:
    (tmp_path / "other.csv").write_text("")
    assert missing_hint(tmp_path, "data.csv") == ""
    assert missing_hint(tmp_path, "no/such/dir.csv") == ""


TYPED = """
    [params]
    epochs = 1
    lr = 0.1
    tag = "a"
    flag = false

    [targets.t]
    cmd = "echo {params.epochs} {params.lr} {params.tag} {params.flag} {params.k}"
    params = ["epochs", "lr", "tag", "flag"]

    [targets.u]
    cmd = "echo {params.k}"
    params = { k = 1 }
"""


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("epochs=two", "--set epochs=two: epochs is an integer (1) and this is a string;"),
        ("epochs=2.5", "--set epochs=2.5: epochs is an integer (1) and this is a float;"),
        ("flag=1", "--set flag=1: flag is a boolean (false) and this is an integer;"),
        ("lr=[1]", "--set lr=[1]: lr is a float (0.1) and this is an array;"),
        ("u.k=x", "--set u.k=x: u.k is an integer (1) and this is a string;"),
    ],
)
def test_a_set_value_of_another_type_is_refused(tmp_path: Path, given: str, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        load(tmp_path, TYPED.replace(" {params.k}", ""), parse_overrides([given]))
    assert str(caught.value).startswith(message)
    name = given.split("=")[0]
    assert str(caught.value).endswith(f"write --set {name}:=VALUE")


def test_set_types_that_are_meant(tmp_path: Path) -> None:
    toml = TYPED.replace(" {params.k}", "")
    given = ["epochs:=two", "lr=1", "tag=2", "flag=true", "u.k=3"]
    pipeline = load(tmp_path, toml, parse_overrides(given))
    assert pipeline.targets["t"].params == {"epochs": "two", "lr": 1.0, "tag": "2", "flag": True}
    assert pipeline.targets["u"].params == {"k": 3}
