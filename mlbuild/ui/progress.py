"""The live view of a build on a terminal: targets done of total, running steps, time left.

Above a live area that rich redraws in place, the log scrolls with the same
lines as the plain reporter (report.py; both take their words from messages.py)
for what happened: finished, restored, failed, not run, and the steps' own
output. Fresh targets are only counted, and why a step runs is shown beside it
while it runs; `-v` adds both to the log, with each step's command. The live
area, erased when the build ends, holds a bar of targets decided out of those
selected, the elapsed time, an estimate of the time left from the durations the
same targets took last time, and each running step with its elapsed time.

rich is imported only when something is drawn: when a step starts or a line
is printed. A no-op build prints just its summary, as plain text, and pays
nothing for rich (its import costs about as much as deciding 200 targets).

A step's own output is throttled, so that a chatty step costs about what it
costs with `--plain` (50 MB of output took 15x its `--plain` time when every
chunk was styled by rich and redrawn under the live area). Its complete lines
are made safe for the terminal here, with plain string operations (a progress
bar's carriage returns reduced to its last state, colors kept, cursor moves
and other control codes dropped, so nothing the step prints can move the live
area), and queued. The queue is written above the live area, in one write
and one redraw, by a ticker thread four times a second, before any line of
mlbuild's own, when it holds `_FLUSH_BYTES`, and when the build ends. Every
write to the terminal happens under `_draw_lock`, which is taken before rich's
own locks, so the queue always reaches the terminal in order.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple, TextIO

from mlbuild.build.results import BuildPlan, BuildResult, Failure
from mlbuild.staleness import Decision
from mlbuild.ui import messages
from mlbuild.ui.report import format_duration, summary_line

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, RenderableType
    from rich.live import Live
    from rich.segment import Segment

MAX_ROWS = 8  # running steps listed in the live area; more are counted
REFRESH_SECONDS = 0.25  # the ticker: the clocks in the live area, and queued output
_MAX_PARTIAL = 64 * 1024  # a step's unfinished line is shown once it grows this long
_FLUSH_BYTES = 1 << 22  # queued output written at once when it grows this large
# Escape sequences: CSI (colors are `m`; the rest move the cursor or erase), OSC,
# two-character ones, and a lone ESC. Kept: SGR (colors) only, when shown. Compiled
# on first use (by re's cache), not on the no-op path.
_ESCAPE = r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_]|)"
# What rich's Text drops as well: bell, backspace, vertical tab, form feed.
_CONTROL = b"\x07\x08\x0b\x0c"
_RESET = "\x1b[0m"


class Estimate(NamedTuple):
    """Seconds until the build ends; a lower bound when `complete` is False."""

    seconds: float
    complete: bool  # False: some remaining target has no recorded duration

    def describe(self) -> str:
        if not self.complete:
            return f"at least {format_duration(self.seconds)} left" if self.seconds >= 1 else ""
        if self.seconds < 1:
            return "under 1s left"
        return f"about {format_duration(self.seconds)} left"


def estimate_remaining(
    plan: BuildPlan, done: set[str], running: Mapping[str, float]
) -> Estimate | None:
    """Time until the build ends, by the durations the remaining targets took last time.

    `running` maps each running target to its elapsed time. Targets not yet
    decided are counted as if they will run: the runner decides a target as
    soon as everything it needs is done, so an undecided target waits on a
    running one and runs unless that one's outputs come out unchanged. The
    estimate is the longest chain of remaining durations through the graph,
    but no less than the remaining work shared over `-j` slots. None when
    nothing remains.
    """
    finish: dict[str, float] = {}
    work = 0.0
    complete = True
    for name in plan.targets:
        if name in done:
            continue
        last = plan.durations.get(name)
        if last is None:
            complete = False
        if name in running:
            left = max(0.0, last - running[name]) if last is not None else 0.0
            begin = 0.0
        else:
            left = last or 0.0
            begin = max((finish.get(dep, 0.0) for dep in plan.deps.get(name, ())), default=0.0)
        finish[name] = begin + left
        work += left
    if not finish:
        return None
    return Estimate(max(max(finish.values()), work / max(1, plan.jobs)), complete)


class LiveReporter:
    """The terminal's view of a build (see the module docstring); `mlbuild run` on a TTY.

    `console` replaces the rich console made on first use (tests pass one
    that records); `clock` gives monotonic seconds for elapsed times.
    """

    def __init__(
        self,
        out: TextIO | None = None,
        err: TextIO | None = None,
        *,
        verbose: bool = False,
        explain: bool = False,
        prefix: bool = False,
        console: Console | None = None,
        clock: Callable[[], float] = time.monotonic,
        auto_refresh: bool = True,
    ) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.verbose = verbose
        self.explain = explain or verbose
        self.prefix = prefix
        self.clock = clock
        self.auto_refresh = auto_refresh
        self.plan = BuildPlan((), {})
        self.matrices: dict[str, int] = {}  # a matrix target in the plan -> its points there
        self.began = clock()
        self.done: set[str] = set()
        self.running: dict[str, tuple[float, str]] = {}  # target -> (start, why it runs)
        self.partial: dict[str, bytes] = {}
        self._console = console
        self._live: Live | None = None
        # The state the live area shows; read by the ticker thread while events arrive here.
        self._lock = threading.Lock()
        # Every write to the terminal; taken before rich's own locks (see the module docstring).
        self._draw_lock = threading.RLock()
        self._queued: list[tuple[str, bytes]] = []  # complete lines of steps' output
        self._queued_bytes = 0
        self._queue_lock = threading.Lock()
        self._ticker: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- the Reporter protocol ------------------------------------------------

    def planned(self, plan: BuildPlan) -> None:
        with self._lock:
            self.plan = plan
            self.began = self.clock()
            self.matrices = _matrices(plan.targets)

    def skipped(self, target: str, decision: Decision) -> None:
        self._decided(target)
        if self.explain:
            self._print(messages.step_skipped(target, decision.compared), "dim")

    def started(self, target: str, decision: Decision, command: str) -> None:
        with self._lock:
            self.running[target] = (self.clock(), "; ".join(decision.reasons))
        if self.verbose:
            self._print(messages.step_started(target, decision.reasons))
            self._print(messages.step_command(command), "dim")
        self._start_live()

    def output(self, target: str, data: bytes) -> None:
        data = self.partial.pop(target, b"") + data
        cut = data.rfind(b"\n") + 1
        lines, rest = data[:cut], data[cut:]
        if len(rest) > _MAX_PARTIAL:
            lines, rest = data + b"\n", b""
        elif rest:
            self.partial[target] = rest
        if lines:
            self._queue_output(target, lines)

    def finished(self, target: str, duration: float) -> None:
        self._flush_partial(target)
        self._decided(target)
        self._print(messages.step_finished(target, duration), "green")

    def restored(
        self, target: str, duration: float, original_run: float, *, source: str = "cache"
    ) -> None:
        self._decided(target)
        self._print(messages.step_restored(target, duration, original_run, source), "cyan")

    def failed(self, failure: Failure, duration: float) -> None:
        self._flush_partial(failure.target)
        self._decided(failure.target)
        self._error("\n".join(messages.step_failed(failure, duration)))

    def not_run(self, target: str, because: str) -> None:
        self._decided(target)
        self._print(messages.step_not_run(target, because), "yellow")

    def interrupted(self, target: str, duration: float) -> None:
        self._flush_partial(target)
        self._decided(target)
        self._print(messages.step_interrupted(target, duration), "yellow")

    def would_run(self, target: str, reasons: Sequence[str]) -> None:
        self._decided(target)
        self._print(messages.step_would_run(target, reasons))

    def would_restore(self, target: str, reasons: Sequence[str]) -> None:
        self._decided(target)
        self._print(messages.step_would_restore(target, reasons), "cyan")

    def warn(self, message: str) -> None:
        self._error(messages.warning(message), style="yellow")

    def summary(self, result: BuildResult, recorded: Mapping[str, float] | None = None) -> None:
        self.close()
        line = summary_line(result, recorded)
        if result.failures:
            self._error(messages.summary_with_failures(line, result.failures), style="bold red")
        elif self._console is None:
            self.out.write(line + "\n")  # nothing was drawn: rich stays unimported
            self.out.flush()
        else:
            self._print(line, "bold")

    def close(self) -> None:
        """Write what output is queued, erase the live area, give the terminal back (Ctrl-C too)."""
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            self._stopping.set()
            ticker.join()
        with self._draw_lock:
            try:
                self._draw()
            finally:
                if self._live is not None:
                    live, self._live = self._live, None
                    live.stop()

    # -- the live area --------------------------------------------------------

    def view(self) -> RenderableType:
        """The live area as of now: the bar, counts and times, then the running steps."""
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        with self._lock:
            now = self.clock()
            plan = self.plan
            done = set(self.done)
            running = dict(self.running)
        total = len(plan.targets) or len(done) + len(running)
        elapsed = {name: now - start for name, (start, _) in running.items()}
        estimate = estimate_remaining(plan, done, elapsed)
        facts = [f"{len(done)}/{total} targets", f"{_ticking(now - self.began)} elapsed"]
        if estimate is not None and estimate.describe():
            facts.append(estimate.describe())
        head = Table.grid(padding=(0, 1))
        head.add_row(
            ProgressBar(total=max(total, 1), completed=len(done), width=30), Text(" · ".join(facts))
        )
        rows = Table.grid(padding=(0, 2))
        rows.add_column(no_wrap=True)
        rows.add_column(no_wrap=True, justify="right")
        rows.add_column(no_wrap=True, overflow="ellipsis", style="dim")
        for base, line in _matrix_rows(self.matrices, done, running)[:MAX_ROWS]:
            rows.add_row(f"  {base}", line, "")
        ordered = sorted(running.items(), key=lambda item: item[1][0])
        for name, (_, why) in ordered[:MAX_ROWS]:
            last = plan.durations.get(name)
            took = _ticking(elapsed[name])
            if last is not None:
                took += f" of ~{format_duration(last)}"
            rows.add_row(f"  {name}", took, why)
        if len(ordered) > MAX_ROWS:
            rows.add_row(f"  and {len(ordered) - MAX_ROWS} more running", "", "")
        return Group(head, rows)

    def _start_live(self) -> None:
        if self._live is not None:
            return
        from rich.live import Live

        # Not rich's own refresh thread: it takes rich's lock before any of ours,
        # and the queued output must be written under `_draw_lock` (the ticker's).
        live = Live(
            console=self.console,
            get_renderable=self.view,
            transient=True,
            auto_refresh=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        with self._draw_lock:
            live.start(refresh=True)
            self._live = live
        if self.auto_refresh:
            self._stopping.clear()
            self._ticker = threading.Thread(target=self._tick, name="mlbuild-live", daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        """The ticker thread: queued output and a fresh frame, every REFRESH_SECONDS."""
        while not self._stopping.wait(REFRESH_SECONDS):
            with self._draw_lock:
                if self._live is None:
                    return
                try:
                    if not self._draw():
                        self._live.refresh()
                except OSError:  # the terminal is gone (EIO): the main thread hears it too
                    return

    # -- printing above the live area -----------------------------------------

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(file=self.out, highlight=False)
        return self._console

    def _decided(self, target: str) -> None:
        with self._lock:
            self.running.pop(target, None)
            self.done.add(target)

    def _print(self, text: str, style: str = "") -> None:
        from rich.text import Text

        self._draw(Text(text, style=style))

    def _draw(self, *renderables: RenderableType) -> bool:
        """Queued output, then `renderables`, in one print (one redraw); False if nothing to do."""
        with self._draw_lock:  # taken and written under one lock: in order, whichever thread
            with self._queue_lock:
                queued, self._queued, self._queued_bytes = self._queued, [], 0
            if queued:
                renderables = (_Raw(self._screen(queued)), *renderables)
            if not renderables:
                return False
            self.console.print(*renderables, soft_wrap=True)
            return True

    def _queue_output(self, target: str, lines: bytes) -> None:
        """Complete lines of a step's output onto the queue (made safe when drawn, in bulk)."""
        with self._queue_lock:
            self._queued.append((target, lines))
            self._queued_bytes += len(lines)
            full = self._queued_bytes >= _FLUSH_BYTES
        if full:
            self._draw()

    def _screen(self, queued: list[tuple[str, bytes]]) -> str:
        """The queue as the terminal gets it: each run of one step's lines at once."""
        colors = _colors(self.console)
        with self._lock:
            several = len(self.running) > 1
        several = several or len({target for target, _ in queued}) > 1
        parts: list[str] = []
        start = 0
        for end in range(1, len(queued) + 1):
            target = queued[start][0]
            if end < len(queued) and queued[end][0] == target:
                continue
            text = screen_text(b"".join(data for _, data in queued[start:end]), colors=colors)
            if self.prefix and several:
                tag = f"\x1b[2m[{target}]{_RESET} " if colors else f"[{target}] "
                text = tag + text[:-1].replace("\n", "\n" + tag) + "\n"
            parts.append(text)
            start = end
        return "".join(parts)

    def _flush_partial(self, target: str) -> None:
        rest = self.partial.pop(target, b"")
        if rest:
            self._queue_output(target, rest + b"\n")

    def _error(self, text: str, style: str = "red") -> None:
        """Failures and warnings: above the live area when stderr is this terminal too."""
        if self.err.isatty():
            self._print(text, style)
        else:
            self._draw()  # the step's output that came before it
            self.err.write(text + "\n")
            self.err.flush()


def _matrices(targets: Sequence[str]) -> dict[str, int]:
    """Matrix target -> how many of its points (`NAME@...`, pipeline/matrix.py) are planned."""
    counts: dict[str, int] = {}
    for name in targets:
        base, at, _ = name.partition("@")
        if at:
            counts[base] = counts.get(base, 0) + 1
    return counts


def _matrix_rows(
    matrices: Mapping[str, int], done: set[str], running: Mapping[str, object]
) -> list[tuple[str, str]]:
    """`train`, `37/100 points · 2 running` for each matrix target not yet done."""
    if not matrices:
        return []
    finished: dict[str, int] = {}
    active: dict[str, int] = {}
    for names, counts in ((done, finished), (running, active)):
        for name in names:
            base, at, _ = name.partition("@")
            if at:
                counts[base] = counts.get(base, 0) + 1
    return [
        (base, f"{finished.get(base, 0)}/{total} points · {active.get(base, 0)} running")
        for base, total in matrices.items()
        if finished.get(base, 0) < total
    ]


class _Raw:
    """Text that goes to the terminal as it is: no markup, wrapping or cropping by rich."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Segment]:
        from rich.segment import Segment

        yield Segment(self.text)


def _colors(console: Console) -> bool:
    return console.color_system is not None and not console.no_color


def screen_text(data: bytes, *, colors: bool) -> str:
    """Lines of a step's output (ending in a newline) as the live view may write them.

    A progress bar redraws its line with carriage returns: only its last state
    is kept. Colors (SGR) are kept when `colors`, and reset at the end of each
    line that has any, so none runs into the live area; every other escape
    sequence and the control codes rich would drop are removed. Plain string
    operations throughout: this runs on every byte a step prints.
    """
    text = data.translate(None, _CONTROL).decode("utf-8", "replace")
    if "\r" in text:
        text = "\n".join(line.rstrip("\r").rpartition("\r")[2] for line in text.split("\n"))
    if "\x1b" in text:
        text = re.sub(_ESCAPE, _keep_colors if colors else "", text)
        if colors and "\x1b" in text:
            lines = text.split("\n")
            text = "\n".join(line + _RESET if "\x1b" in line else line for line in lines)
    return text


def _keep_colors(match: re.Match[str]) -> str:
    sequence = match[0]
    return sequence if sequence.startswith("\x1b[") and sequence.endswith("m") else ""


def _ticking(seconds: float) -> str:
    """A running clock: tenths under a minute (milliseconds would flicker), else as summaries."""
    return f"{seconds:.1f}s" if seconds < 60 else format_duration(seconds)
