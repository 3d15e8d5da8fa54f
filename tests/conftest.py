"""Shared test helpers: tiny generated corpora written as real audio files and CSV manifests."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import yaml
from safetensors.torch import load_file

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


# ---- running the CLI


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """`ecapa-accel ARGS...` in this process (no interpreter start): (exit status, stdout, stderr)."""
    from ecapa_accel.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.fixture
def cli_here(capsys):
    """`ecapa-accel ARGS...` in this process (no interpreter start), answering like `cli` does."""

    def run(*args) -> subprocess.CompletedProcess:
        code, out, err = run_cli(capsys, *args)
        return subprocess.CompletedProcess(list(args), code, out, err)

    return run


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """`ecapa-accel ARGS...` in a new interpreter, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "ecapa_accel.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300, **kwargs)


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ecapa_accel.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def assert_user_error(result: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 2 with one `error: ...` line naming every word."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


# ---- tiny training runs

STEPS = 10


def tiny_config(tmp_path: Path, tone_corpus, **train) -> Path:
    """Two generated datasets, a tiny ECAPA and a short run; returns the config path."""
    first = tone_corpus("alpha", speakers=3, utterances=4, seconds=1.0)
    second = tone_corpus("beta", speakers=3, utterances=4, seconds=1.0, seed=1)
    config = {
        "data": {
            "datasets": [
                {"name": "alpha", "csv": str(first), "weight": 0.5},
                {"name": "beta", "csv": str(second), "weight": 0.5},
            ],
            "crop_seconds": 0.5,
            "num_workers": 0,
        },
        "features": {"n_mels": 24},
        "model": {"channels": 16, "embed_dim": 16},
        "optim": {"lr": 0.05, "warmup_epochs": 0.5},
        "train": {"batch_size": 4, "max_steps": STEPS, "epochs": 100, "checkpoint_every_steps": 3,
                  "checkpoint_every_minutes": 0, "log_every_steps": 1, **train},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    status = json.loads(cli("status", str(run_dir), "--json").stdout)
    assert status["finished"] and status["step"] == STEPS, status
    return load_file(str(run_dir / "checkpoints" / f"step_{STEPS}" / "model.safetensors"))


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def records_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def wait_for(predicate, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
