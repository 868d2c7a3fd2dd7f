"""What a `cmd` receives, and what an output may not touch: end to end, through the CLI.

Each test is a finding from a review of the pipeline language: the paths a
step receives must be the paths mlbuild hashed, a value must never become
shell syntax, and an output must never destroy what the pipeline stands on.
"""

from __future__ import annotations

import json
import os
import unicodedata

import pytest

from tests.conftest import Project, Result

HOSTILE = [
    "'; touch pwned; echo '",
    '"; touch pwned; echo "',
    "$(touch pwned)",
    "`touch pwned`",
    "a; touch pwned",
    "a && touch pwned",
    "a | touch pwned",
    "line one\ntouch pwned\n",
    "*",
    "pwned*",
    "-n",
    "--help",
    "  spaces  around  ",
    "",
    "café ☕ 日本語",
    "back\\slash\\'",
    "${HOME}",
    "$HOME",
    "!!",
    "> pwned",
    "{params.y}",
    "tab\there",
]


def one_line_error(result: Result, *needles: str) -> str:
    """Exit 2 and one `mlbuild: error:` line holding every needle; nothing started."""
    assert result.code == 2, result
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("mlbuild: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert result.started() == []
    return lines[0]


# -- 1. globs are expanded by mlbuild, when the step starts, and quoted -------------------


def test_recursive_glob_gives_the_step_every_file_mlbuild_hashed(project: Project) -> None:
    project.pipeline(
        """
        [targets.list]
        cmd = "printf '%s\\n' {inputs} > {outputs.0}"
        inputs = ["parts/**/*.txt"]
        outputs = ["listed.txt"]
        """
    )
    for rel in ("parts/a.txt", "parts/x/b.txt", "parts/x/y/c.txt"):
        project.write(rel, rel)
    result = project.run()
    assert result.code == 0, result
    # /bin/sh reads `**` as `*`: it passed only parts/x/b.txt.
    assert project.read("listed.txt").splitlines() == [
        "parts/a.txt",
        "parts/x/b.txt",
        "parts/x/y/c.txt",
    ]


def test_glob_in_a_directory_with_a_space_stays_one_word_per_file(project: Project) -> None:
    project.pipeline(
        """
        [targets.cat]
        cmd = "cat {inputs.parts} > {outputs.all}"
        inputs = { parts = "my parts/*.txt" }
        outputs = { all = "all.txt" }
        """
    )
    project.write("my parts/a.txt", "a\n")
    project.write("my parts/b.txt", "b\n")
    result = project.run()
    assert result.code == 0, result
    assert project.read("all.txt") == "a\nb\n"


# -- 2. a glob that reads inside another target's output directory depends on it ----------


def test_glob_into_an_output_directory_waits_for_its_producer(project: Project) -> None:
    project.pipeline(
        """
        [targets.gen]
        cmd = "mkdir -p {outputs.d}; sleep 0.3; echo 1 > {outputs.d}/1; echo 2 > {outputs.d}/2"
        outputs = { d = "build/parts" }

        [targets.join]
        cmd = "cat {inputs} > {outputs.0}"
        inputs = ["build/*/*"]
        outputs = ["joined.txt"]
        """
    )
    # Without the edge: "matches no file and no target writes one"; with files from
    # an earlier run: both steps side by side, `join` reading a half-written directory.
    result = project.run("run", "-j", "2")
    assert result.code == 0, result
    assert result.started() == ["gen", "join"]
    assert project.read("joined.txt") == "1\n2\n"


def test_recursive_glob_over_the_project_depends_on_a_nested_output(project: Project) -> None:
    project.pipeline(
        """
        [targets.gen]
        cmd = "mkdir -p {outputs.0} && echo x > {outputs.0}/x.csv"
        outputs = ["data/generated"]

        [targets.count]
        cmd = "cat {inputs} > {outputs.0}"
        inputs = ["**/*.csv"]
        outputs = ["count.txt"]
        """
    )
    project.write("data/raw/a.csv", "a\n")
    result = project.run("run", "-j", "2")
    assert result.code == 0, result
    assert result.started() == ["gen", "count"]
    assert project.read("count.txt") == "x\na\n"  # data/generated/x.csv, data/raw/a.csv


# -- 3. a value never becomes shell syntax -------------------------------------------------

QUOTED = {
    "single": "echo '{params.y}' > {outputs.0}",
    "double": 'echo "{params.y}" > {outputs.0}',
    "here-document": "cat > {outputs.0} <<EOF\n{params.y}\nEOF\n",
}


@pytest.mark.parametrize("style", sorted(QUOTED))
def test_placeholder_inside_the_users_quotes_is_refused(project: Project, style: str) -> None:
    project.pipeline(
        f"""
        [targets.b]
        cmd = {json.dumps(QUOTED[style])}
        outputs = ["out.txt"]
        params = {{ y = "hello" }}
        """
    )
    result = project.run("run", "--set", "b.y='; touch pwned; echo '")
    line = one_line_error(result, "pipeline.toml", "targets.b.cmd", "{params.y}")
    if style != "here-document":
        assert "mlbuild quotes every value itself; remove the quotes around {params.y}" in line
    assert not (project.root / "pwned").exists()
    assert not (project.root / "out.txt").exists()


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_parameter_values_reach_the_step_exactly(project: Project, value: str) -> None:
    def pipeline(default: str, then: str = "") -> None:
        project.pipeline(
            f"""
            [targets.b]
            cmd = "printf '%s' {{params.y}} > {{outputs.0}}{then}"
            outputs = ["out.txt"]
            params = {{ y = {json.dumps(default, ensure_ascii=False)} }}
            """
        )

    pipeline(value)  # through [params]
    result = project.run()
    assert result.code == 0, result
    assert (project.root / "out.txt").read_bytes() == value.encode()
    pipeline("harmless", " && true")  # through --set, as TOML text (another cache key)
    result = project.run("run", "--set", f"b.y={json.dumps(value, ensure_ascii=False)}")
    assert result.code == 0, result
    assert result.started() == ["b"]
    assert (project.root / "out.txt").read_bytes() == value.encode()
    assert sorted(p.name for p in project.root.iterdir()) == [
        ".mlbuild",
        "out.txt",
        "pipeline.toml",
    ]


def test_set_value_from_the_report_cannot_run_a_command(project: Project) -> None:
    project.pipeline(
        """
        [targets.b]
        cmd = "printf '%s' {params.y} > {outputs.0}"
        outputs = ["out.txt"]
        params = { y = "hello" }
        """
    )
    for raw in ("'; touch pwned; echo '", "$(touch pwned)", "`touch pwned`"):
        result = project.run("run", "--set", f"b.y={raw}")
        assert result.code == 0, result
        assert not (project.root / "pwned").exists()
    assert project.read("out.txt") == "`touch pwned`"


def test_nul_in_a_parameter_is_a_pipeline_error(project: Project) -> None:
    project.pipeline(
        """
        [targets.b]
        cmd = "printf '%s' {params.y} > {outputs.0}"
        outputs = ["out.txt"]
        params = { y = "a\\u0000b" }
        """
    )
    # Before: ValueError "embedded null byte" from subprocess, a traceback.
    one_line_error(project.run(), "pipeline.toml", "targets.b.params.y", "NUL")


# -- 4. a path is never an option; near-miss placeholders are errors ----------------------


def test_input_named_like_an_option_is_passed_as_a_path(project: Project) -> None:
    project.pipeline(
        """
        [targets.show]
        cmd = "cat {inputs} > {outputs.0}"
        inputs = ["-n"]
        outputs = ["shown.txt"]
        """
    )
    project.write("-n", "hello\n")
    result = project.run()
    assert result.code == 0, result
    assert project.read("shown.txt") == "hello\n"  # `cat -n` printed nothing


def test_glob_match_named_like_an_option_is_passed_as_a_path(project: Project) -> None:
    project.pipeline(
        """
        [targets.show]
        cmd = "cat {inputs} > {outputs.0}"
        inputs = ["*.txt"]
        outputs = ["out/shown"]
        """
    )
    project.write("-E.txt", "dollar\n")
    result = project.run()
    assert result.code == 0, result
    assert project.read("out/shown") == "dollar\n"  # `cat -E.txt`: an unknown option


@pytest.mark.parametrize(
    ("written", "hint"),
    [
        ("{inputs.}", "a name or position must follow 'inputs.'"),
        ("{outputs.}", "a name or position must follow 'outputs.'"),
        ("{ inputs }", "did you mean '{inputs}'?"),
        ("{inputs[0]}", "did you mean '{inputs.0}'?"),
        ("{input}", "did you mean 'inputs'?"),
        ("{Inputs.0}", "did you mean 'inputs'?"),
        ("{params}", "name the parameter"),
        ("{inputs.3}", "the target has 1 input"),
    ],
)
def test_near_miss_placeholder_is_an_error(project: Project, written: str, hint: str) -> None:
    project.pipeline(
        f"""
        [targets.b]
        cmd = "cat {written} > {{outputs.0}}"
        inputs = ["in.txt"]
        outputs = ["out.txt"]
        """
    )
    project.write("in.txt", "x\n")
    one_line_error(project.run(), "pipeline.toml", "targets.b.cmd", written, hint)


def test_shell_braces_still_reach_the_shell(project: Project) -> None:
    project.pipeline(
        """
        [targets.b]
        cmd = '''awk '{print $1}' {inputs} > {outputs.0}
                 echo ${MLBUILD_TARGET} x{a,b} "$(cat {inputs})" >> {outputs.0}'''
        inputs = ["in file.txt"]
        outputs = ["out.txt"]
        """
    )
    project.write("in file.txt", "first second\n")
    result = project.run()
    assert result.code == 0, result
    assert project.read("out.txt").splitlines()[0] == "first"
    assert project.read("out.txt").splitlines()[1] in (
        "b x{a,b} first second",
        "b xa xb first second",
    )


# -- 5. an output never destroys the pipeline, its code or its sources ----------------------


def test_output_that_is_the_pipeline_file(project: Project) -> None:
    text = project.pipeline(
        """
        [targets.b]
        cmd = "echo gone > {outputs.0}"
        outputs = ["pipeline.toml"]
        """
    ).read_text()
    one_line_error(
        project.run(), "pipeline.toml", "targets.b.outputs", "'pipeline.toml'", "pipeline file"
    )
    assert project.read("pipeline.toml") == text


@pytest.mark.parametrize("output", ["./", "a/..", "."])
def test_output_that_is_the_whole_project(project: Project, output: str) -> None:
    project.pipeline(
        f"""
        [targets.b]
        cmd = "true"
        outputs = ["{output}"]
        """
    )
    one_line_error(project.run(), "pipeline.toml", "targets.b.outputs", "whole project")


def test_output_directory_around_a_source_another_target_reads(project: Project) -> None:
    project.pipeline(
        """
        [targets.prep]
        cmd = "mkdir -p {outputs.0} && echo new > {outputs.0}/clean.csv"
        outputs = ["data"]

        [targets.train]
        cmd = "cat {inputs} > {outputs.0}"
        inputs = ["data/raw.csv"]
        outputs = ["model.txt"]
        """
    )
    project.write("data/raw.csv", "precious\n")
    line = one_line_error(
        project.run(), "pipeline.toml", "targets.prep.outputs", "'data'", "'data/raw.csv'"
    )
    assert "target 'train' reads and no target writes" in line
    assert project.read("data/raw.csv") == "precious\n"


@pytest.mark.parametrize(
    ("output", "module_file"),
    [("steps.py", "steps.py"), ("pkg", "pkg/mod.py"), ("pkg/mod.py", "pkg/mod.py")],
)
def test_output_over_a_python_targets_module(
    project: Project, output: str, module_file: str
) -> None:
    module = module_file.removesuffix(".py").replace("/", ".")
    project.pipeline(
        f"""
        [targets.gen]
        cmd = "echo oops > {{outputs.0}}"
        outputs = ["{output}"]

        [targets.fit]
        python = "{module}:fit"
        outputs = ["fit.txt"]
        """
    )
    project.write(module_file, "def fit(outputs):\n    outputs[0].write_text('ok')\n")
    line = one_line_error(project.run(), "pipeline.toml", "targets.gen.outputs", f"'{output}'")
    assert f"'{module_file}', the module of Python target 'fit'" in line


def test_output_named_like_a_module_package_that_is_a_plain_module(project: Project) -> None:
    """`model:fit` lives in model.py: an output directory `model` covers nothing."""
    project.pipeline(
        """
        [targets.fit]
        python = "model:fit"
        outputs = ["model"]
        """
    )
    project.write("model.py", "def fit(outputs):\n    outputs[0].mkdir()\n")
    assert project.run().code == 0


# -- 7. a missing input that exists under another Unicode form or case ---------------------


def test_missing_input_hints_at_another_unicode_normalization(project: Project) -> None:
    nfc = unicodedata.normalize("NFC", "café.txt")
    nfd = unicodedata.normalize("NFD", nfc)
    project.pipeline(
        f"""
        [targets.b]
        cmd = "cat {{inputs}} > {{outputs.0}}"
        inputs = ["{nfc}"]
        outputs = ["out.txt"]
        """
    )
    (project.root / nfd).write_text("x")
    one_line_error(
        project.run(),
        "targets.b.inputs",
        f"'{nfc}' does not exist",
        "(a file 'cafe\\u0301.txt' exists with a different Unicode normalization)",
    )


def test_missing_input_hints_at_another_case(project: Project) -> None:
    project.pipeline(
        """
        [targets.b]
        cmd = "cat {inputs} > {outputs.0}"
        inputs = ["raw/data.csv"]
        outputs = ["out.txt"]
        """
    )
    project.write("Raw/Data.csv", "x")
    if os.path.exists(project.root / "raw/data.csv"):
        pytest.skip("this filesystem ignores case")
    one_line_error(
        project.run(),
        "'raw/data.csv' does not exist",
        "(did you mean 'Raw/Data.csv'? names are case-sensitive)",
    )
