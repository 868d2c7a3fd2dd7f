"""Pipeline specs (chain200, wide200, dir1g) and their rendering for each build tool."""

from __future__ import annotations

import glob
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

N_TRIVIAL = 200
DIR_FILES = 5000
DIR_FILE_SIZE = (1 << 30) // DIR_FILES  # 214,748 bytes each, 1 GiB in all
DIR_CMD = "ls data | wc -l > out/count.txt"

TOOLS: tuple[str, ...] = ("mlbuild", "make", "ninja", "doit", "snakemake", "dvc")


@dataclass(frozen=True)
class Target:
    """One step: `cmd` reads `inputs` (files, or the directory `data`) and writes `output`."""

    name: str
    inputs: tuple[str, ...]
    output: str
    cmd: str


@dataclass(frozen=True)
class Pipeline:
    """A named set of targets plus the source files the workspace starts with."""

    name: str
    targets: tuple[Target, ...]
    sources: dict[str, str]  # path -> initial text; the dir pipeline uses `data` instead
    dir_input: bool = False

    @property
    def outputs(self) -> list[str]:
        return [t.output for t in self.targets]


def _cp(name: str, src: str, dst: str) -> Target:
    return Target(name, (src,), dst, f"cp {src} {dst}")


def chain(n: int = N_TRIVIAL) -> Pipeline:
    targets = [_cp("t000", "src/0.txt", "out/0.txt")]
    targets += [_cp(f"t{i:03d}", f"out/{i - 1}.txt", f"out/{i}.txt") for i in range(1, n)]
    return Pipeline(f"chain{n}", tuple(targets), {"src/0.txt": "source 0\n"})


def wide(n: int = N_TRIVIAL) -> Pipeline:
    targets = tuple(_cp(f"t{i:03d}", f"src/{i}.txt", f"out/{i}.txt") for i in range(n))
    return Pipeline(f"wide{n}", targets, {f"src/{i}.txt": f"source {i}\n" for i in range(n)})


def dir1g() -> Pipeline:
    target = Target("big", ("data",), "out/count.txt", DIR_CMD)
    return Pipeline("dir1g", (target,), {}, dir_input=True)


# ---------------------------------------------------------------- data set


def ensure_master_data(master: Path) -> None:
    """Create 5,000 random files of ~210 KiB (1 GiB) once; reuse them on later runs."""
    stamp = master / ".complete"
    want = f"{DIR_FILES} x {DIR_FILE_SIZE}\n"
    if stamp.is_file() and stamp.read_text() == want:
        return
    print(
        f"[data] generating {DIR_FILES} files x {DIR_FILE_SIZE} B in {master} (one-off)", flush=True
    )
    if master.exists():
        shutil.rmtree(master)
    master.mkdir(parents=True)
    for name in data_files():
        (master / name).write_bytes(os.urandom(DIR_FILE_SIZE))
    stamp.write_text(want)


def data_files() -> list[str]:
    return [f"f{i:04d}.bin" for i in range(DIR_FILES)]


def link_data(master: Path, dest: Path) -> None:
    """Hard-link the master data set into a tool workspace as `data/` (no copy)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in data_files():
        os.link(master / name, dest / name)


# ---------------------------------------------------------------- renderers


def _expand_inputs(p: Pipeline, t: Target) -> list[str]:
    if p.dir_input and t.inputs == ("data",):
        return [f"data/{name}" for name in data_files()]
    return list(t.inputs)


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid TOML basic string


def render_mlbuild(p: Pipeline) -> dict[str, str]:
    lines: list[str] = []
    for t in p.targets:
        (inp,) = t.inputs
        key = "data" if p.dir_input else "src"
        out_key = "count" if p.dir_input else "dst"
        cmd = t.cmd.replace(inp, "{inputs." + key + "}", 1) if not p.dir_input else t.cmd
        cmd = cmd.replace(t.output, "{outputs." + out_key + "}")
        lines += [
            f"[targets.{t.name}]",
            f"cmd = {_toml_str(cmd)}",
            f"inputs = {{ {key} = {_toml_str(inp)} }}",
            f"outputs = {{ {out_key} = {_toml_str(t.output)} }}",
            "",
        ]
    return {"pipeline.toml": "\n".join(lines)}


def render_make(p: Pipeline) -> dict[str, str]:
    # Built-in implicit rules off, as a speed-minded Makefile has it: otherwise make probes
    # RCS/SCCS/%.c-style candidates for every source (about 35 ms on a 200-target no-op).
    lines = ["MAKEFLAGS += --no-builtin-rules", ".SUFFIXES:", ".PHONY: all"]
    lines += ["all: " + " ".join(p.outputs), ""]
    for t in p.targets:
        deps = "$(wildcard data/*)" if p.dir_input else " ".join(t.inputs)
        lines += [f"{t.output}: {deps}", f"\t{t.cmd}", ""]
    return {"Makefile": "\n".join(lines)}


def render_ninja(p: Pipeline) -> dict[str, str]:
    lines = ["rule run", "  command = $cmd", ""]
    for t in p.targets:
        ins = " ".join(_expand_inputs(p, t))
        lines += [f"build {t.output}: run {ins}", f"  cmd = {t.cmd}", ""]
    lines.append("default " + " ".join(p.outputs))
    return {"build.ninja": "\n".join(lines) + "\n"}


def render_doit(p: Pipeline) -> dict[str, str]:
    specs = [
        {"name": t.name, "cmd": t.cmd, "output": t.output, "deps": list(t.inputs)}
        for t in p.targets
    ]
    head = ["import glob", ""] if p.dir_input else []
    deps = "sorted(glob.glob('data/*'))" if p.dir_input else "s['deps']"
    body = [
        *head,
        f"SPECS = {json.dumps(specs)}",
        "",
        "",
        "def task_build():",
        "    for s in SPECS:",
        "        yield {",
        "            'name': s['name'],",
        "            'actions': [s['cmd']],",
        f"            'file_dep': {deps},",
        "            'targets': [s['output']],",
        "        }",
        "",
    ]
    return {"dodo.py": "\n".join(body)}


def render_snakemake(p: Pipeline) -> dict[str, str]:
    lines: list[str] = []
    if p.dir_input:
        lines += ["import glob", ""]
    lines += ["rule all:", f"    input: {json.dumps(p.outputs)}", ""]
    for t in p.targets:
        ins = "sorted(glob.glob('data/*'))" if p.dir_input else json.dumps(list(t.inputs))
        lines += [
            f"rule {t.name}:",
            f"    input: {ins}",
            f"    output: {json.dumps(t.output)}",
            f"    shell: {json.dumps(t.cmd)}",
            "",
        ]
    return {"Snakefile": "\n".join(lines)}


def render_dvc(p: Pipeline) -> dict[str, str]:
    # Equivalent to `dvc stage add -n NAME -d IN -o OUT CMD` per target, written at once
    # (200 separate `dvc stage add` processes would take minutes and change nothing).
    lines = ["stages:"]
    for t in p.targets:
        lines += [
            f"  {t.name}:",
            f"    cmd: {json.dumps(t.cmd)}",
            "    deps:",
            *[f"    - {json.dumps(d)}" for d in t.inputs],
            "    outs:",
            f"    - {json.dumps(t.output)}",
        ]
    return {"dvc.yaml": "\n".join(lines) + "\n"}


RENDERERS: dict[str, Callable[[Pipeline], dict[str, str]]] = {
    "mlbuild": render_mlbuild,
    "make": render_make,
    "ninja": render_ninja,
    "doit": render_doit,
    "snakemake": render_snakemake,
    "dvc": render_dvc,
}

# Paths (globs, relative to the workspace) holding each tool's own state.
STATE_GLOBS: dict[str, tuple[str, ...]] = {
    "mlbuild": (".mlbuild",),
    "make": (),
    "ninja": (".ninja_log", ".ninja_deps"),
    "doit": (".doit.db*",),
    "snakemake": (".snakemake",),
    "dvc": ("dvc.lock", ".dvc/cache", ".dvc/tmp"),
}


def remove_state(tool: str, ws: Path, extra: tuple[Path, ...] = ()) -> None:
    """Delete the tool's state (and any `extra` dirs) so the next run starts cold."""
    paths = [Path(x) for g in STATE_GLOBS[tool] for x in glob.glob(str(ws / g))]
    for path in [*paths, *extra]:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def remove_outputs(p: Pipeline, ws: Path) -> None:
    for out in p.outputs:
        (ws / out).unlink(missing_ok=True)
