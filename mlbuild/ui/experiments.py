"""The experiment table as the user reads it: `exp show` (table or JSON) and `exp diff`.

Reads only the rows experiments.py returns; nothing here opens the database.
The table shows the parameters whose values differ among the rows shown (all
of them with `--all`: a column that never changes says nothing), every metric,
and marks the row the workspace holds with `*`. On a terminal it is drawn by
rich (imported only then); piped, it is plain aligned text a script can cut.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from mlbuild.experiments import Row

MISSING = "-"
EMPTY_TABLE = "No experiments recorded yet: `mlbuild run` records one per configuration.\n"


def when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


def value_text(value: Any) -> str:
    """A parameter or metric as a cell: numbers short (6 significant digits), TOML-ish rest."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return format(value, ".6g")
    if isinstance(value, int | str):
        return str(value)
    return json.dumps(value, default=str, separators=(",", ":"))


def param_columns(rows: Sequence[Row], every: bool) -> list[str]:
    """The parameter names to show: those whose value differs among `rows` (all: `every`)."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row.params))
    if every:
        return list(names)
    return [name for name in names if len({_same(r.params.get(name, _ABSENT)) for r in rows}) > 1]


_ABSENT = object()


def _same(value: Any) -> Any:
    """A hashable stand-in equal for equal values (1, 1.0 and true differ, as in TOML)."""
    if value is None or isinstance(value, int | float | str):
        return (type(value), value)
    if value is _ABSENT:
        return value
    return json.dumps(value, sort_keys=True, default=str)


def metric_columns(rows: Sequence[Row]) -> list[str]:
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row.metrics))
    return list(names)


def sort_rows(rows: Sequence[Row], column: str, reverse: bool) -> list[Row]:
    """Rows by a metric or parameter (rows without it last, in either order)."""

    def value(row: Row) -> Any:
        return row.metrics[column] if column in row.metrics else row.params.get(column)

    present = [r for r in rows if value(r) is not None]
    absent = [r for r in rows if value(r) is None]
    try:
        ordered = sorted(present, key=value, reverse=reverse)
    except TypeError:  # values of several types: compare their text
        ordered = sorted(present, key=lambda r: value_text(value(r)), reverse=reverse)
    return ordered + absent


def table_cells(rows: Sequence[Row], every: bool) -> tuple[list[str], list[list[str]]]:
    """The header and one list of cells per row, as both renderings show them."""
    params = param_columns(rows, every)
    metrics = metric_columns(rows)
    header = ["", "id", "name", "created", *params, *metrics, "restorable"]
    body = [
        [
            "*" if row.current else "",
            row.short,
            row.name or "",
            when(row.created),
            *(value_text(row.params.get(p)) for p in params),
            *(value_text(row.metrics.get(m)) for m in metrics),
            "yes" if row.restorable else "no",
        ]
        for row in rows
    ]
    return header, body


def _aligned(rows: Sequence[Row], every: bool) -> list[str]:
    """The header and one line per row, columns padded (numbers right-aligned)."""
    header, body = table_cells(rows, every)
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]
    numeric = [i >= 4 and all(_is_number(line[i]) for line in body) for i in range(len(header))]
    lines = []
    for line in (header, *body):
        cells = [
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, right in zip(line, widths, numeric, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def render_plain(rows: Sequence[Row], every: bool) -> str:
    """The table as aligned text, one line per row."""
    if not rows:
        return EMPTY_TABLE
    return "\n".join(_aligned(rows, every)) + "\n"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text == MISSING
    return True


def print_rich(rows: Sequence[Row], every: bool) -> None:
    """The table on a terminal: rich styles the aligned lines (header and current row bold,
    rows no longer restorable dim).

    The columns are laid out here rather than by rich's `Table`, which measures every
    cell and took 1.8 s for 1,000 rows (bench/exp_bench.py); one `Text` prints at once.
    """
    from rich.console import Console
    from rich.text import Text

    console = Console(highlight=False)
    if not rows:
        console.print(EMPTY_TABLE, end="", markup=False)
        return
    lines = _aligned(rows, every)
    text = Text(no_wrap=True, overflow="ellipsis")
    text.append(lines[0] + "\n", style="bold underline")
    for row, line in zip(rows, lines[1:], strict=True):
        style = "bold" if row.current else ("dim" if not row.restorable else "")
        text.append(line + "\n", style=style)
    console.print(text, end="", soft_wrap=True)


def print_table(rows: Sequence[Row], *, every: bool, as_json: bool, terminal: bool) -> None:
    """`exp show`: JSON, rich on a terminal, or plain text."""
    if as_json:
        sys.stdout.write(render_json(rows))
    elif terminal:
        print_rich(rows, every)
    else:
        sys.stdout.write(render_plain(rows, every))


def render_json(rows: Sequence[Row]) -> str:
    return json.dumps([row.to_json() for row in rows], indent=2, default=str) + "\n"


def render_diff(a: Row, b: Row) -> str:
    """Parameters and metrics of two rows side by side, with the change from `a` to `b`."""
    left, right = _label(a), _label(b)
    lines: list[list[str]] = [["", left, right, "change"]]
    for title, first, second in (("params", a.params, b.params), ("metrics", a.metrics, b.metrics)):
        names = list(dict.fromkeys([*first, *second]))
        if not names:
            continue
        lines.append([title, "", "", ""])
        for name in names:
            old, new = first.get(name), second.get(name)
            lines.append([f"  {name}", value_text(old), value_text(new), _change(old, new)])
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    out = []
    for line in lines:
        rest = zip(line[1:], widths[1:], strict=True)
        cells = [line[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in rest]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out) + "\n"


def _label(row: Row) -> str:
    mark = "*" if row.current else ""
    return f"{mark}{row.short}" + (f" ({row.name})" if row.name else "")


def _change(old: Any, new: Any) -> str:
    if old == new and type(old) is type(new):
        return ""
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (old, new))
    if not numbers:
        return "changed"
    delta = new - old
    text = format(delta, "+.6g") if isinstance(delta, float) else f"{delta:+d}"
    if old:
        text += f" ({delta / abs(old):+.1%})"
    return text
