"""The command line: argv to a chain of plain steps, and the only place choosing exit codes.

Exit codes: 0 success; 1 a target failed (or `status` found stale targets);
2 a mistake in the pipeline file or on the command line; 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

import mlbuild
from mlbuild.build.lock import hold_workspace
from mlbuild.build.results import (
    BuildOptions,
    BuildPlan,
    BuildResult,
    CliReporter,
    Outcome,
    Reporter,
)
from mlbuild.build.runner import check_writable, clear_outputs, run_build
from mlbuild.errors import Interrupted, MlbuildError, UsageError
from mlbuild.graph import Graph
from mlbuild.pipeline.load import find_pipeline, parse_overrides
from mlbuild.pipeline.schema import EXECUTOR_KINDS, ActionKind, Pipeline
from mlbuild.signature import signed_parts
from mlbuild.snapshot import load_graph
from mlbuild.store import Store, open_existing_store, open_store
from mlbuild.ui import messages
from mlbuild.ui.report import PlainReporter, silence_stdout, stdout_closed, summary_parts
from mlbuild.uptodate import Proof, Stamp, pack_entries, state_identity, write
from mlbuild.workspace import cache_dir, empty_trash, forget_made, load_made, log_path, state_dir

if TYPE_CHECKING:
    from mlbuild.experiments import Row
    from mlbuild.uptodate import Entry

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line and exit code 2, via UsageError."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")

    def _get_formatter(self) -> argparse.HelpFormatter:
        """argparse's formatter, told the width: left to find it, it imports shutil (and
        with it bz2 and lzma) for every parser, also on a no-op build that prints no help."""
        make: Any = self.formatter_class  # HelpFormatter, whose `width` the stubs omit
        formatter: argparse.HelpFormatter = make(prog=self.prog, width=_columns() - 2)
        return formatter


def _columns() -> int:
    """The terminal's width as shutil.get_terminal_size finds it ($COLUMNS, stdout, 80)."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _Ignored:
    """Stands in for the parser of a subcommand not being run: takes options, keeps none."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: self


def _subcommand(sub: Any, command: str | None, name: str, **kwargs: Any) -> Any:
    """A subparser with its options only if `name` is the command being run.

    argparse spends most of mlbuild's start-up (gettext lookups for every option
    of every subcommand); a no-op `mlbuild run` only needs `run`'s options.
    Unneeded subcommands are still listed by `mlbuild --help`.
    """
    if command in (None, name):
        return sub.add_parser(name, **kwargs)
    sub.add_parser(name, help=kwargs.get("help"), add_help=False)
    return _Ignored()


def _add_jobs(parser: Any) -> None:
    parser.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help="run up to N steps at once (default: the number of CPUs; on Ray, the cluster's)",
    )


def _resolve_jobs(args: argparse.Namespace) -> bool:
    """Check `-j`, or fill in this machine's CPUs; True when the user gave none."""
    auto = args.jobs is None
    if auto:
        args.jobs = os.cpu_count() or 1
    if args.jobs < 1:
        raise UsageError(f"-j {args.jobs}: needs at least 1")
    return auto


def command_word(words: Sequence[str]) -> str | None:
    """The subcommand in argv (skipping global options and their values), if any."""
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word in ("-f", "--file", "--set"):
            skip = True
        elif not word.startswith("-"):
            return word
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `command`, only that subcommand gets its options (see _subcommand)."""
    file_only = _Parser(add_help=False)
    file_only.add_argument(
        "-f",
        "--file",
        type=Path,
        default=argparse.SUPPRESS,
        help="the pipeline file (default: the nearest pipeline.toml upward)",
    )
    common = _Parser(add_help=False, parents=[file_only])
    common.add_argument(
        "--set",
        action="append",
        default=argparse.SUPPRESS,
        metavar="NAME=VALUE",
        help="override a parameter for this run (TOML-typed; TARGET.NAME for local ones)",
    )
    parser = _Parser(
        prog="mlbuild", description="Make for machine-learning pipelines.", parents=[common]
    )
    parser.add_argument("--version", action="version", version=f"mlbuild {mlbuild.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = _subcommand(sub, command, "run", parents=[common], help="bring targets up to date")
    run.add_argument("targets", nargs="*", metavar="TARGET")
    run.add_argument("-n", "--dry-run", action="store_true", help="say what would run")
    run.add_argument(
        "--force",
        nargs="*",
        metavar="TARGET",
        default=None,
        help="run these targets (all selected if none named) even if fresh",
    )
    _add_jobs(run)
    run.add_argument(
        "--no-wait",
        action="store_true",
        help="fail at once if another mlbuild is running in this workspace",
    )
    run.add_argument(
        "-k",
        "--keep-going",
        action="store_true",
        help="after a failure, build everything that does not depend on it",
    )
    run.add_argument("--explain", action="store_true", help="show the reasons for every target")
    run.add_argument(
        "--no-cache", action="store_true", help="do not restore outputs from the cache this run"
    )
    run.add_argument("-q", "--quiet", action="store_true", help="only failures and the summary")
    run.add_argument(
        "-v", "--verbose", action="store_true", help="also show commands and every reason"
    )
    run.add_argument("--plain", action="store_true", help="one line per event, even on a terminal")
    run.add_argument(
        "--watch", action="store_true", help="then rebuild on every change (`mlbuild watch`)"
    )
    run.add_argument(
        "--executor", choices=EXECUTOR_KINDS, help="where steps run (default: [executor] kind)"
    )
    run.add_argument("--address", metavar="ADDR", help="the Ray cluster (default: RAY_ADDRESS)")
    run.add_argument(
        "--remote-read-only",
        action="store_true",
        help="read the remote cache but upload nothing to it",
    )
    run.add_argument("--name", help="name the experiment row this run builds (`mlbuild exp show`)")
    run.set_defaults(handler=cmd_run)

    push = _subcommand(
        sub, command, "push", parents=[common], help="upload current outputs to the remote"
    )
    push.add_argument("targets", nargs="*", metavar="TARGET")
    push.set_defaults(handler=cmd_push)
    pull = _subcommand(
        sub, command, "pull", parents=[common], help="restore stale targets from the remote"
    )
    pull.add_argument("targets", nargs="*", metavar="TARGET")
    pull.set_defaults(handler=cmd_pull)

    watch = _subcommand(
        sub,
        command,
        "watch",
        parents=[common],
        help="build, then rebuild what every change affects",
    )
    watch.add_argument("targets", nargs="*", metavar="TARGET")
    _add_jobs(watch)
    watch.add_argument(
        "--executor", choices=EXECUTOR_KINDS, help="where steps run (default: [executor] kind)"
    )
    watch.add_argument("--address", metavar="ADDR", help="the Ray cluster (default: RAY_ADDRESS)")
    watch.add_argument(
        "--remote-read-only", action="store_true", help="read the remote cache, upload nothing"
    )
    watch.add_argument(
        "--debounce",
        type=float,
        default=150.0,
        metavar="MS",
        help="quiet period after the last change before a rebuild starts (default: 150)",
    )
    watch.add_argument(
        "--poll", action="store_true", help="poll instead of inotify (network filesystems)"
    )
    watch.add_argument("--explain", action="store_true", help="show the reasons for every target")
    watch.add_argument(
        "--no-cache", action="store_true", help="do not restore outputs from the cache"
    )
    watch.add_argument("-q", "--quiet", action="store_true", help="only failures and summaries")
    watch.add_argument(
        "--plain", action="store_true", help="one line per event (watch always writes this way)"
    )
    watch.add_argument(
        "-v", "--verbose", action="store_true", help="also show commands and ignored changes"
    )
    watch.set_defaults(handler=cmd_watch)

    status = _subcommand(sub, command, "status", parents=[common], help="what would run and why")
    status.add_argument("targets", nargs="*", metavar="TARGET")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "-v", "--verbose", action="store_true", help="name every point of a matrix target"
    )
    status.set_defaults(handler=cmd_status)

    lister = _subcommand(
        sub, command, "list", parents=[file_only], help="the targets, in build order"
    )
    lister.add_argument(
        "--names", action="store_true", help="target names only, one per line (for completion)"
    )
    lister.add_argument(
        "-v", "--verbose", action="store_true", help="name every point of a matrix target"
    )
    lister.set_defaults(handler=cmd_list)

    dag = _subcommand(sub, command, "dag", parents=[common], help="the graph: text, DOT or Mermaid")
    dag.add_argument("targets", nargs="*", metavar="TARGET")
    dag_form = dag.add_mutually_exclusive_group()
    dag_form.add_argument("--dot", action="store_true", help="Graphviz DOT (`dot -Tsvg`)")
    dag_form.add_argument("--mermaid", action="store_true", help="a Mermaid flowchart")
    dag.add_argument("--status", action="store_true", help="mark fresh and stale targets")
    dag.add_argument(
        "-v", "--verbose", action="store_true", help="name every point of a matrix target"
    )
    dag.set_defaults(handler=cmd_dag)

    log = _subcommand(
        sub, command, "log", parents=[file_only], help="past runs, or one target's history"
    )
    log.add_argument("target", nargs="?", metavar="TARGET")
    log.add_argument("-n", type=int, default=10, metavar="N", help="the last N (default: 10)")
    log.set_defaults(handler=cmd_log)

    show = _subcommand(sub, command, "show", parents=[file_only], help="a target's last manifest")
    show.add_argument("target", metavar="TARGET")
    show.add_argument("--json", action="store_true", help="machine-readable, whole digests")
    show.set_defaults(handler=cmd_show)

    gc = _subcommand(sub, command, "gc", parents=[file_only], help="prune the output cache")
    gc.add_argument("--max-size", metavar="SIZE", help="keep the newest entries up to SIZE (10GB)")
    gc.add_argument("--keep-runs", type=int, metavar="N", help="keep N older entries per target")
    gc.add_argument("--remote", action="store_true", help="trim the remote cache instead")
    gc.add_argument("--max-age", metavar="AGE", help="--remote: drop records older than AGE (30d)")
    gc.add_argument("--grace", metavar="AGE", help="--remote: keep blobs younger than AGE (1h)")
    gc.set_defaults(handler=cmd_gc)

    cache = _subcommand(sub, command, "cache", parents=[file_only], help="inspect the output cache")
    cache_sub = cache.add_subparsers(
        dest="cache_command", metavar="COMMAND", required=True, parser_class=_Parser
    )
    verify = cache_sub.add_parser("verify", parents=[file_only], help="find corrupted objects")
    verify.set_defaults(handler=cmd_cache_verify)

    exp = _subcommand(sub, command, "exp", parents=[file_only], help="the experiment table")
    exp_sub = exp.add_subparsers(
        dest="exp_command", metavar="{show,diff,apply,run}", required=True, parser_class=_Parser
    )
    exp_show = exp_sub.add_parser("show", parents=[file_only], help="every configuration built")
    exp_show.add_argument(
        "--all", action="store_true", help="every parameter, not only those that differ"
    )
    exp_show.add_argument("--sort", metavar="NAME", help="order by this metric or parameter")
    exp_show.add_argument("--reverse", action="store_true", help="largest first (with --sort)")
    exp_show.add_argument("--json", action="store_true", help="machine-readable")
    exp_show.set_defaults(handler=cmd_exp_show)
    exp_diff = exp_sub.add_parser("diff", parents=[file_only], help="two rows side by side")
    exp_diff.add_argument(
        "rows",
        nargs="*",
        metavar="ROW",
        help="id or name (default: the workspace and the row before it)",
    )
    exp_diff.set_defaults(handler=cmd_exp_diff)
    exp_apply = exp_sub.add_parser(
        "apply", parents=[file_only], help="set a row's params and rebuild it"
    )
    exp_apply.add_argument("row", metavar="ROW", help="id (or a unique prefix) or name")
    exp_apply.set_defaults(handler=cmd_exp_apply)
    exp_run = exp_sub.add_parser("run", parents=[file_only], help="a grid, each point sandboxed")
    exp_run.add_argument("targets", nargs="*", metavar="TARGET")
    exp_run.add_argument("--sweep", action="append", default=[], metavar="NAME=A,B,...")
    _add_jobs(exp_run)
    exp_run.add_argument(
        "-k", "--keep-going", action="store_true", help="a failed point stops none"
    )
    exp_run.set_defaults(handler=cmd_exp_run)

    plots = _subcommand(
        sub, command, "plots", parents=[file_only], help="draw declared plots into one offline page"
    )
    plots.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="PAGE",
        help="the HTML page, PNGs beside it (default: mlbuild_plots/index.html in the project)",
    )
    plots.add_argument(
        "--rows", metavar="ID,ID", help="overlay these experiment rows (from the cache)"
    )
    plots.add_argument("--x", metavar="PARAM", help="with --y: metrics against PARAM, all rows")
    plots.add_argument("--y", metavar="METRIC[,METRIC]", help="the metrics --x is drawn against")
    plots.set_defaults(handler=cmd_plots)

    workers = _subcommand(sub, command, "workers", parents=[file_only], help="kept warm workers")
    workers.add_argument("action", nargs="?", choices=["stop"], help="stop the keep-warm process")
    workers.set_defaults(handler=cmd_workers)

    clean = _subcommand(
        sub, command, "clean", parents=[file_only], help="remove targets' declared outputs"
    )
    clean.add_argument("targets", nargs="*", metavar="TARGET")
    clean.set_defaults(handler=cmd_clean)

    init = _subcommand(sub, command, "init", help="start a project: a pipeline that builds")
    init.add_argument("dir", nargs="?", default=".", metavar="DIR", help="(default: here)")
    init.set_defaults(handler=cmd_init)
    schema = _subcommand(sub, command, "schema", help="print pipeline.toml's JSON Schema")
    schema.set_defaults(handler=cmd_schema)
    completion = _subcommand(sub, command, "completion", help="print a shell completion script")
    completion.add_argument("shell", choices=("bash", "zsh", "fish"))
    completion.set_defaults(handler=cmd_completion)
    return parser


def load(args: argparse.Namespace) -> tuple[Pipeline, Graph]:
    """Find, read and check the pipeline named by `-f` (or the nearest one)."""
    file = getattr(args, "file", None) or find_pipeline(Path.cwd())
    graph = load_graph(file, parse_overrides(getattr(args, "set", None) or []))
    pipeline = graph.pipeline
    if pipeline.matrices:  # a matrix target's name stands for all its points (no import here)
        for attr in ("targets", "force"):
            if getattr(args, attr, None):
                setattr(args, attr, pipeline.expand(getattr(args, attr)))
        if getattr(args, "target", None) in pipeline.matrices:  # `show`, `log`: one point
            from mlbuild.ui.matrix_view import refuse_matrix_name

            refuse_matrix_name(args.target, pipeline)
    return pipeline, graph


def open_state(pipeline: Pipeline, reporter: Reporter) -> Store:
    return open_store(state_dir(pipeline.root), reporter.warn)


def cmd_run(args: argparse.Namespace) -> int:
    if args.watch:
        return cmd_watch(args)
    pipeline, graph = load(args)
    auto_jobs = _resolve_jobs(args)
    reporter = make_reporter(args)
    if args.dry_run:
        return dry_run(args, pipeline, graph, reporter)
    options = BuildOptions(
        targets=tuple(args.targets),
        force=None if args.force is None else frozenset(args.force),
        keep_going=args.keep_going,
        no_cache=args.no_cache,
        jobs=args.jobs,
        auto_jobs=auto_jobs,
        command_line=args.command_line,
        executor=args.executor,
        address=args.address,
        remote_read_only=args.remote_read_only,
        name=args.name,
        proof=getattr(args, "proof", None),
    )
    try:
        with hold_workspace(
            pipeline.root,
            args.command_line,
            wait=not args.no_wait,
            warn=reporter.warn,
            proof=options.proof,
        ) as store:
            write_params(pipeline, args)
            _plan(reporter, graph, store, options.targets, options.force, options.jobs)
            result = run_build(graph, store, reporter, options)
            # Read after the build: a restored target's duration is now its original run's.
            recorded = store.load_durations()
            keep_stamp(args, graph, result, recorded, store)
        reporter.summary(result, recorded)
    finally:
        reporter.close()  # gives the terminal back after Ctrl-C too
    return EXIT_OK if result.ok else EXIT_FAILED


def keep_stamp(
    args: argparse.Namespace,
    graph: Graph,
    result: BuildResult,
    recorded: Mapping[str, float],
    store: Store,
) -> None:
    """After a plain `mlbuild run` that brought every target up to date, the stamp the next
    one reads before loading anything (uptodate.py); the lock is held. Each target that
    was proven fresh keeps its files in it; one that ran or was restored is unproven.
    It closes `store` (the stamp holds the database's stat as it is left)."""
    if (
        args.targets
        or args.force is not None
        or getattr(args, "set", None)
        or args.name is not None
        or graph.origin is None
        or not result.proven
        or not result.ok
        or len(result.results) != len(graph.order)
    ):
        return
    proof: Proof | None = getattr(args, "proof", None)
    if proof is not None and not proof.valid:
        proof = None
    env: dict[str, str | None] = dict(proof.env) if proof is not None else {}
    proven = result.proven

    def entry_of(name: str) -> Entry:
        item = proven.get(name)
        if item is None:
            return (name, None, ())
        if isinstance(item, bytes):
            names, files, counts = signed_parts(item)
            env.update(names)
            return (name, counts, files)
        return (name, item[0], item[1])

    chunks = None
    if proof is not None:  # the chunks of targets it proved and the run skipped: as read
        skipped = {name for name, item in proven.items() if not isinstance(item, bytes)}
        chunks = proof.next_chunks(len(result.results), skipped, entry_of)
    if chunks is None:
        chunks = pack_entries([entry_of(r.name) for r in result.results])
    store.close()  # checkpoints the -wal into state.db: its stat is final from here
    state = state_identity(str(graph.pipeline.root))
    if state is None:
        return
    lines = head = note = ""  # what the stamp prints: only when it proves every target
    if len(proven) == len(result.results):
        lines = "".join([messages.step_skipped(r.name) + "\n" for r in result.results])
        head, note = summary_parts(result, recorded)
    key, sources = graph.origin
    stamp = Stamp(key, sources, tuple(env.items()), state, chunks, lines, head, note, result.row)
    write(str(graph.pipeline.root), stamp)


def write_params(pipeline: Pipeline, args: argparse.Namespace) -> dict[str, Any]:
    """`--set` of a params-file key goes into the file (as `dvc exp run -S`), said in one line.

    Returns the overrides left to apply in memory (those of `[params]` and local ones).
    """
    overrides = parse_overrides(getattr(args, "set", None) or [])
    if not overrides or not pipeline.param_sources:
        return overrides
    from mlbuild.pipeline.edit import write_overrides

    # The values as loaded: typed as each key is declared (see load.typed_override).
    typed = {k: pipeline.params[k] for k in overrides if k in pipeline.param_sources}
    for line in write_overrides(pipeline, typed):
        print(f"mlbuild: {line}", flush=True)
    return {k: v for k, v in overrides.items() if k not in pipeline.param_sources}


def _plan(
    reporter: CliReporter,
    graph: Graph,
    store: Store,
    targets: Sequence[str],
    force: frozenset[str] | None,
    jobs: int,
) -> None:
    """Tell the reporter what the build will decide (its bar and time left), before it starts."""
    if isinstance(reporter, PlainReporter):
        return  # the plain log needs no plan, and reading every duration costs
    selected = graph.select((*targets, *(force or ())))
    deps = {name: graph.deps[name] for name in selected}
    reporter.planned(BuildPlan(selected, deps, jobs, store.load_durations()))


def dry_run(
    args: argparse.Namespace, pipeline: Pipeline, graph: Graph, reporter: CliReporter
) -> int:
    """`run -n`: what `run` would do, told as it would be (the query; nothing runs)."""
    from mlbuild.build.query import Action, Query, as_result

    force = None if args.force is None else frozenset(args.force)
    start = time.perf_counter()
    try:
        with hold_workspace(
            pipeline.root, args.command_line, wait=not args.no_wait, warn=reporter.warn
        ) as store:
            _plan(reporter, graph, store, args.targets, force, args.jobs)
            query = Query(graph, store)
            predictions = query.predict(args.targets, force=force, no_cache=args.no_cache)
            query.save()
        for p in predictions:
            if p.action is Action.SKIP:
                reporter.skipped(p.name, p.decision)
            elif p.action is Action.RESTORE:
                reporter.would_restore(p.name, p.reasons)
            else:
                reporter.would_run(p.name, p.reasons)
        results = tuple(as_result(p) for p in predictions)
        reporter.summary(BuildResult(results, time.perf_counter() - start), {})
    finally:
        reporter.close()
    return EXIT_OK


def make_reporter(args: argparse.Namespace) -> CliReporter:
    """The live view on a terminal; the plain log when piped, with `--plain` or with `-q`."""
    prefix = args.jobs > 1
    terminal = sys.stdout.isatty() and os.environ.get("TERM") != "dumb"
    if terminal and not (args.quiet or args.plain):
        from mlbuild.ui.progress import LiveReporter  # rich itself only once something is drawn

        return LiveReporter(verbose=args.verbose, explain=args.explain, prefix=prefix)
    verbosity = -1 if args.quiet else (1 if args.verbose else 0)
    return PlainReporter(verbosity=verbosity, explain=args.explain or args.verbose, prefix=prefix)


def cmd_watch(args: argparse.Namespace) -> int:
    """`mlbuild watch` and `mlbuild run --watch`; Ctrl-C is how it ends, so that exits 0."""
    from mlbuild.watch import Watcher, WatchOptions  # watchdog is imported only when watching

    if getattr(args, "dry_run", False):
        raise UsageError("--watch and --dry-run do not go together")
    auto_jobs = _resolve_jobs(args)
    debounce_ms: float = getattr(args, "debounce", 150.0)
    if debounce_ms < 0:
        raise UsageError(f"--debounce {debounce_ms:g}: needs 0 or more milliseconds")
    verbosity = -1 if args.quiet else (1 if args.verbose else 0)
    reporter = PlainReporter(verbosity=verbosity, explain=args.explain, prefix=args.jobs > 1)
    force = getattr(args, "force", None)  # `run --watch --force`: the first build only
    # Params-file keys are written once; later edits of the file by the user then count.
    overrides = parse_overrides(getattr(args, "set", None) or [])
    if overrides:
        overrides = write_params(load(args)[0], args)
    watcher = Watcher(
        getattr(args, "file", None) or find_pipeline(Path.cwd()),
        reporter,
        sys.stdout,
        sys.stderr,
        targets=args.targets,
        overrides=overrides,
        options=WatchOptions(
            debounce=debounce_ms / 1000, poll=getattr(args, "poll", False), verbosity=verbosity
        ),
        build=BuildOptions(
            force=None if force is None else frozenset(force),
            no_cache=args.no_cache,
            jobs=args.jobs,
            auto_jobs=auto_jobs,
            command_line=args.command_line,
            executor=getattr(args, "executor", None),
            address=getattr(args, "address", None),
            remote_read_only=getattr(args, "remote_read_only", False),
        ),
    )
    return watcher.run()


def _require_remote(pipeline: Pipeline, command: str) -> None:
    if pipeline.cache.remote is None:
        raise UsageError(
            f"{pipeline.display_file}: cache.remote: not set; `mlbuild {command}` needs a remote"
        )


def cmd_pull(args: argparse.Namespace) -> int:
    """Restore stale targets from the caches (local, then remote), running none; 1 if any left."""
    pipeline, graph = load(args)  # without a remote, the local cache alone
    reporter = PlainReporter()
    options = BuildOptions(
        targets=tuple(args.targets),
        restore_only=True,
        remote_read_only=True,
        command_line=args.command_line,
    )
    with hold_workspace(pipeline.root, args.command_line, wait=True, warn=reporter.warn) as store:
        result = run_build(graph, store, reporter, options)
    reporter.summary(result)
    return EXIT_FAILED if result.count_of(Outcome.NOT_RUN) or not result.ok else EXIT_OK


def cmd_push(args: argparse.Namespace) -> int:
    """Upload the outputs of up-to-date targets to the remote; 1 if any could not be."""
    from mlbuild.build.query import Action, Query
    from mlbuild.remote import RemoteCache, local_cache, push_targets

    pipeline, graph = load(args)
    _require_remote(pipeline, "push")
    if not pipeline.cache.remote_write:
        raise UsageError(f"{pipeline.display_file}: cache.remote_write is false: pushing is off")
    reporter = PlainReporter()
    remote = RemoteCache(pipeline.cache, local_cache(pipeline), reporter.warn)
    with hold_workspace(pipeline.root, args.command_line, wait=True, warn=reporter.warn) as store:
        checked = Query(graph, store).predict(args.targets)
        fresh = [p.name for p in checked if p.action is Action.SKIP]
        try:
            pushed = push_targets(pipeline, store, fresh, remote)
        finally:
            remote.finish()
    for p in checked:
        if p.action is not Action.SKIP:
            print(f"`{p.name}` not pushed: not up to date (`mlbuild run` it first)")
    for done in pushed:
        print(f"`{done.target}` {done.note}")
    left = len(checked) - sum(1 for done in pushed if done.ok)
    return EXIT_FAILED if left or remote.disabled else EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    """Fresh, would restore, or would run, and why; 1 if anything is stale. Writes nothing
    and takes no lock, so it answers while a build runs."""
    from mlbuild.build.query import Action, Query, restore_note

    pipeline, graph = load(args)
    with open_state(pipeline, PlainReporter(verbosity=-1)) as store:
        predictions = Query(graph, store).predict(args.targets)
    stale = [p for p in predictions if p.action is not Action.SKIP]
    if args.json:
        rows = [
            {
                "target": p.name,
                "fresh": p.action is Action.SKIP,
                "action": p.action.value,
                "reasons": list(p.reasons),
            }
            for p in predictions
        ]
        print(json.dumps({"stale": len(stale), "targets": rows}, indent=2))
    elif pipeline.matrices:
        from mlbuild.ui.matrix_view import status_lines

        sys.stdout.write("".join(status_lines(predictions, pipeline, args.verbose)))
    else:
        lines: list[str] = []  # written at once: a print per target costs as much as its check
        for p in predictions:
            state = "fresh" if p.action is Action.SKIP else "stale"
            detail = f": {'; '.join(p.reasons)}" if p.reasons else ""
            lines.append(f"{state:6} {p.name}{detail}{restore_note(p)}\n")
        sys.stdout.write("".join(lines))
    return EXIT_FAILED if stale else EXIT_OK


def cmd_dag(args: argparse.Namespace) -> int:
    from mlbuild.ui.dag import render_dot, render_mermaid, render_text

    pipeline, graph = load(args)
    names = graph.select(args.targets)
    status = None
    if args.status:
        from mlbuild.build.query import Query, as_result

        with open_state(pipeline, PlainReporter(verbosity=-1)) as store:
            predictions = Query(graph, store).predict(args.targets)
        status = {p.name: as_result(p, noted=True) for p in predictions}
    if pipeline.matrices and not args.verbose:  # a matrix target as one node
        from mlbuild.ui.matrix_view import collapse

        graph, names, status = collapse(graph, names, status)
    render = render_dot if args.dot else render_mermaid if args.mermaid else render_text
    sys.stdout.write(render(graph, names, status))
    return EXIT_OK


def cmd_log(args: argparse.Namespace) -> int:
    from mlbuild.ui.history import render_runs, render_target_runs

    if args.n < 1:
        raise UsageError(f"-n {args.n}: needs at least 1")
    with _history(args, args.target) as store:
        if store is None:
            text = "No runs recorded yet.\n"
        elif args.target is None:
            text = render_runs(store.load_runs(args.n))
        else:
            text = render_target_runs(args.target, store.load_target_runs(args.target, args.n))
            log = log_path(store.path.parent.parent, args.target)
            if log.exists():
                from mlbuild.pipeline.schema import display_path

                text += f"output of its last step: {display_path(log)}\n"
    sys.stdout.write(text)
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    """A target's last manifest; exit 1 when it has none (never built, or its last run failed)."""
    from mlbuild.pipeline.schema import display_path
    from mlbuild.ui.history import manifest_json, render_manifest

    name = args.target
    with _history(args, name) as store:
        stored = store.load_manifest(name) if store is not None else None
        if store is None or stored is None:
            print(
                f"`{name}` has no manifest: it was never built, or its last run failed"
                f" (see `mlbuild log {name}`)."
            )
            return EXIT_FAILED
        built_by = next(iter(store.load_target_runs(name, 1, ("ran", "restored"))), None)
        log = log_path(store.path.parent.parent, name)
        shown = Path(display_path(log)) if log.exists() else None
        render = manifest_json if args.json else render_manifest
        sys.stdout.write(render(name, stored, built_by, shown))
    return EXIT_OK


@contextlib.contextmanager
def _history(args: argparse.Namespace, target: str | None) -> Iterator[Store | None]:
    """The state to read history from (None if nothing was ever built); checks `target`.

    A target the pipeline no longer has is fine while the state remembers it.
    """
    pipeline, graph = load(args)
    store = open_existing_store(state_dir(pipeline.root), PlainReporter().warn)
    with contextlib.nullcontext() if store is None else store:
        if target is None or target in graph.targets:
            pass
        elif store is None or target not in store.known_targets():
            graph.select([target])  # a usage error, with "did you mean"
        yield store


def cmd_list(args: argparse.Namespace) -> int:
    pipeline, graph = load(args)
    if args.names:
        names = [*pipeline.matrices, *graph.order]  # a matrix target's name selects its points
        sys.stdout.write("".join(f"{name}\n" for name in names))
        return EXIT_OK
    if pipeline.matrices:
        from mlbuild.ui.matrix_view import list_lines

        sys.stdout.write("".join(list_lines(graph, args.verbose)))
        return EXIT_OK
    lines: list[str] = []  # written at once, as `status` does
    for name in graph.order:
        target = graph.targets[name]
        action = target.cmd if target.kind is ActionKind.SHELL else target.shown
        needs = f"  (after {', '.join(graph.deps[name])})" if graph.deps[name] else ""
        lines.append(f"{name}: {target.description or action}{needs}\n")
    sys.stdout.write("".join(lines))
    return EXIT_OK


def cmd_workers(args: argparse.Namespace) -> int:
    """`mlbuild workers [stop]`: the workspace's keep-warm process (exec/keepwarm.py)."""
    from mlbuild.exec.keepwarm import show, stop

    pipeline, _ = load(args)
    print(stop(pipeline.root) if args.action == "stop" else "\n".join(show(pipeline.root)))
    return EXIT_OK


def cmd_gc(args: argparse.Namespace) -> int:
    from mlbuild.cache import Cache, collect_garbage, parse_size
    from mlbuild.manifest import Fingerprint

    pipeline, _ = load(args)
    try:
        max_size = parse_size(args.max_size) if args.max_size else None
    except ValueError as exc:
        raise UsageError(f"--max-size: {exc}") from None
    if max_size is not None and max_size < 0:
        raise UsageError(f"--max-size {args.max_size}: needs 0 or more bytes")
    if args.remote:
        return _gc_remote(args, pipeline, max_size)
    if args.max_age or args.grace:
        raise UsageError("--max-age and --grace are for `mlbuild gc --remote`")
    if args.keep_runs is not None and args.keep_runs < 0:
        raise UsageError(f"--keep-runs {args.keep_runs}: must be 0 or more")
    reporter = PlainReporter()
    with hold_workspace(pipeline.root, args.command_line, wait=True, warn=reporter.warn) as store:
        current: dict[str, dict[str, str]] = {}
        for target, stored in store.load_manifests().items():
            fingerprint = Fingerprint.from_json(stored.data)
            if fingerprint is not None:
                current[target] = dict(fingerprint.outputs)
        cache = Cache(cache_dir(pipeline.root), reporter.warn)
        report = collect_garbage(cache, current, max_size=max_size, keep_runs=args.keep_runs)
        trashed = empty_trash(pipeline.root)
    if trashed:
        print(
            f"mlbuild gc: emptied {messages.plural(trashed, 'trash folder')} older than a week"
            " (.mlbuild/trash/)"
        )
    removed = messages.plural(report.entries_removed, "entry", "entries")
    kept = messages.plural(report.entries_kept, "entry", "entries")
    print(
        f"mlbuild gc: removed {removed} and {messages.plural(report.objects_removed, 'object')},"
        f" freed {_size(report.bytes_freed)}; kept {kept} ({_size(report.bytes_kept)})."
    )
    if max_size is None and args.keep_runs is None:
        print("  (every entry kept: use --max-size or --keep-runs to drop older ones)")
    return EXIT_OK


def _gc_remote(args: argparse.Namespace, pipeline: Pipeline, max_size: int | None) -> int:
    """`mlbuild gc --remote`: records by age and size, then unnamed blobs (remote_gc.py)."""
    from mlbuild.remote import Remote
    from mlbuild.remote_gc import GRACE_SECONDS, parse_age, trim_remote

    _require_remote(pipeline, "gc --remote")
    if args.keep_runs is not None:
        raise UsageError("--keep-runs is for the local cache; with --remote use --max-age")
    if not pipeline.cache.remote_write:
        raise UsageError(f"{pipeline.display_file}: cache.remote_write: false; gc cannot delete")
    ages = {}
    for flag, text in (("--max-age", args.max_age), ("--grace", args.grace)):
        try:
            ages[flag] = parse_age(text) if text else None
        except ValueError as exc:
            raise UsageError(f"{flag}: {exc}") from None
    assert pipeline.cache.remote is not None
    remote = Remote(pipeline.cache.remote, pipeline.cache.remote_options)
    grace = ages["--grace"]
    report = trim_remote(
        remote,
        max_age=ages["--max-age"],
        max_size=max_size,
        grace=GRACE_SECONDS if grace is None else grace,
    )
    broken = f" (and {report.broken_removed} written meanwhile)" if report.broken_removed else ""
    print(
        f"mlbuild gc --remote: removed {messages.plural(report.records_removed, 'record')}{broken}"
        f" and {messages.plural(report.blobs_removed, 'blob')}, freed {_size(report.bytes_freed)};"
        f" kept {messages.plural(report.records_kept, 'record')} ({_size(report.bytes_kept)})."
    )
    return EXIT_OK


def cmd_cache_verify(args: argparse.Namespace) -> int:
    from mlbuild.cache import Cache, verify_objects

    pipeline, _ = load(args)
    reporter = PlainReporter()
    with hold_workspace(pipeline.root, args.command_line, wait=True, warn=reporter.warn):
        report = verify_objects(Cache(cache_dir(pipeline.root), reporter.warn))
    for digest in report.corrupt:
        print(f"corrupted object {digest} removed (its entries will be dropped when used)")
    for key, why in report.bad:
        print(f"invalid entry {key} removed: {why}")
    for key, why in report.kept:
        print(f"invalid entry {key} could not be removed (remove it by hand): {why}")
    objects = messages.plural(report.objects, "object")
    checked = f"{objects} and {messages.plural(report.entries, 'entry', 'entries')}"
    bad = len(report.corrupt) + len(report.bad) + len(report.kept)
    print(f"mlbuild cache verify: {checked} checked, {bad} corrupted.")
    return EXIT_FAILED if bad else EXIT_OK


def _size(n: int) -> str:
    """Bytes in decimal units, as `--max-size` reads them."""
    if n < 1000:
        return f"{n} B"
    value = float(n)
    units = ["kB", "MB", "GB", "TB"]
    for unit in units:
        value /= 1000
        if value < 1000 or unit == units[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def cmd_exp_show(args: argparse.Namespace) -> int:
    from mlbuild.experiments import check_column
    from mlbuild.ui.experiments import print_table, sort_rows

    table = _experiments(load(args)[0])
    if args.sort is not None:
        table = sort_rows(table, check_column(table, args.sort), args.reverse)
    terminal = sys.stdout.isatty() and os.environ.get("TERM") != "dumb"
    print_table(table, every=args.all, as_json=args.json, terminal=terminal)
    return EXIT_OK


def cmd_exp_diff(args: argparse.Namespace) -> int:
    from mlbuild.experiments import diff_pair
    from mlbuild.ui.experiments import render_diff

    sys.stdout.write(render_diff(*diff_pair(_experiments(load(args)[0]), args.rows)))
    return EXIT_OK


def cmd_exp_apply(args: argparse.Namespace) -> int:
    """Write a row's parameters into the pipeline's files, then build: what the cache
    holds for that configuration is restored, the rest runs."""
    from mlbuild.build.lock import WorkspaceLock
    from mlbuild.experiments import apply_params, find_row

    pipeline, _ = load(args)
    row = find_row(_experiments(pipeline), args.row, "apply")  # an unknown row changes nothing
    # Not under a running build: its steps may read the params files themselves.
    warn = PlainReporter().warn
    with WorkspaceLock(state_dir(pipeline.root), args.command_line, wait=True, notify=warn):
        lines = apply_params(load(args)[0], row)
    for line in lines:
        print(f"exp apply: {line}")
    run = build_parser("run").parse_args(["run", "-f", str(pipeline.file)])
    run.command_line = args.command_line
    return cmd_run(run)


def cmd_exp_run(args: argparse.Namespace) -> int:
    """Build a grid of parameter values, each point in a sandbox (build/sweep.py)."""
    from mlbuild.build.sweep import SweepOptions, sweep_command

    _resolve_jobs(args)  # points at once: this machine's CPUs unless -j says
    options = SweepOptions(
        tuple(args.sweep), tuple(args.targets), args.jobs, args.keep_going, args.command_line, main
    )
    return sweep_command(load(args)[1], options)


def _experiments(pipeline: Pipeline) -> list[Row]:
    """Every experiment row (none when nothing was ever built)."""
    from mlbuild.experiments import rows

    store = open_existing_store(state_dir(pipeline.root), PlainReporter().warn)
    if store is None:
        return []
    with store:
        return rows(store, pipeline.root)


def cmd_plots(args: argparse.Namespace) -> int:
    """Draw the declared plots (or metrics against a parameter) into one offline HTML page."""
    from mlbuild.pipeline.schema import display_path
    from mlbuild.ui.plots import make_report, plot_request

    pipeline, _ = load(args)
    report = make_report(pipeline, plot_request(args.output, args.rows, args.x, args.y))
    for note in report.notes:
        tell(f"mlbuild plots: left out {note}")
    count = len(report.images)
    images = f"{count} PNG{'' if count == 1 else 's'}"
    print(f"mlbuild plots: wrote {display_path(report.page)} and {images} beside it")
    return EXIT_OK


def cmd_clean(args: argparse.Namespace) -> int:
    """Remove targets' outputs: those mlbuild made are deleted, anything else moved aside.

    A target removed from the pipeline can still be named: its outputs are the
    ones its last manifest recorded. Without names, only the pipeline's targets
    are cleaned, and the removed ones with outputs on record are pointed out.
    """
    from mlbuild.build.results import RunStatus
    from mlbuild.fingerprint import Fingerprinter
    from mlbuild.manifest import Fingerprint, is_missing
    from mlbuild.pipeline.schema import Port, Target
    from mlbuild.staleness import observe_paths
    from mlbuild.store import RunRow

    pipeline, graph = load(args)
    names = list(args.targets) or list(graph.order)
    root = pipeline.root
    reporter = PlainReporter()
    started_at = time.time()
    with hold_workspace(root, args.command_line, wait=True, warn=reporter.warn) as store:
        manifests = store.load_manifests()
        removed = {
            name: Fingerprint.from_json(stored.data)
            for name, stored in manifests.items()
            if name not in graph.targets
        }
        if removed and args.targets:  # a removed matrix target's name: its recorded points
            points = {n: [p for p in removed if p.startswith(n + "@")] for n in names}
            names = [p for n in names for p in (points[n] if points[n] else [n])]
        graph.select(name for name in names if name not in removed)  # unknown: usage error
        fp = Fingerprinter(root, store.load_stats())
        for name in names:
            before = Fingerprint.from_json(manifests[name].data) if name in manifests else None
            if name in graph.targets:
                target = graph.targets[name]
            else:  # no longer in the pipeline: what its manifest says it made
                recorded = before.outputs if before is not None else {}
                ports = tuple(Port(None, path) for path in recorded)
                target = Target(name, None, None, None, (), ports, {})
            paths = [p.path for p in target.outputs]
            for path in paths:
                check_writable(root, pipeline.display_file, target, path)
            current = observe_paths(fp, paths, {})
            known = before.outputs if before is not None else load_made(root, name)
            store.forget([name])
            forget_made(root, name)
            moved = dict(clear_outputs(root, pipeline.display_file, target, current, known))
            for path in paths:
                if path in moved:
                    print(f"moved {path} to {moved[path]} (not made by mlbuild, or changed since)")
                elif not is_missing(current[path]):
                    print(f"removed {path}")
        # In the history, so that `status` says its outputs were cleaned, not "never built".
        cleaned = [RunRow(n, Outcome.CLEANED.value, 0.0, "") for n in names if n in manifests]
        if cleaned:
            store.record_run(started_at, args.command_line, RunStatus.OK.value, cleaned)
    left = sorted(set(removed) - set(names))
    if left:
        print(
            f"kept the outputs of {messages.plural(len(left), 'target')} no longer in"
            f" {pipeline.display_file}: {', '.join(left)}"
            f" (`mlbuild clean {' '.join(left)}` removes them)"
        )
    return EXIT_OK


def cmd_init(args: argparse.Namespace) -> int:
    from shlex import quote

    from mlbuild.scaffold import write_scaffold

    written = write_scaffold(Path(args.dir))
    print(f"mlbuild init: wrote {', '.join(written)}")
    go = "" if args.dir == "." else f"cd {quote(args.dir)} && "
    print(f"next: {go}mlbuild run  (a second `mlbuild run` finds nothing to do)")
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from mlbuild.pipeline.schema_file import schema_text

    sys.stdout.write(schema_text())
    return EXIT_OK


def cmd_completion(args: argparse.Namespace) -> int:
    from mlbuild.ui.completion import completion_script

    sys.stdout.write(completion_script(build_parser(None), args.shell))
    return EXIT_OK


# SIGINT is installed too: a shell starts background jobs of a script with SIGINT ignored,
# and Python then leaves it ignored, so `kill -INT` would not stop `mlbuild watch &`.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM and SIGHUP (a closed terminal) are handled like Ctrl-C: stop the running
    steps, keep what finished. Left to their default, mlbuild would die at once and leave
    its steps running to write their outputs after it."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None, proof: Proof | None = None) -> int:
    """The `mlbuild` command in full (cli.main asks the stamp first); returns the exit code.

    `proof`: the targets the up-to-date stamp proved fresh (uptodate.py), for `run`.
    """
    previous = {signum: signal.signal(signum, _terminate) for signum in STOP_SIGNALS}
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        code = _dispatch(words, proof)
        _flush_stdout()
        return code
    except KeyboardInterrupt:
        tell(messages.interrupted())
        return EXIT_INTERRUPTED
    except Interrupted as exc:
        tell(f"mlbuild: {exc}")
        return EXIT_INTERRUPTED
    except MlbuildError as exc:
        tell(messages.error(str(exc)))
        return exc.exit_code
    except OSError as exc:
        if exc.errno not in (errno.EPIPE, errno.EIO) or not stdout_closed():
            raise
        silence_stdout(sys.stdout)
        if _interrupted(exc):  # a closed terminal: SIGHUP, then the last redraw failed
            tell(messages.interrupted())
            return EXIT_INTERRUPTED
        if command_word(words) in ("run", "watch", "pull", "push"):
            tell(messages.error(f"cannot write to stdout: {exc.strerror}"))
            return EXIT_FAILED
        # `mlbuild list | head -1`: the reader took what it wanted.
        return EXIT_OK
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _flush_stdout() -> None:
    """Flush now, while a reader that left can be let go quietly (at exit, Python would
    print a BrokenPipeError and exit 120)."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        silence_stdout(sys.stdout)


def _interrupted(exc: BaseException) -> bool:
    """Whether `exc` was raised while handling a KeyboardInterrupt (in a `finally`)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__context__
    return False


SET_COMMANDS = ("run", "watch", "status", "dag", "push", "pull")  # where parameters matter


def _dispatch(words: list[str], proof: Proof | None = None) -> int:
    args, unknown = build_parser(command_word(words)).parse_known_args(words)
    if unknown:
        # argparse reports these from the top-level parser; point at the subcommand.
        raise UsageError(
            f"unrecognized arguments: {' '.join(unknown)} (see `mlbuild {args.command} --help`)"
        )
    if getattr(args, "set", None) and args.command not in SET_COMMANDS:
        # Given before the subcommand, --set is taken by the top-level parser.
        raise UsageError(
            f"--set has no effect on `mlbuild {args.command}`"
            f" (it applies to {', '.join(SET_COMMANDS)})"
        )
    args.command_line = " ".join(words)
    args.proof = proof
    handler: Any = args.handler
    return int(handler(args))


def tell(line: str) -> None:
    """One line on stderr, if stderr is still there (not after a closed terminal)."""
    with contextlib.suppress(OSError, ValueError):
        print(line, file=sys.stderr)
