"""Metrics files: the numbers a target writes (JSON, YAML or TOML), flattened to dotted names.

A target declares `metrics = ["eval/metrics.json"]`; once its step ran or its
outputs were restored, experiments.py reads each file here and records the
numbers with the configuration that produced them. Nested tables become
dotted names (`{"eval": {"acc": 0.9}}` -> `eval.acc`), list items their
index (`losses.0`). Only numbers are kept: a string, a boolean, a null or a
number that is not finite is skipped and named, so the user can be told once.
A file that cannot be read or parsed is `UnreadableMetrics`: the caller warns,
the build does not fail (the step succeeded; only the table misses a row's
numbers). The parsers are imported when a file of that format is read, never
by a pipeline without metrics.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

from mlbuild.pipeline.schema import METRICS_SUFFIXES, MetricsFormat

Number = int | float


class UnreadableMetrics(Exception):
    """A metrics file that is missing, unreadable or not a table of values (a warning)."""


class Metrics(NamedTuple):
    """What one metrics file held: its numbers by dotted name, and what was not a number."""

    values: dict[str, Number]
    skipped: tuple[str, ...]


def format_of(path: str) -> MetricsFormat | None:
    """The format a metrics file is read as, by its extension; None when it has no known one."""
    return METRICS_SUFFIXES.get(Path(path).suffix.lower())


def read_metrics(full: Path, fmt: MetricsFormat) -> Metrics:
    """The numbers in the metrics file at `full`; UnreadableMetrics saying why not."""
    try:
        text = full.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UnreadableMetrics("it does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UnreadableMetrics(f"it cannot be read ({exc})") from None
    data = _parse(text, fmt)
    if not isinstance(data, dict):
        raise UnreadableMetrics(f"it holds no table of names and values ({fmt.value})")
    values: dict[str, Number] = {}
    skipped: list[str] = []
    _flatten(data, "", values, skipped)
    return Metrics(values, tuple(skipped))


def _parse(text: str, fmt: MetricsFormat) -> Any:
    try:
        if fmt is MetricsFormat.JSON:
            return json.loads(text)
        if fmt is MetricsFormat.TOML:
            import tomli

            return tomli.loads(text)
        from ruamel.yaml import YAML  # the YAML library params files use too

        return YAML(typ="safe", pure=True).load(text)
    except ValueError as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise UnreadableMetrics(f"it is not valid {fmt.value.upper()} ({exc})") from None
    except Exception as exc:  # ruamel's YAMLError, without importing it to name it
        if not type(exc).__module__.startswith("ruamel"):
            raise
        problem = " ".join(str(exc).split()) or type(exc).__name__
        raise UnreadableMetrics(f"it is not valid YAML ({problem})") from None


def _flatten(value: Any, name: str, values: dict[str, Number], skipped: list[str]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, f"{name}.{key}" if name else str(key), values, skipped)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _flatten(item, f"{name}.{index}" if name else str(index), values, skipped)
    elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        values[name] = value
    else:
        skipped.append(name)
