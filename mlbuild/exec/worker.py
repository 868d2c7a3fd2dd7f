"""The worker process of a Python target: `python -m mlbuild.exec.worker CALL_JSON`.

Each step runs in a fresh interpreter so that heavy libraries (TensorFlow) are
never imported into mlbuild itself and every step starts with clean memory.
CALL_JSON holds the function reference and its keyword arguments; paths are
passed as strings and handed to the function as `pathlib.Path`.

Warm mode (`python -m mlbuild.exec.worker --warm SPEC_JSON`, see exec/warm.py):
the worker imports the installed third-party modules the step's code
imports, never a project module, then waits for its call as one JSON line on
stdin; an end of file (mlbuild gone, or the warm worker not wanted) ends it
without running anything. With the call it runs exactly as a fresh worker
would (`main`), and if warming touched the project at all it replaces
itself with a fresh worker first (`os.execv`).

Exit status: 0 success; 1 the function (or importing its module) raised, or
it returned a value; 2 it cannot be called with the declared names. Anything
raised counts, KeyboardInterrupt and SystemExit(non-zero) included: its
traceback is printed without this module's frames, and what was raised is
written to the timing file (`"raised": "ValueError: ..."`) so that mlbuild
says "raised ValueError: ..." rather than a bare exit code or "killed by
signal 2". Imports only the standard library, and only what it needs
(mlbuild.observed, which records the files and modules the step uses, is
standard library only too).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlbuild.observed import Recorder

EXIT_RAISED = 1
EXIT_BAD_CALL = 2


def _arguments(call: dict[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for name, value in call["paths"].items():
        kwargs[name] = [Path(v) for v in value] if isinstance(value, list) else Path(value)
    kwargs.update(call["params"])
    return kwargs


def _print_user_traceback(exc: BaseException) -> None:
    """The traceback from the user's code on, without the worker's or importlib's frames."""
    tb = exc.__traceback__
    while tb is not None and (
        tb.tb_frame.f_code.co_filename == __file__
        or tb.tb_frame.f_code.co_filename.startswith("<frozen importlib")
    ):
        tb = tb.tb_next
    import traceback  # only when a step raised: every step and build imports this module

    traceback.print_exception(type(exc), exc, tb, file=sys.stderr)


def _write_timing(
    call: dict[str, Any], import_seconds: float, call_seconds: float, raised: str | None = None
) -> None:
    """Where the step's time went, for `-v` and the demo's overhead measurement; what it raised."""
    path = call.get("timing")
    if path:
        timing: dict[str, Any] = {"import_seconds": import_seconds, "call_seconds": call_seconds}
        if raised is not None:
            timing["raised"] = raised
        Path(path).write_text(json.dumps(timing))


def _describe(exc: BaseException) -> str:
    """`ValueError: the data is bad`, `KeyboardInterrupt`, `SystemExit: 3` (one line, short)."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 200:
        first = first[:197] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _failed(exc: BaseException) -> bool:
    """Whether a raised exception fails the step: all but SystemExit(0) and SystemExit()."""
    return not (isinstance(exc, SystemExit) and exc.code in (None, 0))


def _import_project_code_from_source(root: str, recorder: Recorder | None) -> None:
    """Make modules under the project root compile from their source, never a `.pyc`.

    Python reuses a cached `.pyc` while the source's mtime (whole seconds) and
    size are unchanged, so an edit of the same length within the second of the
    last run would run the old code, though mlbuild saw the new code and
    reran the step for it. Installed packages (site-packages, even inside the
    project) keep their bytecode caches: they are many and not edited.

    The recorder, if any, is told of each project module file just before it
    is read, so that one edited while the step runs shows as changed.
    """
    from importlib.machinery import (
        BYTECODE_SUFFIXES,
        EXTENSION_SUFFIXES,
        SOURCE_SUFFIXES,
        ExtensionFileLoader,
        FileFinder,
        SourceFileLoader,
        SourcelessFileLoader,
    )

    def note(path: str) -> None:
        if recorder is not None:
            recorder.opened(path, reading=True)

    class SourceOnlyLoader(SourceFileLoader):
        def get_code(self, fullname: str) -> Any:
            path = self.get_filename(fullname)
            note(path)
            return self.source_to_code(self.get_data(path), path)

    class NotedSourcelessLoader(SourcelessFileLoader):
        def get_code(self, fullname: str) -> Any:
            note(self.get_filename(fullname))
            return super().get_code(fullname)

    class NotedExtensionLoader(ExtensionFileLoader):
        def create_module(self, spec: Any) -> Any:
            note(self.path)
            return super().create_module(spec)

    project = os.path.realpath(root)
    finder_for = FileFinder.path_hook(
        (NotedExtensionLoader, EXTENSION_SUFFIXES),
        (SourceOnlyLoader, SOURCE_SUFFIXES),
        (NotedSourcelessLoader, BYTECODE_SUFFIXES),
    )

    def hook(path: str) -> Any:
        real = os.path.realpath(path or ".")
        inside = real == project or real.startswith(project + os.sep)
        if not inside or "site-packages" in real or "dist-packages" in real:
            raise ImportError("not project code")
        return finder_for(path)

    sys.path_hooks.insert(0, hook)
    sys.path_importer_cache.clear()


def _start_recording(call: dict[str, Any], started: Recorder | None = None) -> Recorder | None:
    """Record the project files and modules the step uses (see observed.py).

    Only when the runner asked for timing: it reads the observation from beside
    it. Without one (a bench's baseline) nothing is recorded and nothing is
    added to the manifest, as for a shell step. A warm worker's recorder
    (`started`) has been in place since before its imports, as a fresh
    worker's is: a library that bound `open` when imported records too.
    """
    if not call.get("timing"):
        if started is not None:
            started.stop()
        return None
    if started is not None:
        started.reads.clear()
        started.written.clear()
        started.recording = True
        return started
    from mlbuild.observed import Recorder

    recorder = Recorder(call["root"])
    recorder.start()
    return recorder


def _write_observed(call: dict[str, Any], recorder: Recorder | None) -> None:
    """After a successful call: what the step used, for the runner to add to its manifest."""
    if recorder is not None:
        try:
            recorder.write(call["timing"])
        except Exception as exc:  # the step succeeded; only the observation is lost
            print(f"mlbuild: could not record what the step read: {exc}", file=sys.stderr)


def main(argv: list[str], warm_recorder: Recorder | None = None) -> int:
    call = json.loads(argv[0])
    sys.path.insert(0, call["root"])
    recorder = _start_recording(call, warm_recorder)
    _import_project_code_from_source(call["root"], recorder)
    module_name, _, function_name = call["ref"].partition(":")
    started = time.perf_counter()
    try:
        module = importlib.import_module(module_name)
    except BaseException as exc:  # KeyboardInterrupt and SystemExit in module code too
        print(f"mlbuild: importing {module_name} failed:", file=sys.stderr)
        _print_user_traceback(exc)
        _write_timing(call, time.perf_counter() - started, 0.0, _describe(exc))
        return EXIT_RAISED
    function = getattr(module, function_name, None)
    if not callable(function):
        print(f"mlbuild: {module_name} has no function '{function_name}'", file=sys.stderr)
        return EXIT_BAD_CALL
    kwargs = _arguments(call)
    import inspect

    try:
        inspect.signature(function).bind(**kwargs)
    except TypeError as exc:
        print(f"mlbuild: {call['ref']} cannot take the declared names: {exc}", file=sys.stderr)
        return EXIT_BAD_CALL
    except ValueError:
        pass  # no signature available (a builtin): let the call decide
    imported = time.perf_counter()
    raised: BaseException | None = None
    result = None
    try:
        result = function(**kwargs)
    except BaseException as exc:  # KeyboardInterrupt, SystemExit: the user's, reported as such
        raised = exc if _failed(exc) else None
    described = _describe(raised) if raised is not None else None
    _write_timing(call, imported - started, time.perf_counter() - imported, described)
    if raised is not None:
        _print_user_traceback(raised)
        return EXIT_RAISED
    if result is not None:
        print(
            f"mlbuild: {call['ref']} returned a {type(result).__name__}; step functions"
            " return None and write their results to their declared outputs",
            file=sys.stderr,
        )
        return EXIT_RAISED
    _write_observed(call, recorder)
    return 0


def exit_fast(code: int, status: str | None = None) -> None:
    """Exit after atexit handlers, skipping interpreter teardown.

    Tearing down an interpreter that imported TensorFlow takes about a second,
    which would be billed to every step. What a step can rely on still
    happens: atexit handlers run (logging's flush, experiment trackers'
    uploads) and the standard streams are flushed. Files a function left
    open are closed when their last reference goes (CPython's reference
    counting), which for a returned function's locals is before this point.
    """
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    if status is not None:  # a keep-warm worker's run learns its exit status here
        _write_status(status, code)
    os._exit(code)


WARM_FLAG = "--warm"
PARAM_PREFIX = "MLBUILD_PARAM_"  # set from the call in warm mode (exec/warm.py)


def _installed_origin(spec: Any) -> bool:
    """Whether a top-level module's spec is an installed package: site-packages or dist-packages.

    A module of the project, of a `PYTHONPATH` directory or of an editable
    install (its source is someone's working copy) is not: it could be edited
    between warming and the call, and it is the step's to import fresh.
    """
    places = list(getattr(spec, "submodule_search_locations", None) or ())
    if spec.origin and spec.origin not in ("built-in", "frozen"):
        places.append(spec.origin)
    if not places:
        return False
    for place in places:
        real = os.path.realpath(place)
        parts = real.split(os.sep)
        if "site-packages" not in parts and "dist-packages" not in parts:
            return False
    return True


class _Warming:
    """Imports installed modules ahead of the call; notes any attempt to reach project code."""

    def __init__(self, root: str) -> None:
        self.project = os.path.realpath(root)
        self.touched: list[str] = []  # project modules or files something tried to use
        self.recorder: Recorder | None = None

    def _guard(self) -> Any:
        """A path hook that finds nothing in project directories, noting what it was asked."""
        from importlib.machinery import FileFinder

        warming = self
        real_hook = FileFinder.path_hook(*_loader_details())

        class Refuse:
            def __init__(self, path: str) -> None:
                self.finder = real_hook(path)

            def find_spec(self, name: str, target: Any = None) -> None:
                if self.finder.find_spec(name, target) is not None:
                    warming.touched.append(name)
                return None

            def invalidate_caches(self) -> None:
                self.finder.invalidate_caches()

        def hook(path: str) -> Any:
            real = os.path.realpath(path or ".")
            parts = real.split(os.sep)
            inside = real == self.project or real.startswith(self.project + os.sep)
            if not inside or "site-packages" in parts or "dist-packages" in parts:
                raise ImportError("not project code")
            return Refuse(path)

        return hook

    def run(self, imports: list[list[Any]], env: dict[str, str]) -> None:
        """Import what `imports` names ([module, [from-names]]); `env` set only meanwhile."""
        import importlib.util

        from mlbuild.observed import Recorder

        saved = {name: os.environ.get(name) for name in env}
        hook = self._guard()
        sys.path_hooks.insert(0, hook)
        sys.path_importer_cache.clear()
        recorder = self.recorder = Recorder(self.project)
        recorder.start()
        try:
            os.environ.update(env)
            skipped: set[str] = set()
            for module, names in imports:
                top = module.partition(".")[0]
                if top in skipped or top in sys.stdlib_module_names:
                    continue
                if top not in sys.modules:
                    before = len(self.touched)
                    try:
                        spec = importlib.util.find_spec(top)
                    except Exception:
                        spec = None
                    if len(self.touched) > before or spec is None or not _installed_origin(spec):
                        del self.touched[before:]  # only asked, nothing was imported
                        skipped.add(top)
                        continue
                self._import(module, names)
        finally:
            recorder.recording = False  # its wrappers stay, for the call (_start_recording)
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            sys.path_hooks.remove(hook)
            sys.path_importer_cache.clear()
        seen = recorder.report()
        self.touched.extend(seen["modules"])
        self.touched.extend(seen["reads"])
        self.touched.extend(recorder.written)

    def _import(self, module: str, names: list[str]) -> None:
        """`import module`, or `from module import names` (a name may be a submodule)."""
        try:
            imported = importlib.import_module(module)
            for name in names:
                if not hasattr(imported, name):
                    with contextlib.suppress(Exception):
                        importlib.import_module(f"{module}.{name}")
        except Exception:
            pass  # the step's own import will fail (or succeed) the same way


def _loader_details() -> list[tuple[Any, list[str]]]:
    from importlib.machinery import (
        BYTECODE_SUFFIXES,
        EXTENSION_SUFFIXES,
        SOURCE_SUFFIXES,
        ExtensionFileLoader,
        SourceFileLoader,
        SourcelessFileLoader,
    )

    return [
        (ExtensionFileLoader, EXTENSION_SUFFIXES),
        (SourceFileLoader, SOURCE_SUFFIXES),
        (SourcelessFileLoader, BYTECODE_SUFFIXES),
    ]


def _read_call() -> tuple[str | None, list[int]]:
    """The call, one JSON line on stdin (read unbuffered), and any descriptors sent with it.

    Under a keep-warm process (exec/keepwarm.py) stdin is a unix socket, and
    the run's output pipe comes with the call (SCM_RIGHTS). None at end of file.
    """
    import stat

    fds: list[int] = []
    data = b""
    sock = None
    if stat.S_ISSOCK(os.fstat(0).st_mode):
        import socket

        sock = socket.socket(fileno=os.dup(0))
    try:
        while not data.endswith(b"\n"):
            try:
                if sock is not None:
                    chunk, got, _, _ = socket.recv_fds(sock, 65536, 4)
                    fds.extend(got)
                else:
                    chunk = os.read(0, 65536)
            except InterruptedError:
                continue
            if not chunk:
                return None, fds
            data += chunk
    finally:
        if sock is not None:
            sock.close()
    return data.decode(), fds


def _stdin_as_fresh() -> None:
    """A fresh worker's stdin is /dev/null: so is this one's once the call is read."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)


def warm_main(spec_json: str) -> None:
    """Warm mode: import, wait for the call, run it as a fresh worker would; never returns."""
    spec = json.loads(spec_json)
    warming = _Warming(spec["root"])
    try:
        warming.run(spec["imports"], spec.get("env", {}))
    except BaseException as exc:  # a surprise while warming: run the call fresh instead
        warming.touched.append(repr(exc))
    line, fds = _read_call()
    if line is None:
        os._exit(0)  # not wanted (or mlbuild is gone): nothing ran
    message = json.loads(line)
    call: str = message["call"]
    status: str | None = message.get("status")  # a run that is not our parent reads it
    for fd in fds[:1]:  # the run's output pipe: stdout and stderr from here on
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    for fd in fds:
        os.close(fd)
    # The parameters' variables are the call's: they may have changed since warming.
    for name in [n for n in os.environ if n.startswith(PARAM_PREFIX)]:
        del os.environ[name]
    os.environ.update(message["params"])
    _stdin_as_fresh()
    if warming.touched:
        # Something reached for project code or files while warming: the step must not
        # see a process that did. A fresh interpreter in this same process takes the call.
        sys.stdout.flush()
        argv = [sys.executable, "-m", "mlbuild.exec.worker", call]
        if status is None:
            os.execv(sys.executable, argv)
        child = os.fork()  # the run is not our parent: this process reports the exit status
        if child == 0:
            os.execv(sys.executable, argv)
        code = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
        _write_status(status, code)
        os._exit(code if code >= 0 else 1)
    sys.argv[1:] = [call]
    exit_fast(main([call], warming.recorder), status)


def _write_status(path: str, code: int) -> None:
    with contextlib.suppress(OSError), open(path, "w") as handle:
        handle.write(str(code))


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    if sys.argv[1:2] == [WARM_FLAG]:
        warm_main(sys.argv[2])
    exit_fast(main(sys.argv[1:]))
