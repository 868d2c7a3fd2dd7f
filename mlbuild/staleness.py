"""Stale or fresh: what a target would consume now, compared with its manifest.

A manifest is the fingerprint a target had when it last succeeded: its action,
parameter values, declared environment, input digests and output digests.
The target is fresh exactly when the fingerprint observed now is equal, and
every difference becomes a reason the user can read. Content decides, never
timestamps: the stat cache only saves re-hashing unchanged bytes.

The action compared is the command *template*: the interpolated command is a
function of the template, the parameter values and the paths, which are all
compared on their own, so a changed parameter reads as `param epochs changed
1 -> 2` rather than also as "command changed".
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from mlbuild.code import CodeFingerprint
from mlbuild.config import EMPTY, Target
from mlbuild.fingerprint import (
    Digest,
    Fingerprinter,
    diff_listings,
    encode_value,
    expand_port,
)

MANIFEST_VERSION = 1
_MAX_LISTED = 3  # entries named per directory in a reason before "and N more"


class Fingerprint(NamedTuple):
    """Everything a target's result depends on, as comparable text."""

    action: str
    params: Mapping[str, str]  # name -> canonical encoding
    env: Mapping[str, str | None]
    inputs: Mapping[str, str]  # path -> "kind:digest" (globs expanded to their matches)
    outputs: Mapping[str, str] = EMPTY
    code: Mapping[str, str] = EMPTY  # code file -> digest
    packages: Mapping[str, str | None] = EMPTY

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": MANIFEST_VERSION,
                "action": self.action,
                "params": self.params,
                "env": self.env,
                "inputs": self.inputs,
                "outputs": self.outputs,
                "code": self.code,
                "packages": self.packages,
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    @staticmethod
    def from_json(text: str) -> Fingerprint | None:
        """The stored fingerprint, or None when it is of another manifest version or unreadable."""
        try:
            data: dict[str, Any] = json.loads(text)
            if data.get("version") != MANIFEST_VERSION:
                return None
            return Fingerprint(
                action=data["action"],
                params=data["params"],
                env=data["env"],
                inputs=data["inputs"],
                outputs=data["outputs"],
                code=data.get("code", {}),
                packages=data.get("packages", {}),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None  # a damaged row: as if there were no manifest, so the target reruns


class Observation(NamedTuple):
    """A target's fingerprint as of now, with the directory listings behind it."""

    fingerprint: Fingerprint
    listings: Mapping[str, tuple[tuple[str, str], ...]]  # "dir:digest" -> listing
    imported_by: Mapping[str, str] = EMPTY  # code file -> importer


class Decision(NamedTuple):
    """Whether a target must run, and why (reasons are empty when fresh)."""

    fresh: bool
    reasons: tuple[str, ...] = ()
    compared: str = ""  # what was found equal, for --explain on fresh targets


def expand_inputs(target: Target, root: str) -> list[str]:
    """The target's input paths, with glob patterns replaced by their matches."""
    return [path for port in target.inputs for path in expand_port(port, root)]


def _digest_text(digest: Digest) -> str:
    return f"{digest.kind}:{digest.digest}"


def observe_paths(
    fp: Fingerprinter, paths: list[str], listings: dict[str, tuple[tuple[str, str], ...]]
) -> dict[str, str]:
    """`path -> "kind:digest"` for each path, collecting directory listings on the way."""
    result: dict[str, str] = {}
    for path in paths:
        digest = fp.digest(path)
        text = _digest_text(digest)
        if digest.kind == "dir":
            listings[text] = digest.listing
        result[path] = text
    return result


def observe(
    target: Target,
    fp: Fingerprinter,
    *,
    code: CodeFingerprint | None = None,
    packages: Mapping[str, str | None] | None = None,
) -> Observation:
    """Fingerprint a target as it stands now (inputs hashed through the stat cache)."""
    listings: dict[str, tuple[tuple[str, str], ...]] = {}
    inputs = observe_paths(fp, expand_inputs(target, str(fp.root)), listings)
    outputs = observe_paths(fp, [p.path for p in target.outputs], listings)
    fingerprint = Fingerprint(
        action=target.action,
        params={name: encode_value(value) for name, value in target.params.items()},
        env={name: os.environ.get(name) for name in target.env},
        inputs=inputs,
        outputs=outputs,
        code=dict(code.files) if code else {},
        packages=dict(packages or {}),
    )
    return Observation(fingerprint, listings, code.imported_by if code else {})


ListingLoader = Callable[[str], "list[tuple[str, str]] | None"]


def decide(
    target: Target,
    now: Observation,
    before: Fingerprint | None,
    old_listing: ListingLoader,
    *,
    forced: bool = False,
) -> Decision:
    """Compare the observed fingerprint with the manifest; fresh only if all is equal."""
    if before is None:
        return Decision(False, ("never built",))
    reasons: list[str] = []
    if forced:
        reasons.append("forced")
    if target.always_run:
        reasons.append("always_run")
    cur = now.fingerprint
    if cur.action != before.action:
        reasons.append("command changed" if target.cmd is not None else "function changed")
    reasons += _code_reasons(cur.code, before.code, now.imported_by)
    reasons += _param_reasons(cur.params, before.params)
    for name in sorted(set(cur.env) | set(before.env)):
        if cur.env.get(name) != before.env.get(name):
            reasons.append(f"env {name} changed")
    for name in sorted(set(cur.packages) | set(before.packages)):
        old, new = before.packages.get(name), cur.packages.get(name)
        if old != new:
            reasons.append(f"package {name} changed {old or 'absent'} -> {new or 'absent'}")
    reasons += _path_reasons("input", cur.inputs, before.inputs, now.listings, old_listing)
    reasons += _output_reasons(cur.outputs, before.outputs)
    compared = ", ".join(
        f"{len(items)} {label}"
        for label, items in (
            ("code files", cur.code),
            ("params", cur.params),
            ("env vars", cur.env),
            ("packages", cur.packages),
            ("inputs", cur.inputs),
            ("outputs", cur.outputs),
        )
        if items
    )
    return Decision(
        not reasons, tuple(reasons), "same action" + (f", {compared}" if compared else "")
    )


def _code_reasons(
    cur: Mapping[str, str], before: Mapping[str, str], imported_by: Mapping[str, str]
) -> list[str]:
    reasons: list[str] = []
    for path in sorted(set(cur) | set(before)):
        if cur.get(path) == before.get(path):
            continue
        if path not in cur:
            reasons.append(f"code removed: {path} (no longer imported)")
        elif path in imported_by:
            reasons.append(f"code changed: {path} (imported by {imported_by[path]})")
        else:
            reasons.append(f"code changed: {path}")
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
        elif new.startswith("missing:"):
            reasons.append(f"{what} missing: {path}")
        elif new.startswith("dir:") and old.startswith("dir:"):
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
