"""Shared test helpers: tiny generated corpora written as real audio files and CSV manifests."""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile

# Keep the `datasets` cache (manifests, header caches) of a test session out of the user's home.
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="ecapa-accel-tests-hf-"))


def write_tone_corpus(
    root: Path,
    name: str,
    speakers: int = 4,
    utterances: int = 3,
    seconds: float = 1.5,
    sample_rate: int = 16000,
    seed: int = 0,
) -> Path:
    """Write `speakers x utterances` wav files (speaker-specific harmonic tones + noise) and a manifest.

    Returns the CSV path. Columns: ID,path,spk,dur (paths relative to the CSV's folder).
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(speakers):
        f0 = 90.0 + 35.0 * s
        for u in range(utterances):
            n = int(seconds * sample_rate * rng.uniform(0.8, 1.2))
            t = np.arange(n) / sample_rate
            wave = sum(np.sin(2 * np.pi * f0 * k * t * rng.uniform(0.98, 1.02)) / k for k in range(1, 6))
            wave = 0.3 * wave / np.abs(wave).max() + 0.01 * rng.standard_normal(n)
            rel = f"spk{s}/utt{u}.wav"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            soundfile.write(folder / rel, wave.astype(np.float32), sample_rate, subtype="PCM_16")
            rows.append({"ID": f"{name}-spk{s}-{u}", "path": rel, "spk": f"spk{s}", "dur": f"{n / sample_rate:.3f}"})
    manifest = folder / "train.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["ID", "path", "spk", "dur"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


@pytest.fixture
def tone_corpus(tmp_path):
    """Factory fixture: `tone_corpus(name, **kwargs)` -> manifest path under tmp_path."""

    def make(name: str = "set", **kwargs) -> Path:
        return write_tone_corpus(tmp_path, name, **kwargs)

    return make
