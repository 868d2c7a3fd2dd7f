"""The manifest module: digests as text and back, the manifest JSON, the cache key.

The pinned key and JSON below were computed by the code before this module
existed (cache_key read the manifest JSON back): a change to them would make
every cache written before miss, and every manifest read as changed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import blake3
import pytest

from mlbuild.fingerprint import Fingerprinter
from mlbuild.manifest import (
    CHANGED_DURING_STEP,
    DIR_IN_LISTING,
    MISSING_TEXT,
    DigestKind,
    Fingerprint,
    Ref,
    cache_key,
    file_hex,
    kind_of,
    split,
)
from mlbuild.observed import CHANGED_WHILE_RUNNING

HEX = "ab" * 32

FP = Fingerprint(
    action="python steps.py:train",
    params={"epochs": "3", "name": '"caf\u00e9"'},
    env={"TOKEN": "ab" * 32, "UNSET": None},
    inputs={
        "data/a.csv": "file:" + "1" * 64,
        "data/d": "dir:" + "2" * 64,
        "odd/\udcff.bin": "missing:",
    },
    outputs={"out/model.bin": "file:" + "3" * 64},
    code={"steps.py": "4" * 64},
    packages={"numpy": "2.0.0", "gone": None},
    ports=(
        ("in", "a", "data/a.csv", ()),
        ("in", None, "data/*.csv", ("data/a.csv",)),
        ("out", "model", "out/model.bin", ()),
    ),
    discovered={"conf.json": "changed:during its step"},
    imported=("lib/x.py",),
    dynamic=("steps.py",),
)
OUTPUTS = ["out/model.bin", "out/b"]
# Computed with the code of commit 7ef7482 (before manifest.py).
PINNED_KEY = "14a384edab89020a8bfbfb3fcb0859092ed09af3a55be9c8a168688b7c42f8ee"
PINNED_JSON = (
    '{"action":"python steps.py:train","code":{"steps.py":"' + "4" * 64 + '"},'
    '"discovered":{"conf.json":"changed:during its step"},"dynamic":["steps.py"],'
    '"env":{"TOKEN":"' + "ab" * 32 + '","UNSET":null},"imported":["lib/x.py"],'
    '"inputs":{"data/a.csv":"file:' + "1" * 64 + '","data/d":"dir:' + "2" * 64 + '",'
    '"odd/\\udcff.bin":"missing:"},"outputs":{"out/model.bin":"file:' + "3" * 64 + '"},'
    '"packages":{"gone":null,"numpy":"2.0.0"},"params":{"epochs":"3","name":"\\"caf\\u00e9\\""},'
    '"ports":[["in","a","data/a.csv",[]],["in",null,"data/*.csv",["data/a.csv"]],'
    '["out","model","out/model.bin",[]]],"version":2}'
)


@pytest.mark.parametrize(
    ("text", "kind", "hex_"),
    [
        ("file:" + HEX, DigestKind.FILE, HEX),
        ("dir:" + HEX, DigestKind.DIR, HEX),
        ("dir:", DigestKind.DIR, ""),  # a directory inside a listing
        ("link:" + HEX, DigestKind.LINK, HEX),
        ("missing:", DigestKind.MISSING, ""),
        ("changed:during its step", DigestKind.CHANGED, "during its step"),
        ("changed-while-running:", DigestKind.CHANGED_WHILE_RUNNING, ""),
    ],
)
def test_parse_and_text_round_trip(text: str, kind: DigestKind, hex_: str) -> None:
    ref = Ref.parse(text)
    assert ref == Ref(kind, hex_)
    assert ref.text == text
    assert split(text) == (kind, hex_)
    assert kind_of(text) is kind
    assert file_hex(text) == (hex_ if kind is DigestKind.FILE else None)


@pytest.mark.parametrize("text", ["", "file", HEX, "blob:" + HEX, "File:" + HEX, ":" + HEX])
def test_what_is_not_a_digest_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a digest"):
        Ref.parse(text)
    assert split(text) == (None, "")
    assert kind_of(text) is None
    assert file_hex(text) is None


def test_the_markers_are_digests_that_equal_none() -> None:
    assert Ref.parse(CHANGED_DURING_STEP).kind is DigestKind.CHANGED
    # observed.py spells its marker itself (the worker imports nothing of mlbuild).
    assert Ref.parse(CHANGED_WHILE_RUNNING).kind is DigestKind.CHANGED_WHILE_RUNNING
    assert Ref.parse(MISSING_TEXT) == Ref(DigestKind.MISSING, "")
    assert Ref.parse(DIR_IN_LISTING) == Ref(DigestKind.DIR, "")


def test_the_fingerprinter_writes_what_parse_reads(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"a")
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_bytes(b"b")
    os.symlink("b.txt", tmp_path / "d" / "l")
    fp = Fingerprinter(tmp_path, {})
    file = fp.digest("a.txt")
    assert Ref.parse(file.text) == Ref(DigestKind.FILE, blake3.blake3(b"a").hexdigest())
    folder = fp.digest("d")
    assert Ref.parse(folder.text).kind is DigestKind.DIR
    kinds = {name: Ref.parse(value).kind for name, value in folder.listing}
    assert kinds == {"b.txt": DigestKind.FILE, "l": DigestKind.LINK, "sub": DigestKind.DIR}
    assert Ref.parse(fp.digest("nope").text) == Ref(DigestKind.MISSING, "")


def test_the_manifest_json_is_as_before_and_reads_back() -> None:
    assert FP.to_json() == PINNED_JSON
    assert Fingerprint.from_json(PINNED_JSON) == FP
    assert Fingerprint.from_json(PINNED_JSON.replace('"version":2', '"version":1')) is None


def test_the_key_is_as_before() -> None:
    """Caches written before this module stay valid: the key's bytes did not change."""
    assert cache_key("train", FP, OUTPUTS) == PINNED_KEY
    # What the key was computed from, then: the manifest JSON read back.
    data = json.loads(FP.to_json())
    data.pop("outputs")
    data["target"] = "train"
    data["output_paths"] = sorted(OUTPUTS)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    assert blake3.blake3(text.encode()).hexdigest() == PINNED_KEY


def test_the_key_is_stable_across_runs() -> None:
    """Another interpreter, with another string hash seed, makes the same key."""
    code = (
        "from tests.test_manifest import FP, OUTPUTS; from mlbuild.manifest import cache_key;"
        " print(cache_key('train', FP, OUTPUTS))"
    )
    keys = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            cwd=Path(__file__).parent.parent,
            capture_output=True,
            text=True,
            check=True,
        )
        keys.add(done.stdout.strip())
    assert keys == {PINNED_KEY}


def test_equal_fingerprints_have_equal_keys() -> None:
    """Built in another order (dicts, output paths), the key is the same."""
    same = FP._replace(
        inputs=dict(reversed(list(FP.inputs.items()))),
        params=dict(reversed(list(FP.params.items()))),
        env=dict(reversed(list(FP.env.items()))),
    )
    assert cache_key("train", same, reversed(OUTPUTS)) == PINNED_KEY
    # What the outputs hold now is not part of the key: it says what they will be.
    other_outputs = FP._replace(outputs={"out/model.bin": "missing:"})
    assert cache_key("train", other_outputs, OUTPUTS) == PINNED_KEY


def test_the_key_differs_for_a_reordered_interface() -> None:
    reordered = FP._replace(ports=(FP.ports[1], FP.ports[0], FP.ports[2]))
    assert cache_key("train", reordered, OUTPUTS) != PINNED_KEY
    assert cache_key("other", FP, OUTPUTS) != PINNED_KEY
    assert cache_key("train", FP, ["out/model.bin"]) != PINNED_KEY
    changed = FP._replace(inputs={**FP.inputs, "data/a.csv": CHANGED_DURING_STEP})
    assert cache_key("train", changed, OUTPUTS) != PINNED_KEY
