"""`ecapa-accel data check` and the validation that training runs before writing anything."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from ecapa_accel.cli import main
from ecapa_accel.config import config_from_dict
from ecapa_accel.data import build_training_data
from ecapa_accel.errors import UserError


def run(*args: str) -> int:
    with pytest.raises(SystemExit) as exit:
        main(list(args))
    return exit.value.code


def test_check_summarises_valid_manifests(tone_corpus, capsys):
    first = tone_corpus("alpha", speakers=3, utterances=2, seconds=1.0)
    second = tone_corpus("beta", speakers=2, utterances=2, seconds=1.0)
    assert run("data", "check", str(first), str(second)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert f"{first}: 6 rows (6 files), 3 speakers" in lines[0] and "16000 Hz (6), 1 channel (6)" in lines[0]
    assert lines[2].startswith("total: 10 rows")


def test_check_names_file_and_row_of_each_problem(tone_corpus, capsys):
    manifest = tone_corpus("bad", speakers=2, utterances=2, seconds=1.0)
    rows = manifest.read_text().splitlines()
    (manifest.parent / "spk1" / "junk.wav").write_bytes(b"this is not audio at all")
    manifest.write_text("\n".join(rows + [
        "missing,spk0/nope.wav,spk0,1.0",  # row 5
        "bad-dur,spk0/utt0.wav,spk0,soon",  # row 6
        "bad-spk1-0,spk1/utt1.wav,spk1,1.0",  # row 7: duplicate ID of row 3
        "junk,spk1/junk.wav,spk1,1.0",  # row 8
        "nospk,spk1/utt1.wav,,1.0",  # row 9
    ]) + "\n")
    assert run("data", "check", str(manifest)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert f"{manifest} row 5 (ID missing): audio file not found: spk0/nope.wav" in err
    assert f"{manifest} row 6 (ID bad-dur): dur 'soon' is not a number of seconds" in err
    assert f"{manifest}: duplicate ID 'bad-spk1-0' in rows 3, 7" in err
    assert f"{manifest} row 8 (ID junk): cannot read audio spk1/junk.wav" in err
    assert f"{manifest} row 9 (ID nospk): empty speaker label" in err


def test_check_caps_the_list_and_counts_the_rest(tmp_path, capsys):
    manifest = tmp_path / "gone.csv"
    manifest.write_text("path,spk\n" + "".join(f"a{i}.wav,s\n" for i in range(25)))
    assert run("data", "check", str(manifest)) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 11 and lines[-1] == "... and 15 more problems"
    assert lines[0] == f"error: {manifest} row 1: audio file not found: a0.wav"


@pytest.mark.parametrize(
    "text, message",
    [
        ("file,speaker\na.wav,s\n", "header has no 'path' (or 'wav') and 'spk' (or 'spk_id') column"),
        ("path,spk,path\na.wav,s,b.wav\n", "column 'path' appears twice"),
        ("path,spk\n", "no rows after the header"),
        ("", "empty file"),
        ("path,spk\na.wav,s,extra,fields\n", "cannot parse CSV"),
    ],
)
def test_malformed_csvs_exit_2_with_one_line(tmp_path, capsys, text, message):
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    assert run("data", "check", str(manifest)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and str(manifest) in err


def test_aliases_segments_rates_and_channels(tmp_path, capsys):
    """SpeechBrain column names, a stereo 8 kHz file, and start/stop selecting the loud half of a file."""
    t = np.arange(16000) / 8000
    tone = 0.5 * np.sin(2 * np.pi * 300 * t)
    half_silent = np.concatenate([np.zeros(8000), tone[:8000]])
    soundfile.write(tmp_path / "a.wav", np.stack([half_silent, half_silent], axis=1), 8000)
    manifest = tmp_path / "sb.csv"
    manifest.write_text("ID,duration,wav,start,stop,spk_id\nu1,1.0,a.wav,1.0,2.0,s1\nu2,1.0,a.wav,1.0,,s2\n")
    assert run("data", "check", str(manifest)) == 0
    assert "8000 Hz (2), 2 channels (2)" in capsys.readouterr().out
    cfg = config_from_dict({"data": {"datasets": [{"name": "sb", "csv": str(manifest)}], "crop_seconds": 0.5}}, "t")
    data = build_training_data(cfg)
    batch = next(data.batches(0, 0, 2, 0, 1, 0))
    assert batch["waves"].shape == (2, 8000)  # resampled to 16 kHz
    assert (batch["waves"].abs().amax(dim=1) > 0.4).all()  # never the silent first half
    assert sorted(data.label_map) == ["sb/s1", "sb/s2"]


def test_segment_past_the_end_of_the_file_is_a_problem(tone_corpus, capsys):
    manifest = tone_corpus("seg", speakers=1, utterances=1, seconds=1.0)
    manifest.write_text("path,spk,start,stop\nspk0/utt0.wav,s,0.5,9.0\nspk0/utt0.wav,s,0.6,0.2\n"
                        "spk0/utt0.wav,s,7.5,\nspk0/utt0.wav,s,0.5,\n")
    assert run("data", "check", str(manifest)) == 2
    err = capsys.readouterr().err
    assert "row 1: stop 9 s is past the end of spk0/utt0.wav" in err
    assert "row 2: stop 0.2 s is not after start 0.6 s" in err
    assert "row 3: start 7.5 s is past the end of spk0/utt0.wav" in err
    assert "row 4" not in err and err.count("\n") == 3


def test_rewritten_csv_with_the_same_mtime_is_not_served_stale(tone_corpus, capsys):
    manifest = tone_corpus("stale", speakers=2, utterances=2, seconds=1.0)
    assert run("data", "check", str(manifest)) == 0
    before = os.stat(manifest)
    rows = manifest.read_text().splitlines()
    manifest.write_text("\n".join(rows[:-1] + [rows[-1].replace("utt1.wav", "utt9.wav")]) + "\n")
    os.utime(manifest, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(manifest).st_mtime_ns == before.st_mtime_ns
    assert run("data", "check", str(manifest)) == 2
    assert "row 4 (ID stale-spk1-1): audio file not found: spk1/utt9.wav" in capsys.readouterr().err


def test_training_validation_refuses_a_missing_file(tone_corpus):
    manifest = tone_corpus("train", speakers=2, utterances=2, seconds=1.0)
    Path(manifest.parent / "spk0" / "utt1.wav").unlink()
    cfg = config_from_dict({"data": {"datasets": [{"name": "t", "csv": str(manifest)}]}}, "t")
    with pytest.raises(UserError, match=r"train.csv row 2 \(ID train-spk0-1\): audio file not found"):
        build_training_data(cfg)


def test_noise_list_without_a_snr_range_for_its_category_is_refused(tmp_path, tone_corpus):
    manifest = tone_corpus("n", speakers=1, utterances=1, seconds=1.0)
    soundfile.write(tmp_path / "hum.wav", np.ones(1600, dtype=np.float32) * 0.1, 16000)
    noise = tmp_path / "noise.csv"
    noise.write_text("ID,dur,path,category\nh,0.1,hum.wav,hum\n")
    cfg = config_from_dict({"data": {"datasets": [{"name": "n", "csv": str(manifest)}],
                                     "augment": {"prob": 1.0, "noise_csv": str(noise),
                                                 "snr_db": {"music": [5.0, 15.0]}}}}, "t")
    with pytest.raises(UserError, match="noise category 'hum' has no SNR range"):
        build_training_data(cfg)
    cfg.data.augment.snr_db = {"hum": [5.0, 5.0]}
    assert torch.isfinite(next(build_training_data(cfg).batches(0, 0, 1, 0, 1, 0))["waves"]).all()
