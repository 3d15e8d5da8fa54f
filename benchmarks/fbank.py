"""Batched Kaldi fbank (FeatureExtractor) vs a per-utterance torchaudio loop on the same batch, same run.

Usage: python benchmarks/fbank.py [--json] [--batch 64] [--seconds 3] [--repeats 7] [--window povey]
Times are the best of `--repeats` interleaved runs (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import time

import torch

from ecapa_accel.config import FeaturesConfig
from ecapa_accel.features import FeatureExtractor, kaldi_fbank_reference
from _report import emit

SAMPLE_RATE = 16000


def speech_like_batch(batch: int, seconds: float, seed: int = 0) -> torch.Tensor:
    """Harmonic tones with noise and a stretch of digital silence in every other utterance."""
    generator = torch.Generator().manual_seed(seed)
    samples = int(seconds * SAMPLE_RATE)
    t = torch.arange(samples) / SAMPLE_RATE
    f0 = 90.0 + 150.0 * torch.rand(batch, 1, generator=generator)
    waves = sum(torch.sin(2 * torch.pi * f0 * k * t) / k for k in range(1, 6))
    waves = 0.3 * waves / waves.abs().amax(dim=1, keepdim=True)
    waves = waves + 0.01 * torch.randn(batch, samples, generator=generator)
    waves[::2, samples // 4 : samples // 4 + SAMPLE_RATE // 2] = 0.0
    return waves


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--window", choices=["povey", "hamming"], default="povey")
    args = parser.parse_args()

    cfg = FeaturesConfig(window=args.window, waveform_scale=32768.0 if args.window == "hamming" else 1.0)
    extractor = FeatureExtractor(cfg, SAMPLE_RATE).eval()
    waves = speech_like_batch(args.batch, args.seconds)

    def batched() -> torch.Tensor:
        return extractor(waves)

    def loop() -> torch.Tensor:
        return torch.stack([kaldi_fbank_reference(wave, cfg, SAMPLE_RATE) for wave in waves])

    with torch.inference_mode():
        max_abs_diff = (batched() - loop()).abs().max().item()
        batched_times, loop_times = [], []
        for _ in range(args.repeats):
            batched_times.append(_timed(batched))
            loop_times.append(_timed(loop))
    batched_s, loop_s = min(batched_times), min(loop_times)
    result = {
        "batch": args.batch,
        "seconds": args.seconds,
        "batched_s": round(batched_s, 5),
        "loop_s": round(loop_s, 5),
        "speedup": round(loop_s / batched_s, 2),
        "max_abs_diff": max_abs_diff,
    }
    emit(result, args.json)


if __name__ == "__main__":
    main()
