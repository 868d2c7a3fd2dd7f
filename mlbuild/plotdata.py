"""Plot files read into series: CSV or TSV with a header row, or JSON records or columns.

A target declares them with `plots = [...]` (pipeline/load.py checks the file
name's ending against `schema.PLOT_SUFFIXES`); `mlbuild plots` (ui/plots.py)
reads them, from the workspace or from a cached run, and draws one series per
numeric column. The x axis is the first column named `step` or `epoch` (any
case) when it is numeric, else the row number from 0. JSON is either a list of
records (`[{"epoch": 0, "loss": 0.5}, ...]`) or an object of equal-length
lists, which is what Keras's `History.history` is when dumped as it comes
(`{"loss": [...], "accuracy": [...]}`).

Pure: bytes in, values out, nothing imported beyond the standard library, so
a bad file is an `UnreadablePlot` the caller reports as one line.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

X_COLUMNS = ("step", "epoch")  # taken for the x axis when present, in this order
ROW_NUMBER = "row"  # the x axis's title when the file has no step or epoch column
MAX_ROWS = 100_000  # more rows than a chart can show; beyond it a file is refused
_BOOLS = frozenset({"true", "false"})


class UnreadablePlot(ValueError):
    """A plot file whose bytes are not a table of numbers (the message says why)."""


class Series(NamedTuple):
    """One numeric column: its name and its (x, y) points, rows without a number left out."""

    name: str
    points: tuple[tuple[float, float], ...]


class PlotTable(NamedTuple):
    """What one plot file holds: the x axis's title and a series per numeric column."""

    x: str
    series: tuple[Series, ...]


def read_plot(path: str, data: bytes) -> PlotTable:
    """The series of a plot file's bytes; the format is chosen by `path`'s ending."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UnreadablePlot(f"not UTF-8 text (byte {exc.start})") from None
    lowered = path.lower()
    if lowered.endswith(".json"):
        columns, rows = _json_table(text)
    elif lowered.endswith((".csv", ".tsv")):
        columns, rows = _delimited_table(text, "\t" if lowered.endswith(".tsv") else ",")
    else:
        raise UnreadablePlot("unknown plot format (known: .csv, .tsv, .json)")
    if len(rows) > MAX_ROWS:
        raise UnreadablePlot(f"{len(rows):,} rows, more than the {MAX_ROWS:,} a chart can show")
    return _series(columns, rows)


def _delimited_table(text: str, delimiter: str) -> tuple[list[str], list[dict[str, Any]]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if not header or not any(name.strip() for name in header):
            raise UnreadablePlot("no header row (the first line names the columns)")
        columns = [name.strip() for name in header]
        rows = [dict(zip(columns, cells, strict=False)) for cells in reader if cells]
    except csv.Error as exc:
        raise UnreadablePlot(f"line {reader.line_num}: {exc}") from None
    return columns, rows


def _json_table(text: str) -> tuple[list[str], list[dict[str, Any]]]:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise UnreadablePlot(f"not JSON: {exc}") from None
    if isinstance(data, list) and all(isinstance(row, dict) for row in data):
        columns: dict[str, None] = {}
        for row in data:
            columns.update(dict.fromkeys(str(name) for name in row))
        return list(columns), [{str(k): v for k, v in row.items()} for row in data]
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        lengths = {len(v) for v in data.values()}
        if len(lengths) != 1:
            raise UnreadablePlot("an object of lists of different lengths (columns must match)")
        names = [str(name) for name in data]
        return names, [
            dict(zip(names, cells, strict=True)) for cells in zip(*data.values(), strict=True)
        ]
    raise UnreadablePlot("expected a list of records or an object of equal-length lists")


def _number(value: Any) -> float | None:
    """A finite number from a JSON number or a CSV cell; None for an empty cell or null."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        if not value.strip() or value.strip().lower() in _BOOLS:
            return None
        try:
            number = float(value)
        except ValueError:
            raise _NotNumeric from None
    else:
        raise _NotNumeric
    return number if math.isfinite(number) else None


class _NotNumeric(Exception):
    """A cell that makes its column a label column (text, a list, an object)."""


def _numeric_column(rows: Sequence[Mapping[str, Any]], name: str) -> list[float | None] | None:
    """The column's numbers by row (None where a row has none), or None for a text column."""
    values: list[float | None] = []
    try:
        for row in rows:
            values.append(_number(row.get(name)))
    except _NotNumeric:
        return None
    return values if any(v is not None for v in values) else None


def _series(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> PlotTable:
    numeric = {name: v for name in columns if (v := _numeric_column(rows, name)) is not None}
    x_name = next(
        (name for wanted in X_COLUMNS for name in numeric if name.lower() == wanted), None
    )
    if x_name is None:
        xs: list[float | None] = [float(i) for i in range(len(rows))]
    else:
        xs = numeric.pop(x_name)
    series = tuple(
        Series(
            name,
            tuple((x, y) for x, y in zip(xs, ys, strict=True) if x is not None and y is not None),
        )
        for name, ys in numeric.items()
    )
    if not series:
        raise UnreadablePlot("no numeric column to plot")
    return PlotTable(x_name or ROW_NUMBER, series)
