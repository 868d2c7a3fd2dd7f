"""The values a loaded pipeline is made of: `Pipeline`, `Target`, `Port` and the settings.

Immutable NamedTuples, built only by `mlbuild.pipeline.load` and read everywhere
else; nothing here touches the disk or imports tomli, so the modules that only
need these types stay cheap to import.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

from mlbuild.uptodate import PIPELINE_FILE as PIPELINE_FILE
from mlbuild.uptodate import STATE_DIR as STATE_DIR

# Default for mapping fields of the value types here: shared, so read-only.
EMPTY: Mapping[str, Any] = MappingProxyType({})
EXECUTOR_KINDS = ("local", "ray")
FILE_MODES = ("auto", "shared", "cas")
# The plot file formats `plots = [...]` accepts, by file name ending (mlbuild.plotdata reads them).
PLOT_SUFFIXES = (".csv", ".tsv", ".json")


class Port(NamedTuple):
    """One declared input or output path; `name` is None in the list form."""

    name: str | None
    path: str  # normalized, relative to the pipeline directory, POSIX separators
    is_glob: bool = False


class Resources(NamedTuple):
    """What one step needs of a Ray node (`resources = { cpus = 2, gpus = 1, ... }`)."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory: int | None = None  # bytes
    custom: Mapping[str, float] = EMPTY


class CacheSettings(NamedTuple):
    """`[cache]`: the optional shared remote cache (see remote.py)."""

    remote: str | None = None  # an fsspec URL or a local path (made absolute)
    remote_write: bool = True  # upload what ran; false: only read what others wrote
    remote_options: Mapping[str, Any] = EMPTY  # fsspec storage options


class ExecutorSettings(NamedTuple):
    """`[executor]`: where stale steps run (`local`, or `ray` on a cluster)."""

    kind: str = "local"
    address: str | None = None  # the Ray cluster's address; None: RAY_ADDRESS or a local one
    files: str = "auto"  # how files reach Ray workers: auto, shared (in place) or cas


class WorkersSettings(NamedTuple):
    """`[workers]`: keeping warm Python workers between runs (exec/keepwarm.py)."""

    keep_warm: float | None = None  # seconds an idle keep-warm process lives; None: none


class Target(NamedTuple):
    """One step of the pipeline, fully resolved (parameters and command)."""

    name: str
    cmd: str | None  # the command template as written
    # The command as shown to the user: placeholders filled, glob inputs as their
    # pattern. What runs is exec.base.render_command, globs expanded at the start.
    command: str | None
    python: str | None  # "module.path:function"
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]
    params: Mapping[str, Any]  # name -> value, locals and the globals it reads
    env: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    always_run: bool = False
    persist: bool = False
    cache: bool = True  # store outputs in the output cache and restore them from it
    pool: str | None = None  # a [pools] name limiting how many such steps run at once
    track: tuple[str, ...] = ()
    description: str = ""
    resources: Resources | None = None  # for the Ray executor; None: one CPU
    retries: int = 0  # reruns after a lost worker or node (Ray executor)
    strict_inputs: bool = False  # a Python step reading an undeclared project file fails
    metrics: tuple[str, ...] = ()  # metrics files (also among `outputs`); see metrics.py
    plots: tuple[str, ...] = ()  # plot files (`plots = [...]`), each also one of `outputs`

    def call_names(self) -> list[str]:
        """The keyword arguments a Python target's function receives, in order."""
        names: list[str] = []
        for kind, ports in (("inputs", self.inputs), ("outputs", self.outputs)):
            if ports and ports[0].name is None:
                names.append(kind)
            else:
                names.extend(p.name for p in ports if p.name is not None)
        return names + list(dict.fromkeys(name.split(".")[0] for name in self.params))

    def call_params(self) -> dict[str, Any]:
        """The params as a Python function receives them: a dotted name (`train.n_est`,
        from a params file) nested under its first part (`train={"n_est": 50}`)."""
        call: dict[str, Any] = {}
        for name, value in self.params.items():
            *tables, last = name.split(".")
            node = call
            for part in tables:
                node = node.setdefault(part, {})
            node[last] = value
        return call

    @property
    def kind(self) -> ActionKind:
        """Shell command or Python function: the one place that tells them apart."""
        return ActionKind.SHELL if self.python is None else ActionKind.PYTHON

    @property
    def action(self) -> str:
        """What the step does, as compared for "command changed"."""
        return self.cmd if self.cmd is not None else f"python:{self.python}"

    @property
    def shown(self) -> str:
        """What the step does, as the user reads it (failures, `-v`, `list`)."""
        return self.command if self.command is not None else f"python {self.python}"


class ActionKind(enum.Enum):
    """What a target's step is: a `cmd` run by /bin/sh, or a `python` function in a worker."""

    SHELL = "cmd"
    PYTHON = "python"


class MetricsFormat(enum.Enum):
    """How a metrics file is parsed, chosen by its extension (METRICS_SUFFIXES)."""

    JSON = "json"
    YAML = "yaml"
    TOML = "toml"


METRICS_SUFFIXES = {
    ".json": MetricsFormat.JSON,
    ".yaml": MetricsFormat.YAML,
    ".yml": MetricsFormat.YAML,
    ".toml": MetricsFormat.TOML,
}


class Pipeline(NamedTuple):
    """A loaded pipeline file: its location, global params and targets in file order."""

    file: Path  # absolute path of pipeline.toml
    params: Mapping[str, Any]
    targets: Mapping[str, Target] = EMPTY
    pools: Mapping[str, int] = EMPTY  # name -> concurrent steps
    cache: CacheSettings = CacheSettings()
    executor: ExecutorSettings = ExecutorSettings()
    params_files: tuple[str, ...] = ()  # `params_files`, project paths in order
    param_sources: Mapping[str, str] = EMPTY  # a params-file key's dotted name -> its file
    workers: WorkersSettings = WorkersSettings()
    matrices: Mapping[str, tuple[str, ...]] = EMPTY  # a matrix target -> its points' names

    @property
    def root(self) -> Path:
        """The project directory: paths are relative to it and steps run in it."""
        return self.file.parent

    @property
    def display_file(self) -> str:
        """The file name as the user should read it in messages."""
        return display_path(self.file)

    def expand(self, names: Iterable[str]) -> list[str]:
        """`names` with each matrix target's name replaced by its points' names."""
        matrices = self.matrices
        if not matrices:
            return list(names)
        return [point for name in names for point in matrices.get(name, (name,))]


def display_path(path: Path) -> str:
    """A path relative to the working directory when it is below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
