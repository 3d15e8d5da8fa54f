"""Augmentation with torchaudio.functional only: reverberation (RIR list), additive noise (MUSAN-style list), gain.

Speed perturbation happens while decoding (see `audio.read_crop`). Every choice comes from the sample's own
uniform draws (`mixing.sample_draws`) in a fixed order, so it is a pure function of (seed, epoch, position).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import PurePath

import torch
import torchaudio.functional as F

from ..config import AugmentConfig
from ..errors import UserError
from .audio import UnreadableAudio, read_audio, read_crop
from .manifest import Manifest
from .mixing import pick

logger = logging.getLogger(__name__)

MUSAN_CATEGORIES = ("music", "speech", "noise")


@dataclass(frozen=True)
class AugmentChoices:
    """What happens to one sample; `applied` False means it stays clean."""

    applied: bool
    rir_row: int | None
    noise_row: int | None
    noise_crop_fraction: float
    snr_fraction: float  # position within the noise category's SNR range
    gain_db: float


CLEAN = AugmentChoices(applied=False, rir_row=None, noise_row=None, noise_crop_fraction=0.0, snr_fraction=0.0,
                      gain_db=0.0)


def _category(path: str) -> str:
    """MUSAN keeps music/, speech/ and noise/ folders: use them when the list has no category column."""
    folders = PurePath(path).parts[:-1]
    return next((part for part in reversed(folders) if part in MUSAN_CATEGORIES), "noise")


def reverberate(wave: torch.Tensor, rir: torch.Tensor) -> torch.Tensor:
    """`wave` convolved with `rir`, cut to the length of `wave`."""
    length = len(wave) + len(rir) - 1
    # Trailing zeros give a power-of-two FFT length: one with a large prime factor is up to 10x slower.
    rir = torch.nn.functional.pad(rir, (0, (1 << (length - 1).bit_length()) - length))
    return F.fftconvolve(wave, rir)[: len(wave)]


@functools.lru_cache(maxsize=512)
def _impulse_response(path: str, sample_rate: int) -> torch.Tensor:
    rir = read_audio(path, sample_rate)
    return rir / rir.norm().clamp_min(1e-8)  # unit energy: reverberation keeps the speech level


class Augmenter:
    """Draws and applies per-sample augmentation from the config and the (validated) noise and RIR lists."""

    DRAWS = 8  # uniforms per sample: applied, reverb, noise, noise crop, SNR, gain, RIR row, noise row

    def __init__(self, cfg: AugmentConfig, sample_rate: int, noises: Manifest | None, rirs: Manifest | None):
        self.cfg = cfg
        self.sample_rate = sample_rate
        self.noises = noises
        self.rirs = rirs
        self.noise_categories: list[str] = []
        if noises is not None:
            paths = noises.column("path")
            self.noise_categories = noises.column("category") or [_category(path) for path in paths]
            for category in sorted(set(self.noise_categories)):
                if category not in cfg.snr_db and "noise" not in cfg.snr_db:
                    raise UserError(f"{noises.csv}: noise category '{category}' has no SNR range: add "
                                    f"data.augment.snr_db.{category}: [low, high] (or a 'noise' entry)")

    def draw(self, uniforms: list[float]) -> AugmentChoices:
        """The choices for one sample from its `DRAWS` uniforms in [0, 1)."""
        if self.cfg.prob <= 0:
            return CLEAN
        applied, reverb, add_noise, noise_crop, snr, gain, rir, noise = uniforms
        rir_row = pick(rir, len(self.rirs)) if self.rirs is not None else None
        noise_row = pick(noise, len(self.noises)) if self.noises is not None else None
        low, high = self.cfg.gain_db
        return AugmentChoices(
            applied=bool(applied < self.cfg.prob),
            rir_row=rir_row if reverb < self.cfg.reverb_prob else None,
            noise_row=noise_row if add_noise < self.cfg.noise_prob else None,
            noise_crop_fraction=float(noise_crop),
            snr_fraction=float(snr),
            gain_db=float(low + gain * (high - low)),
        )

    def apply(self, wave: torch.Tensor, choices: AugmentChoices) -> torch.Tensor:
        if not choices.applied:
            return wave
        if choices.rir_row is not None:
            path = self.rirs.audio_path(choices.rir_row)
            try:
                wave = reverberate(wave, _impulse_response(path, self.sample_rate))
            except UnreadableAudio as error:
                logger.warning("skipping reverberation: cannot read impulse response %s: %s", path, error)
        if choices.noise_row is not None:
            wave = self._add_noise(wave, choices)
        if choices.gain_db:
            wave = F.gain(wave, choices.gain_db)
        return wave

    def _add_noise(self, wave: torch.Tensor, choices: AugmentChoices) -> torch.Tensor:
        path = self.noises.audio_path(choices.noise_row)
        start, stop = self.noises.segment(choices.noise_row)
        try:
            noise = read_crop(path, self.sample_rate, len(wave), choices.noise_crop_fraction, start=start, stop=stop)
        except UnreadableAudio as error:
            logger.warning("skipping additive noise: cannot read %s: %s", path, error)
            return wave
        if not noise.any():
            return wave  # silent noise file: any SNR needs an infinite gain
        category = self.noise_categories[choices.noise_row]
        low, high = self.cfg.snr_db.get(category, self.cfg.snr_db.get("noise"))
        snr = torch.tensor([low + choices.snr_fraction * (high - low)], dtype=wave.dtype)
        return F.add_noise(wave[None], noise[None], snr)[0]
