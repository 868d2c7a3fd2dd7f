"""Property tests: random pipelines of real shell steps under random edits.

Each example builds a random DAG of `/bin/sh` targets over a few source files,
then applies random edits (source bytes, touch, global param, `--set`, a key of
the params file, listed or not, command
text, deleted or modified outputs, inputs reordered, a content change that keeps
size and mtime, an input rewritten and put back while its step runs), running
`mlbuild run` through the real CLI after each batch, sometimes with `--no-cache`
or `-j N`. After every run:

(a) every output equals, byte for byte, the output of a clean build of the
    same pipeline.toml and sources in a fresh directory, and the output the
    test's own model of each command computes;
(b) the targets that ran are exactly those an independent model predicts: a
    target runs iff it has no record, or its command template, its parameter
    values, its input bytes or its output bytes differ from what it last
    consumed and produced. The model never looks at mlbuild's state.
    Of those stale targets, the ones whose (command, params, input bytes) the
    model saw run before are restored from the output cache instead of run,
    unless `--no-cache` is given.

Which targets ran is read twice: each step appends its name to $RUNLOG (a file
outside the project, inherited through the environment), and the CLI prints
"Step `X` has started"; the two must agree.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mlbuild.cli import main
from mlbuild.fingerprint import FINE_WINDOW_NS

SOURCES = ("src/s0.txt", "src/s1.txt", "src/s2.txt")
# Dotted names are keys of params.yaml (`params_files`); the others are `[params]`.
PARAMS = ("p0", "p1", "p2", "f.q0", "f.q1")
KINDS = ("cat", "head", "wc", "tr")
# Few letters, vowels and newlines: edits often leave `head -c 3`, `wc -l` and
# `tr -d aeiou` outputs unchanged, which is what exercises early cutoff.
CONTENT = st.text(alphabet="abeio\n", max_size=10).map(lambda s: s.encode("ascii"))
PARAM_VALUE = st.integers(min_value=0, max_value=5)

STARTED = re.compile(r"^Step `([^`]+)` has started")
RESTORED = re.compile(r"^Step `([^`]+)` restored from cache")
STALE = re.compile(r"^stale\s+([^:\s]+)")
SKIPPED = re.compile(r"^Step `([^`]+)` is up to date \(skipped\)")


@dataclass(frozen=True)
class TargetSpec:
    """One shell target: what it reads, which global params it reads, what it computes."""

    name: str
    inputs: tuple[str, ...]
    params: tuple[str, ...]
    kind: str
    variant: int = 0  # bumped by a command edit; shows up as a shell comment

    @property
    def output(self) -> str:
        return f"out/{self.name}.txt"

    def template(self) -> str:
        """The `cmd` as written in pipeline.toml."""
        if self.kind == "cat":
            echoes = "".join(f"; echo {{params.{p}}}" for p in self.params)
            body = f"(cat {{inputs}}{echoes}) > {{outputs}}"
        elif self.kind == "head":
            body = "cat {inputs} | head -c 3 > {outputs}"
        elif self.kind == "wc":
            body = "cat {inputs} | wc -l | tr -d ' ' > {outputs}"
        else:
            body = "cat {inputs} | tr -d aeiou > {outputs}"
        # $RUNLOG.NAME, when the test writes it, is a hook the step runs first (an
        # input edited while the step runs).
        hook = f'[ ! -f "$RUNLOG.{self.name}" ] || . "$RUNLOG.{self.name}"'
        return f'echo {self.name} >> "$RUNLOG"; {hook}; {body} # v{self.variant}'

    def compute(self, inputs: Sequence[bytes], params: Mapping[str, int]) -> bytes:
        """What the command writes, computed in Python: the model of the step."""
        data = b"".join(inputs)
        if self.kind == "cat":
            return data + b"".join(f"{params[p]}\n".encode() for p in self.params)
        if self.kind == "head":
            return data[:3]
        if self.kind == "wc":
            lines = data.count(b"\n")
            return f"{lines}\n".encode()
        return bytes(b for b in data if b not in b"aeiou")


@dataclass(frozen=True)
class Edit:
    """One change between runs; the meaning of `index`, `value` and `data` depends on `kind`."""

    kind: str
    index: int = 0
    value: int = 0
    data: bytes = b""


@dataclass(frozen=True)
class Scenario:
    targets: tuple[TargetSpec, ...]
    sources: Mapping[str, bytes]
    params: Mapping[str, int]
    steps: tuple[tuple[Edit, ...], ...]  # each batch of edits is followed by a run


@st.composite
def edits(draw: st.DrawFn, n_targets: int) -> Edit:
    target = st.integers(min_value=0, max_value=n_targets - 1)
    source = st.integers(min_value=0, max_value=len(SOURCES) - 1)
    param = st.integers(min_value=0, max_value=len(PARAMS) - 1)
    kind = draw(
        st.sampled_from(
            [
                "source",
                "touch",
                "param",
                "set",
                "unlisted_key",
                "no_cache",
                "jobs",
                "command",
                "delete_output",
                "modify_output",
                "reorder",
                "same_size_same_mtime",
                "edit_during_step",
                "age",
            ]
        )
    )
    if kind == "source":
        return Edit(kind, draw(source), data=draw(CONTENT))
    if kind == "touch":
        return Edit(kind, draw(source), value=draw(st.integers(0, 1)))
    if kind in ("param", "set", "unlisted_key"):
        return Edit(kind, draw(param), value=draw(PARAM_VALUE))
    if kind == "command":
        # value: 0 keeps the kind (only the text changes), else a new kind.
        return Edit(kind, draw(target), value=draw(st.integers(0, len(KINDS))))
    if kind == "jobs":
        return Edit(kind, value=draw(st.sampled_from([1, 3, 8])))
    if kind in ("delete_output", "no_cache", "reorder", "edit_during_step", "age"):
        return Edit(kind, draw(target))
    if kind == "same_size_same_mtime":
        return Edit(kind, draw(source), value=draw(st.integers(0, 255)))
    return Edit(kind, draw(target), data=draw(CONTENT))


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    n = draw(st.integers(min_value=2, max_value=8))
    targets: list[TargetSpec] = []
    for i in range(n):
        earlier = [t.output for t in targets]
        # Prefer earlier outputs so that DAGs are deep, not a fan of sources.
        pool = earlier * 2 + list(SOURCES)
        chosen = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3, unique=True))
        reads = draw(st.lists(st.sampled_from(PARAMS), max_size=2, unique=True))
        kind = draw(st.sampled_from(KINDS))
        targets.append(TargetSpec(f"t{i}", tuple(chosen), tuple(reads), kind))
    sources = {path: draw(CONTENT) for path in SOURCES}
    params = {name: draw(PARAM_VALUE) for name in PARAMS}
    steps = draw(st.lists(st.lists(edits(n), min_size=1, max_size=2), min_size=1, max_size=5))
    return Scenario(tuple(targets), sources, params, tuple(tuple(s) for s in steps))


def pipeline_toml(targets: Sequence[TargetSpec], params: Mapping[str, int]) -> str:
    lines = ['params_files = ["params.yaml"]', "[params]"]
    lines += [f"{name} = {value}" for name, value in params.items() if "." not in name]
    for t in targets:
        lines += [
            "",
            f"[targets.{t.name}]",
            f"cmd = {toml_string(t.template())}",
            f"inputs = [{', '.join(toml_string(p) for p in t.inputs)}]",
            f"outputs = [{toml_string(t.output)}]",
        ]
        if t.params:
            lines.append(f"params = [{', '.join(toml_string(p) for p in t.params)}]")
    return "\n".join(lines) + "\n"


def params_yaml(params: Mapping[str, int], unlisted: int) -> str:
    """The params file: the dotted params, and a key no target lists, with comments."""
    lines = ["# parameters read by the steps", "f:"]
    lines += [f"  {name[2:]}: {value}  # listed" for name, value in params.items() if "." in name]
    return "\n".join([*lines, f"  unlisted: {unlisted}  # read by no target", ""])


def toml_string(text: str) -> str:
    """A TOML basic string (the templates are ASCII without control characters)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@contextlib.contextmanager
def environment(name: str, value: str) -> Iterator[None]:
    """Set one environment variable (inherited by the steps) for the block."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


@dataclass(frozen=True)
class RunResult:
    code: int
    stdout: str
    stderr: str
    logged: tuple[str, ...]  # target names the steps appended to $RUNLOG


def mlbuild_run(project: Path, runlog: Path, extra: Sequence[str] = ()) -> RunResult:
    """`mlbuild run -f project/pipeline.toml [extra]`."""
    return mlbuild_cli(["run", "-f", str(project / "pipeline.toml"), *extra], runlog)


def mlbuild_cli(argv: Sequence[str], runlog: Path) -> RunResult:
    """The CLI entry point in-process, as the console script calls it, with $RUNLOG set."""
    runlog.write_text("")
    out, err = io.StringIO(), io.StringIO()
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with (
            environment("RUNLOG", str(runlog)),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            code = main(list(argv))
    finally:
        signal.signal(signal.SIGTERM, handler)
    return RunResult(code, out.getvalue(), err.getvalue(), tuple(runlog.read_text().split()))


def matching(pattern: re.Pattern[str], text: str) -> list[str]:
    return [m.group(1) for line in text.splitlines() if (m := pattern.match(line))]


def read_outputs(project: Path) -> dict[str, bytes]:
    out = project / "out"
    if not out.is_dir():
        return {}
    return {f"out/{p.name}": p.read_bytes() for p in sorted(out.iterdir())}


Key = tuple[str, str, tuple[int, ...], tuple[bytes | None, ...]]


@dataclass
class Model:
    """The test's own account of the project: files on disk and what each target last used."""

    targets: list[TargetSpec]
    params: dict[str, int]
    files: dict[str, bytes]  # sources and outputs as they are on disk
    unlisted: int = 0  # the params file's key that no target lists
    # target -> (template, param values, input bytes, output bytes) of its last successful run
    records: dict[str, tuple[str, tuple[int, ...], tuple[bytes | None, ...], bytes | None]] = field(
        default_factory=dict
    )
    # (target, template, param values, input bytes) of every step that ran: what an output
    # cache could restore instead of running the step again
    seen: set[Key] = field(default_factory=set)

    def run(self, overrides: Mapping[str, int]) -> tuple[set[str], set[str]]:
        """Apply one build to the model: the targets that are stale (and must be brought up
        to date), and those of them whose consumption was seen before (a cache hit)."""
        params = {**self.params, **overrides}
        stale: set[str] = set()
        hits: set[str] = set()
        for t in self.targets:  # inputs only name earlier targets: file order is topological
            values = tuple(params[p] for p in t.params)
            inputs = tuple(self.files.get(path) for path in t.inputs)
            # The input paths in their order are part of what a target consumes.
            now = (f"{t.template()} <- {t.inputs}", values, inputs, self.files.get(t.output))
            if self.records.get(t.name) == now:
                continue
            assert all(data is not None for data in inputs), "an input was never produced"
            output = t.compute([data or b"" for data in inputs], params)
            self.files[t.output] = output
            self.records[t.name] = (now[0], values, inputs, output)
            stale.add(t.name)
            key = (t.name, now[0], values, inputs)
            if key in self.seen:
                hits.add(t.name)
            self.seen.add(key)
        return stale, hits

    def downstream_of(self, name: str) -> set[str]:
        """`name` and every target that reads, directly or not, what it writes."""
        found = {name}
        for t in self.targets:  # in file order, which is topological
            if any(u.output in t.inputs for u in self.targets if u.name in found):
                found.add(t.name)
        return found

    def outputs(self) -> dict[str, bytes]:
        return {t.output: self.files[t.output] for t in self.targets if t.output in self.files}


def write_source(project: Path, path: str, data: bytes) -> None:
    """Write a source dated 10 s ago, as a checkout does: its stat entry is trusted at once
    (not racy), so only what the stat cache compares can tell a later edit apart."""
    (project / path).write_bytes(data)
    earlier = time.time_ns() - 10_000_000_000
    os.utime(project / path, ns=(earlier, earlier))


def write_project(project: Path, model: Model) -> None:
    (project / "src").mkdir(parents=True, exist_ok=True)
    for path in SOURCES:
        write_source(project, path, model.files[path])
    (project / "pipeline.toml").write_text(pipeline_toml(model.targets, model.params))
    (project / "params.yaml").write_text(params_yaml(model.params, model.unlisted))


@dataclass
class NextRun:
    """Command-line options the edits ask of the next run only."""

    overrides: dict[str, int] = field(default_factory=dict)
    no_cache: bool = False
    jobs: int | None = None  # -j N; None: the default (the number of CPUs)
    # (target, source it reads): while the target's step runs, the source is rewritten
    # and its bytes put back; the step's output stands, but is neither recorded as
    # fresh nor cached, so the target reruns next time.
    during: tuple[str, str] | None = None

    def sets(self) -> list[str]:
        return [w for name, value in self.overrides.items() for w in ("--set", f"{name}={value}")]


def apply_edit(project: Path, model: Model, edit: Edit, next_run: NextRun) -> None:
    """Make the change on disk and in the model alike."""
    if edit.kind == "source":
        path = SOURCES[edit.index]
        write_source(project, path, edit.data)
        model.files[path] = edit.data
    elif edit.kind == "touch":
        path = SOURCES[edit.index]
        if edit.value:
            (project / path).write_bytes(model.files[path])  # rewrite the same bytes
        else:
            earlier = time.time_ns() - 5_000_000_000  # like a checkout restoring a time
            os.utime(project / path, ns=(earlier, earlier))
    elif edit.kind == "param":
        model.params[PARAMS[edit.index]] = edit.value
        write_project(project, model)
    elif edit.kind == "set":
        next_run.overrides[PARAMS[edit.index]] = edit.value
    elif edit.kind == "unlisted_key":
        model.unlisted = edit.value  # edits the params file; reruns nothing
        write_project(project, model)
    elif edit.kind == "no_cache":
        next_run.no_cache = True
    elif edit.kind == "jobs":
        next_run.jobs = edit.value
    elif edit.kind == "command":
        old = model.targets[edit.index]
        kind = KINDS[edit.value - 1] if edit.value else old.kind
        model.targets[edit.index] = replace(old, kind=kind, variant=old.variant + 1)
        write_project(project, model)
    elif edit.kind == "reorder":
        # The same inputs in another order: the command receives them reordered.
        old = model.targets[edit.index]
        model.targets[edit.index] = replace(old, inputs=(*old.inputs[1:], *old.inputs[:1]))
        write_project(project, model)
    elif edit.kind == "edit_during_step":
        target = model.targets[edit.index]
        sources = [path for path in target.inputs if path in SOURCES]
        if sources:
            next_run.during = (target.name, sources[0])
            next_run.jobs = 1  # nothing else runs while the source is rewritten
    elif edit.kind == "same_size_same_mtime":
        # New bytes, same size, the old mtime put back (rsync -t, tar -x, cp -p).
        path = SOURCES[edit.index]
        old_bytes = model.files[path]
        if old_bytes:
            others = [c for c in b"aeiob\n" if c != old_bytes[0]]
            data = bytes([others[edit.value % len(others)]]) + old_bytes[1:]
            st_before = os.stat(project / path)
            (project / path).write_bytes(data)
            os.utime(project / path, ns=(st_before.st_atime_ns, st_before.st_mtime_ns))
            model.files[path] = data
    elif edit.kind == "age":
        # No change: time passes beyond the racy window, so the next run signs what it
        # checks and writes the up-to-date stamp, and the run after reads it (uptodate.py).
        time.sleep(2 * FINE_WINDOW_NS / 1e9)
    elif edit.kind == "delete_output":
        output = model.targets[edit.index].output
        (project / output).unlink(missing_ok=True)
        model.files.pop(output, None)
    else:
        output = model.targets[edit.index].output
        (project / output).parent.mkdir(parents=True, exist_ok=True)
        (project / output).write_bytes(edit.data)
        model.files[output] = edit.data


def clean_build(project: Path, scratch: Path, runlog: Path, extra: Sequence[str]) -> RunResult:
    """Build the same pipeline.toml and sources from scratch in a fresh directory."""
    if scratch.exists():
        shutil.rmtree(scratch)
    (scratch / "src").mkdir(parents=True)
    shutil.copyfile(project / "pipeline.toml", scratch / "pipeline.toml")
    shutil.copyfile(project / "params.yaml", scratch / "params.yaml")
    for path in SOURCES:
        shutil.copyfile(project / path, scratch / path)
    return mlbuild_run(scratch, runlog, extra)


def check_run(
    project: Path, scratch: Path, runlog: Path, model: Model, next_run: NextRun, when: str
) -> None:
    extra = next_run.sets()
    seen_before = set(model.seen)
    # `--set` of a params-file key is written into the file: it stays after this run.
    model.params.update({k: v for k, v in next_run.overrides.items() if "." in k})
    stale, hits = model.run(next_run.overrides)
    options = ["--no-cache"] if next_run.no_cache else []
    options += ["-j", str(next_run.jobs)] if next_run.jobs else []
    restored = set() if next_run.no_cache else hits
    poisoned = None
    hook = None
    if next_run.during is not None and next_run.during[0] in stale - restored:
        poisoned, source = next_run.during
        hook = Path(f"{runlog}.{poisoned}")
        kept = runlog.parent / "kept-bytes"
        full = project / source
        hook.write_text(
            f'cp "{full}" "{kept}"; printf tampered > "{full}"; cat "{kept}" > "{full}"\n'
        )
    try:
        result = mlbuild_run(project, runlog, [*extra, *options])
    finally:
        if hook is not None:
            hook.unlink()
    context = f"{when} {next_run}\n--- pipeline.toml ---\n"
    context += pipeline_toml(model.targets, model.params)
    context += "--- params.yaml ---\n" + params_yaml(model.params, model.unlisted)
    context += f"--- stdout ---\n{result.stdout}--- stderr ---\n{result.stderr}"
    assert result.code == 0, context
    assert len(result.logged) == len(set(result.logged)), context
    executed = set(result.logged)
    assert executed == set(matching(STARTED, result.stdout)), context
    everything = {t.name for t in model.targets}
    assert set(matching(SKIPPED, result.stdout)) == everything - stale, context
    assert set(matching(RESTORED, result.stdout)) == restored, context
    assert executed == stale - restored, context
    if restored:
        event("a stale target was restored from the cache")

    for t in model.targets:
        upstream = {u.name for u in model.targets if u.output in t.inputs}
        if upstream & stale and t.name not in stale:
            event("early cutoff: an upstream target ran, its consumer did not")

    # Right after a successful run, `status` with the same settings finds nothing stale,
    # but a target whose input changed during its step, and what depends on it.
    status = mlbuild_cli(["status", "-f", str(project / "pipeline.toml"), *extra], runlog)
    shown = context + f"--- status ---\n{status.stdout}{status.stderr}"
    assert status.logged == ()
    if poisoned is None:
        assert status.code == 0, shown
    else:
        assert f"`{poisoned}`: input '{source}' changed while the step ran" in result.stderr
        assert status.code == 1, shown
        assert set(matching(STALE, status.stdout)) == model.downstream_of(poisoned), shown
        record = model.records.pop(poisoned)
        key = (poisoned, record[0], record[1], record[2])
        if key not in seen_before:
            model.seen.discard(key)  # it was not cached
        event("an input changed while its step ran")

    assert read_outputs(project) == model.outputs(), context
    assert (project / "params.yaml").read_text() == params_yaml(model.params, model.unlisted)
    fresh = clean_build(project, scratch, runlog, extra)
    assert fresh.code == 0, fresh.stderr
    assert set(fresh.logged) == {t.name for t in model.targets}
    assert read_outputs(project) == read_outputs(scratch), context


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenario=scenarios())
def test_incremental_runs_match_clean_builds_and_the_model(scenario: Scenario) -> None:
    with tempfile.TemporaryDirectory(prefix="mlbuild-prop-") as tmp:
        base = Path(tmp)
        project, scratch, runlog = base / "project", base / "scratch", base / "runlog"
        model = Model(list(scenario.targets), dict(scenario.params), dict(scenario.sources))
        write_project(project, model)
        check_run(project, scratch, runlog, model, NextRun(), "first build")
        for number, batch in enumerate(scenario.steps, 1):
            next_run = NextRun()
            for edit in batch:
                apply_edit(project, model, edit, next_run)
            check_run(project, scratch, runlog, model, next_run, f"run {number} after {batch}")
        # Nothing changed since the last run: a run without options only brings back
        # what the last run's `--set` values changed.
        check_run(project, scratch, runlog, model, NextRun(), "final run")


# -- Python-function targets: helper modules and data files that change ------------------
#
# Target `a` imports a helper statically (steps/helpers.py), a module found only through
# `sys.path.insert(0, "lib")` (lib/libmod.py) and reads an undeclared data/cfg.json;
# target `b` reads `a`'s output and the same lib module. Random edits change a helper's
# value or only its comments, the data file's value or only its bytes, the declared
# source. The model: a target runs iff the code it ran (by value: comments do not
# count) or the bytes it read differ from its last run, and is restored from the cache
# instead when it ran with exactly those before. No run may leave a stale output.

PY_PIPELINE = """
[targets.a]
python = "steps.a:run"
inputs = { src = "src/in.txt" }
outputs = { o = "out/a.txt" }

[targets.b]
python = "steps.b:run"
inputs = { a = "out/a.txt" }
outputs = { o = "out/b.txt" }
"""
PY_STEPS = {
    "steps/__init__.py": "",
    "steps/a.py": (
        "import json\nimport sys\n\nsys.path.insert(0, 'lib')\nimport libmod\n\n"
        "from steps import helpers\n\n\ndef run(src, o):\n"
        "    with open('data/cfg.json') as handle:\n"
        "        cfg = json.load(handle)['v']\n"
        "    o.write_text(f'{helpers.K} {libmod.K} {cfg} {src.read_text()}')\n"
    ),
    "steps/b.py": (
        "import sys\n\nsys.path.insert(0, 'lib')\nimport libmod\n\n\ndef run(a, o):\n"
        "    o.write_text(f'{len(a.read_text())} {libmod.K}')\n"
    ),
}
PY_FILES = {"helper": "steps/helpers.py", "lib": "lib/libmod.py", "cfg": "data/cfg.json"}
PY_FILES["src"] = "src/in.txt"
PyState = dict[str, tuple[int, bool]]  # file kind -> (value, cosmetic variant)
PY_EDIT = st.tuples(st.sampled_from(sorted(PY_FILES)), st.integers(0, 2), st.booleans())


def py_file_text(kind: str, value: int, cosmetic: bool) -> str:
    """A file's text: a cosmetic variant changes a module's comments, a data file's bytes."""
    if kind in ("helper", "lib"):
        return ("# edited\n" if cosmetic else "") + f"K = {value}\n"
    if kind == "cfg":
        return f'{{"v": {value}}}' + ("\n" if cosmetic else "")
    return f"s{value}" + ("!" if cosmetic else "")


def py_expected(state: PyState) -> dict[str, tuple[object, ...] | str]:
    """Per target what its result depends on, and the outputs, as the model computes them."""
    src = py_file_text("src", *state["src"])
    a_out = f"{state['helper'][0]} {state['lib'][0]} {state['cfg'][0]} {src}"
    return {
        "a": (state["helper"][0], state["lib"][0], state["cfg"], state["src"]),
        "b": (a_out, state["lib"][0]),
        "out/a.txt": a_out,
        "out/b.txt": f"{len(a_out)} {state['lib'][0]}",
    }


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(st.lists(PY_EDIT, min_size=1, max_size=3), min_size=1, max_size=3))
def test_python_targets_follow_their_helper_modules_and_data_files(
    batches: list[list[tuple[str, int, bool]]],
) -> None:
    with tempfile.TemporaryDirectory(prefix="mlbuild-prop-py-") as tmp:
        project, runlog = Path(tmp) / "project", Path(tmp) / "runlog"
        state: PyState = {kind: (0, False) for kind in PY_FILES}
        files = {**PY_STEPS, **{path: py_file_text(k, 0, False) for k, path in PY_FILES.items()}}
        files["pipeline.toml"] = PY_PIPELINE
        for rel, text in files.items():
            (project / rel).parent.mkdir(parents=True, exist_ok=True)
            (project / rel).write_text(text)
        last: dict[str, tuple[object, ...]] = {}
        seen: dict[str, set[tuple[object, ...]]] = {"a": set(), "b": set()}
        for number, batch in enumerate([[], *batches]):
            for kind, value, cosmetic in batch:
                state[kind] = (value, cosmetic)
                (project / PY_FILES[kind]).write_text(py_file_text(kind, value, cosmetic))
            expected = py_expected(state)
            ran: set[str] = set()
            restored: set[str] = set()
            for name in ("a", "b"):
                key = expected[name]
                assert isinstance(key, tuple)
                if last.get(name) != key:
                    (restored if key in seen[name] else ran).add(name)
                last[name] = key
                seen[name].add(key)
            result = mlbuild_run(project, runlog)
            context = f"run {number} after {batch}\n{result.stdout}{result.stderr}"
            assert result.code == 0, context
            assert set(matching(STARTED, result.stdout)) == ran, context
            assert set(matching(RESTORED, result.stdout)) == restored, context
            for output in ("out/a.txt", "out/b.txt"):
                assert (project / output).read_text() == expected[output], context
            status = mlbuild_cli(["status", "-f", str(project / "pipeline.toml")], runlog)
            assert status.code == 0, context + status.stdout


# --- matrix targets (issue 16): random grids under random edits ------------------------------

MATRIX_EDIT = st.tuples(
    st.sampled_from(["add", "remove", "reverse", "variant"]),
    st.sampled_from(["a", "b"]),
    st.integers(min_value=0, max_value=5),
)


def matrix_toml(axes: Mapping[str, Sequence[int]], variant: int) -> str:
    """A matrix target over `axes` and an aggregator reading every point's output.

    Only the variant's parity reaches the output bytes: an odd-even change reruns
    every point and leaves the aggregator fresh (early cutoff).
    """
    keys = list(axes)
    path = "out/p-" + "-".join(f"{{matrix.{k}}}" for k in keys) + ".txt"
    values = " ".join(f"{{matrix.{k}}}" for k in keys)
    matrix = ", ".join(f"{k} = [{', '.join(map(str, v))}]" for k, v in axes.items())
    return (
        "[targets.agg]\n"
        'cmd = "cat {inputs} > {outputs.0}"\n'
        'inputs = ["{targets.grid.outputs.0}"]\n'
        'outputs = ["out/all.txt"]\n\n'
        "[targets.grid]\n"
        f'cmd = "echo {values} p{variant % 2} > {{outputs.0}} # v{variant}"\n'
        f'outputs = ["{path}"]\n'
        f"matrix = {{ {matrix} }}\n"
    )


def matrix_expected(axes: Mapping[str, Sequence[int]], variant: int) -> dict[str, bytes]:
    """Every current point's output and the aggregator's, computed here."""
    files: dict[str, bytes] = {}
    for combo in itertools.product(*axes.values()):
        name = "out/p-" + "-".join(map(str, combo)) + ".txt"
        files[name] = (" ".join(map(str, combo)) + f" p{variant % 2}\n").encode()
    files["out/all.txt"] = b"".join(files.values())
    return files


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    first=st.lists(st.integers(0, 5), min_size=1, max_size=3, unique=True),
    second=st.one_of(st.none(), st.lists(st.integers(0, 5), min_size=1, max_size=2, unique=True)),
    batches=st.lists(st.lists(MATRIX_EDIT, min_size=1, max_size=2), min_size=1, max_size=4),
    jobs=st.sampled_from([1, 3]),
)
def test_matrix_runs_match_clean_builds_and_run_only_new_points(
    first: list[int],
    second: list[int] | None,
    batches: list[list[tuple[str, str, int]]],
    jobs: int,
) -> None:
    axes: dict[str, list[int]] = {"a": list(first)}
    if second is not None:
        axes["b"] = list(second)
    variant = 0
    last: dict[str, object] = {}
    seen: set[tuple[str, object]] = set()
    with tempfile.TemporaryDirectory() as tmp:
        project, scratch, runlog = Path(tmp) / "p", Path(tmp) / "clean", Path(tmp) / "log"
        project.mkdir()
        for number, batch in enumerate([[], *batches]):
            for kind, key, value in batch:
                values = axes.get(key)
                if values is None:
                    continue
                if kind == "add" and value not in values:
                    values.append(value)
                elif kind == "remove" and len(values) > 1:
                    values.pop(value % len(values))
                elif kind == "reverse":
                    values.reverse()
                elif kind == "variant":
                    variant += 1
            text = matrix_toml(axes, variant)
            (project / "pipeline.toml").write_text(text)
            expected = matrix_expected(axes, variant)
            # The model: a point runs when it was never built with this command, is
            # restored when it was built so before but not last; the aggregator the same
            # by the bytes it reads.
            ran: set[str] = set()
            restored: set[str] = set()
            points = [
                "grid@" + ",".join(f"{k}={v}" for k, v in zip(axes, combo, strict=True))
                for combo in itertools.product(*axes.values())
            ]
            agg_key = tuple(v for k, v in expected.items() if k != "out/all.txt")
            for name, state in [*((p, variant) for p in points), ("agg", agg_key)]:
                if last.get(name) != state:
                    (restored if (name, state) in seen else ran).add(name)
                last[name] = state
                seen.add((name, state))
            result = mlbuild_run(project, runlog, ["-j", str(jobs)])
            context = f"run {number} after {batch}\n{text}\n{result.stdout}{result.stderr}"
            assert result.code == 0, context
            assert set(matching(STARTED, result.stdout)) == ran, context
            assert set(matching(RESTORED, result.stdout)) == restored, context
            for rel, data in expected.items():
                assert (project / rel).read_bytes() == data, context + rel
            if scratch.exists():
                shutil.rmtree(scratch)
            scratch.mkdir()
            shutil.copyfile(project / "pipeline.toml", scratch / "pipeline.toml")
            clean = mlbuild_run(scratch, runlog, ["-j", str(jobs)])
            assert clean.code == 0, clean.stdout + clean.stderr
            assert read_outputs(scratch) == expected, context
