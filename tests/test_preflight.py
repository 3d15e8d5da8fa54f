"""Every mistake that can be seen before a run writes anything exits 2 with one line, the run directory untouched,
and the corrected command then trains (issue 13, cases 5, 6, 7)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from conftest import cli, run_cli, tree


def tiny_config(tmp_path: Path, tone_corpus, **sections) -> Path:
    corpus = tone_corpus("alpha", speakers=3, utterances=2, seconds=1.0)
    config = {
        "data": {"datasets": [{"name": "alpha", "csv": str(corpus)}], "crop_seconds": 0.5, "num_workers": 0},
        "features": {"n_mels": 24},
        "model": {"channels": 16, "embed_dim": 16},
        "optim": {"lr": 0.05},
        "train": {"batch_size": 2, "max_steps": 3, "epochs": 10, "checkpoint_every_minutes": 0,
                  "log_every_steps": 1},
    }
    for section, values in sections.items():
        config[section].update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def assert_one_line_naming(status: int, stderr: str, name: str) -> None:
    lines = stderr.strip().splitlines()
    assert status == 2 and len(lines) == 1 and name in lines[0] and "Traceback" not in stderr, stderr


@pytest.mark.parametrize(
    "overrides, named",
    [
        # case 5: passed validation, then crashed after config.yaml was written
        (["optim.momentum=0"], "optim.momentum"),  # with the default nesterov: true
        (["optim.momentum=-0.5", "optim.nesterov=false"], "optim.momentum"),
        (["optim.name=adamw", "optim.betas=[0.9, 1.5]"], "optim.betas"),
        (["optim.name=adamw", "optim.betas=[-0.1, 0.999]"], "optim.betas"),
        (["train.seed=-1"], "train.seed"),
        ([f"train.seed={2**40}"], "train.seed"),
        (["data.crop_seconds=0.01"], "data.crop_seconds"),
        (["features.frame_length_ms=600"], "features.frame_length_ms"),
        (["model.channels=30"], "model.channels"),
        # case 6: trained to NaN or to a negative LR, exit 0
        (["optim.lr=.inf"], "optim.lr"),
        (["data.sample_rate=100"], "data.sample_rate"),
        (["optim.min_lr=-0.00001"], "optim.min_lr"),
        # what only building the pieces shows
        (["data.crop_seconds=0.05"], "data.crop_seconds"),  # 3 frames: fewer than the model's minimum
        (["features.n_mels=128", "features.frame_length_ms=10"], "features.n_mels"),  # empty mel filters
    ],
)
def test_config_mistakes_exit_2_before_the_run_dir_exists(tmp_path, tone_corpus, capsys, overrides, named):
    config = tiny_config(tmp_path, tone_corpus)
    run = tmp_path / "run"
    status, _, stderr = run_cli(capsys, "train", str(config), "--run-dir", str(run), *overrides)
    assert_one_line_naming(status, stderr, named)
    assert not run.exists()


def test_an_infinite_dataset_weight_exits_2(tmp_path, tone_corpus, capsys):
    config = tiny_config(tmp_path, tone_corpus)
    config.write_text(config.read_text().replace("name: alpha", "name: alpha\n    weight: .inf"))
    status, _, stderr = run_cli(capsys, "train", str(config), "--run-dir", str(tmp_path / "run"))
    assert_one_line_naming(status, stderr, "data.datasets[0].weight")
    assert not (tmp_path / "run").exists()


def test_a_regular_file_as_run_dir_or_its_parent_exits_2(tmp_path, tone_corpus, capsys):
    config = tiny_config(tmp_path, tone_corpus)
    occupied = tmp_path / "occupied"
    occupied.write_text("notes\n")
    for run in (occupied, occupied / "run"):
        status, _, stderr = run_cli(capsys, "train", str(config), "--run-dir", str(run))
        assert_one_line_naming(status, stderr, str(run))
        assert occupied.read_text() == "notes\n"


@pytest.mark.parametrize(
    "eval_values, named",
    [
        ({"trials": "missing_trials.txt"}, "missing_trials.txt"),
        ({"trials": "garbled.txt"}, "garbled.txt line 1"),
        ({"trials": "trials.txt", "audio_root": "no_such_folder"}, "eval.audio_root"),
        ({"trials": "trials.txt", "manifest": "no_such.csv"}, "no_such.csv"),
        ({"trials": "absent_audio.txt"}, "nobody.wav"),
    ],
)
def test_validation_inputs_are_checked_before_the_first_step(tmp_path, tone_corpus, capsys, eval_values, named):
    config = tiny_config(tmp_path, tone_corpus)
    (tmp_path / "trials.txt").write_text("1 alpha/spk0/utt0.wav alpha/spk0/utt1.wav\n")
    (tmp_path / "garbled.txt").write_text("these are not trials\n")
    (tmp_path / "absent_audio.txt").write_text("0 alpha/spk0/utt0.wav alpha/nobody.wav\n")
    values = {key: str(tmp_path / value) for key, value in eval_values.items()}
    run = tmp_path / "run"
    overrides = [f"eval.{key}={value}" for key, value in values.items()]
    status, _, stderr = run_cli(capsys, "train", str(config), "--run-dir", str(run), *overrides)
    assert_one_line_naming(status, stderr, named)
    assert not run.exists()


@pytest.mark.slow
def test_the_corrected_command_then_trains_and_a_refused_resume_leaves_the_run_as_it_was(tmp_path, tone_corpus):
    config = tiny_config(tmp_path, tone_corpus)
    run = tmp_path / "run"
    # Before: config.yaml was written first, so the corrected command was refused as a different config.
    refused = cli("train", str(config), "--run-dir", str(run), "model.channels=30")
    assert refused.returncode == 2 and not run.exists(), refused.stderr
    refused = cli("train", str(config), "--run-dir", str(run), f"eval.trials={tmp_path / 'trials.txt'}")
    assert refused.returncode == 2 and "trials.txt" in refused.stderr and not run.exists(), refused.stderr

    (tmp_path / "trials.txt").write_text("1 alpha/spk0/utt0.wav alpha/spk0/utt1.wav\n"
                                         "0 alpha/spk0/utt0.wav alpha/spk1/utt0.wav\n")
    trained = cli("train", str(config), "--run-dir", str(run), f"eval.trials={tmp_path / 'trials.txt'}")
    assert trained.returncode == 0, trained.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["type"] == "eval" for r in records)
    assert all(math.isfinite(r["loss"]) for r in records if r["type"] == "train")
    assert (run / "export" / "model.safetensors").is_file()

    # An allowed resume override pointing at a missing file: refused, nothing in the run rewritten.
    before = tree(run)
    refused = cli("resume", str(run), "train.max_steps=5", f"eval.trials={tmp_path / 'gone.txt'}")
    assert refused.returncode == 2 and "gone.txt" in refused.stderr, refused.stderr
    assert tree(run) == before
