"""Observed dependencies: what a Python step read and imported, seen by its worker."""

from __future__ import annotations

import os
import py_compile
import sqlite3

import pytest

from tests.conftest import Project

READS_JSON = """
[targets.t]
python = "steps.s:run"
outputs = { o = "o.txt" }
"""


def reads_json(project: Project, extra: str = "") -> None:
    project.pipeline(READS_JSON + extra)
    project.write("steps/__init__.py", "")
    project.write(
        "steps/s.py",
        """
        import json


        def run(o):
            with open("data/x.json") as handle:
                o.write_text(str(json.load(handle)["a"]))
        """,
    )
    project.write("data/x.json", '{"a": 1}')


def test_undeclared_json_read_is_a_discovered_input_whose_change_reruns(
    project: Project,
) -> None:
    reads_json(project)
    assert project.run().started() == ["t"]
    assert project.run().started() == []
    shown = project.run("show", "t").out
    assert "  discovered inputs (read by the step but not declared: add them to `inputs`)" in shown
    assert "    data/x.json  file:" in shown
    project.write("data/x.json", '{"a": 2}')
    result = project.run()
    assert "Step `t` has started: discovered input changed: data/x.json." in result.out
    assert project.read("o.txt") == "2"
    assert project.run().started() == []


def test_declaring_a_discovered_input_makes_it_an_input(project: Project) -> None:
    reads_json(project)
    project.run()
    project.pipeline(READS_JSON + 'inputs = { x = "data/x.json" }\n')
    project.write(
        "steps/s.py",
        """
        import json


        def run(x, o):
            o.write_text(str(json.loads(x.read_text())["a"]))
        """,
    )
    assert project.run().code == 0
    shown = project.run("show", "t").out
    assert "discovered inputs (" not in shown
    assert "  inputs\n    data/x.json  file:" in shown


def test_import_through_sys_path_insert_is_fingerprinted_after_the_first_run(
    project: Project,
) -> None:
    project.pipeline(READS_JSON)
    project.write(
        "steps/s.py",
        """
        import sys

        sys.path.insert(0, "lib")
        import helper


        def run(o):
            o.write_text(str(helper.VALUE))
        """,
    )
    project.write("lib/helper.py", "VALUE = 1\n")
    assert project.run().started() == ["t"]
    assert "    lib/helper.py  " in project.run("show", "t").out
    project.write("lib/helper.py", "# a comment only\nVALUE = 1\n")
    assert project.run().started() == []  # counted by its AST, as any code file
    project.write("lib/helper.py", "VALUE = 2\n")
    assert "stale  t: code changed: lib/helper.py (imported when the step last ran)" in (
        project.run("status").out
    )
    result = project.run()
    assert "has started: code changed: lib/helper.py (imported when the step last ran)." in (
        result.out
    )
    assert project.read("o.txt") == "2"
    assert project.run().started() == []


def test_strict_inputs_fails_the_target_with_a_clear_line(project: Project) -> None:
    reads_json(project, "strict_inputs = true\n")
    result = project.run()
    assert result.code == 1
    assert (
        "Step `t` failed after" in result.err
        and "read 'data/x.json', not declared in its inputs"
        " (strict_inputs = true: add to `targets.t.inputs`)."
        in result.err
    )
    assert "Traceback" not in result.err
    assert project.run("show", "t").code == 1  # no manifest: it runs again next time
    assert project.run().started() == ["t"]
    project.pipeline(READS_JSON + 'inputs = ["data/x.json"]\nstrict_inputs = true\n')
    project.write(
        "steps/s.py",
        """
        import json


        def run(inputs, o):
            o.write_text(str(json.loads(inputs[0].read_text())["a"]))
        """,
    )
    assert project.run().code == 0


def test_strict_inputs_on_a_shell_step_is_refused(project: Project) -> None:
    project.pipeline(
        """
        [targets.t]
        cmd = "cat data/x.json > o.txt"
        outputs = ["o.txt"]
        strict_inputs = true
        """
    )
    result = project.run()
    assert result.code == 2
    assert result.err.strip().endswith(
        "targets.t.strict_inputs: applies only to python steps (shell steps are not observed)"
    )
    assert len(result.err.strip().splitlines()) == 1


def test_sourceless_pyc_change_reruns(project: Project) -> None:
    project.pipeline(READS_JSON)
    project.write("steps/s.py", "import fast\n\n\ndef run(o):\n    o.write_text(fast.VALUE)\n")

    def compile_fast(value: str) -> None:
        source = project.write("fast_src.py", f"VALUE = {value!r}\n")
        py_compile.compile(str(source), cfile=str(project.root / "fast.pyc"), doraise=True)
        source.unlink()

    compile_fast("one")
    assert project.run().started() == ["t"]
    assert project.run().started() == []
    compile_fast("two")
    result = project.run()
    assert "has started: code changed: fast.pyc (imported when the step last ran)." in result.out
    assert project.read("o.txt") == "two"


def test_package_init_seen_at_run_time_reruns(project: Project) -> None:
    project.pipeline(READS_JSON)
    project.write(
        "steps/s.py",
        """
        import sys

        sys.path.insert(0, "vendor")
        import tools.maths


        def run(o):
            o.write_text(str(tools.maths.scale(1)))
        """,
    )
    project.write("vendor/tools/__init__.py", "FACTOR = 2\n")
    project.write(
        "vendor/tools/maths.py", "import tools\n\n\ndef scale(n):\n    return n * tools.FACTOR\n"
    )
    assert project.run().started() == ["t"]
    project.write("vendor/tools/__init__.py", "FACTOR = 3\n")
    result = project.run()
    assert "code changed: vendor/tools/__init__.py (imported when the step last ran)" in result.out
    assert project.read("o.txt") == "3"


def test_a_module_seen_at_run_time_and_then_deleted_reruns(project: Project) -> None:
    project.pipeline(READS_JSON)
    project.write(
        "steps/s.py",
        """
        import sys

        sys.path.insert(0, "lib")
        try:
            import helper
            VALUE = helper.VALUE
        except ImportError:
            VALUE = "none"


        def run(o):
            o.write_text(VALUE)
        """,
    )
    helper = project.write("lib/helper.py", "VALUE = 'helper'\n")
    project.run()
    helper.unlink()
    result = project.run()
    assert "Step `t` has started: code removed: lib/helper.py (deleted)." in result.out
    assert project.read("o.txt") == "none"
    assert project.run().started() == []


def test_a_read_file_changed_while_the_step_ran_reruns(project: Project) -> None:
    # The step reads its data, then the file changes (here: its mtime, which
    # needs no open() the worker would see). The result used the old bytes, so
    # the next run must not trust the digest taken after the step.
    reads_json(project)
    project.write(
        "steps/s.py",
        """
        import json
        import os


        def run(o):
            with open("data/x.json") as handle:
                o.write_text(str(json.load(handle)["a"]))
            st = os.stat("data/x.json")
            os.utime("data/x.json", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
        """,
    )
    assert project.run().started() == ["t"]
    result = project.run()
    assert "Step `t` has started: discovered input changed: data/x.json." in result.out


def test_what_the_step_writes_or_declares_is_not_discovered(project: Project) -> None:
    project.pipeline(
        """
        [targets.t]
        python = "steps.s:run"
        inputs = { raw = "data/raw.txt", extra = "data/more" }
        outputs = { o = "build/o.txt", work = "build/work" }
        """
    )
    project.write("data/raw.txt", "r")
    project.write("data/more/a.txt", "a")
    project.write(
        "steps/s.py",
        """
        import inspect
        from pathlib import Path


        def run(raw, extra, o, work):
            work.mkdir()
            (work / "part.txt").write_text(raw.read_text())
            Path("scratch.txt").write_text("tmp")      # written, then read: its own file
            text = Path("scratch.txt").read_text()
            text += (extra / "a.txt").read_text()      # inside a declared directory
            text += (work / "part.txt").read_text()    # inside a declared output
            text += str(len(inspect.getsource(run)) > 0)  # its own source: code
            o.write_text(text)
        """,
    )
    assert project.run().code == 0
    assert project.read("build/o.txt") == "tmparTrue"
    assert "discovered inputs (" not in project.run("show", "t").out
    assert project.run().started() == []


def test_shell_steps_are_not_observed(project: Project) -> None:
    project.pipeline(
        """
        [targets.t]
        cmd = "python3 -c 'print(open(\\"data/x.json\\").read())' > o.txt"
        outputs = ["o.txt"]
        """
    )
    project.write("data/x.json", "{}")
    assert project.run().code == 0
    assert "discovered inputs (" not in project.run("show", "t").out
    assert not any((project.root / ".mlbuild/logs").glob("*.observed.json"))


def test_the_observation_file_is_consumed(project: Project) -> None:
    reads_json(project)
    project.run()
    logs = project.root / ".mlbuild/logs"
    assert sorted(p.name for p in logs.iterdir()) == ["t.timing.json"]  # it printed nothing
    with sqlite3.connect(project.root / ".mlbuild/state.db") as conn:
        (data,) = conn.execute("SELECT data FROM manifests WHERE target='t'").fetchone()
    assert '"discovered":{"data/x.json":"file:' in data
    assert os.environ.get("MLBUILD_TARGET") is None  # the worker's environment stayed its own


def test_an_extension_module_in_the_project_is_seen_and_its_change_reruns(
    project: Project,
) -> None:
    import importlib.util
    import shutil

    spec = importlib.util.find_spec("_statistics")  # a small C extension of the stdlib
    if spec is None or spec.origin is None or not spec.origin.endswith(".so"):
        pytest.skip("no _statistics extension module in this Python")
    so = project.root / "lib" / os.path.basename(spec.origin)
    so.parent.mkdir()
    shutil.copyfile(spec.origin, so)
    project.pipeline(READS_JSON)
    project.write(
        "steps/s.py",
        """
        import os
        import sys

        sys.path.insert(0, "lib")
        import _statistics


        def run(o):
            o.write_text(os.path.relpath(_statistics.__file__))
        """,
    )
    assert project.run().code == 0
    assert project.read("o.txt") == f"lib/{so.name}"
    with open(so, "ab") as handle:
        handle.write(b"\0")  # a rebuilt extension: other bytes
    result = project.run()
    assert f"code changed: lib/{so.name} (imported when the step last ran)" in result.out


def test_a_read_after_the_step_changed_directory_is_found(project: Project) -> None:
    reads_json(project)
    project.write(
        "steps/s.py",
        """
        import os


        def run(o):
            target = o.resolve()
            os.chdir("data")
            target.write_text(open("x.json").read())
        """,
    )
    assert project.run().code == 0
    project.write("data/x.json", '{"a": 3}')
    result = project.run()
    assert "Step `t` has started: discovered input changed: data/x.json." in result.out
    assert project.read("o.txt") == '{"a": 3}'


def test_a_module_seen_at_run_time_in_a_closure_reading_docstrings_settles(
    project: Project,
) -> None:
    # The closure keeps docstrings (it reads __doc__); the module seen at run time is
    # digested the same way after the step and before the next: no rerun for nothing.
    project.pipeline(READS_JSON)
    project.write(
        "steps/s.py",
        '''
        """Doc."""
        import sys

        sys.path.insert(0, "lib")
        import helper


        def run(o):
            o.write_text(__doc__ + helper.__doc__)
        ''',
    )
    project.write("lib/helper.py", '"""Helper."""\n')
    assert project.run().started() == ["t"]
    assert project.run().started() == []
    assert project.run().started() == []


def test_observation_installs_no_audit_hook(
    project: Project, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An audit hook runs on every audited event of the process (`id()`, `exec`,
    # some `getattr`s), not only "open": `copy.deepcopy` got 55% slower under
    # one. A sitecustomize module counts the hooks added in the step's process.
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        "ADDED = []\n"
        "_add = sys.addaudithook\n"
        "def _counting(hook):\n"
        "    ADDED.append(hook)\n"
        "    _add(hook)\n"
        "sys.addaudithook = _counting\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    reads_json(project)
    project.write(
        "steps/s.py",
        """
        import sitecustomize


        def run(o):
            with open("data/x.json") as handle:
                handle.read()
            o.write_text(f"{len(sitecustomize.ADDED)} audit hooks")
        """,
    )
    assert project.run().code == 0
    assert project.read("o.txt") == "0 audit hooks"
    assert "    data/x.json  file:" in project.run("show", "t").out  # still observed


def test_reads_through_pathlib_io_and_os_open_are_discovered(project: Project) -> None:
    project.pipeline(READS_JSON)
    project.write(
        "steps/s.py",
        """
        import io
        import os
        from pathlib import Path


        def run(o):
            text = Path("data/a.txt").read_text()
            with io.open(b"data/b.txt", "rb") as handle:
                text += handle.read().decode()
            fd = os.open("data/c.txt", os.O_RDONLY)
            text += os.read(fd, 10).decode()
            os.close(fd)
            fd = os.open("data/log.txt", os.O_WRONLY | os.O_CREAT)  # written: its own
            os.close(fd)
            o.write_text(text)
        """,
    )
    for name in "abc":
        project.write(f"data/{name}.txt", name)
    assert project.run().code == 0
    assert project.read("o.txt") == "abc"
    shown = project.run("show", "t").out
    assert all(f"    data/{name}.txt  file:" in shown for name in "abc")
    assert "data/log.txt" not in shown
    project.write("data/c.txt", "C")
    result = project.run()
    assert "Step `t` has started: discovered input changed: data/c.txt." in result.out
    assert project.read("o.txt") == "abC"


def test_a_module_changed_while_the_step_ran_reruns(project: Project) -> None:
    # The module seen at run time is imported (its old text runs), then changes.
    # Its stat must be the one from when it was loaded, not from the end of the step.
    project.pipeline(READS_JSON)
    project.write(
        "steps/s.py",
        """
        import os
        import sys

        sys.path.insert(0, "lib")
        import helper


        def run(o):
            o.write_text(str(helper.VALUE))
            st = os.stat("lib/helper.py")
            os.utime("lib/helper.py", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
        """,
    )
    project.write("lib/helper.py", "VALUE = 1\n")
    assert project.run().started() == ["t"]
    result = project.run()
    assert "has started: code changed: lib/helper.py (imported when the step last ran)." in (
        result.out
    )


def test_mlbuild_inside_the_project_is_not_a_steps_code(project: Project) -> None:
    """mlbuild's own checkout is a project too (its demo): the worker is no step's code.

    Before, the worker's source joined the step's code as "seen at run time", so a
    key computed before any run (after `clean`, in a fresh checkout) never matched
    the cached one and nothing was restored.
    """
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import mlbuild

    shutil.copytree(
        Path(mlbuild.__file__).parent,
        project.root / "mlbuild",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    project.write("steps/__init__.py", "")
    # As a library does when it formats a warning or a traceback: read the source of
    # every frame on the stack, the worker's included.
    project.write(
        "steps/make.py",
        "import sys\n"
        "def make(out):\n"
        "    open(sys.modules['__main__'].__file__).read()\n"
        "    out.write_text('made')\n",
    )
    project.pipeline(
        """
        [targets.make]
        outputs = { out = "out.txt" }
        python = "steps.make:make"
        """
    )
    env = {**os.environ, "PYTHONPATH": str(project.root)}

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "mlbuild", *args],
            cwd=project.root,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout

    assert "has started" in cli("run")
    assert "mlbuild/exec/worker.py" not in cli("show", "make")
    cli("clean")
    again = cli("run")
    assert "restored from cache" in again and "has started" not in again
    assert project.read("out.txt") == "made"
