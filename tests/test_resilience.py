"""Nothing a user does corrupts a run: damaged checkpoints, a full disk, changed manifests, changed accumulation,
non-finite values, LR continuity across resumes, and what `train()` leaves behind in the calling process."""

from __future__ import annotations

import errno
import json
import shutil
import signal

import numpy as np
import pytest
import soundfile
import torch
import yaml
from safetensors.torch import load_file
from conftest import STEPS, assert_identical, assert_user_error, cli, records_of, run_cli, tiny_config, write_tone_corpus

import ecapa_accel as ea
from ecapa_accel.checkpoint import run_status

pytestmark = pytest.mark.slow  # trains through the CLI or the API: the slow tier


def weights(run, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step}" / "model.safetensors"))


# ---- damaged checkpoints


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _scramble(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    path.write_bytes(bytes(data))


DAMAGE = {
    "model.safetensors": _truncate,
    "optimizer.bin": lambda path: path.unlink(),
    "scheduler.bin": _scramble,
    "random_states_0.pkl": lambda path: path.write_bytes(b"garbage"),
    "trainer_state.json": lambda path: path.write_text("{not json"),
    "trainer_state.json ": lambda path: path.write_text(  # mistyped field (trailing space: a second case)
        json.dumps({**json.loads(path.read_text()), "step": "9"})),
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 10-step run keeping checkpoints 3, 6, 9 and 10."""
    root = tmp_path_factory.mktemp("finished")
    config = tiny_config(root, lambda name, **kw: write_tone_corpus(root, name, **kw), keep_checkpoints=10)
    run = root / "run"
    result = cli("train", str(config), "--run-dir", str(run))
    assert result.returncode == 0, result.stderr
    return run


def test_each_damaged_file_of_the_newest_checkpoint_falls_back_to_the_previous(tmp_path, finished_run):
    expected = weights(finished_run, STEPS)
    for number, (name, spoil) in enumerate(DAMAGE.items()):
        run = tmp_path / f"case{number}"
        shutil.copytree(finished_run, run)
        shutil.rmtree(run / "checkpoints" / f"step_{STEPS}")
        shutil.rmtree(run / "export")
        spoil(run / "checkpoints" / "step_9" / name.strip())
        status = run_status(run)
        assert status["step"] == 6 and "step_9" not in status["checkpoints"], status
        assert len(status["damaged"]) == 1 and name.strip() in status["damaged"][0], status["damaged"]
        if number < 3:  # resuming is the same code path for every case; three keep the test short
            result = cli("resume", str(run))
            assert result.returncode == 0, result.stderr
            notices = [line for line in result.stderr.splitlines() if "damaged checkpoint" in line]
            assert len(notices) == 1 and "step_9" in notices[0] and name.strip() in notices[0], result.stderr
            assert_identical(weights(run, STEPS), expected)


def test_only_a_trainer_state_or_no_intact_checkpoint(tmp_path, finished_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    checkpoints = run / "checkpoints"
    for folder in sorted(checkpoints.iterdir()):
        if folder.name != "step_3":
            shutil.rmtree(folder)
    (checkpoints / "step_7").mkdir()
    shutil.copy(checkpoints / "step_3" / "trainer_state.json", checkpoints / "step_7")
    assert run_status(run)["step"] == 3
    code, _, err = run_cli(capsys, "resume", str(run), "--step", "7")
    assert code == 2 and "step_7" in err and "missing" in err, err
    (checkpoints / "step_3" / "optimizer.bin").unlink()
    code, _, err = run_cli(capsys, "status", str(run))
    assert code == 2 and "no intact checkpoint" in err and len(err.strip().splitlines()) == 1, err


# ---- a full disk


def test_disk_full_during_a_save_is_one_line_and_the_run_resumes(tmp_path, tone_corpus, capsys, monkeypatch):
    from accelerate import Accelerator

    config = tiny_config(tmp_path, tone_corpus, max_steps=6)
    run = tmp_path / "run"
    real_save = Accelerator.save_state
    calls = []

    def save_until_full(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_until_full)
    code, _, err = run_cli(capsys, "train", str(config), "--run-dir", str(run))
    lines = [line for line in err.strip().splitlines() if line.startswith("error")]
    assert code == 2 and len(lines) == 1 and "No space left on device" in lines[0] and "step_6" in lines[0], err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_3"]  # no partial folder left

    monkeypatch.setattr(Accelerator, "save_state", real_save)  # space freed
    assert cli("resume", str(run)).returncode == 0
    assert run_status(run)["finished"] and run_status(run)["export"]


# ---- inputs changed under a run


def test_a_changed_or_shrunk_manifest_is_refused_on_resume(tmp_path, tone_corpus, cli_here):
    config = tiny_config(tmp_path, tone_corpus, max_steps=3)
    run = tmp_path / "run"
    assert cli_here("train", str(config), "--run-dir", str(run)).returncode == 0
    csv = tmp_path / "alpha" / "train.csv"
    original = csv.read_bytes()
    lines = original.decode().splitlines()
    csv.write_text("\n".join(lines[:-3]) + "\n")  # shrunk: same speakers, fewer rows
    before = sorted(p.name for p in run.rglob("*"))
    assert_user_error(cli_here("resume", str(run), "train.max_steps=20"), str(csv), "changed")
    assert sorted(p.name for p in run.rglob("*")) == before
    csv.write_bytes(original)  # restored: resumes
    assert cli_here("resume", str(run), "train.max_steps=5").returncode == 0


def test_requeued_without_a_checkpoint_says_it_starts_at_step_0(tmp_path, tone_corpus, cli_here):
    config = tiny_config(tmp_path, tone_corpus, max_steps=2)
    run = tmp_path / "run"
    assert cli_here("train", str(config), "--run-dir", str(run)).returncode == 0
    shutil.rmtree(run / "checkpoints")  # as if pre-empted before the first checkpoint
    result = cli_here("resume", str(run))
    assert result.returncode == 0, result.stderr
    line = [line for line in result.stderr.splitlines() if "no complete checkpoint" in line]
    assert len(line) == 1 and "step 0" in line[0], result.stderr


# ---- accumulation changed on resume


def test_changed_accumulation_keeps_every_optimizer_step_a_full_batch(tmp_path, tone_corpus, cli_here):
    config = tiny_config(tmp_path, tone_corpus, max_steps=3)  # an odd step count: 3 micro-steps done so far
    run = tmp_path / "run"
    assert cli_here("train", str(config), "--run-dir", str(run)).returncode == 0
    result = cli_here("resume", str(run), "train.max_steps=7", "train.max_device_batch_size=2")
    assert result.returncode == 0, result.stderr
    train = [r for r in records_of(run) if r["type"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 8))
    assert [r["samples_per_step"] for r in train] == [4] * 7
    state = json.loads((run / "checkpoints" / "step_7" / "trainer_state.json").read_text())
    assert state["epoch"] * 24 + state["position"] == 7 * 4


# ---- non-finite values


def _add_loud_file(csv_path, value: float = 1e38):
    """A float WAV whose samples are finite but so large that the features overflow: the loss is NaN."""
    loud = csv_path.parent / "spk0" / "loud.wav"
    soundfile.write(loud, np.full(16000, value, dtype=np.float32), 16000, subtype="FLOAT")
    with open(csv_path, "a") as handle:
        handle.write("loud,spk0/loud.wav,spk0,1.000\n")
    return loud


def test_a_non_finite_step_is_skipped_and_never_reaches_the_weights(tmp_path, tone_corpus, cli_here):
    config = tiny_config(tmp_path, tone_corpus)
    _add_loud_file(tmp_path / "alpha" / "train.csv")
    run = tmp_path / "run"
    result = cli_here("train", str(config), "--run-dir", str(run))
    assert result.returncode == 0, result.stderr
    train = [r for r in records_of(run) if r["type"] == "train"]
    assert train[-1]["skipped_steps"] >= 1
    for tensor in load_file(str(run / "export" / "model.safetensors")).values():
        assert torch.isfinite(tensor).all()

    failing = tmp_path / "failing"
    result = cli_here("train", str(config), "--run-dir", str(failing), "train.max_nonfinite_steps=0")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]  # after the progress bar
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in ("non-finite", "loud.wav", "train.max_nonfinite_steps"):
        assert word in errors[0]


# ---- continuing without LR jumps


def test_raising_max_steps_continues_exactly_and_raising_epochs_never_jumps(tmp_path, tone_corpus, cli_here):
    config = tiny_config(tmp_path, tone_corpus, max_steps=None, epochs=2, checkpoint_every_steps=0)
    reference = tmp_path / "reference"
    assert cli_here("train", str(config), "--run-dir", str(reference), "train.max_steps=8").returncode == 0
    stopped = tmp_path / "stopped"
    assert cli_here("train", str(config), "--run-dir", str(stopped), "train.max_steps=4").returncode == 0
    assert cli_here("resume", str(stopped), "train.max_steps=8").returncode == 0
    assert_identical(weights(stopped, 8), weights(reference, 8))  # max_steps only says where the run stops

    finished = tmp_path / "finished"  # 2 epochs of 6 steps: the cosine ends at step 12
    assert cli_here("train", str(config), "--run-dir", str(finished)).returncode == 0
    result = cli_here("resume", str(finished), "train.epochs=4")
    assert result.returncode == 0, result.stderr
    assert sum("without a jump" in line for line in result.stderr.splitlines()) == 1, result.stderr
    records = records_of(finished)
    lr = {r["step"]: r["lr"] for r in records if r["type"] == "train"}
    assert [r["step"] for r in records if r["type"] == "schedule"] == [12]
    assert lr[13] <= lr[12] * 1.0001 and lr[24] <= lr[13]  # continuous, then decaying
    steps = sorted(lr)
    jumps = [lr[b] / lr[a] for a, b in zip(steps, steps[1:]) if a >= 3]  # after the 3-step warmup
    assert max(jumps) <= 1.0001, jumps


# ---- the library leaves the caller's process as it was


def test_train_raises_preempted_and_restores_signal_handlers(tmp_path, tone_corpus, monkeypatch):
    import ecapa_accel.trainer as trainer

    config = ea.load_config(tiny_config(tmp_path, tone_corpus, max_steps=50))
    real_agree, steps, seen = trainer._agree, [], []

    def sigterm_during_step_2(*args):
        steps.append(1)
        if len(steps) == 2:
            signal.raise_signal(signal.SIGTERM)  # reaches the trainer's handler, not the caller's
        return real_agree(*args)

    monkeypatch.setattr(trainer, "_agree", sigterm_during_step_2)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        caller_handler = signal.getsignal(signal.SIGTERM)
        with pytest.raises(ea.Preempted) as stopped:
            ea.train(config, tmp_path / "run")
        assert stopped.value.exit_code == 143 and stopped.value.step == 2
        assert signal.getsignal(signal.SIGTERM) is caller_handler and not seen
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert run_status(tmp_path / "run")["checkpoints"][-1] == "step_2"


def test_config_yaml_rewrite_is_atomic(tmp_path, tone_corpus, cli_here):
    config = tiny_config(tmp_path, tone_corpus, max_steps=2)
    run = tmp_path / "run"
    assert cli_here("train", str(config), "--run-dir", str(run)).returncode == 0
    assert cli_here("resume", str(run), "train.max_steps=3").returncode == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 3
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]  # no temporary left beside it


# ---- keep_best


def test_keep_best_exports_the_best_step_and_a_damaged_best_export_is_rewritten(tmp_path, tone_corpus, monkeypatch):
    import ecapa_accel.evaluate as evaluate

    held_out = tone_corpus("held", speakers=2, utterances=2, seconds=1.0, seed=5).parent
    trials = held_out / "trials.txt"
    trials.write_text("1 spk0/utt0.wav spk0/utt1.wav\n0 spk0/utt0.wav spk1/utt0.wav\n")
    config = ea.load_config(tiny_config(tmp_path, tone_corpus, max_steps=4, checkpoint_every_steps=1,
                                        keep_checkpoints=10),
                            [f"eval.trials={trials}", "eval.every_steps=1", "eval.keep_best=true"])
    eers = iter([30.0, 10.0, 20.0, 40.0])  # the best validation is step 2, not the last
    monkeypatch.setattr(evaluate, "validate", lambda encoder, cfg, scores=None: {
        "eer": next(eers), "min_dcf": 0.5, "threshold": 0.0, "trials": 2})
    run = tmp_path / "run"
    ea.train(config, run)
    exported = load_file(str(run / "export" / "model.safetensors"))
    best = {k.removeprefix("embedding."): v for k, v in weights(run, 2).items() if k.startswith("embedding.")}
    last = {k.removeprefix("embedding."): v for k, v in weights(run, 4).items() if k.startswith("embedding.")}
    assert_identical(exported, best)
    assert any(not torch.equal(exported[k], last[k]) for k in exported)
    assert json.loads((run / "export" / "training_step.json").read_text())["step"] == 2
    assert json.loads((run / "export" / "config.json").read_text())["threshold"] == 0.0  # verify can decide

    # An export torn after the fact (as in-place writers leave them) is not "the best export" any more:
    # continuing the finished run without validation rewrites it from the final weights.
    weights_file = run / "export" / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:100])
    result = cli("resume", str(run), "eval.trials=null")
    assert result.returncode == 0, result.stderr
    assert_identical(load_file(str(weights_file)), last)
