"""Generated audio and manifests shared by the benchmark scripts (noise-like speech stand-ins at 16 kHz)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import soundfile

RATE = 16000


def write_noise_wavs(folder: Path, seconds: list[float], rng: np.random.Generator) -> list[Path]:
    """One 16-bit wav of low-level Gaussian noise per length, named 0000.wav, 0001.wav, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, length in enumerate(seconds):
        path = folder / f"{i:04d}.wav"
        soundfile.write(path, (0.1 * rng.standard_normal(int(length * RATE))).astype(np.float32), RATE,
                        subtype="PCM_16")
        paths.append(path)
    return paths


def write_manifest(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    return path
