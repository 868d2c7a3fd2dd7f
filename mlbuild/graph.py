"""The target graph: edges from paths, cycle and overlap checks, order and selection.

A target that reads a path another target writes depends on it. "Reads"
covers three shapes: the same path, a path inside an output directory, and an
input directory that contains an output. A glob input depends on every target
whose output it can match, or match something inside (an output may be a
directory). Outputs are indexed as a tree of path components, so a glob
visits only the part of the tree below its literal prefix.

An output must not destroy what the pipeline stands on. The pipeline file and
a Python target's module are refused here. A file some target reads inside
another target's output directory may be made by that target (a model's
weights) or be the user's data (`outputs = ["data"]` around `data/raw.csv`):
only the disk and mlbuild's records tell, so `check_kept_sources` decides
when the target is about to run.

Building the graph touches the disk only to resolve a Python module that an
output would cover.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

from mlbuild.errors import PipelineError, UsageError
from mlbuild.pipeline.load import did_you_mean
from mlbuild.pipeline.schema import Pipeline, Port, Target


def ancestors(path: str) -> Iterator[str]:
    """`a/b/c` -> `a/b`, `a` (of a relative, normalized path; watch mode follows events
    with it too, so it is plain string operations)."""
    while "/" in path:
        path = path.rpartition("/")[0]
        yield path


def _reachable(start: Iterable[str], edges: Mapping[str, Sequence[str]]) -> set[str]:
    """`start` and every name reached from it along `edges` (dependencies, or users)."""
    seen: set[str] = set()
    stack = list(start)
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack.extend(edges.get(name, ()))
    return seen


def glob_base(pattern: str) -> str:
    """The leading directories of a glob pattern that hold no wildcard (all of a plain path)."""
    parts: list[str] = []
    for part in pattern.split("/"):
        if any(ch in part for ch in "*?["):
            break
        parts.append(part)
    return "/".join(parts)


class OutputNode:
    """A directory or an output in the tree of declared outputs (one per path component)."""

    __slots__ = ("children", "producer")

    def __init__(self) -> None:
        self.children: dict[str, OutputNode] = {}
        self.producer: str | None = None  # the target writing this path, if it is an output

    def add(self, path: str, producer: str) -> None:
        node = self
        for part in path.split("/"):
            child = node.children.get(part)
            if child is None:
                child = node.children[part] = OutputNode()
            node = child
        node.producer = producer

    def producers(self) -> Iterator[str]:
        """Every target writing this path or something below it."""
        stack = [self]
        while stack:
            node = stack.pop()
            if node.producer is not None:
                yield node.producer
            stack.extend(node.children.values())


class Held(NamedTuple):
    """A path some target reads that lies inside another target's output, and no target writes."""

    output: str  # the output directory around it
    path: str
    reader: str  # the target reading it


class Origin(NamedTuple):
    """The key of a loaded pipeline (`uptodate.pipeline_key`) and the (path, digest) of each
    other file it was made from."""

    key: str
    sources: tuple[tuple[str, str], ...]


class Graph(NamedTuple):
    """Dependencies between the targets of one pipeline, in a stable topological order."""

    pipeline: Pipeline
    deps: Mapping[str, tuple[str, ...]]  # target -> the targets it needs, in file order
    order: tuple[str, ...]  # every target, dependencies first, ties in file order
    producers: Mapping[str, str]  # output path -> target writing it
    below: Mapping[str, set[str]]  # directory -> targets writing something inside it
    tree: OutputNode  # the output paths by component, for glob inputs
    held: Mapping[str, tuple[Held, ...]]  # writer -> read paths inside its outputs
    # What the value was loaded from (snapshot.py), when nothing else counts: the up-to-date
    # stamp (uptodate.py) is made only for such a graph.
    origin: Origin | None = None

    @property
    def targets(self) -> Mapping[str, Target]:
        return self.pipeline.targets

    def has_producer(self, port: Port) -> bool:
        """Whether some target writes `port`'s path, a directory around it or files inside it
        (`producers_of` not empty, without building the set: checked for every source)."""
        if port.is_glob:
            return bool(self.producers_of(port))
        path = port.path
        if path in self.producers or path in self.below:
            return True
        producers = self.producers
        return any(parent in producers for parent in ancestors(path))

    def producers_of(self, port: Port) -> set[str]:
        """Targets that write `port`'s path, a directory around it, or files inside it."""
        tree = self.tree
        if port.is_glob and not tree.children and self.producers:  # left out (snapshot.py)
            tree = output_tree(self.producers)
        return _producers_of(port, self.producers, self.below, tree)

    def select(self, names: Iterable[str]) -> tuple[str, ...]:
        """The named targets and everything they need, in build order (all if none named)."""
        wanted = self.pipeline.expand(names)  # a matrix target: all its points
        if not wanted:
            return self.order
        for name in wanted:
            if name not in self.targets:
                raise UsageError(
                    f"unknown target '{name}' in {self.pipeline.display_file}"
                    + did_you_mean(name, [*self.targets, *self.pipeline.matrices])
                )
        keep = _reachable(wanted, self.deps)
        return tuple(name for name in self.order if name in keep)

    def users(self) -> dict[str, list[str]]:
        """Target -> the targets that need it: the reverse of `deps`, for `downstream`."""
        users: dict[str, list[str]] = {name: [] for name in self.order}
        for name, needs in self.deps.items():
            for need in needs:
                users[need].append(name)
        return users

    def downstream(
        self, names: Iterable[str], users: Mapping[str, Sequence[str]] | None = None
    ) -> set[str]:
        """The named targets and every target that depends on them, transitively.

        `users`: this graph's `users()` when the caller keeps it (watch mode, per cycle).
        """
        return _reachable(names, self.users() if users is None else users)


def output_tree(producers: Mapping[str, str]) -> OutputNode:
    """The declared outputs as a tree of path components (for glob inputs)."""
    tree = OutputNode()
    for path, name in producers.items():
        tree.add(path, name)
    return tree


def _outputs_below(producers: Mapping[str, str]) -> dict[str, set[str]]:
    """Directory -> targets writing something strictly inside it."""
    below: dict[str, set[str]] = {}
    for path, name in producers.items():
        for parent in ancestors(path):
            below.setdefault(parent, set()).add(name)
    return below


def _producers_of(
    port: Port, producers: Mapping[str, str], below: Mapping[str, set[str]], tree: OutputNode
) -> set[str]:
    if port.is_glob:
        read, maybe = _glob_producers(port.path, tree)
        return read | maybe
    found: set[str] = set()
    if port.path in producers:
        found.add(producers[port.path])
    for parent in ancestors(port.path):
        if parent in producers:
            found.add(producers[parent])
    found.update(below.get(port.path, ()))
    return found


def _glob_producers(pattern: str, tree: OutputNode) -> tuple[set[str], set[str]]:
    """Targets a glob input reads from: (surely, if their output is a directory).

    The first set holds producers of outputs the pattern matches, or that lie
    inside a directory it matches (glob returns the directory; it is hashed
    whole). The second holds producers of outputs the pattern could match
    something inside of, if the output is a directory (`data/*/*.csv` and
    an output `data/raw`). Matching follows glob.glob(recursive=True): `*`
    stays within a name, `**` spans directories, neither matches a hidden name.
    """
    parts = tuple(pattern.split("/"))
    read: set[str] = set()
    maybe: set[str] = set()
    stack = [(tree, _closure(parts, frozenset((0,))))]
    while stack:
        node, states = stack.pop()
        if len(parts) in states:
            read.update(node.producers())
            continue
        if node.producer is not None:
            maybe.add(node.producer)  # outputs do not nest: nothing more below
            continue
        pending = [parts[i] for i in states]
        if all(not _has_magic(part) for part in pending):
            # Only literal names can come next: look them up instead of listing children.
            for i in states:
                child = node.children.get(parts[i])
                if child is not None:
                    stack.append((child, _closure(parts, frozenset((i + 1,)))))
            continue
        for name, child in node.children.items():
            after = _step(parts, states, name)
            if after:
                stack.append((child, after))
    return read, maybe


def _has_magic(part: str) -> bool:
    return "*" in part or "?" in part or "[" in part


def _closure(parts: tuple[str, ...], states: frozenset[int]) -> frozenset[int]:
    """Add the states reached by letting each `**` match no directory at all."""
    result = set(states)
    for i in sorted(states):
        while i < len(parts) and parts[i] == "**":
            i += 1
            result.add(i)
    return frozenset(result)


def _step(parts: tuple[str, ...], states: frozenset[int], name: str) -> frozenset[int]:
    """The pattern positions reachable after one more path component, `name`."""
    hidden = name.startswith(".")
    after: set[int] = set()
    for i in states:
        if i == len(parts):
            continue
        part = parts[i]
        if part == "**":
            if not hidden:
                after.add(i)  # `**` takes this name and may take more
        elif not _has_magic(part):
            if part == name:
                after.add(i + 1)
        elif (not hidden or part.startswith(".")) and fnmatch.fnmatchcase(name, part):
            after.add(i + 1)
    return _closure(parts, frozenset(after)) if after else frozenset()


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
    tree = output_tree(producers)
    below = _outputs_below(producers)
    for path, name in producers.items():
        for parent in ancestors(path):
            if parent in producers:
                raise PipelineError(
                    shown,
                    f"'{path}' is inside '{parent}', an output of target '{producers[parent]}'",
                    f"targets.{name}.outputs",
                )
    check_nothing_destroyed(pipeline, producers)

    deps: dict[str, tuple[str, ...]] = {}
    names = list(pipeline.targets)
    index = {name: i for i, name in enumerate(names)}  # file order, to sort each target's needs
    for target in pipeline.targets.values():
        needs: set[str] = set()
        for port in target.inputs:
            if port.is_glob:
                found, maybe = _glob_producers(port.path, tree)
                # An output of this very target the glob could only reach into if
                # it were a directory is taken for a file: no self-read.
                found |= maybe - {target.name}
            else:
                found = _producers_of(port, producers, below, tree)
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
        deps[target.name] = tuple(sorted(needs, key=index.__getitem__)) if needs else ()
    order = _topological_order(names, deps, shown)
    held = _held_paths(pipeline, producers)
    return Graph(pipeline, deps, order, producers, below, tree, held)


def check_nothing_destroyed(pipeline: Pipeline, producers: Mapping[str, str]) -> None:
    """No output is or contains the pipeline file or a Python target's module."""
    shown = pipeline.display_file

    def fail(output: str, what: str) -> PipelineError:
        key = f"targets.{producers[output]}.outputs"
        return PipelineError(shown, f"'{output}' would overwrite {what}", key)

    own = pipeline.file.name
    if own in producers:
        raise fail(own, "the pipeline file")
    for target in pipeline.targets.values():
        if target.python is None:  # a shell target: no module of its own
            continue
        rel = target.python.partition(":")[0].replace(".", "/")
        candidates = (rel + "/__init__.py", rel + ".py")
        if any(_covering(c, producers) for c in candidates):
            # Resolve on disk as the import will (a package before a module); a
            # module not written yet counts as `rel.py`.
            root = pipeline.root
            path = next((c for c in candidates if os.path.lexists(root / c)), rel + ".py")
            output = _covering(path, producers)
            if output is not None:
                raise fail(output, f"'{path}', the module of Python target '{target.name}'")


def _covering(path: str, producers: Mapping[str, str]) -> str | None:
    """The output that is `path` or a directory around it, if any."""
    if path in producers:
        return path
    return next((a for a in ancestors(path) if a in producers), None)


def _held_paths(pipeline: Pipeline, producers: Mapping[str, str]) -> dict[str, tuple[Held, ...]]:
    """Writer -> the paths other targets read inside its outputs that no target writes."""
    held: dict[str, list[Held]] = {}
    for target in pipeline.targets.values():
        for port in target.inputs:
            if port.is_glob or port.path in producers:
                continue
            output = _covering(port.path, producers)
            if output is not None and producers[output] != target.name:
                held.setdefault(producers[output], []).append(Held(output, port.path, target.name))
    return {writer: tuple(paths) for writer, paths in held.items()}


def check_kept_sources(graph: Graph, target: Target, known: Mapping[str, str]) -> None:
    """Refuse to replace an output mlbuild never made that holds a file another target reads.

    Called when `target` is about to run or be restored, before its outputs
    are cleared. `known` maps the outputs mlbuild made (its last manifest or
    what it recorded of a failed step) to their digests. An output directory
    mlbuild has no record of, holding a path another target reads and no
    target writes, is the user's (`outputs = ["data"]` around `data/raw.csv`):
    replacing it would take that file away from its reader.
    """
    root = graph.pipeline.root
    for held in graph.held.get(target.name, ()):
        if held.output not in known and os.path.lexists(root / held.path):
            raise PipelineError(
                graph.pipeline.display_file,
                f"'{held.output}' would overwrite '{held.path}', which target"
                f" '{held.reader}' reads and no target writes (if '{target.name}' makes"
                f" it, list that file in its outputs instead of '{held.output}')",
                f"targets.{target.name}.outputs",
            )


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
