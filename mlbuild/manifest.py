"""The manifest's values: typed digests, the `Fingerprint` and its JSON, the cache key.

A digest is written everywhere (manifests, directory listings, cache
entries, remote records, `made/`) as the text `kind:hex`: `file:<blake3>`,
`dir:<blake3 of the listing>`, `link:<blake3 of the link's target>`,
`missing:`, and in a directory listing `dir:` for a directory inside it.
Two markers share the form and equal no digest: `changed:during its step`
(the runner: an input that changed while its step ran) and
`changed-while-running:` (observed.py: a file the step read that changed).
This module is the only one that reads that text (`Ref.parse`); every other
module asks it for the kind and the hex, so the form can change in one place.

Manifests (`MANIFEST_VERSION` 2) are the JSON of a `Fingerprint`, compact with
sorted keys; another version reads as stale, never as fresh. The cache key
(`cache_key`) is the BLAKE3 of the same JSON without the output digests, with
the target's name and its output paths added: what the outputs depend on and
where they go.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any, NamedTuple

import blake3

from mlbuild.pipeline.schema import EMPTY, Target

# 2: ports, env digests, discovered inputs, imported and dynamic code. A manifest of
# another version reads as stale ("written by another version"), never as fresh.
MANIFEST_VERSION = 2


class DigestKind(StrEnum):
    """What a digest is of. A `str` so the no-op path formats and compares it at C speed."""

    FILE = "file"
    DIR = "dir"
    LINK = "link"
    MISSING = "missing"
    CHANGED = "changed"  # an input, code file or discovered file that changed during its step
    CHANGED_WHILE_RUNNING = "changed-while-running"  # observed.py's marker (worker side)


_KINDS = {kind.value: kind for kind in DigestKind}


class Ref(NamedTuple):
    """One digest as it is written: its kind and its hex ("" for `missing:` and a listed `dir:`)."""

    kind: DigestKind
    hex: str

    @staticmethod
    def parse(text: str) -> Ref:
        """The digest written as `text`; ValueError when it is not of the `kind:hex` form."""
        kind, hex_ = split(text)
        if kind is None:
            raise ValueError(f"not a digest: {text[:80]!r}")
        return Ref(kind, hex_)

    @property
    def text(self) -> str:
        return self.kind + ":" + self.hex


def split(text: str) -> tuple[DigestKind | None, str]:
    """(kind, hex) of a written digest; (None, "") when `text` is not one. No tuple class
    is made: entries with millions of tree items are checked with this."""
    name, sep, hex_ = text.partition(":")
    kind = _KINDS.get(name) if sep else None
    return (kind, hex_) if kind is not None else (None, "")


def kind_of(text: str) -> DigestKind | None:
    """The kind of a written digest; None when `text` is not one."""
    name, sep, _ = text.partition(":")
    return _KINDS.get(name) if sep else None


def file_hex(text: str) -> str | None:
    """The object digest of a written file digest; None for any other kind."""
    name, sep, hex_ = text.partition(":")
    return hex_ if sep and name == DigestKind.FILE else None


def is_missing(text: str) -> bool:
    return kind_of(text) is DigestKind.MISSING


def is_dir(text: str) -> bool:
    return kind_of(text) is DigestKind.DIR


MISSING_TEXT = Ref(DigestKind.MISSING, "").text  # matches nothing a restore or a step writes
DIR_IN_LISTING = Ref(DigestKind.DIR, "").text  # a directory inside a listed directory
CHANGED_DURING_STEP = Ref(DigestKind.CHANGED, "during its step").text  # equal to no digest


# A port as the manifest keeps it: [direction, name or None, path or pattern, matches].
# Matches are listed for patterns only (a plain path matches itself).
PortEntry = tuple[str, str | None, str, tuple[str, ...]]


class Fingerprint(NamedTuple):
    """Everything a target's result depends on, as comparable text (digests as `Ref` text)."""

    action: str
    params: Mapping[str, str]  # name -> canonical encoding
    env: Mapping[str, str | None]  # name -> BLAKE3 of the value, None when unset
    inputs: Mapping[str, str]  # path -> digest text (globs expanded to their matches)
    outputs: Mapping[str, str] = EMPTY
    code: Mapping[str, str] = EMPTY  # code file -> digest
    packages: Mapping[str, str | None] = EMPTY
    ports: tuple[PortEntry, ...] = ()  # the declared interface, in order
    discovered: Mapping[str, str] = EMPTY  # undeclared files the step read -> digest text
    imported: tuple[str, ...] = ()  # code files seen imported at run time, not found statically
    dynamic: tuple[str, ...] = ()  # code files importing modules by computed names

    def to_json(self) -> str:
        return _dumps(_payload(self))

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
                code=data["code"],
                packages=data["packages"],
                ports=tuple(
                    (kind, name, path, tuple(matches))
                    for kind, name, path, matches in data["ports"]
                ),
                discovered=data["discovered"],
                imported=tuple(data["imported"]),
                dynamic=tuple(data["dynamic"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None  # a damaged row: as if there were no manifest, so the target reruns


def _payload(fingerprint: Fingerprint) -> dict[str, Any]:
    """The manifest's JSON object (tuples are written as the lists they would be read as)."""
    return {
        "version": MANIFEST_VERSION,
        "action": fingerprint.action,
        "params": dict(fingerprint.params),
        "env": dict(fingerprint.env),
        "inputs": dict(fingerprint.inputs),
        "outputs": dict(fingerprint.outputs),
        "code": dict(fingerprint.code),
        "packages": dict(fingerprint.packages),
        "ports": fingerprint.ports,
        "discovered": dict(fingerprint.discovered),
        "imported": fingerprint.imported,
        "dynamic": fingerprint.dynamic,
    }


def _dumps(data: Mapping[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def cache_key(target_name: str, fingerprint: Fingerprint, output_paths: Iterable[str]) -> str:
    """The run-cache key: everything the outputs depend on, and where they go.

    The hashed bytes are those of the manifest's JSON without `outputs`, plus
    `target` and `output_paths`, as keys were made when they were computed by
    reading that JSON back; so caches written before stay valid.
    """
    data = _payload(fingerprint)
    del data["outputs"]
    data["target"] = target_name
    data["output_paths"] = sorted(output_paths)
    return blake3.blake3(_dumps(data).encode()).hexdigest()


def target_key(target: Target, fingerprint: Fingerprint) -> str:
    """`target`'s cache key for `fingerprint`: the one way the runner, the query and
    `push` derive it from a manifest."""
    return cache_key(target.name, fingerprint, [port.path for port in target.outputs])
