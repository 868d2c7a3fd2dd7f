"""Params files (`params_files = ["params.yaml"]`): their keys as global parameters by dotted path.

A DVC-style project keeps its parameters in a YAML, JSON or TOML file that the
steps' scripts read themselves. mlbuild reads the same file and flattens it:
`train: {n_est: 50}` becomes the global parameter `train.n_est`, and a target
that lists `train.n_est` (or the section `train`) has exactly those values in
its fingerprint, so editing any other key of the file reruns nothing.

Mappings flatten; anything else (a number, a string, a list, an empty mapping)
is one value. A key must be a string without `.` (the dotted name would be
ambiguous otherwise), and one dotted name may come from one file only.

`read_params_files` is the one entry point: it returns the values and the
files it read, so that a cache of the loaded pipeline can key on their bytes.
The parsers are imported only here, and only for a file of their format.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from mlbuild.errors import ParamsFileError, PipelineError
from mlbuild.pipeline.schema import STATE_DIR, display_path

FORMATS = {".yaml": "yaml", ".yml": "yaml", ".json": "json", ".toml": "toml"}


def file_format(path: Path) -> str | None:
    """`yaml`, `json` or `toml` by the file's extension; None for any other."""
    return FORMATS.get(path.suffix.lower())


class ParamsFiles(NamedTuple):
    """What the params files hold, flattened; built only by `read_params_files`."""

    values: dict[str, Any]  # dotted name -> value, in file order
    sources: dict[str, str]  # dotted name -> the project path of the file holding it
    sections: dict[str, tuple[str, ...]]  # dotted prefix -> the names below it, in order
    files: tuple[Path, ...]  # absolute paths of the files read, in order

    def file_of(self, name: str) -> str:
        """The project path of the file holding key or section `name`."""
        return self.sources.get(name) or self.sources[self.sections[name][0]]


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def read_params_files(
    root: Path,
    paths: Sequence[str],
    pipeline_file: str,
    read: Callable[[Path], bytes] = _read_bytes,
) -> ParamsFiles:
    """Read and flatten each params file (project paths, already normalized).

    `read` gives a file's bytes: the loader passes its `read_source`, so the
    bytes parsed are the very bytes the compiled snapshot is keyed by.

    Errors name the pipeline file for a file that is missing, outside the
    project or of an unknown format, and the params file itself (with its
    line when known) for one that does not parse.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    files: list[Path] = []
    for rel in paths:
        full = root / rel
        where = f"params_files: '{rel}'"
        kind = file_format(full)
        if kind is None:
            known = ", ".join(FORMATS)
            raise PipelineError(pipeline_file, f"unknown format (use {known})", where)
        real = os.path.realpath(full)
        inside = os.path.relpath(real, os.path.realpath(root))
        if inside == os.pardir or inside.startswith(os.pardir + os.sep):
            raise PipelineError(
                pipeline_file, f"resolves outside the project (to {real}) through a symlink", where
            )
        if inside == STATE_DIR or inside.startswith(STATE_DIR + os.sep):
            raise PipelineError(pipeline_file, f"is inside mlbuild's own {STATE_DIR}/", where)
        try:
            # Universal newlines, as reading in text mode does.
            text = read(full).decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
        except FileNotFoundError:
            raise PipelineError(pipeline_file, "no such file", where) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise PipelineError(pipeline_file, f"cannot read: {exc}", where) from None
        shown = display_path(full)
        data = _parse(kind, shown, text)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ParamsFileError(shown, "the top level must be a mapping of keys")
        for name, value in _flatten(shown, data, ""):
            if name in sources:
                raise ParamsFileError(
                    shown, f"'{name}' is also a key of {sources[name]}; keep it in one file", name
                )
            values[name] = value
            sources[name] = rel
            parts = name.split(".")
            for i in range(1, len(parts)):
                sections.setdefault(".".join(parts[:i]), []).append(name)
        files.append(full)
    for section in sections:
        if section in values:  # `a.b` a value in one file, `a.b.c` a key in another
            raise ParamsFileError(
                display_path(root / sources[section]),
                f"'{section}' is a value here and a table in {sources[sections[section][0]]}",
                section,
            )
    return ParamsFiles(values, sources, {k: tuple(v) for k, v in sections.items()}, tuple(files))


def _parse(kind: str, shown: str, text: str) -> Any:
    if kind == "json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ParamsFileError(f"{shown}:{exc.lineno}", f"invalid JSON: {exc.msg}") from None
    if kind == "toml":
        import tomli

        try:
            return tomli.loads(text)
        except tomli.TOMLDecodeError as exc:
            line = getattr(exc, "lineno", None)
            msg = getattr(exc, "msg", None) or str(exc)
            where = f"{shown}:{line}" if line is not None else shown
            raise ParamsFileError(where, f"invalid TOML: {msg}") from None
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        return YAML(typ="safe", pure=True).load(text)
    except YAMLError as exc:
        where = yaml_location(shown, exc)
        raise ParamsFileError(where, f"invalid YAML: {yaml_problem(exc)}") from None


def _flatten(shown: str, data: dict[Any, Any], prefix: str) -> list[tuple[str, Any]]:
    """`(dotted name, value)` for every leaf below `data`, in file order."""
    found: list[tuple[str, Any]] = []
    for key, value in data.items():
        if not isinstance(key, str) or not key or "." in key:
            raise ParamsFileError(
                shown,
                f"key {key!r}: keys must be non-empty strings without '.'"
                " (mlbuild names nested keys by dotted path)",
                prefix.rstrip(".") or None,
            )
        name = prefix + key
        if isinstance(value, dict) and value:
            found += _flatten(shown, value, name + ".")
        else:
            found.append((name, value))
    return found


def merge_params_files(
    root: Path,
    paths: Sequence[str],
    pipeline_file: str,
    params: dict[str, Any],
    local_names: set[tuple[str, str]],
    read: Callable[[Path], bytes] = _read_bytes,
) -> ParamsFiles:
    """Read the params files and add their keys to `params` (the `[params]` table, in place).

    A name that could mean two things is an error naming both: a key that is
    also a `[params]` name (or a section named like one), and a key that is
    also `TARGET.NAME`, a target's local parameter (`--set` could not tell).
    """
    found = read_params_files(root, paths, pipeline_file, read)
    for name in [*found.values, *found.sections]:
        if name in params:
            raise ParamsFileError(
                display_path(root / found.file_of(name)),
                f"'{name}' is also a parameter of [params] in {pipeline_file}; rename one",
                name,
            )
    for target, pname in sorted(local_names):
        dotted = f"{target}.{pname}"
        if dotted in found.values or dotted in found.sections:
            raise PipelineError(
                pipeline_file,
                f"'{dotted}' is both a key of {found.file_of(dotted)}"
                f" and the local parameter '{pname}' of target '{target}'; rename one",
                f"targets.{target}.params.{pname}",
            )
    params.update(found.values)
    return found


def yaml_location(shown: str, exc: Exception) -> str:
    """`file:line` of a ruamel.yaml error (1-based), or the file alone."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line = getattr(mark, "line", None)
    return f"{shown}:{line + 1}" if isinstance(line, int) else shown


def yaml_problem(exc: Exception) -> str:
    """A ruamel.yaml error's description, on one line."""
    problem = getattr(exc, "problem", None)
    context = getattr(exc, "context", None)
    text = " ".join(str(p) for p in (context, problem) if p) or str(exc)
    return " ".join(text.split())
