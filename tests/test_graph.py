"""The target graph (graph.py): edges from paths and globs, cycles, selection, output checks."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from mlbuild.errors import PipelineError, UsageError
from mlbuild.graph import Graph, Held, build_graph, check_kept_sources
from mlbuild.pipeline.load import load_pipeline


def graph(tmp_path: Path, toml: str) -> Graph:
    file = tmp_path / "pipeline.toml"
    file.write_text(textwrap.dedent(toml))
    return build_graph(load_pipeline(file))


def graph_error(tmp_path: Path, toml: str) -> PipelineError:
    with pytest.raises(PipelineError) as caught:
        graph(tmp_path, toml)
    return caught.value


def writer(name: str, output: str) -> str:
    return f'[targets.{name}]\ncmd = "true"\noutputs = ["{output}"]\n'


def reader(name: str, *inputs: str, output: str | None = None) -> str:
    paths = ", ".join(f'"{p}"' for p in inputs)
    out = f'outputs = ["{output}"]\n' if output else ""
    return f'[targets.{name}]\ncmd = "true"\ninputs = [{paths}]\n{out}'


# -- edges -------------------------------------------------------------------------------


def test_edge_from_the_same_path_and_file_order_for_ties(tmp_path: Path) -> None:
    g = graph(
        tmp_path,
        reader("use", "b.txt", "a.txt") + writer("b", "b.txt") + writer("a", "a.txt"),
    )
    assert g.deps["use"] == ("b", "a")
    assert g.order == ("b", "a", "use")


def test_edge_from_a_path_inside_an_output_directory(tmp_path: Path) -> None:
    g = graph(tmp_path, writer("train", "build/model") + reader("eval", "build/model/w.bin"))
    assert g.deps["eval"] == ("train",)


def test_edge_from_an_input_directory_around_an_output(tmp_path: Path) -> None:
    g = graph(tmp_path, writer("gen", "data/gen/x.csv") + reader("use", "data"))
    assert g.deps["use"] == ("gen",)


@pytest.mark.parametrize(
    ("pattern", "output"),
    [
        ("build/*.txt", "build/a.txt"),  # matches the output
        ("build/*", "build/parts"),  # matches a directory output
        ("build/*", "build/parts/a.txt"),  # matches a directory around the output
        ("build/*/*.txt", "build/parts"),  # reaches inside a directory output
        ("**/*.csv", "a/b/c.csv"),  # `**` spans directories
        ("**/*.csv", "data/generated"),  # ... and reaches inside one
        ("data/**", "data/x/y.bin"),
        ("d?ta/[ab].csv", "data/a.csv"),
        ("my dir/*.txt", "my dir/x.txt"),
        (".cache/*.npz", ".cache/x.npz"),  # a hidden name matched by a pattern saying so
    ],
)
def test_glob_input_depends_on_what_it_can_read(tmp_path: Path, pattern: str, output: str) -> None:
    g = graph(tmp_path, writer("gen", output) + reader("use", pattern))
    assert g.deps["use"] == ("gen",)
    assert g.producers_of(g.targets["use"].inputs[0]) == {"gen"}


@pytest.mark.parametrize(
    ("pattern", "output"),
    [
        ("data/*.csv", "data/sub/x.csv"),  # `*` stays within one name
        ("data/*.csv", "data/x.txt"),
        ("**/*.csv", ".cache/x.csv"),  # neither `*` nor `**` matches a hidden name
        ("*/*.csv", ".hidden/x.csv"),
        ("data/x*.csv", "data/y.csv"),
        ("other/**/*.csv", "data/x.csv"),
    ],
)
def test_glob_input_does_not_depend_on_what_it_cannot_read(
    tmp_path: Path, pattern: str, output: str
) -> None:
    g = graph(tmp_path, writer("gen", output) + reader("use", pattern))
    assert g.deps["use"] == ()


def test_glob_that_could_only_reach_into_its_own_file_output_is_fine(tmp_path: Path) -> None:
    """`data/summary.csv` is taken for a file: `data/*/*.csv` cannot read it."""
    g = graph(tmp_path, reader("sum", "data/*/*.csv", output="data/summary.csv"))
    assert g.deps["sum"] == ()


def test_glob_that_reads_its_own_output_is_an_error(tmp_path: Path) -> None:
    error = graph_error(tmp_path, reader("sum", "data/*.csv", output="data/summary.csv"))
    assert error.key == "targets.sum.inputs"
    assert "also an output of this target" in error.message


def test_glob_edges_at_scale_follow_the_literal_prefix(tmp_path: Path) -> None:
    """Many outputs, many globs: each glob reads only the producers under its prefix."""
    parts = [writer(f"w{i}", f"out/{i}/part.bin") for i in range(300)]
    parts += [reader(f"r{i}", f"out/{i}/*.bin", output=f"res/{i}.txt") for i in range(300)]
    g = graph(tmp_path, "".join(parts))
    assert all(g.deps[f"r{i}"] == (f"w{i}",) for i in range(300))


# -- cycles, shared outputs, after ------------------------------------------------------------


def test_cycle_is_printed_in_the_direction_data_flows(tmp_path: Path) -> None:
    error = graph_error(
        tmp_path,
        reader("a", "b.txt", output="a.txt")
        + reader("b", "c.txt", output="b.txt")
        + reader("c", "a.txt", output="c.txt"),
    )
    assert error.message == "dependency cycle: a -> c -> b -> a"  # c reads a.txt, ...


def test_cycle_through_after(tmp_path: Path) -> None:
    error = graph_error(
        tmp_path,
        reader("a", "b.txt", output="a.txt") + writer("b", "b.txt") + 'after = ["a"]\n',
    )
    assert error.message == "dependency cycle: a -> b -> a"


def test_two_writers_of_one_path(tmp_path: Path) -> None:
    error = graph_error(tmp_path, writer("a", "x.txt") + writer("b", "x.txt"))
    assert (error.key, error.message) == (
        "targets.b.outputs",
        "'x.txt' is also written by target 'a'",
    )


def test_unknown_after(tmp_path: Path) -> None:
    error = graph_error(tmp_path, writer("prep", "x") + writer("b", "y") + 'after = ["prepp"]\n')
    assert error.message == "unknown target 'prepp' (did you mean 'prep'?)"


# -- selection ----------------------------------------------------------------------------


def test_select_and_downstream(tmp_path: Path) -> None:
    g = graph(
        tmp_path,
        writer("raw", "raw.txt")
        + reader("clean", "raw.txt", output="clean.txt")
        + reader("train", "clean.txt", output="model.txt")
        + reader("plot", "raw.txt", output="plot.png"),
    )
    assert g.select(["train"]) == ("raw", "clean", "train")
    assert g.select([]) == g.order
    assert g.downstream(["clean"]) == {"clean", "train"}
    with pytest.raises(UsageError, match="did you mean 'train'"):
        g.select(["trian"])


# -- outputs that would destroy the pipeline -----------------------------------------------


def test_output_over_the_pipeline_file(tmp_path: Path) -> None:
    error = graph_error(tmp_path, writer("b", "pipeline.toml"))
    assert (error.key, error.message) == (
        "targets.b.outputs",
        "'pipeline.toml' would overwrite the pipeline file",
    )


def test_a_file_read_inside_an_output_directory_is_kept_only_if_mlbuild_never_made_it(
    tmp_path: Path,
) -> None:
    g = graph(tmp_path, writer("prep", "data") + reader("train", "data/raw.csv"))
    assert g.deps["train"] == ("prep",)
    assert g.held == {"prep": (Held("data", "data/raw.csv", "train"),)}
    prep = g.targets["prep"]
    check_kept_sources(g, prep, {})  # nothing there yet: prep will make it
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "raw.csv").write_text("precious")
    check_kept_sources(g, prep, {"data": "dir:1234"})  # there, and made by mlbuild
    with pytest.raises(PipelineError) as caught:
        check_kept_sources(g, prep, {})  # there, and mlbuild never made 'data'
    assert caught.value.key == "targets.prep.outputs"
    assert caught.value.message.startswith(
        "'data' would overwrite 'data/raw.csv', which target 'train' reads and no target writes"
    )


def test_a_file_read_inside_its_own_output_directory_is_an_error(tmp_path: Path) -> None:
    error = graph_error(tmp_path, reader("prep", "data/raw.csv", output="data"))
    assert (error.key, error.message) == (
        "targets.prep.inputs",
        "'data/raw.csv' is also an output of this target",
    )


def test_output_around_a_python_module_resolves_package_first(tmp_path: Path) -> None:
    (tmp_path / "steps" / "fit").mkdir(parents=True)
    (tmp_path / "steps" / "fit" / "__init__.py").write_text("")
    error = graph_error(
        tmp_path,
        writer("gen", "steps/fit") + '[targets.t]\npython = "steps.fit:run"\n',
    )
    assert error.message == (
        "'steps/fit' would overwrite 'steps/fit/__init__.py', the module of Python target 't'"
    )


def test_output_beside_a_python_module_is_fine(tmp_path: Path) -> None:
    (tmp_path / "fit.py").write_text("")
    g = graph(tmp_path, writer("gen", "fit") + '[targets.t]\npython = "fit:run"\n')
    assert g.order == ("gen", "t")
