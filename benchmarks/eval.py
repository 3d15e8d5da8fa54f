"""Embedding throughput of evaluation (`embed_items`) vs a per-file `embed_file` loop, same files, same run.

Usage: python benchmarks/eval.py [--json] [--files 12] [--channels 512] [--min-seconds 4] [--max-seconds 8]
                                  [--repeats 4]
Writes 16 kHz wav files of random length in a temporary folder and embeds them with a randomly initialised
ECAPA-TDNN on the CPU. Also splits the work into decode time (soundfile, mono) and model time (front end +
network on the decoded waves), each measured alone. Times are the best of `--repeats` interleaved runs (the
machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch

from ecapa_accel.config import EvalConfig, FeaturesConfig
from ecapa_accel.encoder import EcapaEncoder, read_mono
from ecapa_accel.evaluate import audio_item, embed_items
from ecapa_accel.model import EcapaTdnn
from _report import emit

SAMPLE_RATE = 16000


def write_files(folder: Path, count: int, min_seconds: float, max_seconds: float, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        samples = int(rng.uniform(min_seconds, max_seconds) * SAMPLE_RATE)
        t = np.arange(samples) / SAMPLE_RATE
        f0 = rng.uniform(90, 250)
        wave = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))
        wave = 0.3 * wave / np.abs(wave).max() + 0.01 * rng.standard_normal(samples)
        path = folder / f"utt{i:03d}.wav"
        soundfile.write(path, wave.astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
        paths.append(path)
    return paths


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--files", type=int, default=12)
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--min-seconds", type=float, default=4.0)
    parser.add_argument("--max-seconds", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()

    torch.manual_seed(0)
    encoder = EcapaEncoder(EcapaTdnn(n_mels=80, channels=args.channels, embed_dim=192), FeaturesConfig()).eval()
    with tempfile.TemporaryDirectory() as folder:
        paths = write_files(Path(folder), args.files, args.min_seconds, args.max_seconds)
        items = [audio_item(path, "benchmark") for path in paths]
        encoder.embed_file(paths[0])  # warm-up: allocator and kernel selection

        runs = {
            "baseline": lambda: torch.stack([encoder.embed_file(path) for path in paths]),
            "pipeline": lambda: embed_items(encoder, items, EvalConfig()),
        }
        times = {"baseline": [], "pipeline": [], "decode": [], "model": []}
        results = {}
        for repeat in range(args.repeats):
            for name in ("baseline", "pipeline") if repeat % 2 else ("pipeline", "baseline"):  # alternate the order
                seconds, results[name] = _timed(runs[name])
                times[name].append(seconds)
            seconds, waves = _timed(lambda: [read_mono(path)[0] for path in paths])
            times["decode"].append(seconds)
            with torch.inference_mode():
                times["model"].append(_timed(lambda: [encoder(wave[None]) for wave in waves])[0])
    baseline_s, pipeline_s, decode_s, model_s = (min(times[key]) for key in ("baseline", "pipeline", "decode", "model"))

    audio_seconds = sum(item.seconds for item in items)
    report = {
        "files": args.files,
        "audio_seconds": round(audio_seconds, 1),
        "channels": args.channels,
        "torch_threads": torch.get_num_threads(),
        "utterances_per_s": round(args.files / pipeline_s, 2),
        "baseline_utterances_per_s": round(args.files / baseline_s, 2),
        "speedup": round(baseline_s / pipeline_s, 3),
        "realtime_factor": round(audio_seconds / pipeline_s, 1),
        "decode_s": round(decode_s, 3),
        "model_s": round(model_s, 3),
        "decode_fraction": round(decode_s / (decode_s + model_s), 4),
        "model_fraction": round(model_s / (decode_s + model_s), 4),
        "max_abs_diff": float((results["pipeline"] - results["baseline"]).abs().max()),
    }
    emit(report, args.json)


if __name__ == "__main__":
    main()
