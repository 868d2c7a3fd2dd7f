"""What a build would do, without building: fresh, restored from the cache, or run, and why.

`mlbuild status`, `run -n`, `dag --status` and `push` ask this instead of
running a build. It visits the selected targets in dependency order as the
runner does, fingerprints each (through the stat cache) and compares it with
its manifest, but executes nothing, restores nothing and writes nothing: no
manifest, no history, no cache entry (an invalid one is left for the run to
delete), so `status` takes no workspace lock and never disturbs a build (the
command may keep a compiled pipeline, `snapshot.py`, written atomically)
(`run -n` takes it only to save the file stats it learnt, `Query.save`).

A stale target whose cache key has an entry in the local cache "would
restore". The entry lists the digest of every output it would put in place,
so a consumer is predicted exactly: its inputs under a restored output take
the entry's digests instead of what is on disk now, which also gives its own
cache key. A consumer of a target that would run cannot be predicted (its
outputs are not known until the step ends) and is "would run (upstream X
would run)"; so is a consumer whose inputs the entry cannot tell (a glob over
a restored output, a directory or symlink inside one).

The entry is checked as the run would before using it: it must parse and be
valid for its key, every object it names must exist, and restoring it must be
expected to take less time than its step did. The objects' bytes are not
hashed (that would cost a restore): a corrupted object is predicted "would
restore", and the run finds it, deletes it and runs the step instead. The
remote cache (`[cache] remote`) is never consulted here (no network for a
status): a target only the remote has is predicted "would run".
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from mlbuild.build.results import Outcome, TargetResult, Unbuilt
from mlbuild.build.runner import check_code, check_sources, observe_target, save_checked
from mlbuild.code import CodeScanner, Parsed
from mlbuild.fingerprint import Fingerprinter
from mlbuild.graph import Graph
from mlbuild.manifest import MISSING_TEXT, Fingerprint, file_hex, target_key
from mlbuild.pipeline.schema import Target
from mlbuild.signature import fresh_by_signature
from mlbuild.staleness import NEVER_BUILT, Decision, Observation, decide, fresh_decision
from mlbuild.store import Store
from mlbuild.workspace import cache_dir

if TYPE_CHECKING:
    from mlbuild.cache import Cache, Entry

# A digest that matches nothing: what a consumer reads of a restore that the entry cannot tell.
MISSING = MISSING_TEXT
RESTORE_NOTE = "would restore from cache"


class Action(enum.Enum):
    """What a build would do with a target."""

    SKIP = "skip"  # fresh
    RESTORE = "restore"  # stale, and the local cache has its outputs for its key
    RUN = "run"  # stale (or waiting on a target that would run): its step would run


class Prediction(NamedTuple):
    """One target's predicted fate, with the reasons a build would give."""

    name: str
    action: Action
    reasons: tuple[str, ...]
    decision: Decision  # the comparison itself (for --explain on fresh targets)


class Query:
    """Predictions for one workspace; the state is read once, never written (see `save`)."""

    def __init__(self, graph: Graph, store: Store) -> None:
        self.graph = graph
        self.where = graph.pipeline.display_file  # for messages; computed once, not per target
        self.store = store
        self.root = graph.pipeline.root
        self.manifests = store.load_manifests()
        self.fp = Fingerprinter(self.root, store.load_stats, reuse_walks=True)
        parsed = {raw: Parsed.from_json(data) for raw, data in store.load_parsed().items()}
        self.code = CodeScanner(self.fp, {raw: p for raw, p in parsed.items() if p is not None})
        self.packages: dict[str, str | None] = {}
        self._cache: Cache | None = None
        self._unbuilt = Unbuilt(store.last_statuses)  # why a target has no manifest

    def predict(
        self,
        targets: Sequence[str] = (),
        *,
        force: frozenset[str] | None = None,
        no_cache: bool = False,
    ) -> tuple[Prediction, ...]:
        """The selected targets (and what they need), in build order, each with its action.

        `force` and `no_cache` mean what they mean to `mlbuild run`. Raises the
        errors a build would raise before starting (a missing source, a
        Python function that cannot be called).
        """
        selected = self.graph.select((*targets, *(force or ())))
        check_sources(self.graph, selected, self.fp)
        check_code(self.graph, selected, self.code)
        actions: dict[str, Action] = {}
        restored = _Restores()
        predictions: list[Prediction] = []
        for name in selected:
            is_forced = force is not None and (not force or name in force)
            prediction = self._predict(name, is_forced, no_cache, actions, restored)
            actions[name] = prediction.action
            predictions.append(prediction)
        return tuple(predictions)

    def save(self) -> None:
        """Keep the file stats and parsed code learnt (`run -n`, under the workspace lock)."""
        save_checked(self.store, self.fp, self.code)

    def _predict(
        self,
        name: str,
        forced: bool,
        no_cache: bool,
        actions: Mapping[str, Action],
        restored: _Restores,
    ) -> Prediction:
        target = self.graph.targets[name]
        deps = self.graph.deps[name]
        stored = self.manifests.get(name)
        if (
            stored is not None
            and stored.sig is not None
            and not forced
            and not restored.outputs
            and all(actions[d] is Action.SKIP for d in deps)
        ):
            counts = fresh_by_signature(target, stored.sig, self.fp)
            if counts is not None:  # fresh by the stat of its files (signature.py)
                return Prediction(name, Action.SKIP, (), fresh_decision(counts))
        before = Fingerprint.from_json(stored.data) if stored is not None else None
        now = observe_target(target, before, self.fp, self.code, self.packages, self.where)
        waiting = [d for d in deps if actions[d] is Action.RUN]
        unknown: tuple[str, ...] = ()
        if not waiting and restored.outputs:  # discovered inputs may read outputs of non-deps too
            now, unknown = self._after_restores(target, now, actions, restored)
        decision = decide(
            target,
            now,
            before,
            self.store.load_tree,
            forced=forced,
            stored=stored is not None,
            unbuilt=self._unbuilt.reason(name) if stored is None else NEVER_BUILT,
        )
        if waiting or unknown:
            upstream = tuple(f"upstream '{d}' would run" for d in waiting)
            return Prediction(name, Action.RUN, decision.reasons + upstream + unknown, decision)
        if decision.fresh:
            return Prediction(name, Action.SKIP, (), decision)
        entry = None if no_cache or forced else self._entry(target, now)
        if entry is None:
            return Prediction(name, Action.RUN, decision.reasons, decision)
        restored.add(entry.outputs)
        return Prediction(name, Action.RESTORE, decision.reasons, decision)

    def _after_restores(
        self,
        target: Target,
        now: Observation,
        actions: Mapping[str, Action],
        restored: _Restores,
    ) -> tuple[Observation, tuple[str, ...]]:
        """`now` with what it reads of restored outputs as the restore will leave it.

        Returns it with the reasons it cannot be predicted (empty when it can).
        """
        for port in target.inputs:
            if port.is_glob:
                for producer in sorted(self.graph.producers_of(port)):
                    if actions.get(producer) is Action.RESTORE:
                        why = f"upstream '{producer}' would restore; the matches of"
                        return now, (f"{why} '{port.path}' are not known until then",)
        fingerprint = now.fingerprint
        inputs = dict(fingerprint.inputs)
        discovered = dict(fingerprint.discovered)
        for paths in (inputs, discovered):
            for path in paths:
                digest = restored.digest(path)
                if digest == "":
                    return now, (f"what '{path}' holds after a restore is not known until then",)
                if digest is not None:
                    paths[path] = digest
        changed = fingerprint._replace(inputs=inputs, discovered=discovered)
        return now._replace(fingerprint=changed), ()

    def _entry(self, target: Target, now: Observation) -> Entry | None:
        """The local cache entry a build would restore `target` from, or None."""
        if not target.cache or target.always_run:
            return None
        from mlbuild.cache import BadEntry, SlowerThanRunning

        key = target_key(target, now.fingerprint)
        cache = self.cache
        try:
            entry = cache.lookup(key, delete=False)  # a query only looks
        except (OSError, BadEntry):  # unreadable or invalid: the run runs the step
            return None
        if entry is None:  # none, or of another version: a miss
            return None
        if not all(os.path.isfile(cache.object_path(d)) for d in entry.objects()):
            return None
        try:
            cache.check_cost(entry)
        except SlowerThanRunning:
            return None
        return entry

    @property
    def cache(self) -> Cache:
        if self._cache is None:
            from mlbuild.cache import Cache

            self._cache = Cache(cache_dir(self.root))
        return self._cache


class _Restores:
    """The outputs the predicted restores put in place, as their entries record them."""

    def __init__(self) -> None:
        self.outputs: dict[str, Mapping[str, Any]] = {}  # path -> {"fingerprint"[, "tree"]}
        self.holders: set[str] = set()  # directories above a restored output
        self.trees: dict[str, dict[str, str]] = {}  # restored directory -> {relative: digest}

    def add(self, outputs: Mapping[str, Mapping[str, Any]]) -> None:
        for path, out in outputs.items():
            self.outputs[path] = out
            if "tree" in out:
                self.trees[path] = {str(item[0]): str(item[1]) for item in out["tree"]}
            parts = path.split("/")
            self.holders.update("/".join(parts[:cut]) for cut in range(1, len(parts)))

    def digest(self, path: str) -> str | None:
        """The digest `path` will have once the restores are done; None if none touches it.

        "" when a restore touches it but the entry cannot tell its digest (a
        directory holding a restored output; a directory or a symlink inside one).
        """
        if path in self.holders:
            return ""
        out = self.outputs.get(path)
        if out is not None:
            return str(out["fingerprint"])
        parts = path.split("/")
        for cut in range(len(parts) - 1, 0, -1):
            tree = self.trees.get("/".join(parts[:cut]))
            if tree is None:
                continue
            value = tree.get("/".join(parts[cut:]))
            if value is None:
                return MISSING  # the restore replaces the whole directory: not in it, not there
            return value if file_hex(value) is not None else ""
        return None


_OUTCOMES = {Action.SKIP: Outcome.SKIPPED, Action.RESTORE: Outcome.WOULD_RESTORE}


def as_result(prediction: Prediction, *, noted: bool = False) -> TargetResult:
    """A prediction as a build result (for summaries and drawings); `noted`: with the
    restore note as a last reason."""
    reasons = prediction.reasons
    if noted and prediction.action is Action.RESTORE:
        reasons += (RESTORE_NOTE,)
    return TargetResult(prediction.name, _OUTCOMES.get(prediction.action, Outcome.PENDING), reasons)


def restore_note(prediction: Prediction) -> str:
    """` (would restore from cache)` after a would-restore target's reasons, else ""."""
    return f" ({RESTORE_NOTE})" if prediction.action is Action.RESTORE else ""
