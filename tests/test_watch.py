"""`mlbuild watch`: a real watchdog observer on real files, asserted on what the user reads.

The watcher runs in a thread (with `stop()`) or, for the command line, as a
subprocess ended by SIGINT. Tests never sleep a fixed time to prove that
nothing happened: they make a change to `probe.txt`, which only the
independent `probe` target reads, and wait for its cycle. Events are handled
in order, so anything an earlier change (or a build's own outputs) had
triggered would show up before it.
"""

from __future__ import annotations

import ctypes
import errno
import io
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mlbuild.build.lock import WorkspaceLock
from mlbuild.build.results import BuildOptions
from mlbuild.cli import main
from mlbuild.graph import Graph, build_graph
from mlbuild.pipeline.load import load_pipeline
from mlbuild.ui.report import PlainReporter
from mlbuild.watch import Debouncer, Readers, Watcher, WatchOptions, plan_watches, scope_of

CHAIN = """
[targets.upper]
cmd = "tr a-z A-Z < {inputs.raw} > {outputs.up}"
inputs = { raw = "data/raw.txt" }
outputs = { up = "build/upper.txt" }

[targets.count]                       # writes into the watched data/ directory
cmd = "wc -c < {inputs.raw} > {outputs.n}"
inputs = { raw = "data/raw.txt" }
outputs = { n = "data/raw.count" }

[targets.first]                       # writes into the watched project root
cmd = "head -n 1 {inputs.up} > {outputs.first}"
inputs = { up = "build/upper.txt" }
outputs = { first = "first.txt" }

[targets.probe]
cmd = "cp {inputs.p} {outputs.p}"
inputs = { p = "probe.txt" }
outputs = { p = "build/probe.out" }
"""


def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def make_chain(root: Path) -> None:
    write(root, "pipeline.toml", CHAIN)
    write(root, "data/raw.txt", "one\ntwo\n")
    write(root, "probe.txt", "0\n")


class Screen(io.StringIO):
    """stdout and stderr of the watcher in one stream that a test can wait on."""

    def __init__(self) -> None:
        super().__init__()
        self.cond = threading.Condition()

    def write(self, text: str) -> int:
        with self.cond:
            n = super().write(text)
            self.cond.notify_all()
            return n

    @property
    def text(self) -> str:
        with self.cond:
            return self.getvalue()


class Session:
    """A running watcher and what it printed; `mark`/`since` cut out one stretch."""

    def __init__(self, root: Path, screen: Screen, died: list[BaseException]) -> None:
        self.root = root
        self.screen = screen
        self.died = died
        self.probes = 0

    def wait_for(self, done: Callable[[str], bool], since: int = 0, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        with self.screen.cond:
            while not done(self.screen.getvalue()[since:]):
                assert not self.died, f"the watcher died: {self.died[0]!r}"
                if time.monotonic() > deadline:
                    raise AssertionError(f"timed out; the screen:\n{self.screen.getvalue()}")
                self.screen.cond.wait(0.05)
            return self.screen.getvalue()[since:]

    def wait_text(self, text: str, since: int = 0, count: int = 1) -> str:
        return self.wait_for(lambda seen: seen.count(text) >= count, since)

    def mark(self) -> int:
        return len(self.screen.text)

    def since(self, mark: int) -> str:
        return self.screen.text[mark:]

    def probe(self, mark: int) -> str:
        """Change probe.txt, wait for its cycle; everything printed since `mark`."""
        self.probes += 1
        return self.probe_file("probe.txt", f"{self.probes}\n", mark)

    def probe_file(self, rel: str, text: str, mark: int) -> str:
        """Write a file a target reads, wait for a cycle to end; everything since `mark`."""
        start = self.mark()
        write(self.root, rel, text)
        self.wait_for(lambda seen: "has finished" in seen and _ended(seen), start)
        return self.since(mark)


def _ended(seen: str) -> bool:
    return seen.rstrip().endswith("waiting for changes.")


def started(text: str) -> list[str]:
    return [line.split("`")[1] for line in text.splitlines() if "` has started" in line]


@contextmanager
def watching(
    root: Path,
    *targets: str,
    debounce: float = 0.05,
    verbosity: int = 0,
    screen: Screen | None = None,
    **options: object,
) -> Iterator[Session]:
    screen = screen or Screen()
    reporter = PlainReporter(screen, screen, verbosity=verbosity)
    watcher = Watcher(
        root / "pipeline.toml",
        reporter,
        screen,
        screen,
        targets=targets,
        options=WatchOptions(debounce=debounce, verbosity=verbosity, **options),  # type: ignore[arg-type]
        build=BuildOptions(command_line="watch"),
    )
    died: list[BaseException] = []

    def run() -> None:
        try:
            watcher.run()
        except BaseException as exc:
            died.append(exc)
            raise

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    session = Session(root, screen, died)
    try:
        session.wait_text("waiting for changes.")
        yield session
    finally:
        watcher.stop()
        thread.join(10)
        assert not thread.is_alive()


# The debounce on its own, with a fake clock: no sleeping.


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_debouncer_coalesces_a_burst_and_waits_for_quiet() -> None:
    clock = FakeClock()
    debouncer = Debouncer(0.15, clock)
    assert debouncer.due_in() is None
    for i in range(50):
        debouncer.add(["data/raw.txt"] + (["data/other.txt"] if i == 7 else []))
        clock.now += 0.01  # a write every 10 ms keeps the batch open
    assert debouncer.due_in() == pytest.approx(0.14)
    clock.now += 0.14
    assert debouncer.due_in() == pytest.approx(0.0)
    batch = debouncer.take()
    assert batch.paths == {"data/raw.txt", "data/other.txt"}
    assert batch.last_event == pytest.approx(100.49)
    assert debouncer.due_in() is None


def test_debouncer_wait_hands_out_batches_until_closed() -> None:
    debouncer = Debouncer(0.01)
    debouncer.add(["a"])
    batch = debouncer.wait()
    assert batch is not None and batch.paths == {"a"}
    threading.Timer(0.05, debouncer.close).start()
    assert debouncer.wait() is None


def test_outputs_state_and_editor_files_are_dropped(tmp_path: Path) -> None:
    make_chain(tmp_path)
    graph = build_graph(load_pipeline(tmp_path / "pipeline.toml"))
    scope = scope_of(graph, {"upper": frozenset({"scripts/x.tmp"})})
    kept = ["data/raw.txt", "data/notes.txt", "pipeline.toml", "scripts/x.tmp", "data"]
    dropped = [
        *(".mlbuild", ".mlbuild/state.db-wal", "build", "build/upper.txt", "build/upper.txt/x"),
        "first.txt",
        *("data/raw.count", "data/.raw.txt.swp", "data/raw.txt~", "data/4913", ".#pipeline.toml"),
        *("steps/__pycache__/a.cpython-311.pyc", "#notes#", "data/x.tmp", ".git/index"),
    ]
    assert [p for p in kept if scope.keeps(p)] == kept
    assert [p for p in dropped if scope.keeps(p)] == []


def test_watches_cover_sources_and_code_never_outputs(tmp_path: Path) -> None:
    write(tmp_path, "pipeline.toml", """
        [targets.a]
        cmd = "sh scripts/a.sh {inputs} > {outputs}"
        inputs = ["data/raw.txt", "corpus", "parts/**/*.csv", "later/x.txt"]
        outputs = ["build/a.txt"]

        [targets.b]
        cmd = "cat {inputs} > {outputs}"
        inputs = ["build/a.txt"]
        outputs = ["out/b.txt"]
        """)  # fmt: skip
    for rel in (
        "data/raw.txt",
        "corpus/sub/1.txt",
        "corpus/2.txt",
        "parts/p/1.csv",
        "scripts/a.sh",
    ):
        write(tmp_path, rel, "x\n")
    graph = build_graph(load_pipeline(tmp_path / "pipeline.toml"))
    plan = plan_watches(graph, graph.order, {"a": frozenset({"scripts/a.sh"})})
    # later/ does not exist yet: the root stands in for it, and sees it created.
    assert plan == {"": False, "data": False, "corpus": True, "parts": True, "scripts": False}


def test_readers_find_the_targets_a_changed_path_affects(tmp_path: Path) -> None:
    write(tmp_path, "pipeline.toml", """
        [targets.a]
        cmd = "sh scripts/a.sh {inputs} > {outputs}"
        inputs = ["data/raw.txt", "corpus", "parts/**/*.csv"]
        outputs = ["build/a.txt"]

        [targets.b]
        cmd = "cat {inputs} > {outputs}"
        inputs = ["build/a.txt", "data/raw.txt"]
        outputs = ["out/b.txt"]

        [targets.c]
        cmd = "cat {inputs} > {outputs}"
        inputs = ["*.cfg"]
        outputs = ["out/c.txt"]
        """)  # fmt: skip
    graph = build_graph(load_pipeline(tmp_path / "pipeline.toml"))
    readers = Readers(graph, graph.order, {"a": frozenset({"scripts/lib/a.sh"})})
    changed = [
        *("data/raw.txt", "corpus", "corpus/sub/1.txt", "parts/p/q/1.csv", "parts/x.txt"),
        *("scripts/lib/a.sh", "scripts/lib", "scripts", "data", "main.cfg", "notes.txt"),
        *("build/a.txt", "corpusx/1.txt", "data/raw.txt.bak"),
    ]
    assert readers.affected(changed) == {
        "data/raw.txt": {"a", "b"},
        "corpus": {"a"},
        "corpus/sub/1.txt": {"a"},
        "parts/p/q/1.csv": {"a"},
        "parts/x.txt": {"a"},  # inside the glob's base: a directory move may bring matches
        "scripts/lib/a.sh": {"a"},
        "scripts/lib": {"a"},
        "scripts": {"a"},
        "data": {"a", "b"},
        "main.cfg": {"c"},
        "build/a.txt": {"b"},
    }
    assert Readers(graph, ["c"], {}).affected(changed) == {"main.cfg": {"c"}}


# A real observer on real files.


def test_editing_an_input_reruns_only_what_it_affects(tmp_path: Path) -> None:
    make_chain(tmp_path)
    with watching(tmp_path) as w:
        first = w.since(0)
        assert started(first) == ["upper", "count", "first", "probe"]
        assert "watching 2 directories (inotify, 50 ms debounce)" in first
        mark = w.mark()
        write(tmp_path, "data/raw.txt", "three\nfour\n")
        seen = w.wait_text("waiting for changes.", mark)
        assert "mlbuild watch: data/raw.txt changed; checking upper, count, first." in seen
        assert started(seen) == ["upper", "count", "first"]
        assert "Step `upper` has started: input changed: data/raw.txt." in seen
        assert "mlbuild watch: ran upper, count, first; done " in seen
        assert (tmp_path / "first.txt").read_text() == "THREE\n"
        assert (tmp_path / "data/raw.count").read_text().strip() == "11"


def test_named_targets_limit_what_is_built_and_watched(tmp_path: Path) -> None:
    make_chain(tmp_path)
    with watching(tmp_path, "first") as w:
        assert started(w.since(0)) == ["upper", "first"]
        mark = w.mark()
        write(tmp_path, "data/raw.txt", "named\n")
        seen = w.wait_text("waiting for changes.", mark)
        assert "mlbuild watch: data/raw.txt changed; checking upper, first." in seen
        assert started(seen) == ["upper", "first"]
        assert not (tmp_path / "data/raw.count").exists()


def test_outputs_written_by_builds_never_trigger_a_build(tmp_path: Path) -> None:
    make_chain(tmp_path)
    with watching(tmp_path) as w:
        mark = w.mark()
        write(tmp_path, "data/raw.txt", "changed\n")  # rewrites data/raw.count and first.txt
        w.wait_text("waiting for changes.", mark)
        seen = w.probe(mark)  # the initial build's outputs, then this cycle's, then the probe
        assert [line for line in seen.splitlines() if " changed; " in line] == [
            "mlbuild watch: data/raw.txt changed; checking upper, count, first.",
            "mlbuild watch: probe.txt changed; checking probe.",
        ]
        assert started(seen) == ["upper", "count", "first", "probe"]


def test_touch_equal_bytes_unrelated_and_editor_files_run_nothing(tmp_path: Path) -> None:
    make_chain(tmp_path)
    with watching(tmp_path, verbosity=1) as w:
        mark = w.mark()
        for rel in ("data/notes.txt", "data/.raw.txt.swp", "data/raw.txt~", "data/4913"):
            write(tmp_path, rel, "scratch\n")
        write(tmp_path, "steps/__pycache__/helpers.cpython-311.pyc", "bytecode")
        seen = w.wait_text("no selected target reads it.", mark)
        assert "data/notes.txt, steps changed; no selected target reads it." in seen
        touched = w.mark()
        subprocess.run(["touch", str(tmp_path / "data/raw.txt")], check=True)
        os.utime(tmp_path / "data/raw.txt")
        (tmp_path / "data/raw.txt").write_bytes((tmp_path / "data/raw.txt").read_bytes())
        seen = w.wait_text("waiting for changes.", touched)
        assert "data/raw.txt changed; checking upper, count, first." in seen
        assert "mlbuild watch: nothing ran; done " in seen  # the content check decided
        seen = w.probe(mark)
        assert started(seen) == ["probe"]
        assert ".swp" not in seen and "raw.txt~" not in seen and "4913" not in seen
        assert "__pycache__" not in seen


def test_fifty_rapid_writes_make_one_cycle(tmp_path: Path) -> None:
    make_chain(tmp_path)
    with watching(tmp_path, debounce=0.2) as w:
        mark = w.mark()
        for i in range(50):
            (tmp_path / "data/raw.txt").write_text(f"v{i}\n")
        w.wait_text("waiting for changes.", mark)
        seen = w.probe(mark)
        assert seen.count("data/raw.txt changed") == 1
        assert started(seen) == ["upper", "count", "first", "probe"]
        assert (tmp_path / "first.txt").read_text() == "V49\n"


def test_an_atomic_rename_save_is_seen(tmp_path: Path) -> None:
    make_chain(tmp_path)
    with watching(tmp_path) as w:

        def save(text: str) -> None:
            fd, tmp = tempfile.mkstemp(dir=tmp_path / "data")  # an editor's temp file
            os.write(fd, text.encode())
            os.close(fd)
            os.replace(tmp, tmp_path / "data/raw.txt")

        mark = w.mark()
        save("renamed\n")
        seen = w.wait_text("waiting for changes.", mark)
        assert "mlbuild watch: data/raw.txt changed; checking upper, count, first." in seen
        assert started(seen) == ["upper", "count", "first"]
        assert (tmp_path / "first.txt").read_text() == "RENAMED\n"
        mark = w.mark()
        save("renamed\n")  # the same bytes again
        seen = w.wait_text("waiting for changes.", mark)
        assert "data/raw.txt changed; checking upper, count, first." in seen
        assert "mlbuild watch: nothing ran; done " in seen
        assert started(w.probe(mark)) == ["probe"]


def test_a_broken_pipeline_edit_keeps_the_last_good_one_until_fixed(tmp_path: Path) -> None:
    make_chain(tmp_path)
    with watching(tmp_path) as w:
        mark = w.mark()
        write(tmp_path, "pipeline.toml", CHAIN.replace("[targets.count]", "[targets.count"))
        seen = w.wait_text("keeping the last good pipeline", mark)
        assert "mlbuild: error: " in seen and "pipeline.toml:7:" in seen
        assert "invalid TOML" in seen
        mark = w.mark()
        write(tmp_path, "data/raw.txt", "still\n")  # the last good pipeline builds it
        seen = w.wait_text("waiting for changes.", mark)
        assert started(seen) == ["upper", "count", "first"]
        mark = w.mark()
        write(
            tmp_path, "pipeline.toml", CHAIN.replace("} > {outputs.up}", "} | rev > {outputs.up}")
        )
        seen = w.wait_text("waiting for changes.", mark)
        assert "mlbuild watch: pipeline.toml changed; checking upper, count, first, probe." in seen
        assert "Step `upper` has started: command changed." in seen
        assert started(seen) == ["upper", "first"]  # first: its input changed
        assert (tmp_path / "first.txt").read_text() == "LLITS\n"


def test_a_broken_edit_with_a_newline_in_a_key_is_told_in_one_line(tmp_path: Path) -> None:
    """The same one error line as `mlbuild run`: a quoted key's newline is escaped."""
    make_chain(tmp_path)
    with watching(tmp_path) as w:
        mark = w.mark()
        count = 'outputs = { n = "data/raw.count" }'
        broken = CHAIN.replace(count, count + '\n"out\\nputs" = ["x"]')
        write(tmp_path, "pipeline.toml", broken)
        seen = w.wait_text("keeping the last good pipeline", mark)
        errors = [line for line in seen.splitlines() if line.startswith("mlbuild: error: ")]
        assert len(errors) == 1
        assert "targets.count.out\\nputs: unknown key" in errors[0]
        assert "puts: unknown key" not in seen.replace(errors[0], "")


def test_a_failing_target_does_not_stop_the_watcher_and_a_fix_reruns_it(
    tmp_path: Path,
) -> None:
    make_chain(tmp_path)
    write(tmp_path, "pipeline.toml", CHAIN + """
        [targets.check]
        cmd = "sh scripts/check.sh {inputs.up} > {outputs.ok}"
        inputs = { up = "build/upper.txt" }
        outputs = { ok = "build/check.txt" }

        [targets.report]
        cmd = "cat {inputs.ok} > {outputs.r}"
        inputs = { ok = "build/check.txt" }
        outputs = { r = "report.txt" }
        """)  # fmt: skip
    write(tmp_path, "scripts/check.sh", "echo 'broken check' >&2\nexit 3\n")
    with watching(tmp_path) as w:
        first = w.since(0)
        assert "Step `check` failed after " in first and "exit code 3" in first
        assert "Step `report` was not run: upstream 'check' failed." in first
        mark = w.mark()
        write(tmp_path, "data/raw.txt", "edited\n")  # the others go on; check fails again
        seen = w.wait_text("waiting for changes.", mark)
        assert "ran upper, count, first; failed check" in seen
        mark = w.mark()
        write(tmp_path, "scripts/check.sh", 'cat "$1"\n')
        seen = w.wait_text("waiting for changes.", mark)
        assert "mlbuild watch: scripts/check.sh changed; checking check, report." in seen
        assert "Step `check` has started: its last run failed." in seen  # no manifest
        assert started(seen) == ["check", "report"]
        assert (tmp_path / "report.txt").read_text() == "EDITED\n"


PYTHON_STEP = """
[targets.train]
python = "steps.train:train"
inputs = { data = "data/raw.txt" }
outputs = { model = "build/model.txt" }
"""


def make_python_step(root: Path) -> None:
    write(root, "pipeline.toml", PYTHON_STEP)
    write(root, "data/raw.txt", "d\n")
    write(root, "steps/__init__.py", "")
    write(root, "steps/helpers.py", "def scale(x):\n    return x * 2\n")
    train = "from steps.helpers import scale\n\n\ndef train(data, model):\n"
    write(
        root, "steps/train.py", train + "    model.write_text(str(scale(len(data.read_text()))))\n"
    )


def test_a_python_step_reruns_when_a_module_it_imports_changes(tmp_path: Path) -> None:
    make_python_step(tmp_path)
    with watching(tmp_path) as w:
        assert (tmp_path / "build/model.txt").read_text() == "4"
        mark = w.mark()
        write(tmp_path, "steps/helpers.py", "def scale(x):\n    return x * 30\n")
        seen = w.wait_text("waiting for changes.", mark)
        assert "mlbuild watch: steps/helpers.py changed; checking train." in seen
        assert "code changed: steps/helpers.py (imported by steps/train.py)" in seen
        assert (tmp_path / "build/model.txt").read_text() == "60"
        mark = w.mark()
        write(tmp_path, "steps/helpers.py", "def scale(x):  # a comment\n    return x * 30\n")
        seen = w.wait_text("waiting for changes.", mark)
        assert "nothing ran" in seen and started(seen) == []
        mark = w.mark()
        write(tmp_path, "steps/helpers.py", "def scale(x):\n    return x *\n")
        seen = w.wait_text("save a fix to retry", mark)
        assert "steps/helpers.py:2: syntax error" in seen
        mark = w.mark()
        write(tmp_path, "steps/helpers.py", "def scale(x):\n    return x * 300\n")
        seen = w.wait_text("waiting for changes.", mark)
        assert started(seen) == ["train"]
        assert (tmp_path / "build/model.txt").read_text() == "600"
        # the worker's bytecode in steps/__pycache__/ started no cycle
        assert started(w.probe_file("data/raw.txt", "dd\n", w.mark())) == ["train"]


def test_an_equal_size_edit_within_the_second_runs_the_new_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    make_python_step(tmp_path)
    helpers = tmp_path / "steps/helpers.py"
    with watching(tmp_path, debounce=0.2) as w:
        assert (tmp_path / "build/model.txt").read_text() == "4"
        before = helpers.stat().st_mtime_ns
        mark = w.mark()
        helpers.write_text("def scale(x):\n    return x * 3\n")
        same_second = before - before % 10**9 + (before % 10**9 + 1) % 10**9
        os.utime(helpers, ns=(same_second, same_second))
        seen = w.wait_text("waiting for changes.", mark)
        assert "code changed: steps/helpers.py" in seen
        assert (tmp_path / "build/model.txt").read_text() == "6"


def test_changes_during_a_build_make_one_more_cycle(tmp_path: Path) -> None:
    make_chain(tmp_path)
    write(tmp_path, "pipeline.toml", CHAIN.replace('cmd = "tr', 'cmd = "sleep 0.5; tr'))
    with watching(tmp_path) as w:
        mark = w.mark()
        write(tmp_path, "data/raw.txt", "during one\n")
        w.wait_text("Step `upper` has started", mark)
        write(tmp_path, "data/raw.txt", "during two\n")  # while upper runs
        seen = w.wait_text("waiting for changes.", mark, count=2)
        assert seen.count("data/raw.txt changed; checking upper, count, first.") == 2
        # upper's record holds the input it started with, so the second cycle reruns it.
        assert started(seen).count("upper") == 2
        # Watch cannot tell that edit from upper's own write, so it says why it reruns it.
        assert (
            "mlbuild watch: data/raw.txt changed while `upper` ran (in its input data/raw.txt);"
            " running it again: if that run changes it too, that is the step's own write.\n"
        ) in seen
        assert (tmp_path / "first.txt").read_text() == "DURING TWO\n"
        assert started(w.probe(w.mark())) == ["probe"]  # and no third cycle


def test_a_deleted_input_is_reported_and_its_return_rebuilds(tmp_path: Path) -> None:
    make_chain(tmp_path)
    with watching(tmp_path) as w:
        mark = w.mark()
        (tmp_path / "data/raw.txt").unlink()
        seen = w.wait_text("save a fix to retry", mark)
        assert "'data/raw.txt' does not exist and no target writes it" in seen
        mark = w.mark()
        for rel in ("data/raw.count",):
            (tmp_path / rel).unlink()
        (tmp_path / "data").rmdir()  # the watched directory goes too
        write(tmp_path, "data/raw.txt", "back\n")
        seen = w.wait_for(lambda s: "ran upper" in s and _ended(s), mark)
        assert (tmp_path / "first.txt").read_text() == "BACK\n"
        mark = w.mark()
        write(tmp_path, "data/raw.txt", "again\n")  # data/ is watched again
        seen = w.wait_text("waiting for changes.", mark)
        assert started(seen) == ["upper", "count", "first"]


def test_a_cycle_waits_for_another_mlbuild_holding_the_workspace(tmp_path: Path) -> None:
    make_chain(tmp_path)
    with watching(tmp_path) as w:
        lock = WorkspaceLock(tmp_path / ".mlbuild", "run", wait=False, notify=print)
        with lock:
            mark = w.mark()
            write(tmp_path, "data/raw.txt", "locked\n")
            w.wait_text("waiting for another mlbuild in this workspace", mark)
            assert started(w.since(mark)) == []
        seen = w.wait_text("waiting for changes.", mark)
        assert started(seen) == ["upper", "count", "first"]


GATED = """
[targets.slow]
cmd = "while [ ! -e gate ]; do sleep 0.02; done; cp {inputs.i} {outputs.o}"
inputs = { i = "data/in.txt" }
outputs = { o = "build/slow.txt" }
"""


def test_a_cycle_holds_the_workspace_while_it_builds(tmp_path: Path) -> None:
    write(tmp_path, "pipeline.toml", GATED)
    write(tmp_path, "data/in.txt", "1\n")
    write(tmp_path, "gate", "")
    with watching(tmp_path) as w:
        (tmp_path / "gate").unlink()
        mark = w.mark()
        write(tmp_path, "data/in.txt", "2\n")
        w.wait_text("Step `slow` has started", mark)
        for words in (["run", "--no-wait"], ["run", "--no-wait", "--force"]):
            other = subprocess.run(
                [sys.executable, "-m", "mlbuild", *words],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                check=False,
            )
            assert other.returncode == 1
            assert other.stderr == (
                "mlbuild: error: another mlbuild is running in this workspace"
                f" (pid {os.getpid()}: mlbuild watch)\n"
            )
        write(tmp_path, "gate", "")
        seen = w.wait_text("waiting for changes.", mark)
        assert "ran slow" in seen
    assert (tmp_path / "build/slow.txt").read_text() == "2\n"


LOOP = """
[targets.loop]                        # writes into its own (watched) input directory
cmd = "cat data/dir/a > {outputs}; date +%s%N > data/dir/stamp"
inputs = ["data/dir"]
outputs = ["build/loop.txt"]

[targets.probe]
cmd = "cp {inputs.p} {outputs.p}"
inputs = { p = "probe.txt" }
outputs = { p = "build/probe.out" }
"""


def test_a_step_writing_into_its_own_input_is_not_rerun_for_its_own_writes(
    tmp_path: Path,
) -> None:
    write(tmp_path, "pipeline.toml", LOOP)
    write(tmp_path, "data/dir/a", "one\n")
    write(tmp_path, "probe.txt", "0\n")
    with watching(tmp_path) as w:
        seen = w.wait_text("not rerunning `loop`")
        # Once, it could have been an edit made while the step ran: it runs again.
        assert (
            "mlbuild watch: data/dir/stamp changed while `loop` ran (in its input data/dir);"
            " running it again: if that run changes it too, that is the step's own write.\n"
        ) in seen
        assert (
            "mlbuild: warning: not rerunning `loop`: its step wrote data/dir/stamp, inside its"
            " own input data/dir, in each of its last 2 runs (a step should not write into its"
            " inputs); a change made while it is not running reruns it\n"
        ) in seen
        seen = w.probe(0)  # a third run of `loop` would show before the probe's cycle
        assert started(seen) == ["loop", "probe", "loop", "probe"]
        mark = w.mark()
        write(tmp_path, "data/dir/a", "two\n")  # an edit after its run: it runs, once
        w.wait_text("not rerunning `loop`", mark)
        seen = w.probe(mark)
        assert "mlbuild watch: data/dir/a changed; checking loop." in seen
        assert started(seen) == ["loop", "probe"]
        assert "in each of its last 3 runs" in seen
        assert (tmp_path / "build/loop.txt").read_text() == "two\n"


LOOP_AFTER = """
[targets.first]                       # reads the directory `loop` writes into
cmd = "ls data/dir > {outputs}"
inputs = ["data/dir"]
outputs = ["build/first.txt"]

[targets.loop]                        # writes into its own (watched) input directory
cmd = "cat data/dir/a > {outputs}; date +%s%N > data/dir/stamp"
inputs = ["data/dir"]
outputs = ["build/loop.txt"]
"""


class _Gated(Screen):
    """Holds the line of `first`'s end until `loop` has written its stamp again: `loop`
    starts as `first` ends (-j 1), before `first` is recorded and told (runner
    `_complete`), so its write lands before anything told after that line."""

    def __init__(self, stamp: Path) -> None:
        super().__init__()
        self.stamp, self.last = stamp, ""

    def write(self, text: str) -> int:
        if "`first` has finished" in text:  # (when `loop` does not run: 1.5 s, once)
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                now = self.stamp.read_text() if self.stamp.exists() else ""
                if now != self.last:
                    self.last = now
                    break
                time.sleep(0.01)
        return super().write(text)


def test_a_step_started_as_the_last_one_ended_has_its_own_writes_told_apart(
    tmp_path: Path,
) -> None:
    """`loop` starts (early, at -j 1) when `first` ends, and is told after `first`'s end
    line: its inputs must still be taken before it runs, or its own write is taken for
    an edit every time and `loop` (started after `first` again) never stops."""
    write(tmp_path, "pipeline.toml", LOOP_AFTER)
    write(tmp_path, "data/dir/a", "one\n")
    with watching(tmp_path, screen=_Gated(tmp_path / "data/dir/stamp")) as w:
        seen = w.wait_text("not rerunning `loop`")
        assert (
            "mlbuild watch: data/dir/stamp changed while `loop` ran (in its input data/dir);"
            " running it again: if that run changes it too, that is the step's own write.\n"
        ) in seen


def test_a_step_started_as_the_last_one_ended_is_not_taken_for_its_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`first`'s inputs at its end are taken when its process exits, before `loop` starts in
    its slot: taken later (at its end line, after it is hashed), `loop`'s write into their
    shared input was `first`'s own, and watch stopped rerunning `first`, which writes
    nothing there. Here its end is taken as late as `loop`'s write can make it."""
    from mlbuild.watch import OwnWrites

    stamp = tmp_path / "data/dir/stamp"
    ended = OwnWrites.ended

    def late_end(own: OwnWrites, graph: Graph, name: str) -> None:
        if name == "first" and "loop" in own.at_start:  # `loop` runs: its write lands first
            before = stamp.read_text() if stamp.exists() else ""
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if (stamp.read_text() if stamp.exists() else "") != before:
                    break
                time.sleep(0.01)
        ended(own, graph, name)

    monkeypatch.setattr(OwnWrites, "ended", late_end)
    write(tmp_path, "pipeline.toml", LOOP_AFTER)
    write(tmp_path, "data/dir/a", "one\n")
    with watching(tmp_path) as w:
        seen = w.wait_text("not rerunning `loop`")
        assert "while `first` ran" not in seen
        assert "not rerunning `first`" not in seen


def test_the_inotify_limit_falls_back_to_polling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from watchdog.observers import inotify_c

    def limit_reached(fd: int, path: bytes, mask: int) -> int:
        ctypes.set_errno(errno.ENOSPC)  # what inotify_add_watch(2) does at the limit
        return -1

    monkeypatch.setattr(inotify_c, "inotify_add_watch", limit_reached)
    make_chain(tmp_path)
    with watching(tmp_path, poll_interval=0.1) as w:
        first = w.since(0)
        assert "the inotify limit is reached (fs.inotify.max_user_watches = " in first
        assert "sudo sysctl fs.inotify.max_user_watches=" in first
        assert "watching 2 directories (polling every 0.1s, 50 ms debounce)" in first
        mark = w.mark()
        write(tmp_path, "data/raw.txt", "polled\n")
        seen = w.wait_text("waiting for changes.", mark)
        assert started(seen) == ["upper", "count", "first"]


def test_poll_forces_polling(tmp_path: Path) -> None:
    make_chain(tmp_path)
    with watching(tmp_path, poll=True, poll_interval=0.1) as w:
        assert "(polling every 0.1s, 50 ms debounce)" in w.since(0)
        mark = w.mark()
        write(tmp_path, "data/raw.txt", "polled\n")
        seen = w.probe(mark)
        assert started(seen) == ["upper", "count", "first", "probe"]


# The command line.


@pytest.mark.parametrize("words", [["watch", "--debounce", "50"], ["run", "--watch"]])
def test_the_command_runs_until_ctrl_c_and_exits_0(tmp_path: Path, words: list[str]) -> None:
    make_chain(tmp_path)
    argv = [sys.executable, "-m", "mlbuild", *words]
    with subprocess.Popen(
        argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        lines: list[str] = []
        try:
            for line in proc.stdout:
                lines.append(line)
                if "waiting for changes." in line:
                    if sum("waiting for changes." in x for x in lines) == 2:
                        break
                    write(tmp_path, "data/raw.txt", "cli\n")
            proc.send_signal(signal.SIGINT)
            rest = proc.stdout.read()
            assert proc.wait(10) == 0
        finally:
            proc.kill()
    assert "mlbuild watch: data/raw.txt changed; checking upper, count, first.\n" in lines
    assert rest.endswith("mlbuild watch: stopped.\n")
    assert (tmp_path / "first.txt").read_text() == "CLI\n"


# The command as its console script runs it. Not `python -m mlbuild`: under -m, CPython
# 3.11 exits by SIGINT whenever a Ctrl-C once landed inside an eval() (namedtuple and
# dataclass creation in a lazy import), even when the KeyboardInterrupt was caught.
MLBUILD = [sys.executable, "-c", "from mlbuild.cli import run_main; run_main()"]


def test_ctrl_c_during_a_build_stops_its_step_and_exits_0(tmp_path: Path) -> None:
    make_chain(tmp_path)
    slow = 'cmd = "touch build/started; sleep 30; tr'
    write(tmp_path, "pipeline.toml", CHAIN.replace('cmd = "tr', slow))
    argv = [*MLBUILD, "watch", "-j", "1"]  # no other step being spawned at the signal
    with subprocess.Popen(
        argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        try:
            # The step's own mark, not the "has started" line: that is printed just before
            # the step is spawned, and a signal then is not "during a step" (see the report).
            deadline = time.monotonic() + 20
            while not (tmp_path / "build/started").exists():
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
            proc.send_signal(signal.SIGINT)
            out = proc.communicate(timeout=10)[0]
        finally:
            proc.kill()
    assert proc.returncode == 0, out
    assert processes_in(tmp_path) == []  # the step's `sleep 30` was stopped
    assert out.endswith(
        "mlbuild watch: stopped; interrupted `upper`: it runs again on the next build.\n"
    )
    assert not (tmp_path / "build/upper.txt").exists()


SLEEPER = """
[targets.sleeper]
cmd = "touch build/started; sleep 1.5; echo late > {outputs.o}"
outputs = { o = "build/late.txt" }
"""


def processes_in(root: Path) -> list[int]:
    """Live processes whose working directory is `root` (steps run in the project)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if os.readlink(f"/proc/{entry.name}/cwd") == str(root):
                    found.append(int(entry.name))
            except OSError:  # gone, a zombie, or not ours to read
                continue
    return found


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
def test_hangup_or_terminate_stops_the_running_step_as_ctrl_c_does(
    tmp_path: Path, sig: signal.Signals
) -> None:
    write(tmp_path, "pipeline.toml", SLEEPER)
    argv = [*MLBUILD, "watch"]
    with subprocess.Popen(
        argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        try:
            deadline = time.monotonic() + 20
            while not (tmp_path / "build/started").exists():
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
            signalled = time.monotonic()
            proc.send_signal(sig)
            out = proc.communicate(timeout=10)[0]
        finally:
            proc.kill()
    assert proc.returncode == 0, out
    assert out.endswith("interrupted `sleeper`: it runs again on the next build.\n")
    assert processes_in(tmp_path) == []  # the step's shell and its `sleep`
    time.sleep(max(0.0, signalled + 2.0 - time.monotonic()))  # past the step's sleep
    assert not (tmp_path / "build/late.txt").exists()


def test_a_pipeline_broken_at_start_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, "pipeline.toml", "[targets.x\n")
    assert main(["watch", "-f", str(tmp_path / "pipeline.toml")]) == 2
    assert "invalid TOML" in capsys.readouterr().err
    make_chain(tmp_path)
    assert main(["run", "--watch", "-n", "-f", str(tmp_path / "pipeline.toml")]) == 2
    assert "--watch and --dry-run do not go together" in capsys.readouterr().err


def test_run_without_watch_never_imports_watchdog(tmp_path: Path) -> None:
    make_chain(tmp_path)
    check = (
        "import sys; from mlbuild.cli import main;"
        f" assert main(['run', '-q', '-f', {str(tmp_path / 'pipeline.toml')!r}]) == 0;"
        " assert not [m for m in sys.modules if m.startswith(('watchdog', 'mlbuild.watch'))]"
    )
    subprocess.run([sys.executable, "-c", check], check=True, capture_output=True)


def test_a_script_created_later_is_followed_and_data_edits_still_rerun(tmp_path: Path) -> None:
    """A cycle for an edited data file keeps the code scan and the watch plan (Planner);
    a new directory or script in the batch rescans and replans, so neither is missed."""
    write(
        tmp_path,
        "pipeline.toml",
        """
        [targets.run]
        cmd = "sh tools/go.sh {inputs.d} > {outputs.o}"
        inputs = { d = "data/d.txt" }
        outputs = { o = "build/o.txt" }

        [targets.probe]
        cmd = "cp {inputs.p} {outputs.p}"
        inputs = { p = "probe.txt" }
        outputs = { p = "build/probe.out" }
        """,
    )
    write(tmp_path, "data/d.txt", "one\n")
    write(tmp_path, "probe.txt", "0\n")
    with watching(tmp_path) as w:  # tools/go.sh does not exist yet: `run` fails
        mark = w.mark()
        write(tmp_path, "tools/go.sh", 'cat "$1"\n')  # a new directory, a new script
        seen = w.wait_text("waiting for changes.", mark)
        assert "tools changed; checking run." in seen and started(seen) == ["run"]
        assert (tmp_path / "build/o.txt").read_text() == "one\n"
        assert started(w.probe_file("data/d.txt", "two\n", w.mark())) == ["run"]
        assert (tmp_path / "build/o.txt").read_text() == "two\n"
        assert started(w.probe_file("tools/go.sh", 'tr a-z A-Z < "$1"\n', w.mark())) == ["run"]
        assert (tmp_path / "build/o.txt").read_text() == "TWO\n"
        write(tmp_path, "tools/lib/x.sh", "true\n")  # below a code file's directory: rescanned
        assert started(w.probe(w.mark())) == ["probe"]
        assert started(w.probe_file("data/d.txt", "three\n", w.mark())) == ["run"]
        assert (tmp_path / "build/o.txt").read_text() == "THREE\n"


def test_an_input_in_a_directory_made_later_is_watched_in_it(tmp_path: Path) -> None:
    """The kept watch plan is made anew when a batch holds a new directory."""
    write(
        tmp_path,
        "pipeline.toml",
        """
        [targets.late]
        cmd = "cp {inputs.x} {outputs.o}"
        inputs = { x = "data/new/x.txt" }
        outputs = { o = "build/x.txt" }
        """,
    )
    write(tmp_path, "data/keep.txt", "kept\n")
    with watching(tmp_path) as w:  # data/new/x.txt does not exist: data/ stands in for it
        mark = w.mark()
        write(tmp_path, "data/new/x.txt", "one\n")
        w.wait_for(lambda s: "ran late" in s and _ended(s), mark)
        assert (tmp_path / "build/x.txt").read_text() == "one\n"
        for text in ("two\n", "three\n"):  # seen through the watch on data/new/ only
            assert started(w.probe_file("data/new/x.txt", text, w.mark())) == ["late"]
            assert (tmp_path / "build/x.txt").read_text() == text
