"""`mlbuild init`: the files a new project starts with, written only where none exist.

The scaffold is a pipeline that builds as it is (a shell step and a Python step
over a small data file), commented so that it teaches the keys, with a
`.gitignore` for its outputs and `.mlbuild/`. Its pipeline.toml starts with a
`#:schema` line naming `pipeline.schema.json`, a copy of the schema written
beside it: Taplo resolves a relative path against the document, so an editor
finds it offline, in every clone, whatever venv mlbuild was installed in
(`mlbuild schema > pipeline.schema.json` refreshes it after an upgrade).

Never overwrites: every path is checked before the first is written, and each
file is created with O_EXCL, so a file that appears meanwhile is not replaced.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from mlbuild.errors import UsageError
from mlbuild.pipeline.schema import PIPELINE_FILE, STATE_DIR
from mlbuild.pipeline.schema_file import SCHEMA_NAME, schema_text

PIPELINE_TOML = f"""\
#:schema ./{SCHEMA_NAME}
# The pipeline of this project. `mlbuild run` builds what is stale and skips the
# rest; `mlbuild status` says why a target would run. Every key, with what it
# means: {SCHEMA_NAME} (`mlbuild schema`), which editors read through the line
# above (Taplo, Even Better TOML). Paths are relative to this file.

[params]                  # global parameters; a target lists the ones it reads
top = 3                   # TOML-typed: `mlbuild run --set top=5` must be an integer too

# A shell step, run by /bin/sh in this directory. {{inputs.NAME}} and
# {{outputs.NAME}} are replaced by the paths below, shell-quoted by mlbuild
# (so never put them inside quotes yourself).
[targets.prepare]
cmd = "sort -n {{inputs.raw}} > {{outputs.sorted}}"
inputs = {{ raw = "data/numbers.txt" }}       # edit it and `prepare` reruns
outputs = {{ sorted = "build/sorted.txt" }}    # build/ is in .gitignore
description = "sort the numbers"

# A Python step: steps/example.py's run(), called in a fresh worker process
# with its inputs, outputs and params as keyword arguments (paths as
# pathlib.Path). It reruns when its inputs, its params or its code change,
# including the project modules it imports.
[targets.summarize]
python = "steps.example:run"
inputs = {{ numbers = "build/sorted.txt" }}   # what `prepare` writes: runs after it
outputs = {{ summary = "build/summary.json" }}
params = ["top"]
description = "count, mean and the largest numbers"
"""

EXAMPLE_STEP = '''\
"""An example Python step: mlbuild calls run() with the target's inputs, outputs and params."""

from __future__ import annotations

import json
from pathlib import Path


def run(numbers: Path, summary: Path, top: int) -> None:
    """Summarize the sorted numbers into `summary`.

    A step writes its declared outputs and returns None; mlbuild checks that
    they exist, records them and caches them.
    """
    values = [float(word) for word in numbers.read_text().split()]
    result = {
        "count": len(values),
        "mean": sum(values) / len(values) if values else None,
        "largest": values[::-1][:top],
    }
    summary.write_text(json.dumps(result, indent=2) + "\\n")
'''

STEPS_INIT = (
    '"""The project\'s Python steps (named in pipeline.toml as `steps.MODULE:FUNCTION`)."""\n'
)

NUMBERS = "42\n7\n19\n3\n88\n23\n"

GITIGNORE = f"""\
# What mlbuild builds (the outputs in pipeline.toml) and its own state: the
# output cache, manifests, logs and history. Keep pipeline.toml, steps/ and data/.
/build/
/{STATE_DIR}/
"""


class ScaffoldFile(NamedTuple):
    """One file of the scaffold: its path in the project and its text."""

    path: str  # POSIX, relative to the project directory
    text: str


def scaffold_files() -> tuple[ScaffoldFile, ...]:
    """The scaffold, in the order it is written and listed."""
    return (
        ScaffoldFile(PIPELINE_FILE, PIPELINE_TOML),
        ScaffoldFile(SCHEMA_NAME, schema_text()),
        ScaffoldFile("steps/__init__.py", STEPS_INIT),
        ScaffoldFile("steps/example.py", EXAMPLE_STEP),
        ScaffoldFile("data/numbers.txt", NUMBERS),
        ScaffoldFile(".gitignore", GITIGNORE),
    )


def write_scaffold(root: Path) -> tuple[str, ...]:
    """Write the scaffold into `root` (made if missing); the paths written.

    Raises UsageError, having written nothing, if any of its files exists (a
    dangling symlink counts) or a directory it needs is something else.
    """
    files = scaffold_files()
    shown = str(root)
    if os.path.lexists(root) and not root.is_dir():
        raise UsageError(f"init: {shown} exists and is not a directory; nothing written")
    taken = [f.path for f in files if os.path.lexists(root / f.path)]
    if taken:
        where = "" if shown == "." else f" in {shown}"
        raise UsageError(
            f"init: {', '.join(taken)} already {'exists' if len(taken) == 1 else 'exist'}{where};"
            " nothing written (mlbuild init never overwrites a file)"
        )
    for folder in sorted({str(Path(f.path).parent) for f in files} - {"."}):
        path = root / folder
        if os.path.lexists(path) and not path.is_dir():
            raise UsageError(f"init: {path} is not a directory; nothing written")
    written: list[str] = []
    for file in files:
        path = root / file.path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "x", encoding="utf-8") as out:  # O_EXCL: never replaces a file
                out.write(file.text)
        except FileExistsError:
            raise UsageError(
                f"init: {file.path} appeared while writing; kept it, and wrote only"
                f" {', '.join(written) or 'nothing'} before it"
            ) from None
        written.append(file.path)
    return tuple(written)
