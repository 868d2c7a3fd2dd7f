"""The target graph: edges from paths, cycle and overlap checks, order and selection.

A target that reads a path another target writes depends on it. "Reads" covers
three shapes: the same path, a path inside an output directory, and an input
directory that contains an output. Glob inputs depend on every output they
match. Nothing here touches the disk.
"""

from __future__ import annotations

import fnmatch
import posixpath
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from mlbuild.config import Pipeline, Port, Target, did_you_mean
from mlbuild.errors import PipelineError, UsageError


def _ancestors(path: str) -> Iterable[str]:
    """`a/b/c` -> `a/b`, `a`."""
    while True:
        path = posixpath.dirname(path)
        if not path:
            return
        yield path


def _glob_base(pattern: str) -> str:
    """The leading directories of a glob pattern that hold no wildcard."""
    parts: list[str] = []
    for part in pattern.split("/"):
        if any(ch in part for ch in "*?["):
            break
        parts.append(part)
    return "/".join(parts)


class Graph(NamedTuple):
    """Dependencies between the targets of one pipeline, in a stable topological order."""

    pipeline: Pipeline
    deps: Mapping[str, tuple[str, ...]]  # target -> the targets it needs, in file order
    order: tuple[str, ...]  # every target, dependencies first, ties in file order
    producers: Mapping[str, str]  # output path -> target writing it
    below: Mapping[str, set[str]]  # directory -> targets writing something inside it

    @property
    def targets(self) -> Mapping[str, Target]:
        return self.pipeline.targets

    def producers_of(self, port: Port) -> set[str]:
        """Targets that write `port`'s path, a directory around it, or files inside it."""
        return _producers_of(port, self.producers, self.below)

    def select(self, names: Iterable[str]) -> tuple[str, ...]:
        """The named targets and everything they need, in build order (all if none named)."""
        wanted = list(names)
        if not wanted:
            return self.order
        for name in wanted:
            if name not in self.targets:
                raise UsageError(
                    f"unknown target '{name}' in {self.pipeline.display_file}"
                    + did_you_mean(name, list(self.targets))
                )
        keep: set[str] = set()
        stack = list(wanted)
        while stack:
            name = stack.pop()
            if name not in keep:
                keep.add(name)
                stack.extend(self.deps[name])
        return tuple(name for name in self.order if name in keep)

    def downstream(self, names: Iterable[str]) -> set[str]:
        """The named targets and every target that depends on them, transitively."""
        users: dict[str, list[str]] = {name: [] for name in self.order}
        for name, needs in self.deps.items():
            for need in needs:
                users[need].append(name)
        seen: set[str] = set()
        stack = list(names)
        while stack:
            name = stack.pop()
            if name not in seen:
                seen.add(name)
                stack.extend(users[name])
        return seen

    def affected(self, paths: Iterable[str]) -> set[str]:
        """Targets that read any of `paths` (project-relative) directly."""
        hits: set[str] = set()
        for path in paths:
            for target in self.targets.values():
                for port in target.inputs:
                    if _reads(port, path):
                        hits.add(target.name)
                        break
        return hits


def _reads(port: Port, path: str) -> bool:
    if port.is_glob:
        return fnmatch.fnmatchcase(path, port.path) or path.startswith(_glob_base(port.path) + "/")
    return path == port.path or path.startswith(port.path + "/")


def _outputs_below(producers: Mapping[str, str]) -> dict[str, set[str]]:
    """Directory -> targets writing something strictly inside it."""
    below: dict[str, set[str]] = {}
    for path, name in producers.items():
        for parent in _ancestors(path):
            below.setdefault(parent, set()).add(name)
    return below


def _producers_of(
    port: Port, producers: Mapping[str, str], below: Mapping[str, set[str]]
) -> set[str]:
    found: set[str] = set()
    if port.is_glob:
        base = _glob_base(port.path)
        for path, name in producers.items():
            if fnmatch.fnmatchcase(path, port.path) or (
                base and (base == path or base.startswith(path + "/"))
            ):
                found.add(name)
        return found
    if port.path in producers:
        found.add(producers[port.path])
    for parent in _ancestors(port.path):
        if parent in producers:
            found.add(producers[parent])
    found.update(below.get(port.path, ()))
    return found


def build_graph(pipeline: Pipeline) -> Graph:
    """Derive edges from paths; reject shared outputs, self-reads, unknown `after` and cycles."""
    shown = pipeline.display_file
    producers: dict[str, str] = {}
    for target in pipeline.targets.values():
        for port in target.outputs:
            key = f"targets.{target.name}.outputs"
            if port.path in producers:
                other = producers[port.path]
                raise PipelineError(
                    shown, f"'{port.path}' is also written by target '{other}'", key
                )
            producers[port.path] = target.name
    below = _outputs_below(producers)
    for path, name in producers.items():
        for parent in _ancestors(path):
            if parent in producers:
                raise PipelineError(
                    shown,
                    f"'{path}' is inside '{parent}', an output of target '{producers[parent]}'",
                    f"targets.{name}.outputs",
                )

    deps: dict[str, tuple[str, ...]] = {}
    names = list(pipeline.targets)
    for target in pipeline.targets.values():
        needs: set[str] = set()
        for port in target.inputs:
            found = _producers_of(port, producers, below)
            if target.name in found:
                raise PipelineError(
                    shown,
                    f"'{port.path}' is also an output of this target",
                    _port_key(target, port),
                )
            needs |= found
        for other in target.after:
            if other not in pipeline.targets:
                raise PipelineError(
                    shown,
                    f"unknown target '{other}'" + did_you_mean(other, names),
                    f"targets.{target.name}.after",
                )
            needs.add(other)
        deps[target.name] = tuple(n for n in names if n in needs)
    order = _topological_order(names, deps, shown)
    return Graph(pipeline=pipeline, deps=deps, order=order, producers=producers, below=below)


def _port_key(target: Target, port: Port) -> str:
    key = f"targets.{target.name}.inputs"
    return f"{key}.{port.name}" if port.name else key


def _topological_order(
    names: list[str], deps: Mapping[str, tuple[str, ...]], shown: str
) -> tuple[str, ...]:
    """Depth-first post-order in file order; a back edge is reported as `a -> b -> a`."""
    done: set[str] = set()
    order: list[str] = []
    for root in names:
        if root in done:
            continue
        path: list[str] = [root]
        on_path = {root}
        stack = [iter(deps[root])]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                finished = path.pop()
                on_path.discard(finished)
                done.add(finished)
                order.append(finished)
                continue
            if nxt in done:
                continue
            if nxt in on_path:
                cycle = [*path[path.index(nxt) :], nxt]
                # Print in the direction data flows: producer -> consumer.
                cycle.reverse()
                raise PipelineError(shown, "dependency cycle: " + " -> ".join(cycle), "targets")
            path.append(nxt)
            on_path.add(nxt)
            stack.append(iter(deps[nxt]))
    return tuple(order)
