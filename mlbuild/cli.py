"""The command line: argv to a chain of plain steps, and the only place choosing exit codes.

Exit codes: 0 success; 1 a target failed (or `status` found stale targets);
2 a mistake in the pipeline file or on the command line; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from mlbuild.config import STATE_DIR, Pipeline, find_pipeline, load_pipeline, parse_overrides
from mlbuild.errors import Interrupted, MlbuildError, UsageError
from mlbuild.graph import Graph, build_graph
from mlbuild.lock import WorkspaceLock
from mlbuild.report import PlainReporter
from mlbuild.results import BuildOptions, Outcome
from mlbuild.runner import remove_outputs, run_build
from mlbuild.store import Store, open_store

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line and exit code 2, via UsageError."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "-f",
        "--file",
        type=Path,
        default=argparse.SUPPRESS,
        help="the pipeline file (default: the nearest pipeline.toml upward)",
    )
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
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", parents=[common], help="bring targets up to date")
    run.add_argument("targets", nargs="*", metavar="TARGET")
    run.add_argument("-n", "--dry-run", action="store_true", help="say what would run")
    run.add_argument(
        "--force",
        nargs="*",
        metavar="TARGET",
        default=None,
        help="run these targets (all selected if none named) even if fresh",
    )
    run.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        metavar="N",
        help="run up to N steps at once (default: the number of CPUs)",
    )
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
    run.add_argument("-v", "--verbose", action="store_true", help="also show commands")
    run.add_argument(
        "--watch", action="store_true", help="then rebuild on every change (`mlbuild watch`)"
    )
    run.set_defaults(handler=cmd_run)

    watch = sub.add_parser(
        "watch", parents=[common], help="build, then rebuild what every change affects"
    )
    watch.add_argument("targets", nargs="*", metavar="TARGET")
    watch.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        metavar="N",
        help="run up to N steps at once (default: the number of CPUs)",
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
        "-v", "--verbose", action="store_true", help="also show commands and ignored changes"
    )
    watch.set_defaults(handler=cmd_watch)

    status = sub.add_parser("status", parents=[common], help="what would run and why")
    status.add_argument("targets", nargs="*", metavar="TARGET")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=cmd_status)

    lister = sub.add_parser("list", parents=[common], help="the targets, in build order")
    lister.set_defaults(handler=cmd_list)

    gc = sub.add_parser("gc", parents=[common], help="prune the output cache")
    gc.add_argument("--max-size", metavar="SIZE", help="keep the newest entries up to SIZE (10GB)")
    gc.add_argument("--keep-runs", type=int, metavar="N", help="keep N older entries per target")
    gc.set_defaults(handler=cmd_gc)

    cache = sub.add_parser("cache", parents=[common], help="inspect the output cache")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True, parser_class=_Parser)
    verify = cache_sub.add_parser("verify", parents=[common], help="find corrupted objects")
    verify.set_defaults(handler=cmd_cache_verify)

    clean = sub.add_parser("clean", parents=[common], help="remove targets' declared outputs")
    clean.add_argument("targets", nargs="*", metavar="TARGET")
    clean.set_defaults(handler=cmd_clean)
    return parser


def load(args: argparse.Namespace) -> tuple[Pipeline, Graph]:
    """Find, read and check the pipeline named by `-f` (or the nearest one)."""
    file = getattr(args, "file", None) or find_pipeline(Path.cwd())
    pipeline = load_pipeline(file, parse_overrides(getattr(args, "set", None) or []))
    return pipeline, build_graph(pipeline)


def open_state(pipeline: Pipeline, reporter: PlainReporter) -> Store:
    return open_store(pipeline.root / STATE_DIR, reporter.warn)


def cmd_run(args: argparse.Namespace) -> int:
    if args.watch:
        return cmd_watch(args)
    pipeline, graph = load(args)
    if args.jobs < 1:
        raise UsageError(f"-j {args.jobs}: needs at least 1")
    verbosity = -1 if args.quiet else (1 if args.verbose else 0)
    reporter = PlainReporter(verbosity=verbosity, explain=args.explain, prefix=args.jobs > 1)
    options = BuildOptions(
        targets=tuple(args.targets),
        force=None if args.force is None else frozenset(args.force),
        dry_run=args.dry_run,
        keep_going=args.keep_going,
        no_cache=args.no_cache,
        jobs=args.jobs,
        command_line=args.command_line,
    )
    state_dir = pipeline.root / STATE_DIR
    with WorkspaceLock(state_dir, args.command_line, wait=not args.no_wait, notify=reporter.warn):
        if os.path.isdir(state_dir / "running") and os.listdir(state_dir / "running"):
            # Steps of an mlbuild that was killed; the executor (and subprocess)
            # is imported only then, keeping it off the no-op path.
            from mlbuild.executor import reap_orphans

            for name in reap_orphans(pipeline.root):
                reporter.warn(f"stopped step `{name}` left running by an mlbuild that was killed")
        with open_state(pipeline, reporter) as store:
            result = run_build(graph, store, reporter, options)
    reporter.summary(result)
    return EXIT_OK if result.ok else EXIT_FAILED


def cmd_watch(args: argparse.Namespace) -> int:
    """`mlbuild watch` and `mlbuild run --watch`; Ctrl-C is how it ends, so that exits 0."""
    from mlbuild.watch import Watcher, WatchOptions  # watchdog is imported only when watching

    if getattr(args, "dry_run", False):
        raise UsageError("--watch and --dry-run do not go together")
    if args.jobs < 1:
        raise UsageError(f"-j {args.jobs}: needs at least 1")
    debounce_ms: float = getattr(args, "debounce", 150.0)
    if debounce_ms < 0:
        raise UsageError(f"--debounce {debounce_ms:g}: needs 0 or more milliseconds")
    verbosity = -1 if args.quiet else (1 if args.verbose else 0)
    reporter = PlainReporter(verbosity=verbosity, explain=args.explain, prefix=args.jobs > 1)
    force = getattr(args, "force", None)  # `run --watch --force`: the first build only
    watcher = Watcher(
        getattr(args, "file", None) or find_pipeline(Path.cwd()),
        reporter,
        sys.stdout,
        sys.stderr,
        targets=args.targets,
        overrides=parse_overrides(getattr(args, "set", None) or []),
        options=WatchOptions(
            debounce=debounce_ms / 1000, poll=getattr(args, "poll", False), verbosity=verbosity
        ),
        build=BuildOptions(
            force=None if force is None else frozenset(force),
            no_cache=args.no_cache,
            jobs=args.jobs,
            command_line=args.command_line,
        ),
    )
    return watcher.run()


def cmd_status(args: argparse.Namespace) -> int:
    pipeline, graph = load(args)
    silent = PlainReporter(verbosity=-1)
    options = BuildOptions(targets=tuple(args.targets), dry_run=True, read_only=True)
    with open_state(pipeline, silent) as store:
        result = run_build(graph, store, silent, options)
    stale = [r for r in result.results if r.outcome is not Outcome.SKIPPED]
    if args.json:
        rows = [
            {"target": r.name, "fresh": r.outcome is Outcome.SKIPPED, "reasons": list(r.reasons)}
            for r in result.results
        ]
        print(json.dumps({"stale": len(stale), "targets": rows}, indent=2))
    else:
        for r in result.results:
            state = "fresh" if r.outcome is Outcome.SKIPPED else "stale"
            detail = f": {'; '.join(r.reasons)}" if r.reasons else ""
            print(f"{state:6} {r.name}{detail}")
    return EXIT_FAILED if stale else EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    _, graph = load(args)
    for name in graph.order:
        target = graph.targets[name]
        action = target.cmd if target.cmd is not None else f"python {target.python}"
        needs = f"  (after {', '.join(graph.deps[name])})" if graph.deps[name] else ""
        print(f"{name}: {target.description or action}{needs}")
    return EXIT_OK


def cmd_gc(args: argparse.Namespace) -> int:
    from mlbuild.cache import Cache, collect_garbage, parse_size
    from mlbuild.staleness import Fingerprint

    pipeline, _ = load(args)
    try:
        max_size = parse_size(args.max_size) if args.max_size else None
    except ValueError as exc:
        raise UsageError(f"--max-size: {exc}") from None
    reporter = PlainReporter()
    with open_state(pipeline, reporter) as store:
        current: dict[str, dict[str, str]] = {}
        for target, stored in store.load_manifests().items():
            fingerprint = Fingerprint.from_json(stored.data)
            if fingerprint is not None:
                current[target] = dict(fingerprint.outputs)
    cache = Cache(pipeline.root / STATE_DIR / "cache")
    report = collect_garbage(cache, current, max_size=max_size, keep_runs=args.keep_runs)
    print(
        f"mlbuild gc: removed {report.entries_removed} entries and {report.objects_removed}"
        f" objects, freed {_size(report.bytes_freed)}; kept {report.entries_kept} entries"
        f" ({_size(report.bytes_kept)})."
    )
    if max_size is None and args.keep_runs is None:
        print("  (every entry kept: use --max-size or --keep-runs to drop older ones)")
    return EXIT_OK


def cmd_cache_verify(args: argparse.Namespace) -> int:
    from mlbuild.cache import Cache, verify_objects

    pipeline, _ = load(args)
    checked, corrupt = verify_objects(Cache(pipeline.root / STATE_DIR / "cache"))
    for digest in corrupt:
        print(f"corrupted object {digest} removed (its entries will be dropped when used)")
    print(f"mlbuild cache verify: {checked} objects checked, {len(corrupt)} corrupted.")
    return EXIT_FAILED if corrupt else EXIT_OK


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


def cmd_clean(args: argparse.Namespace) -> int:
    pipeline, graph = load(args)
    names = list(args.targets) or list(graph.order)
    graph.select(names)  # unknown names are a usage error
    root = pipeline.root.resolve()
    reporter = PlainReporter()
    with open_state(pipeline, reporter) as store:
        store.forget(names)
        for name in names:
            target = graph.targets[name]
            for port in target.outputs:
                real = Path(os.path.realpath(root / port.path))
                if real != root and root not in real.parents:
                    raise UsageError(
                        f"{pipeline.display_file}: targets.{name}.outputs: '{port.path}'"
                        " resolves outside the project; not removing it"
                    )
            existing = [p.path for p in target.outputs if os.path.lexists(root / p.path)]
            remove_outputs(root, target)
            for path in existing:
                print(f"removed {path}")
    return EXIT_OK


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM is handled like Ctrl-C: stop the running steps, keep what finished."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mlbuild` command; returns the exit code."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        words = list(sys.argv[1:] if argv is None else argv)
        args, unknown = build_parser().parse_known_args(words)
        if unknown:
            # argparse reports these from the top-level parser; point at the subcommand.
            raise UsageError(
                f"unrecognized arguments: {' '.join(unknown)} (see `mlbuild {args.command} --help`)"
            )
        args.command_line = " ".join(words)
        handler: Any = args.handler
        return int(handler(args))
    except KeyboardInterrupt:
        print("mlbuild: interrupted; finished targets are recorded.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Interrupted as exc:
        print(f"mlbuild: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MlbuildError as exc:
        print(f"mlbuild: error: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code


def one_line(text: str) -> str:
    """Control characters (a newline in a quoted TOML key) escaped: errors are one line."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text)


def run_main() -> NoReturn:
    """`python -m mlbuild` and the console script: exit with main's code."""
    sys.exit(main())
