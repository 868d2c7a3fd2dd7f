"""Stale or fresh: what a target would consume now, compared with its manifest.

A manifest is the fingerprint a target had when it last succeeded: its action,
parameter values, declared environment, input digests and output digests.
The target is fresh exactly when the fingerprint observed now is equal, and
every difference becomes a reason the user can read. Content decides, never
timestamps: the stat cache only saves re-hashing unchanged bytes.

The key is complete: besides what the step reads, it holds the interface the
step sees (`ports`: each declared input and output in order, with its port
name, its path or pattern and a pattern's matches), because a command's
`{inputs}` and a function's keyword arguments change with them. Environment
values (often secrets) are kept as BLAKE3 digests, never in plain text.

A Python step's manifest also holds what the worker saw it use (observed.py):
`discovered`, project files it read without declaring them, and `imported`,
project modules it imported that the static closure misses. The next
observation digests those same paths again, so a change to them reruns it.

The action compared is the command *template*: the interpolated command is a
function of the template, the parameter values and the paths, which are all
compared on their own, so a changed parameter reads as `param epochs changed
1 -> 2` rather than also as "command changed".
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import NamedTuple

from mlbuild.code import AT_RUN_TIME, CodeFingerprint
from mlbuild.fingerprint import (
    Fingerprinter,
    diff_listings,
    encode_value,
    expand_port,
)
from mlbuild.manifest import DigestKind, Fingerprint, PortEntry, kind_of
from mlbuild.pipeline.schema import EMPTY, ActionKind, Target
from mlbuild.uptodate import env_digest

_DIR = DigestKind.DIR  # a module global: an enum attribute costs a lookup in its class
_MAX_LISTED = 3  # entries named per directory in a reason before "and N more"


class Observation(NamedTuple):
    """A target's fingerprint as of now, with the directory listings behind it.

    `imported_by` maps a code file to the file that imports it (AT_RUN_TIME:
    seen only when the step ran).
    """

    fingerprint: Fingerprint
    listings: Mapping[str, tuple[tuple[str, str], ...]]  # "dir:digest" -> listing
    imported_by: Mapping[str, str] = EMPTY  # code file -> importer


class Decision(NamedTuple):
    """Whether a target must run, and why (reasons are empty when fresh)."""

    fresh: bool
    reasons: tuple[str, ...] = ()
    compared: str = ""  # what was found equal, for --explain on fresh targets
    forced: bool = False  # `--force`: run, never restore, whatever else was found


def expand_inputs(target: Target, root: str) -> list[str]:
    """The target's input paths, with glob patterns replaced by their matches."""
    return [path for port in target.inputs for path in expand_port(port, root)]


def interface(target: Target, root: str) -> tuple[PortEntry, ...]:
    """The declared inputs and outputs in order, as the step receives them."""
    entries: list[PortEntry] = []
    for kind, ports in (("in", target.inputs), ("out", target.outputs)):
        for port in ports:
            matches = tuple(expand_port(port, root)) if port.is_glob else ()
            entries.append((kind, port.name, port.path, matches))
    return tuple(entries)


def observe_paths(
    fp: Fingerprinter, paths: list[str], listings: dict[str, tuple[tuple[str, str], ...]]
) -> dict[str, str]:
    """`path -> digest text` (`manifest.Ref`) for each path; directory listings go in `listings`."""
    result: dict[str, str] = {}
    for path in paths:
        digest = fp.digest(path)
        text = digest.text
        if digest.kind is _DIR:
            listings[text] = digest.listing
        result[path] = text
    return result


def observe(
    target: Target,
    fp: Fingerprinter,
    *,
    code: CodeFingerprint | None = None,
    packages: Mapping[str, str | None] | None = None,
    previous: Fingerprint | None = None,
) -> Observation:
    """Fingerprint a target as it stands now (inputs hashed through the stat cache).

    `previous` is its manifest: the files it was seen reading there are
    digested again (`code` already holds the modules it was seen importing).
    """
    root = str(fp.root)
    listings: dict[str, tuple[tuple[str, str], ...]] = {}
    # interface() and observe_paths() inlined: this runs once per target on every no-op.
    entries: list[PortEntry] = []
    inputs: dict[str, str] = {}
    for port in target.inputs:
        matches = tuple(expand_port(port, root)) if port.is_glob else ()
        entries.append(("in", port.name, port.path, matches))
        for path in matches if port.is_glob else (port.path,):
            digest = fp.digest(path)
            text = inputs[path] = digest.text
            if digest.kind is _DIR:
                listings[text] = digest.listing
    outputs: dict[str, str] = {}
    for port in target.outputs:
        entries.append(("out", port.name, port.path, ()))
        digest = fp.digest(port.path)
        text = outputs[port.path] = digest.text
        if digest.kind is _DIR:
            listings[text] = digest.listing
    ports = tuple(entries)
    discovered = (
        observe_paths(fp, list(previous.discovered), listings)
        if previous and previous.discovered
        else {}
    )
    fingerprint = Fingerprint(
        action=target.action,
        params={name: encode_value(value) for name, value in target.params.items()},
        env={name: env_digest(os.environ.get(name)) for name in target.env},
        inputs=inputs,
        outputs=outputs,
        code=dict(code.files) if code else {},
        packages=dict(packages or {}),
        ports=ports,
        discovered=discovered,
        imported=previous.imported if previous else (),
        dynamic=code.dynamic if code else (),
    )
    return Observation(fingerprint, listings, code.imported_by if code else {})


ListingLoader = Callable[[str], "list[tuple[str, str]] | None"]
NEVER_BUILT = "never built"  # no manifest and no history (build.results.Unbuilt says more)


def decide(
    target: Target,
    now: Observation,
    before: Fingerprint | None,
    old_listing: ListingLoader,
    *,
    forced: bool = False,
    stored: bool = False,
    unbuilt: str = NEVER_BUILT,
) -> Decision:
    """Compare the observed fingerprint with the manifest; fresh only if all is equal.

    `stored`: a manifest exists, though `before` is None (another manifest version).
    `unbuilt`: why there is no manifest at all, as the history tells it.
    """
    if before is None:
        if stored:
            why = "its manifest was written by another version of mlbuild"
            return Decision(False, (why,), forced=forced)
        return Decision(False, (unbuilt,), forced=forced)
    cur = now.fingerprint
    if cur == before and not forced and not target.always_run:
        # The no-op's case, in one comparison: every field equal leaves no reason.
        return Decision(True, (), _compared(cur))
    reasons: list[str] = []
    if forced:
        reasons.append("forced")
    if target.always_run:
        reasons.append("always_run")
    if cur.action != before.action:
        reasons.append("command changed" if target.kind is ActionKind.SHELL else "function changed")
    reasons += _code_reasons(cur.code, before.code, now.imported_by, before.imported)
    reasons += _param_reasons(cur.params, before.params)
    reasons += _env_reasons(cur.env, before.env)
    for name in sorted(set(cur.packages) | set(before.packages)):
        old, new = before.packages.get(name), cur.packages.get(name)
        if old != new:
            reasons.append(f"package {name} changed {old or 'absent'} -> {new or 'absent'}")
    input_reasons = _path_reasons("input", cur.inputs, before.inputs, now.listings, old_listing)
    output_reasons = _output_reasons(cur.outputs, before.outputs)
    told = frozenset(
        kind
        for kind, same in (
            ("in", set(cur.inputs) == set(before.inputs)),
            ("out", set(cur.outputs) == set(before.outputs)),
        )
        if not same
    )
    reasons += _port_reasons(cur.ports, before.ports, told)
    reasons += input_reasons
    reasons += _path_reasons(
        "discovered input", cur.discovered, before.discovered, now.listings, old_listing
    )
    reasons += output_reasons
    return Decision(not reasons, tuple(reasons), _compared(cur), forced=forced)


_COMPARED_LABELS = (
    "code file",
    "param",
    "env var",
    "package",
    "input",
    "discovered input",
    "output",
)
_compared_texts: dict[tuple[int, ...], str] = {}  # counts -> text: a pipeline has few shapes


def _compared(cur: Fingerprint) -> str:
    """What a fresh target was found equal in, for --explain."""
    counts = (
        len(cur.code),
        len(cur.params),
        len(cur.env),
        len(cur.packages),
        len(cur.inputs),
        len(cur.discovered),
        len(cur.outputs),
    )
    return compared_text(counts)


_fresh_decisions: dict[tuple[int, ...], Decision] = {}


def fresh_decision(counts: tuple[int, ...]) -> Decision:
    """The decision for a target found fresh by its stat signature (signature.py), by the
    counts --explain shows: one value per shape, shared by a build and a query."""
    decision = _fresh_decisions.get(counts)
    if decision is None:
        decision = _fresh_decisions[counts] = Decision(True, (), compared_text(counts))
    return decision


def compared_text(counts: tuple[int, ...]) -> str:
    """The --explain text for these counts of code files, params, env vars, packages,
    inputs, discovered inputs and outputs (made once per shape: a pipeline has few)."""
    text = _compared_texts.get(counts)
    if text is None:
        parts = [
            f"{n} {label}{'' if n == 1 else 's'}"
            for n, label in zip(counts, _COMPARED_LABELS, strict=True)
            if n
        ]
        text = _compared_texts[counts] = ", ".join(["same action", *parts])
    return text


def _code_reasons(
    cur: Mapping[str, str],
    before: Mapping[str, str],
    imported_by: Mapping[str, str],
    seen_imported: tuple[str, ...],
) -> list[str]:
    reasons: list[str] = []
    for path in sorted(set(cur) | set(before)):
        if cur.get(path) == before.get(path):
            continue
        if path not in cur:
            # A module seen at run time is dropped only when its file is gone.
            gone = "deleted" if path in seen_imported else "no longer imported"
            reasons.append(f"code removed: {path} ({gone})")
        elif imported_by.get(path) == AT_RUN_TIME:
            reasons.append(f"code changed: {path} (imported when the step last ran)")
        elif path in imported_by:
            reasons.append(f"code changed: {path} (imported by {imported_by[path]})")
        else:
            reasons.append(f"code changed: {path}")
    return reasons


def _env_reasons(cur: Mapping[str, str | None], before: Mapping[str, str | None]) -> list[str]:
    """Names, and that the value changed; never a value (env vars often hold secrets)."""
    reasons: list[str] = []
    for name in sorted(set(cur) | set(before)):
        if name not in before:
            reasons.append(f"env {name} added")
        elif name not in cur:
            reasons.append(f"env {name} removed")
        elif cur[name] != before[name]:
            reasons.append(f"env {name} changed")
    return reasons


def _port_reasons(
    cur: tuple[PortEntry, ...], before: tuple[PortEntry, ...], paths_told: frozenset[str]
) -> list[str]:
    """How the declared interface changed: reordered ports, a port pointing elsewhere.

    `paths_told` holds the directions ("in", "out") whose path reasons already
    say what was added or removed (`input added: c`); this names what they
    cannot show: order, port names, and matches moving between patterns.
    """
    if cur == before:
        return []
    reasons: list[str] = []
    for kind, what in (("in", "input"), ("out", "output")):
        new = [(name, path) for k, name, path, _ in cur if k == kind]
        old = [(name, path) for k, name, path, _ in before if k == kind]
        if new == old:
            continue
        told = kind in paths_told
        new_names = {name: path for name, path in new if name is not None}
        old_names = {name: path for name, path in old if name is not None}
        named: list[str] = []
        for name in sorted(set(new_names) | set(old_names)):
            was, now = old_names.get(name), new_names.get(name)
            if was == now:
                continue
            if was is not None and now is not None:
                named.append(f"{what} port {name} now '{now}' (was '{was}')")
            elif not told:
                named.append(
                    f"{what} port {name} added ('{now}')"
                    if was is None
                    else f"{what} port {name} removed (was '{was}')"
                )
        if named:
            reasons += named
        elif sorted(new, key=repr) == sorted(old, key=repr):
            reasons.append(f"{what}s reordered")
        elif not told:
            was_text = ", ".join(f"'{path}'" for _, path in old)
            now_text = ", ".join(f"'{path}'" for _, path in new)
            reasons.append(f"{what}s now [{now_text}] (were [{was_text}])")
    if not reasons and not paths_told:  # same declarations, matches moved between patterns
        reasons.append("input patterns now match other files")
    return reasons


def _param_reasons(cur: Mapping[str, str], before: Mapping[str, str]) -> list[str]:
    reasons: list[str] = []
    for name in sorted(set(cur) | set(before)):
        old, new = before.get(name), cur.get(name)
        if old == new:
            continue
        if old is None:
            reasons.append(f"param {name} added (= {new})")
        elif new is None:
            reasons.append(f"param {name} removed (was {old})")
        else:
            reasons.append(f"param {name} changed {old} -> {new}")
    return reasons


def _path_reasons(
    what: str,
    cur: Mapping[str, str],
    before: Mapping[str, str],
    listings: Mapping[str, tuple[tuple[str, str], ...]],
    old_listing: ListingLoader,
    changed: str = "changed",
) -> list[str]:
    reasons: list[str] = []
    for path in sorted(set(cur) | set(before)):
        old, new = before.get(path), cur.get(path)
        if old == new:
            continue
        if old is None:
            reasons.append(f"{what} added: {path}")
        elif new is None:
            reasons.append(f"{what} removed: {path}")
        elif (kind := kind_of(new)) is DigestKind.MISSING:
            reasons.append(f"{what} missing: {path}")
        elif kind is DigestKind.DIR and kind_of(old) is DigestKind.DIR:
            detail = _dir_detail(old, new, listings, old_listing)
            reasons.append(f"{what} {changed}: {path}{detail}")
        else:
            reasons.append(f"{what} {changed}: {path}")
    return reasons


def _dir_detail(
    old: str,
    new: str,
    listings: Mapping[str, tuple[tuple[str, str], ...]],
    old_listing: ListingLoader,
) -> str:
    """` (added a.csv; modified b.csv)`, when both listings are known."""
    before = old_listing(old)
    after = listings.get(new)
    if before is None or after is None:
        return ""
    parts = []
    for label, names in zip(
        ("added", "removed", "modified"), diff_listings(before, after), strict=True
    ):
        if names:
            shown = ", ".join(names[:_MAX_LISTED])
            more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
            parts.append(f"{label} {shown}{more}")
    return f" ({'; '.join(parts)})" if parts else ""


def _output_reasons(cur: Mapping[str, str], before: Mapping[str, str]) -> list[str]:
    """Outputs differ from what the step wrote: said as "modified", never itemized."""
    return _path_reasons("output", cur, before, {}, lambda _: None, changed="modified")
