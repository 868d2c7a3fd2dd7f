"""Markdown tables of bench medians and ratios, and section-wise rewriting of RESULTS.md."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Measurement:
    """Wall-clock samples (seconds) of one tool in one scenario, or why there are none."""

    samples: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def median(self) -> float | None:
        if self.error is not None or not self.samples:
            return None
        return statistics.median(self.samples)


@dataclass(frozen=True)
class Row:
    pipeline: str
    scenario: str
    label: str


Results = dict[tuple[str, str], dict[str, Measurement]]


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    ms = seconds * 1000.0
    if ms >= 10_000:
        return f"{ms / 1000:.1f} s"
    if ms >= 100:
        return f"{ms:.0f} ms"
    return f"{ms:.1f} ms"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "n/a"
    r = a / b
    return f"{r:.3g}x" if r < 100 else f"{r:.0f}x"


def _table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in body)])


def times_table(rows: list[Row], tools: list[str], results: Results, repeat: int) -> str:
    header = ["pipeline", "scenario", *tools]
    body = []
    for row in rows:
        cells = results.get((row.pipeline, row.scenario), {})
        body.append([row.pipeline, row.label] + [_cell(cells.get(t), repeat) for t in tools])
    return _table(header, body)


def _cell(m: Measurement | None, repeat: int) -> str:
    if m is None:
        return "-"
    if m.error is not None:
        return "FAILED"
    text = fmt_ms(m.median)
    return text if len(m.samples) >= repeat else f"{text} (n={len(m.samples)})"


def ratio_table(rows: list[Row], peers: list[str], results: Results, *, inverse: bool) -> str:
    """peer/mlbuild per cell (or mlbuild/peer when `inverse`)."""
    header = ["pipeline", "scenario", *peers]
    body = []
    for row in rows:
        cells = results.get((row.pipeline, row.scenario), {})
        ml = cells.get("mlbuild")
        ml_med = ml.median if ml else None
        out = [row.pipeline, row.label]
        for peer in peers:
            pm = cells.get(peer)
            p_med = pm.median if pm else None
            out.append(_ratio(ml_med, p_med) if inverse else _ratio(p_med, ml_med))
        body.append(out)
    return _table(header, body)


def samples_table(rows: list[Row], tools: list[str], results: Results) -> str:
    header = ["pipeline", "scenario", "tool", "samples (ms)"]
    body = []
    for row in rows:
        cells = results.get((row.pipeline, row.scenario), {})
        for tool in tools:
            m = cells.get(tool)
            if m is None:
                continue
            text = m.error if m.error else ", ".join(f"{s * 1000:.1f}" for s in m.samples)
            body.append([row.pipeline, row.label, tool, text.replace("|", "\\|")])
    return _table(header, body)


def replace_section(path: Path, heading: str, body: str, title: str) -> None:
    """Rewrite only the `## heading` section of a markdown file, keeping the others."""
    text = path.read_text() if path.exists() else f"# {title}\n"
    lines = text.splitlines()
    marker = f"## {heading}"
    new_section = [marker, "", *body.rstrip("\n").splitlines(), ""]
    try:
        start = next(i for i, ln in enumerate(lines) if ln.strip() == marker)
    except StopIteration:
        while lines and not lines[-1].strip():
            lines.pop()
        lines += ["", *new_section]
    else:
        end = next(
            (j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")),
            len(lines),
        )
        lines[start:end] = new_section
    path.write_text("\n".join(lines).rstrip("\n") + "\n")
