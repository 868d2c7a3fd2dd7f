"""The experiment table: one row per configuration built to success, with its metrics.

A configuration is what a successful build left in place: for every target it
decided (skipped, ran or restored), the cache key of the run whose outputs
are there (`manifest.cache_key` over the target's manifest: its command,
params, code, input and package digests, output paths). A row's id is the
BLAKE3 of those (target, key) pairs, so building a configuration again finds
its row (marked built again, not added twice) whether it ran, was restored
or was skipped; and a key is exactly what the local cache restores, so a row
is *restorable* while each of its cacheable targets has an entry in the
local cache (`.mlbuild/cache/entries.db`), and `exp apply` brings it back
without running a step.

Metrics (metrics.py) are stored by the cache key of the run that wrote the
file, not by row: a target restored or skipped in another row has the same
numbers, and a row shows the metrics of all its targets. A row whose
manifests mark an input as changed during its step is never recorded: its
outputs are not what its key says.

The tables are in `state.db` (store.py documents them); `rows(store, root)`
is the public reading of them (`exp show`, `exp diff`, `mlbuild plots`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import Any, NamedTuple

import blake3

from mlbuild.errors import UsageError
from mlbuild.fingerprint import encode_value
from mlbuild.manifest import CHANGED_DURING_STEP, Fingerprint, cache_key
from mlbuild.metrics import Number, UnreadableMetrics, format_of, read_metrics
from mlbuild.pipeline.load import did_you_mean
from mlbuild.pipeline.schema import Pipeline, display_path
from mlbuild.store import Store, StoredExperiment, StoredManifest
from mlbuild.workspace import cache_dir

SHORT_ID = 7  # hex digits shown; any unique prefix names a row
WarnFn = Callable[[str], None]


class Row(NamedTuple):
    """One configuration built to success, as `exp show --json` and `mlbuild plots` read it.

    `metrics` are flat: dotted names, prefixed `FILE:` only where two metrics
    files (across all rows) share a name; `files` keeps them per file.
    `keys` maps each target to the cache key of its run: `Cache.lookup(key)`
    gives that run's outputs.
    """

    id: str  # full hex digest; `short` is what the user reads and types
    name: str | None
    created: float  # when this configuration was first built
    built: float  # when it was last built (ran, restored or found in place)
    params: dict[str, Any]
    metrics: dict[str, Number]
    files: dict[str, dict[str, Number]]  # metrics file -> name -> value
    keys: dict[str, str]  # target -> cache key
    current: bool  # the workspace holds this configuration now
    restorable: bool  # every cacheable target's outputs are in the local cache

    @property
    def short(self) -> str:
        return self.id[:SHORT_ID]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.short,
            "full_id": self.id,
            "name": self.name,
            "created": self.created,
            "built": self.built,
            "params": self.params,
            "metrics": self.metrics,
            "current": self.current,
            "restorable": self.restorable,
            "targets": self.keys,
        }


def key_of(target: str, stored: StoredManifest) -> str | None:
    """The cache key of the run a manifest records; None for an unreadable manifest."""
    fingerprint = Fingerprint.from_json(stored.data)
    if fingerprint is None:
        return None
    return cache_key(target, fingerprint, fingerprint.outputs)


def record_build(
    store: Store,
    pipeline: Pipeline,
    decided: Sequence[str],
    made: Sequence[str],
    ok: bool,
    name: str | None,
    warn: WarnFn,
    like: tuple[str, Collection[str]] | None = None,
) -> str | None:
    """After a build: read the metrics of the targets in `made`, and if it succeeded,
    add (or mark built again) the row of the configuration the `decided` targets are in;
    its id when it was added now (None: no row, or one an earlier build added, whose
    cacheable marks may be another pipeline's: no base for a difference).

    `made` are the targets that ran or were restored, `decided` those plus the
    skipped ones. A skipped target's metrics are read too when none are
    recorded for its key (a state from before metrics were declared or
    recorded): its file is the one its run wrote. `like`: a row whose entries are
    this configuration's but for the targets named (the up-to-date stamp's row, all
    else proven unchanged since): the new row is kept as its difference from that
    row's whole one (store.py), while that difference stays small.
    """
    kept = store.load_manifest_keys()
    targets_of = pipeline.targets
    made_set = set(made)
    skipped = [t for t in decided if targets_of[t].metrics and t not in made_set]
    # Only the manifests whose key is not kept, and those whose metrics are read.
    wanted = {t for t in decided if kept.get(t) is None}
    wanted.update(made, skipped)
    if len(wanted) * 2 < len(kept):
        manifests = store.load_manifests_of(sorted(wanted))
    else:
        manifests = store.load_manifests()
    if skipped:
        known = store.load_metrics()
        skipped = [
            t
            for t in skipped
            if t in manifests and (kept.get(t) or key_of(t, manifests[t])) not in known
        ]
    _record_metrics(store, pipeline, [*made, *skipped], manifests, warn)
    keys = _configuration(decided, manifests, kept, store) if ok else None
    if keys is None:
        if name is not None:
            why = "the build failed" if not ok else "an input changed while a step ran"
            warn(f"--name {name}: {why}, so no experiment row was recorded")
        return None
    base, entries = _difference(store, pipeline, keys, like)
    identity, targets = _row_texts(keys, pipeline, whole=base is None)
    row_id = blake3.blake3(identity.encode()).hexdigest()
    now = time.time()
    added = store.save_experiment(
        StoredExperiment(
            row_id,
            name,
            now,
            now,
            json.dumps(row_params(pipeline, keys), sort_keys=True, default=str),
            targets if base is None else entries,
            base,
        )
    )
    return row_id if added else None


def _difference(
    store: Store,
    pipeline: Pipeline,
    keys: Mapping[str, str],
    like: tuple[str, Collection[str]] | None,
) -> tuple[str | None, str]:
    """(the whole row to keep the new one as a difference from, that difference as
    JSON), or (None, "") to keep it whole: no `like`, no such row, or a difference
    of more than a quarter of the targets (reading it would cost more than it saves)."""
    if like is None:
        return None, ""
    found = store.experiment_base(like[0])
    if found is None:
        return None, ""
    base, carried = found
    try:
        entries = json.loads(carried)
    except ValueError:
        return None, ""
    if not isinstance(entries, dict):
        return None, ""
    targets_of = pipeline.targets
    for target in like[1]:
        spec = targets_of[target]
        entries[target] = [keys[target], spec.cache and not spec.always_run]
    if len(entries) * 4 > len(keys):
        return None, ""
    return base, json.dumps(entries, sort_keys=True)


def _configuration(
    decided: Sequence[str],
    manifests: Mapping[str, StoredManifest],
    kept: Mapping[str, str | None],
    store: Store,
) -> dict[str, str] | None:
    """Target -> cache key of what the decided targets hold; None when that is no
    configuration its outputs can stand for (an input changed during a step).

    A key is computed from its manifest once and then kept beside it (the store's
    `manifests.key`): a build that ran one of 10,000 targets parses one manifest.
    A key is kept only for a manifest without CHANGED_DURING_STEP (checked below
    before it is computed), and goes with its manifest, so a kept key needs no look.
    `manifests` holds at least the rows whose key `kept` lacks.
    """
    keys: dict[str, str] = {}
    learned: list[tuple[str, str, str]] = []
    for target in decided:
        key = kept.get(target)
        if key is not None:
            keys[target] = key
            continue
        stored = manifests.get(target)
        if stored is None or CHANGED_DURING_STEP in stored.data:
            return None
        key = key_of(target, stored)
        if key is None:
            return None
        learned.append((target, stored.data, key))
        keys[target] = key
    store.save_manifest_keys(learned)
    return keys or None


def row_id(keys: Mapping[str, str]) -> str:
    """The identity of a configuration: its targets and their cache keys, in name order."""
    text = json.dumps(sorted(keys.items()), separators=(",", ":"))
    return blake3.blake3(text.encode()).hexdigest()


def _row_texts(
    keys: Mapping[str, str], pipeline: Pipeline, *, whole: bool = True
) -> tuple[str, str]:
    """`row_id`'s text and the row's `targets` JSON (target -> [key, cacheable], keys
    sorted; "" unless `whole`), as `json.dumps` writes them, in one pass: at 10,000
    targets the two `json.dumps` calls cost more than building the one target that
    changed."""
    quote = encode_basestring_ascii  # json.dumps's own quoting (ensure_ascii)
    if not whole:
        pairs = [f"[{quote(target)},{quote(keys[target])}]" for target in sorted(keys)]
        return "[" + ",".join(pairs) + "]", ""
    targets_of = pipeline.targets
    pairs, items = [], []
    for target in sorted(keys):
        name, key = quote(target), quote(keys[target])
        spec = targets_of[target]
        pairs.append(f"[{name},{key}]")
        items.append(f"{name}: [{key}, {_TRUE[spec.cache and not spec.always_run]}]")
    return "[" + ",".join(pairs) + "]", "{" + ", ".join(items) + "}"


_TRUE = {True: "true", False: "false"}


def row_params(pipeline: Pipeline, targets: Iterable[str]) -> dict[str, Any]:
    """The parameter values the targets were built with, named as `--set` names them.

    A global parameter by its name; a target's local one as `TARGET.NAME`. A
    target's params are either all globals (a list of names) or all its own (a
    table): they are taken as globals when each one is a global of equal value.
    """
    params: dict[str, Any] = {}
    globals_ = {name: encode_value(value) for name, value in pipeline.params.items()}
    for target_name in targets:
        target = pipeline.targets.get(target_name)
        if target is None or not target.params:
            continue
        own = {p: v for p, v in target.params.items()}
        if "@" in target_name:  # a matrix point: its matrix values name it, they are no setting
            for pair in target_name.partition("@")[2].split(","):
                own.pop(pair.partition("=")[0], None)
        shared = all(globals_.get(p) == encode_value(v) for p, v in own.items())
        for pname, value in own.items():
            params[pname if shared else f"{target_name}.{pname}"] = value
    return params


def _record_metrics(
    store: Store,
    pipeline: Pipeline,
    made: Sequence[str],
    manifests: Mapping[str, StoredManifest],
    warn: WarnFn,
) -> None:
    """Read the metrics files of the targets just made; a file that fails is a warning."""
    rows: list[tuple[str, str, str]] = []
    for name in made:
        target = pipeline.targets[name]
        stored = manifests.get(name)
        if not target.metrics or stored is None:
            continue
        key = key_of(name, stored)
        if key is None:
            continue
        found: dict[str, dict[str, Number]] = {}
        for path in target.metrics:
            fmt = format_of(path)
            assert fmt is not None  # the loader refuses other extensions
            try:
                metrics = read_metrics(pipeline.root / path, fmt)
            except UnreadableMetrics as exc:
                warn(f"`{name}`: metrics file '{path}' not recorded: {exc}")
                continue
            if metrics.skipped:
                shown = ", ".join(metrics.skipped[:5]) + (
                    ", ..." if len(metrics.skipped) > 5 else ""
                )
                warn(f"`{name}`: '{path}': skipped values that are not numbers: {shown}")
            found[path] = metrics.values
        rows.append((key, name, json.dumps(found, sort_keys=True)))
    store.save_metrics(rows)


def current_keys(store: Store) -> dict[str, str]:
    """Target -> cache key of the outputs the workspace holds now (its manifests)."""
    kept = store.load_manifest_keys()
    keys: dict[str, str] = {}
    for target, stored in store.load_manifests().items():
        key = kept.get(target) or key_of(target, stored)
        if key is not None:
            keys[target] = key
    return keys


def rows(store: Store, root: Path) -> list[Row]:
    """Every row, oldest first, with its metrics, current mark and restorability."""
    stored = store.load_experiments()
    if not stored:
        return []
    metrics_of = store.load_metrics()
    now = current_keys(store)
    from mlbuild.cache import Cache

    cache = Cache(cache_dir(root))
    entry_seen: dict[str, bool] = {}

    def in_cache(key: str) -> bool:
        seen = entry_seen.get(key)
        if seen is None:
            # Whether a row is there, not a parse: `exp show` reads every row's keys.
            seen = entry_seen[key] = cache.has_entry(key)
        return seen

    parsed: list[tuple[StoredExperiment, dict[str, Any], dict[str, list[Any]]]] = []
    for row in stored:
        try:
            params = json.loads(row.params)
            targets = json.loads(row.targets)
        except ValueError:
            continue  # a damaged row costs only its line in the table
        parsed.append((row, params, targets))
    files_of: dict[str, set[str]] = {}
    per_row: list[dict[str, dict[str, Number]]] = []
    for _, _, targets in parsed:
        files: dict[str, dict[str, Number]] = {}
        for key, _ in targets.values():
            data = metrics_of.get(key)
            if data is not None:
                files.update(json.loads(data))
        for path, values in files.items():
            for metric in values:
                files_of.setdefault(metric, set()).add(path)
        per_row.append(files)
    best = _current(parsed, now)
    result: list[Row] = []
    for (row, params, targets), files in zip(parsed, per_row, strict=True):
        flat: dict[str, Number] = {}
        for path, values in files.items():
            for metric, value in values.items():
                flat[f"{path}:{metric}" if len(files_of[metric]) > 1 else metric] = value
        keys = {t: key for t, (key, _) in targets.items()}
        restorable = all(in_cache(key) for key, cacheable in targets.values() if cacheable)
        result.append(
            Row(
                row.id,
                row.name,
                row.created,
                row.built,
                params,
                flat,
                files,
                keys,
                row.id == best,
                restorable,
            )
        )
    return result


def _current(
    parsed: Sequence[tuple[StoredExperiment, dict[str, Any], dict[str, list[Any]]]],
    now: Mapping[str, str],
) -> str | None:
    """The row the workspace holds: all its keys in place; the widest, then the latest built."""
    best: tuple[int, float, str] | None = None
    for row, _, targets in parsed:
        if all(now.get(t) == key for t, (key, _) in targets.items()):
            rank = (len(targets), row.built, row.id)
            if best is None or rank > best:
                best = rank
    return best[2] if best is not None else None


def find_rows(table: Sequence[Row], text: str) -> list[Row]:
    """The row named `text`, else the rows whose id starts with it."""
    named = [row for row in table if row.name == text]
    if named:
        return named
    return [row for row in table if text and row.id.startswith(text.lower())]


def find_row(table: Sequence[Row], text: str, command: str) -> Row:
    """The one row `text` names (name or id prefix); a UsageError for `exp COMMAND` if none."""
    found = find_rows(table, text)
    if len(found) == 1:
        return found[0]
    if found:
        ids = ", ".join(row.short for row in found[:5])
        raise UsageError(f"exp {command} {text}: names several rows ({ids}); give more of the id")
    raise UsageError(
        f"exp {command} {text}: no experiment row has that id or name (see `mlbuild exp show`)"
    )


def diff_pair(table: Sequence[Row], named: Sequence[str]) -> tuple[Row, Row]:
    """The rows `exp diff` compares: A and B; A and the workspace's; by default the row
    built before the workspace's, and the workspace's."""
    if len(named) > 2:
        raise UsageError("exp diff: takes at most two rows (A, then B)")
    if len(table) < 2:
        plural = "" if len(table) == 1 else "s"
        raise UsageError(
            f"exp diff: {len(table)} experiment row{plural} recorded; nothing to compare"
            " (see `mlbuild exp show`)"
        )
    chosen = [find_row(table, text, "diff") for text in named]
    if len(chosen) == 2:
        return chosen[0], chosen[1]
    current = next((row for row in table if row.current), None)
    if current is None:
        raise UsageError(
            "exp diff: the workspace holds no recorded configuration (a build since failed,"
            " or outputs were cleaned); name two rows"
        )
    if not chosen:
        others = [row for row in table if row.id != current.id]
        chosen.append(max(others, key=lambda row: (row.built, row.created)))
    return chosen[0], current


def check_column(table: Sequence[Row], name: str) -> str:
    """`name` if some row has such a metric or parameter (`exp show --sort`)."""
    known = list(dict.fromkeys(k for row in table for k in (*row.metrics, *row.params)))
    if name not in known and table:
        raise UsageError(
            f"exp show --sort {name}: no such metric or parameter" + did_you_mean(name, known)
        )
    return name


def apply_params(pipeline: Pipeline, row: Row) -> list[str]:
    """Write `row`'s parameter values into the pipeline's files; what was done, one line each.

    Every file is rendered before any is written, so a value a file cannot
    hold changes nothing (pipeline/edit.py keeps comments and layout).
    """
    from mlbuild.pipeline.edit import render, write_text

    edits, gone = param_edits(pipeline, row)
    texts = {path: render(path, values, root=pipeline.root) for path, values in edits.items()}
    for path, text in texts.items():
        write_text(path, text)
    said = [
        f"set {dotted} = {json.dumps(value, default=str, ensure_ascii=False)}"
        f" in {display_path(path)}"
        for path, values in edits.items()
        for dotted, value in values.items()
    ]
    return said + [f"{name} is no longer a parameter of the pipeline; left alone" for name in gone]


def param_edits(pipeline: Pipeline, row: Row) -> tuple[dict[Path, dict[str, Any]], list[str]]:
    """What `exp apply` writes to give the pipeline `row`'s parameter values.

    Returns file -> {dotted key in that file: value} for the values that
    differ from the pipeline's now (a params file's key in that file,
    `[params]` and a target's own table in pipeline.toml), and the row's
    parameters the pipeline no longer has (left alone).
    """
    edits: dict[Path, dict[str, Any]] = {}
    gone: list[str] = []
    for name, value in row.params.items():
        where = _param_home(pipeline, name)
        if where is None:
            gone.append(name)
            continue
        now, file, key = where
        if encode_value(now) != encode_value(value):
            edits.setdefault(file, {})[key] = value
    return edits, gone


def _param_home(pipeline: Pipeline, name: str) -> tuple[Any, Path, str] | None:
    """(value now, file, key in that file) of a parameter named as `--set` names it."""
    source = pipeline.param_sources.get(name)
    if source is not None:
        return pipeline.params[name], pipeline.root / source, name
    if name in pipeline.params:
        return pipeline.params[name], pipeline.file, f"params.{name}"
    target_name, _, pname = name.rpartition(".")
    target = pipeline.targets.get(target_name)
    if target is None or pname not in target.params or "." in target_name:
        return None
    return target.params[pname], pipeline.file, f"targets.{target_name}.params.{pname}"
