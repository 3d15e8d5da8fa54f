"""Batched log-mel front ends: Kaldi fbank (ours, 3D-Speaker, WeSpeaker) and SpeechBrain's `Fbank`.

Digital-silence policy: the front end is identical in training and inference (dither 0 by default everywhere),
so runs of exact zeros give the same features in both; a non-zero `dither` applies in training mode only.
"""

from __future__ import annotations

import math

import torch
import torchaudio.compliance.kaldi as kaldi
from torch import nn

from ecapa_accel.config import FeaturesConfig

KALDI_PREEMPHASIS = 0.97
KALDI_LOW_FREQ_HZ = 20.0
KALDI_LOG_FLOOR = torch.finfo(torch.float32).eps
SPEECHBRAIN_POWER_FLOOR = 1e-10
SPEECHBRAIN_TOP_DB = 80.0
# Frames per block on CPU: one block's frames and spectra stay in cache, which is several times faster there.
CPU_FRAMES_PER_BLOCK = 1024


def _samples(milliseconds: float, sample_rate: int) -> int:
    return int(sample_rate * milliseconds * 0.001)


def _kaldi_window(window: str, size: int) -> torch.Tensor:
    if window == "povey":
        return torch.hann_window(size, periodic=False).pow(0.85)
    return torch.hamming_window(size, periodic=False, alpha=0.54, beta=0.46)


def _kaldi_mel_matrix(n_mels: int, fft_size: int, sample_rate: int) -> torch.Tensor:
    """(fft_size // 2 + 1, n_mels) Kaldi mel filters from 20 Hz to Nyquist; the Nyquist bin has weight 0."""
    filters, _ = kaldi.get_mel_banks(n_mels, fft_size, float(sample_rate), KALDI_LOW_FREQ_HZ, 0.0, 100.0, -500.0, 1.0)
    return nn.functional.pad(filters, (0, 1)).T.contiguous()


def _speechbrain_mel_matrix(n_mels: int, fft_size: int, sample_rate: int) -> torch.Tensor:
    """(fft_size // 2 + 1, n_mels) HTK-mel triangles symmetric in Hz with peak 1, from 0 Hz to Nyquist."""
    top_mel = 2595.0 * math.log10(1.0 + (sample_rate // 2) / 700.0)
    edges_hz = 700.0 * (10.0 ** (torch.linspace(0.0, top_mel, n_mels + 2) / 2595.0) - 1.0)
    centres = edges_hz[1:-1]
    half_widths = edges_hz[1:-1] - edges_hz[:-2]
    bin_hz = torch.linspace(0.0, sample_rate // 2, fft_size // 2 + 1)
    return (1.0 - (bin_hz[:, None] - centres).abs() / half_widths).clamp(min=0.0)


class FeatureExtractor(nn.Module):
    """Waveforms (B, samples) -> log-mel features (B, frames, n_mels), fp32, on the input's device.

    `cfg.kind == "kaldi"` equals `torchaudio.compliance.kaldi.fbank` (snip edges, DC removal, pre-emphasis 0.97,
    512-point FFT, power spectrum, log floored at float eps) on `wave * cfg.waveform_scale`;
    `cfg.kind == "speechbrain"` equals SpeechBrain's `Fbank` (centred frames, periodic Hamming, dB with an 80 dB
    range per utterance). Both then subtract each utterance's mean over time when `cfg.mean_norm`.
    The window and mel filters are non-persistent buffers (moved by `.to(device)`, never saved) used in fp32.
    """

    def __init__(self, cfg: FeaturesConfig, sample_rate: int = 16000) -> None:
        super().__init__()
        self.cfg = cfg
        self.sample_rate = sample_rate
        self.frame_length = _samples(cfg.frame_length_ms, sample_rate)
        self.frame_shift = _samples(cfg.frame_shift_ms, sample_rate)
        if cfg.kind == "kaldi":
            self.fft_size = 1 << (self.frame_length - 1).bit_length()
            window = _kaldi_window(cfg.window, self.frame_length)
            mel_matrix = _kaldi_mel_matrix(cfg.n_mels, self.fft_size, sample_rate)
        else:
            self.fft_size = self.frame_length
            window = torch.hamming_window(self.frame_length, periodic=True)
            mel_matrix = _speechbrain_mel_matrix(cfg.n_mels, self.fft_size, sample_rate)
        self.register_buffer("window", window, persistent=False)
        self.register_buffer("mel_matrix", mel_matrix, persistent=False)

    def num_frames(self, num_samples: int) -> int:
        """Frames produced for an utterance of `num_samples` samples."""
        if self.cfg.kind == "kaldi":
            return max(0, 1 + (num_samples - self.frame_length) // self.frame_shift)
        return 1 + num_samples // self.frame_shift

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        if waves.dim() != 2:
            raise ValueError(f"expected waveforms shaped (batch, samples), got {tuple(waves.shape)}")
        if self.num_frames(waves.shape[1]) < 1:
            raise ValueError(f"waveforms of {waves.shape[1]} samples are shorter than one {self.frame_length}-sample frame")
        with torch.autocast(waves.device.type, enabled=False):
            waves = waves.float() * self.cfg.waveform_scale
            if self.cfg.kind == "kaldi":
                features = self._kaldi_log_mel(waves)
            else:
                features = self._speechbrain_log_mel(waves)
            if self.cfg.mean_norm:
                features = features - features.mean(dim=1, keepdim=True)
        return features

    def _kaldi_log_mel(self, waves: torch.Tensor) -> torch.Tensor:
        frames = waves.unfold(1, self.frame_length, self.frame_shift)
        batch, num_frames, _ = frames.shape
        block = num_frames if waves.device.type != "cpu" else max(1, CPU_FRAMES_PER_BLOCK // batch)
        padded = waves.new_zeros(batch, min(block, num_frames), self.fft_size)
        return torch.cat([self._kaldi_block(chunk, padded) for chunk in frames.split(block, dim=1)], dim=1)

    def _kaldi_block(self, frames: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
        """Log-mel energies of (B, t, frame_length) frames; `padded` is a zero-tailed FFT buffer reused across blocks."""
        if self.training and self.cfg.dither > 0:
            frames = frames + self.cfg.dither * torch.randn_like(frames)
        frames = frames - frames.mean(dim=-1, keepdim=True)
        padded = padded[:, : frames.shape[1]]
        body = padded[..., : self.frame_length]
        # Kaldi pre-emphasis x[j] - 0.97 x[j - 1] (x[-1] := x[0]), rounded as torchaudio does: low bins are sensitive.
        torch.mul(frames[..., :-1], KALDI_PREEMPHASIS, out=body[..., 1:])
        torch.sub(frames[..., 1:], body[..., 1:], out=body[..., 1:])
        body[..., 0] = frames[..., 0] - KALDI_PREEMPHASIS * frames[..., 0]
        body.mul_(self.window.float())
        spectrum = torch.view_as_real(torch.fft.rfft(padded)).square()
        power = spectrum[..., 0] + spectrum[..., 1]
        return (power @ self.mel_matrix.float()).clamp_(min=KALDI_LOG_FLOOR).log_()

    def _speechbrain_log_mel(self, waves: torch.Tensor) -> torch.Tensor:
        spectrum = torch.stft(
            waves, self.fft_size, self.frame_shift, self.frame_length, self.window.float(),
            center=True, pad_mode="constant", return_complex=True,
        )
        spectrum = torch.view_as_real(spectrum.transpose(1, 2)).square()
        power = spectrum[..., 0] + spectrum[..., 1]
        decibels = 10.0 * torch.log10((power @ self.mel_matrix.float()).clamp(min=SPEECHBRAIN_POWER_FLOOR))
        # SpeechBrain's top_db: a floor 80 dB below each utterance's loudest value.
        floor = decibels.amax(dim=(1, 2), keepdim=True) - SPEECHBRAIN_TOP_DB
        return torch.maximum(decibels, floor)


def kaldi_fbank_reference(wave: torch.Tensor, cfg: FeaturesConfig, sample_rate: int = 16000) -> torch.Tensor:
    """One utterance (samples,) -> (frames, n_mels) through torchaudio's per-utterance Kaldi fbank (no dither)."""
    features = kaldi.fbank(
        wave.float()[None] * cfg.waveform_scale,
        num_mel_bins=cfg.n_mels,
        frame_length=cfg.frame_length_ms,
        frame_shift=cfg.frame_shift_ms,
        window_type=cfg.window,
        dither=0.0,
        sample_frequency=float(sample_rate),
    )
    if cfg.mean_norm:
        features = features - features.mean(dim=0, keepdim=True)
    return features
