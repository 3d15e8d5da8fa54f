"""The synthetic corpus: deterministic, valid manifests and trials, digital silence, a non-trivial task."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile

from ecapa_accel.cli import main
from ecapa_accel.demo import fbank_mean_baseline
from ecapa_accel.synth import make_corpus

SMALL = {"speakers_per_set": 3, "utterances_per_speaker": 2, "heldout_speakers": 3, "heldout_utterances": 3,
         "heldout_seconds": 2.0, "noise_clips": 3}


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_writes_identical_files_and_another_seed_does_not(tmp_path):
    make_corpus(tmp_path / "first", seed=7, **SMALL)
    make_corpus(tmp_path / "again", seed=7, **SMALL)
    make_corpus(tmp_path / "other", seed=8, **SMALL)
    first, again, other = (files_under(tmp_path / name) for name in ("first", "again", "other"))
    assert len(first) > 20
    assert first == again
    assert first.keys() == other.keys()
    wavs = [name for name in first if name.endswith(".wav")]
    assert all(first[name] != other[name] for name in wavs)


def test_manifests_trials_and_noise_list_are_valid(tmp_path, capsys):
    paths = make_corpus(tmp_path, seed=1, **SMALL)
    assert set(paths) == {"setA", "setB", "heldout", "trials", "noise"}

    with pytest.raises(SystemExit) as done:
        main(["data", "check", str(paths["setA"]), str(paths["setB"]), str(paths["heldout"])])
    assert done.value.code == 0
    assert "total: 21 rows" in capsys.readouterr().out  # 3 x 2 + 3 x 2 + 3 x 3

    speakers = {}
    for name in ("setA", "setB", "heldout"):
        rows = read_rows(paths[name])
        assert list(rows[0]) == ["ID", "path", "spk", "dur"]
        for row in rows:
            info = soundfile.info(str(paths[name].parent / row["path"]))
            assert info.samplerate == 16000 and info.channels == 1
            assert abs(info.frames / 16000 - float(row["dur"])) < 1e-3
        speakers[name] = {row["spk"] for row in rows}
    assert [len(s) for s in speakers.values()] == [3, 3, 3]
    assert not (speakers["setA"] & speakers["setB"] or speakers["heldout"] & (speakers["setA"] | speakers["setB"]))

    heldout = {row["path"]: row["spk"] for row in read_rows(paths["heldout"])}
    lines = [line.split() for line in paths["trials"].read_text().splitlines()]
    targets = [line for line in lines if line[0] == "1"]
    assert len(targets) == 3 * 3 and len(lines) == 2 * len(targets)  # all same-speaker pairs, balanced
    for label, enroll, test in lines:
        assert (paths["trials"].parent / enroll).is_file() and (paths["trials"].parent / test).is_file()
        assert enroll != test and (heldout[enroll] == heldout[test]) == (label == "1")
    assert len({(a, b) for _, a, b in lines}) == len(lines)

    noise_rows = read_rows(paths["noise"])
    assert list(noise_rows[0]) == ["ID", "dur", "path", "category"]
    assert {row["category"] for row in noise_rows} == {"noise", "music", "speech"}
    for row in noise_rows:
        wave, rate = soundfile.read(str(paths["noise"].parent / row["path"]))
        assert rate == 16000 and len(wave) / rate == pytest.approx(float(row["dur"]), abs=1e-3)
        assert np.abs(wave).max() > 0.1


def test_utterances_hold_runs_of_exact_digital_zeros(tmp_path):
    paths = make_corpus(tmp_path, seed=2, **SMALL)
    longest_runs = []
    for name in ("setA", "setB", "heldout"):
        for row in read_rows(paths[name]):
            wave, _ = soundfile.read(str(paths[name].parent / row["path"]))
            assert np.abs(wave).max() > 0.01  # never an all-silent file
            edges = np.flatnonzero(np.diff(np.concatenate([[0], (wave == 0).astype(np.int8), [0]])))
            longest_runs.append(int((edges[1::2] - edges[::2]).max()) if len(edges) else 0)
    # Many files hold at least 0.1 s of exact zeros (pauses, padding), and not all of them.
    assert len(longest_runs) // 4 <= sum(run >= 1600 for run in longest_runs) < len(longest_runs)


def test_fbank_mean_baseline_is_clearly_imperfect_on_held_out_speakers(tmp_path):
    """The demo's held-out set (10 unseen speakers x 8 utterances of 4 s): no training, a poor but non-random EER."""
    paths = make_corpus(tmp_path, seed=0, utterances_per_speaker=1, noise_clips=0)
    report = fbank_mean_baseline(paths["trials"])
    assert report["trials"] == 2 * 10 * 28
    assert 20.0 < report["eer"] < 45.0, report
