"""What a restart costs and survives: cached audio headers between validations, workers under a group signal."""

from __future__ import annotations

import csv
import glob
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import soundfile
import torch

from ecapa_accel.config import config_from_dict
from ecapa_accel.data import build_training_data, check_manifests
from ecapa_accel.errors import UserError

HOUR_AGO_NS = time.time_ns() - 3600 * 10**9


def large_manifest(tone_corpus) -> Path:
    """2,000 rows over 50 files (40 rows each; every other row a 0.1 s segment), written an hour ago."""
    corpus = tone_corpus("big", speakers=5, utterances=10, seconds=0.2)
    files = sorted(corpus.parent.glob("spk*/utt*.wav"))
    with open(corpus, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ID", "path", "spk", "start", "stop"])
        for row in range(2000):
            audio = files[row % len(files)]
            segment = ["0.05", "0.15"] if row % 2 else ["", ""]
            writer.writerow([f"u{row}", audio.relative_to(corpus.parent).as_posix(), audio.parent.name, *segment])
    for audio in files:
        os.utime(audio, ns=(HOUR_AGO_NS, HOUR_AGO_NS))  # an old dataset, as on a real restart
    return corpus


def config(manifest: Path, **data):
    return config_from_dict({"data": {"datasets": [{"name": "big", "csv": str(manifest)}], "crop_seconds": 0.1,
                                      **data}}, "test")


def headers_read(caplog) -> list[str]:
    """The "N unchanged since the last check, M read" parts of the header log lines, then forget them."""
    lines = [record.getMessage().split("files: ")[1] for record in caplog.records if "audio headers" in record.msg]
    caplog.clear()
    return lines


def test_second_validation_reuses_the_headers_with_identical_results(tone_corpus, caplog):
    manifest = large_manifest(tone_corpus)
    caplog.set_level(logging.INFO, logger="ecapa_accel.data")
    cold = check_manifests([manifest])
    assert headers_read(caplog) == ["0 unchanged since the last check, 50 read"]
    first = build_training_data(config(manifest))
    assert headers_read(caplog) == ["50 unchanged since the last check, 0 read"]
    assert check_manifests([manifest]) == cold
    assert headers_read(caplog) == ["50 unchanged since the last check, 0 read"]
    assert "2,000 rows (50 files), 5 speakers" in cold[0] and "16000 Hz (2,000), 1 channel (2,000)" in cold[0]
    second = build_training_data(config(manifest))
    assert headers_read(caplog) == ["50 unchanged since the last check, 0 read"]
    assert second.label_map == first.label_map and second.samples_per_epoch == first.samples_per_epoch == 2000
    a, b = next(first.batches(0, 0, 8, 0, 1, 0)), next(second.batches(0, 0, 8, 0, 1, 0))
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_changed_files_are_noticed_on_the_next_validation(tone_corpus, caplog):
    manifest = large_manifest(tone_corpus)
    build_training_data(config(manifest))
    caplog.set_level(logging.INFO, logger="ecapa_accel.data")

    # Same size, other header, only the mtime tells: rewritten at 8 kHz.
    resampled = manifest.parent / "spk1" / "utt3.wav"
    size = resampled.stat().st_size
    soundfile.write(resampled, soundfile.read(resampled)[0], 8000, subtype="PCM_16")
    assert resampled.stat().st_size == size
    os.utime(resampled, ns=(HOUR_AGO_NS + 10**9, HOUR_AGO_NS + 10**9))
    summary = check_manifests([manifest])[0]
    assert headers_read(caplog) == ["49 unchanged since the last check, 1 read"]
    assert "8000 Hz (40), 16000 Hz (1,960)" in summary

    # Replaced by garbage under the old mtime: the size tells. Training counts it, `data check` names the rows.
    garbage = manifest.parent / "spk0" / "utt2.wav"  # rows 3, 53, 103, ...
    garbage.write_bytes(b"RIFF\x00\x00not really audio" * 10)
    os.utime(garbage, ns=(HOUR_AGO_NS, HOUR_AGO_NS))
    with pytest.raises(UserError, match=r"40 of 2000 listed audio files cannot be decoded \(e.g. .*big/train.csv "
                                        r"row 3\).*max_bad_fraction=0.01"):
        build_training_data(config(manifest, max_bad_fraction=0.01))
    assert build_training_data(config(manifest, max_bad_fraction=0.05)).samples_per_epoch == 2000
    messages = []
    for _ in range(2):  # the second time from the cache, with the same reason
        with pytest.raises(UserError) as error:
            check_manifests([manifest])
        messages.append(str(error.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith(f"{manifest} row 3 (ID u2): cannot read audio spk0/utt2.wav: ")
    assert messages[0].endswith("... and 30 more problems")
    assert headers_read(caplog)[-1] == "50 unchanged since the last check, 0 read"

    # Deleted: a problem naming the row, as before any cache.
    (manifest.parent / "spk4" / "utt9.wav").unlink()
    with pytest.raises(UserError, match=r"big/train.csv row 50 \(ID u49\): audio file not found: spk4/utt9.wav"):
        build_training_data(config(manifest, max_bad_fraction=0.05))


def test_same_csv_in_another_folder_does_not_share_headers(tmp_path, tone_corpus):
    manifest = large_manifest(tone_corpus)
    build_training_data(config(manifest))
    copy = shutil.copytree(manifest.parent, tmp_path / "copy") / manifest.name  # same CSV, same mtimes
    broken = copy.parent / "spk2" / "utt0.wav"
    stat = broken.stat()
    broken.write_bytes(b"\xff" * stat.st_size)
    os.utime(broken, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(UserError, match=r"copy/train.csv row 21 \(ID u20\): cannot read audio spk2/utt0.wav"):
        check_manifests([copy])
    assert "16000 Hz (2,000)" in check_manifests([manifest])[0]


def test_a_file_rewritten_within_the_same_timestamp_tick_is_read_again(tone_corpus):
    """A file system that stamps whole seconds cannot tell two writes in one second apart: recent headers are
    not trusted."""
    manifest = tone_corpus("fresh", speakers=1, utterances=2, seconds=0.5)
    assert "16000 Hz (2)" in check_manifests([manifest])[0]
    rewritten = manifest.parent / "spk0" / "utt0.wav"
    stat = rewritten.stat()
    soundfile.write(rewritten, soundfile.read(rewritten)[0], 8000, subtype="PCM_16")
    os.utime(rewritten, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert rewritten.stat().st_size == stat.st_size
    assert "8000 Hz (1), 16000 Hz (1)" in check_manifests([manifest])[0]


def child_processes() -> set[int]:
    return {int(pid) for children in glob.glob(f"/proc/{os.getpid()}/task/*/children")
            for pid in Path(children).read_text().split()}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_dataloader_workers_outlive_a_signal_to_the_process_group(tone_corpus):
    """SLURM and Ctrl-C signal every process; the main process finishes its step, so the workers must go on."""
    corpus = tone_corpus("sig", speakers=2, utterances=3, seconds=0.3)
    data = build_training_data(config(corpus, augment={"prob": 0.5, "gain_db": [-6, 6]}))
    reference = list(data.batches(0, 0, 1, 0, 1, 0))
    before = child_processes()
    batches = data.batches(0, 0, 1, 0, 1, 2)
    drawn = [next(batches), next(batches)]  # one batch from each worker: both have run their worker_init_fn
    workers = child_processes() - before
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
    time.sleep(0.3)
    assert all(alive(pid) for pid in workers)
    drawn += list(batches)
    assert len(drawn) == len(reference) == 6
    for a, b in zip(drawn, reference):
        assert all(torch.equal(a[key], b[key]) for key in a)
