"""Typed run configuration: YAML files and dotted `KEY=VALUE` overrides mapped onto dataclasses.

Every mistake (unknown key, wrong type, bad value) raises `UserError` naming the dotted key.
Relative paths in the file resolve against the file's folder, so a resolved config (the copy in
RUN_DIR/config.yaml) is usable from anywhere.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from .errors import UserError

RES2_SCALE = 8  # channel groups in each Res2 convolution of the model: `model.channels` must divide by it
MIN_SAMPLE_RATE = 8000  # telephone speech; below it the 20 Hz - Nyquist mel filterbank has nothing to hold
MAX_SEED = 2**32 - 1  # numpy's seed range
INIT_FORMATS = ("3dspeaker", "wespeaker", "speechbrain")  # peers whose checkpoints `model.init_from` reads


def _choice(default: str, *choices: str):
    return field(default=default, metadata={"choices": (default, *choices)})


@dataclass
class DatasetConfig:
    name: str = ""
    csv: str = ""
    # Instead of `csv`: packed shards (`ecapa-accel pack`): a folder, glob or index.json, local or fsspec URL.
    shards: str = ""
    weight: float = 1.0
    # Datasets that name the same namespace share speaker labels (default: their own name).
    namespace: str | None = None
    # rows: each row drawn in a random order; blocks: blocks of rows in a random order, the rows of
    # data.shuffle_window_blocks blocks at a time interleaved (auto: blocks for shards, rows for a CSV).
    shuffle: str = _choice("auto", "rows", "blocks")
    block_rows: int | None = None  # rows per block of a CSV read in blocks (default 64, as `pack` writes)


@dataclass
class AugmentConfig:
    prob: float = 0.0  # chance that a training sample is augmented at all
    noise_csv: str | None = None  # MUSAN-style noise list (header ID,dur,path[,category])
    rir_csv: str | None = None  # room impulse responses (header ID,dur,path)
    # SNR range in dB per noise category; a category not listed uses "noise".
    snr_db: dict[str, list[float]] = field(
        default_factory=lambda: {"noise": [0.0, 15.0], "speech": [13.0, 20.0], "music": [5.0, 15.0]}
    )
    reverb_prob: float = 0.5  # within an augmented sample: chance of reverberation
    noise_prob: float = 0.5  # within an augmented sample: chance of additive noise
    gain_db: list[float] = field(default_factory=lambda: [0.0, 0.0])  # random gain range


@dataclass
class DataConfig:
    datasets: list[DatasetConfig] = field(default_factory=list)
    sample_rate: int = 16000
    crop_seconds: float = 3.0
    num_workers: int = 4
    stopping_strategy: str = _choice("all_exhausted", "first_exhausted")
    speed_factors: list[float] = field(default_factory=lambda: [1.0])
    speed_as_classes: bool = True  # speaker x speed are new classes (3D-Speaker, WeSpeaker)
    max_bad_fraction: float = 0.05
    shuffle_window_blocks: int = 32  # blocks whose rows are interleaved at once (block-shuffled datasets)
    shard_memory_mb: float = 1024.0  # per data-loading process: remote blocks held, local blocks asked ahead
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class FeaturesConfig:
    kind: str = _choice("kaldi", "speechbrain")
    n_mels: int = 80
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    window: str = _choice("povey", "hamming")  # kaldi window type
    waveform_scale: float = 1.0  # 32768 for WeSpeaker's int16-range front end
    dither: float = 0.0  # Kaldi dither in training; inference never dithers
    mean_norm: bool = True  # subtract the per-utterance mean of each mel bin


@dataclass
class ModelConfig:
    variant: str = _choice("3dspeaker", "wespeaker")
    channels: int = 1024  # a multiple of RES2_SCALE (8)
    embed_dim: int = 192
    # Start from these weights (export folder, run directory or peer checkpoint file); read only at step 0.
    init_from: str | None = None
    init_from_format: str | None = None  # peer of a checkpoint file: 3dspeaker | wespeaker | speechbrain
    init_from_sha256: str | None = None  # of the source's weights file; filled in at step 0 (set it to pin one)


@dataclass
class LossConfig:
    scale: float = 32.0
    margin: float = 0.2
    # The margin grows linearly from 0 to `margin` between these epochs (fractions allowed).
    margin_ramp_start_epoch: float = 0.0
    margin_ramp_end_epoch: float = 0.0
    easy_margin: bool = False


@dataclass
class OptimConfig:
    name: str = _choice("sgd", "adamw")
    lr: float = 0.2
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: str = _choice("cosine", "step", "constant")
    warmup_epochs: float = 0.0
    min_lr: float = 5e-5  # cosine floor
    decay_every_epochs: float = 10.0  # step schedule
    decay_gamma: float = 0.5  # step schedule
    grad_clip: float = 5.0  # max gradient norm; 0 disables


@dataclass
class TrainConfig:
    seed: int = 1234
    batch_size: int = 256  # global: split over processes and accumulation steps
    max_device_batch_size: int | None = None  # per process and micro-step; None: no cap
    epochs: int = 70
    max_steps: int | None = None
    mixed_precision: str = _choice("no", "fp16", "bf16")
    checkpoint_every_steps: int = 1000
    checkpoint_every_minutes: float = 30.0
    keep_checkpoints: int = 3
    log_every_steps: int = 10
    # Optimizer steps in a row allowed to have a non-finite loss or gradient (each is skipped) before the run fails.
    max_nonfinite_steps: int = 5


@dataclass
class EvalConfig:
    trials: str | None = None  # validation trials during training (VoxCeleb or Kaldi format)
    audio_root: str | None = None  # where trial paths resolve (default: the trials file's folder)
    every_steps: int = 0  # 0: only at the end of each epoch
    keep_best: bool = False  # export the checkpoint with the best EER instead of the last
    manifest: str | None = None  # CSV with ID,path columns mapping Kaldi-style trial utterance IDs to audio
    batch_seconds: float = 200.0  # audio per forward batch (utterances of equal length share batches)
    decode_workers: int = 2  # threads decoding audio ahead of the model


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Keys whose change on resume cannot alter what has been learned so far.
SAFE_RESUME_KEYS = (
    "train.epochs",
    "train.max_steps",
    "train.checkpoint_every_steps",
    "train.checkpoint_every_minutes",
    "train.keep_checkpoints",
    "train.log_every_steps",
    "train.max_device_batch_size",
    "train.max_nonfinite_steps",
    "data.num_workers",
    "data.max_bad_fraction",
    "data.shard_memory_mb",
    "eval.",
)

# Path-valued keys, resolved against the config file's folder.
_PATH_KEYS = ("csv", "shards", "noise_csv", "rir_csv", "trials", "audio_root", "manifest", "init_from")


def _is_url(value: str) -> bool:
    return "://" in value  # fsspec URLs (http://, s3://, hf://) are not paths to resolve


# A decimal number as text. PyYAML follows YAML 1.1, which reads `1e-4`, `1E-4` and `-.5` as strings.
_DECIMAL = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


def _as_number(value: Any) -> int | float | None:
    """A YAML value as the number it spells (ints and floats as they are, decimal text parsed); None if none."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str) and _DECIMAL.fullmatch(value):
        return float(value)
    return None


def _convert(value: Any, kind: Any, key: str, source: str) -> Any:
    """Check and convert one YAML value to the annotated type `kind`."""
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        (inner,) = [option for option in options if option is not type(None)]
        return _convert(value, inner, key, source)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise UserError(f"{source}: '{key}' must be a mapping")
        return _build(kind, value, key, source)
    if origin is list:
        (inner,) = typing.get_args(kind)
        if not isinstance(value, list):
            raise UserError(f"{source}: '{key}' must be a list")
        return [_convert(item, inner, f"{key}[{i}]", source) for i, item in enumerate(value)]
    if origin is dict:
        _, inner = typing.get_args(kind)
        if not isinstance(value, dict):
            raise UserError(f"{source}: '{key}' must be a mapping")
        return {str(k): _convert(v, inner, f"{key}.{k}", source) for k, v in value.items()}
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{source}: '{key}' must be true or false, got {value!r}")
    if kind is int:
        number = _as_number(value)
        if isinstance(number, int):
            return number
        if isinstance(number, float) and number.is_integer():  # 1e3, 1000.0
            return int(number)
        raise UserError(f"{source}: '{key}' must be an integer, got {value!r}")
    if kind is float:
        number = _as_number(value)
        if number is None:
            raise UserError(f"{source}: '{key}' must be a number, got {value!r}")
        if not math.isfinite(number):  # no key means anything by .inf or .nan
            raise UserError(f"{source}: '{key}' must be a finite number, got {value!r}")
        return float(number)
    if kind is str:
        if value is False and key.endswith("mixed_precision"):
            return "no"  # bare `no` in YAML is false
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{source}: '{key}' must be a string, got {value!r}")
    raise TypeError(f"unsupported config type {kind!r} for {key}")


def _build(cls: type, values: dict, prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise UserError(f"{source}: unknown key '{key}'")
        converted = _convert(value, hints[name], key, source)
        choices = fields[name].metadata.get("choices")
        if choices and converted not in choices:
            raise UserError(f"{source}: '{key}' must be one of {', '.join(choices)}; got {converted!r}")
        kwargs[name] = converted
    return cls(**kwargs)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _resolve_paths(values: Any, base: Path) -> Any:
    if isinstance(values, dict):
        return {
            k: (str((base / v).resolve()) if k in _PATH_KEYS and isinstance(v, str) and v and not _is_url(v)
                else _resolve_paths(v, base))
            for k, v in values.items()
        }
    if isinstance(values, list):
        return [_resolve_paths(v, base) for v in values]
    return values


def _set_dotted(values: dict, key: str, value: Any, source: str) -> None:
    node = values
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"{source}: '{key}' does not name a config key")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """`["train.max_steps=100", ...]` -> `{"train.max_steps": 100}` (values parsed as YAML)."""
    parsed = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"override '{item}' must look like KEY=VALUE (e.g. train.max_steps=100)")
        try:
            parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            parsed[key.strip()] = raw
    return parsed


def config_from_dict(values: dict, source: str, overrides: list[str] | None = None, base: Path | None = None) -> Config:
    """Build a checked `Config` from plain values plus dotted overrides."""
    values = _resolve_paths(values, base) if base is not None else values
    for key, value in parse_overrides(overrides).items():
        if isinstance(value, str) and key.rsplit(".", 1)[-1] in _PATH_KEYS and not _is_url(value):
            value = str(Path(value).resolve())
        _set_dotted(values, key, value, "override")
    cfg = _build(Config, values, "", source)
    validate(cfg, source)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply `KEY=VALUE` overrides, check everything; raise `UserError` on mistakes."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot read config ({error})") from None
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where} invalid YAML") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: the config must be a mapping of sections (data, model, train, ...)")
    return config_from_dict(values, str(path), overrides, base=path.resolve().parent)


def config_text(cfg: Config) -> str:
    """The YAML text of a resolved config (RUN_DIR/config.yaml; the run directory module writes it)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def validate(cfg: Config, source: str) -> None:
    """Value checks that types alone cannot express."""

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise UserError(f"{source}: '{key}' {message}")

    names = [d.name for d in cfg.data.datasets]
    for i, dataset in enumerate(cfg.data.datasets):
        need(bool(dataset.name), f"data.datasets[{i}].name", "is required")
        need("/" not in dataset.name, f"data.datasets[{i}].name", "must not contain '/'")
        need(bool(dataset.csv) or bool(dataset.shards), f"data.datasets[{i}].csv", "(or .shards) is required")
        need(not (dataset.csv and dataset.shards), f"data.datasets[{i}].shards",
             "and .csv are both given; a dataset reads one of the two")
        need(dataset.block_rows is None or dataset.block_rows >= 1, f"data.datasets[{i}].block_rows",
             "must be at least 1")
        need(not dataset.shards or dataset.shuffle != "rows", f"data.datasets[{i}].shuffle",
             "must be blocks (or auto) for shards: packed audio is read a block at a time")
        need(dataset.weight > 0, f"data.datasets[{i}].weight", "must be positive")
        need(names.count(dataset.name) == 1, f"data.datasets[{i}].name", f"'{dataset.name}' is used twice")
    need(cfg.data.crop_seconds > 0, "data.crop_seconds", "must be positive")
    need(cfg.data.sample_rate >= MIN_SAMPLE_RATE, "data.sample_rate", f"must be at least {MIN_SAMPLE_RATE} Hz")
    need(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    need(bool(cfg.data.speed_factors) and all(f > 0 for f in cfg.data.speed_factors), "data.speed_factors",
         "must be a non-empty list of positive factors")
    need(0 <= cfg.data.max_bad_fraction <= 1, "data.max_bad_fraction", "must be within [0, 1]")
    need(cfg.data.shuffle_window_blocks >= 1, "data.shuffle_window_blocks", "must be at least 1")
    need(cfg.data.shard_memory_mb > 0, "data.shard_memory_mb", "must be positive")
    augment = cfg.data.augment
    for key in ("prob", "reverb_prob", "noise_prob"):
        need(0 <= getattr(augment, key) <= 1, f"data.augment.{key}", "must be within [0, 1]")
    for category, bounds in augment.snr_db.items():
        need(len(bounds) == 2 and bounds[0] <= bounds[1], f"data.augment.snr_db.{category}", "must be [low, high]")
    need(len(augment.gain_db) == 2 and augment.gain_db[0] <= augment.gain_db[1], "data.augment.gain_db",
         "must be [low, high]")
    need(cfg.features.n_mels >= 4, "features.n_mels", "must be at least 4 (Kaldi's filterbank minimum)")
    need(cfg.features.frame_shift_ms >= 1, "features.frame_shift_ms", "must be at least 1 ms")
    need(cfg.features.frame_length_ms >= cfg.features.frame_shift_ms, "features.frame_length_ms",
         "must be at least features.frame_shift_ms")
    need(cfg.features.frame_length_ms <= 1000 * cfg.data.crop_seconds, "features.frame_length_ms",
         f"({cfg.features.frame_length_ms:g} ms) must fit in one training crop "
         f"(data.crop_seconds={cfg.data.crop_seconds:g})")
    need(cfg.features.dither >= 0, "features.dither", "must be >= 0")
    need(cfg.model.channels > 0 and cfg.model.channels % RES2_SCALE == 0, "model.channels",
         f"must be a positive multiple of {RES2_SCALE} (Res2 splits channels into {RES2_SCALE} groups); "
         f"got {cfg.model.channels}")
    need(cfg.model.embed_dim > 0, "model.embed_dim", "must be positive")
    need(cfg.model.init_from_format in (None, *INIT_FORMATS), "model.init_from_format",
         f"must be one of {', '.join(INIT_FORMATS)} (or null); got {cfg.model.init_from_format!r}")
    need(cfg.model.init_from_sha256 is None or re.fullmatch(r"[0-9a-f]{64}", cfg.model.init_from_sha256) is not None,
         "model.init_from_sha256", "must be 64 lowercase hex digits (a sha256)")
    need(cfg.loss.scale > 0, "loss.scale", "must be positive")
    need(0 <= cfg.loss.margin < 1.5, "loss.margin", "must be within [0, 1.5) radians")
    need(cfg.loss.margin_ramp_end_epoch >= cfg.loss.margin_ramp_start_epoch, "loss.margin_ramp_end_epoch",
         "must be >= loss.margin_ramp_start_epoch")
    optim = cfg.optim
    need(optim.lr > 0, "optim.lr", "must be positive")
    need(optim.min_lr >= 0, "optim.min_lr", "must be >= 0")
    need(optim.schedule != "cosine" or optim.min_lr <= optim.lr, "optim.min_lr",
         f"({optim.min_lr:g}) must not exceed optim.lr ({optim.lr:g}): the cosine schedule decays from lr to min_lr")
    need(0 <= optim.momentum < 1, "optim.momentum", f"must be within [0, 1); got {optim.momentum:g}")
    need(optim.name != "sgd" or not optim.nesterov or optim.momentum > 0, "optim.momentum",
         "must be positive with optim.nesterov: true (set optim.nesterov=false for plain SGD)")
    need(optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    need(len(optim.betas) == 2 and all(0 <= beta < 1 for beta in optim.betas), "optim.betas",
         f"must be two numbers within [0, 1); got {optim.betas}")
    need(optim.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0")
    need(optim.decay_every_epochs > 0, "optim.decay_every_epochs", "must be positive")
    need(optim.decay_gamma > 0, "optim.decay_gamma", "must be positive")
    need(optim.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
    need(0 <= cfg.train.seed <= MAX_SEED, "train.seed", f"must be within [0, {MAX_SEED}]; got {cfg.train.seed}")
    need(cfg.train.batch_size > 0, "train.batch_size", "must be positive")
    need(cfg.train.max_device_batch_size is None or cfg.train.max_device_batch_size > 0,
         "train.max_device_batch_size", "must be positive")
    need(cfg.train.epochs > 0, "train.epochs", "must be positive")
    need(cfg.train.max_steps is None or cfg.train.max_steps > 0, "train.max_steps", "must be positive")
    need(cfg.train.checkpoint_every_steps >= 0, "train.checkpoint_every_steps", "must be >= 0 (0 disables)")
    need(cfg.train.checkpoint_every_minutes >= 0, "train.checkpoint_every_minutes", "must be >= 0 (0 disables)")
    need(cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints", "must be at least 1")
    need(cfg.train.max_nonfinite_steps >= 0, "train.max_nonfinite_steps", "must be >= 0")
    need(cfg.train.log_every_steps >= 1, "train.log_every_steps", "must be at least 1")
    need(cfg.eval.every_steps >= 0, "eval.every_steps", "must be >= 0")
    need(cfg.eval.batch_seconds > 0, "eval.batch_seconds", "must be positive")
    need(cfg.eval.decode_workers >= 1, "eval.decode_workers", "must be at least 1")


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {dotted key: leaf value}; lists of mappings stay whole under their key."""
    flat = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted))
        else:
            flat[dotted] = value
    return flat


def changed_keys(old: Config, new: Config) -> list[str]:
    """Dotted keys whose values differ between two configs, sorted."""
    a, b = flatten(to_dict(old)), flatten(to_dict(new))
    return sorted(key for key in a.keys() | b.keys() if a.get(key) != b.get(key))


def unsafe_resume_changes(old: Config, new: Config) -> list[str]:
    """Changed keys that a resumed run cannot accept (a config that leaves the recorded init sha256 unset matches)."""
    unset_sha = new.model.init_from_sha256 is None
    return [key for key in changed_keys(old, new) if not key.startswith(SAFE_RESUME_KEYS)
            and not (key == "model.init_from_sha256" and unset_sha)]
