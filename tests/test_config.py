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


@pytest.mark.parametrize("spelling, value", [("1e-4", 1e-4), ("1E-4", 1e-4), (".5", 0.5), ("5.", 5.0),
                                             ("2.5e-1", 0.25), ("+1e-2", 0.01)])
def test_float_keys_accept_every_decimal_spelling(tmp_path, spelling, value):
    from_yaml = ea.load_config(write(tmp_path, f"optim: {{lr: {spelling}}}"))
    from_override = ea.load_config(write(tmp_path, "{}"), [f"optim.lr={spelling}"])
    assert from_yaml.optim.lr == from_override.optim.lr == value


def test_negative_exponents_and_integral_exponents_for_integer_keys(tmp_path):
    cfg = ea.load_config(write(tmp_path, "data: {augment: {gain_db: [-.5, -1e-3]}}\ntrain: {max_steps: 1e3}"),
                         ["optim.betas=[9e-1, 0.999]", "train.checkpoint_every_steps=2.5e2"])
    assert cfg.data.augment.gain_db == [-0.5, -1e-3] and cfg.optim.betas == [0.9, 0.999]
    assert cfg.train.max_steps == 1000 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.checkpoint_every_steps == 250


@pytest.mark.parametrize(
    "text, overrides, key, says",
    [
        ("{}", ["optim.lr=1e-4x"], "optim.lr", "must be a number"),
        ("optim: {lr: e-4}", [], "optim.lr", "must be a number"),
        ("optim: {lr: 1e}", [], "optim.lr", "must be a number"),
        ("{}", ["train.max_steps=1.55e1"], "train.max_steps", "must be an integer"),
        ("{}", ["train.max_steps=1e-3"], "train.max_steps", "must be an integer"),
        ("{}", ["train.max_steps=.inf"], "train.max_steps", "must be an integer"),
        ("{}", ["optim.lr=.inf"], "optim.lr", "finite"),
        ("optim: {lr: .nan}", [], "optim.lr", "finite"),
        ("optim: {lr: 1e400}", [], "optim.lr", "finite"),
        ("data: {datasets: [{name: a, csv: a.csv, weight: .inf}]}", [], "data.datasets[0].weight", "finite"),
        ("{}", ["optim.betas=[0.9, .nan]"], "optim.betas[1]", "finite"),
        ("{}", ["loss.scale=-.inf"], "loss.scale", "finite"),
    ],
)
def test_bad_numbers_and_non_finite_values_name_the_key(tmp_path, text, overrides, key, says):
    with pytest.raises(ea.UserError) as error:
        ea.load_config(write(tmp_path, text), overrides)
    message = str(error.value)
    assert f"'{key}'" in message and says in message and "\n" not in message


# The cases of issue 13 (momentum, betas, seed, crop, channels, ...) run through the CLI in test_preflight.py.
@pytest.mark.parametrize(
    "overrides, key",
    [
        (["optim.momentum=1.0"], "optim.momentum"),
        (["optim.name=adamw", "optim.betas=[0.9, 1.0]"], "optim.betas"),
        (["features.frame_shift_ms=0.01", "features.frame_length_ms=0.02"], "features.frame_shift_ms"),
        (["features.n_mels=2"], "features.n_mels"),
        (["optim.lr=0.00001", "optim.min_lr=0.0001"], "optim.min_lr"),
        (["optim.schedule=step", "optim.decay_gamma=0"], "optim.decay_gamma"),
    ],
)
def test_values_that_would_fail_during_training_are_refused_when_loaded(tmp_path, overrides, key):
    with pytest.raises(ea.UserError) as error:
        ea.load_config(write(tmp_path, "{}"), overrides)
    message = str(error.value)
    assert f"{key}" in message and "\n" not in message


def test_rules_apply_only_where_the_value_is_used(tmp_path):
    path = write(tmp_path, "{}")
    # Plain SGD takes momentum 0; AdamW ignores momentum; min_lr is only the cosine floor.
    assert ea.load_config(path, ["optim.momentum=0", "optim.nesterov=false"]).optim.momentum == 0.0
    assert ea.load_config(path, ["optim.name=adamw", "optim.momentum=0"]).optim.name == "adamw"
    assert ea.load_config(path, ["optim.schedule=constant", "optim.lr=1e-5", "optim.min_lr=1e-4"]).optim.lr == 1e-5
    assert ea.load_config(path, ["data.sample_rate=8000", "train.seed=4294967295"]).train.seed == 2**32 - 1
