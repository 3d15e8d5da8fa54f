"""Synthetic multi-speaker speech corpus: source-filter voices, real wav files, manifests and trials.

Every speaker has its own voice (f0 range, jitter, shimmer, vocal-tract length, vowel formants,
spectral tilt, breathiness, speaking rate); every utterance is a random phone sequence (vowels with
formant transitions, fricative noise, pauses, some of them runs of exact digital zeros) passed through
a random channel (EQ, band limits, additive noise, gain). All randomness derives from the seed, so the
same seed writes byte-identical files. Synthesis is frame-wise in the frequency domain (numpy only).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

SAMPLE_RATE = 16000
_FRAME = 512  # synthesis frame (32 ms) ...
_HOP = 128  # ... with 4x overlap so a sqrt-Hann analysis/synthesis pair sums to a constant
_FREQS = np.fft.rfftfreq(_FRAME, 1.0 / SAMPLE_RATE)

# F1-F3 (Hz) of ten vowels for a reference vocal tract (Peterson & Barney style averages).
VOWEL_FORMANTS = np.array(
    [
        [270, 2290, 3010],
        [390, 1990, 2550],
        [530, 1840, 2480],
        [660, 1720, 2410],
        [730, 1090, 2440],
        [570, 840, 2410],
        [440, 1020, 2240],
        [300, 870, 2240],
        [640, 1190, 2390],
        [490, 1350, 1690],
    ],
    dtype=np.float64,
)
# Fricative noise shapes: centre frequency (Hz) and width (octaves) of a log-frequency bump.
FRICATIVES = np.array([[5500, 0.5], [3000, 0.6], [4500, 1.6], [1800, 0.7], [7000, 0.4]], dtype=np.float64)

_VOWEL, _FRICATIVE, _CLOSURE, _PAUSE = 0, 1, 2, 3
_PHONE_SHARES = (0.04, 0.74, 0.15)  # pause, vowel, fricative; the rest are stop closures
_FRICATIVE_GAIN = 0.03  # frication well below the vowels, so a few fricatives do not dominate an utterance
# Largest boost/cut of the speaker's static colouring: with the formants and f0 it makes voices differ
# enough that even an utterance's mean spectrum separates some speakers (a fair no-training baseline).
_TIMBRE_DB = 16.0
_TRAIN_SETS = ("setA", "setB")
_NOISE_CATEGORIES = ("noise", "music", "speech")


@dataclass(frozen=True)
class Voice:
    """Source-filter parameters of one synthetic speaker."""

    f0_hz: float
    f0_range_semitones: float
    jitter: float  # relative std of glottal period
    shimmer: float  # relative std of pulse amplitude
    vowel_formants: np.ndarray  # (vowels, 5) F1-F5 in Hz: vocal-tract length and the speaker's own accent
    bandwidth_scale: float
    tilt_db_per_octave: float
    breathiness: float  # aspiration noise relative to the glottal pulses
    speaking_rate: float
    fricative_scale: float
    timbre: np.ndarray  # static voice colouring (nasal and sinus cavities), gain per synthesis bin


def make_voice(seed: int, speaker: int) -> Voice:
    """The voice of speaker number `speaker` (a pure function of seed and number)."""
    rng = np.random.default_rng([seed, 0, speaker])
    f0 = float(np.exp(rng.uniform(np.log(85.0), np.log(250.0))))
    # Higher voices tend to have shorter tracts (higher formants); the rest of the spread is individual.
    pitch_position = np.log(f0 / 85.0) / np.log(250.0 / 85.0)
    formant_scale = float(np.clip(0.86 + 0.28 * pitch_position + rng.normal(0, 0.09), 0.78, 1.35))
    accent = np.exp(rng.normal(0.0, 0.07, size=VOWEL_FORMANTS.shape))
    upper = np.array([rng.uniform(3300, 3900), rng.uniform(4300, 5000)])  # F4, F5: the same in every vowel
    formants = np.concatenate([VOWEL_FORMANTS * accent, np.broadcast_to(upper, (len(VOWEL_FORMANTS), 2))], axis=1)
    bumps = 3
    centres = rng.uniform(np.log2(200.0), np.log2(6000.0), (bumps, 1))
    gains_db = rng.uniform(-_TIMBRE_DB, _TIMBRE_DB, bumps)
    widths = rng.uniform(0.25, 0.8, (bumps, 1))
    octaves = np.log2(np.maximum(_FREQS, 50.0))
    timbre_db = gains_db @ np.exp(-0.5 * ((octaves - centres) / widths) ** 2)
    return Voice(
        f0_hz=f0,
        f0_range_semitones=float(rng.uniform(0.8, 3.5)),
        jitter=float(rng.uniform(0.003, 0.025)),
        shimmer=float(rng.uniform(0.02, 0.12)),
        vowel_formants=formants * formant_scale,
        bandwidth_scale=float(rng.uniform(0.7, 1.6)),
        tilt_db_per_octave=float(rng.uniform(-16.0, -2.0)),
        breathiness=float(10 ** (rng.uniform(-30, -10) / 20)),
        speaking_rate=float(rng.uniform(0.75, 1.35)),
        fricative_scale=float(rng.uniform(0.85, 1.2)),
        timbre=(10 ** (timbre_db / 20)).astype(np.float32),
    )


def _smooth(tracks: np.ndarray, width: int) -> np.ndarray:
    """Moving average along axis 0 (frames) with edge padding; keeps the length."""
    rest = [(0, 0)] * (tracks.ndim - 1)
    padded = np.pad(tracks, [(width // 2, width - 1 - width // 2)] + rest, mode="edge")
    cumulative = np.cumsum(np.pad(padded, [(1, 0)] + rest), axis=0)
    return (cumulative[width:] - cumulative[:-width]) / width


def _phone_sequence(rng: np.random.Generator, voice: Voice, seconds: float) -> list[tuple[int, int, int]]:
    """Random phones as (kind, identity, frames) covering about `seconds`."""
    frame_seconds = _HOP / SAMPLE_RATE
    phones, total = [], 0.0
    while total < seconds:
        draw = rng.random()
        if phones and draw < _PHONE_SHARES[0]:
            kind, identity, length = _PAUSE, 0, rng.uniform(0.12, 0.4)
        elif draw < _PHONE_SHARES[0] + _PHONE_SHARES[1]:
            kind, identity, length = _VOWEL, int(rng.integers(len(VOWEL_FORMANTS))), rng.uniform(0.05, 0.16)
        elif draw < sum(_PHONE_SHARES):
            kind, identity, length = _FRICATIVE, int(rng.integers(len(FRICATIVES))), rng.uniform(0.05, 0.14)
        else:
            kind, identity, length = _CLOSURE, 0, rng.uniform(0.03, 0.07)
        if kind != _PAUSE:
            length /= voice.speaking_rate
        frames = max(2, int(round(length / frame_seconds)))
        phones.append((kind, identity, frames))
        total += frames * frame_seconds
    return phones


def _resonances(formants: np.ndarray, bandwidths: np.ndarray) -> np.ndarray:
    """Cascade of second-order resonators, magnitude per (frame, bin), unity gain at DC."""
    f = _FREQS.astype(np.float32)[None, :]
    response = np.ones((len(formants), len(f[0])), dtype=np.float32)
    for centre, half in zip(formants.T.astype(np.float32), bandwidths.T.astype(np.float32) / 2):
        centre, half_squared = centre[:, None], (half * half)[:, None]
        response *= (centre * centre + half_squared) / np.sqrt(
            ((f - centre) ** 2 + half_squared) * ((f + centre) ** 2 + half_squared)
        )
    return response


def _frames(signal: np.ndarray, window: np.ndarray) -> np.ndarray:
    padded = np.pad(signal, (_FRAME - _HOP, _FRAME))
    count = (len(signal) + _FRAME - _HOP) // _HOP + 1
    return np.lib.stride_tricks.sliding_window_view(padded, _FRAME)[::_HOP][:count] * window


def _overlap_add(frames: np.ndarray, length: int) -> np.ndarray:
    out = np.zeros((len(frames) + _FRAME // _HOP) * _HOP)
    for part in range(_FRAME // _HOP):
        chunk = frames[:, part * _HOP : (part + 1) * _HOP].reshape(-1)
        out[part * _HOP : part * _HOP + len(chunk)] += chunk
    return out[_FRAME - _HOP : _FRAME - _HOP + length]


def synthesize_speech(voice: Voice, rng: np.random.Generator, seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """Clean speech of about `seconds` and a per-sample mask of the pauses."""
    phones = _phone_sequence(rng, voice, seconds)
    kinds = np.concatenate([np.full(n, kind) for kind, _, n in phones])
    n_frames = len(kinds)
    n_samples = n_frames * _HOP
    frame_index = np.arange(n_frames)

    # Formant tracks: vowel targets, interpolated across consonants, smoothed for coarticulation.
    targets = np.concatenate([
        np.broadcast_to(voice.vowel_formants[identity if kind == _VOWEL else 0], (n, 5)) for kind, identity, n in phones
    ])
    is_vowel = kinds == _VOWEL
    if not is_vowel.any():  # a very short utterance without a vowel: hold the first vowel's formants
        is_vowel[:] = True
    formants = np.stack([np.interp(frame_index, frame_index[is_vowel], targets[is_vowel, k]) for k in range(5)], axis=1)
    formants = _smooth(formants * np.exp(rng.normal(0, 0.015, size=formants.shape)), 7)
    bandwidths = voice.bandwidth_scale * (50.0 + 0.06 * formants)

    # Loudness and source gains per frame.
    level = np.concatenate([np.full(n, 10 ** (rng.normal(0, 1.5) / 20)) for _, _, n in phones])
    voicing = _smooth((kinds == _VOWEL).astype(np.float64) * level, 3)
    frication = _smooth((kinds == _FRICATIVE).astype(np.float64) * level, 2)
    fricative_shape = np.concatenate(
        [np.broadcast_to(FRICATIVES[identity if kind == _FRICATIVE else 0], (n, 2)) for kind, identity, n in phones]
    )

    # f0: speaker mean, utterance offset, declination, smooth intonation.
    seconds_axis = frame_index * _HOP / SAMPLE_RATE
    intonation = _smooth(np.cumsum(rng.normal(0, 1, n_frames)), 25)
    intonation = (intonation - intonation.mean()) / (intonation.std() + 1e-9)
    declination = 1.5 * seconds_axis / max(seconds_axis[-1], 1e-9)
    semitones = rng.normal(0, 0.7) + voice.f0_range_semitones * intonation - declination
    f0_frames = voice.f0_hz * 2 ** (semitones / 12)
    f0 = np.interp(np.arange(n_samples), frame_index * _HOP, f0_frames)

    # Glottal pulse train with jitter (period) and shimmer (amplitude).
    phase = np.cumsum(f0 / SAMPLE_RATE)
    pulses = np.searchsorted(phase, np.arange(1, int(phase[-1]) + 1))
    period = SAMPLE_RATE / f0[np.minimum(pulses, n_samples - 1)]
    pulses = np.round(pulses + rng.normal(0, 1, len(pulses)) * voice.jitter * period)
    pulses = np.clip(pulses, 0, n_samples - 1).astype(int)
    glottal = np.zeros(n_samples)
    np.add.at(glottal, pulses, np.sqrt(period) * (1 + voice.shimmer * rng.normal(0, 1, len(pulses))))
    glottal += voice.breathiness * rng.normal(0, 1, n_samples) * np.sqrt(SAMPLE_RATE / voice.f0_hz)
    voiced_source = glottal * np.interp(np.arange(n_samples), frame_index * _HOP, voicing)
    noise_source = rng.normal(0, 1, n_samples) * np.interp(np.arange(n_samples), frame_index * _HOP, frication)

    # Filter frame by frame in the frequency domain: vocal tract for the voice, bumps for frication.
    window = np.sqrt(np.hanning(_FRAME + 1)[:_FRAME]).astype(np.float32)
    voiced_spectrum = np.fft.rfft(_frames(voiced_source.astype(np.float32), window), axis=1)
    noise_spectrum = np.fft.rfft(_frames(noise_source.astype(np.float32), window), axis=1)
    centres = np.arange(len(voiced_spectrum)) * _HOP - (_FRAME - _HOP) + _FRAME // 2
    frame_of = np.clip(centres // _HOP, 0, n_frames - 1)
    octaves = np.log2(np.maximum(_FREQS, 50.0) / 100.0)
    tilt = 10 ** (voice.tilt_db_per_octave * np.maximum(octaves, 0.0) / 20)
    vocal_tract = _resonances(formants[frame_of], bandwidths[frame_of]) * (tilt * voice.timbre)
    centre = fricative_shape[frame_of, 0:1] * voice.fricative_scale
    log_freqs = np.log2(np.maximum(_FREQS, 50.0)).astype(np.float32)
    width = fricative_shape[frame_of, 1:2].astype(np.float32)
    fricative_filter = np.exp(-0.5 * ((log_freqs - np.log2(centre).astype(np.float32)) / width) ** 2)
    spectrum = voiced_spectrum * vocal_tract + noise_spectrum * fricative_filter * _FRICATIVE_GAIN
    speech = _overlap_add(np.fft.irfft(spectrum, n=_FRAME, axis=1) * window, n_samples).astype(np.float64) / 2.0
    pause = np.repeat(kinds == _PAUSE, _HOP)
    active = ~pause & (np.repeat(kinds, _HOP) != _CLOSURE)
    speech *= 0.1 / (np.sqrt(np.mean(speech[active] ** 2)) + 1e-12)
    return speech, pause


@dataclass(frozen=True)
class Channel:
    """Ranges of the per-utterance recording conditions."""

    eq_db: float = 6.0  # largest boost or cut of each random EQ bump
    slope_db_per_octave: float = 2.0  # largest random spectral slope
    snr_db: tuple[float, float] = (15.0, 40.0)  # additive coloured noise
    noise_slope_db_per_octave: tuple[float, float] = (-9.0, -3.0)  # pink to brown, like room noise
    gain_db: tuple[float, float] = (-12.0, 3.0)
    highpass_hz: tuple[float, float] = (30.0, 150.0)  # microphone/line low cut
    band_limit_prob: float = 0.3  # chance of a telephone-like low-pass
    zero_pause_prob: float = 0.5  # chance that a pause is digital zeros rather than channel noise
    zero_padding_prob: float = 0.5  # chance of leading and trailing digital zeros ...
    zero_padding_seconds: float = 0.2  # ... of up to this length each


def apply_channel(speech: np.ndarray, rng: np.random.Generator, channel: Channel) -> np.ndarray:
    """A random microphone/line: EQ bumps, spectral slope, band limits, coloured noise at a random SNR, gain."""
    n = len(speech)
    n_fft = 1 << (n - 1).bit_length()  # a power of two keeps the FFT fast; the padding absorbs the wrap-around
    freqs = np.fft.rfftfreq(n_fft, 1.0 / SAMPLE_RATE)
    octaves = np.log2(np.maximum(freqs, 20.0))
    bumps = rng.integers(2, 5)
    gains = rng.uniform(-channel.eq_db, channel.eq_db, bumps)
    centres = rng.uniform(np.log2(150.0), np.log2(6000.0), bumps)
    widths = rng.uniform(0.4, 1.5, bumps)
    response_db = gains @ np.exp(-0.5 * ((octaves[None] - centres[:, None]) / widths[:, None]) ** 2)
    response_db += rng.uniform(-1.0, 1.0) * channel.slope_db_per_octave * (octaves - np.log2(1000.0))
    highpass = rng.uniform(*channel.highpass_hz)
    response = 10 ** (response_db / 20) / np.sqrt(1 + (highpass / np.maximum(freqs, 1.0)) ** 4)
    if rng.random() < channel.band_limit_prob:
        response /= np.sqrt(1 + (freqs / rng.uniform(3400, 7000)) ** 8)
    shaped = np.fft.irfft(np.fft.rfft(speech, n_fft) * response, n_fft)[:n]
    noise_slope = rng.uniform(*channel.noise_slope_db_per_octave)
    noise_colour = 10 ** (noise_slope * (octaves - 10) / 20)
    noise = np.fft.irfft(np.fft.rfft(rng.normal(0, 1, n), n_fft) * noise_colour, n_fft)[:n]
    snr = rng.uniform(*channel.snr_db)
    noise *= np.sqrt((np.mean(shaped**2) + 1e-12) / (np.mean(noise**2) + 1e-12) / 10 ** (snr / 10))
    return (shaped + noise) * 10 ** (rng.uniform(*channel.gain_db) / 20)


def synthesize_utterance(
    voice: Voice, rng: np.random.Generator, seconds: float, channel: Channel = Channel()
) -> np.ndarray:
    """One recording of exactly `seconds` (float32 in [-1, 1)): speech, channel and digital silence."""
    length = int(round(seconds * SAMPLE_RATE))
    padded = rng.random() < channel.zero_padding_prob
    lead, tail = rng.integers(0, int(channel.zero_padding_seconds * SAMPLE_RATE) + 1, 2) if padded else (0, 0)
    speech_length = max(length - lead - tail, _FRAME)
    speech, pause = synthesize_speech(voice, rng, speech_length / SAMPLE_RATE)
    wave = apply_channel(speech[:speech_length], rng, channel)
    pause = pause[:speech_length]
    # Digital zeros, as after VAD trimming, padding or in synthesised audio.
    starts = np.flatnonzero(np.diff(np.concatenate([[0], pause.astype(np.int8)])) == 1)
    ends = np.flatnonzero(np.diff(np.concatenate([pause.astype(np.int8), [0]])) == -1) + 1
    for start, end in zip(starts, ends):
        if rng.random() < channel.zero_pause_prob:
            wave[start:end] = 0.0
    wave = np.concatenate([np.zeros(lead), wave, np.zeros(max(0, length - lead - len(wave)))])[:length]
    peak = np.abs(wave).max()
    if peak > 0.99:
        wave *= 0.99 / peak
    return wave.astype(np.float32)


def _write_manifest(path: Path, rows: list[dict], fields: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _write_wav(path: Path, wave: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, wave, SAMPLE_RATE, subtype="PCM_16")


def _write_speakers(
    folder: Path,
    name: str,
    speakers: range,
    utterances: int,
    seconds: tuple[float, float],
    seed: int,
    channel: Channel,
) -> list[dict]:
    rows = []
    for speaker in speakers:
        voice = make_voice(seed, speaker)
        for utterance in range(utterances):
            rng = np.random.default_rng([seed, 1, speaker, utterance])
            wave = synthesize_utterance(voice, rng, rng.uniform(*seconds), channel)
            relative = f"wav/spk{speaker:03d}/utt{utterance:02d}.wav"
            _write_wav(folder / relative, wave)
            rows.append({"ID": f"{name}-spk{speaker:03d}-{utterance:02d}", "path": relative, "spk": f"spk{speaker:03d}",
                         "dur": f"{len(wave) / SAMPLE_RATE:.3f}"})
    return rows


def _noise_clip(category: str, rng: np.random.Generator, seconds: float, seed: int, index: int) -> np.ndarray:
    n = int(seconds * SAMPLE_RATE)
    if category == "noise":
        freqs = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
        slope = rng.uniform(-6.0, 0.0)
        wave = np.fft.irfft(np.fft.rfft(rng.normal(0, 1, n)) * np.maximum(freqs, 20.0) ** (slope / 6.02), n=n)
        if rng.random() < 0.5:  # mains hum
            t = np.arange(n) / SAMPLE_RATE
            hum = rng.choice([50.0, 60.0])
            wave += sum(np.sin(2 * np.pi * hum * k * t) / k for k in range(1, 6)) * np.std(wave) * rng.uniform(0.5, 3)
    elif category == "music":
        t = np.arange(n) / SAMPLE_RATE
        note_length = int(rng.uniform(0.15, 0.5) * SAMPLE_RATE)
        notes = 220.0 * 2 ** (rng.integers(-12, 13, n // note_length + 1) / 12)
        pitch = np.repeat(notes, note_length)[:n]
        phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
        envelope = np.exp(-3.0 * (np.arange(n) % note_length) / note_length)
        wave = envelope * sum(np.sin(k * phase) / k**1.5 for k in range(1, 8)) + 0.3 * np.sin(2 * np.pi * 110.0 * t)
    else:  # babble of voices that appear nowhere else in the corpus
        wave = np.zeros(n)
        for talker in range(int(rng.integers(3, 7))):
            voice = make_voice(seed, 100_000 + index * 10 + talker)
            speech, _ = synthesize_speech(voice, rng, seconds + 0.5)
            wave += speech[:n] if len(speech) >= n else np.pad(speech, (0, n - len(speech)))
    return (0.3 * wave / (np.abs(wave).max() + 1e-12)).astype(np.float32)


def _write_trials(path: Path, rows: list[dict], seed: int) -> None:
    """VoxCeleb-style trials over `rows`: every same-speaker pair, and as many different-speaker pairs."""
    rng = np.random.default_rng([seed, 3])
    by_speaker: dict[str, list[str]] = {}
    for row in rows:
        by_speaker.setdefault(row["spk"], []).append(row["path"])
    targets = []
    for files in by_speaker.values():
        targets += [(a, b) for i, a in enumerate(files) for b in files[i + 1 :]]
    speaker_of = {row["path"]: row["spk"] for row in rows}
    paths = [row["path"] for row in rows]
    nontargets: set[tuple[str, str]] = set()
    while len(nontargets) < len(targets):
        a, b = rng.choice(len(paths), 2, replace=False)
        if speaker_of[paths[a]] != speaker_of[paths[b]]:
            nontargets.add((paths[min(a, b)], paths[max(a, b)]))
    lines = [f"1 {a} {b}" for a, b in targets] + [f"0 {a} {b}" for a, b in sorted(nontargets)]
    lines = [lines[i] for i in rng.permutation(len(lines))]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def make_corpus(
    out_dir: str | Path,
    seed: int = 0,
    speakers_per_set: int = 20,
    utterances_per_speaker: int = 8,
    heldout_speakers: int = 10,
    heldout_utterances: int = 8,
    seconds: tuple[float, float] = (2.0, 3.0),
    heldout_seconds: float = 4.0,
    noise_clips: int = 12,
    channel: Channel = Channel(),
) -> dict[str, Path]:
    """Write a synthetic corpus under `out_dir` and return its files.

    Keys: "setA", "setB" (training manifests ID,path,spk,dur with disjoint speakers), "noise"
    (ID,dur,path,category for augmentation), "heldout" (manifest of unseen speakers) and "trials"
    (VoxCeleb-style `1 a.wav b.wav` lines over the held-out speakers, paths relative to its folder,
    as many non-target as target trials).
    """
    out_dir = Path(out_dir)
    paths: dict[str, Path] = {}
    first_speaker = 0
    for name in _TRAIN_SETS:
        speakers = range(first_speaker, first_speaker + speakers_per_set)
        rows = _write_speakers(out_dir / name, name, speakers, utterances_per_speaker, seconds, seed, channel)
        paths[name] = out_dir / name / "train.csv"
        _write_manifest(paths[name], rows, ["ID", "path", "spk", "dur"])
        first_speaker += speakers_per_set

    speakers = range(first_speaker, first_speaker + heldout_speakers)
    # One length for all held-out utterances: evaluation then embeds them in a few full batches.
    rows = _write_speakers(out_dir / "heldout", "heldout", speakers, heldout_utterances, (heldout_seconds,) * 2, seed,
                           channel)
    paths["heldout"] = out_dir / "heldout" / "heldout.csv"
    _write_manifest(paths["heldout"], rows, ["ID", "path", "spk", "dur"])
    paths["trials"] = out_dir / "heldout" / "trials.txt"
    _write_trials(paths["trials"], rows, seed)

    noise_rows = []
    for index in range(noise_clips):
        category = _NOISE_CATEGORIES[index % len(_NOISE_CATEGORIES)]
        rng = np.random.default_rng([seed, 2, index])
        wave = _noise_clip(category, rng, rng.uniform(3.0, 5.0), seed, index)
        relative = f"{category}/{category}{index:02d}.wav"
        _write_wav(out_dir / "noise" / relative, wave)
        noise_rows.append({"ID": f"{category}{index:02d}", "dur": f"{len(wave) / SAMPLE_RATE:.3f}", "path": relative,
                           "category": category})
    paths["noise"] = out_dir / "noise" / "noise.csv"
    _write_manifest(paths["noise"], noise_rows, ["ID", "dur", "path", "category"])
    return paths
