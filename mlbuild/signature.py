"""A manifest's stat signature: a no-op's fast way to call a target fresh.

Deciding freshness the long way parses the manifest's JSON and builds the
observed `Fingerprint` (staleness.py): most of a no-op's cost per target. The
signature, kept beside the manifest (`manifests.sig`, store.py), says the same
thing from stat calls alone. It holds the fingerprint's static part (the
command as run, the action, parameter encodings, environment digests, the
declared ports) and, for every input, output and discovered file, the stat its
digest was taken at (size, mtime_ns, ctime_ns, inode). A target is fresh by
its signature when the static part built from the target now is equal and
every file's `lstat` is equal: then the stat cache's rule
(`fingerprint.StatEntry.matches`) says each digest is the manifest's, so the
full comparison would find the same fingerprint.

A signature is written only when that rule holds for every file: each digest
is a plain file's and comes from a stat entry that is not racy
(`fingerprint.is_trusted`: its timestamps older than the hash by the
filesystem's granularity), since a racy stat could hide a later write. So a
signature carries no check time, and racy outputs of a step that just ran get
theirs from the next no-op, after the long way re-hashed them.

Only what stats can vouch for is signed: shell targets whose command names no
script (their code closure is empty by construction), with no glob input, no
tracked package, not `always_run`. Anything else, any difference, a damaged or
unknown blob: the long way decides, as before (correctness never rests on the
signature being present). Format (`SIG_FORMAT` 1): a CRC-32 (4 bytes, big
endian) of the payload, then the payload, `marshal` version 2 of
`(static, files, counts)`; the static part starts with SIG_FORMAT and
`manifest.MANIFEST_VERSION`, so another format or manifest version never matches.
"""

from __future__ import annotations

import marshal
import os
import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mlbuild.code import may_name_script
from mlbuild.fingerprint import Fingerprinter, StatEntry, encode_value, is_trusted
from mlbuild.manifest import MANIFEST_VERSION, Fingerprint
from mlbuild.pipeline.schema import Target
from mlbuild.uptodate import env_digest

if TYPE_CHECKING:
    from mlbuild.uptodate import SignedFile

SIG_FORMAT = 1
_MARSHAL = 2
_CRC = 4
_FILE_PREFIX = "file:"

# Counts of (code files, params, env vars, packages, inputs, discovered, outputs),
# the shape staleness.compared_text describes for --explain.
Counts = tuple[int, int, int, int, int, int, int]


def signable(target: Target) -> bool:
    """Whether stats alone can vouch for this target's freshness (see the module docstring)."""
    return (
        target.python is None
        and not target.track
        and not target.always_run
        and not any(port.is_glob for port in target.inputs)
    )


def _static(target: Target) -> tuple[Any, ...]:
    """The fingerprint's static part, built from the target and the environment now."""
    ports = tuple([("in", port.name, port.path, ()) for port in target.inputs]) + tuple(
        [("out", port.name, port.path, ()) for port in target.outputs]
    )
    params = target.params
    env = target.env
    return (
        SIG_FORMAT,
        MANIFEST_VERSION,
        target.command,
        target.cmd if target.cmd is not None else target.action,
        tuple([(name, encode_value(value)) for name, value in params.items()]) if params else (),
        tuple([(name, env_digest(os.environ.get(name))) for name in env]) if env else (),
        ports,
    )


def make_signature(
    target: Target, fingerprint: Fingerprint, stats: Mapping[str, StatEntry]
) -> bytes | None:
    """The signature of `fingerprint` (the target's manifest), or None when it cannot have one.

    `stats` is the stat cache the fingerprint's digests were taken through.
    """
    if (
        not signable(target)
        or fingerprint.code
        or fingerprint.packages
        or fingerprint.imported
        or fingerprint.dynamic
        or may_name_script(target.command or "")
    ):
        return None
    static = (
        SIG_FORMAT,
        MANIFEST_VERSION,
        target.command,
        fingerprint.action,
        tuple(fingerprint.params.items()),
        tuple(fingerprint.env.items()),
        fingerprint.ports,
    )
    if static != _static(target):
        return None  # not the target as it is declared now
    files: list[SignedFile] = []
    for paths in (fingerprint.inputs, fingerprint.outputs, fingerprint.discovered):
        for path, digest in paths.items():
            entry = stats.get(path)
            if (
                entry is None
                or digest != _FILE_PREFIX + entry.digest
                or entry.ctime_ns < 0
                or not is_trusted(entry.mtime_ns, entry.ctime_ns, entry.checked_ns)
            ):
                return None
            files.append((path, entry.size, entry.mtime_ns, entry.ctime_ns, entry.ino))
    counts: Counts = (
        0,
        len(fingerprint.params),
        len(fingerprint.env),
        0,
        len(fingerprint.inputs),
        len(fingerprint.discovered),
        len(fingerprint.outputs),
    )
    payload = marshal.dumps((static, tuple(files), counts), _MARSHAL)
    return zlib.crc32(payload).to_bytes(_CRC, "big") + payload


def fresh_by_signature(target: Target, sig: bytes, fp: Fingerprinter) -> Counts | None:
    """The counts of a target its signature finds fresh now; None: decide the long way.

    The hot loop of a no-op: one call per target, two `lstat`s of most of its cost.
    No glob check here: a port is a glob by its path's text, which the static
    part compares, and no signature is made for a target with one.
    """
    if target.python is not None or target.track or target.always_run:
        return None
    payload = sig[_CRC:]
    if _crc32(payload).to_bytes(_CRC, "big") != sig[:_CRC]:
        return None
    try:
        static, files, counts = _loads(payload)
    except (EOFError, ValueError, TypeError):
        return None
    if static != _static(target):
        return None
    lstat = fp.lstat
    for path, size, mtime_ns, ctime_ns, ino in files:
        st = lstat(path)
        if (
            st is None
            or st.st_mtime_ns != mtime_ns
            or st.st_ctime_ns != ctime_ns
            or st.st_size != size
            or st.st_ino != ino
        ):
            return None
    result: Counts = counts
    return result


def signed_parts(
    sig: bytes,
) -> tuple[tuple[tuple[str, str | None], ...], tuple[SignedFile, ...], Counts]:
    """The environment digests, file stats and counts of `sig` (a valid signature): what
    the up-to-date stamp keeps of a target (uptodate.py)."""
    static, files, counts = _loads(sig[_CRC:])
    env: tuple[tuple[str, str | None], ...] = static[5]
    return env, files, counts


_crc32 = zlib.crc32
_loads = marshal.loads
