"""The JSON Schema of pipeline.toml, shipped beside this module, for editors and `mlbuild schema`.

`pipeline.schema.json` (Draft 2020-12) describes every key `pipeline.load`
accepts, with a description for each, so that an editor reading a `#:schema`
line (Taplo, Even Better TOML) can complete and document pipeline.toml. It is
package data (pyproject's `[tool.setuptools.package-data]`); tests/test_schema.py
checks that it agrees with the loader. It checks less than the loader does
(cycles, placeholders in `cmd`, paths that leave the project): the loader
stays the authority, the schema is a help while typing.
"""

from __future__ import annotations

SCHEMA_NAME = "pipeline.schema.json"


def schema_text() -> str:
    """The schema's JSON text, as shipped."""
    from importlib.resources import files  # only for `mlbuild schema` and `mlbuild init`

    return files("mlbuild.pipeline").joinpath(SCHEMA_NAME).read_text(encoding="utf-8")
