"""`ecapa-accel prepare`: manifests (ID,path,spk,dur) from the standard corpus layouts.

voxceleb  ROOT/**/id*/<video>/*.wav       (VoxCeleb1 wav/, VoxCeleb2 dev/aac/ after m4a -> wav conversion)
cnceleb   ROOT/data/id*/*.{flac,wav}      (CN-Celeb1/2; ROOT may also be the data/ folder itself)
folder    ROOT/<speaker>/**/*.{wav,flac}
"""

from __future__ import annotations

import csv
import os
import re
import shlex
from pathlib import Path

from ..errors import UserError
from .audio import UnreadableAudio, audio_header
from .manifest import Problems

VOXCELEB_SPEAKER = re.compile(r"id\d+")
AUDIO_SUFFIXES = (".wav", ".flac")


def _walk(root: Path) -> list[Path]:
    return sorted(Path(folder) / name for folder, _, names in os.walk(root) for name in names)


def _voxceleb(root: Path) -> list[tuple[Path, str]]:
    files = [path for path in _walk(root) if VOXCELEB_SPEAKER.fullmatch(path.parent.parent.name)]
    unconverted = [path for path in files if path.suffix == ".m4a" and not path.with_suffix(".wav").exists()]
    if unconverted:
        command = (f"find {shlex.quote(str(root))} -name '*.m4a' -exec sh -c "
                   "'ffmpeg -v error -n -i \"$1\" -ac 1 -ar 16000 \"${1%.m4a}.wav\"' _ {} \\;")
        raise UserError(f"{root}: {len(unconverted):,} VoxCeleb2 .m4a files have no .wav beside them (e.g. "
                        f"{unconverted[0]}); libsndfile cannot decode AAC. Convert them first: {command}")
    return [(path, path.parent.parent.name) for path in files if path.suffix == ".wav"]


def _cnceleb(root: Path) -> list[tuple[Path, str]]:
    base = root / "data" if (root / "data").is_dir() else root
    return [
        (path, path.parent.name) for path in _walk(base)
        if path.suffix in AUDIO_SUFFIXES and path.parent.parent == base and VOXCELEB_SPEAKER.fullmatch(path.parent.name)
    ]


def _folder(root: Path) -> list[tuple[Path, str]]:
    return [
        (path, path.relative_to(root).parts[0]) for path in _walk(root)
        if path.suffix.lower() in AUDIO_SUFFIXES and len(path.relative_to(root).parts) > 1
    ]


LAYOUTS = {
    "voxceleb": (_voxceleb, "ROOT/**/id*/<video>/*.wav"),
    "cnceleb": (_cnceleb, "ROOT/data/id*/*.flac"),
    "folder": (_folder, "ROOT/<speaker>/**/*.wav|flac"),
}


def _row_id(path: Path, root: Path, taken: set[str]) -> str:
    relative = path.relative_to(root)
    stem = relative.with_suffix("").as_posix()
    return relative.as_posix() if stem in taken else stem  # a.wav next to a.flac keeps its suffix


def prepare_manifest(layout: str, root: str | Path, out_csv: str | Path) -> str:
    """Scan a corpus, read every header (duration), write OUT.csv; returns a one-line summary."""
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout '{layout}'; choose one of {', '.join(LAYOUTS)}")
    root, out_csv = Path(root).resolve(), Path(out_csv).resolve()
    if not root.is_dir():
        raise UserError(f"{root}: not a folder")
    find, pattern = LAYOUTS[layout]
    files = find(root)
    if not files:
        raise UserError(f"{root}: no audio files in the {layout} layout ({pattern})")
    problems, rows, taken, seconds = Problems(), [], set(), 0.0
    for path, speaker in files:
        try:
            rate, frames, _ = audio_header(str(path))
        except (FileNotFoundError, UnreadableAudio) as error:
            problems.add(f"{path}: cannot read audio: {error}")
            continue
        row_id = _row_id(path, root, taken)
        taken.add(row_id)
        # Paths relative to the CSV when the audio lies beneath it, so the two can move together.
        listed = os.path.relpath(path, out_csv.parent) if path.is_relative_to(out_csv.parent) else str(path)
        rows.append((row_id, listed, speaker, f"{frames / rate:.3f}"))
        seconds += frames / rate
    problems.raise_if_any()
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    partial = out_csv.with_name(f".{out_csv.name}.partial")
    with open(partial, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ID", "path", "spk", "dur"])
        writer.writerows(rows)
    os.replace(partial, out_csv)
    speakers = len({speaker for _, _, speaker, _ in rows})
    return f"wrote {out_csv}: {len(rows):,} files, {speakers:,} speakers, {seconds / 3600:.2f} h"
