"""Matrix targets as people read them: a name that stands for every point, and points grouped.

A matrix of 100 points is 100 ordinary targets to the build (pipeline/matrix.py),
but a listing of 100 lines hides the rest of the pipeline. So `list`,
`status` and `dag` show one entry per matrix target, with its point count and
how many are stale, and name the points themselves only when there are few
(`FEW`), when `-v` asks, or, for `status`, the stale ones (up to `SHOWN`).
Imported only for a pipeline with a matrix.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from mlbuild.build.results import Outcome, TargetResult
from mlbuild.errors import UsageError
from mlbuild.graph import Graph
from mlbuild.pipeline.matrix import SEPARATOR, base_name
from mlbuild.pipeline.schema import Pipeline

if TYPE_CHECKING:
    from mlbuild.build.query import Prediction

FEW = 4  # a matrix with at most this many points is listed point by point
SHOWN = 5  # stale points named under a larger matrix's line (all of them with -v)


def refuse_matrix_name(name: str, pipeline: Pipeline) -> None:
    """`show train` for a matrix target: a usage error naming a point to ask for instead."""
    points = pipeline.matrices[name]
    raise UsageError(
        f"'{name}' is a matrix target of {len(points)} points in {pipeline.display_file};"
        f" name one of them, such as '{points[0]}'"
    )


def axes(points: Sequence[str]) -> dict[str, list[str]]:
    """KEY -> the value texts its points have, in order, read back from the points' names."""
    found: dict[str, list[str]] = {}
    for point in points:
        for pair in point.partition(SEPARATOR)[2].split(","):
            key, _, text = pair.partition("=")
            values = found.setdefault(key, [])
            if text not in values:
                values.append(text)
    return found


def describe_axes(points: Sequence[str]) -> str:
    """`4 points: lr = 0.1, 0.01; epochs = 1, 2`."""
    shown = "; ".join(f"{k} = {', '.join(v)}" for k, v in axes(points).items())
    return f"{len(points)} point{'' if len(points) == 1 else 's'}: {shown}"


def _groups(names: Sequence[str], pipeline: Pipeline) -> dict[str, list[str]]:
    """Each entry as shown (a plain target, or a matrix target) -> its names, in `names` order."""
    groups: dict[str, list[str]] = {}
    for name in names:
        base = base_name(name)
        groups.setdefault(base if base in pipeline.matrices else name, []).append(name)
    return groups


def list_lines(graph: Graph, verbose: bool) -> list[str]:
    """`mlbuild list`: one line per target, a matrix target once with its axes."""
    pipeline = graph.pipeline
    lines: list[str] = []
    for entry, members in _groups(graph.order, pipeline).items():
        first = graph.targets[members[0]]
        action = first.cmd if first.python is None else first.shown
        needs = _dedup(base_name(d) for m in members for d in graph.deps[m])
        after = f"  (after {', '.join(needs)})" if needs else ""
        if entry not in pipeline.matrices:
            lines.append(f"{entry}: {first.description or action}{after}\n")
            continue
        for key in axes(members):  # the command as written: `{matrix.lr}`, not `{params.lr}`
            action = (action or "").replace("{params." + key + "}", "{matrix." + key + "}")
        what = first.description or action
        lines.append(f"{entry}: {what}  [{describe_axes(members)}]{after}\n")
        if verbose or len(members) <= FEW:
            lines.extend(f"  {point}\n" for point in members)
    return lines


def status_lines(predictions: Sequence[Prediction], pipeline: Pipeline, verbose: bool) -> list[str]:
    """`mlbuild status`: a matrix target as one line of counts, then the points worth naming."""
    from mlbuild.build.query import Action, restore_note

    by_name = {p.name: p for p in predictions}

    def line(p: Prediction, indent: str) -> str:
        state = "fresh" if p.action is Action.SKIP else "stale"
        detail = f": {'; '.join(compact(p.reasons, pipeline))}" if p.reasons else ""
        return f"{state:6} {indent}{p.name}{detail}{restore_note(p)}\n"

    lines: list[str] = []
    for entry, members in _groups([p.name for p in predictions], pipeline).items():
        if len(members) == 1:
            lines.append(line(by_name[members[0]], ""))
            continue
        stale = [m for m in members if by_name[m].action is not Action.SKIP]
        state = "stale" if stale else "fresh"
        counts = f"{len(members) - len(stale)} fresh, {len(stale)} stale"
        lines.append(f"{state:6} {entry}: {len(members)} points: {counts}\n")
        if verbose or len(members) <= FEW:
            lines.extend(line(by_name[m], "  ") for m in members)
            continue
        lines.extend(line(by_name[m], "  ") for m in stale[:SHOWN])
        if len(stale) > SHOWN:
            lines.append(
                f"{'':6}   ... and {len(stale) - SHOWN} more stale points (-v lists all)\n"
            )
    return lines


def compact(reasons: Sequence[str], pipeline: Pipeline) -> list[str]:
    """`upstream 'train@lr=0.1' would run` for every point as one `upstream 'train' would run
    (4 points)`, so that a consumer of 100 points gives one reason, not 100."""
    out: list[str] = []
    counts: dict[str, int] = {}
    for reason in reasons:
        head, _, rest = reason.partition("'")
        point, _, tail = rest.partition("'")
        base = base_name(point)
        if head == "upstream " and tail == " would run" and base in pipeline.matrices:
            if base not in counts:
                out.append(base)
            counts[base] = counts.get(base, 0) + 1
        else:
            out.append(reason)
    for i, item in enumerate(out):
        if item in counts:
            n = counts[item]
            out[i] = f"upstream '{item}' would run ({n} point{'' if n == 1 else 's'})"
    return out


def collapse(
    graph: Graph, names: Sequence[str], status: Mapping[str, TargetResult] | None
) -> tuple[Graph, tuple[str, ...], dict[str, TargetResult] | None]:
    """The graph with each matrix target as one node `train [4 points]`, for `dag`.

    Its dependencies are its points' together; with a status it is fresh when
    every point is, else stale with its count and the first stale points.
    Returned unchanged when grouping would make a cycle (points of two
    matrices depending on each other crosswise).
    """
    pipeline = graph.pipeline
    groups = _groups(names, pipeline)
    label = {}
    for entry, members in groups.items():
        shown = entry
        if entry in pipeline.matrices:
            shown = f"{entry} [{len(members)} point{'' if len(members) == 1 else 's'}]"
        for member in members:
            label[member] = shown
    deps = {
        label[members[0]]: tuple(
            _dedup(label[d] for m in members for d in graph.deps[m] if d in label)
        )
        for members in groups.values()
    }
    order = _topological(list(deps), deps)
    if order is None or any(label[m[0]] in deps[label[m[0]]] for m in groups.values()):
        return graph, tuple(names), dict(status) if status is not None else None
    merged: dict[str, TargetResult] | None = None
    if status is not None:
        merged = {}
        for members in groups.values():
            stale = [m for m in members if status[m].outcome is not Outcome.SKIPPED]
            name = label[members[0]]
            if len(members) == 1:
                reasons = compact(status[members[0]].reasons, pipeline)
                merged[name] = status[members[0]]._replace(name=name, reasons=tuple(reasons))
            elif not stale:
                merged[name] = TargetResult(name, Outcome.SKIPPED)
            else:
                reasons = [f"{len(stale)} of {len(members)} points stale"]
                reasons += [
                    f"{m}: {'; '.join(compact(status[m].reasons, pipeline))}" for m in stale[:SHOWN]
                ]
                merged[name] = TargetResult(name, Outcome.PENDING, tuple(reasons))
    collapsed = graph._replace(deps=deps, order=tuple(order))
    return collapsed, tuple(order), merged


def _topological(names: list[str], deps: Mapping[str, tuple[str, ...]]) -> list[str] | None:
    """`names` with dependencies first, ties in the given order; None on a cycle."""
    done: set[str] = set()
    order: list[str] = []
    waiting = list(names)
    while waiting:
        ready = [n for n in waiting if all(d in done or d == n for d in deps[n])]
        if not ready:
            return None
        first = ready[0]
        order.append(first)
        done.add(first)
        waiting.remove(first)
    return order


def _dedup(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))
