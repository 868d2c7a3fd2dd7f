"""The compiled pipeline: the validated graph of a pipeline file, kept to skip TOML and checks.

Loading and checking a pipeline of 10,000 targets (TOML, validation, edges)
costs far more than deciding that nothing is stale, so every command keeps
the result in `.mlbuild/snapshot/` and the next one reads it back, if and
only if everything the result was made from is unchanged. A snapshot never
gives an answer a fresh load would not: any doubt is a miss, and a miss just
loads the TOML (and writes a new snapshot).

On disk, `snapshot/<digest of the pipeline file's path>.pickle`:

    mlbuild-snapshot 3\\n       magic and FORMAT (bump it when the layout changes)
    <key>\\n                    64 hex digits, see `_key`
    pickle: ((Source, ...), bool)  other files the value was made from, with digests;
                                whether any input is a glob (the output tree is needed)
    pickle: Graph               the graph, holding the Pipeline (all its fields)

The key (`uptodate.pipeline_key`) is the BLAKE3 of: mlbuild's version, a
stamp of mlbuild's own source files (name, size, mtime of every .py: an
edited or upgraded mlbuild never reads an older snapshot, even at the same
version), the Python version, the pipeline file's resolved path and bytes,
and the `--set` overrides. The graph returned carries it with the sources
(`Graph.origin`) when the value depends on nothing else. The sources (a
params file, say; the loader records them through `_Loader.read_source`) are
checked by re-reading and hashing each one.

What the disk decides while building a graph is decided again on every hit
(`graph.check_nothing_destroyed`); a pipeline whose value depends on the disk
in other ways (a local remote-cache path, resolved through symlinks and
`~`) is not kept at all. Only a pipeline that loaded without error is kept.

A snapshot is a pickle, so it is read only under a key that names this
installation's own source stamp; it is never copied between machines.
Writes are atomic (temporary file, then rename) and skipped silently when
`.mlbuild/` does not exist or cannot be written: mlbuild never creates its
state directory just for this, and a read-only one only costs the load.
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from mlbuild.graph import (
    Graph,
    Origin,
    OutputNode,
    build_graph,
    check_nothing_destroyed,
    output_tree,
)
from mlbuild.pipeline.load import Source, load_pipeline, read_pipeline_bytes, source_digest
from mlbuild.uptodate import open_new, pipeline_key
from mlbuild.workspace import snapshot_dir, state_dir

FORMAT = 3
MAGIC = f"mlbuild-snapshot {FORMAT}\n".encode()


def load_graph(file: Path, overrides: Mapping[str, Any] | None = None) -> Graph:
    """The checked graph of pipeline `file` with `overrides`: from its snapshot when valid.

    The cyclic garbage collector is paused meanwhile and the result frozen
    (`gc.freeze`): loading makes objects by the million and no cycles, and a
    collector scanning them again and again made 100,000 targets cost three
    times what 10,000 do, per target.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        graph = _load_graph(file, overrides)
    finally:
        if was_enabled:
            gc.enable()
    gc.freeze()  # the graph lives as long as the command: never worth scanning
    return graph


def _load_graph(file: Path, overrides: Mapping[str, Any] | None) -> Graph:
    file = file.resolve()
    data = read_pipeline_bytes(file)
    overrides = dict(overrides or {})
    key = pipeline_key(str(file), data, repr(list(overrides.items())))
    path = snapshot_path(file)
    graph = _read(path, key, file)
    if graph is not None:
        check_nothing_destroyed(graph.pipeline, graph.producers)
        return graph
    sources: list[Source] = []
    graph = build_graph(load_pipeline(file, overrides, data=data, sources=sources))
    if _keepable(graph):
        _write(path, key, tuple(sources), graph)
        graph = graph._replace(origin=_origin(key, sources))
    return graph


def _origin(key: str, sources: list[Source]) -> Origin:
    return Origin(key, tuple([(source.path, source.digest) for source in sources]))


def snapshot_path(file: Path) -> Path:
    """Where the snapshot of pipeline `file` (resolved) lives."""
    return snapshot_dir(file.parent) / f"{source_digest(str(file).encode())[:32]}.pickle"


def _keepable(graph: Graph) -> bool:
    """False when the loaded value depends on the disk beyond its sources (see the module doc)."""
    remote = graph.pipeline.cache.remote
    return remote is None or "://" in remote


def _read(path: Path, key: str, file: Path) -> Graph | None:
    """The graph stored under `key`, or None (missing, another key, stale source, corrupt)."""
    try:
        with open(path, "rb") as handle:
            if handle.readline() != MAGIC or handle.readline() != key.encode() + b"\n":
                return None
            sources, globbing = pickle.load(handle)
            for source in sources:
                with open(source.path, "rb") as other:
                    if source_digest(other.read()) != source.digest:
                        return None
            graph = pickle.load(handle)
        if not isinstance(graph, Graph) or graph.pipeline.file != file:
            return None
        # The output tree serves glob inputs only: rebuilt when the pipeline has one.
        tree = output_tree(graph.producers) if globbing is True else OutputNode()
        return graph._replace(tree=tree, origin=_origin(key, sources))
    except Exception:  # unreadable or corrupt in any way: load the TOML
        return None


def _write(path: Path, key: str, sources: tuple[Source, ...], graph: Graph) -> None:
    """Keep `graph` under `key`, atomically; silently nothing if it cannot be written."""
    if not state_dir(graph.pipeline.root).is_dir():
        return
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(exist_ok=True)
        with open_new(str(tmp)) as handle:
            handle.write(MAGIC + key.encode() + b"\n")
            # Each its own pickle, as `_read` loads them; the output tree is rebuilt
            # from `producers` (faster than unpickling its nodes).
            globbing = any(port.is_glob for t in graph.targets.values() for port in t.inputs)
            for value in ((sources, globbing), graph._replace(tree=OutputNode(), origin=None)):
                _Pickler(handle, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
        os.replace(tmp, path)
    except Exception:  # unwritable, or a value pickle cannot take: no snapshot
        with contextlib.suppress(OSError):
            os.unlink(tmp)


class _Pickler(pickle.Pickler):
    """Pickles NamedTuples as `tuple.__new__(cls, fields)`: unpickling then runs no Python
    code per value (twice as fast for 10,000 targets); read-only mappings (`schema.EMPTY`,
    the default of mapping fields) as copies."""

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is MappingProxyType:
            return (MappingProxyType, (dict(obj),))
        if isinstance(obj, tuple) and kind is not tuple and hasattr(kind, "_fields"):
            return (tuple.__new__, (kind, tuple(obj)))
        return NotImplemented
