"""Warm workers: a Python step's worker started ahead of its call, its `import tensorflow` done.

A fresh worker per step keeps steps apart (nothing leaks, project code is
always imported fresh), but each one pays for importing its heavy libraries.
A warm worker (`python -m mlbuild.exec.worker --warm SPEC`) imports the
installed third-party modules named by the import statements of the step's
code closure (code.py) while another step runs, then waits for its call; the
project's own modules are imported only when the call arrives, exactly as in
a fresh worker (the worker refuses to find any project module while warming,
and runs the call in a fresh interpreter if anything tried).

A warm worker is used only when what the step would get now equals what it
was started with: the environment (every variable but `MLBUILD_PARAM_*`,
which the call carries), the working directory and interpreter, the tracked
package versions and the state of the site-packages directories. Otherwise it
is killed and a fresh worker runs the step. Each warm worker runs at most one
step; those not used are killed when the build ends (or, in watch mode, kept
for the next build; see `WarmPool.keep_for`). While warm, a worker holds a
marker in `.mlbuild/running/` like a running step, so a killed mlbuild's
next run reaps it; it also exits by itself when mlbuild's end of its stdin
pipe closes.

Not warmed: a step whose modules change `sys.path`, or change `os.environ`
other than by a literal `os.environ["K"] = "V"` or `os.environ.setdefault("K",
"V")` (those are applied while warming, as if they ran before the imports,
and undone before the call).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from mlbuild.exec.base import step_environment
from mlbuild.exec.local import WARM_SUFFIX
from mlbuild.exec.reaper import kill_leftovers, new_token
from mlbuild.exec.worker import PARAM_PREFIX, WARM_FLAG
from mlbuild.pipeline.schema import ActionKind, Target
from mlbuild.workspace import running_dir, short_name

if TYPE_CHECKING:
    import ast

    from mlbuild.code import CodeScanner
    from mlbuild.exec.base import Executor, Step
    from mlbuild.scheduler import Scheduler


class WarmSpec(NamedTuple):
    """What a warm worker imports, and the literal environment writes applied meanwhile."""

    imports: tuple[tuple[str, tuple[str, ...]], ...]  # (module, from-names)
    env: tuple[tuple[str, str, bool], ...] = ()  # (name, value, only if unset: setdefault)


class Stamp(NamedTuple):
    """What installed packages looked like when a warm worker started: compared when used."""

    interpreter: tuple[int, int, int]  # the interpreter file's (inode, size, mtime)
    site: tuple[tuple[str, int, int], ...]  # each site-packages dir: (path, inode, mtime)
    versions: tuple[tuple[str, str | None], ...]  # the target's tracked distributions


def package_stamp(versions: Mapping[str, str | None], env: Mapping[str, str]) -> Stamp:
    """The stamp now: `pip install` adds or removes a `*.dist-info` dir, changing its mtime."""
    try:
        st = os.stat(sys.executable)
        interpreter = (st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        interpreter = (0, 0, 0)
    site: list[tuple[str, int, int]] = []
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]  # the worker's too
    for path in dict.fromkeys((*sys.path, *extra)):
        parts = path.split(os.sep)
        if "site-packages" in parts or "dist-packages" in parts:
            try:
                st = os.stat(path)
            except OSError:
                continue
            site.append((path, st.st_ino, st.st_mtime_ns))
    return Stamp(interpreter, tuple(site), tuple(sorted(versions.items())))


# -- what to import: the closure's import statements -------------------------------------


def warm_spec(root: str, files: Iterable[str]) -> WarmSpec | None:
    """What to warm for a step whose code is `files` (its closure, project-relative).

    None when it must not be warmed (it edits `sys.path`, writes `os.environ`
    in a way that cannot be replayed, does not parse) or imports nothing
    installed.
    """
    from mlbuild.code import parse_python

    imports: dict[str, set[str]] = {}
    env: list[tuple[str, str, bool]] = []
    for rel in sorted(files):
        if not rel.endswith(".py"):
            continue
        full = os.path.join(root, rel)
        try:
            writes = _environment_writes(full)
            with open(full, "rb") as handle:
                parsed = parse_python(handle.read(), rel)
        except (OSError, SyntaxError, ValueError):
            return None
        if writes is None:
            return None
        env.extend(writes)
        for level, module, names in parsed.imports:
            if level or not module:
                continue  # a relative import is the project's own
            if _in_project(root, module.partition(".")[0]):
                continue
            imports.setdefault(module, set()).update(n for n in names if n != "*")
    if not imports:
        return None
    listed = tuple((m, tuple(sorted(n))) for m, n in sorted(imports.items()))
    return WarmSpec(listed, tuple(dict.fromkeys(env)))


def _in_project(root: str, top: str) -> bool:
    """Whether top-level module `top` is the project's (a module, package or namespace dir)."""
    base = os.path.join(root, top)
    return os.path.isfile(base + ".py") or os.path.isdir(base)


_MAY_WRITE = (b"environ", b"putenv", b"unsetenv", b"sys", b"addsitedir")
_READ_ONLY_CALLS = {"get", "keys", "items", "values", "copy", "index", "count", "__contains__"}
_IMPORT_STATE = {"path", "path_hooks", "meta_path", "path_importer_cache"}  # of `sys`


def _environment_writes(path: str) -> list[tuple[str, str, bool]] | None:
    """A module's literal `os.environ` writes; None if it writes another way, or edits sys.path.

    Reading either is fine. Changing `sys.path` (or the import hooks) could
    make a name the warm worker imported from site-packages come from
    elsewhere when the step runs; a write to `os.environ` that is not literal
    cannot be applied while warming.
    """
    with open(path, "rb") as handle:
        source = handle.read()
    if not any(word in source for word in _MAY_WRITE):
        return []
    import ast

    def environ(node: ast.expr) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
            isinstance(node, ast.Name) and node.id == "environ"
        )

    def import_state(node: ast.expr) -> bool:
        return (
            isinstance(node, ast.Attribute)
            and node.attr in _IMPORT_STATE
            and isinstance(node.value, ast.Name)
            and node.value.id == "sys"
        )

    def shared(node: ast.expr) -> bool:  # an object whose writes matter
        return environ(node) or import_state(node)

    def text(node: ast.expr) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        return None

    found: list[tuple[str, str, bool]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module == "sys":
            if any(alias.name in _IMPORT_STATE for alias in node.names):
                return None  # `from sys import path`: writes to it cannot be told apart
        elif isinstance(node, ast.Assign):
            if shared(node.value):
                return None  # an alias: its writes cannot be followed
            for target in node.targets:
                if import_state(target) or (
                    isinstance(target, ast.Subscript) and import_state(target.value)
                ):
                    return None
                if isinstance(target, ast.Subscript) and environ(target.value):
                    key, value = text(target.slice), text(node.value)
                    if key is None or value is None:
                        return None
                    found.append((key, value, False))
        elif isinstance(node, ast.AugAssign | ast.AnnAssign | ast.Delete):
            targets = node.targets if isinstance(node, ast.Delete) else [node.target]
            for target in targets:
                if shared(target) or (isinstance(target, ast.Subscript) and shared(target.value)):
                    return None
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("putenv", "unsetenv", "addsitedir"):
                return None
            if isinstance(func, ast.Attribute) and import_state(func.value):
                if name not in _READ_ONLY_CALLS:
                    return None
            elif isinstance(func, ast.Attribute) and environ(func.value):
                if name in _READ_ONLY_CALLS:
                    continue
                args = [text(a) for a in node.args]
                if name != "setdefault" or len(args) != 2 or None in args or node.keywords:
                    return None
                found.append((str(args[0]), str(args[1]), True))
    return found


# -- which steps can run next ------------------------------------------------------------


def next_python(
    targets: Mapping[str, Target],
    deps: Mapping[str, Sequence[str]],
    users: Mapping[str, Sequence[str]],
    running: Iterable[str],
    pending: Iterable[str],
    done: Mapping[str, object],
    rank: Mapping[str, int],
) -> list[str]:
    """Python targets that may start next, in build order.

    Those already found stale and waiting for a slot (`pending`), and those
    whose every dependency in the build has finished or is running: they are
    checked as soon as the running ones finish.
    """
    running = set(running)
    found = {n for n in pending if n not in running}
    for name in running:
        for user in users.get(name, ()):
            if user in done or user in found or user in running:
                continue
            if all(d in done or d in running for d in deps[user] if d in rank):
                found.add(user)
    python = [n for n in found if targets[n].kind is ActionKind.PYTHON]
    return sorted(python, key=rank.__getitem__)


def prepare(
    executor: Executor,
    targets: Mapping[str, Target],
    deps: Mapping[str, Sequence[str]],
    sched: Scheduler,
    pending: Iterable[str],
    done: Mapping[str, object],
    code: CodeScanner,
    jobs: int,
) -> None:
    """While steps run: warm the workers of the Python steps that can run next, on free slots.

    Only the local executor warms (others have no `warm`). A warm worker whose
    target finished without running (fresh, restored, failed upstream) is killed.
    """
    from mlbuild.exec.local import LocalExecutor

    if not isinstance(executor, LocalExecutor) or jobs < 2:
        return
    pool = executor.warm_pool
    if pool is not None and executor.owns_pool:  # a watch session keeps its own
        for name in [n for n in pool.workers if n in done]:
            pool.discard(name)
    room = jobs - len(executor.steps) - (len(pool) if pool is not None else 0)
    if room <= 0:
        return
    names = next_python(targets, deps, sched.users, sched.running, pending, done, sched.rank)
    for name in names:
        if room <= 0:
            break
        if (pool is not None and name in pool.workers) or name in executor.steps:
            continue
        if name in executor.kept:
            continue  # the keep-warm process holds one (exec/keepwarm.py)
        target = targets[name]
        spec = _spec(pool, code, target)
        if spec is None:
            continue
        if pool is None:
            pool = executor.warm_pool = WarmPool(executor.root)
        try:
            pool.spawn(target, spec, executor.base_env, _stamp_for(target, executor.base_env))
        except OSError:
            return  # warming is only ever a saving: the steps run fresh
        room -= 1


def start_session(root: Path) -> WarmPool:
    """Watch mode: one pool for every build of the session (`end_session` kills its workers)."""
    from mlbuild.exec import local

    pool = WarmPool(root)
    local.SESSION_POOL = pool
    return pool


def end_session(pool: WarmPool) -> None:
    from mlbuild.exec import local

    if local.SESSION_POOL is pool:
        local.SESSION_POOL = None
    pool.close()


def keep_for(pool: WarmPool, targets: Mapping[str, Target], ran: Sequence[str], jobs: int) -> None:
    """After a watch build: a warm worker for each Python target likely to run again.

    `jobs` at most (see likely_to_rerun). One that died, or whose packages or
    code changed since it started, is replaced.
    """
    from mlbuild.code import CodeScanner
    from mlbuild.fingerprint import Fingerprinter

    keep = likely_to_rerun(targets, ran, list(pool.workers), jobs)
    pool.keep_only(keep)
    env = dict(os.environ)
    code = CodeScanner(Fingerprinter(pool.root, {}), {})
    for name in keep:
        target = targets[name]
        spec = _spec(pool, code, target)
        if spec is None:
            pool.discard(name)
            continue
        stamp = _stamp_for(target, env)
        warm = pool.workers.get(name)
        if (
            warm is not None
            and warm.proc.poll() is None
            and (warm.stamp, warm.spec)
            == (
                stamp,
                spec,
            )
        ):
            continue
        try:
            pool.spawn(target, spec, env, stamp)  # replaces the one it had
        except OSError:
            return


def likely_to_rerun(
    targets: Mapping[str, Target], ran: Sequence[str], warm: Sequence[str], jobs: int
) -> list[str]:
    """The Python targets to keep warm after a build, `jobs` at most, in order of use.

    Those that just ran, the last first: `ran` is in build order, and the
    last ones are downstream, rerun by an edit to anything above them (after a
    first build of importer, normalizer, trainer, evaluator that is the
    trainer and evaluator, not the data steps that rarely rerun). Then those
    already warm.
    """
    python = [n for n in reversed(ran) if n in targets and targets[n].kind is ActionKind.PYTHON]
    return list(dict.fromkeys([*python, *(n for n in warm if n in targets)]))[:jobs]


def _stamp_for(target: Target, env: Mapping[str, str]) -> Stamp:
    from mlbuild.code import package_versions

    return package_stamp(package_versions(target.track), env)


def _spec(pool: WarmPool | None, code: CodeScanner, target: Target) -> WarmSpec | None:
    """`warm_spec` of a target's static code closure, once per version of that code."""
    from mlbuild.code import CodeError

    if target.kind is not ActionKind.PYTHON:
        return None
    try:
        files = code.fingerprint(target).files  # memoized by the scanner
    except (CodeError, OSError):
        return None
    return _spec_of(pool, code.root, files)


def _spec_of(pool: WarmPool | None, root: str, files: Mapping[str, str]) -> WarmSpec | None:
    key = tuple(sorted(files.items()))
    if pool is not None and key in pool.specs:
        return pool.specs[key]
    spec = warm_spec(root, files)
    if pool is not None:
        pool.specs[key] = spec
    return spec


# -- the pool ------------------------------------------------------------------------------


class _Warm(NamedTuple):
    name: str
    proc: subprocess.Popen[bytes]
    token: str
    env: Mapping[str, str]  # as started, MLBUILD_PARAM_* left out
    stamp: Stamp
    marker: Path
    spec: WarmSpec  # what it imported, and the environment writes applied meanwhile


class Taken(NamedTuple):
    """A warm worker handed to a step: its process (stdout a pipe) and its token."""

    proc: subprocess.Popen[bytes]
    token: str


def _without_params(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if not k.startswith(PARAM_PREFIX)}


class WarmPool:
    """The warm workers of one build (or, in watch mode, of a session), one per target at most."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.workers: dict[str, _Warm] = {}
        # Per version of a closure (its files' digests): parsed once, not at every event.
        self.specs: dict[tuple[tuple[str, str], ...], WarmSpec | None] = {}
        self.used = 0  # steps that ran in a warm worker (for -v and the tests)
        self.discarded = 0  # warm workers killed because what the step would get differed

    def __len__(self) -> int:
        return len(self.workers)

    def names(self) -> list[str]:
        return list(self.workers)

    def spawn(
        self, target: Target, spec: WarmSpec, base_env: Mapping[str, str], stamp: Stamp
    ) -> None:
        """Start a warm worker for `target` (replacing any it has); it imports, then waits."""
        self.discard(target.name)
        token = new_token()
        env = step_environment(target, dict(base_env), token)
        during = {k: v for k, v, only_unset in spec.env if not (only_unset and k in env)}
        argv = [
            sys.executable,
            "-m",
            "mlbuild.exec.worker",
            WARM_FLAG,
            json.dumps({"root": str(self.root), "imports": spec.imports, "env": during}),
        ]
        where = running_dir(self.root)
        where.mkdir(parents=True, exist_ok=True)
        marker = where / (short_name(target.name) + WARM_SUFFIX)
        proc = subprocess.Popen(
            argv,
            cwd=self.root,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            write_warm_marker(marker, proc.pid, token, target.name)
        except BaseException:
            _kill(proc, token)
            marker.unlink(missing_ok=True)
            raise
        self.workers[target.name] = _Warm(
            target.name, proc, token, _without_params(env), stamp, marker, spec
        )

    def take(
        self, target: Target, base_env: Mapping[str, str], stamp: Stamp, spec: WarmSpec | None
    ) -> Taken | None:
        """The warm worker for `target` if what it was started with is what the step gets now.

        Otherwise (none, dead, another environment, packages changed, code that
        no longer imports what it imported or writes the environment otherwise)
        None, and any warm worker the target had is killed: the step runs fresh.
        """
        warm = self.workers.pop(target.name, None)
        if warm is None:
            return None
        env = step_environment(target, dict(base_env), warm.token)
        same = (
            warm.proc.poll() is None
            and _without_params(env) == warm.env
            and warm.stamp == stamp
            and spec is not None
            and spec.env == warm.spec.env
            and set(warm.spec.imports) <= set(spec.imports)
        )
        if not same:
            self.discarded += warm.proc.poll() is None
            _kill(warm.proc, warm.token)
            warm.marker.unlink(missing_ok=True)
            return None
        warm.marker.unlink(missing_ok=True)
        self.used += 1
        return Taken(warm.proc, warm.token)

    def give(
        self, step: Step, base_env: Mapping[str, str], call: str
    ) -> tuple[subprocess.Popen[bytes], str] | None:
        """The step's warm worker, given `call`; None if it has none or it cannot be used."""
        fingerprint = step.observation.fingerprint
        stamp = package_stamp(fingerprint.packages, base_env)
        spec = _spec_of(self, str(self.root), fingerprint.code)  # the code as it is now
        taken = self.take(step.target, base_env, stamp, spec)
        if taken is None:
            return None
        env = step_environment(step.target, dict(base_env), taken.token)
        try:
            send_call(taken, call, params_of(env))
        except OSError:  # it died just now: a fresh worker takes the step
            _kill(taken.proc, taken.token)
            return None
        return taken.proc, taken.token

    def keep_only(self, names: Iterable[str]) -> None:
        """Kill the warm workers of targets not in `names` (they will not run)."""
        wanted = set(names)
        for name in [n for n in self.workers if n not in wanted]:
            self.discard(name)

    def discard(self, name: str) -> None:
        warm = self.workers.pop(name, None)
        if warm is not None:
            _kill(warm.proc, warm.token)
            warm.marker.unlink(missing_ok=True)

    def close(self) -> None:
        """Kill every warm worker (the build is over, or interrupted)."""
        for name in list(self.workers):
            self.discard(name)


def write_warm_marker(marker: Path, pgid: int, token: str, target: str) -> None:
    """A warm worker's marker: a step's (`PGID TOKEN`, target) and this mlbuild's process id.

    `reap_orphans` kills it when that mlbuild is gone, and leaves a watch
    session's own warm workers alone (it reaps at the start of every cycle).
    """
    fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, f"{pgid} {token}\n{target}\n{os.getpid()}\n".encode())
    finally:
        os.close(fd)


def is_warm_marker(marker: Path) -> bool:
    return marker.name.endswith(WARM_SUFFIX)


def _kill(proc: subprocess.Popen[bytes], token: str) -> None:
    """End a warm worker: it ran no step, so SIGKILL at once; nothing is left behind."""
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kill_leftovers(proc.pid, token)


def send_call(taken: Taken, call: str, params: Mapping[str, str]) -> None:
    """Hand the call to a warm worker: one JSON line with the step's `MLBUILD_PARAM_*` values."""
    assert taken.proc.stdin is not None
    line = json.dumps({"call": call, "params": dict(params)}) + "\n"
    try:
        taken.proc.stdin.write(line.encode())
        taken.proc.stdin.flush()
    finally:
        with contextlib.suppress(OSError):
            taken.proc.stdin.close()


def params_of(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(PARAM_PREFIX)}
