"""`ecapa-accel average`: the export is the element-wise mean of the chosen checkpoints; bad choices exit 2."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import write_tone_corpus
from ecapa_accel.cli import main
from ecapa_accel.encoder import EcapaEncoder

pytestmark = pytest.mark.slow  # trains a run through the CLI


@pytest.fixture
def average(capsys):
    """`ecapa-accel average ARGS...` in this process -> (exit code, stdout, stderr)."""

    def call(*args):
        with pytest.raises(SystemExit) as exit_info:
            main(["average", *map(str, args)])
        out, err = capsys.readouterr()
        return exit_info.value.code, out, err

    return call


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 4-step run of a tiny model with a checkpoint after every step."""
    root = tmp_path_factory.mktemp("average")
    corpus = write_tone_corpus(root, "alpha", speakers=3, utterances=4, seconds=1.0)
    config = {
        "data": {"datasets": [{"name": "alpha", "csv": str(corpus)}], "crop_seconds": 0.5, "num_workers": 0},
        "features": {"n_mels": 24},
        "model": {"channels": 16, "embed_dim": 8},
        "optim": {"lr": 0.05, "warmup_epochs": 0},
        "train": {"batch_size": 4, "max_steps": 4, "epochs": 100, "checkpoint_every_steps": 1,
                  "checkpoint_every_minutes": 0, "keep_checkpoints": 4},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "ecapa_accel.cli", "train", str(root / "config.yaml"),
                             "--run-dir", str(root / "run")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return root / "run"


def checkpoint_embedding(run_dir, step) -> dict[str, torch.Tensor]:
    weights = load_file(str(run_dir / "checkpoints" / f"step_{step}" / "model.safetensors"))
    return {key.removeprefix("embedding."): value for key, value in weights.items() if key.startswith("embedding.")}


def test_average_last_n_is_the_mean_of_those_checkpoints(run, average):
    code, out, err = average(run, "--last", 3)
    assert code == 0, err
    assert out.strip().splitlines() == [f"averaged 3 checkpoint(s) (steps 2, 3, 4) into {run / 'export_avg3'}"]

    exported = load_file(str(run / "export_avg3" / "model.safetensors"))
    chosen = [checkpoint_embedding(run, step) for step in (2, 3, 4)]
    assert exported.keys() == chosen[0].keys()
    running_stats = [key for key in exported if key.endswith(("running_mean", "running_var"))]
    assert running_stats and any(not torch.equal(chosen[0][k], chosen[2][k]) for k in running_stats)
    for key, value in exported.items():
        if key.endswith("num_batches_tracked"):
            assert torch.equal(value, chosen[-1][key])  # the newest checkpoint's count
        else:
            mean = torch.stack([weights[key].double() for weights in chosen]).mean(dim=0).float()
            torch.testing.assert_close(value, mean, rtol=1e-6, atol=1e-8)

    config = json.loads((run / "export_avg3" / "config.json").read_text())
    assert config["averaged_steps"] == [2, 3, 4]
    encoder = EcapaEncoder.from_pretrained(run / "export_avg3")
    assert encoder.averaged_steps == [2, 3, 4]
    assert not list(run.glob(".export_avg3*"))  # the temporary folder is gone


def test_average_steps_picks_those_and_skips_incomplete_checkpoints(run, average, tmp_path):
    # A checkpoint being written by a running job (no trainer state yet) is not complete: never averaged.
    half_written = run / "checkpoints" / "step_5"
    half_written.mkdir()
    shutil.copy(run / "checkpoints" / "step_4" / "model.safetensors", half_written)
    try:
        code, out, err = average(run, "--out", tmp_path / "all")
        assert code == 0, err
        assert "steps 1, 2, 3, 4" in out
        assert average(run, "--steps", 5)[0] == 2
    finally:
        shutil.rmtree(half_written)

    code, out, err = average(run, "--steps", "4,1", "--out", tmp_path / "picked")
    assert code == 0, err
    assert "steps 1, 4" in out
    exported = load_file(str(tmp_path / "picked" / "model.safetensors"))
    first, last = checkpoint_embedding(run, 1), checkpoint_embedding(run, 4)
    key = "stem.conv.weight"
    torch.testing.assert_close(exported[key], (first[key].double() + last[key].double()).div(2).float(),
                               rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--last", 9], "--last 9: .* has only 4 complete checkpoint"),
        (["--steps", "2,7"], "no checkpoint step_7"),
        (["--steps", "2,two"], "--steps: expected comma-separated step numbers"),
        (["--last", 2, "--steps", "3,4"], "not both"),
    ],
)
def test_bad_choices_exit_2_naming_them_and_write_nothing(run, average, tmp_path, args, message):
    code, out, err = average(run, *args, "--out", tmp_path / "out")
    assert code == 2 and out == ""
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_a_run_without_checkpoints_exits_2(run, average, tmp_path):
    empty = tmp_path / "fresh"
    empty.mkdir()
    shutil.copy(run / "config.yaml", empty)
    code, _, err = average(empty)
    assert code == 2
    assert "no complete checkpoint to average" in err
    assert sorted(p.name for p in empty.iterdir()) == ["config.yaml"]
