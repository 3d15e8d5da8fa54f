"""Checks that run before a training run writes anything: what `config.validate` cannot see from values alone.

`config.validate` checks each value against its own rules. Here the pieces the run will build are built (the
front end, the model on the meta device, the optimizer on a dummy parameter) and the files named outside the
manifests (the run directory, the validation trials) are looked at, so that a mistake is one line and exit 2
with the run directory untouched, and the corrected command then starts cleanly. The manifests themselves are
validated by `data.build_training_data`, which also writes nothing.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from .config import Config, EvalConfig
from .errors import UserError
from .evaluate import load_trials
from .features import FeatureExtractor
from .model import MIN_FRAMES, build_model
from .optim import build_optimizer


def check_before_write(cfg: Config, run_dir: str | Path) -> None:
    """Raise `UserError` (one line naming the key or file) for anything that would fail once the run started."""
    _check_run_dir(Path(run_dir))
    _check_front_end(cfg)
    with torch.device("meta"):  # shapes only: no memory, no time
        build_model(cfg.model, cfg.features.n_mels)
    _check_optimizer(cfg)
    _check_evaluation(cfg.eval)


def _check_run_dir(run_dir: Path) -> None:
    """The run directory is a writable directory, or can be created."""
    if run_dir.is_symlink() and not run_dir.exists():
        raise UserError(f"{run_dir}: --run-dir is a broken symbolic link")
    if run_dir.exists():
        if not run_dir.is_dir():
            raise UserError(f"{run_dir}: --run-dir exists and is not a directory")
        if not os.access(run_dir, os.W_OK | os.X_OK):
            raise UserError(f"{run_dir}: --run-dir is not writable")
        return
    ancestor = next(parent for parent in run_dir.absolute().parents if parent.exists())
    if not ancestor.is_dir():
        raise UserError(f"{run_dir}: cannot create --run-dir: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{run_dir}: cannot create --run-dir: {ancestor} is not writable")


def _empty_mel_filters(features: FeatureExtractor) -> int:
    return int((features.mel_matrix.sum(dim=0) == 0).sum())


def _check_front_end(cfg: Config) -> None:
    """Every mel filter covers at least one FFT bin (Kaldi refuses otherwise: "num-mel-bins too large"), and a
    training crop gives the model the frames it needs."""
    sample_rate, features_cfg = cfg.data.sample_rate, cfg.features
    features = FeatureExtractor(features_cfg, sample_rate)
    empty = _empty_mel_filters(features)
    if empty:
        fitting = [n for n in range(features_cfg.n_mels - 1, 3, -1)
                   if not _empty_mel_filters(FeatureExtractor(dataclasses.replace(features_cfg, n_mels=n),
                                                              sample_rate))]
        advice = f"use at most {fitting[0]} mels or longer frames" if fitting else "use longer frames"
        raise UserError(f"'features.n_mels'={features_cfg.n_mels} does not fit data.sample_rate={sample_rate} with "
                        f"features.frame_length_ms={features_cfg.frame_length_ms:g}: {empty} mel filters cover no "
                        f"FFT bin; {advice}")
    frames = features.num_frames(round(cfg.data.crop_seconds * sample_rate))
    if frames < MIN_FRAMES:
        raise UserError(f"'data.crop_seconds'={cfg.data.crop_seconds:g} gives {frames} feature frames; the model "
                        f"needs at least {MIN_FRAMES}")


def _check_optimizer(cfg: Config) -> None:
    """The optimizer accepts the config's arguments (torch's own checks, on a dummy parameter)."""
    try:
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg.optim)
    except ValueError as error:
        raise UserError(f"'optim': torch.optim refuses the settings for {cfg.optim.name}: {error}") from None


def _check_evaluation(eval_cfg: EvalConfig) -> None:
    """The validation trials (and the manifest and audio they name) exist and parse, as the first evaluation
    reads them: otherwise a whole epoch trains before the mistake shows. Without trials nothing is evaluated."""
    if not eval_cfg.trials:
        return
    if eval_cfg.audio_root and not Path(eval_cfg.audio_root).is_dir():
        raise UserError(f"{eval_cfg.audio_root}: 'eval.audio_root' is not a directory")
    try:
        load_trials(eval_cfg)
    except UserError as error:
        raise UserError(f"eval: {error}") from None
