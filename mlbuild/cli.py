"""The `mlbuild` command's entry: a no-op `run` told from its stamp, anything else in full.

Kept to the standard library and `uptodate`, so that a no-op pays for
neither the parser nor the engine (uptodate.py says when the stamp holds);
every other command, and a run the stamp cannot tell, goes to commands.py,
with what the stamp proved of it.
"""

from __future__ import annotations

import os
import sys

from mlbuild.uptodate import TYPE_CHECKING, answer

if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import NoReturn


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mlbuild` command; returns the exit code."""
    words = list(sys.argv[1:] if argv is None else argv)
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:  # started with it closed (`>&-`): said to nobody
            setattr(sys, name, open(os.devnull, "w"))  # noqa: SIM115 (lives as long as we do)
    try:
        code = answer(words)
    except KeyboardInterrupt:  # nothing was changed: said as the full command says it
        from mlbuild.commands import EXIT_INTERRUPTED, tell
        from mlbuild.ui.messages import interrupted

        tell(interrupted())
        return EXIT_INTERRUPTED
    if isinstance(code, int):
        return code
    from mlbuild.commands import main as full

    return full(words, proof=code)


def run_main() -> NoReturn:
    """`python -m mlbuild` and the console script: exit with main's code."""
    sys.exit(main())
