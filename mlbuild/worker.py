"""The worker process of a Python target: `python -m mlbuild.worker CALL_JSON`.

Each step runs in a fresh interpreter so that heavy libraries (TensorFlow) are
never imported into mlbuild itself and every step starts with clean memory.
CALL_JSON holds the function reference and its keyword arguments; paths are
passed as strings and handed to the function as `pathlib.Path`.

Exit status: 0 success; 1 the function raised (its traceback is printed,
without this module's frames) or returned a value; 2 it cannot be called with
the declared names. Imports only the standard library, and only what it needs.
"""

from __future__ import annotations

import importlib
import json
import sys
import traceback
from pathlib import Path
from typing import Any

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
    traceback.print_exception(type(exc), exc, tb, file=sys.stderr)


def main(argv: list[str]) -> int:
    call = json.loads(argv[0])
    sys.path.insert(0, call["root"])
    module_name, _, function_name = call["ref"].partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        print(f"mlbuild: importing {module_name} failed:", file=sys.stderr)
        _print_user_traceback(exc)
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
    try:
        result = function(**kwargs)
    except Exception as exc:
        _print_user_traceback(exc)
        return EXIT_RAISED
    if result is not None:
        print(
            f"mlbuild: {call['ref']} returned a {type(result).__name__}; step functions"
            " return None and write their results to their declared outputs",
            file=sys.stderr,
        )
        return EXIT_RAISED
    return 0


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    raise SystemExit(main(sys.argv[1:]))
