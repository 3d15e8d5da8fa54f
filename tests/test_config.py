"""Config loading: YAML onto dataclasses, overrides, paths, and one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

import ecapa_accel as ea
from ecapa_accel.config import unsafe_resume_changes


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conf" / "run.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def test_yaml_and_overrides_map_onto_typed_fields(tmp_path):
    path = write(tmp_path, """
data:
  datasets:
    - {name: vox2, csv: lists/vox2.csv, weight: 0.7}
    - {name: cn, csv: /abs/cn.csv, weight: 0.3}
train:
  mixed_precision: no
  batch_size: 64
""")
    cfg = ea.load_config(path, ["train.max_steps=100", "optim.lr=0.01", "model.variant=wespeaker"])
    assert cfg.train.mixed_precision == "no"  # bare YAML `no` is false
    assert cfg.train.max_steps == 100 and cfg.optim.lr == 0.01 and cfg.model.variant == "wespeaker"
    assert cfg.data.datasets[0].csv == str((path.parent / "lists" / "vox2.csv").resolve())
    assert cfg.data.datasets[1].csv == "/abs/cn.csv"
    assert cfg.data.datasets[0].weight == 0.7 and cfg.train.batch_size == 64


@pytest.mark.parametrize(
    "text, overrides, key",
    [
        ("train: {colour: red}", [], "train.colour"),
        ("train: {batch_size: lots}", [], "train.batch_size"),
        ("train: {mixed_precision: fp8}", [], "train.mixed_precision"),
        ("model: {channels: -4}", [], "model.channels"),
        ("data: {datasets: [{name: a}]}", [], "data.datasets[0].csv"),
        ("{}", ["train.max_steps=ten"], "train.max_steps"),
        ("{}", ["nosuch.key=1"], "nosuch"),
        ("{}", ["max_steps"], "max_steps"),
        ("train: [1, 2]", [], "train"),
    ],
)
def test_mistakes_name_the_key(tmp_path, text, overrides, key):
    with pytest.raises(ea.UserError) as error:
        ea.load_config(write(tmp_path, text), overrides)
    message = str(error.value)
    assert key in message and "\n" not in message


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ea.UserError, match="line 3 invalid YAML"):
        ea.load_config(write(tmp_path, "train:\n  batch_size: [\n"))
    with pytest.raises(ea.UserError, match="not found"):
        ea.load_config(tmp_path / "absent.yaml")


def test_resume_safety_classifies_keys(tmp_path):
    path = write(tmp_path, "{}")
    base = ea.load_config(path)
    safe = ea.load_config(path, ["train.max_steps=5", "train.epochs=3", "data.num_workers=0",
                                 "train.keep_checkpoints=9", "eval.every_steps=10"])
    assert unsafe_resume_changes(base, safe) == []
    unsafe = ea.load_config(path, ["model.channels=512", "train.seed=1", "train.batch_size=128"])
    assert unsafe_resume_changes(base, unsafe) == ["model.channels", "train.batch_size", "train.seed"]
