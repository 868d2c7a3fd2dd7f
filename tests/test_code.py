"""Code-aware invalidation: what counts as a code change, for functions and scripts."""

from __future__ import annotations

from tests.conftest import Project

PIPELINE = """
[params]
epochs = 1

[targets.prepare]
python = "steps.prepare:prepare"
inputs = { raw = "data/raw.txt" }
outputs = { clean = "build/clean.txt" }

[targets.train]
python = "steps.train:train"
inputs = { clean = "build/clean.txt" }
outputs = { model = "build/model.txt" }
params = ["epochs"]

[targets.evaluate]
python = "steps.train:evaluate"
inputs = { model = "build/model.txt" }
outputs = { metrics = "build/metrics.txt" }

[targets.report]
cmd = "python scripts/report.py {inputs.metrics} {outputs.report}"
inputs = { metrics = "build/metrics.txt" }
outputs = { report = "build/report.txt" }
"""

STEPS = {
    "steps/__init__.py": "",
    "steps/prepare.py": '''
        """Prepare the data."""


        def prepare(raw, clean):
            clean.write_text(raw.read_text().strip().upper() + "\\n")
        ''',
    "steps/train.py": """
        from steps.model import fit


        def train(clean, model, epochs):
            model.write_text(fit(clean.read_text(), epochs))


        def evaluate(model, metrics):
            metrics.write_text(str(len(model.read_text())) + "\\n")
        """,
    "steps/model.py": """
        from .maths import scale


        def fit(text, epochs):
            return text * scale(epochs)
        """,
    "steps/maths.py": """
        def scale(n):
            return n
        """,
    "scripts/report.py": """
        import sys

        from fmt import render

        src, dst = sys.argv[1:]
        open(dst, "w").write(render(open(src).read()))
        """,
    "scripts/fmt.py": """
        def render(text):
            return "accuracy: " + text
        """,
}


def make(project: Project) -> None:
    project.pipeline(PIPELINE)
    project.write("data/raw.txt", "digits\n")
    for path, text in STEPS.items():
        project.write(path, text)
    first = project.run()
    assert first.code == 0, first.err
    assert first.started() == ["prepare", "train", "evaluate", "report"]


def test_comment_docstring_and_formatting_edits_rerun_nothing(project: Project) -> None:
    make(project)
    project.write(
        "steps/maths.py",
        """
        # A comment, a blank line and different formatting.


        def scale( n ):
            '''Now with a docstring.'''
            return (n)
        """,
    )
    project.write(
        "scripts/fmt.py", 'def render(text):  # same code\n    return "accuracy: " + text\n'
    )
    result = project.run()
    assert result.code == 0
    assert result.started() == []


def test_edit_in_function_module_reruns_its_targets_only(project: Project) -> None:
    make(project)
    text = STEPS["steps/train.py"].replace("str(len(", "str(1 + len(")
    project.write("steps/train.py", text)
    result = project.run()
    # evaluate's function changed; train lives in the same module, so it reruns too
    # (it is the module that counts), but its output is identical.
    assert result.started() == ["train", "evaluate", "report"]
    assert "Step `evaluate` has started: code changed: steps/train.py." in result.out


def test_helper_two_imports_away_reruns_its_importers(project: Project) -> None:
    make(project)
    project.write("steps/maths.py", "def scale(n):\n    return n + 1\n")
    result = project.run()
    assert result.started() == ["train", "evaluate", "report"]
    assert (
        "Step `train` has started: code changed: steps/maths.py (imported by steps/model.py)."
        in result.out
    )
    assert "Step `prepare` is up to date (skipped)." in result.out


def test_script_in_a_command_is_tracked_with_its_imports(project: Project) -> None:
    make(project)
    project.write("scripts/fmt.py", 'def render(text):\n    return "acc: " + text\n')
    result = project.run()
    assert result.started() == ["report"]
    assert "code changed: scripts/fmt.py (imported by scripts/report.py)" in result.out
    assert project.read("build/report.txt").startswith("acc: ")


def test_shell_script_is_tracked_as_bytes(project: Project) -> None:
    project.pipeline(
        """
        [targets.s]
        cmd = "sh tools/make.sh {outputs.o}"
        outputs = { o = "o.txt" }
        """
    )
    project.write("tools/make.sh", "echo one > $1\n")
    project.run()
    project.write("tools/make.sh", "echo two > $1\n")
    result = project.run()
    assert "Step `s` has started: code changed: tools/make.sh." in result.out
    assert project.read("o.txt") == "two\n"


def test_python_dash_m_module_is_tracked(project: Project) -> None:
    project.pipeline(
        """
        [targets.s]
        cmd = "python -m tools.gen {outputs.o}"
        outputs = { o = "o.txt" }
        """
    )
    project.write("tools/__init__.py", "")
    project.write("tools/gen.py", "import sys\nopen(sys.argv[1], 'w').write('1')\n")
    assert project.run().code == 0
    project.write("tools/gen.py", "import sys\nopen(sys.argv[1], 'w').write('2')\n")
    result = project.run()
    assert "code changed: tools/gen.py" in result.out
    assert project.read("o.txt") == "2"


def test_tracked_package_version_counts(project: Project) -> None:
    project.pipeline(
        """
        [targets.t]
        cmd = "echo x > {outputs.o}"
        outputs = { o = "o.txt" }
        track = ["pytest", "surely-not-installed-dist"]
        """
    )
    assert project.run().code == 0
    db = project.root / ".mlbuild/state.db"
    import sqlite3

    with sqlite3.connect(db) as conn:
        (data,) = conn.execute("SELECT data FROM manifests WHERE target='t'").fetchone()
        data = data.replace('"surely-not-installed-dist":null', '"surely-not-installed-dist":"0.1"')
        conn.execute("UPDATE manifests SET data=? WHERE target='t'", (data,))
    result = project.run("run", "--no-cache")
    assert (
        "Step `t` has started: package surely-not-installed-dist changed 0.1 -> absent."
        in result.out
    )


SAMPLE = """
[targets.sample]
python = "steps.sample:sample"
outputs = { o = "o.txt" }
"""


def test_the_step_modules_own_package_init_counts(project: Project) -> None:
    # Python runs steps/__init__.py before steps/sample.py: its seed decides the output.
    project.pipeline(SAMPLE)
    project.write("steps/__init__.py", "import random\n\nrandom.seed(1)\n")
    project.write(
        "steps/sample.py",
        "import random\n\n\ndef sample(o):\n    o.write_text(str(random.random()))\n",
    )
    assert project.run().started() == ["sample"]
    first = project.read("o.txt")
    project.write("steps/__init__.py", "import random\n\nrandom.seed(2)\n")
    assert "stale  sample: code changed: steps/__init__.py" in project.run("status").out
    result = project.run()
    assert "Step `sample` has started: code changed: steps/__init__.py." in result.out
    assert project.read("o.txt") != first


def test_a_module_reading_docstrings_keeps_them_in_its_hash(project: Project) -> None:
    project.pipeline(SAMPLE)
    project.write("steps/__init__.py", "")
    project.write(
        "steps/sample.py",
        '''
        import inspect

        from steps import helpers


        def usage():
            """Usage: sample."""


        def sample(o):
            o.write_text(inspect.getdoc(usage) + " " + helpers.__doc__)
        ''',
    )
    project.write("steps/helpers.py", '"""Helpers."""\n')
    assert project.run().code == 0
    project.write("steps/sample.py", "# a comment\n" + project.read("steps/sample.py"))
    assert project.run().started() == []  # comments still do not count
    project.write("steps/sample.py", project.read("steps/sample.py").replace("sample.", "run."))
    result = project.run()
    assert "Step `sample` has started: code changed: steps/sample.py." in result.out
    assert project.read("o.txt") == "Usage: run. Helpers."
    project.write("steps/helpers.py", '"""Tools."""\n')  # another module's docstring
    result = project.run()
    assert "code changed: steps/helpers.py (imported by steps/sample.py)" in result.out
    assert project.read("o.txt") == "Usage: run. Tools."


def test_literal_dynamic_imports_are_followed_statically(project: Project) -> None:
    project.pipeline(SAMPLE)
    project.write("steps/__init__.py", "")
    project.write(
        "steps/sample.py",
        """
        import importlib


        def sample(o):
            a = importlib.import_module("steps.dyn")
            b = __import__("steps.dyn2", fromlist=["VALUE"])
            c = importlib.import_module(".dyn3", __package__)
            o.write_text(a.VALUE + b.VALUE + c.VALUE)
        """,
    )
    for name in ("dyn", "dyn2", "dyn3"):
        project.write(f"steps/{name}.py", f"VALUE = '{name} '\n")
    assert project.run().code == 0
    for name in ("dyn", "dyn2", "dyn3"):
        project.write(f"steps/{name}.py", f"VALUE = '{name}! '\n")
    result = project.run("status")
    # Found statically ("imported by"), not only seen when the step ran.
    for name in ("dyn", "dyn2", "dyn3"):
        assert f"code changed: steps/{name}.py (imported by steps/sample.py)" in result.out
    assert "may be incomplete" not in project.run("show", "sample").out


def test_a_computed_dynamic_import_is_noted_by_show(project: Project) -> None:
    project.pipeline(SAMPLE + "params = { which = 'dyn' }\n")
    project.write("steps/__init__.py", "")
    project.write(
        "steps/sample.py",
        """
        import importlib


        def sample(o, which):
            o.write_text(importlib.import_module("steps." + which).VALUE)
        """,
    )
    project.write("steps/dyn.py", "VALUE = '1'\n")
    assert project.run().code == 0
    shown = project.run("show", "sample").out
    assert (
        "  note: steps/sample.py imports a module by a computed name, so the code closure may be"
        " incomplete" in shown
    )
    assert "declare files it loads otherwise in `inputs`" in shown
    # The worker saw which module it was: an edit reruns the step all the same.
    project.write("steps/dyn.py", "VALUE = '2'\n")
    result = project.run()
    assert "code changed: steps/dyn.py (imported when the step last ran)" in result.out
    assert project.read("o.txt") == "2"
