"""The import direction of docs/ARCHITECTURE.md, checked: a later change cannot quietly break it.

Every import of an `mlbuild` module counts, at module level or inside a
function (a lazy import is still a dependency); imports under
`if TYPE_CHECKING:` do not, since they never run.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mlbuild"

# Bottom to top. A module may import modules of its own layer or of layers below it,
# never above. Keep in step with the table in docs/ARCHITECTURE.md. A module is named
# from mlbuild/ (`exec.worker` is mlbuild/exec/worker.py); a subpackage named alone
# (`cache`) is one module, all its files together. A subpackage is one layer's modules.
LAYERS: tuple[tuple[str, frozenset[str]], ...] = (
    ("foundation", frozenset({"errors", "scheduler", "uptodate"})),
    (
        "pipeline",
        frozenset(
            {
                "pipeline.schema",
                "pipeline.load",
                "pipeline.interpolate",
                "pipeline.edit",
                "pipeline.paramfiles",
                "pipeline.schema_file",
                "pipeline.matrix",
            }
        ),
    ),
    ("state", frozenset({"workspace", "manifest", "fingerprint", "graph", "store", "snapshot"})),
    ("analysis", frozenset({"code", "staleness", "signature", "observed", "metrics", "plotdata"})),
    ("storage", frozenset({"cache", "remote", "remote_gc", "experiments"})),
    (
        "execution",
        frozenset(
            {
                "exec.base",
                "exec.local",
                "exec.registry",
                "exec.worker",
                "exec.reaper",
                "exec.ray",
                "exec.warm",
                "exec.keepwarm",
            }
        ),
    ),
    (
        "build",
        frozenset(
            {
                "build.runner",
                "build.query",
                "build.results",
                "build.lock",
                "build.sweep",
                "build.background",
            }
        ),
    ),
    (
        "interface",
        frozenset(
            {
                "ui.messages",
                "ui.report",
                "ui.progress",
                "ui.history",
                "ui.dag",
                "ui.experiments",
                "ui.plots",
                "ui.completion",
                "ui.matrix_view",
                "watch",
                "scaffold",
            }
        ),
    ),
    ("entry", frozenset({"cli", "commands", "__main__", "__init__"})),
)
MODULES = frozenset().union(*(members for _, members in LAYERS))
# Run in every step's own interpreter: the standard library and these only. The
# package __init__ files run first (`python -m mlbuild.exec.worker`), so they import nothing.
WORKER_SIDE = {
    "exec/worker.py": {"observed"},
    "observed.py": set(),
    "exec/reaper.py": set(),
    "__init__.py": set(),
    "exec/__init__.py": set(),
}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(path: Path, *, top_level_only: bool = False) -> set[str]:
    """Every dotted `mlbuild...` name `path` imports at run time.

    `from mlbuild.x import y` gives `mlbuild.x` and `mlbuild.x.y` (`y` may be
    a submodule, or a name of `mlbuild/x/__init__.py`).
    """
    found: set[str] = set()

    def visit(nodes: list[ast.stmt], depth: int) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                visit(node.orelse, depth)
                continue
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module.startswith("mlbuild."):
                    found.add(node.module)
                    found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name[:8] == "mlbuild.")
            if top_level_only and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for field in ("body", "orelse", "finalbody", "handlers"):
                children = getattr(node, field, None)
                if isinstance(children, list):
                    visit([c for c in children if isinstance(c, ast.stmt)], depth + 1)
                    for handler in children:
                        if isinstance(handler, ast.ExceptHandler):
                            visit(handler.body, depth + 1)

    visit(ast.parse(path.read_text()).body, 0)
    return found


def _module_of(path: Path) -> str:
    """The layered module a file is: `exec.worker`, a whole subpackage (`cache`), or its stem.

    A subpackage's `__init__.py` is the subpackage's name (`exec`).
    """
    if not path.is_relative_to(PACKAGE):
        return path.stem
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if len(parts) == 1 or parts[0] in MODULES:
        return parts[0]
    if parts[-1] == "__init__":
        return ".".join(parts[:-1])
    return ".".join(parts)


def resolve(name: str) -> str:
    """The layered module a dotted `mlbuild.x.y.z` import is of (`exec.base`, `cache`, `exec`)."""
    parts = name.split(".")[1:]
    for size in range(len(parts), 0, -1):
        if ".".join(parts[:size]) in MODULES:
            return ".".join(parts[:size])
    return parts[0]


def imports_of(path: Path, *, top_level_only: bool = False) -> set[str]:
    """The mlbuild modules `path` imports (at run time); `mlbuild.cache.entry` counts as cache."""
    found = {resolve(name) for name in _imported(path, top_level_only=top_level_only)}
    return found - {_module_of(path)}


def subpackages() -> list[Path]:
    return sorted(p for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())


def graph() -> dict[str, set[str]]:
    """Module -> the modules it imports; a subpackage named in LAYERS is one module."""
    edges: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        edges.setdefault(_module_of(path), set()).update(imports_of(path))
    return edges


def package_graph(package: Path) -> dict[str, set[str]]:
    """The imports between the modules of one subpackage (`__init__` for the package itself)."""
    prefix = f"mlbuild.{package.name}"
    modules = {path.stem for path in package.glob("*.py")}
    edges: dict[str, set[str]] = {}
    for path in sorted(package.glob("*.py")):
        deps = set()
        for name in _imported(path):
            if name == prefix:
                deps.add("__init__")
            elif name.startswith(prefix + "."):
                part = name[len(prefix) + 1 :].split(".")[0]
                deps.add(part if part in modules else "__init__")
        edges[path.stem] = deps - {path.stem}
    return edges


def find_cycle(edges: Mapping[str, Iterable[str]]) -> str | None:
    """One import cycle of `edges`, as `a -> b -> a`, or None."""
    done: set[str] = set()

    def walk(module: str, path: tuple[str, ...]) -> str | None:
        if module in path:
            return " -> ".join((*path[path.index(module) :], module))
        if module in done:
            return None
        for dep in sorted(edges.get(module, ())):
            cycle = walk(dep, (*path, module))
            if cycle is not None:
                return cycle
        done.add(module)
        return None

    for module in sorted(edges):
        cycle = walk(module, ())
        if cycle is not None:
            return cycle
    return None


def layer_of(module: str) -> int:
    """The layer of a module, or of a subpackage's `__init__` (its modules' layer)."""
    for number, (_, members) in enumerate(LAYERS):
        if module in members or any(m.startswith(module + ".") for m in members):
            return number
    raise AssertionError(f"mlbuild/{module} is in no layer: add it to LAYERS and ARCHITECTURE.md")


def test_every_module_is_in_a_layer() -> None:
    for module in graph():
        layer_of(module)


def test_imports_point_down_the_layers() -> None:
    wrong = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})"
        for module, deps in graph().items()
        for dep in sorted(deps)
        if layer_of(dep) > layer_of(module)
    ]
    assert not wrong, "imports pointing up:\n" + "\n".join(wrong)


def test_there_is_no_import_cycle() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, f"import cycle: {cycle}"


def test_a_subpackage_is_one_layers_modules() -> None:
    for package in subpackages():
        layers = {
            LAYERS[layer_of(_module_of(path))][0]
            for path in package.rglob("*.py")
            if path.name != "__init__.py"
        }
        assert len(layers) == 1, f"mlbuild/{package.name}/ spans the layers {sorted(layers)}"


def test_there_is_no_import_cycle_inside_a_subpackage() -> None:
    assert subpackages(), "no subpackage found: is PACKAGE right?"
    for package in subpackages():
        cycle = find_cycle(package_graph(package))
        assert cycle is None, f"import cycle in mlbuild/{package.name}/: {cycle}"


def _top_level_roots(path: Path) -> set[str]:
    """The top-level packages `path` imports when it starts (not inside functions)."""
    roots: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            roots.add(node.module.split(".")[0])
    return roots


def test_the_step_side_imports_only_the_standard_library() -> None:
    """The worker and the Ray guard start in every step: no tomli, no blake3, no config."""
    for file, allowed in WORKER_SIDE.items():
        path = PACKAGE / file
        imported = imports_of(path, top_level_only=True)
        assert imported <= allowed, f"{file} imports {sorted(imported - allowed)} at start"
        outside = _top_level_roots(path) - set(sys.stdlib_module_names) - {"mlbuild"}
        assert not outside, f"{file} imports {sorted(outside)} at start"


def test_the_checker_sees_lazy_imports_and_ignores_type_checking(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from typing import TYPE_CHECKING\n"
        "from mlbuild.errors import UserError\n"
        "if TYPE_CHECKING:\n"
        "    from mlbuild.cli import main\n"
        "def f() -> None:\n"
        "    try:\n"
        "        from mlbuild.build.runner import run_build\n"
        "    except ImportError:\n"
        "        import mlbuild.cache\n"
    )
    assert imports_of(sample) == {"errors", "build.runner", "cache"}
    assert imports_of(sample, top_level_only=True) == {"errors"}


def test_the_checker_maps_a_subpackage_and_its_modules(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from mlbuild.pkg.low import thing\n")
    (package / "low.py").write_text("from mlbuild.errors import UserError\n")
    (package / "high.py").write_text(
        "def f() -> None:\n    from mlbuild.pkg import thing\n    import mlbuild.pkg.low\n"
    )
    assert package_graph(package) == {
        "__init__": {"low"},
        "low": set(),
        "high": {"__init__", "low"},
    }
    assert find_cycle(package_graph(package)) is None
    (package / "low.py").write_text("from mlbuild.pkg.high import g\n")
    assert find_cycle(package_graph(package)) == "__init__ -> low -> high -> __init__"
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == "a -> b -> c -> a"
