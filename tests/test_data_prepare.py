"""`ecapa-accel prepare`: manifests from the VoxCeleb, CN-Celeb and speaker-folder layouts."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile

from ecapa_accel.cli import main


def run(*args: str) -> int:
    with pytest.raises(SystemExit) as exit:
        main(list(args))
    return exit.value.code


def write(path: Path, seconds: float = 0.5, rate: int = 16000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, np.full(int(seconds * rate), 0.1, dtype=np.float32), rate)


def rows(manifest: Path) -> list[dict]:
    with open(manifest, newline="") as handle:
        return list(csv.DictReader(handle))


def test_voxceleb_layout_gives_a_manifest_that_passes_check(tmp_path, capsys):
    root = tmp_path / "vox1" / "wav"
    for speaker, video, utterance in [("id10001", "1zcIwhmdeo4", 1), ("id10001", "7gWzIy6yIIk", 2),
                                      ("id10002", "0_laIeN-Q44", 1)]:
        write(root / speaker / video / f"{utterance:05d}.wav")
    (root / "id10002" / "0_laIeN-Q44" / "notes.txt").write_text("not audio")
    out = tmp_path / "lists" / "vox1.csv"
    assert run("prepare", "voxceleb", str(tmp_path / "vox1"), str(out)) == 0
    assert f"wrote {out}: 3 files, 2 speakers" in capsys.readouterr().out
    listed = rows(out)
    assert [row["spk"] for row in listed] == ["id10001", "id10001", "id10002"]
    assert listed[0]["ID"] == "wav/id10001/1zcIwhmdeo4/00001" and listed[0]["dur"] == "0.500"
    assert listed[0]["path"] == str(root / "id10001" / "1zcIwhmdeo4" / "00001.wav")  # not beneath the CSV
    assert run("data", "check", str(out)) == 0


def test_voxceleb2_m4a_without_wav_explains_the_conversion(tmp_path, capsys):
    m4a = tmp_path / "dev" / "aac" / "id00012" / "21Uxsk56VDQ" / "00001.m4a"
    m4a.parent.mkdir(parents=True)
    m4a.write_bytes(b"\x00\x00\x00\x18ftypM4A ")
    assert run("prepare", "voxceleb", str(tmp_path / "dev"), str(tmp_path / "vox2.csv")) == 2
    err = capsys.readouterr().err
    assert "1 VoxCeleb2 .m4a files have no .wav" in err and "ffmpeg" in err and "-ar 16000" in err
    assert not (tmp_path / "vox2.csv").exists()


def test_cnceleb_and_folder_layouts(tmp_path, capsys):
    for speaker in ("id00000", "id00001"):
        for genre in ("interview-01-001", "singing-02-003"):
            write(tmp_path / "CN-Celeb" / "data" / speaker / f"{genre}.flac", rate=16000)
    assert run("prepare", "cnceleb", str(tmp_path / "CN-Celeb"), str(tmp_path / "cn.csv")) == 0
    assert [row["ID"] for row in rows(tmp_path / "cn.csv")][:2] == ["data/id00000/interview-01-001",
                                                                   "data/id00000/singing-02-003"]
    write(tmp_path / "inhouse" / "alice" / "day1" / "a.wav")
    write(tmp_path / "inhouse" / "alice" / "a.flac", seconds=1.0, rate=8000)
    write(tmp_path / "inhouse" / "bob" / "b.wav")
    assert run("prepare", "folder", str(tmp_path / "inhouse"), str(tmp_path / "inhouse" / "list.csv")) == 0
    listed = rows(tmp_path / "inhouse" / "list.csv")
    assert [(row["path"], row["spk"], row["dur"]) for row in listed] == [
        ("alice/a.flac", "alice", "1.000"), ("alice/day1/a.wav", "alice", "0.500"), ("bob/b.wav", "bob", "0.500")]
    summaries = capsys.readouterr().out.splitlines()
    assert "4 files, 2 speakers" in summaries[0] and "3 files, 2 speakers" in summaries[1]
    assert run("prepare", "folder", str(tmp_path / "empty-nothing"), str(tmp_path / "x.csv")) == 2
