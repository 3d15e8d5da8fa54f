"""Decoding with soundfile: partial reads of just the crop, mono, resampling, wrap-padding of short audio."""

from __future__ import annotations

import math
import os
from typing import BinaryIO

import numpy as np
import soundfile
import torch
import torchaudio.functional as F

DECODE_ERRORS = (soundfile.SoundFileError, RuntimeError, OSError)
FLOAT_SUBTYPES = ("FLOAT", "DOUBLE")  # the sample formats that can hold NaN or infinity (PCM cannot)
INTEGER_SUBTYPES = ("ULAW", "ALAW")  # with every "PCM_*": integer samples, always finite once decoded
NON_FINITE = "non-finite samples (NaN or infinity)"
PCM_16_SCALE = np.float32(2**-15)  # libsndfile's float value of one step of 16-bit PCM


class UnreadableAudio(Exception):
    """An audio file exists but libsndfile cannot decode it, or it decodes to non-finite samples."""


def _reason(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__


def _all_finite(audio: soundfile.SoundFile) -> bool:
    """Whether every sample decodes (as float32, like the training decoder) to a finite value; reads the file."""
    return all(np.isfinite(block).all() for block in audio.blocks(blocksize=1 << 16, dtype="float32"))


def audio_header(path: str) -> tuple[int, int, int]:
    """(sample rate, frames, channels) of an audio file; FileNotFoundError or UnreadableAudio otherwise.

    Reads the header only, except for float files (the only ones that can hold NaN or infinity), which are
    decoded whole once: a single NaN sample would make every later loss NaN."""
    try:
        with soundfile.SoundFile(path) as audio:  # like soundfile.info, without its costly log text
            rate, frames, channels = audio.samplerate, audio.frames, audio.channels
            finite = audio.subtype not in FLOAT_SUBTYPES or _all_finite(audio)
    except DECODE_ERRORS as error:
        if not os.path.exists(path):
            raise FileNotFoundError(path) from None
        hint = " (AAC/m4a: convert to wav first, see `ecapa-accel prepare voxceleb`)" if path.endswith(".m4a") else ""
        raise UnreadableAudio(_reason(error) + hint) from None
    if frames <= 0:
        raise UnreadableAudio("no audio frames")
    if not finite:
        raise UnreadableAudio(NON_FINITE)
    return rate, frames, channels


def _check_finite(frames: np.ndarray, subtype: str | None) -> None:
    """Samples that are not finite (float files can hold NaN) make the audio unreadable (not looked for when
    `subtype` says the samples are integers)."""
    integers = subtype is not None and (subtype.startswith("PCM_") or subtype in INTEGER_SUBTYPES)
    if not integers and not np.isfinite(frames).all():
        raise UnreadableAudio(NON_FINITE)


def _mono(frames: np.ndarray, subtype: str | None = None) -> torch.Tensor:
    """Channels of (frames,) or (frames, channels) averaged, after `_check_finite`."""
    _check_finite(frames, subtype)
    if frames.ndim == 1:
        return torch.from_numpy(frames)
    return torch.from_numpy(frames.mean(axis=1) if frames.shape[1] > 1 else frames[:, 0].copy())


def _read_float32(audio: soundfile.SoundFile, subtype: str, count: int, out: np.ndarray | None) -> np.ndarray:
    """`count` frames from the current position as float32, (frames,) when mono, else (frames, channels); into
    `out` when given. 16-bit PCM is read as int16 and scaled here: the values of libsndfile's own float
    conversion (x * 2**-15 is exact in float32) at half the cost per sample."""
    if subtype != "PCM_16":
        return audio.read(count, dtype="float32", out=out)
    data = audio.read(count, dtype="int16")
    return np.multiply(data, PCM_16_SCALE, out=None if out is None else out[: len(data)])


def read_crop(
    source: str | int | BinaryIO,
    sample_rate: int,
    crop_samples: int,
    crop_fraction: float,
    speed: float = 1.0,
    start: float = 0.0,
    stop: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`crop_samples` samples at `sample_rate` from the segment [start, stop) of a file, read partially.

    `source` is a path, a file object, or a file descriptor positioned where an audio file starts (a packed
    shard's; left open).

    crop_fraction in [0, 1) places the crop within the segment. `speed` > 1 plays faster (3D-Speaker's sox
    `speed`): frames are read as if recorded at rate * speed and resampled to `sample_rate`, which also
    converts a file recorded at another rate in the same pass. Audio shorter than the crop repeats (wraps).
    With `out` (float32, `crop_samples` long: a row of a batch) the crop is written there and `out` returned;
    a mono file needing no resampling is decoded straight into it.
    """
    try:
        with soundfile.SoundFile(source, closefd=False) as audio:
            rate, frames = audio.samplerate, audio.frames
            first = min(frames, round(start * rate))
            last = frames if stop is None else min(frames, round(stop * rate))
            available = max(0, last - first)
            source_rate = round(rate * speed)
            needed = math.ceil(crop_samples * source_rate / sample_rate)
            offset = first + int(crop_fraction * (available - needed + 1)) if available > needed else first
            audio.seek(offset)
            count = min(needed, available)
            direct = out is not None and audio.channels == 1 and source_rate == sample_rate
            subtype = audio.subtype
            data = _read_float32(audio, subtype, count, out.numpy()[:count] if direct else None)
    except DECODE_ERRORS as error:
        raise UnreadableAudio(_reason(error)) from None
    if len(data) == 0:
        raise UnreadableAudio("no audio frames in the segment")
    if direct and len(data) == crop_samples:  # the common case, decoded in place: only the finiteness check left
        _check_finite(data, subtype)
        return out
    wave = _mono(data, subtype)
    if source_rate != sample_rate:
        wave = F.resample(wave, source_rate, sample_rate)
    if len(wave) < crop_samples:
        wave = wave.repeat(math.ceil(crop_samples / len(wave)))
    wave = wave[:crop_samples]
    if out is None:
        return wave
    if wave.data_ptr() != out.data_ptr():
        out.copy_(wave)
    return out


def read_audio(path: str, sample_rate: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Frames [start, stop) of a file (default: all of it) as mono float32 at `sample_rate` (impulse responses,
    evaluation utterances)."""
    try:
        data, rate = soundfile.read(path, start=start, stop=stop, dtype="float32", always_2d=True)
    except DECODE_ERRORS as error:
        raise UnreadableAudio(_reason(error)) from None
    if len(data) == 0:
        raise UnreadableAudio("no audio frames")
    wave = _mono(data)
    return F.resample(wave, rate, sample_rate) if rate != sample_rate else wave
