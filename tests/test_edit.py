"""Round-trip edits of params files and pipeline.toml (mlbuild/pipeline/edit.py), on real files."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import tomli

from mlbuild.errors import ParamsFileError
from mlbuild.pipeline.edit import render, set_value, set_values

YAML_TEXT = textwrap.dedent(
    """\
    # DVC-style parameters
    prepare:
        split: 0.20  # fraction held out
        seed: 20170428

    train:
        n_est: 50   # trees
        min_split: "0.01"
        layers: [64, 32]
    """
)


def test_yaml_value_set_with_comments_layout_and_other_values_kept(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(YAML_TEXT)
    set_value(path, "train.n_est", 100)
    assert path.read_text() == YAML_TEXT.replace("n_est: 50 ", "n_est: 100")


def test_yaml_several_values_and_an_inline_list_stays_inline(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(YAML_TEXT)
    set_values(path, {"prepare.split": 0.3, "train.layers": [8, 8]})
    text = path.read_text()
    assert "split: 0.3   # fraction held out" in text
    assert "layers: [8, 8]" in text
    assert text.startswith("# DVC-style parameters\n")
    assert 'min_split: "0.01"' in text


def test_toml_params_table_of_a_pipeline_file(tmp_path: Path) -> None:
    text = (
        '# the pipeline\n[params]\nepochs = 1  # how many\nlr = 0.001\n\n[targets.t]\ncmd = "x"\n'
    )
    path = tmp_path / "pipeline.toml"
    path.write_text(text)
    set_value(path, "params.epochs", 3)
    assert path.read_text() == text.replace("epochs = 1 ", "epochs = 3 ")


def test_toml_dotted_keys_and_new_keys(tmp_path: Path) -> None:
    path = tmp_path / "params.toml"
    path.write_text("[train]\nn_est = 50 # trees\nopt.lr = 0.1\n")
    set_values(path, {"train.n_est": 7, "train.opt.lr": 0.5, "train.extra": "x"})
    data = tomli.loads(path.read_text())
    assert data == {"train": {"n_est": 7, "opt": {"lr": 0.5}, "extra": "x"}}
    assert "n_est = 7 # trees" in path.read_text()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{\n  "train": {\n    "n_est": 50,\n    "lr": 0.1\n  },\n  "a": 1\n}\n', 2),
        ('{\n    "train": {\n        "n_est": 50,\n        "lr": 0.1\n    },\n    "a": 1\n}', 4),
        ('{"train": {"n_est": 50, "lr": 0.1}, "a": 1}', None),
    ],
)
def test_json_keeps_key_order_and_indent(tmp_path: Path, text: str, expected: int | None) -> None:
    path = tmp_path / "params.json"
    path.write_text(text)
    set_value(path, "train.n_est", 100)
    new = path.read_text()
    data = json.loads(text)
    data["train"]["n_est"] = 100
    assert new == json.dumps(data, indent=expected) + ("\n" if text.endswith("\n") else "")
    assert list(json.loads(new)) == ["train", "a"]


def test_a_value_the_format_cannot_hold_changes_nothing(tmp_path: Path) -> None:
    import datetime

    path = tmp_path / "params.json"
    path.write_text('{"a": 1}\n')
    with pytest.raises(ParamsFileError, match=r"params.json: cannot write the value as JSON"):
        set_values(path, {"a": 2, "b": datetime.date(2020, 1, 1)})
    assert path.read_text() == '{"a": 1}\n'


def test_a_key_below_a_value_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train: 5\n")
    with pytest.raises(ParamsFileError, match=r"train.n_est: 'train' is a value, not a table"):
        set_value(path, "train.n_est", 1)
    assert path.read_text() == "train: 5\n"


def test_unparsable_file_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("a: 1\nb: [1, 2\n")
    with pytest.raises(ParamsFileError, match=r"params.yaml:3: invalid YAML"):
        render(path, {"a": 2})


def test_outside_the_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "project"
    root.mkdir()
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text("a: 1\n")
    (root / "params.yaml").symlink_to(outside)
    with pytest.raises(ParamsFileError, match="resolves outside the project"):
        set_value(root / "params.yaml", "a", 2, root=root)
    assert outside.read_text() == "a: 1\n"


def test_a_symlink_inside_the_project_stays_a_link_and_mode_is_kept(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    real = tmp_path / "conf" / "params.yaml"
    real.write_text("a: 1\n")
    real.chmod(0o640)
    link = tmp_path / "params.yaml"
    link.symlink_to(real)
    set_value(link, "a", 2, root=tmp_path)
    assert link.is_symlink()
    assert real.read_text() == "a: 2\n"
    assert real.stat().st_mode & 0o777 == 0o640
    assert sorted(os.listdir(tmp_path / "conf")) == ["params.yaml"]  # no temp file left


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "params.ini"
    path.write_text("a=1\n")
    with pytest.raises(ParamsFileError, match="unknown params file format"):
        set_value(path, "a", 2)


def test_a_read_only_file_is_refused_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("a: 1\n")
    path.chmod(0o444)
    with pytest.raises(ParamsFileError, match="is read-only; not written"):
        set_value(path, "a", 2)
    assert path.read_text() == "a: 1\n"
