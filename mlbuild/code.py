"""Code fingerprints: a step's Python module and the project-local modules it imports.

ZenML hashes only a step function's own source, so an edited helper module is
missed; DVC sees no code unless it is listed. Here a Python target's code is
its function's module plus every module of the project it imports,
transitively, found by static analysis of `import` statements (relative ones
included) against the directories Python would search. Modules outside the
project (standard library, site-packages) are not followed: `track` covers
installed distributions.

Importing a module runs the `__init__.py` of every package on its way, so
those count too, the step module's own packages included. Literal dynamic
imports (`importlib.import_module("steps.dyn")`, `__import__("steps.dyn")`)
are followed like `import` statements; a computed name cannot be, and the
file is noted (`dynamic`) so that `mlbuild show` can say the closure may be
incomplete. What static analysis misses (imports through `sys.path` changes,
sourceless `.pyc` and extension modules) the worker observes when the step
runs (observed.py): those files join the fingerprint from the next run on.

Each file counts by the digest of its normalized AST: comments, blank lines,
formatting and docstrings do not change it, any change to code does. Code can
read docstrings, though (`__doc__`, `inspect.getdoc`): when any module of a
closure mentions either, the closure's modules count by their AST with the
docstrings kept (`doc_digest`), since a module may read another's. Parsing
is skipped for files whose bytes are unchanged: the stat cache gives the raw
digest, and `parsed` maps a raw digest to its AST digest and imports (kept in
the state database between runs).

Shell targets get the same for scripts named in their command: `python x.py`,
`python -m pkg.mod`, `bash x.sh`, or any word that names a file of the project
ending in a script suffix.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shlex
import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, NamedTuple

from mlbuild.errors import MlbuildError
from mlbuild.pipeline.schema import EMPTY, Target

if TYPE_CHECKING:
    import ast  # at run time imported where a file is parsed: a no-op parses nothing
from mlbuild.fingerprint import Fingerprinter, hash_bytes
from mlbuild.manifest import DigestKind

SCRIPT_SUFFIXES = (".py", ".sh", ".bash", ".zsh", ".R", ".r", ".jl", ".pl", ".rb")
# A cheap test before tokenizing: a word ending in a script suffix, or `-m`.
_MAY_NAME_SCRIPT = re.compile(
    r"\.(?:" + "|".join(re.escape(x[1:]) for x in SCRIPT_SUFFIXES) + r")\b|(?:^|\s)-m\s"
)


def may_name_script(command: str) -> bool:
    """False when a shell command cannot name a script: its code closure is empty."""
    return _MAY_NAME_SCRIPT.search(command) is not None


_PYTHONS = ("python", "python3", "python3.11", "python3.12", "python3.13", "ipython")


class CodeError(MlbuildError):
    """A step module that cannot be used: missing, syntax error, bad signature."""


PARSED_VERSION = 3  # bump when Parsed changes: older cache rows are parsed again
# Names through which code reads docstrings; a module mentioning one keeps them in its hash.
_READS_DOCS = (b"__doc__", b"getdoc")
_DYNAMIC_IMPORTS = ("import_module", "__import__")
# `imported_by` value of a module seen imported when the step last ran (not found statically).
AT_RUN_TIME = ""


class Signature(NamedTuple):
    """A top-level function's parameters, enough to check the names a target passes."""

    positional: tuple[str, ...]
    required_positional: int
    keyword_only: tuple[str, ...]
    required_keyword: tuple[str, ...]
    var_keyword: bool
    positional_only: tuple[str, ...]
    is_async: bool

    @staticmethod
    def of(node: ast.FunctionDef | ast.AsyncFunctionDef) -> Signature:
        import ast

        args = node.args
        positional = tuple(a.arg for a in args.args)
        return Signature(
            positional=positional,
            required_positional=len(positional) - len(args.defaults),
            keyword_only=tuple(a.arg for a in args.kwonlyargs),
            required_keyword=tuple(
                a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is None
            ),
            var_keyword=args.kwarg is not None,
            positional_only=tuple(a.arg for a in args.posonlyargs),
            is_async=isinstance(node, ast.AsyncFunctionDef),
        )

    def problem(self, accepted: list[str]) -> str | None:
        """Why calling with exactly these keyword arguments would fail, or None."""
        if self.is_async:
            return "is async; step functions must be plain functions"
        names = set(self.positional) | set(self.keyword_only)
        if not self.var_keyword:
            unknown = [n for n in accepted if n not in names]
            if unknown:
                return "does not accept " + ", ".join(unknown) + " (declared in pipeline.toml)"
        required = [*self.positional[: self.required_positional], *self.required_keyword]
        missing = [n for n in required if n not in accepted] + list(self.positional_only)
        if missing:
            return "requires " + ", ".join(missing) + ", which the target does not declare"
        return None


class Parsed(NamedTuple):
    """What a Python file contributes: its AST digest, imports and top-level functions.

    `imports` holds (level, module, names) of each import statement, unresolved,
    so that the same bytes can be resolved under any module name. `defines` is
    the set of top-level names, or None when the module may define anything
    (star imports, `__getattr__`, definitions under `if`/`try`). `reads_docs`:
    the module mentions `__doc__` or `getdoc`; `doc_digest` is the AST digest
    with docstrings kept; `dynamic`: it imports a module by a computed name.
    """

    digest: str
    imports: tuple[tuple[int, str, tuple[str, ...]], ...]
    functions: Mapping[str, Signature] = EMPTY
    defines: frozenset[str] | None = None
    reads_docs: bool = False
    dynamic: bool = False
    doc_digest: str = ""

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": PARSED_VERSION,
                "digest": self.digest,
                "imports": [list(i) for i in self.imports],
                "functions": {name: list(sig) for name, sig in self.functions.items()},
                "defines": None if self.defines is None else sorted(self.defines),
                "reads_docs": self.reads_docs,
                "dynamic": self.dynamic,
                "doc_digest": self.doc_digest,
            }
        )

    @staticmethod
    def from_json(text: str) -> Parsed | None:
        """The cached parse, or None if another version of this code wrote it, or it is damaged."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("version") != PARSED_VERSION:
                return None
            functions = {}
            for name, fields in data["functions"].items():
                pos, req, kw, req_kw, var_kw, pos_only, is_async = fields
                functions[name] = Signature(
                    tuple(pos), req, tuple(kw), tuple(req_kw), var_kw, tuple(pos_only), is_async
                )
            return Parsed(
                data["digest"],
                tuple((lvl, mod, tuple(names)) for lvl, mod, names in data["imports"]),
                functions,
                None if data["defines"] is None else frozenset(data["defines"]),
                bool(data["reads_docs"]),
                bool(data["dynamic"]),
                data["doc_digest"],
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None  # a damaged row: the file is simply parsed again


class CodeFingerprint(NamedTuple):
    """A target's code files (path -> digest) and, for reasons, who imported each.

    `reads_docs`: some file mentions `__doc__`, so digests keep docstrings.
    `dynamic`: files that import a module by a computed name.
    """

    files: Mapping[str, str]
    imported_by: Mapping[str, str] = EMPTY
    reads_docs: bool = False
    dynamic: tuple[str, ...] = ()


def parse_python(source: bytes, filename: str) -> Parsed:
    """Parse and digest a module; raises SyntaxError."""
    import ast

    tree = ast.parse(source, filename=filename)
    imports: list[tuple[int, str, tuple[str, ...]]] = []
    dynamic = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imports.extend((0, alias.name, ()) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names = tuple(alias.name for alias in node.names)
            imports.append((node.level, node.module or "", names))
        elif isinstance(node, ast.Call) and _called_name(node.func) in _DYNAMIC_IMPORTS:
            found = _literal_import(node)
            if found is None:
                dynamic = True
            else:
                imports.append(found)
    functions = {
        node.name: Signature.of(node)
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }
    defines = _top_level_names(tree)
    with_docs = ast.dump(tree, annotate_fields=False, include_attributes=False)
    _strip_docstrings(tree)
    dumped = ast.dump(tree, annotate_fields=False, include_attributes=False)
    reads_docs = any(name in source for name in _READS_DOCS)
    digest = hash_bytes(dumped.encode())
    doc_digest = hash_bytes(with_docs.encode())
    return Parsed(digest, tuple(imports), functions, defines, reads_docs, dynamic, doc_digest)


def _called_name(func: ast.expr) -> str | None:
    """`f` of a call `f(...)` or `x.f(...)`."""
    import ast

    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _literal_import(call: ast.Call) -> tuple[int, str, tuple[str, ...]] | None:
    """The import a literal `import_module(...)` or `__import__(...)` call does, or None.

    `import_module(".x", __package__)` is relative like `from . import x`;
    with a literal package it is absolute. Anything computed gives None.
    """
    import ast

    def literal(node: ast.expr | None) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        return None

    args = list(call.args)
    keywords = {k.arg: k.value for k in call.keywords if k.arg is not None}
    name = literal(args[0] if args else keywords.get("name"))
    if not name:
        return None
    if _called_name(call.func) == "__import__":
        fromlist = args[3] if len(args) > 3 else keywords.get("fromlist")
        names: tuple[str, ...] = ()
        if isinstance(fromlist, ast.List | ast.Tuple):
            found = [literal(e) for e in fromlist.elts]
            names = tuple(n for n in found if n)
        level_node = args[4] if len(args) > 4 else keywords.get("level")
        level = 0
        if isinstance(level_node, ast.Constant) and isinstance(level_node.value, int):
            level = level_node.value
        return (level, name, names)
    stripped = name.lstrip(".")
    level = len(name) - len(stripped)
    if not level:
        return (0, name, ())
    package = args[1] if len(args) > 1 else keywords.get("package")
    if isinstance(package, ast.Name) and package.id == "__package__":
        return (level, stripped, ())
    base = literal(package)
    if base is None:
        return None
    parts = base.split(".")
    if level - 1 >= len(parts):
        return None
    absolute = ".".join(parts[: len(parts) - (level - 1)])
    return (0, f"{absolute}.{stripped}" if stripped else absolute, ())


def _strip_docstrings(tree: ast.Module) -> None:
    import ast

    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                # A body of only a docstring keeps a `pass` so the tree stays valid.
                body[:1] = [] if len(body) > 1 else [ast.Pass()]


class CodeScanner:
    """Finds and digests the code of targets; memoized for one build."""

    def __init__(self, fp: Fingerprinter, parsed: Mapping[str, Parsed]) -> None:
        self.fp = fp
        self.root = str(fp.root)
        self.parsed: dict[str, Parsed] = dict(parsed)
        self.new_parsed: dict[str, Parsed] = {}  # raw digest -> Parsed, to persist
        self._resolved: dict[tuple[str, str], str | None] = {}
        self._closures: dict[tuple[str, str, str], CodeFingerprint] = {}

    def fingerprint(self, target: Target, imported: Iterable[str] = ()) -> CodeFingerprint:
        """The code a target runs. Raises CodeError for a Python target's broken module.

        `imported`: project modules the step was seen importing when it last
        ran (observed.py); those the static closure lacks are added, like the
        headers a compiler's depfile names.
        """
        if target.python is not None:  # the function's module and its imports
            module = target.python.partition(":")[0]
            rel = self.resolve(module, "")
            if rel is None:
                static = CodeFingerprint({})
            else:
                static = self._closure(rel, module, "", strict=True)
            return self._with_imported(static, imported)
        files: dict[str, str] = {}
        imported_by: dict[str, str] = {}
        reads_docs = False
        dynamic: list[str] = []
        outputs = [p.path for p in target.outputs]
        for rel, module, search in self.scripts_of(target.command or ""):
            if any(rel == out or rel.startswith(out + "/") for out in outputs):
                continue  # a script the step writes is its output, not its code
            if rel.endswith(".py"):
                found = self._closure(rel, module, search, strict=False)
                files.update(found.files)
                imported_by.update(found.imported_by)
                reads_docs = reads_docs or found.reads_docs
                dynamic.extend(found.dynamic)
            else:
                files[rel] = self.fp.digest(rel).digest
        return CodeFingerprint(files, imported_by, reads_docs, tuple(dict.fromkeys(dynamic)))

    def _with_imported(self, static: CodeFingerprint, imported: Iterable[str]) -> CodeFingerprint:
        files = dict(static.files)
        imported_by = dict(static.imported_by)
        for rel in imported:
            if rel not in files:
                # Without docstrings even in a closure that reads them: settle() took
                # the digest the same way, and the two must agree.
                digest = self.digest_code(rel)
                if digest is not None:  # gone: the step reruns for "code removed"
                    files[rel] = digest
                    imported_by[rel] = AT_RUN_TIME
        if len(files) == len(static.files):
            return static
        return static._replace(files=files, imported_by=imported_by)

    def digest_code(self, rel: str) -> str | None:
        """A code file's digest: a `.py` by its AST, others (`.pyc`, `.so`) by their bytes.

        None when the file is missing. A `.py` that does not parse counts by its bytes.
        """
        digest = self.fp.digest(rel)
        if digest.kind is not DigestKind.FILE:
            return None
        if not rel.endswith(".py"):
            return digest.digest
        try:
            return self.parse(rel).digest
        except SyntaxError:
            return digest.digest

    def scripts_of(self, command: str) -> list[tuple[str, str, str]]:
        """(file, module name, search dir) of each script a shell command names."""
        if not _MAY_NAME_SCRIPT.search(command):
            return []  # most commands name no script: skip tokenizing them
        try:
            words = shlex.split(command, comments=True)
        except ValueError:
            words = command.split()
        found: list[tuple[str, str, str]] = []
        for i, word in enumerate(words):
            if word == "-m" and i > 0 and posixpath.basename(words[i - 1]) in _PYTHONS:
                if i + 1 < len(words):
                    rel = self.resolve(words[i + 1], "")
                    if rel is not None:
                        found.append((rel, words[i + 1], ""))
                continue
            if not word.endswith(SCRIPT_SUFFIXES) or word.startswith("-"):
                continue
            rel = posixpath.normpath(word)
            if rel.startswith("../") or posixpath.isabs(rel):
                continue
            if os.path.isfile(os.path.join(self.root, rel)):
                found.append((rel, "__main__", posixpath.dirname(rel)))
        return found

    def resolve(self, module: str, search: str) -> str | None:
        """The project file of module `module` in search dir `search` ("" = the root)."""
        key = (module, search)
        if key not in self._resolved:
            base = posixpath.join(search, *module.split("."))
            found = None
            for candidate in (base + ".py", base + "/__init__.py"):
                if os.path.isfile(os.path.join(self.root, candidate)):
                    found = posixpath.normpath(candidate)
                    break
            self._resolved[key] = found
        return self._resolved[key]

    def parse(self, rel: str) -> Parsed:
        """The Parsed form of a project file, through the stat cache and the parse cache."""
        raw = self.fp.digest(rel).digest
        cached = self.parsed.get(raw)
        if cached is not None:
            return cached
        with open(os.path.join(self.root, rel), "rb") as handle:
            parsed = parse_python(handle.read(), rel)
        self.parsed[raw] = parsed
        self.new_parsed[raw] = parsed
        return parsed

    def _closure(self, rel: str, module: str, search: str, *, strict: bool) -> CodeFingerprint:
        """`rel` (module `module`), the packages on its way, and all they import, transitively."""
        key = (rel, module, search)
        if key in self._closures:
            return self._closures[key]
        files: dict[str, str] = {}
        with_docs: dict[str, str] = {}  # the same, docstrings kept: used if one reads them
        imported_by: dict[str, str] = {}
        reads_docs = False
        dynamic: list[str] = []
        # Importing `a.b.c` runs a/__init__.py and a/b/__init__.py first.
        packages = self._files_of(module, search)[:-1] if module != "__main__" else []
        queue = [(rel, module), *reversed(packages)]
        while queue:
            path, name = queue.pop()
            if path in files:
                continue
            try:
                parsed = self.parse(path)
            except SyntaxError as exc:
                if strict:
                    raise CodeError(f"{path}:{exc.lineno}: syntax error: {exc.msg}") from None
                files[path] = with_docs[path] = self.fp.digest(path).digest
                continue
            files[path] = parsed.digest
            with_docs[path] = parsed.doc_digest
            reads_docs = reads_docs or parsed.reads_docs
            if parsed.dynamic:
                dynamic.append(path)
            is_package = path.endswith("/__init__.py")
            for imported in _imported_modules(name, is_package, parsed.imports):
                for dep, dep_name in self._files_of(imported, search):
                    if dep not in files:
                        imported_by.setdefault(dep, path)
                        queue.append((dep, dep_name))
        result = CodeFingerprint(
            with_docs if reads_docs else files, imported_by, reads_docs, tuple(sorted(dynamic))
        )
        self._closures[key] = result
        return result

    def _files_of(self, module: str, search: str) -> list[tuple[str, str]]:
        """(file, module name) of what importing `module` executes: packages, then itself."""
        found: list[tuple[str, str]] = []
        parts = module.split(".")
        for n in range(1, len(parts) + 1):
            name = ".".join(parts[:n])
            for where in dict.fromkeys((search, "")):
                rel = self.resolve(name, where)
                if rel is not None:
                    found.append((rel, name))
                    break
        return found


def _imported_modules(
    name: str, is_package: bool, imports: tuple[tuple[int, str, tuple[str, ...]], ...]
) -> list[str]:
    """Absolute module names a module imports; `from a import b` also tries `a.b`."""
    package = name if is_package else name.rpartition(".")[0]
    result: list[str] = []
    for level, module, names in imports:
        if level:
            base_parts = package.split(".") if package else []
            if level - 1 > len(base_parts):
                continue
            base = ".".join(base_parts[: len(base_parts) - (level - 1)])
            module = f"{base}.{module}".strip(".") if module else base
        if not module:
            continue
        result.append(module)
        result.extend(f"{module}.{n}" for n in names if n != "*")
    return result


def check_function(scanner: CodeScanner, target: Target, accepted: list[str]) -> None:
    """Check a Python target's `module:function` before anything runs.

    Only the project's own files are read, never imported (a step module may
    import TensorFlow), and through the parse cache, so an unchanged module
    costs a stat. A module outside the project is checked by the worker.
    """
    assert target.python is not None
    module, _, function = target.python.partition(":")
    rel = scanner.resolve(module, "")
    if rel is None:
        if _installed(module):
            return
        raise CodeError(f"no module '{module}' in the project or the environment")
    try:
        parsed = scanner.parse(rel)
    except SyntaxError as exc:
        raise CodeError(f"{rel}:{exc.lineno}: syntax error: {exc.msg}") from None
    signature = parsed.functions.get(function)
    if signature is not None:
        problem = signature.problem(accepted)
        if problem:
            raise CodeError(f"{rel}: {function}() {problem}")
    elif parsed.defines is not None and function not in parsed.defines:
        raise CodeError(f"{rel} has no function '{function}'")


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module.partition(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def _top_level_names(tree: ast.Module) -> frozenset[str] | None:
    """Names a module's top level defines or imports; None if it might define any name."""
    import ast

    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if node.name == "__getattr__":
                return None
            names.add(node.name)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                if alias.name == "*":
                    return None
                names.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
        elif not isinstance(node, ast.Expr):
            # if/try/with blocks at top level: too dynamic to rule anything out.
            return None
    return frozenset(names)


def package_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """Installed versions of distributions, from their `*.dist-info` folder names.

    Reading directory listings of `sys.path` is enough (the folder is named
    `<normalized name>-<version>.dist-info`) and costs well under a
    millisecond, where `importlib.metadata` costs ~50 ms to import. Nothing is
    imported from the packages themselves.
    """
    if not names:
        return {}
    found: dict[str, str] = {}
    for folder in sys.path:
        try:
            entries = os.listdir(folder or ".")
        except OSError:
            continue
        for entry in entries:
            if entry.endswith((".dist-info", ".egg-info")):
                stem = entry.rsplit(".", 1)[0]
                name, sep, version = stem.partition("-")
                key = _normalize(name)
                if sep and key not in found:
                    found[key] = version.split("-")[0]
    return {name: found.get(_normalize(name)) for name in names}


def _normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()
