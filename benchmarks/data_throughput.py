"""Data pipeline figures, each against a baseline measured in the same run (prints JSON with --json).

1. Model-ready samples/s on one core (torch threads 1, num_workers 0), ours vs a baseline written here that does
   what 3D-Speaker's loader does (`WavSVDataset` + `WavReader` + `SpkVeriAug` + `FBank`): read the whole file,
   speed-perturb the whole file, crop in memory, augment with a whole noise file / RIR, Kaldi fbank per sample
   in the worker. Same generated corpus (VoxCeleb-like 4-12 s files), same noise/RIR lists, aug off and aug on.
   Ours hands 3 s waveform crops to the accelerator, where the features are computed per batch; the
   `ours_with_cpu_fbank` figures add the same per-sample fbank on the CPU for a like-for-like comparison.
   Target: ours / baseline >= 3.
2. Peak RSS growth of one process building the stream of a generated 1,000,000-row manifest (paths need not
   exist): load + validate the CSV (no audio checks), label map, one epoch's order, locating a batch.
   Measured over a process that has already imported torch, torchaudio, accelerate and datasets. Target <= 300 MB.

    python benchmarks/data_throughput.py --json
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio.compliance.kaldi as kaldi
import torchaudio.functional as F

from _corpus import write_manifest, write_noise_wavs
from ecapa_accel.config import config_from_dict
from ecapa_accel.data import build_training_data
from ecapa_accel.data.augment import reverberate

RATE = 16000
CROP_SECONDS = 3.0


def make_corpus(root: Path, files: int) -> dict:
    """VoxCeleb-like speech (4-12 s, 20 speakers); MUSAN-like noise in MUSAN's proportions and mean lengths
    (noise 46 % of files, ~23 s; music 33 %, ~230 s; speech 21 %, ~255 s); 0.5 s RIRs."""
    rng = np.random.default_rng(0)
    speech = write_noise_wavs(root / "speech", list(rng.uniform(4, 12, files)), rng)
    noises = []
    for category, count, low, high in (("noise", 9, 5, 40), ("music", 7, 150, 310), ("speech", 4, 180, 330)):
        noises += write_noise_wavs(root / "musan" / category, list(rng.uniform(low, high, count)), rng)
    rirs = write_noise_wavs(root / "rirs", [0.5] * 20, rng)
    return {
        "train": write_manifest(root / "train.csv", ["ID", "path", "spk"],
                           [[f"u{i}", str(p), f"s{i % 20}"] for i, p in enumerate(speech)]),
        "noise": write_manifest(root / "noise.csv", ["ID", "path"], [[f"{p.parent.name}{p.stem}", str(p)] for p in noises]),
        "rir": write_manifest(root / "rir.csv", ["ID", "path"], [[p.stem, str(p)] for p in rirs]),
    }


class ThreeDSpeakerStyle(torch.utils.data.Dataset):
    """The baseline: 3D-Speaker's per-sample work, with soundfile/torchaudio.functional standing in for
    torchaudio.load / sox (gone from torchaudio) and our FFT convolution for scipy.signal.convolve."""

    def __init__(self, corpus: dict, augment: bool):
        self.rows = [(row["path"], row["spk"]) for row in csv.DictReader(open(corpus["train"]))]
        self.speakers = {spk: i for i, spk in enumerate(sorted({spk for _, spk in self.rows}))}
        self.noises = [row["path"] for row in csv.DictReader(open(corpus["noise"]))]
        self.rirs = [row["path"] for row in csv.DictReader(open(corpus["rir"]))]
        self.augment = augment
        self.aug_prob = 0.8

    def __len__(self) -> int:
        return len(self.rows)

    def _reverb(self, wav: torch.Tensor) -> torch.Tensor:
        rir = torch.from_numpy(soundfile.read(random.choice(self.rirs), dtype="float32")[0])
        out = reverberate(wav, rir / rir.pow(2).sum().sqrt())  # what scipy.signal.convolve does: FFT, fast length
        return out / (out.abs().max() + 1e-6)

    def _noise(self, wav: torch.Tensor) -> torch.Tensor:
        noise = torch.from_numpy(soundfile.read(random.choice(self.noises), dtype="float32")[0])  # whole file
        if len(noise) >= len(wav):
            start = random.randint(0, len(noise) - len(wav))
            noise = noise[start : start + len(wav)]
        else:
            noise = noise.repeat(len(wav) // len(noise) + 1)[: len(wav)]
        wav_db = 10 * torch.log10(wav.pow(2).mean() + 1e-6)
        noise_db = 10 * torch.log10(noise.pow(2).mean() + 1e-6)
        out = wav + torch.sqrt(10 ** ((wav_db - noise_db - random.uniform(0, 15)) / 10)) * noise
        return out / (out.abs().max() + 1e-6)

    def __getitem__(self, index: int):
        path, spk = self.rows[index]
        wav = torch.from_numpy(soundfile.read(path, dtype="float32")[0])  # the whole file
        speed_index = random.randint(0, 2) if self.augment else 0
        if speed_index:
            wav = F.speed(wav[None], RATE, [1.0, 0.9, 1.1][speed_index])[0][0]
        chunk = int(CROP_SECONDS * RATE)
        if len(wav) >= chunk:
            start = random.randint(0, len(wav) - chunk)
            wav = wav[start : start + chunk]
        else:
            wav = torch.nn.functional.pad(wav, (0, chunk - len(wav)))
        if self.augment and self.aug_prob > random.random():
            wav = random.choice([self._noise, self._reverb, lambda w: self._noise(self._reverb(w))])(wav)
        return fbank(wav), self.speakers[spk] + len(self.speakers) * speed_index


def fbank(wave: torch.Tensor) -> torch.Tensor:
    feats = kaldi.fbank(wave[None], num_mel_bins=80, sample_frequency=RATE, dither=0.0)
    return feats - feats.mean(0, keepdim=True)


def samples_per_s(epochs, samples: int, per_sample=None) -> float:
    """Throughput over `samples` after the first batch; `epochs(n)` gives the batches of epoch n."""
    iterator = itertools.chain.from_iterable(epochs(n) for n in itertools.count())
    next(iterator)
    drawn, started = 0, time.perf_counter()
    for batch in iterator:
        if per_sample is not None:
            for wave in batch["waves"]:
                per_sample(wave)
        drawn += len(batch["waves"] if isinstance(batch, dict) else batch[1])
        if drawn >= samples:
            break
    return drawn / (time.perf_counter() - started)


def throughput(corpus: dict, samples: int, repeats: int) -> dict:
    torch.set_num_threads(1)  # one core
    batch = 32
    results = {}
    for name, augment in (("aug_off", {"prob": 0.0}), ("aug_on", {
        # 3D-Speaker picks one of noise / reverb / both: each happens in 2/3 of augmented samples.
        "prob": 0.8, "noise_prob": 2 / 3, "reverb_prob": 2 / 3, "snr_db": {"noise": [0.0, 15.0]},
        "noise_csv": str(corpus["noise"]), "rir_csv": str(corpus["rir"]),
    })):
        speeds = [1.0, 0.9, 1.1] if name == "aug_on" else [1.0]
        cfg = config_from_dict({"data": {"datasets": [{"name": "bench", "csv": str(corpus["train"])}],
                                         "crop_seconds": CROP_SECONDS, "speed_factors": speeds,
                                         "augment": augment}}, "bench")
        data = build_training_data(cfg)
        random.seed(0)
        baseline_loader = torch.utils.data.DataLoader(ThreeDSpeakerStyle(corpus, name == "aug_on"),
                                                      batch_size=batch, shuffle=True, num_workers=0)
        baseline, ours, ours_fbank = 0.0, 0.0, 0.0
        for _ in range(repeats):  # interleaved, best of each: the machine's load drifts within a run
            baseline = max(baseline, samples_per_s(lambda epoch: baseline_loader, samples))
            ours = max(ours, samples_per_s(lambda epoch: data.batches(epoch, 0, batch, 0, 1, 0), samples))
            ours_fbank = max(ours_fbank, samples_per_s(lambda epoch: data.batches(epoch, 0, batch, 0, 1, 0), samples,
                                                       per_sample=fbank))
        results[name] = {
            "baseline_3dspeaker_samples_per_s": round(baseline, 1),
            "ours_samples_per_s": round(ours, 1),
            "ours_with_cpu_fbank_samples_per_s": round(ours_fbank, 1),
            "ratio": round(ours / baseline, 2),
            "ratio_with_cpu_fbank": round(ours_fbank / baseline, 2),
        }
    return results


RSS_PROBE = r"""
import csv, json, resource, sys, time
import accelerate, datasets, torch, torchaudio
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20
before = rss_mb()
from ecapa_accel.config import config_from_dict
from ecapa_accel.data import read_manifest
from ecapa_accel.data.augment import Augmenter
from ecapa_accel.data.manifest import Problems
from ecapa_accel.data.mixing import build_label_map
from ecapa_accel.data.stream import TrainingData
manifest_path = sys.argv[1]
cfg = config_from_dict({"data": {"datasets": [{"name": "big", "csv": manifest_path}]}}, "rss")
started = time.perf_counter()
problems = Problems()
manifest = read_manifest(manifest_path, problems, check_audio=False)
problems.raise_if_any()
loaded = time.perf_counter() - started
label_map = build_label_map([f"big/{s}" for s in manifest.speakers], [1.0], True)
data = TrainingData(cfg, [manifest], label_map, Augmenter(cfg.data.augment, 16000, None, None))
data.locate(0, range(len(manifest) // 2, len(manifest) // 2 + 256))
ordered = time.perf_counter() - started - loaded
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"rows": len(manifest), "speakers": len(manifest.speakers),
                  "samples_per_epoch": data.samples_per_epoch, "load_validate_s": round(loaded, 2),
                  "epoch_order_s": round(ordered, 2), "rss_before_mb": round(before),
                  "peak_rss_growth_mb": round(peak - before, 1)}))
"""


def peak_rss(root: Path, rows: int) -> dict:
    manifest = root / f"rows_{rows}.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ID", "path", "spk", "dur"])
        for i in range(rows):
            speaker = f"id{i // 170:05d}"  # about VoxCeleb2's 5,994 speakers per million rows
            writer.writerow([f"{speaker}-{i:07d}", f"{speaker}/video{i % 37:03d}/{i:07d}.wav", speaker,
                             f"{4 + (i % 80) / 10:.2f}"])
    results = []
    env = {**os.environ, "HF_DATASETS_CACHE": str(root / "hf-cache")}
    for _ in range(2):  # cold then warm `datasets` cache
        probe = subprocess.run([sys.executable, "-c", RSS_PROBE, str(manifest)], capture_output=True, text=True,
                               check=True, cwd=Path(__file__).resolve().parents[1], env=env)
        results.append(json.loads(probe.stdout.strip().splitlines()[-1]))
    return {"cold_cache": results[0], "warm_cache": results[1], "target_mb": 300}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--files", type=int, default=200, help="speech files in the generated corpus")
    parser.add_argument("--samples", type=int, default=320, help="samples timed per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per configuration (best counts)")
    parser.add_argument("--rss-rows", type=int, default=1_000_000, help="rows of the generated manifest")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        report = {"throughput_per_core": throughput(make_corpus(root, args.files), args.samples, args.repeats),
                  "peak_rss": peak_rss(root, args.rss_rows)}
    if args.json:
        print(json.dumps(report))
    else:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
