"""Audio that decodes to NaN or infinity counts as unreadable: `data check` names it, training skips and counts it
(issue 13, case 6: one float WAV holding NaNs made every loss NaN and poisoned every later checkpoint)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import yaml
from safetensors.torch import load_file

from ecapa_accel.cli import main
from ecapa_accel.data.audio import UnreadableAudio, read_crop


def poison(path: Path, value: float = np.nan) -> None:
    """Rewrite a corpus file as 32-bit float WAV with a non-finite sample every 100 samples."""
    wave, rate = soundfile.read(path, dtype="float32")
    wave[::100] = value
    soundfile.write(path, wave, rate, subtype="FLOAT")


def data_check(capsys, *csvs: Path) -> tuple[int, str]:
    try:
        main(["data", "check", *map(str, csvs)])
    except SystemExit as exit_:
        captured = capsys.readouterr()
        return exit_.code, captured.out + captured.err
    raise AssertionError("the CLI returned without an exit status")


def test_data_check_names_float_files_holding_nan_or_infinity(tmp_path, tone_corpus, capsys):
    csv = tone_corpus("set", speakers=2, utterances=2, seconds=1.0)
    clean = tone_corpus("clean", speakers=2, utterances=2, seconds=1.0)
    wave, rate = soundfile.read(clean.parent / "spk0/utt0.wav", dtype="float32")
    soundfile.write(clean.parent / "spk0/utt0.wav", wave, rate, subtype="FLOAT")  # float but finite: fine
    assert data_check(capsys, clean)[0] == 0

    poison(csv.parent / "spk1/utt0.wav")
    poison(csv.parent / "spk0/utt1.wav", np.inf)
    status, output = data_check(capsys, csv)
    lines = output.strip().splitlines()
    assert status == 2 and len(lines) == 2, output
    assert "spk1/utt0.wav" in lines[1] and "spk0/utt1.wav" in lines[0]
    assert all("non-finite samples" in line for line in lines)


def test_the_training_decoder_refuses_a_crop_holding_nan(tmp_path, tone_corpus):
    csv = tone_corpus("set", speakers=1, utterances=1, seconds=1.0)
    path = str(csv.parent / "spk0/utt0.wav")
    assert torch.isfinite(read_crop(path, 16000, 8000, 0.5)).all()
    poison(csv.parent / "spk0/utt0.wav")
    with pytest.raises(UnreadableAudio, match="non-finite"):
        read_crop(path, 16000, 8000, 0.5)


@pytest.mark.slow
def test_training_skips_counts_and_names_the_file_and_exports_finite_weights(tmp_path, tone_corpus):
    csv = tone_corpus("alpha", speakers=3, utterances=2, seconds=1.0)
    poison(csv.parent / "spk2/utt1.wav")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"datasets": [{"name": "alpha", "csv": str(csv)}], "crop_seconds": 0.5, "num_workers": 0,
                 "max_bad_fraction": 0.5},
        "features": {"n_mels": 24},
        "model": {"channels": 16, "embed_dim": 16},
        "optim": {"lr": 0.05},
        # One epoch: every one of the 6 rows is drawn once in 3 steps of 2.
        "train": {"batch_size": 2, "max_steps": 3, "epochs": 10, "checkpoint_every_minutes": 0,
                  "log_every_steps": 1},
    }))
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "ecapa_accel.cli", "train", str(config), "--run-dir", str(run)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "spk2/utt1.wav" in result.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [record for record in records if record["type"] == "train"]
    assert steps[-1]["bad_files"] >= 1
    assert all(math.isfinite(record["loss"]) for record in steps)
    weights = load_file(str(run / "export" / "model.safetensors"))
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
