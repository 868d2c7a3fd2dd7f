"""Round-trip edits: one value of a params file or of pipeline.toml changed, the rest kept.

`mlbuild run --set train.n_est=100` writes the value into the params file that
holds it (as `dvc exp run -S` does), and `mlbuild exp apply` writes a row's
values back into params files and pipeline.toml's `[params]`. The user owns
those files, so an edit must not cost them their comments, key order or
layout: YAML goes through ruamel.yaml's round-trip mode, TOML through tomlkit,
both of which keep comments and formatting around the value that changes.
JSON has no comments; it is re-serialized keeping key order and its indent.

Every new text is rendered in memory before anything is written, so a value a
format cannot hold (a date in JSON) changes nothing on disk, and each file is
replaced atomically (a temp file in its directory, then a rename): a reader
sees the old file or the new one, never half of it. A symlinked file is
edited where it points (the link stays a link).

ruamel.yaml and tomlkit are imported only when a file of their format is
edited (paramfiles.py reads YAML with ruamel.yaml too, and TOML with tomli).
`set_value` is the stable entry point (`exp apply` uses it); `write_overrides`
is `--set`'s.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlbuild.errors import ParamsFileError
from mlbuild.pipeline.paramfiles import file_format, yaml_location, yaml_problem
from mlbuild.pipeline.schema import STATE_DIR, Pipeline, display_path

MISSING = object()  # the old value of a key the edit adds


def set_value(path: Path, dotted: str, value: object, *, root: Path | None = None) -> None:
    """Set the key `dotted` (`train.n_est`) of the YAML, JSON or TOML file `path` to `value`.

    For pipeline.toml's `[params]` table, name it as a TOML key path:
    `set_value(Path("pipeline.toml"), "params.epochs", 2)`. Missing tables on
    the way are created. `root`: refuse a file that is not inside that project
    directory (symlinks resolved) or that lies in `.mlbuild/`. Raises
    ParamsFileError (nothing written) for a file that does not parse, a key
    whose parent is not a table, or a value the format cannot hold.
    """
    set_values(path, {dotted: value}, root=root)


def set_values(path: Path, values: Mapping[str, object], *, root: Path | None = None) -> None:
    """Several keys of one file in one atomic write (see `set_value`)."""
    write_text(path, render(path, values, root=root))


def render(
    path: Path,
    values: Mapping[str, object],
    *,
    root: Path | None = None,
    old: dict[str, object] | None = None,
) -> str:
    """The new text of `path` with `values` set, without writing anything.

    `old`, if given, receives each key's value before the edit (MISSING if absent).
    """
    old = {} if old is None else old
    real = _real(path, root)
    shown = display_path(path)
    kind = file_format(path)
    if kind is None:
        raise ParamsFileError(shown, "unknown params file format (use .yaml, .yml, .json or .toml)")
    try:
        with open(real, encoding="utf-8", newline="") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise ParamsFileError(shown, "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ParamsFileError(shown, f"cannot read: {exc}") from None
    if kind == "yaml":
        return _render_yaml(shown, text, values, old)
    if kind == "toml":
        return _render_toml(shown, text, values, old)
    return _render_json(shown, text, values, old)


def write_text(path: Path, text: str) -> None:
    """Replace the file's bytes atomically, keeping its permission bits.

    A file the user made read-only is refused rather than replaced: the rename
    would succeed (the directory is writable) and override their choice.
    """
    import tempfile  # off the read path: it pulls in random and hashlib

    real = os.path.realpath(path)
    folder = os.path.dirname(real)
    try:
        mode = os.stat(real).st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o644
    if not mode & 0o222:  # by its bits, so that root is refused too
        raise ParamsFileError(display_path(path), "is read-only; not written")
    try:
        fd, temp = tempfile.mkstemp(prefix=f".{os.path.basename(real)}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise ParamsFileError(display_path(path), f"cannot write: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, mode)
        os.replace(temp, real)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        if isinstance(exc, OSError):
            raise ParamsFileError(display_path(path), f"cannot write: {exc.strerror}") from None
        raise


def write_overrides(pipeline: Pipeline, overrides: Mapping[str, object]) -> list[str]:
    """Write `--set` values of params-file keys into their files; one line per file changed.

    Called once the whole pipeline loaded with the overrides applied, so a bad
    `--set` has already failed. Every file is rendered before any is written.
    A key that already holds the value leaves its file untouched.
    """
    by_file: dict[str, dict[str, object]] = {}
    for name, value in overrides.items():
        rel = pipeline.param_sources.get(name)
        if rel is not None:
            by_file.setdefault(rel, {})[name] = value
    pending: list[tuple[Path, str, str]] = []
    for rel, values in by_file.items():
        path = pipeline.root / rel
        old: dict[str, object] = {}
        text = render(path, values, root=pipeline.root, old=old)
        changed = [name for name, value in values.items() if not _same(old[name], value)]
        if changed:
            said = ", ".join(f"{name} = {_shown(values[name])}" for name in changed)
            was = ", ".join(_shown(old[name]) for name in changed)
            pending.append((path, text, f"{rel}: set {said} (was {was})"))
    for path, text, _ in pending:
        write_text(path, text)
    return [line for _, _, line in pending]


def _same(old: object, new: object) -> bool:
    """Equal and of the same TOML type (`1`, `1.0` and `true` differ, as in a fingerprint)."""
    kinds = (bool, int, float, str)
    kind = next((k for k in kinds if isinstance(new, k)), None)
    if kind is not None and kind is not next((k for k in kinds if isinstance(old, k)), None):
        return False
    return old == new


def _shown(value: object) -> str:
    return "absent" if value is MISSING else json.dumps(value, default=str, ensure_ascii=False)


def _real(path: Path, root: Path | None) -> str:
    """Where the file really is; with `root`, refused unless inside it and outside .mlbuild/."""
    real = os.path.realpath(path)
    if root is not None:
        real_root = os.path.realpath(root)
        inside = os.path.relpath(real, real_root)
        if inside == os.pardir or inside.startswith(os.pardir + os.sep) or os.path.isabs(inside):
            raise ParamsFileError(
                display_path(path), f"resolves outside the project (to {real}); not written"
            )
        if inside == STATE_DIR or inside.startswith(STATE_DIR + os.sep):
            raise ParamsFileError(display_path(path), f"is inside mlbuild's own {STATE_DIR}/")
    return real


def _parts(shown: str, dotted: str) -> list[str]:
    parts = dotted.split(".")
    if not all(parts):
        raise ParamsFileError(shown, "not a dotted key name", dotted)
    return parts


def _parent(shown: str, data: Any, dotted: str, make: Any) -> tuple[Any, str]:
    """The table holding the last part of `dotted`, tables on the way made with `make()`."""
    parts = _parts(shown, dotted)
    node = data
    for i, part in enumerate(parts[:-1]):
        if part not in node:
            node[part] = make()
        node = node[part]
        if not isinstance(node, dict):
            where = ".".join(parts[: i + 1])
            raise ParamsFileError(shown, f"'{where}' is a value, not a table", dotted)
    return node, parts[-1]


def _render_yaml(
    shown: str, text: str, values: Mapping[str, object], old_values: dict[str, object]
) -> str:
    import io

    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap, CommentedSeq
    from ruamel.yaml.error import YAMLError
    from ruamel.yaml.util import load_yaml_guess_indent

    yaml = YAML()  # round-trip mode: comments, key order and styles are kept
    yaml.preserve_quotes = True
    yaml.width = 4096  # never fold a long line the user wrote on one
    try:
        data, indent, block_seq_indent = load_yaml_guess_indent(text, yaml=yaml)
    except YAMLError as exc:
        raise ParamsFileError(
            yaml_location(shown, exc), f"invalid YAML: {yaml_problem(exc)}"
        ) from None
    if data is None:
        data = CommentedMap()
    if not isinstance(data, dict):
        raise ParamsFileError(shown, "the top level must be a mapping of keys")
    for dotted, value in values.items():
        parent, last = _parent(shown, data, dotted, CommentedMap)
        old = parent.get(last, MISSING)
        old_values[dotted] = old
        new: Any = value
        # Keep a list or table written inline (`[1, 2]`, `{a: 1}`) inline.
        if isinstance(value, list) and isinstance(old, CommentedSeq):
            new = CommentedSeq(value)
            new.fa.set_flow_style() if old.fa.flow_style() else new.fa.set_block_style()
        elif isinstance(value, dict) and isinstance(old, CommentedMap):
            new = CommentedMap(value)
            new.fa.set_flow_style() if old.fa.flow_style() else new.fa.set_block_style()
        parent[last] = new
    yaml.indent(mapping=indent or 2, sequence=indent or 2, offset=block_seq_indent or 0)
    out = io.StringIO()
    try:
        yaml.dump(data, out)
    except Exception as exc:  # ruamel raises RepresenterError and others for odd values
        raise ParamsFileError(shown, f"cannot write the value as YAML: {exc}") from None
    return out.getvalue()


def _render_toml(
    shown: str, text: str, values: Mapping[str, object], old_values: dict[str, object]
) -> str:
    import tomlkit
    from tomlkit.exceptions import TOMLKitError

    try:
        doc = tomlkit.parse(text)
    except TOMLKitError as exc:
        line = getattr(exc, "line", None)
        where = f"{shown}:{line}" if line else shown
        raise ParamsFileError(where, f"invalid TOML: {exc}") from None
    for dotted, value in values.items():
        parent, last = _parent(shown, doc, dotted, tomlkit.table)
        old = parent.get(last, MISSING)
        old_values[dotted] = old.unwrap() if hasattr(old, "unwrap") else old
        try:
            parent[last] = value
        except (TOMLKitError, TypeError, ValueError) as exc:
            raise ParamsFileError(shown, f"cannot write {value!r} as TOML: {exc}", dotted) from None
    return tomlkit.dumps(doc)


def _render_json(
    shown: str, text: str, values: Mapping[str, object], old_values: dict[str, object]
) -> str:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ParamsFileError(f"{shown}:{exc.lineno}", f"invalid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ParamsFileError(shown, "the top level must be an object of keys")
    for dotted, value in values.items():
        parent, last = _parent(shown, data, dotted, dict)
        old_values[dotted] = parent.get(last, MISSING)
        parent[last] = value
    try:
        out = json.dumps(data, indent=_json_indent(text), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ParamsFileError(shown, f"cannot write the value as JSON: {exc}") from None
    return out + ("\n" if text.endswith("\n") else "")


def _json_indent(text: str) -> int | str | None:
    """The indent the file uses (spaces or a tab), None when it is on one line."""
    for line in text.splitlines()[1:]:
        stripped = line.lstrip(" \t")
        if stripped and len(stripped) < len(line):
            lead = line[: len(line) - len(stripped)]
            return "\t" if lead.startswith("\t") else len(lead)
    return None
