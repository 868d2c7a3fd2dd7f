"""`plots = [...]` and `mlbuild plots`, through the real CLI on a small project.

The page is opened in a real headless Chromium (Debian's package; .ci/run
installs it) and its screenshot decoded by hand (zlib and the PNG filters
below): the charts' own line colour must be on screen, not just the headings.
The PNGs written beside the page are decoded the same way.
"""

from __future__ import annotations

import base64
import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from tests.conftest import Project

CHROMIUM = "/usr/bin/chromium"
# Vega-Lite's first two category colours (its default "tableau10" scheme): a chart's one
# line, or the first and second experiment row of an overlay.
BLUE = (0x4C, 0x78, 0xA8)
ORANGE = (0xF5, 0x85, 0x18)

TRAIN = """\
    import json, math, os, sys
    rate = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    os.makedirs("eval", exist_ok=True)
    with open("eval/history.csv", "w") as f:
        f.write("epoch,loss,accuracy,note\\n")
        for e in range(8):
            f.write(f"{e},{2 * math.exp(-e / rate):.4f},{1 - 0.5 * math.exp(-e / rate):.4f},ok\\n")
    with open("eval/steps.json", "w") as f:
        json.dump([{"lr": 0.1 / (s + 1), "grad_norm": 5 - s} for s in range(5)], f)
"""

PIPELINE = """\
    [targets.train]
    cmd = "python3 train.py"
    inputs = ["train.py"]
    outputs = ["eval/history.csv"]
    plots = ["eval/history.csv", "eval/steps.json"]
"""


class Image(NamedTuple):
    width: int
    height: int
    pixels: np.ndarray  # height x width x RGB (alpha dropped), as int16


def decode_png(data: bytes) -> Image:
    """An 8-bit RGB or RGBA, non-interlaced PNG (what Chromium and vl-convert write)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, []
    width = height = ctype = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        if kind == b"IHDR":
            width, height, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert (depth, interlace) == (8, 0) and ctype in (2, 6), (depth, ctype, interlace)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    raw = zlib.decompress(b"".join(idat))
    bpp = 3 if ctype == 2 else 4
    stride = width * bpp
    assert len(raw) == height * (stride + 1)
    prev = np.zeros(stride, dtype=np.uint8)
    rows: list[np.ndarray] = []
    for y in range(height):
        start = y * (stride + 1)
        kind_ = raw[start]
        line = np.frombuffer(raw, dtype=np.uint8, count=stride, offset=start + 1).copy()
        if kind_ == 1:  # Sub: a running sum along the row, per channel, modulo 256
            line = (
                (np.cumsum(line.reshape(-1, bpp), axis=0, dtype=np.uint64) % 256)
                .astype(np.uint8)
                .reshape(-1)
            )
        elif kind_ == 2:  # Up
            line = line + prev  # uint8 wraps modulo 256
        elif kind_ in (3, 4):  # Average and Paeth depend on the byte just decoded: one by one
            out = bytearray(line.tobytes())
            up = prev.tolist()
            for i in range(stride):
                a = out[i - bpp] if i >= bpp else 0
                b = up[i]
                if kind_ == 3:
                    out[i] = (out[i] + ((a + b) >> 1)) & 255
                    continue
                c = up[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                out[i] = (out[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
            line = np.frombuffer(bytes(out), dtype=np.uint8)
        else:
            assert kind_ == 0, f"filter {kind_}"
        rows.append(line)
        prev = line
    pixels = np.stack(rows).reshape(height, width, bpp)[:, :, :3].astype(np.int16)
    return Image(width, height, pixels)


def count_near(image: Image, colour: tuple[int, int, int], tolerance: int = 24) -> int:
    """Pixels within `tolerance` of `colour` in each channel (anti-aliasing blends edges)."""
    close = np.abs(image.pixels - np.array(colour, dtype=np.int16)) <= tolerance
    return int(close.all(axis=2).sum())


def non_white(image: Image) -> int:
    return int((image.pixels.min(axis=2) < 245).sum())


def screenshot(page: Path, tmp_path: Path) -> Image:
    """The page as headless Chromium draws it in a 1200x900 window, from a file:// URL."""
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium package")
        pytest.skip(f"no {CHROMIUM} (apt-get install -y chromium)")
    shot = tmp_path / "screenshot.png"
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,900",
            page.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return decode_png(shot.read_bytes())


def make_project(project: Project) -> None:
    project.write("train.py", TRAIN)
    project.pipeline(PIPELINE)


def svgs(page: Path) -> list[str]:
    """The charts of a page: the SVG documents inside its `data:` images."""
    found = re.findall(r'src="data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)"', page.read_text())
    return [base64.b64decode(data).decode() for data in found]


def test_page_opens_offline_in_chromium_with_its_charts_drawn(
    project: Project, tmp_path: Path
) -> None:
    make_project(project)
    assert project.run("run").code == 0
    result = project.run("plots")
    assert result.code == 0, result
    assert result.out.startswith("mlbuild plots: wrote ")
    assert result.out.endswith("/mlbuild_plots/index.html and 2 PNGs beside it\n")
    assert result.err == ""
    folder = project.root / "mlbuild_plots"
    page = folder / "index.html"
    assert sorted(p.name for p in folder.iterdir()) == [
        "index-eval_history.csv.png",
        "index-eval_steps.json.png",
        "index.html",
    ]
    text = page.read_text()
    # Nothing to fetch: no URL at all in the page, no script, no stylesheet link.
    assert "http:" not in text and "https:" not in text
    assert "<script" not in text and "<link" not in text and "@import" not in text
    history, steps = svgs(page)
    # One panel per numeric column (the text column `note` is not drawn), x from `epoch`.
    for title in (">loss<", ">accuracy<", ">epoch<"):
        assert title in history
    assert ">note<" not in history
    # JSON records with no step or epoch column: x is the row number.
    for title in (">lr<", ">grad_norm<", ">row<"):
        assert title in steps

    shown = screenshot(page, tmp_path)
    assert (shown.width, shown.height) == (1200, 900)
    assert non_white(shown) > 0.01 * 1200 * 900
    assert count_near(shown, BLUE) > 400, "no chart line on screen"

    for name in ("index-eval_history.csv.png", "index-eval_steps.json.png"):
        image = decode_png((folder / name).read_bytes())
        assert 600 <= image.width <= 3000 and 300 <= image.height <= 2000, image[:2]
        assert count_near(image, BLUE) > 1000
        assert non_white(image) < 0.5 * image.width * image.height  # a chart, not a smear


def test_a_plot_file_is_an_output_of_its_target(project: Project) -> None:
    """steps.json is not in `outputs`, yet the step fails when it does not write it."""
    project.write(
        "train.py",
        "import os; os.makedirs('eval', exist_ok=True)\n"
        "open('eval/history.csv', 'w').write('epoch,loss\\n0,1\\n')\n",
    )
    project.pipeline(PIPELINE)
    result = project.run("run")
    assert result.code == 1
    assert "eval/steps.json" in result.out + result.err


def test_python_step_with_named_outputs_and_a_further_plot_file(project: Project) -> None:
    """The plot file joins named outputs unnamed: the function is not given it, and runs."""
    project.write(
        "steps.py",
        """\
        from pathlib import Path

        def train(model: Path) -> None:
            model.write_text("weights")
            Path("history.tsv").write_text("step\\tloss\\n1\\t0.5\\n2\\t0.25\\n")
        """,
    )
    project.pipeline(
        """\
        [targets.train]
        python = "steps:train"
        outputs = { model = "model.txt" }
        plots = ["history.tsv"]
        """
    )
    result = project.run("run")
    assert result.code == 0, result
    assert (project.root / "history.tsv").exists()
    assert project.run("plots").code == 0
    (chart,) = svgs(project.root / "mlbuild_plots" / "index.html")
    assert ">step<" in chart and ">loss<" in chart


@pytest.mark.parametrize(
    ("plots", "needle"),
    [
        ('["eval/history.xlsx"]', "'eval/history.xlsx': unknown plot format"),
        ('["eval/*.csv"]', "plot files cannot be glob patterns"),
        ('["../history.csv"]', "leaves the project"),
        ('"eval/a.csv"', None),  # a single string is fine, as for outputs
    ],
)
def test_bad_plots_key_is_one_line_naming_file_target_and_key(
    project: Project, plots: str, needle: str | None
) -> None:
    project.pipeline(
        f"""\
        [targets.train]
        cmd = "true"
        plots = {plots}
        """
    )
    result = project.run("list")
    if needle is None:
        assert result.code == 0, result
        return
    assert result.code == 2
    assert result.out == ""
    (line,) = result.err.splitlines()
    assert "pipeline.toml: targets.train.plots: " in line and needle in line, line


def test_without_vl_convert_it_says_what_to_install(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_project(project)
    assert project.run("run").code == 0
    monkeypatch.setitem(sys.modules, "vl_convert", None)  # import raises ImportError
    result = project.run("plots")
    assert result.code == 2
    assert result.err == (
        "mlbuild: error: mlbuild plots needs vl-convert-python: pip install 'mlbuild[plots]'\n"
    )
    assert not (project.root / "mlbuild_plots").exists()


def test_a_file_it_did_not_write_is_never_replaced(project: Project) -> None:
    make_project(project)
    assert project.run("run").code == 0
    mine = project.write("report/index.html", "<html>my own notes</html>\n")
    result = project.run("plots", "-o", str(mine))
    assert result.code == 2
    assert "report/index.html exists and was not written by mlbuild plots" in result.err
    assert mine.read_text() == "<html>my own notes</html>\n"
    assert sorted(p.name for p in mine.parent.iterdir()) == ["index.html"]
    # Its own page and PNGs it replaces: a second run over the first is fine.
    page = project.root / "report" / "plots.html"
    assert project.run("plots", "-o", str(page)).code == 0
    assert project.run("plots", "-o", str(page)).code == 0
    # A PNG of the user's where one would go: refused, and the page is not written either.
    png = project.root / "report" / "other-eval_steps.json.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\nnot mine to replace")
    result = project.run("plots", "-o", str(project.root / "report" / "other.html"))
    assert result.code == 2 and "other-eval_steps.json.png exists" in result.err
    assert not (project.root / "report" / "other.html").exists()


def test_an_unreadable_plot_file_is_left_out_with_one_line(project: Project) -> None:
    project.write(
        "train.py",
        "import os; os.makedirs('eval', exist_ok=True)\n"
        "open('eval/history.csv', 'w').write('epoch,loss\\n0,1\\n1,0.5\\n')\n"
        "open('eval/steps.json', 'w').write('{\"loss\": [1, 2], \"acc\": [1]}')\n",
    )
    project.pipeline(PIPELINE)
    assert project.run("run").code == 0
    result = project.run("plots")
    assert result.code == 0, result
    assert result.err == (
        "mlbuild plots: left out eval/steps.json (target train): not drawn:"
        " an object of lists of different lengths (columns must match)\n"
    )
    assert "1 PNG beside it" in result.out


def test_plots_before_the_first_run_and_without_plots(project: Project) -> None:
    make_project(project)
    result = project.run("plots")
    assert result.code == 2
    (line,) = result.err.splitlines()
    assert "eval/history.csv (target train): not built yet (`mlbuild run train`)" in line
    project.pipeline('[targets.a]\ncmd = "true"\n')
    result = project.run("plots")
    assert result.code == 2
    assert "pipeline.toml: no target declares plots" in result.err


def test_x_without_y_is_a_usage_error(project: Project) -> None:
    make_project(project)
    result = project.run("plots", "--x", "lr")
    assert result.code == 2
    assert result.err == (
        "mlbuild: error: --x PARAM and --y METRIC go together (a metric against a parameter)\n"
    )


def test_no_op_run_imports_nothing_of_plots(project: Project) -> None:
    make_project(project)
    assert project.run("run").code == 0
    found = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mlbuild", "run"],
        cwd=project.root,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        check=True,
    )
    assert "is up to date" in found.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in found.stderr.splitlines()}
    assert not {"mlbuild.plotdata", "mlbuild.ui.plots", "vl_convert", "csv"} & imported


# -- experiment rows: overlays from the cache, metrics against a parameter ------------

SWEEP = """\
    import json, math, os, sys
    rate = float(sys.argv[1])
    os.makedirs("eval", exist_ok=True)
    with open("eval/history.csv", "w") as f:
        # The column's name tells each run apart on the page: loss_r3.0, loss_r1.5, ...
        f.write(f"epoch,loss_r{rate}\\n")
        for e in range(6):
            f.write(f"{e},{2 * math.exp(-e / rate):.4f}\\n")
    with open("eval/metrics.json", "w") as f:
        json.dump({"accuracy": 1 - 0.5 * math.exp(-5 / rate)}, f)
"""

SWEEP_PIPELINE = """\
    [params]
    rate = 3.0

    [targets.train]
    cmd = "python3 train.py {params.rate}"
    inputs = ["train.py"]
    params = ["rate"]
    plots = ["eval/history.csv"]
    metrics = ["eval/metrics.json"]
"""


def sweep(project: Project) -> dict[str, str]:
    """Two rows: rate=3.0 (unnamed) then rate=1.5 named `fast`, which the workspace holds."""
    project.write("train.py", SWEEP)
    project.pipeline(SWEEP_PIPELINE)
    assert project.run("run").code == 0
    assert project.run("run", "--set", "rate=1.5", "--name", "fast").code == 0
    listed = project.run("exp", "show", "--json")
    return {str(row["params"]["rate"]): row["id"] for row in json.loads(listed.out)}


def test_rows_are_overlaid_from_the_cache_and_the_workspace_is_not_touched(
    project: Project,
) -> None:
    ids = sweep(project)
    history = project.root / "eval" / "history.csv"
    before = (history.read_bytes(), history.stat().st_mtime_ns)
    assert b"loss_r1.5" in before[0]  # the workspace holds the second row

    result = project.run("plots", "--rows", f"{ids['3.0']},fast")
    assert result.code == 0, result
    assert result.err == ""
    assert (history.read_bytes(), history.stat().st_mtime_ns) == before
    page = project.root / "mlbuild_plots" / "index.html"
    (chart,) = svgs(page)
    # The first row's file came from the cache: its column is on the page, beside the
    # workspace's, and the legend names both rows (short id, and name).
    assert ">loss_r3.0<" in chart and ">loss_r1.5<" in chart
    assert f">{ids['3.0']}<" in chart and ">fast<" in chart
    assert f"rows {ids['3.0']}, fast" in page.read_text()
    image = decode_png((project.root / "mlbuild_plots" / "index-eval_history.csv.png").read_bytes())
    assert count_near(image, BLUE) > 300 and count_near(image, ORANGE) > 300


def test_a_row_whose_plot_left_the_cache_is_left_out_with_a_note(project: Project) -> None:
    ids = sweep(project)
    # Keep only the entries of what the workspace holds (the row `fast`).
    assert project.run("gc", "--keep-runs", "0").code == 0
    result = project.run("plots", "--rows", f"fast,{ids['3.0']}")
    assert result.code == 0, result
    assert result.err == (
        f"mlbuild plots: left out eval/history.csv (target train) of row {ids['3.0']}:"
        " no longer in the cache\n"
    )
    (chart,) = svgs(project.root / "mlbuild_plots" / "index.html")
    assert ">loss_r1.5<" in chart and ">loss_r3.0<" not in chart


def test_a_metric_against_a_parameter_across_all_rows(project: Project) -> None:
    sweep(project)
    assert project.run("run", "--set", "rate=6.0").code == 0
    result = project.run("plots", "--x", "rate", "--y", "accuracy")
    assert result.code == 0, result
    folder = project.root / "mlbuild_plots"
    assert sorted(p.name for p in folder.iterdir()) == ["index-accuracy-vs-rate.png", "index.html"]
    (chart,) = svgs(folder / "index.html")
    assert ">rate<" in chart and ">accuracy<" in chart and ">fast<" in chart
    image = decode_png((folder / "index-accuracy-vs-rate.png").read_bytes())
    assert count_near(image, BLUE) > 3 * 100  # three dots
    assert "3 rows of the experiment table" in (folder / "index.html").read_text()
    # --rows picks the rows drawn.
    two = project.root / "two.html"
    assert (
        project.run(
            "plots", "--rows", "fast,3.0", "--x", "rate", "--y", "accuracy", "-o", str(two)
        ).code
        == 2
    )  # `3.0` is no row's id or name
    ids = {
        row["params"]["rate"]: row["id"]
        for row in json.loads(project.run("exp", "show", "--json").out)
    }
    result = project.run(
        "plots", "--rows", f"fast,{ids[6.0]}", "--x", "rate", "--y", "accuracy", "-o", str(two)
    )
    assert result.code == 0, result
    assert "2 rows of the experiment table" in two.read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--x", "rat", "--y", "accuracy"),
            "--x rat: no experiment row has that parameter (did you mean 'rate'?)",
        ),
        (
            ("--x", "rate", "--y", "accurcy"),
            "--y accurcy: no experiment row has that metric (did you mean 'accuracy'?)",
        ),
        (
            ("--rows", "nosuchrow"),
            "--rows nosuchrow: no experiment row has that id or name (see `mlbuild exp show`)",
        ),
    ],
)
def test_unknown_rows_params_and_metrics_are_one_line(
    project: Project, args: tuple[str, ...], message: str
) -> None:
    sweep(project)
    result = project.run("plots", *args)
    assert result.code == 2
    assert result.err == f"mlbuild: error: {message}\n"
    assert not (project.root / "mlbuild_plots").exists()


def test_rows_before_any_row_was_recorded(project: Project) -> None:
    project.write("train.py", SWEEP)
    project.pipeline(SWEEP_PIPELINE)
    result = project.run("plots", "--rows", "fast")
    assert result.code == 2
    assert result.err == (
        "mlbuild: error: mlbuild plots: no experiment rows recorded yet (`mlbuild run` first)\n"
    )


def test_a_plot_inside_an_output_directory_is_read_from_the_cached_tree(
    project: Project,
) -> None:
    """`eval/` is the output; the plot file inside it is found in the entry's tree."""
    project.write("train.py", SWEEP)
    project.pipeline(
        """\
        [params]
        rate = 3.0

        [targets.train]
        cmd = "python3 train.py {params.rate}"
        inputs = ["train.py"]
        outputs = ["eval"]
        params = ["rate"]
        plots = ["eval/history.csv"]
        metrics = ["eval/metrics.json"]
        """
    )
    assert project.run("run").code == 0
    assert project.run("run", "--set", "rate=1.5", "--name", "fast").code == 0
    first = json.loads(project.run("exp", "show", "--json").out)[0]["id"]
    result = project.run("plots", "--rows", f"{first},fast")
    assert result.code == 0, result
    assert result.err == ""
    (chart,) = svgs(project.root / "mlbuild_plots" / "index.html")
    assert ">loss_r3.0<" in chart and ">loss_r1.5<" in chart


def test_one_file_both_plot_and_metrics_is_one_output(project: Project) -> None:
    project.write(
        "write.py",
        'import json; json.dump({"loss": [1.0, 0.5], "acc": [0.5, 0.75]}, open("h.json", "w"))\n',
    )
    project.pipeline(
        """\
        [targets.train]
        cmd = "python3 write.py"
        plots = ["h.json"]
        metrics = ["h.json"]
        """
    )
    result = project.run("run")
    assert result.code == 0, result
    assert project.run("plots").code == 0
    (chart,) = svgs(project.root / "mlbuild_plots" / "index.html")
    assert ">loss<" in chart and ">acc<" in chart


def test_two_plot_files_whose_names_flatten_alike_get_two_pngs(project: Project) -> None:
    project.write(
        "write.sh",
        "mkdir -p a && printf 'step,x\\n1,1\\n2,4\\n' > a/b.csv\nprintf 'y\\n3\\n1\\n' > a_b.csv\n",
    )
    project.pipeline(
        """\
        [targets.t]
        cmd = "sh write.sh"
        plots = ["a/b.csv", "a_b.csv"]
        """
    )
    assert project.run("run").code == 0
    result = project.run("plots")
    assert result.code == 0, result
    folder = project.root / "mlbuild_plots"
    assert sorted(p.name for p in folder.iterdir()) == [
        "index-a_b.csv-2.png",
        "index-a_b.csv.png",
        "index.html",
    ]
    first, second = svgs(folder / "index.html")
    assert ">x<" in first and ">y<" in second
