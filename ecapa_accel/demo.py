"""`ecapa-accel demo`: a synthetic corpus, a training run stopped by SIGTERM and resumed, an evaluation.

It runs on a laptop CPU in a few minutes and uses only what a user would: `make_corpus`, a YAML config,
the `train` and `resume` commands in subprocesses (their progress bars show), `evaluate_trials` and
`plot_run`. The trained model is compared with two references on the same held-out trials: the
untrained network and the mean Kaldi fbank of each utterance (cosine-scored), which needs no training.
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from torchaudio.compliance import kaldi

from .checkpoint import run_status
from .config import Config, EvalConfig, load_config
from .encoder import EcapaEncoder, read_mono
from .errors import UserError
from .evaluate import cosine_scores, evaluate_trials, load_trials, score_report, validate
from .model import build_model
from .plot import plot_run
from .rundir import RunDir
from .synth import make_corpus


def fbank_mean_baseline(trials: str | Path, audio_root: str | Path | None = None, n_mels: int = 80) -> dict:
    """Score trials with each utterance's mean Kaldi fbank (no model): `{"eer", "min_dcf", "trials", "threshold"}`."""
    trial_list = load_trials(EvalConfig(trials=str(trials), audio_root=str(audio_root) if audio_root else None))
    means = []
    for item in trial_list.items:
        wave, rate = read_mono(item.path)
        fbank = kaldi.fbank(wave[item.start : item.stop][None], num_mel_bins=n_mels, sample_frequency=rate, dither=0.0)
        means.append(fbank.mean(dim=0))
    return score_report(cosine_scores(torch.stack(means), trial_list.pairs), trial_list.labels)


def untrained_baseline(cfg: Config) -> dict:
    """Score `cfg.eval.trials` with the network the run starts from (same seed, random weights)."""
    torch.manual_seed(cfg.train.seed)
    encoder = EcapaEncoder(build_model(cfg.model, cfg.features.n_mels), cfg.features, cfg.data.sample_rate)
    with torch.no_grad():
        return validate(encoder.eval(), cfg.eval)


DEMO_BATCH = 32


def demo_config(steps: int, seed: int, epochs: int = 1000) -> dict:
    """A small ECAPA that learns the synthetic voices in a few CPU minutes; paths relative to the config file."""
    return {
        "data": {
            "datasets": [
                {"name": "setA", "csv": "corpus/setA/train.csv", "weight": 0.5},
                {"name": "setB", "csv": "corpus/setB/train.csv", "weight": 0.5},
            ],
            "crop_seconds": 1.5,
            "num_workers": 1,
            "augment": {"prob": 0.3, "noise_csv": "corpus/noise/noise.csv", "noise_prob": 1.0, "reverb_prob": 0.0},
        },
        "model": {"channels": 128, "embed_dim": 128},
        "loss": {"scale": 30.0, "margin": 0.2, "margin_ramp_start_epoch": 0.0, "margin_ramp_end_epoch": 2.0},
        "optim": {"name": "adamw", "lr": 0.002, "weight_decay": 0.0001, "warmup_epochs": 0.5, "min_lr": 0.00001},
        "train": {
            "seed": seed,
            "batch_size": DEMO_BATCH,
            "epochs": epochs,  # the LR schedule's horizon: just past max_steps
            "max_steps": steps,
            "mixed_precision": "no",
            "checkpoint_every_steps": max(1, steps // 4),
            "keep_checkpoints": 2,
            "log_every_steps": 5,
        },
        "eval": {"trials": "corpus/heldout/trials.txt"},
    }


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ecapa_accel.cli", *args]


def _logged_step(run_dir: Path) -> int:
    """The newest optimizer step in RUN_DIR/metrics.jsonl (0 before the first record)."""
    return max((record["step"] for record in RunDir(run_dir).read_metrics()), default=0)


def _train_until_sigterm(config: Path, run_dir: Path, stop_step: int) -> int:
    """Start `ecapa-accel train`, send SIGTERM once `stop_step` steps are logged; returns the exit status."""
    process = subprocess.Popen(_cli("train", str(config), "--run-dir", str(run_dir)))
    while process.poll() is None and _logged_step(run_dir) < stop_step:
        time.sleep(0.2)
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    return process.wait()


def _row(name: str, report: dict) -> str:
    return f"  {name:<44} {report['eer']:6.2f}  {report['min_dcf']:6.3f}"


def run_demo(out_dir: str | Path = "ecapa-demo", steps: int = 300, utterances_per_speaker: int = 16,
             seed: int = 0) -> dict:
    """Generate, train (SIGTERM at half way, then resume), evaluate, plot; print and return the results."""
    out_dir = Path(out_dir)
    run_dir = out_dir / "run"
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"{run_dir} already holds a run; pick another OUT_DIR or delete it")
    started = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", flush=True)

    say(f"writing a synthetic corpus to {out_dir / 'corpus'} ...")
    corpus = make_corpus(out_dir / "corpus", seed=seed, utterances_per_speaker=utterances_per_speaker)
    config_path = out_dir / "demo.yaml"
    rows = max(len((out_dir / "corpus" / name / "train.csv").read_text().splitlines()) - 1 for name in ("setA", "setB"))
    epochs = math.ceil(steps * DEMO_BATCH / (2 * rows))  # two datasets at weight 0.5: an epoch is 2 x the larger
    config_path.write_text(yaml.safe_dump(demo_config(steps, seed, epochs), sort_keys=False), encoding="utf-8")
    cfg = load_config(config_path)
    say(f"corpus ready: training sets setA + setB, noise list, held-out trials {corpus['trials']}")

    baseline = fbank_mean_baseline(corpus["trials"])
    untrained = untrained_baseline(cfg)
    say(f"references: fbank-mean EER {baseline['eer']:.2f} %, untrained network EER {untrained['eer']:.2f} %")

    stop_step = steps // 2
    say(f"training {steps} steps; SIGTERM after step {stop_step} (as a cluster scheduler would send)")
    status = _train_until_sigterm(config_path, run_dir, stop_step)
    interrupted = run_status(run_dir)
    trained_label = f"trained, stopped at step {interrupted['step']} and resumed"
    if status == 0:
        trained_label = "trained (not interrupted)"
        say("training finished before the SIGTERM went out (fast machine); resuming a finished run is a no-op")
    elif status == 143:
        say(f"stopped with exit status 143; checkpoints: {', '.join(interrupted['checkpoints'])}")
    else:
        raise RuntimeError(f"training exited with status {status}")
    say(f"resuming: ecapa-accel resume {run_dir}")
    status = subprocess.run(_cli("resume", str(run_dir))).returncode
    if status != 0:
        raise RuntimeError(f"resume exited with status {status}")

    scores = out_dir / "scores.txt"
    trained = evaluate_trials(run_dir, corpus["trials"], scores_out=scores)
    plots = plot_run(run_dir)
    say("done")

    print(f"\nheld-out trials: {trained['trials']} over unseen speakers ({corpus['trials']})")
    print(f"  {'':<44} {'EER %':>6}  {'minDCF':>6}")
    print(_row("mean fbank + cosine (no training)", baseline))
    print(_row("untrained ECAPA-TDNN", untrained))
    print(_row(trained_label, trained))
    run = RunDir(run_dir)
    print(f"\nrun directory {run_dir}: {run.config.name}, {run.metrics.name}, {run.checkpoints.name}/, "
          f"{run.logs.name}/ (TensorBoard)")
    print(f"  export (model.safetensors + config.json): {run.export}")
    print(f"  plots: {', '.join(str(path) for path in plots)}")
    print(f"  trial scores: {scores}")
    print("\nnext:")
    print(f"  ecapa-accel status {run_dir}")
    print(f"  ecapa-accel eval {run.export} --trials {corpus['trials']} --cohort {corpus['setA']}")
    print(f"  ecapa-accel embed {run.export} {corpus['trials'].parent / 'wav' / '*' / 'utt00.wav'}")
    print(f"  ecapa-accel train {config_path} --run-dir {run_dir} train.max_steps={2 * steps}  # continue training")
    print(f"  tensorboard --logdir {run.logs}")
    print("  recipes/voxceleb/README.md: the same commands on VoxCeleb2")
    return {
        "corpus": corpus,
        "config": config_path,
        "run_dir": run_dir,
        "interrupted_at_step": interrupted["step"],
        "baseline": baseline,
        "untrained": untrained,
        "trained": trained,
        "plots": plots,
        "seconds": time.perf_counter() - started,
    }
