"""The training loop through the real CLI: exact resume after SIGKILL/SIGTERM, multi-process, bad inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import (STEPS, assert_identical, assert_user_error, cli, final_weights, records_of, start, tiny_config,
                      tree, wait_for)

pytestmark = pytest.mark.slow  # CLI subprocesses: the slow tier

@pytest.fixture
def reference(tmp_path, tone_corpus):
    """An uninterrupted run with 0 data workers: (config path, final weights)."""
    config = tiny_config(tmp_path, tone_corpus)
    run = tmp_path / "reference"
    result = cli("train", str(config), "--run-dir", str(run))
    assert result.returncode == 0, result.stderr
    assert (run / "export" / "model.safetensors").is_file()
    assert (run / "speakers.json").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(1, STEPS + 1))
    return config, final_weights(run)


def test_sigkill_anywhere_then_resume_is_bit_identical(tmp_path, reference):
    """Killed after a checkpoint (and again inside a checkpoint write), resumed with 2 workers: same weights."""
    config, expected = reference
    run = tmp_path / "killed"
    checkpoints = run / "checkpoints"

    process = start("train", str(config), "--run-dir", str(run), "data.num_workers=2")
    wait_for(lambda: (checkpoints / "step_3").is_dir(), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert json.loads(cli("status", str(run), "--json").stdout)["step"] >= 3

    # Kill inside a checkpoint write: poll for the in-progress dot folder and kill at once.
    interrupted_write = False
    for _ in range(5):
        process = start("resume", str(run), "train.checkpoint_every_steps=1", "data.num_workers=2")

        def writing() -> bool:
            return checkpoints.is_dir() and any(p.startswith(".") for p in os.listdir(checkpoints))

        try:
            wait_for(writing, process, timeout=60)
        except AssertionError:
            break  # the run finished before a write was caught
        process.send_signal(signal.SIGKILL)
        process.wait()
        interrupted_write = interrupted_write or any(p.startswith(".") for p in os.listdir(checkpoints))
        if interrupted_write:
            break
    assert interrupted_write, "no SIGKILL landed inside a checkpoint write"

    result = cli("resume", str(run), "data.num_workers=2")
    assert result.returncode == 0, result.stderr
    assert not any(p.startswith(".") for p in os.listdir(checkpoints))
    assert_identical(final_weights(run), expected)


def test_sigterm_checkpoints_current_step_and_resume_is_identical(tmp_path, reference):
    config, expected = reference
    run = tmp_path / "preempted"
    process = start("train", str(config), "--run-dir", str(run), "train.checkpoint_every_steps=100")
    wait_for(lambda: (run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= 2,
             process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    status = json.loads(cli("status", str(run), "--json").stdout)
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert status["checkpoints"][-1] == f"step_{status['step']}"
    assert status["step"] == max(logged) and not status["finished"]

    result = cli("resume", str(run))
    assert result.returncode == 0, result.stderr
    assert_identical(final_weights(run), expected)


def test_two_processes_then_one_keeps_global_batch(tmp_path, tone_corpus):
    config = tiny_config(tmp_path, tone_corpus, max_steps=4, checkpoint_every_steps=2)
    run = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "ecapa_accel.train", str(config), "--run-dir", str(run)]
    result = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    status = json.loads(cli("status", str(run), "--json").stdout)
    assert status["step"] == 4 and status["checkpoints"][-1] == "step_4"
    state = json.loads((run / "checkpoints" / "step_4" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["epoch"] * 24 + state["position"] == 4 * 4  # 24 samples per epoch

    result = cli("resume", str(run), "train.max_steps=6", "train.max_device_batch_size=2")  # 1 process x 2 micro-steps
    assert result.returncode == 0, result.stderr
    state = json.loads((run / "checkpoints" / "step_6" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["epoch"] * 24 + state["position"] == 6 * 4
    samples = [r["samples_per_step"] for r in records_of(run) if r["type"] == "train"]
    assert samples == [4] * 6  # the global batch of every optimizer step, before and after the change
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert (run / "export" / "model.safetensors").is_file()


def test_bf16_autocast_on_cpu_trains_without_nan(tmp_path, tone_corpus):
    """Also: a time-based checkpoint trigger (every ~6 ms: after every step) and pruning to the newest two."""
    config = tiny_config(tmp_path, tone_corpus, max_steps=3, mixed_precision="bf16", checkpoint_every_steps=0,
                         checkpoint_every_minutes=0.0001, keep_checkpoints=2)
    run = tmp_path / "bf16"
    result = cli("train", str(config), "--run-dir", str(run))
    assert result.returncode == 0, result.stderr
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert sorted(os.listdir(run / "checkpoints")) == ["step_2", "step_3"]


def test_bad_inputs_exit_2_and_leave_run_dir_alone(tmp_path, tone_corpus, cli_here):
    config = tiny_config(tmp_path, tone_corpus, max_steps=2)
    run = tmp_path / "run"

    assert_user_error(cli_here("train", str(config), "--run-dir", str(run), "train.bogus=1"), "train.bogus")
    assert_user_error(cli_here("train", str(config), "--run-dir", str(run), "train.batch_size=many"), "train.batch_size")
    assert_user_error(cli_here("train", str(tmp_path / "missing.yaml"), "--run-dir", str(run)), "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text().replace("channels: 16", "channels: 16\n  colour: red"))
    assert_user_error(cli_here("train", str(bad), "--run-dir", str(run)), "model.colour")
    assert_user_error(cli_here("train", str(config), "--run-dir", str(run), "train.batch_size=64"), "train.batch_size")
    assert not run.exists()

    assert cli_here("train", str(config), "--run-dir", str(run)).returncode == 0
    before = tree(run)
    assert_user_error(cli_here("resume", str(run), "model.channels=32"), "model.channels")
    assert_user_error(cli_here("resume", str(run), "train.seed=7"), "train.seed")
    assert_user_error(cli_here("train", str(config), "--run-dir", str(run), "train.batch_size=8"), "train.batch_size")
    assert_user_error(cli_here("resume", str(tmp_path / "nowhere")), "nowhere")
    assert tree(run) == before

    # Raising max_steps on a finished run continues it.
    result = cli_here("resume", str(run), "train.max_steps=3")
    assert result.returncode == 0, result.stderr
    assert json.loads(cli_here("status", str(run), "--json").stdout)["step"] == 3

    # Export any complete checkpoint; a missing step is refused.
    result = cli_here("export", str(run), str(tmp_path / "exported"), "--step", "2")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "exported" / "model.safetensors").is_file()
    assert_user_error(cli_here("export", str(run), str(tmp_path / "nope"), "--step", "99"), "step_99")
    assert not (tmp_path / "nope").exists()


def test_validation_during_training_is_logged_and_plotted(tmp_path, tone_corpus, cli_here):
    config = tiny_config(tmp_path, tone_corpus, max_steps=4)
    held_out = tone_corpus("held", speakers=2, utterances=2, seconds=1.0, seed=5).parent
    trials = held_out / "trials.txt"
    trials.write_text("1 spk0/utt0.wav spk0/utt1.wav\n0 spk0/utt0.wav spk1/utt0.wav\n"
                      "1 spk1/utt0.wav spk1/utt1.wav\n0 spk1/utt1.wav spk0/utt1.wav\n")
    run = tmp_path / "validated"
    result = cli_here("train", str(config), "--run-dir", str(run), f"eval.trials={trials}", "eval.every_steps=2",
                 "eval.keep_best=true")
    assert result.returncode == 0, result.stderr
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    for record in evals:
        assert 0 <= record["eer"] <= 100 and len((run / record["scores"]).read_text().splitlines()) == 4
    assert (run / "export" / "model.safetensors").is_file()

    result = cli_here("plot", str(run))
    assert result.returncode == 0, result.stderr
    assert {"loss_accuracy.png", "validation_eer.png", "det.png"} <= {p.name for p in (run / "plots").iterdir()}
