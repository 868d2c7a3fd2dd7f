"""The live view on a terminal: what it draws, its estimate, and that a no-op never loads rich."""

from __future__ import annotations

import io
import os
import pty
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from rich.console import Console

from mlbuild.build.results import BuildPlan, BuildResult, Failure, Outcome, TargetResult
from mlbuild.staleness import Decision
from mlbuild.ui.progress import LiveReporter, estimate_remaining

CHAIN = {"prepare": (), "train": ("prepare",), "evaluate": ("train",)}
NEVER = Decision(False, ("never built",))


class Clock:
    """Monotonic seconds the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def recording_console() -> Console:
    return Console(
        record=True, file=io.StringIO(), force_terminal=True, width=100, color_system=None
    )


def live(
    clock: Clock, *, verbose: bool = False, err: io.StringIO | None = None
) -> tuple[LiveReporter, Console]:
    console = recording_console()
    reporter = LiveReporter(
        console.file,  # type: ignore[arg-type]
        err or io.StringIO(),
        verbose=verbose,
        console=console,
        clock=clock,
        auto_refresh=False,
    )
    return reporter, console


def final_screen(raw: str) -> list[str]:
    """The lines a terminal is left showing after `raw`: a small emulator of the
    cursor moves and erasures that rich's live display uses (colors ignored)."""
    rows, y, x = [""], 0, 0
    for token in re.split(r"(\x1b\[[0-9;?]*[A-Za-z]|\r\n|\n|\r)", raw):
        if token in ("\n", "\r\n"):
            y, x = y + 1, 0
            if y == len(rows):
                rows.append("")
        elif token == "\r":
            x = 0
        elif token.startswith("\x1b["):
            if token[-1] == "A":
                y = max(0, y - int(token[2:-1] or 1))
            elif token[-1] == "K":
                rows[y] = "" if token[2:-1] == "2" else rows[y][:x]
        elif token:
            row = rows[y].ljust(x)
            rows[y] = row[:x] + token + row[x + len(token) :]
            x += len(token)
    while rows and not rows[-1].strip():
        rows.pop()
    return rows


def drawn(renderable: object) -> str:
    """What a terminal shows for one frame of the live area."""
    console = recording_console()
    console.print(renderable)
    return console.export_text()


def test_live_area_shows_done_of_total_running_steps_and_time_left() -> None:
    clock = Clock()
    reporter, _ = live(clock)
    durations = {"prepare": 1.0, "train": 5.0, "evaluate": 2.0}
    reporter.planned(BuildPlan(tuple(CHAIN), CHAIN, 1, durations))
    reporter.skipped("prepare", Decision(True))
    reporter.started("train", Decision(False, ("param epochs changed 1 -> 2",)), "python t.py")
    clock.now += 3.0
    frame = drawn(reporter.view())
    assert "1/3 targets · 3.0s elapsed · about 4.0s left" in frame
    assert re.search(r"train +3\.0s of ~5\.0s +param epochs changed 1 -> 2", frame), frame
    reporter.close()


def test_estimate_is_a_lower_bound_when_a_target_has_no_history() -> None:
    clock = Clock()
    reporter, _ = live(clock)
    reporter.planned(BuildPlan(tuple(CHAIN), CHAIN, 1, {"evaluate": 2.0}))
    reporter.skipped("prepare", Decision(True))
    reporter.started("train", NEVER, "python t.py")
    clock.now += 1.5
    frame = drawn(reporter.view())
    assert "1/3 targets · 1.5s elapsed · at least 2.0s left" in frame
    assert re.search(r"train +1\.5s +never built", frame), frame
    reporter.close()


def test_estimate_follows_the_longest_chain_and_shares_work_over_jobs() -> None:
    deps = {"a": (), "b": ("a",), "c": ("b",), "x": (), "y": ()}
    durations = {"a": 1.0, "b": 2.0, "c": 3.0, "x": 4.0, "y": 4.0}
    plan = BuildPlan(tuple(deps), deps, 1, durations)
    # a done, b running for 0.5 s: chain b..c = 1.5 + 3 = 4.5; alone on one slot,
    # everything left (1.5 + 3 + 4 + 4) must be done one after the other.
    one = estimate_remaining(plan, {"a"}, {"b": 0.5})
    assert one is not None and one.complete
    assert one.seconds == pytest.approx(12.5)
    four = estimate_remaining(BuildPlan(tuple(deps), deps, 4, durations), {"a"}, {"b": 0.5})
    assert four is not None and four.seconds == pytest.approx(4.5)
    # A step running longer than last time is not counted below zero.
    late = estimate_remaining(plan, {"a", "x", "y"}, {"b": 9.0})
    assert late is not None and late.seconds == pytest.approx(3.0)
    assert estimate_remaining(plan, set(deps), {}) is None


def test_log_above_the_live_area_reads_like_the_plain_log() -> None:
    clock = Clock()
    reporter, console = live(clock)
    plan = BuildPlan(tuple(CHAIN), CHAIN, 1, {"prepare": 30.0, "train": 60.0})
    reporter.planned(plan)
    reporter.skipped("prepare", Decision(True, compared="same action"))
    reporter.started("train", Decision(False, ("input changed: data.csv",)), "python t.py")
    reporter.output("train", b"epoch 1\r\nepoch")
    reporter.output("train", b" 2\n 10%\r 50%\r100%\n\x1b[32mdone\x1b[0m")
    clock.now += 5.0
    reporter.finished("train", 5.0)
    reporter.started("evaluate", NEVER, "python e.py")
    reporter.finished("evaluate", 0.25)
    results = (
        TargetResult("prepare", Outcome.SKIPPED, duration=0.001),
        TargetResult("train", Outcome.RAN, duration=5.0),
        TargetResult("evaluate", Outcome.RAN, duration=0.25),
    )
    reporter.summary(BuildResult(results, 5.3), {"prepare": 30.0, "train": 5.0, "evaluate": 0.25})
    # Fresh targets are counted, not listed; why a step runs shows beside it while it
    # runs, and the live area is gone once the build is over.
    assert final_screen(console.file.getvalue()) == [  # type: ignore[attr-defined]
        "epoch 1",
        "epoch 2",
        "100%",
        "done",
        "Step `train` has finished in 5.000s.",
        "Step `evaluate` has finished in 0.250s.",
        "mlbuild: 1 skipped, 2 ran in 5.300s (saved 30.0s by skipping).",
    ]


def test_verbose_adds_reasons_and_commands() -> None:
    clock = Clock()
    reporter, console = live(clock, verbose=True)
    reporter.planned(BuildPlan(tuple(CHAIN), CHAIN, 1, {}))
    reporter.skipped("prepare", Decision(True, compared="same action, 1 inputs"))
    reporter.started("train", Decision(False, ("input changed: data.csv",)), "python t.py")
    reporter.finished("train", 1.0)
    reporter.close()
    assert final_screen(console.file.getvalue()) == [  # type: ignore[attr-defined]
        "Step `prepare` is up to date (skipped): same action, 1 inputs.",
        "Step `train` has started: input changed: data.csv.",
        "  $ python t.py",
        "Step `train` has finished in 1.000s.",
    ]


def test_failures_go_to_stderr_when_it_is_not_the_terminal() -> None:
    clock = Clock()
    err = io.StringIO()
    reporter, console = live(clock, err=err)
    reporter.planned(BuildPlan(("train",), {"train": ()}, 1, {}))
    reporter.started("train", NEVER, "python t.py")
    failure = Failure("train", "python t.py", "exit code 3", Path("logs/train.log"), ("boom",))
    reporter.failed(failure, 0.5)
    reporter.summary(BuildResult((TargetResult("train", Outcome.FAILED),), 0.6, (failure,)))
    assert err.getvalue() == (
        "Step `train` failed after 0.500s: exit code 3.\n"
        "  command: python t.py\n"
        "  last lines of its output:\n"
        "    boom\n"
        "  full log: logs/train.log\n"
        "mlbuild: 1 failed in 0.600s. Failed: train.\n"
    )
    assert "failed" not in console.export_text()


PIPELINE = """
[targets.prepare]
cmd = "sleep 0.1; echo prepared > {outputs.p}"
outputs = { p = "p.txt" }

[targets.train]
cmd = "echo training; sleep 0.6; cat {inputs.p} > {outputs.m}"
inputs = { p = "p.txt" }
outputs = { m = "m.txt" }
"""


def on_terminal(cwd: Path, *args: str, script: str | None = None) -> str:
    """Run mlbuild (or a Python script) with stdout and stderr on a pseudo-terminal."""
    argv = [sys.executable, "-c", script] if script else [sys.executable, "-m", "mlbuild", *args]
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TERM")}
    env.update(TERM="xterm", COLUMNS="100", LINES="30")
    leader, follower = pty.openpty()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=follower, stderr=follower)
    os.close(follower)
    seen = bytearray()
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait(timeout=60) == 0, seen.decode(errors="replace")
    os.close(leader)
    return seen.decode("utf-8", "replace")


def test_run_on_a_terminal_draws_progress_and_then_its_summary(tmp_path: Path) -> None:
    (tmp_path / "pipeline.toml").write_text(PIPELINE)
    first = on_terminal(tmp_path, "run", "-j", "1")
    assert re.search(r"\d/2 targets · [\d.]+s elapsed", first), first
    lines = final_screen(first)
    assert lines[0] == "Step `prepare` has finished in " + lines[0].split()[-1]
    assert lines[1] == "training"
    assert re.fullmatch(r"Step `train` has finished in [\d.]+s\.", lines[2])
    assert re.fullmatch(r"mlbuild: 2 ran in [\d.]+s\.", lines[3])
    assert len(lines) == 4
    # The live area shows the time the step took last time, and why it runs.
    second = on_terminal(tmp_path, "run", "-j", "1", "--force", "train")
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", second)
    assert re.search(r"train +[\d.]+s of ~[\d.]+s +forced", shown), shown
    assert re.fullmatch(
        r"mlbuild: 1 skipped, 1 ran in [\d.]+s \(saved [\d.]+s by skipping\)\.",
        final_screen(second)[-1],
    )


def test_quiet_and_plain_on_a_terminal_draw_no_live_area(tmp_path: Path) -> None:
    (tmp_path / "pipeline.toml").write_text(PIPELINE)
    quiet = final_screen(on_terminal(tmp_path, "run", "-q"))
    assert len(quiet) == 1 and re.fullmatch(r"mlbuild: 2 ran in [\d.]+s\.", quiet[0]), quiet
    plain_log = on_terminal(tmp_path, "run", "--plain", "--force", "train")
    assert "\x1b[" not in plain_log
    assert "Step `prepare` is up to date (skipped).\r\n" in plain_log
    assert "Step `train` has started: forced.\r\n" in plain_log


def test_no_op_on_a_terminal_prints_the_summary_without_importing_rich(tmp_path: Path) -> None:
    (tmp_path / "pipeline.toml").write_text(PIPELINE)
    on_terminal(tmp_path, "run", "--plain")
    script = textwrap.dedent(
        """
        import sys
        from mlbuild.cli import main
        code = main(["run"])
        loaded = sorted(m for m in sys.modules if m == "rich" or m.startswith("rich."))
        print("rich modules:", loaded)
        sys.exit(code)
        """
    )
    screen = on_terminal(tmp_path, script=script)
    assert "rich modules: []" in screen
    assert "\x1b[" not in screen  # nothing was drawn: plain text only
    assert re.search(
        r"^mlbuild: 2 skipped in [\d.]+s \(saved [\d.]+s by skipping\)\.\r$", screen, re.M
    )


def test_a_chatty_step_is_drawn_in_few_frames_and_its_output_kept_whole() -> None:
    """Output is queued and written with the next frame, not one frame per chunk; the
    log still ends with every line in order, the last state of a progress line, and the
    unfinished last line, with colors kept and cursor moves dropped."""
    clock = Clock()
    console = Console(
        record=True, file=io.StringIO(), force_terminal=True, width=100, color_system="standard"
    )
    reporter = LiveReporter(
        console.file,  # type: ignore[arg-type]
        io.StringIO(),
        prefix=True,
        console=console,
        clock=clock,
        auto_refresh=False,
    )
    reporter.planned(BuildPlan(("train",), {"train": ()}, 2, {}))
    reporter.started("train", NEVER, "python t.py")
    for i in range(400):  # 2,000 lines in 400 chunks, lines split across chunks
        reporter.output("train", b"".join(b"line %d\n" % (i * 5 + k) for k in range(5))[:-3])
        reporter.output("train", b"".join(b"line %d\n" % (i * 5 + k) for k in range(5))[-3:])
    reporter.output("train", b"epoch 1 10%\r epoch 1 100%\r\n\x1b[1A\x1b[2K\x1b[31mred\x07\n")
    reporter.output("train", b"no newline at the end")
    reporter.finished("train", 2.0)
    reporter.summary(BuildResult((TargetResult("train", Outcome.RAN, duration=2.0),), 2.1))
    raw = console.file.getvalue()  # type: ignore[attr-defined]
    assert raw.count("targets · ") <= 4  # frames of the live area: one per chunk before
    assert "\x1b[31mred\x1b[0m" in raw and "\x07" not in raw
    assert final_screen(raw) == [
        *(f"line {n}" for n in range(2000)),  # one step running: no prefixes
        " epoch 1 100%",
        "red",
        "no newline at the end",
        "Step `train` has finished in 2.000s.",
        "mlbuild: 1 ran in 2.100s.",
    ]


CHATTY = """
[targets.talk]
cmd = "seq 1 30000 && echo done > {outputs.d}"
outputs = { d = "done.txt" }
"""


def test_a_chatty_step_on_a_terminal_leaves_its_whole_output_and_the_summary(
    tmp_path: Path,
) -> None:
    (tmp_path / "pipeline.toml").write_text(CHATTY)
    lines = final_screen(on_terminal(tmp_path, "run", "-j", "1"))
    assert lines[:30000] == [str(n) for n in range(1, 30001)]
    assert re.fullmatch(r"Step `talk` has finished in [\d.]+s\.", lines[30000]), lines[30000:]
    assert re.fullmatch(r"mlbuild: 1 ran in [\d.]+s\.", lines[30001])
    assert len(lines) == 30002


def test_live_area_counts_the_points_of_a_matrix_target() -> None:
    clock = Clock()
    reporter, _ = live(clock)
    points = tuple(f"train@lr={i}" for i in range(100))
    reporter.planned(BuildPlan(("prep", *points), {p: () for p in ("prep", *points)}, 2, {}))
    reporter.skipped("prep", Decision(True))
    for point in points[:37]:
        reporter.skipped(point, Decision(True))
    reporter.started(points[37], NEVER, "echo")
    reporter.started(points[38], NEVER, "echo")
    frame = drawn(reporter.view())
    assert re.search(r"train +37/100 points · 2 running", frame), frame
    assert "38/101 targets" in frame
    reporter.close()
