"""`mlbuild plots`: every declared plot file drawn into one offline HTML page, PNGs beside it.

What is drawn: each file of a target's `plots = [...]`, read by plotdata.py,
as one panel per numeric column (its own y scale); from the workspace, or
with `--rows ID,ID` from those experiment rows' cache entries, overlaid one
line per row. `--x PARAM --y METRIC[,METRIC]` draws instead a metric against
a parameter, one point per row of the experiment table.

Charts are Vega-Lite specifications rendered here by vl-convert (Vega's own
renderer run offline in the library: no browser, no network). The page holds
each chart as an SVG image in a `data:` URL, so it is one file that loads
nothing: no script, no font, no stylesheet from elsewhere (an SVG shown as an
image cannot load anything either). Each PNG is written beside the page,
named after the page and the plot file.

Never overwrites a file it did not make: the page carries
`<meta name="generator" content="mlbuild plots">` and every PNG a tEXt chunk
`Software: mlbuild plots`; an existing file without that mark is refused.
vl-convert is imported only here, and only by this command.
"""

from __future__ import annotations

import base64
import datetime
import html
import os
import re
import struct
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from mlbuild.cache import BadEntry, Cache, Entry
from mlbuild.errors import UsageError
from mlbuild.experiments import Row, find_rows, rows
from mlbuild.fingerprint import hash_bytes
from mlbuild.manifest import file_hex
from mlbuild.pipeline.load import did_you_mean
from mlbuild.pipeline.schema import Pipeline, display_path
from mlbuild.plotdata import PlotTable, UnreadablePlot, read_plot
from mlbuild.store import open_existing_store
from mlbuild.workspace import cache_dir, state_dir

INSTALL_HINT = "mlbuild plots needs vl-convert-python: pip install 'mlbuild[plots]'"
GENERATOR = "mlbuild plots"
DEFAULT_PAGE = "mlbuild_plots/index.html"  # relative to the project directory
WORKSPACE = "workspace"  # the label of the files in the workspace
PANEL_WIDTH = 320
PANEL_HEIGHT = 200
MAX_DOTS = 500  # points of a chart up to which each one is drawn as a dot too
PNG_SCALE = 2.0  # pixels per Vega-Lite unit: sharp on high-density screens
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_MARK = b"Software\x00" + GENERATOR.encode()
_SLUG = re.compile(r"[^A-Za-z0-9._-]+")


class Source(NamedTuple):
    """One plot file of one configuration: where it was declared, whose it is, its table."""

    target: str
    path: str
    label: str  # WORKSPACE or a row's label
    table: PlotTable


class Chart(NamedTuple):
    """One chart of the page: its heading, a line under it, its file name part and its spec."""

    title: str
    note: str
    slug: str
    spec: dict[str, Any]


class Report(NamedTuple):
    """What `mlbuild plots` wrote, and what it had to leave out (one line each)."""

    page: Path
    images: tuple[Path, ...]
    notes: tuple[str, ...]


class PlotRequest(NamedTuple):
    """The command line of `mlbuild plots`."""

    output: Path | None = None  # the page; None: DEFAULT_PAGE in the project
    rows: tuple[str, ...] = ()  # row ids or names to overlay; () the workspace (or, with x, all)
    x: str | None = None  # a parameter (`--x`), with `y`: metrics against it across rows
    y: tuple[str, ...] = ()  # metric names (`--y`)


def plot_request(
    output: Path | None, rows: str | None, x: str | None, y: str | None
) -> PlotRequest:
    """The command line checked: `--x` and `--y` go together, lists are comma-separated."""
    if (x is None) != (y is None):
        raise UsageError("--x PARAM and --y METRIC go together (a metric against a parameter)")
    ys = _names("--y", y)
    chosen = _names("--rows", rows)
    return PlotRequest(output, chosen, x.strip() if x is not None else None, ys)


def _names(option: str, text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise UsageError(f"{option} {text!r}: expected names separated by commas")
    return names


# -- what to draw ---------------------------------------------------------------


def workspace_sources(pipeline: Pipeline, notes: list[str]) -> list[Source]:
    """Every declared plot file as it is in the workspace; a note for each one left out."""
    sources: list[Source] = []
    for target in pipeline.targets.values():
        for path in target.plots:
            try:
                data = (pipeline.root / path).read_bytes()
            except FileNotFoundError:
                notes.append(
                    f"{path} (target {target.name}): not built yet (`mlbuild run {target.name}`)"
                )
                continue
            except OSError as exc:
                notes.append(f"{path} (target {target.name}): cannot be read: {exc.strerror}")
                continue
            _add(sources, notes, target.name, path, WORKSPACE, data)
    return sources


def row_sources(pipeline: Pipeline, chosen: Sequence[Row], notes: list[str]) -> list[Source]:
    """Every declared plot file as each row's run wrote it, read from the local cache.

    Nothing is written to the workspace: the bytes come from the cache's
    objects (their digest checked), found through the entry of the row's
    cache key for the plot's target.
    """
    cache = Cache(cache_dir(pipeline.root))
    sources: list[Source] = []
    for row in chosen:
        label = row_label(row)
        for target in pipeline.targets.values():
            if not target.plots:
                continue
            key = row.keys.get(target.name)
            if key is None:
                notes.append(f"row {label}: built without target {target.name}, no plots of it")
                continue
            try:
                entry = cache.lookup(key)
            except BadEntry as exc:
                entry = None
                notes.append(f"row {label}: the cache entry of {target.name} is unusable: {exc}")
            for path in target.plots:
                data = cached_file(cache, entry, path) if entry is not None else None
                if data is None:
                    notes.append(
                        f"{path} (target {target.name}) of row {label}: no longer in the cache"
                    )
                    continue
                _add(sources, notes, target.name, path, label, data)
    return sources


def cached_file(cache: Cache, entry: Entry, path: str) -> bytes | None:
    """The bytes `entry` recorded for the file `path` (an output, or a file in one), verified."""
    digest: str | None = None
    for out_path, out in entry.outputs.items():
        if path == out_path:
            digest = file_hex(out["fingerprint"])
        elif path.startswith(out_path + "/"):
            inside = path[len(out_path) + 1 :]
            digest = next((file_hex(i[1]) for i in out.get("tree", ()) if i[0] == inside), None)
        else:
            continue
        break
    if digest is None:
        return None
    data = cache.read_file(entry, digest)
    return data if data is not None and hash_bytes(data) == digest else None


def row_label(row: Row) -> str:
    """How a row is named on the page: its name, else its short id."""
    return row.name or row.short


def chosen_rows(pipeline: Pipeline, wanted: Sequence[str]) -> list[Row]:
    """The experiment rows named by `--rows` (ids, unique id prefixes or names), or all of them."""
    store = open_existing_store(state_dir(pipeline.root), lambda line: None)
    if store is None:
        table: list[Row] = []
    else:
        with store:
            table = rows(store, pipeline.root)
    if not table:
        raise UsageError("mlbuild plots: no experiment rows recorded yet (`mlbuild run` first)")
    if not wanted:
        return table
    chosen: list[Row] = []
    for text in wanted:
        found = find_rows(table, text)
        if not found:
            raise UsageError(
                f"--rows {text}: no experiment row has that id or name (see `mlbuild exp show`)"
            )
        if len(found) > 1:
            ids = ", ".join(row.short for row in found[:5])
            raise UsageError(f"--rows {text}: names several rows ({ids}); give more of the id")
        if found[0] not in chosen:
            chosen.append(found[0])
    return chosen


def _add(
    sources: list[Source], notes: list[str], target: str, path: str, label: str, data: bytes
) -> None:
    try:
        table = read_plot(path, data)
    except UnreadablePlot as exc:
        where = "" if label == WORKSPACE else f" of row {label}"
        notes.append(f"{path} (target {target}){where}: not drawn: {exc}")
        return
    sources.append(Source(target, path, label, table))


def file_charts(sources: Sequence[Source]) -> list[Chart]:
    """A chart per plot file, a panel per column, a line per configuration (rows overlaid)."""
    groups: dict[tuple[str, str], list[Source]] = {}
    for source in sources:
        groups.setdefault((source.target, source.path), []).append(source)
    charts: list[Chart] = []
    for (target, path), group in groups.items():
        labels = list(dict.fromkeys(s.label for s in group))
        values = [
            {"x": x, "y": y, "column": series.name, "run": source.label}
            for source in group
            for series in source.table.series
            for x, y in series.points
        ]
        x_titles = sorted({s.table.x for s in group})
        overlaid = len(labels) > 1
        x_axis: dict[str, Any] = {
            "field": "x",
            "type": "quantitative",
            "title": " / ".join(x_titles),
        }
        if all(
            x.is_integer() for s in group for series in s.table.series for x, _ in series.points
        ):  # steps, epochs, row numbers
            x_axis["axis"] = {"tickMinStep": 1, "format": "d"}
        layer: dict[str, Any] = {
            # Dots show a one-epoch run's single point; on long series they would hide the line.
            "mark": {"type": "line", "point": len(values) <= MAX_DOTS, "tooltip": True},
            "encoding": {
                "x": x_axis,
                "y": {
                    "field": "y",
                    "type": "quantitative",
                    "title": None,
                    "scale": {"zero": False},
                },
            },
        }
        if overlaid:
            layer["encoding"]["color"] = {
                "field": "run",
                "type": "nominal",
                "title": "row",
                "sort": labels,
            }
        spec = {
            "data": {"values": values},
            "facet": {"field": "column", "type": "nominal", "title": None, "sort": _columns(group)},
            "columns": 2,
            "spec": {"width": PANEL_WIDTH, "height": PANEL_HEIGHT, **layer},
            "resolve": {"scale": {"y": "independent"}},
        }
        note = f"target {target}; " + ("rows " + ", ".join(labels) if overlaid else labels[0])
        charts.append(Chart(path, note, _slug(path), spec))
    return charts


def _columns(group: Iterable[Source]) -> list[str]:
    """The numeric columns of a plot file in the order the files list them."""
    names: dict[str, None] = {}
    for source in group:
        names.update(dict.fromkeys(series.name for series in source.table.series))
    return list(names)


def param_charts(table: Sequence[Row], x: str, ys: Sequence[str], notes: list[str]) -> list[Chart]:
    """Each metric of `ys` against parameter `x`, one point per row that has both."""
    _check_known("--x", x, [name for row in table for name in row.params], "parameter")
    for y in ys:
        _check_known("--y", y, [name for row in table for name in row.metrics], "metric")
    charts: list[Chart] = []
    for y in ys:
        points = [
            {"x": row.params[x], "y": row.metrics[y], "row": row_label(row)}
            for row in table
            if x in row.params and y in row.metrics
        ]
        if len(points) < len(table):
            missing = len(table) - len(points)
            notes.append(f"{y} against {x}: {missing} of {len(table)} rows lack one of them")
        if not points:
            continue
        numeric = all(
            isinstance(p["x"], int | float) and not isinstance(p["x"], bool) for p in points
        )
        x_axis: dict[str, Any] = {"field": "x", "title": x}
        x_axis.update(
            {"type": "quantitative", "scale": {"zero": False, "padding": 24}}
            if numeric
            else {"type": "ordinal"}
        )
        spec = {
            "data": {"values": points},
            "width": 2 * PANEL_WIDTH,
            "height": PANEL_HEIGHT + 80,
            "encoding": {
                "x": x_axis,
                "y": {
                    "field": "y",
                    "type": "quantitative",
                    "title": y,
                    "scale": {"zero": False, "padding": 24},
                },
            },
            "layer": [  # a dot per row, named beside it
                {
                    "mark": {
                        "type": "point",
                        "filled": True,
                        "opacity": 1,
                        "size": 80,
                        "tooltip": True,
                    },
                    "encoding": {
                        "tooltip": [
                            {"field": "row"},
                            {"field": "x", "title": x},
                            {"field": "y", "title": y},
                        ]
                    },
                },
                {
                    "mark": {"type": "text", "align": "left", "dx": 8, "color": "#555"},
                    "encoding": {"text": {"field": "row"}},
                },
            ],
        }
        note = f"{len(points)} rows of the experiment table"
        charts.append(Chart(f"{y} against {x}", note, _slug(f"{y}-vs-{x}"), spec))
    return charts


def _check_known(option: str, name: str, known: Sequence[str], what: str) -> None:
    names = list(dict.fromkeys(known))
    if name not in names:
        raise UsageError(
            f"{option} {name}: no experiment row has that {what}" + did_you_mean(name, names)
        )


def _unique(slugs: Iterable[str]) -> list[str]:
    """The slugs with `-2`, `-3`... added to repeats (`a/b.csv` and `a_b.csv` share one)."""
    seen: set[str] = set()
    result: list[str] = []
    for slug in slugs:
        unique, n = slug, 1
        while unique in seen:
            n += 1
            unique = f"{slug}-{n}"
        seen.add(unique)
        result.append(unique)
    return result


def _slug(text: str) -> str:
    return _SLUG.sub("_", text.replace("/", "_")).strip("_") or "plot"


# -- drawing and writing ----------------------------------------------------------


def make_report(pipeline: Pipeline, request: PlotRequest) -> Report:
    """Draw what `request` asks for and write the page and its PNGs; UsageError if nothing."""
    notes: list[str] = []
    if request.x is not None:
        table = chosen_rows(pipeline, request.rows)
        charts = param_charts(table, request.x, request.y, notes)
        if not charts:
            raise UsageError(
                f"--x {request.x} --y {','.join(request.y)}: no row has both"
                " (see `mlbuild exp show`)"
            )
    else:
        if not any(t.plots for t in pipeline.targets.values()):
            raise UsageError(
                f"{pipeline.display_file}: no target declares plots"
                ' (add plots = ["history.csv"] to the target that writes one)'
            )
        if request.rows:
            sources = row_sources(pipeline, chosen_rows(pipeline, request.rows), notes)
        else:
            sources = workspace_sources(pipeline, notes)
        charts = file_charts(sources)
        if not charts:
            raise UsageError("mlbuild plots: nothing to draw: " + "; ".join(notes))
    page = request.output or pipeline.root / DEFAULT_PAGE
    return _write(pipeline, page, charts, tuple(notes))


def _converter() -> Any:
    try:
        import vl_convert  # the plots command alone pays for it (a 33 MB native library)
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    return vl_convert


def _write(
    pipeline: Pipeline, page: Path, charts: Sequence[Chart], notes: tuple[str, ...]
) -> Report:
    vlc = _converter()
    images = [page.with_name(f"{page.stem}-{slug}.png") for slug in _unique(c.slug for c in charts)]
    for path in (page, *images):
        _check_ours(path)
    drawn: list[tuple[Chart, str, Path]] = []
    for chart, image in zip(charts, images, strict=True):
        svg = vlc.vegalite_to_svg(chart.spec)
        png = vlc.vegalite_to_png(chart.spec, scale=PNG_SCALE)
        _write_file(image, mark_png(png))
        drawn.append((chart, svg, image))
    _write_file(page, render_page(pipeline, drawn, notes).encode())
    return Report(page, tuple(images), notes)


def render_page(
    pipeline: Pipeline, drawn: Sequence[tuple[Chart, str, Path]], notes: Sequence[str]
) -> str:
    """The HTML page: a section per chart, its SVG inline as a `data:` image, a link to its PNG."""
    title = f"Plots of {pipeline.root.name}"
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta name="generator" content="{GENERATOR}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;color:#222;background:#fff}"
        "h2{font-size:1.1em;margin-bottom:.2em}.note{color:#666;margin-top:0}"
        "img{max-width:100%;height:auto}section{margin-bottom:2.5em}</style>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">Drawn by <code>mlbuild plots</code> on {when} from '
        f"{html.escape(pipeline.display_file)}.</p>",
    ]
    for note in notes:
        parts.append(f'<p class="note">Left out: {html.escape(note)}</p>')
    for chart, svg, image in drawn:
        data = base64.b64encode(svg.encode()).decode()
        link = html.escape(image.name)
        parts += [
            "<section>",
            f"<h2>{html.escape(chart.title)}</h2>",
            f'<p class="note">{html.escape(chart.note)}</p>',
            f'<img alt="{html.escape(chart.title)}" src="data:image/svg+xml;base64,{data}">',
            f'<p class="note"><a href="{link}">{link}</a></p>',
            "</section>",
        ]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def mark_png(png: bytes) -> bytes:
    """`png` with a tEXt chunk `Software: mlbuild plots` after its header, to know it later."""
    if not png.startswith(_PNG_SIGNATURE):
        raise ValueError("not a PNG")
    (header_length,) = struct.unpack(">I", png[8:12])
    end = 8 + 12 + header_length  # signature, then IHDR: length, type, data, CRC
    chunk = b"tEXt" + _PNG_MARK
    text = struct.pack(">I", len(_PNG_MARK)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return png[:end] + text + png[end:]


def _is_ours(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if path.suffix == ".png":
        return head.startswith(_PNG_SIGNATURE) and _PNG_MARK in head[:256]
    return f'<meta name="generator" content="{GENERATOR}">'.encode() in head


def _check_ours(path: Path) -> None:
    """Refuse to replace a file mlbuild plots did not write (UsageError: nothing is written)."""
    try:
        ours = _is_ours(path)
    except FileNotFoundError:
        return
    except IsADirectoryError:
        ours = False
    except OSError as exc:
        raise UsageError(
            f"mlbuild plots: cannot check {display_path(path)}: {exc.strerror}"
        ) from None
    if not ours:
        raise UsageError(
            f"mlbuild plots: {display_path(path)} exists and was not written by mlbuild plots;"
            " not replaced (choose another page with -o)"
        )


def _write_file(path: Path, data: bytes) -> None:
    """Write by temp file and rename: a reader never sees half a page."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temp.write_bytes(data)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
