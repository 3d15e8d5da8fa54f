"""Front ends: batched Kaldi fbank vs torchaudio's per-utterance path, SpeechBrain's Fbank vs a numpy derivation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ecapa_accel.config import FeaturesConfig
from ecapa_accel.features import FeatureExtractor, kaldi_fbank_reference

SAMPLE_RATE = 16000


def speech_like_waves(batch: int, samples: int, seed: int = 0) -> torch.Tensor:
    """Harmonic tones plus noise, with a run of exact zeros (digital silence) in every utterance."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / SAMPLE_RATE
    f0 = 90.0 + 150.0 * torch.rand(batch, 1, generator=generator)
    waves = sum(torch.sin(2 * math.pi * f0 * k * t) / k for k in range(1, 6))
    waves = 0.3 * waves / waves.abs().amax(dim=1, keepdim=True) + 0.01 * torch.randn(batch, samples, generator=generator)
    for i in range(batch):
        start = samples // 5 + 1000 * i
        waves[i, start : start + SAMPLE_RATE // 4] = 0.0
    return waves


@pytest.mark.parametrize(
    "window, scale, mean_norm",
    [("povey", 1.0, True), ("hamming", 32768.0, True), ("povey", 1.0, False)],
    ids=["3dspeaker", "wespeaker", "raw-log-mel"],
)
def test_batched_kaldi_fbank_equals_torchaudio_per_utterance(window, scale, mean_norm):
    cfg = FeaturesConfig(kind="kaldi", window=window, waveform_scale=scale, mean_norm=mean_norm)
    # 4 x 3 s holds more frames than one CPU block, so the blocked path and its seams are covered.
    waves = speech_like_waves(batch=4, samples=3 * SAMPLE_RATE + 77)
    features = FeatureExtractor(cfg).eval()(waves)
    reference = torch.stack([kaldi_fbank_reference(wave, cfg) for wave in waves])
    assert features.shape == (4, 1 + (waves.shape[1] - 400) // 160, 80)
    assert features.dtype == torch.float32
    assert (features - reference).abs().max() <= 1e-3


def speechbrain_fbank_numpy(wave: np.ndarray, n_mels: int = 80) -> np.ndarray:
    """SpeechBrain's Fbank + sentence mean norm re-derived per utterance in float64 from its description."""
    samples = len(wave)
    padded = np.pad(wave.astype(np.float64), 200)
    num_frames = 1 + samples // 160
    n = np.arange(400)
    window = 0.54 - 0.46 * np.cos(2 * np.pi * n / 400)
    frames = np.stack([padded[t * 160 : t * 160 + 400] for t in range(num_frames)]) * window
    power = np.abs(np.fft.rfft(frames, n=400)) ** 2
    assert power.shape[1] == 201
    top_mel = 2595 * np.log10(1 + 8000 / 700)
    hz = 700 * (10 ** (np.linspace(0, top_mel, n_mels + 2) / 2595) - 1)
    centres, half_widths = hz[1:-1], hz[1:-1] - hz[:-2]
    bin_hz = np.arange(201) * 8000 / 200
    filters = np.maximum(0.0, 1 - np.abs(bin_hz[:, None] - centres) / half_widths)
    decibels = 10 * np.log10(np.maximum(power @ filters, 1e-10))
    decibels = np.maximum(decibels, decibels.max() - 80)
    return decibels - decibels.mean(axis=0)


def test_speechbrain_front_end_equals_independent_derivation():
    waves = speech_like_waves(batch=3, samples=SAMPLE_RATE + 123, seed=1)
    waves[2] *= 0.01  # a quiet utterance: the 80 dB floor is per utterance, not per batch
    features = FeatureExtractor(FeaturesConfig(kind="speechbrain")).eval()(waves)
    expected = np.stack([speechbrain_fbank_numpy(wave.numpy()) for wave in waves])
    assert features.shape == (3, 1 + waves.shape[1] // 160, 80)
    np.testing.assert_allclose(features.numpy(), expected, atol=2e-3)


def test_speechbrain_filters_peak_at_their_htk_mel_centres():
    """A pure tone at a filter's centre frequency lands in that filter (and its dB value is the utterance max)."""
    top_mel = 2595 * math.log10(1 + 8000 / 700)
    extractor = FeatureExtractor(FeaturesConfig(kind="speechbrain", mean_norm=False)).eval()
    t = torch.arange(SAMPLE_RATE) / SAMPLE_RATE
    for mel_bin in (10, 40, 70):
        centre_hz = 700 * (10 ** (top_mel * (mel_bin + 1) / 81 / 2595) - 1)
        tone = torch.sin(2 * math.pi * centre_hz * t)[None]
        features = extractor(tone)
        assert features[0, 50].argmax().item() == mel_bin


def test_dither_zero_runs_same_features_in_training_and_inference():
    waves = speech_like_waves(batch=2, samples=SAMPLE_RATE)
    extractor = FeatureExtractor(FeaturesConfig())
    training = extractor.train()(waves)
    inference = extractor.eval()(waves)
    assert torch.equal(training, inference)
    # Frames wholly inside the zero run sit on the log floor in both modes.
    silent_frame = (SAMPLE_RATE // 5 + 800) // 160
    raw = FeatureExtractor(FeaturesConfig(mean_norm=False)).train()(waves)
    assert torch.allclose(raw[0, silent_frame], torch.full((80,), math.log(torch.finfo(torch.float32).eps)))


def test_configured_dither_applies_in_training_mode_only():
    waves = speech_like_waves(batch=2, samples=SAMPLE_RATE)
    dithered = FeatureExtractor(FeaturesConfig(dither=1.0))
    plain = FeatureExtractor(FeaturesConfig()).eval()
    assert not torch.equal(dithered.train()(waves), plain(waves))
    assert torch.equal(dithered.eval()(waves), plain(waves))


@pytest.mark.parametrize("kind", ["kaldi", "speechbrain"])
def test_features_are_fp32_under_bf16_autocast(kind):
    waves = speech_like_waves(batch=2, samples=SAMPLE_RATE // 2)
    extractor = FeatureExtractor(FeaturesConfig(kind=kind)).eval()
    expected = extractor(waves)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = extractor(waves)
        from_double = extractor(waves.double())
    assert under_autocast.dtype == from_double.dtype == torch.float32
    assert torch.equal(under_autocast, expected)
    assert (from_double - expected).abs().max() <= 1e-3


def test_window_and_filters_are_not_saved_and_stay_fp32_in_a_half_precision_model():
    extractor = FeatureExtractor(FeaturesConfig())
    assert extractor.state_dict() == {}
    features = extractor.to(torch.bfloat16)(torch.randn(1, 800, dtype=torch.bfloat16))
    assert features.shape == (1, 3, 80) and features.dtype == torch.float32


def test_too_short_or_misshaped_input_is_refused():
    extractor = FeatureExtractor(FeaturesConfig())
    with pytest.raises(ValueError, match="shorter than one"):
        extractor(torch.zeros(2, 300))
    with pytest.raises(ValueError, match=r"\(batch, samples\)"):
        extractor(torch.zeros(800))
