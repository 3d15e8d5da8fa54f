"""Held-out EER of stage 1, stage 1 + checkpoint averaging, and stage 2 large-margin fine-tuning (synthetic corpus).

Usage: python benchmarks/two_stage.py [--json] [--out DIR] [--steps 300] [--average 5] [--lm-steps 60] [--seed 0]
It runs what a user would, through the CLI: the demo's corpus and config (`ecapa-accel demo`'s model and
schedule) for stage 1 with a checkpoint every steps/10, `ecapa-accel average --last N`, then stage 2 from the
averaged export with WeSpeaker's large-margin settings scaled to the corpus (crops 2.5 s instead of 1.5 s,
margin 0.5 from the first step, LR 1e-4 decaying to 2.5e-5), each scored on the same held-out trials of unseen
speakers. One seed and one corpus: differences of a few tenths of a percent are noise; `--seed` gives others.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from ecapa_accel.demo import DEMO_BATCH, demo_config
from ecapa_accel.evaluate import evaluate_trials
from ecapa_accel.synth import make_corpus
from _report import emit


def _cli(*args) -> None:
    subprocess.run([sys.executable, "-m", "ecapa_accel.cli", *map(str, args)], check=True, stdout=subprocess.DEVNULL)


def _epochs(steps: int, rows: int) -> int:
    return math.ceil(steps * DEMO_BATCH / (2 * rows))  # two datasets at weight 0.5: an epoch is 2 x the larger


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=300, help="stage 1 optimizer steps")
    parser.add_argument("--average", type=int, default=5, help="checkpoints averaged (of 10 kept)")
    parser.add_argument("--lm-steps", type=int, default=60, help="stage 2 optimizer steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="ecapa-two-stage-"))
    started = time.perf_counter()

    corpus = make_corpus(out / "corpus", seed=args.seed, utterances_per_speaker=16)
    rows = max(len((out / "corpus" / name / "train.csv").read_text().splitlines()) - 1 for name in ("setA", "setB"))
    config = demo_config(args.steps, args.seed, _epochs(args.steps, rows))
    config["train"] |= {"checkpoint_every_steps": max(1, args.steps // 10), "keep_checkpoints": 10}
    config_path = out / "stage1.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")

    stage1, stage2 = out / "stage1", out / "stage2"
    _cli("train", config_path, "--run-dir", stage1)
    _cli("average", stage1, "--last", args.average)
    averaged = stage1 / f"export_avg{args.average}"
    _cli("train", config_path, "--run-dir", stage2, f"model.init_from={averaged}", "data.crop_seconds=2.5",
         "loss.margin=0.5", "loss.margin_ramp_end_epoch=0", "optim.lr=1e-4", "optim.min_lr=2.5e-5",
         "optim.warmup_epochs=0", f"train.epochs={_epochs(args.lm_steps, rows)}", f"train.max_steps={args.lm_steps}",
         f"train.checkpoint_every_steps={args.lm_steps}")

    results = {name: evaluate_trials(folder, corpus["trials"]) for name, folder in
               [("stage1", stage1 / "export"), (f"stage1_avg{args.average}", averaged), ("stage2_lm", stage2 / "export")]}
    report = {"trials": results["stage1"]["trials"], "steps": args.steps, "lm_steps": args.lm_steps, "seed": args.seed}
    report |= {f"{name}_eer": round(result["eer"], 3) for name, result in results.items()}
    report |= {f"{name}_min_dcf": round(result["min_dcf"], 4) for name, result in results.items()}
    report["seconds"] = round(time.perf_counter() - started, 1)
    emit(report, args.json)


if __name__ == "__main__":
    main()
