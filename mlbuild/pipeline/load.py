"""pipeline.toml to the values of `schema`: validation, parameters, `--set`, sizes.

Everything here is pure: the only disk access is reading the pipeline file.
Every error names the file, the key (`targets.NAME.key`) and what is wrong, so
the CLI can print it as one line.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from mlbuild.errors import ParamsFileError, PipelineError, UsageError
from mlbuild.pipeline.schema import (
    EXECUTOR_KINDS,
    FILE_MODES,
    METRICS_SUFFIXES,
    PIPELINE_FILE,
    PLOT_SUFFIXES,
    STATE_DIR,
    CacheSettings,
    ExecutorSettings,
    Pipeline,
    Port,
    Resources,
    Target,
    WorkersSettings,
    display_path,
)
from mlbuild.uptodate import digest

if TYPE_CHECKING:
    # The parser and the templates are imported only when a file is parsed: a
    # command that reads the compiled snapshot (snapshot.py) needs neither. The
    # params files' module only when a pipeline has params files (see _Loader.load).
    import tomli

    from mlbuild.pipeline.paramfiles import ParamsFiles

_TOP_KEYS = ("params_files", "params", "pools", "targets", "cache", "executor", "workers")
_CACHE_KEYS = ("remote", "remote_write", "remote_options")
_EXECUTOR_KEYS = ("kind", "address", "files")
_RESOURCE_KEYS = ("cpus", "gpus", "memory", "custom")
_TARGET_KEYS = (
    "cmd",
    "python",
    "inputs",
    "outputs",
    "params",
    "env",
    "after",
    "always_run",
    "persist",
    "cache",
    "pool",
    "track",
    "description",
    "resources",
    "retries",
    "strict_inputs",
    "metrics",
    "plots",
    "matrix",
)
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_PORT_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PYTHON_REF_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
_GLOB_CHARS = frozenset("*?[")


def find_pipeline(start: Path) -> Path:
    """The nearest pipeline.toml in `start` or its parents."""
    for folder in (start, *start.parents):
        candidate = folder / PIPELINE_FILE
        if candidate.is_file():
            return candidate
    raise UsageError(f"no {PIPELINE_FILE} in {start} or any parent directory (use -f FILE)")


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """A ` (did you mean 'x'?)` suffix, or "" when nothing is close."""
    import difflib  # only when something is misspelt: off the no-op path

    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def missing_hint(root: Path, rel: str) -> str:
    """A hint for a path that does not exist, when one differing only in case or Unicode does.

    Returns " (a file 'cafe\\u0301.txt' exists with a different Unicode normalization)"
    or " (did you mean 'Data.csv'? names are case-sensitive)", else "". Names are
    compared component by component, listing only the directories on the way.
    """
    import unicodedata  # only when something is missing

    def fold(name: str, casefold: bool) -> str:
        name = unicodedata.normalize("NFC", name)
        return name.casefold() if casefold else name

    found: list[str] = []
    case_differs = form_differs = False
    folder = str(root)
    for part in rel.split("/"):
        path = os.path.join(folder, part)
        if not os.path.lexists(path):
            try:
                names = os.listdir(folder)
            except OSError:
                return ""
            wanted = fold(part, False)
            same = [n for n in names if fold(n, False) == wanted]
            if same:
                form_differs = True
            else:
                wanted = fold(part, True)
                same = [n for n in names if fold(n, True) == wanted]
                if not same:
                    return ""
                case_differs = True
            part = sorted(same)[0]
            path = os.path.join(folder, part)
        found.append(part)
        folder = path
    if not (case_differs or form_differs):
        return ""
    shown = "/".join(found)
    if case_differs:
        return f" (did you mean '{shown}'? names are case-sensitive)"
    return f" (a file {_visible(shown)} exists with a different Unicode normalization)"


def _visible(name: str) -> str:
    """A name quoted with non-ASCII characters escaped, so that invisible differences show."""
    if name.isascii():
        return f"'{name}'"
    return "'" + name.encode("ascii", "backslashreplace").decode("ascii") + "'"


def parse_value(raw: str) -> Any:
    """A `--set` value typed as TOML (`2`, `0.1`, `true`, `[1, 2]`), else a plain string."""
    import tomli

    try:
        return tomli.loads(f"v = {raw}")["v"]
    except tomli.TOMLDecodeError:
        return raw


class Override(NamedTuple):
    """One `--set`: the TOML-typed value, the text as written, and whether `:=` was used."""

    value: Any
    text: str
    retyped: bool = False  # NAME:=VALUE: the value may replace the declared type


def parse_overrides(items: Sequence[str]) -> dict[str, Override]:
    """`NAME=VALUE` strings from the command line, by name (the last one of a name wins)."""
    result: dict[str, Override] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        retyped = name.endswith(":")
        name = name.removesuffix(":").strip()
        if not sep or not name:
            raise UsageError(f"--set {item!r}: expected NAME=VALUE")
        result[name] = Override(parse_value(raw.strip()), raw.strip(), retyped)
    return result


def toml_type(value: Any) -> str:
    """The TOML type of a parameter value, as a user reads it in an error."""
    for kind, name in _TOML_TYPES:
        if isinstance(value, kind):
            return name
    return "a date or time"


_TOML_TYPES: tuple[tuple[type, str], ...] = (
    (bool, "a boolean"),  # before int: bool is an int in Python
    (int, "an integer"),
    (float, "a float"),
    (str, "a string"),
    (list, "an array"),
    (dict, "a table"),
)


def typed_override(key: str, declared: Any, given: Any) -> Any:
    """The value `--set` gives a parameter declared as `declared`.

    It must have the declared TOML type (`--set epochs=two` for `epochs = 1` is
    a mistake), except that an integer for a float is that float (`lr=1` is
    1.0) and, for a string, the text as written is the string (`tag=2` is
    "2"). `NAME:=VALUE` takes the value with whatever type it has.
    """
    if not isinstance(given, Override):  # from code, not the command line: as it is
        given = Override(given, str(given))
    if given.retyped:
        return given.value
    want, got = toml_type(declared), toml_type(given.value)
    if want == got:
        return given.value
    if want == "a float" and got == "an integer":
        return float(given.value)
    if want == "a string":
        return given.text
    raise UsageError(
        f"--set {key}={given.text}: {key} is {want} ({_shown(declared)}) and this is {got};"
        f" to change its type on purpose, write --set {key}:=VALUE"
    )


def _shown(value: Any) -> str:
    """A value as TOML writes it (`"two"`, `true`, `1`), for messages."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class Source(NamedTuple):
    """A file besides the pipeline file that the loaded value depends on, and its digest.

    The snapshot (mlbuild/snapshot.py) is valid only while each one still has
    this digest; `_Loader.read_source` is the one way the loader reads them.
    """

    path: str  # absolute
    digest: str  # source_digest of its bytes


def source_digest(data: bytes) -> str:
    """The digest the snapshot keys a file's bytes by (BLAKE3, already loaded for fingerprints)."""
    return digest(data)


def read_pipeline_bytes(file: Path) -> bytes:
    """The pipeline file's bytes (`file` resolved); a one-line UsageError if unreadable."""
    try:
        with open(file, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise UsageError(f"{display_path(file)}: no such file") from None
    except OSError as exc:
        raise UsageError(f"{display_path(file)}: cannot read: {exc}") from None


def load_pipeline(
    file: Path,
    overrides: Mapping[str, Any] | None = None,
    *,
    data: bytes | None = None,
    sources: list[Source] | None = None,
) -> Pipeline:
    """Read and validate a pipeline file, applying `--set` overrides.

    `data`: the file's bytes when the caller has read them already. `sources`,
    when given, receives every other file the value was made from.
    """
    import tomli

    file = file.resolve()
    shown = display_path(file)
    raw = read_pipeline_bytes(file) if data is None else data
    try:
        # Universal newlines, as reading in text mode does.
        text = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{shown}: cannot read: {exc}") from None
    try:
        parsed = tomli.loads(text)
    except tomli.TOMLDecodeError as exc:
        raise PipelineError(_toml_location(shown, exc), _toml_message(exc)) from None
    loader = _Loader(file, shown, parsed, dict(overrides or {}))
    pipeline = loader.load()
    if sources is not None:
        sources.extend(loader.sources)
    return pipeline


def _toml_location(shown: str, exc: tomli.TOMLDecodeError) -> str:
    line = getattr(exc, "lineno", None)
    col = getattr(exc, "colno", None)
    return f"{shown}:{line}:{col}" if line is not None else shown


def _toml_message(exc: tomli.TOMLDecodeError) -> str:
    msg = getattr(exc, "msg", None) or str(exc)
    return f"invalid TOML: {msg}"


class _Loader:
    """Validation of one parsed file; a class only to keep the file name at hand."""

    def __init__(self, file: Path, shown: str, data: dict[str, Any], overrides: dict[str, Any]):
        self.file = file
        self.shown = shown
        self.data = data
        self.overrides = overrides
        self.sources: list[Source] = []  # other files read (see read_source)

    def read_source(self, path: Path) -> bytes:
        """The bytes of a file the pipeline's value depends on (a params file, say).

        Every such read must go through here: the snapshot of this pipeline is
        keyed by the digests recorded, so an edit to the file reloads it.
        """
        with open(path, "rb") as handle:
            data = handle.read()
        self.sources.append(Source(str(path.resolve()), source_digest(data)))
        return data

    def fail(self, key: str | None, message: str) -> PipelineError:
        return PipelineError(self.shown, message, key)

    def load(self) -> Pipeline:
        for key in self.data:
            if key not in _TOP_KEYS:
                raise self.fail(key, "unknown top-level key" + did_you_mean(key, _TOP_KEYS))
        params = self.data.get("params", {})
        if not isinstance(params, dict):
            raise self.fail("params", "must be a table of name = value")
        params = dict(params)
        raw_targets = self.data.get("targets", {})
        if not isinstance(raw_targets, dict):
            raise self.fail("targets", "must be a table of [targets.NAME] tables")
        local_names = {
            (name, pname)
            for name, raw in raw_targets.items()
            if isinstance(raw, dict) and isinstance(raw.get("params"), dict)
            for pname in raw["params"]
        }
        files = self._strings("params_files", self.data.get("params_files", []))
        self.files = tuple(self._project_path("params_files", rel) for rel in files)
        if len(set(self.files)) < len(self.files):
            twice = next(rel for rel in self.files if self.files.count(rel) > 1)
            raise self.fail("params_files", f"'{twice}' is listed twice")
        self.from_files: ParamsFiles | None = None
        if self.files:  # the parsers only for a pipeline with params files
            from mlbuild.pipeline.paramfiles import merge_params_files

            self.from_files = merge_params_files(
                self.file.parent, self.files, self.shown, params, local_names, self.read_source
            )
        local_overrides = self._split_overrides(params, local_names)
        pools = self.data.get("pools", {})
        if not isinstance(pools, dict):
            raise self.fail("pools", "must be a table of name = number of concurrent steps")
        for pool, depth in pools.items():
            if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
                raise self.fail(f"pools.{pool}", "must be a whole number of at least 1")
        targets: dict[str, Target] = {}
        expander = None  # matrix targets and references to their points (pipeline/matrix.py)
        for name, raw in raw_targets.items():
            inputs = raw.get("inputs") if isinstance(raw, dict) else None
            if isinstance(raw, dict) and ("matrix" in raw or "{targets." in repr(inputs)):
                if expander is None:
                    from mlbuild.pipeline.matrix import Expander

                    expander = Expander(self, raw_targets, params, local_overrides)
                made = expander.target(name)
            else:
                made = {name: self._target(name, raw, params, local_overrides.get(name, {}))}
            for target in made.values():
                if target.pool is not None and target.pool not in pools:
                    raise self.fail(
                        f"targets.{name}.pool",
                        f"unknown pool '{target.pool}'" + did_you_mean(target.pool, list(pools)),
                    )
                targets[target.name] = target
        matrices = expander.resolve_after(targets) if expander is not None else {}
        return Pipeline(
            file=self.file,
            params=params,
            targets=targets,
            pools=pools,
            cache=self._cache_settings(),
            executor=self._executor_settings(),
            params_files=self.files,
            param_sources=self.from_files.sources if self.from_files else {},
            workers=self._workers_settings(),
            matrices=matrices,
        )

    def _table(self, key: str, known: tuple[str, ...]) -> dict[str, Any]:
        raw = self.data.get(key, {})
        if not isinstance(raw, dict):
            raise self.fail(key, "must be a table")
        for name in raw:
            if name not in known:
                raise self.fail(f"{key}.{name}", "unknown key" + did_you_mean(name, known))
        return raw

    def _cache_settings(self) -> CacheSettings:
        raw = self._table("cache", _CACHE_KEYS)
        remote = self._optional_string("cache.remote", raw.get("remote"))
        if remote is not None and "://" not in remote:
            # A plain path names a directory (local or NFS); relative to the pipeline file.
            remote = str((self.file.parent / Path(remote).expanduser()).resolve())
        options = raw.get("remote_options", {})
        if not isinstance(options, dict):
            raise self.fail("cache.remote_options", "must be a table of fsspec storage options")
        return CacheSettings(
            remote, self._bool("cache.remote_write", raw.get("remote_write", True)), options
        )

    def _executor_settings(self) -> ExecutorSettings:
        raw = self._table("executor", _EXECUTOR_KEYS)
        kind = raw.get("kind", "local")
        if kind not in EXECUTOR_KINDS:
            raise self.fail("executor.kind", f"must be one of {', '.join(EXECUTOR_KINDS)}")
        files = raw.get("files", "auto")
        if files not in FILE_MODES:
            raise self.fail("executor.files", f"must be one of {', '.join(FILE_MODES)}")
        address = self._optional_string("executor.address", raw.get("address"))
        return ExecutorSettings(kind, address, files)

    def _workers_settings(self) -> WorkersSettings:
        raw = self._table("workers", ("keep_warm",))
        value = raw.get("keep_warm")
        if value is None:
            return WorkersSettings()
        found = (
            re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smh])", value) if isinstance(value, str) else None
        )
        if found is None or float(found[1]) <= 0:
            raise self.fail("workers.keep_warm", 'must be a duration such as "10m", "90s" or "1h"')
        return WorkersSettings(float(found[1]) * {"s": 1, "m": 60, "h": 3600}[found[2]])

    def _split_overrides(
        self, params: dict[str, Any], local_names: set[tuple[str, str]]
    ) -> dict[str, dict[str, Any]]:
        """Apply global `--set NAME=V` in place; return `--set TARGET.NAME=V` per target."""
        local: dict[str, dict[str, Any]] = {}
        for key, value in self.overrides.items():
            if key in params:
                params[key] = typed_override(key, params[key], value)
                continue
            target, _, pname = key.rpartition(".")
            if (target, pname) in local_names:
                declared = self.data["targets"][target]["params"][pname]
                local.setdefault(target, {})[pname] = typed_override(key, declared, value)
                continue
            if self.from_files and key in self.from_files.sections:
                below = self.from_files.sections[key]
                shown = ", ".join(below[:3]) + (", ..." if len(below) > 3 else "")
                raise UsageError(
                    f"--set {key}: a section of {self.from_files.file_of(key)};"
                    f" set one of its keys ({shown})"
                )
            known = sorted(params) + sorted(f"{t}.{p}" for t, p in local_names)
            raise UsageError(
                f"--set {key}: no such parameter in {self.shown}" + did_you_mean(key, known)
            )
        return local

    def _target(
        self,
        name: str,
        raw: Any,
        params: Mapping[str, Any],
        overrides: Mapping[str, Any],
        matrix: Mapping[str, Any] | None = None,  # a matrix point's values (pipeline/matrix.py)
    ) -> Target:
        where = f"targets.{name}"
        if not _NAME_RE.fullmatch(name):
            raise self.fail(where, "target names use letters, digits, '_', '.' and '-'")
        if not isinstance(raw, dict):
            raise self.fail(where, "must be a table")
        for key in raw:
            if key not in _TARGET_KEYS:
                raise self.fail(f"{where}.{key}", "unknown key" + did_you_mean(key, _TARGET_KEYS))
        cmd = raw.get("cmd")
        python = raw.get("python")
        if (cmd is None) == (python is None):
            raise self.fail(
                where, "needs exactly one of 'cmd' (shell) or 'python' (module:function)"
            )
        if cmd is not None and (not isinstance(cmd, str) or not cmd.strip()):
            raise self.fail(f"{where}.cmd", "must be a non-empty string")
        if cmd is not None and "{matrix." in cmd:  # a matrix point's cmd has none left
            raise self.fail(f"{where}.cmd", "{matrix.KEY} in a target without a matrix")
        if python is not None and (
            not isinstance(python, str) or not _PYTHON_REF_RE.fullmatch(python)
        ):
            raise self.fail(f"{where}.python", "must look like 'package.module:function'")
        inputs = self._ports(f"{where}.inputs", raw.get("inputs", []), allow_glob=True)
        outputs = self._ports(f"{where}.outputs", raw.get("outputs", []), allow_glob=False)
        metrics = self._declared_files(
            f"{where}.metrics", raw.get("metrics", []), tuple(METRICS_SUFFIXES), "metrics"
        )
        plots = self._declared_files(f"{where}.plots", raw.get("plots", []), PLOT_SUFFIXES, "plot")
        outputs = with_declared_outputs(outputs, metrics + plots)
        target_params = self._params(where, raw.get("params"), params, overrides)
        if matrix:
            target_params.update(matrix)
        command = None
        if cmd is not None:
            from mlbuild.pipeline.interpolate import TemplateError, fill, parse_template

            try:  # filling checks that every placeholder names something declared
                command = fill(parse_template(cmd), inputs, outputs, target_params)
            except TemplateError as exc:
                raise self.fail(f"{where}.cmd", str(exc)) from None
        target = Target(
            name=name,
            cmd=cmd,
            command=command,
            python=python,
            inputs=inputs,
            outputs=outputs,
            params=target_params,
            env=self._strings(f"{where}.env", raw.get("env", [])),
            after=self._strings(f"{where}.after", raw.get("after", [])),
            always_run=self._bool(f"{where}.always_run", raw.get("always_run", False)),
            persist=self._bool(f"{where}.persist", raw.get("persist", False)),
            cache=self._bool(f"{where}.cache", raw.get("cache", True)),
            pool=self._optional_string(f"{where}.pool", raw.get("pool")),
            track=self._strings(f"{where}.track", raw.get("track", [])),
            description=str(raw.get("description", "")),
            resources=self._resources(f"{where}.resources", raw.get("resources")),
            retries=self._count(f"{where}.retries", raw.get("retries", 0)),
            strict_inputs=self._bool(f"{where}.strict_inputs", raw.get("strict_inputs", False)),
            metrics=metrics,
            plots=plots,
        )
        if target.strict_inputs and python is None:
            raise self.fail(
                f"{where}.strict_inputs",
                "applies only to python steps (shell steps are not observed)",
            )
        if python is not None:
            names = target.call_names()
            clash = sorted({n for n in names if names.count(n) > 1})
            if clash:
                raise self.fail(
                    where,
                    f"'{clash[0]}' names two of its inputs, outputs and params;"
                    " a Python function receives them as keyword arguments",
                )
        return target

    def _ports(self, key: str, raw: Any, *, allow_glob: bool) -> tuple[Port, ...]:
        if isinstance(raw, str):
            raw = [raw]
        if isinstance(raw, list):
            items: list[tuple[str | None, Any]] = [(None, value) for value in raw]
        elif isinstance(raw, dict):
            items = list(raw.items())
        else:
            raise self.fail(key, "must be a list of paths or a table of name = path")
        ports: list[Port] = []
        seen: set[str] = set()
        for port_name, value in items:
            where = f"{key}.{port_name}" if port_name is not None else key
            if port_name is not None and not _PORT_NAME_RE.fullmatch(port_name):
                raise self.fail(where, "names use letters, digits and '_'")
            if not isinstance(value, str) or not value.strip():
                raise self.fail(where, "must be a path string")
            is_glob = any(ch in _GLOB_CHARS for ch in value)
            if is_glob and not allow_glob:
                raise self.fail(where, f"{value!r}: outputs cannot be glob patterns")
            path = self._project_path(where, value)
            if path in seen:
                raise self.fail(where, f"{value!r} is listed twice")
            seen.add(path)
            ports.append(Port(port_name, path, is_glob))
        return tuple(ports)

    def _declared_files(
        self, key: str, raw: Any, suffixes: tuple[str, ...], what: str
    ) -> tuple[str, ...]:
        """`plots = [...]` and the like: files a step writes in one of the formats `suffixes`."""
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list):
            raise self.fail(key, "must be a list of paths")
        paths: list[str] = []
        for value in raw:
            if not isinstance(value, str) or not value.strip():
                raise self.fail(key, "must be a list of paths")
            if any(ch in _GLOB_CHARS for ch in value):
                raise self.fail(key, f"{value!r}: {what} files cannot be glob patterns")
            path = self._project_path(key, value)
            if not path.lower().endswith(suffixes):
                known = ", ".join(suffixes)
                raise self.fail(key, f"{value!r}: unknown {what} format (use {known})")
            if path in paths:
                raise self.fail(key, f"{value!r} is listed twice")
            paths.append(path)
        return tuple(paths)

    def _project_path(self, key: str, value: str) -> str:
        """Normalize a path and refuse one that leaves the project or touches .mlbuild."""
        if "\0" in value:
            raise self.fail(key, f"{value!r} contains a NUL character")
        if "{matrix." in value:  # a matrix point's paths have none left
            raise self.fail(key, f"{value!r}: {{matrix.KEY}} in a target without a matrix")
        if posixpath.isabs(value) or re.match(r"[A-Za-z]:[\\/]", value):
            raise self.fail(key, f"{value!r} is absolute; paths are relative to the project")
        path = posixpath.normpath(value.replace("\\", "/"))
        if path == ".." or path.startswith("../"):
            raise self.fail(key, f"{value!r} leaves the project directory")
        if path == ".":
            raise self.fail(key, f"{value!r} is the whole project directory")
        if path == STATE_DIR or path.startswith(STATE_DIR + "/"):
            raise self.fail(key, f"{value!r} is inside mlbuild's own {STATE_DIR}/")
        return path

    def _params(
        self, where: str, raw: Any, params: Mapping[str, Any], overrides: Mapping[str, Any]
    ) -> dict[str, Any]:
        if raw is None:
            return {}
        if isinstance(raw, dict):
            local = {**raw, **overrides}
            for pname, value in local.items():
                self._carriable(f"{where}.params.{pname}", value)
            return local
        if isinstance(raw, list):
            chosen: dict[str, Any] = {}
            sections = self.from_files.sections if self.from_files else {}
            for pname in raw:
                if not isinstance(pname, str):
                    raise self.fail(f"{where}.params", "a list of global parameter names")
                names = sections.get(pname, (pname,))  # a section: every key below it
                if pname not in params and pname not in sections:
                    raise self.fail(f"{where}.params", self._unknown(pname, params, sections))
                for name in names:
                    chosen[name] = self._carriable_global(name, params[name])
            return chosen
        raise self.fail(f"{where}.params", "a table of local values or a list of global names")

    def _unknown(self, pname: str, params: Mapping[str, Any], sections: Mapping[str, Any]) -> str:
        """`unknown parameter 'x'`, naming the params files it is not in, with a near name."""
        hint = did_you_mean(pname, [*params, *sections])
        if not self.files:
            return f"unknown parameter '{pname}'" + hint
        where = " or ".join(self.files)
        return f"unknown parameter '{pname}': not in [params] nor a key of {where}" + hint

    def _carriable_global(self, name: str, value: Any) -> Any:
        """`_carriable` for a global parameter, naming the params file that holds it."""
        source = self.from_files.sources.get(name) if self.from_files else None
        if source is None:
            return self._carriable(f"params.{name}", value)
        try:
            return self._carriable(name, value)
        except PipelineError as exc:
            shown = display_path(self.file.parent / source)
            raise ParamsFileError(shown, exc.message, name) from None

    def _carriable(self, key: str, value: Any) -> Any:
        """A value a step can receive: no argv or environment entry can hold a NUL byte."""
        if isinstance(value, str) and "\0" in value:
            raise self.fail(key, "contains a NUL character, which a command line cannot carry")
        return value

    def _strings(self, key: str, raw: Any) -> tuple[str, ...]:
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list) or not all(isinstance(v, str) and v for v in raw):
            raise self.fail(key, "must be a list of strings")
        return tuple(raw)

    def _optional_string(self, key: str, raw: Any) -> str | None:
        if raw is not None and (not isinstance(raw, str) or not raw):
            raise self.fail(key, "must be a string")
        return raw

    def _resources(self, key: str, raw: Any) -> Resources | None:
        if raw is None:
            return None
        if not isinstance(raw, dict):
            raise self.fail(key, 'must be a table like { cpus = 2, gpus = 1, memory = "8GB" }')
        for name in raw:
            if name not in _RESOURCE_KEYS:
                raise self.fail(f"{key}.{name}", "unknown key" + did_you_mean(name, _RESOURCE_KEYS))
        memory = raw.get("memory")
        if memory is not None:
            try:
                memory = parse_size(memory) if isinstance(memory, str) else memory
            except ValueError as exc:
                raise self.fail(f"{key}.memory", str(exc)) from None
            if not isinstance(memory, int) or isinstance(memory, bool) or memory <= 0:
                raise self.fail(f"{key}.memory", 'must be a size like "8GB" or a byte count')
        custom = raw.get("custom", {})
        if not isinstance(custom, dict):
            raise self.fail(f"{key}.custom", "must be a table of resource name = amount")
        return Resources(
            cpus=self._amount(f"{key}.cpus", raw.get("cpus", 1)),
            gpus=self._amount(f"{key}.gpus", raw.get("gpus", 0)),
            memory=memory,
            custom={n: self._amount(f"{key}.custom.{n}", v) for n, v in custom.items()},
        )

    def _amount(self, key: str, raw: Any) -> float:
        if not isinstance(raw, int | float) or isinstance(raw, bool) or raw < 0:
            raise self.fail(key, "must be a number of 0 or more")
        return float(raw)

    def _count(self, key: str, raw: Any) -> int:
        if not isinstance(raw, int) or isinstance(raw, bool) or raw < 0:
            raise self.fail(key, "must be a whole number of 0 or more")
        return raw

    def _bool(self, key: str, raw: Any) -> bool:
        if not isinstance(raw, bool):
            raise self.fail(key, "must be true or false")
        return raw


def with_declared_outputs(outputs: tuple[Port, ...], files: tuple[str, ...]) -> tuple[Port, ...]:
    """`outputs` plus each declared plot (or metrics) file that is not already one or inside one.

    Such a file is an output like the others (cleared before its step, checked,
    cached, restored). One not listed joins them without a name, as if written
    in `outputs`: a shell command's `{outputs}` includes it; a Python function
    with named outputs is not given it (it writes to the path it knows), one
    with a list of outputs finds it in `outputs`.
    """
    result = list(outputs)
    for path in files:
        if not any(path == o.path or path.startswith(o.path + "/") for o in result):
            result.append(Port(None, path))
    return tuple(result)


def parse_size(text: str) -> int:
    """`10GB`, `500M`, `1.5GiB`, `2048` to bytes (decimal units, binary with `i`)."""
    units = {
        "": 1,
        "k": 10**3,
        "m": 10**6,
        "g": 10**9,
        "t": 10**12,
        "ki": 2**10,
        "mi": 2**20,
        "gi": 2**30,
        "ti": 2**40,
    }
    raw = text.strip().lower().removesuffix("b")
    number = raw.rstrip("kmgti")
    unit = raw[len(number) :]
    if unit not in units:
        raise ValueError(f"unknown size unit in {text!r}")
    try:
        return int(float(number) * units[unit])
    except ValueError:
        raise ValueError(f"not a size: {text!r}") from None
