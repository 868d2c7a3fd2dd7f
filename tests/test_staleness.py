"""The key is complete: input order, port names and env values count; secrets stay out."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator

import pytest

from mlbuild.cache import cache_key
from mlbuild.manifest import Fingerprint
from tests.conftest import Project


def manifest(project: Project, target: str) -> str:
    with sqlite3.connect(project.root / ".mlbuild/state.db") as conn:
        (data,) = conn.execute("SELECT data FROM manifests WHERE target=?", (target,)).fetchone()
    return str(data)


def test_reordered_list_inputs_rerun_a_command(project: Project) -> None:
    project.write("a", "A\n")
    project.write("b", "B\n")
    project.pipeline(
        """
        [targets.cat]
        cmd = "cat {inputs} > {outputs}"
        inputs = ["a", "b"]
        outputs = ["out"]
        """
    )
    assert project.run().started() == ["cat"]
    project.pipeline(project.read("pipeline.toml").replace('["a", "b"]', '["b", "a"]'))
    result = project.run()
    assert "Step `cat` has started: inputs reordered." in result.out
    assert project.read("out") == "B\nA\n"


def test_swapped_named_ports_rerun_then_swapping_back_restores(project: Project) -> None:
    project.write("a", "A")
    project.write("b", "B")
    toml = """
        [targets.pair]
        python = "steps.pair:pair"
        inputs = { x = "a", y = "b" }
        outputs = { o = "out" }
        """
    project.pipeline(toml)
    project.write(
        "steps/pair.py", "def pair(x, y, o):\n    o.write_text(x.read_text() + y.read_text())\n"
    )
    assert project.run().started() == ["pair"]
    project.pipeline(toml.replace('x = "a", y = "b"', 'x = "b", y = "a"'))
    result = project.run()
    assert (
        "Step `pair` has started: input port x now 'b' (was 'a');"
        " input port y now 'a' (was 'b')." in result.out
    )
    assert project.read("out") == "BA"  # ran, not restored from the first run's entry
    project.pipeline(toml)
    result = project.run()
    assert "Step `pair` restored from cache" in result.out
    assert project.read("out") == "AB"


def test_reordered_outputs_and_a_pattern_for_the_same_file_rerun(project: Project) -> None:
    project.write("data/a.txt", "A\n")
    toml = """
        [targets.two]
        cmd = "cat {inputs} > {outputs.0}; echo second > {outputs.1}"
        inputs = ["data/a.txt"]
        outputs = ["one", "two"]
        """
    project.pipeline(toml)
    assert project.run().code == 0
    project.pipeline(toml.replace('["one", "two"]', '["two", "one"]'))
    result = project.run()
    assert "Step `two` has started: outputs reordered." in result.out
    assert project.read("one") == "second\n"
    project.pipeline(toml.replace('["data/a.txt"]', '["data/a.t?t"]'))
    result = project.run()
    assert "inputs now ['data/a.t?t'] (were ['data/a.txt'])" in result.out


def test_cache_key_includes_the_interface() -> None:
    base = Fingerprint("cmd", {}, {}, {"a": "file:1", "b": "file:2"})
    swapped = base._replace(ports=(("in", None, "b", ()), ("in", None, "a", ())))
    ordered = base._replace(ports=(("in", None, "a", ()), ("in", None, "b", ())))
    assert cache_key("t", swapped, ["out"]) != cache_key("t", ordered, ["out"])
    assert Fingerprint.from_json(swapped.to_json()) == swapped


@pytest.fixture
def secret() -> Iterator[str]:
    os.environ["MLBUILD_TEST_TOKEN"] = "hunter2-very-secret"
    yield "hunter2-very-secret"
    os.environ.pop("MLBUILD_TEST_TOKEN", None)


def test_env_values_are_stored_as_digests_and_never_shown(project: Project, secret: str) -> None:
    project.pipeline(
        """
        [targets.t]
        cmd = "echo ok > {outputs.o}"
        outputs = { o = "o.txt" }
        env = ["MLBUILD_TEST_TOKEN", "MLBUILD_TEST_UNSET"]
        """
    )
    assert project.run().code == 0
    db = (project.root / ".mlbuild/state.db").read_bytes()
    assert secret.encode() not in db
    assert '"MLBUILD_TEST_UNSET":null' in manifest(project, "t")
    shown = project.run("show", "t").out
    assert "  env\n    MLBUILD_TEST_TOKEN  set\n    MLBUILD_TEST_UNSET  (unset)\n" in shown
    assert secret not in project.run("show", "t", "--json").out
    os.environ["MLBUILD_TEST_TOKEN"] = "another-secret"
    result = project.run("run", "-v")
    assert "Step `t` has started: env MLBUILD_TEST_TOKEN changed." in result.out
    assert "another-secret" not in result.out + result.err
    assert "another-secret" not in project.run("log", "t").out
    del os.environ["MLBUILD_TEST_TOKEN"]
    assert "env MLBUILD_TEST_TOKEN changed" in project.run().out


def test_a_manifest_of_the_previous_version_reads_as_stale(project: Project) -> None:
    project.pipeline(
        """
        [targets.t]
        cmd = "echo ok > {outputs.o}"
        outputs = { o = "o.txt" }
        """
    )
    project.run()
    old = '{"action":"echo ok > {outputs.o}","env":{},"inputs":{},"outputs":{"o.txt":"file:x"},'
    old += '"params":{},"version":1}'
    with sqlite3.connect(project.root / ".mlbuild/state.db") as conn:
        conn.execute("UPDATE manifests SET data=? WHERE target='t'", (old,))
    result = project.run("run", "--no-cache")
    assert (
        "Step `t` has started: its manifest was written by another version of mlbuild."
        in result.out
    )
    assert project.run().started() == []
