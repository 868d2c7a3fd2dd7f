"""The pipeline graph drawn for people: text for the terminal, Graphviz DOT, Mermaid.

The text form lists targets by stage, one line each with what it waits for,
rather than drawing boxes and arrows: a drawing of fifty targets with
crossing edges is unreadable in a terminal, while a stage-by-stage list stays
readable at any size and can be searched. The stage of a target is one more
than the latest stage of anything it needs, so stage 1 holds what needs
nothing and each stage can run once the ones before it are done. DOT and
Mermaid are for rendering the drawing elsewhere (`dot -Tsvg`, a Markdown page).

With a status (from a dry run) targets are marked fresh or stale, the stale
ones with their reasons.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence

from mlbuild.build.results import Outcome, TargetResult
from mlbuild.graph import Graph

WIDTH = 100  # the text form wraps long lists of dependencies here
FRESH_COLOR = "#d9f2d9"
STALE_COLOR = "#f9d6d5"


def stages(graph: Graph, names: Sequence[str]) -> dict[str, int]:
    """Target -> its stage: 1 when it needs nothing, else one after its latest dependency."""
    chosen = set(names)
    stage: dict[str, int] = {}
    for name in graph.order:  # dependencies come first
        if name in chosen:
            needs = [stage[d] for d in graph.deps[name] if d in chosen]
            stage[name] = 1 + max(needs, default=0)
    return stage


def _edges(graph: Graph, names: Sequence[str]) -> list[tuple[str, str]]:
    """(producer, consumer) pairs among `names`, in build order of the consumer."""
    chosen = set(names)
    return [(dep, name) for name in names for dep in graph.deps[name] if dep in chosen]


def _is_fresh(result: TargetResult) -> bool:
    return result.outcome is Outcome.SKIPPED


def render_text(
    graph: Graph, names: Sequence[str], status: Mapping[str, TargetResult] | None = None
) -> str:
    """Targets by stage, each with what it waits for; with `status`, fresh or stale and why."""
    stage = stages(graph, names)
    rank = {name: i for i, name in enumerate(graph.order)}
    ordered = sorted(names, key=lambda n: (stage[n], rank[n]))
    edges = _edges(graph, names)
    head = f"{graph.pipeline.display_file}: {_count(len(names), 'target')}"
    head += f", {_count(len(edges), 'edge')}, {_count(max(stage.values(), default=0), 'stage')}"
    if status is not None:
        stale = sum(1 for n in names if not _is_fresh(status[n]))
        head += f"; {stale} stale"
    lines = [head, ""]
    name_width = max((len(n) for n in names), default=0)
    number_width = len(str(max(stage.values(), default=0)))
    previous = 0
    for name in ordered:
        number = str(stage[name]) if stage[name] != previous else ""
        previous = stage[name]
        left = f"{number:>{number_width}}  {name:<{name_width}}"
        if status is not None:
            left += "  " + ("fresh" if _is_fresh(status[name]) else "STALE")
        needs = [d for d in graph.deps[name] if d in stage]
        short = f"{left}  <- {', '.join(needs)}"
        if needs and len(short) <= WIDTH and " " not in "".join(needs):
            lines.append(short)  # what textwrap would give, without its cost per target
        elif needs:
            lines.extend(
                textwrap.wrap(
                    "<- " + ", ".join(needs),
                    width=WIDTH,
                    initial_indent=left + "  ",
                    subsequent_indent=" " * (len(left) + 5),
                    break_on_hyphens=False,
                )
            )
        else:
            lines.append(left.rstrip())
        if status is not None and not _is_fresh(status[name]) and status[name].reasons:
            indent = " " * (number_width + 4)
            lines.extend(f"{indent}{reason}" for reason in status[name].reasons)
    return "\n".join(lines) + "\n"


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def render_dot(
    graph: Graph, names: Sequence[str], status: Mapping[str, TargetResult] | None = None
) -> str:
    """A Graphviz digraph, left to right; with `status`, fresh green and stale red."""
    lines = [
        "digraph pipeline {",
        "  rankdir=LR;",
        '  node [shape=box, style="rounded,filled", fillcolor=white, fontname="Helvetica"];',
    ]
    for name in names:
        attrs = ""
        if status is not None:
            fresh = _is_fresh(status[name])
            tooltip = "fresh" if fresh else "; ".join(status[name].reasons) or "stale"
            attrs = (
                f" [fillcolor={_dot_quote(FRESH_COLOR if fresh else STALE_COLOR)},"
                f" tooltip={_dot_quote(tooltip)}]"
            )
        lines.append(f"  {_dot_quote(name)}{attrs};")
    for dep, name in _edges(graph, names):
        lines.append(f"  {_dot_quote(dep)} -> {_dot_quote(name)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _mermaid_label(text: str) -> str:
    """A double-quoted Mermaid label; `"` and `#` are written as entity codes."""
    return '"' + text.replace("#", "#35;").replace('"', "#quot;") + '"'


def render_mermaid(
    graph: Graph, names: Sequence[str], status: Mapping[str, TargetResult] | None = None
) -> str:
    """A Mermaid flowchart, left to right; with `status`, classes `fresh` and `stale`.

    Nodes get generated ids (`t0`, `t1`, ...) and the target's name as a quoted
    label: names may contain `.` and `-`, or be a Mermaid keyword such as `end`,
    which would break the diagram as bare ids.
    """
    ids = {name: f"t{i}" for i, name in enumerate(names)}
    lines = ["flowchart LR"]
    for name in names:
        lines.append(f"    {ids[name]}[{_mermaid_label(name)}]")
    for dep, name in _edges(graph, names):
        lines.append(f"    {ids[dep]} --> {ids[name]}")
    if status is not None:
        lines.append(f"    classDef fresh fill:{FRESH_COLOR},stroke:#2e7d32")
        lines.append(f"    classDef stale fill:{STALE_COLOR},stroke:#c62828")
        for cls, fresh in (("fresh", True), ("stale", False)):
            members = [ids[n] for n in names if _is_fresh(status[n]) is fresh]
            if members:
                lines.append(f"    class {','.join(members)} {cls}")
    return "\n".join(lines) + "\n"
