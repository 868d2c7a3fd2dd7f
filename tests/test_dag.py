"""`mlbuild dag`: the graph as text, DOT and Mermaid, with fresh and stale marked.

The Mermaid output is checked twice: by Mermaid's own parser (mermaid 11 on
node, with jsdom standing in for the browser; install it with
`npm ci --prefix tests/mermaid`), skipped when it is not installed, and always
by a hand-written check of the subset of the flowchart grammar mlbuild writes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Project

MERMAID_DIR = Path(__file__).parent / "mermaid"


@pytest.fixture(autouse=True)
def _in_project(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    """Work in the project, as a user does: the file is then named `pipeline.toml`."""
    monkeypatch.chdir(project.root)


DIAMOND = """
[params]
epochs = 1

[targets.importer]
cmd = "echo raw > {outputs.raw}"
outputs = { raw = "build/raw.txt" }

[targets.normalizer]
cmd = "cat {inputs.raw} > {outputs.n}"
inputs = { raw = "build/raw.txt" }
outputs = { n = "build/n.txt" }

[targets.trainer]
cmd = "echo {params.epochs} | cat - {inputs.n} > {outputs.model}"
inputs = { n = "build/n.txt" }
outputs = { model = "build/model.txt" }
params = ["epochs"]

[targets.stats]
cmd = "wc -c < {inputs.n} > {outputs.s}"
inputs = { n = "build/n.txt" }
outputs = { s = "build/stats.txt" }

[targets.report]
cmd = "cat {inputs} > {outputs.r}"
inputs = ["build/model.txt", "build/stats.txt"]
outputs = { r = "build/report.txt" }
"""


def test_text_lists_targets_by_stage_with_what_each_waits_for(project: Project) -> None:
    project.pipeline(DIAMOND)
    result = project.run("dag")
    assert result.code == 0
    assert result.out == (
        "pipeline.toml: 5 targets, 5 edges, 4 stages\n"
        "\n"
        "1  importer\n"
        "2  normalizer  <- importer\n"
        "3  trainer     <- normalizer\n"
        "   stats       <- normalizer\n"
        "4  report      <- trainer, stats\n"
    )
    assert not (project.root / ".mlbuild").exists()  # drawing the graph reads no state


def test_status_marks_stale_targets_with_their_reasons(project: Project) -> None:
    project.pipeline(DIAMOND)
    assert project.run("run").code == 0
    result = project.run("dag", "--status", "--set", "epochs=2")
    assert result.out == (
        "pipeline.toml: 5 targets, 5 edges, 4 stages; 2 stale\n"
        "\n"
        "1  importer    fresh\n"
        "2  normalizer  fresh  <- importer\n"
        "3  trainer     STALE  <- normalizer\n"
        "     param epochs changed 1 -> 2\n"
        "   stats       fresh  <- normalizer\n"
        "4  report      STALE  <- trainer, stats\n"
        "     upstream 'trainer' would run\n"
    )
    assert project.run("run", "-q").code == 0  # --status ran nothing: still fresh here


def test_selected_targets_show_only_what_they_need(project: Project) -> None:
    project.pipeline(DIAMOND)
    assert project.run("dag", "stats").out == (
        "pipeline.toml: 3 targets, 2 edges, 3 stages\n"
        "\n"
        "1  importer\n"
        "2  normalizer  <- importer\n"
        "3  stats       <- normalizer\n"
    )
    unknown = project.run("dag", "stat")
    assert unknown.code == 2
    assert "unknown target 'stat'" in unknown.err and "did you mean 'stats'" in unknown.err


def test_fifty_targets_stay_one_line_each(project: Project) -> None:
    parts = ['[targets.source]\ncmd = "touch {outputs}"\noutputs = ["s.txt"]\n']
    for i in range(48):
        parts.append(
            f'[targets.feature_{i:02d}]\ncmd = "cp {{inputs}} {{outputs}}"\n'
            f'inputs = ["s.txt"]\noutputs = ["f{i:02d}.txt"]\n'
        )
    features = ", ".join(f'"f{i:02d}.txt"' for i in range(48))
    parts.append(
        f'[targets.merge]\ncmd = "cat {{inputs}} > {{outputs}}"\n'
        f'inputs = [{features}]\noutputs = ["all.txt"]\n'
    )
    project.pipeline("\n".join(parts))
    lines = project.run("dag").out.splitlines()
    assert lines[0] == "pipeline.toml: 50 targets, 96 edges, 3 stages"
    assert lines[2] == "1  source"
    assert lines[3] == "2  feature_00  <- source"
    assert lines[50] == "   feature_47  <- source"
    # merge's 48 dependencies wrap at 100 columns, aligned after the arrow.
    assert lines[51].startswith("3  merge       <- feature_00, feature_01, ")
    assert all(len(line) <= 100 for line in lines)
    assert all(line.startswith(" " * 18 + "feature_") for line in lines[52:])
    listed = " ".join(lines[51:]).split("<- ")[1]
    assert listed.replace(" ", "").split(",") == [f"feature_{i:02d}" for i in range(48)]


def test_dot_has_every_edge_and_colors_by_status(project: Project) -> None:
    project.pipeline(DIAMOND)
    project.run("run")
    out = project.run("dag", "--dot", "--status", "--set", "epochs=2").out
    assert out.startswith("digraph pipeline {\n  rankdir=LR;\n")
    edges = re.findall(r'^  "(\w+)" -> "(\w+)";$', out, re.M)
    assert edges == [
        ("importer", "normalizer"),
        ("normalizer", "trainer"),
        ("normalizer", "stats"),
        ("trainer", "report"),
        ("stats", "report"),
    ]
    assert '  "trainer" [fillcolor="#f9d6d5", tooltip="param epochs changed 1 -> 2"];' in out
    assert '  "stats" [fillcolor="#d9f2d9", tooltip="fresh"];' in out
    assert out.endswith("}\n")


# The part of Mermaid's flowchart grammar that mlbuild writes: a header, nodes with
# quoted labels, plain arrows, class definitions and class assignments.
_MERMAID_LINE = re.compile(
    r"(?P<node>    (?P<id>t\d+)\[\"[^\"]*\"\])"
    r"|(?P<edge>    (?P<src>t\d+) --> (?P<dst>t\d+))"
    r"|(?P<classdef>    classDef (fresh|stale) fill:#[0-9a-f]{6},stroke:#[0-9a-f]{6})"
    r"|(?P<class>    class (?P<members>t\d+(,t\d+)*) (fresh|stale))"
)


def check_mermaid_by_hand(text: str) -> dict[str, str]:
    """Every line in the grammar, every id declared before use; returns id -> label."""
    lines = text.rstrip("\n").split("\n")
    assert lines[0] == "flowchart LR"
    labels: dict[str, str] = {}
    for line in lines[1:]:
        match = _MERMAID_LINE.fullmatch(line)
        assert match, f"not in the flowchart grammar mlbuild writes: {line!r}"
        if match["node"]:
            labels[match["id"]] = line.split('"')[1]
        used = [match["src"], match["dst"]] if match["edge"] else []
        used += match["members"].split(",") if match["class"] else []
        assert all(u in labels for u in used), f"undeclared node in {line!r}"
    return labels


def mermaid_parse(tmp_path: Path, diagrams: list[str]) -> list[str]:
    """Mermaid's own verdict on each diagram (`ok flowchart-v2` or `error: ...`)."""
    if shutil.which("node") is None or not (MERMAID_DIR / "node_modules/mermaid").is_dir():
        pytest.skip("Mermaid's parser is not installed: npm ci --prefix tests/mermaid")
    files = []
    for i, text in enumerate(diagrams):
        files.append(tmp_path / f"d{i}.mmd")
        files[-1].write_text(text)
    proc = subprocess.run(
        ["node", str(MERMAID_DIR / "check.mjs"), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return proc.stdout.splitlines()


AWKWARD = """
[targets.end]
cmd = "touch {outputs}"
outputs = ["a.txt"]

[targets."data.v2-clean"]
cmd = "cp {inputs} {outputs}"
inputs = ["a.txt"]
outputs = ["b.txt"]

[targets.graph]
cmd = "cp {inputs} {outputs}"
inputs = ["b.txt", "a.txt"]
outputs = ["c.txt"]
"""


def test_mermaid_output_is_a_valid_flowchart(project: Project, tmp_path: Path) -> None:
    project.pipeline(DIAMOND)
    project.run("run")
    plain = project.run("dag", "--mermaid").out
    status = project.run("dag", "--mermaid", "--status", "--set", "epochs=2").out
    assert check_mermaid_by_hand(plain) == {
        "t0": "importer",
        "t1": "normalizer",
        "t2": "trainer",
        "t3": "stats",
        "t4": "report",
    }
    assert "    t1 --> t3\n" in plain and "    t3 --> t4\n" in plain
    check_mermaid_by_hand(status)
    assert "    class t0,t1,t3 fresh\n    class t2,t4 stale\n" in status
    # Names that are Mermaid keywords or hold dots and dashes are labels, never ids.
    project.pipeline(AWKWARD)
    awkward = project.run("dag", "--mermaid").out
    assert set(check_mermaid_by_hand(awkward).values()) == {"end", "data.v2-clean", "graph"}
    # A broken diagram must fail the parser, or its "ok" would prove nothing.
    broken = "flowchart LR\n    end --> t1\n"
    with pytest.raises(AssertionError):
        check_mermaid_by_hand(broken)
    verdicts = mermaid_parse(tmp_path, [plain, status, awkward, broken])
    assert verdicts[:3] == ["ok flowchart-v2"] * 3, verdicts
    assert verdicts[3].startswith("error: Parse error"), verdicts
