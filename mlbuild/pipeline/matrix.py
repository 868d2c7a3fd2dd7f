"""Matrix targets: `matrix = { lr = [0.1, 0.01] }` expanded at load into one target per point.

A point is an ordinary target named `NAME@KEY=VALUE,KEY=VALUE` (keys in the
order declared, values in the order listed): fingerprinted, cached and
scheduled like any other, so adding a value runs only its new points and
removing one runs nothing. Its values are parameters of the point (so they
are in its fingerprint, `MLBUILD_PARAM_*` and a Python function's keyword
arguments); `{matrix.KEY}` in a path, a local parameter or the description
is the value's text, and in `cmd` it stands for `{params.KEY}`, so the value
reaches the shell quoted like every other parameter.

A value's text is canonical (the float parsed from `0.10` is written `0.1`),
so a point's name does not change with the way its value is spelt, and it is
the point's name on the command line, in manifests and, through
`workspace.short_name`, in file names. Strings are plain words: a `,`, `=`,
`@`, `/` or a space would make names ambiguous or paths surprising.

Loaded pipelines without a matrix never import this module.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mlbuild.errors import PipelineError
from mlbuild.pipeline.schema import Target

if TYPE_CHECKING:
    from mlbuild.pipeline.load import _Loader

_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WORD_RE = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]*")
_REF_RE = re.compile(r"\{matrix\.([^{}]*)\}")
_TARGET_REF_RE = re.compile(r"\{targets\.([A-Za-z_][A-Za-z0-9_.-]*)\.outputs\.(\w+)\}")
# The keys whose strings may hold `{matrix.KEY}`; `cmd` is handled on its own.
_FILLED = ("inputs", "outputs", "metrics", "plots", "params", "description")
SEPARATOR = "@"


def value_text(value: Any) -> str:
    """A matrix value as it appears in point names and paths: one spelling per value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # the shortest text that reads back as this float
    return str(value)


def point_name(base: str, values: Mapping[str, Any]) -> str:
    """`train@lr=0.1,epochs=1`."""
    return base + SEPARATOR + ",".join(f"{k}={value_text(v)}" for k, v in values.items())


def base_name(name: str) -> str:
    """The matrix target a point belongs to (`train` of `train@lr=0.1`); other names as they are."""
    return name.partition(SEPARATOR)[0]


def expand_target(
    loader: _Loader,
    name: str,
    raw: dict[str, Any],
    params: Mapping[str, Any],
    overrides: Mapping[str, Any],
) -> dict[str, Target]:
    """The points of matrix target `name`, by point name, in product order."""
    where = f"targets.{name}"
    axes = _axes(loader, where, raw.get("matrix"), raw, params)
    _check_refs(loader, where, raw, axes)
    body = {k: v for k, v in raw.items() if k != "matrix"}
    cmd = body.get("cmd")
    if isinstance(cmd, str):
        body["cmd"] = _REF_RE.sub(lambda m: "{params." + m.group(1) + "}", cmd)
    points: dict[str, Target] = {}
    written: dict[str, str] = {}
    for combo in itertools.product(*axes.values()):
        values = dict(zip(axes, combo, strict=True))
        texts = {k: value_text(v) for k, v in values.items()}
        point_raw = dict(body)
        for key in _FILLED:
            if key in point_raw and not (key == "params" and isinstance(point_raw[key], list)):
                point_raw[key] = _fill(point_raw[key], texts)
        try:
            target = loader._target(name, point_raw, params, overrides, values)
        except PipelineError as exc:
            # Say `{matrix.lr}` as written, not the `{params.lr}` it became.
            message = exc.message
            for key in axes:
                message = message.replace("{params." + key + "}", "{matrix." + key + "}")
            raise loader.fail(exc.key, message) from None
        target = target._replace(name=point_name(name, values))
        for port in target.outputs:
            other = written.setdefault(port.path, target.name)
            if other != target.name:
                differ = [k for k in axes if texts[k] != _values_of(other)[k]]
                missing = ", ".join("{matrix." + k + "}" for k in differ)
                raise loader.fail(
                    f"{where}.outputs",
                    f"points '{other}' and '{target.name}' both write '{port.path}'"
                    f" (put {missing} in the path)",
                )
        points[target.name] = target
    return points


def _values_of(point: str) -> dict[str, str]:
    """KEY -> value text of a point's name (names are canonical, so this reads them back)."""
    pairs = point.partition(SEPARATOR)[2].split(",")
    return dict(pair.split("=", 1) for pair in pairs)


def _axes(
    loader: _Loader, where: str, matrix: Any, raw: dict[str, Any], params: Mapping[str, Any]
) -> dict[str, list[Any]]:
    """The matrix's keys and values, checked: scalars, canonical names unique, no shadowing."""
    key = f"{where}.matrix"
    if not isinstance(matrix, dict) or not matrix:
        raise loader.fail(key, "must be a table of KEY = [values], like { lr = [0.1, 0.01] }")
    declared = raw.get("params")
    local: dict[str, Any] = declared if isinstance(declared, dict) else {}
    sections = loader.from_files.sections if loader.from_files else {}
    axes: dict[str, list[Any]] = {}
    for name, values in matrix.items():
        at = f"{key}.{name}"
        if not _KEY_RE.fullmatch(name):
            raise loader.fail(at, "matrix keys use letters, digits and '_'")
        if name in params or name in sections:
            raise loader.fail(
                at, f"'{name}' is also a global parameter; rename the matrix key or the parameter"
            )
        if name in local:
            raise loader.fail(at, f"'{name}' is also a local parameter of this target")
        if not isinstance(values, list) or not values:
            raise loader.fail(at, "must be a non-empty list of values, like [0.1, 0.01]")
        seen: dict[str, Any] = {}
        for value in values:
            if not isinstance(value, str | int | float):  # bool is an int
                raise loader.fail(
                    at, f"{value!r}: matrix values are strings, integers, floats or booleans"
                )
            text = value_text(value)
            if isinstance(value, str) and (not _WORD_RE.fullmatch(value) or value in (".", "..")):
                raise loader.fail(
                    at,
                    f"{value!r}: a matrix string uses letters, digits, '_', '.', '+' and '-'"
                    " (it becomes part of target names and paths)",
                )
            if text in seen:
                first = seen[text]
                if first == value and type(first) is type(value):
                    same = " (values are compared as numbers)" if isinstance(value, float) else ""
                    raise loader.fail(at, f"{value!r} is listed twice{same}")
                raise loader.fail(
                    at, f"{first!r} and {value!r} give the same point name ({name}={text})"
                )
            seen[text] = value
        axes[name] = list(values)
    return axes


def _check_refs(loader: _Loader, where: str, raw: dict[str, Any], axes: Mapping[str, Any]) -> None:
    """Every `{matrix.KEY}` names a key of the matrix."""
    for field in ("cmd", *_FILLED):
        for text in _strings(raw.get(field)):
            for match in _REF_RE.finditer(text):
                if match.group(1) not in axes:
                    raise loader.fail(
                        f"{where}.{field}",
                        f"{match.group(0)}: no such matrix key (the matrix has"
                        f" {', '.join(axes)})" + did_you_mean(match.group(1), list(axes)),
                    )


def did_you_mean(word: str, choices: list[str]) -> str:
    """` (did you mean 'x'?)` or "" (as load.did_you_mean, which this module cannot import)."""
    import difflib  # only when something is misspelt

    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _strings(value: Any) -> list[str]:
    """Every string inside a TOML value."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    return []


def _fill(value: Any, texts: Mapping[str, str]) -> Any:
    """`value` with each `{matrix.KEY}` in its strings replaced by the point's value text."""
    if isinstance(value, str):
        return _REF_RE.sub(lambda m: texts[m.group(1)], value) if "{matrix." in value else value
    if isinstance(value, list):
        return [_fill(item, texts) for item in value]
    if isinstance(value, dict):
        return {k: _fill(item, texts) for k, item in value.items()}
    return value


class Expander:
    """The matrix targets of one pipeline file, each expanded once, in the order they are needed.

    A target may read every point's output as `inputs = ["{targets.train.outputs.model}"]`,
    whichever comes first in the file, so a matrix target is expanded when it is
    first asked for (by its own turn in the file or by a reference).
    """

    def __init__(
        self,
        loader: _Loader,
        raw_targets: Mapping[str, Any],
        params: Mapping[str, Any],
        overrides: Mapping[str, Mapping[str, Any]],
    ) -> None:
        self.loader = loader
        self.raw_targets = raw_targets
        self.params = params
        self.overrides = overrides
        self.done: dict[str, dict[str, Target]] = {}
        self.busy: list[str] = []  # targets being expanded, for a cycle of references

    def target(self, name: str) -> dict[str, Target]:
        """The targets `name` stands for: its points, or itself (with its references filled)."""
        made = self.done.get(name)
        if made is not None:
            return made
        if name in self.busy:
            cycle = " -> ".join([*self.busy[self.busy.index(name) :], name])
            raise self.loader.fail(f"targets.{name}.inputs", f"references form a cycle: {cycle}")
        self.busy.append(name)
        raw = self._with_references(name, self.raw_targets[name])
        overrides = self.overrides.get(name, {})
        if "matrix" in raw:
            made = expand_target(self.loader, name, raw, self.params, overrides)
        else:
            made = {name: self.loader._target(name, raw, self.params, overrides)}
        self.busy.pop()
        self.done[name] = made
        return made

    @property
    def matrices(self) -> dict[str, tuple[str, ...]]:
        return {
            name: tuple(made)
            for name, made in self.done.items()
            if "matrix" in self.raw_targets[name]
        }

    def resolve_after(self, targets: dict[str, Target]) -> dict[str, tuple[str, ...]]:
        """Point `after` at every point of a matrix target it names; return the matrices."""
        matrices = self.matrices
        resolve_after(targets, matrices)
        return matrices

    def _with_references(self, name: str, raw: dict[str, Any]) -> dict[str, Any]:
        """`raw` with each `{targets.T.outputs.NAME}` input replaced by every point's path."""
        where = f"targets.{name}.inputs"
        inputs = raw.get("inputs")
        if "{targets." not in repr(inputs):
            return raw
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list):
            raise self.loader.fail(
                where,
                "{targets.NAME.outputs.X} stands for many paths: use the list form of inputs",
            )
        paths: list[Any] = []
        for item in inputs:
            if not isinstance(item, str) or "{targets." not in item:
                paths.append(item)
                continue
            found = _TARGET_REF_RE.fullmatch(item)
            if found is None:
                raise self.loader.fail(
                    where, f"{item!r}: write a reference alone, as {{targets.NAME.outputs.X}}"
                )
            other, port = found.group(1), found.group(2)
            if other not in self.raw_targets:
                raise self.loader.fail(
                    where,
                    f"{item}: unknown target '{other}'" + did_you_mean(other, [*self.raw_targets]),
                )
            raw_other = self.raw_targets[other]
            if not isinstance(raw_other, dict) or "matrix" not in raw_other:
                raise self.loader.fail(
                    where, f"{item}: '{other}' is not a matrix target; name its path instead"
                )
            for point in self.target(other).values():
                paths.append(_output_of(self.loader, where, item, point, port))
        return {**raw, "inputs": paths}


def _output_of(loader: _Loader, where: str, item: str, point: Target, port: str) -> str:
    """The path of output `port` (a name or a position) of one point."""
    if port.isdigit() and int(port) < len(point.outputs):
        return point.outputs[int(port)].path
    for out in point.outputs:
        if out.name == port:
            return out.path
    names = ", ".join(o.name for o in point.outputs if o.name) or "no named outputs"
    raise loader.fail(where, f"{item}: no such output of '{base_name(point.name)}' ({names})")


def resolve_after(targets: dict[str, Target], matrices: Mapping[str, tuple[str, ...]]) -> None:
    """`after = ["train"]` naming a matrix target waits for every point (in place)."""
    for name, target in list(targets.items()):
        if any(other in matrices for other in target.after):
            after: list[str] = []
            for other in target.after:
                after.extend(matrices.get(other, (other,)))
            targets[name] = target._replace(after=tuple(after))
