"""Python-function targets: arguments, the user's traceback, and bad references."""

from __future__ import annotations

import json
import os
import py_compile

import pytest

from tests.conftest import Project


def test_function_receives_paths_and_params(project: Project) -> None:
    project.pipeline(
        """
        [params]
        epochs = 3

        [targets.show]
        python = "steps.show:show"
        inputs = { data = "data.txt" }
        outputs = { report = "out/report.json" }
        params = ["epochs"]

        [targets.lists]
        python = "steps.show:lists"
        inputs = ["data.txt", "parts/*.txt"]
        outputs = ["out/a.txt", "out/b.txt"]
        params = { rate = 0.5, name = "x" }
        """
    )
    project.write("data.txt", "d\n")
    project.write("parts/1.txt", "1\n")
    project.write("parts/2.txt", "2\n")
    project.write(
        "steps/show.py",
        """
        import json
        import os
        from pathlib import Path


        def show(data, report, epochs):
            report.write_text(json.dumps({
                "data": [type(data).__name__, str(data)],
                "report": str(report),
                "epochs": epochs,
                "cwd": os.getcwd(),
            }))


        def lists(inputs, outputs, rate, name):
            assert all(isinstance(p, Path) for p in inputs + outputs)
            for out in outputs:
                out.write_text(" ".join(map(str, inputs)) + f" {rate} {name}")
        """,
    )
    result = project.run()
    assert result.code == 0, result.err
    seen = json.loads(project.read("out/report.json"))
    assert seen == {
        "data": ["PosixPath", "data.txt"],
        "report": "out/report.json",
        "epochs": 3,
        "cwd": str(project.root),
    }
    assert project.read("out/b.txt") == "data.txt parts/1.txt parts/2.txt 0.5 x"


def test_exception_shows_the_users_traceback_only(project: Project) -> None:
    project.pipeline(
        """
        [targets.boom]
        python = "steps.boom:run"
        outputs = { o = "o.txt" }
        """
    )
    project.write(
        "steps/boom.py",
        """
        def helper():
            raise ValueError("the data is bad")


        def run(o):
            helper()
        """,
    )
    result = project.run()
    assert result.code == 1
    assert 'steps/boom.py", line 7, in run' in result.err
    assert 'steps/boom.py", line 3, in helper' in result.err
    assert "ValueError: the data is bad" in result.err
    assert "worker.py" not in result.err
    assert "importlib" not in result.err


def test_returning_a_value_is_an_error(project: Project) -> None:
    project.pipeline(
        """
        [targets.r]
        python = "steps.r:run"
        outputs = { o = "o.txt" }
        """
    )
    project.write("steps/r.py", "def run(o):\n    o.write_text('x')\n    return 42\n")
    result = project.run()
    assert result.code == 1
    assert "returned a int" in result.err


def bad(project: Project, ref: str, source: str, extra: str = "") -> str:
    project.pipeline(
        f"""
        [targets.step]
        python = "{ref}"
        outputs = {{ o = "o.txt" }}
        {extra}
        """
    )
    project.write("steps/s.py", source)
    result = project.run()
    assert result.code == 2, result.err
    assert result.out == ""
    lines = result.err.splitlines()
    assert len(lines) == 1, lines
    assert "pipeline.toml: targets.step.python: " in lines[0]
    assert "Traceback" not in result.err
    return lines[0]


def test_missing_module(project: Project) -> None:
    line = bad(project, "steps.nope:run", "def run(o): pass\n")
    assert "no module 'steps.nope'" in line


def test_missing_function(project: Project) -> None:
    line = bad(project, "steps.s:fit", "def run(o): pass\n")
    assert "steps/s.py has no function 'fit'" in line


def test_signature_that_does_not_accept_declared_names(project: Project) -> None:
    line = bad(project, "steps.s:run", "def run(out): pass\n")
    assert "run() does not accept o" in line


def test_signature_requiring_undeclared_names(project: Project) -> None:
    line = bad(project, "steps.s:run", "def run(o, epochs): pass\n")
    assert "run() requires epochs" in line


def test_syntax_error_in_step_module(project: Project) -> None:
    line = bad(project, "steps.s:run", "def run(o):\n    return (\n")
    assert "steps/s.py:2: syntax error" in line


def test_syntax_error_in_imported_helper(project: Project) -> None:
    project.write("steps/helper.py", "x = = 1\n")
    line = bad(project, "steps.s:run", "import steps.helper\n\ndef run(o): pass\n")
    assert "steps/helper.py:1: syntax error" in line


def test_nothing_built_is_lost_by_a_bad_reference(project: Project) -> None:
    project.pipeline(
        """
        [targets.good]
        cmd = "echo ok > {outputs.o}"
        outputs = { o = "good.txt" }
        """
    )
    assert project.run().code == 0
    project.pipeline(
        """
        [targets.good]
        cmd = "echo ok > {outputs.o}"
        outputs = { o = "good.txt" }

        [targets.bad]
        python = "steps.missing:run"
        outputs = { o = "bad.txt" }
        """
    )
    assert project.run().code == 2
    assert project.read("good.txt") == "ok\n"
    project.pipeline(
        """
        [targets.good]
        cmd = "echo ok > {outputs.o}"
        outputs = { o = "good.txt" }
        """
    )
    assert project.run().started() == []


def test_equal_size_edit_within_the_same_second_runs_the_new_code(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With bytecode caching on, Python would reuse steps/__pycache__ (it checks a
    # source's mtime in whole seconds and its size): the worker must not.
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    project.pipeline(
        """
        [targets.t]
        python = "steps.t:run"
        outputs = { o = "o.txt" }
        """
    )
    helper = project.write("steps/t.py", "def run(o):\n    o.write_text('1')\n")
    assert project.run().code == 0
    # A cached .pyc of the first version, as any earlier import would have left it.
    py_compile.compile(str(helper), doraise=True)
    stat = helper.stat()
    helper.write_text("def run(o):\n    o.write_text('2')\n")
    os.utime(helper, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same second, same size
    result = project.run()
    assert "code changed: steps/t.py" in result.out
    assert project.read("o.txt") == "2"
