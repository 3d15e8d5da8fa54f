"""Starting a run from existing weights (`model.init_from`): export folders, run directories, peer checkpoints.

Fast tests go through the library API and the CLI's refusals (which stop before anything is written); the
slow ones train through the CLI: stage 1, then stage 2 from its run directory or its averaged export.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import cli, write_tone_corpus
from safetensors.torch import load_file
from test_convert import random_state, speechbrain_layout, wespeaker_layout

from ecapa_accel import UserError, load_config
from ecapa_accel.cli import main
from ecapa_accel.config import FeaturesConfig
from ecapa_accel.convert import convert_checkpoint
from ecapa_accel.encoder import EcapaEncoder
from ecapa_accel.loss import AAMSoftmax
from ecapa_accel.model import EcapaTdnn, build_model
from ecapa_accel.pretrained import apply_init, record_init, resolve_init

PEER_FRONT_ENDS = {  # what each peer's own inference computes (see tests/test_convert.py)
    "3dspeaker": {},
    "speechbrain": {"kind": "speechbrain"},
    "wespeaker": {"window": "hamming", "waveform_scale": 32768.0},
}


def write_config(tmp_path: Path, tone_corpus, corpus: str = "tones", speakers: int = 3) -> Path:
    """A tiny run (24 mels, 16 channels, 4 steps) on one generated dataset named `corpus`."""
    manifest = tone_corpus(corpus, speakers=speakers, utterances=4, seconds=1.0)
    config = {
        "data": {"datasets": [{"name": corpus, "csv": str(manifest)}], "crop_seconds": 0.5, "num_workers": 0},
        "features": {"n_mels": 24},
        "model": {"channels": 16, "embed_dim": 16},
        "optim": {"lr": 0.05},
        "train": {"batch_size": 4, "max_steps": 4, "epochs": 100, "checkpoint_every_steps": 2,
                  "checkpoint_every_minutes": 0, "log_every_steps": 1},
    }
    path = tmp_path / f"{corpus}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def trained_looking_export(folder: Path, seed: int = 7, channels: int = 16, embed_dim: int = 16, n_mels: int = 24,
                           **features) -> Path:
    """An export folder of a randomly initialised model whose BatchNorm statistics have moved off their defaults."""
    torch.manual_seed(seed)
    model = EcapaTdnn(n_mels, channels, embed_dim).train()
    with torch.no_grad():
        model(torch.randn(4, 60, n_mels) * 3 + 1)
    return EcapaEncoder(model.eval(), FeaturesConfig(n_mels=n_mels, **features)).save_pretrained(folder)


def fresh_run_modules(cfg, num_classes: int = 3) -> tuple[EcapaTdnn, AAMSoftmax]:
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.features.n_mels), AAMSoftmax(cfg.model.embed_dim, num_classes)


def assert_same_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_export_folder_gives_the_run_its_weights_and_a_fresh_head(tmp_path, tone_corpus):
    source = trained_looking_export(tmp_path / "source")
    cfg = load_config(write_config(tmp_path, tone_corpus), [f"model.init_from={source}"])

    init = resolve_init(cfg)
    embedding, head = fresh_run_modules(cfg)
    fresh_head = head.weight.detach().clone()
    line = apply_init(init, embedding, head, {"tones/spk0": 0, "tones/spk1": 1, "tones/spk2": 2})

    expected = EcapaEncoder.from_pretrained(source).model
    assert_same_tensors(embedding.state_dict(), expected.state_dict())
    feats = torch.randn(2, 50, 24)
    with torch.no_grad():
        assert torch.equal(embedding.eval()(feats), expected(feats))
    assert torch.equal(head.weight, fresh_head)
    digest = sha256(source / "model.safetensors")
    assert line.startswith(f"initialised from {source} (sha256 {digest}, head: fresh")
    assert record_init(cfg, init, tmp_path / "no_run" / "config.yaml").model.init_from_sha256 == digest
    assert cfg.model.init_from_sha256 is None  # the caller's config is left as it was


def test_no_init_from_means_no_source(tmp_path, tone_corpus):
    cfg = load_config(write_config(tmp_path, tone_corpus))
    assert resolve_init(cfg) is None
    assert record_init(cfg, None, tmp_path / "config.yaml") is cfg


@pytest.mark.parametrize(
    ("peer", "layout", "variant", "given_format"),
    [
        ("3dspeaker", speechbrain_layout, "3dspeaker", "3dspeaker"),
        ("speechbrain", speechbrain_layout, "3dspeaker", "speechbrain"),
        ("wespeaker", wespeaker_layout, "wespeaker", None),  # told from its key names
    ],
)
def test_peer_checkpoint_starts_the_run_as_convert_converts_it(tmp_path, tone_corpus, peer, layout, variant,
                                                               given_format):
    state = random_state(layout(n_mels=24, channels=16, embed_dim=16), seed=3)
    if peer == "wespeaker":  # as WeSpeaker saves a DDP model: wrapped, module.-prefixed, with its ArcMargin head
        state = {"model": {f"module.{key}": value for key, value in state.items()}}
    checkpoint = tmp_path / f"{peer}.pt"
    torch.save(state, checkpoint)
    overrides = [f"model.init_from={checkpoint}", f"model.variant={variant}"]
    overrides += [f"features.{key}={value}" for key, value in PEER_FRONT_ENDS[peer].items()]
    if given_format:
        overrides.append(f"model.init_from_format={given_format}")
    cfg = load_config(write_config(tmp_path, tone_corpus), overrides)

    init = resolve_init(cfg)
    embedding, head = fresh_run_modules(cfg)
    line = apply_init(init, embedding, head, {"tones/spk0": 0, "tones/spk1": 1, "tones/spk2": 2})

    convert_checkpoint(peer, checkpoint, tmp_path / "converted")
    assert_same_tensors(embedding.state_dict(), EcapaEncoder.from_pretrained(tmp_path / "converted").model.state_dict())
    assert f"(sha256 {sha256(checkpoint)}, head: fresh" in line


def test_shared_layout_needs_its_format_and_the_front_end_must_be_the_peers(tmp_path, tone_corpus):
    checkpoint = tmp_path / "embedding_model.ckpt"
    torch.save(random_state(speechbrain_layout(n_mels=24, channels=16, embed_dim=16)), checkpoint)
    config = write_config(tmp_path, tone_corpus)

    with pytest.raises(UserError, match="model.init_from_format") as error:
        resolve_init(load_config(config, [f"model.init_from={checkpoint}"]))
    assert "3dspeaker and speechbrain" in str(error.value)

    with pytest.raises(UserError, match="features.kind") as error:  # SpeechBrain's Fbank, a Kaldi run
        resolve_init(load_config(config, [f"model.init_from={checkpoint}", "model.init_from_format=speechbrain"]))
    assert "'kaldi'" in str(error.value) and "'speechbrain'" in str(error.value)

    wespeaker = tmp_path / "avg_model.pt"
    torch.save(random_state(wespeaker_layout(n_mels=24, channels=16, embed_dim=16)), wespeaker)
    with pytest.raises(UserError, match="features.window") as error:  # WeSpeaker's Hamming window, a povey run
        resolve_init(load_config(config, [f"model.init_from={wespeaker}", "model.variant=wespeaker"]))
    assert "'povey'" in str(error.value) and "'hamming'" in str(error.value)

    # dither only perturbs training input: a source without it fits a run with it
    source = trained_looking_export(tmp_path / "export")
    assert resolve_init(load_config(config, [f"model.init_from={source}", "features.dither=1.0"])) is not None



@pytest.mark.parametrize(
    ("peer", "layout", "overrides", "named"),
    [
        ("wespeaker", wespeaker_layout(n_mels=24, channels=16, embed_dim=16),
         ["features.window=hamming", "features.waveform_scale=32768"], "model.variant"),
        ("3dspeaker", speechbrain_layout(n_mels=24, channels=32, embed_dim=16), [], "model.channels"),
        ("3dspeaker", speechbrain_layout(n_mels=24, channels=16, embed_dim=32), [], "model.embed_dim"),
    ],
    ids=["variant", "channels", "embed_dim"],
)
def test_a_peer_checkpoint_of_another_model_is_refused_naming_the_key(tmp_path, tone_corpus, peer, layout, overrides,
                                                                      named):
    checkpoint = tmp_path / "peer.pt"
    torch.save(random_state(layout), checkpoint)
    cfg = load_config(write_config(tmp_path, tone_corpus),
                      [f"model.init_from={checkpoint}", f"model.init_from_format={peer}", *overrides])
    with pytest.raises(UserError, match=named):
        resolve_init(cfg)

def train_command(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *map(str, args)])
    return exit_info.value.code


@pytest.mark.parametrize(
    ("source", "overrides", "named"),
    [
        ({"channels": 32}, [], ["model.channels", "(32, 24, 5)", "(16, 24, 5)"]),
        ({"embed_dim": 8}, [], ["model.embed_dim", "(8, 96)", "(16, 96)"]),
        ({"n_mels": 32}, [], ["features.n_mels", "32", "24"]),
        ({"window": "hamming"}, [], ["features.window", "'hamming'", "'povey'"]),
        ({}, ["model.variant=wespeaker"], ["model.variant", "'wespeaker'", "'3dspeaker'"]),
        ({}, ["model.init_from_sha256=" + "ab" * 32], ["model.init_from_sha256", "ab" * 32]),
        ({}, ["model.init_from_format=wespeaker"], ["model.init_from_format", "folder"]),
        (None, [], ["model.init_from", "missing_export", "not found"]),
    ],
    ids=["channels", "embed_dim", "n_mels", "window", "variant", "pinned_sha", "format_for_folder", "missing"],
)
def test_a_source_that_does_not_fit_exits_2_naming_the_key_and_writes_nothing(tmp_path, tone_corpus, capsys, source,
                                                                             overrides, named):
    if source is None:
        folder = tmp_path / "missing_export"
    else:
        features = {key: value for key, value in source.items() if key == "window"}
        shapes = {key: value for key, value in source.items() if key != "window"}
        folder = trained_looking_export(tmp_path / "export", **shapes, **features)
    run = tmp_path / "run"
    status = train_command(write_config(tmp_path, tone_corpus), "--run-dir", run, f"model.init_from={folder}",
                           *overrides)
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for word in named:
        assert word in err, err
    assert not run.exists()


def run_ok(*args) -> subprocess.CompletedProcess:
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    return result


def checkpoint_weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step}" / "model.safetensors"))


def assert_parameters_close(embedding: dict[str, torch.Tensor], source: dict[str, torch.Tensor]) -> None:
    """Trainable tensors within a step of a 1e-9 learning rate (BatchNorm statistics move in any training step)."""
    for key, value in source.items():
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            torch.testing.assert_close(embedding[f"embedding.{key}"], value, rtol=0, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def stage_one(tmp_path_factory) -> tuple[Path, Path]:
    """(config, run directory) of a finished 4-step stage 1 with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("stage_one")
    config = write_config(root, lambda name, **kwargs: write_tone_corpus(root, name, **kwargs))
    run_ok("train", config, "--run-dir", root / "stage1")
    return config, root / "stage1"


@pytest.mark.slow
def test_stage_two_from_a_run_dir_loads_head_and_resumes_without_the_source(tmp_path, stage_one):
    config, shared = stage_one
    stage1 = tmp_path / "stage1"
    shutil.copytree(shared, stage1)  # this test moves it away
    stage1_export = load_file(str(stage1 / "export" / "model.safetensors"))
    stage1_head = checkpoint_weights(stage1, 4)["head.weight"]
    digest = sha256(stage1 / "export" / "model.safetensors")

    # Stage 2 on the same data: the label map matches, so the head comes along. A 1e-9 LR keeps step 1 at the source.
    stage2 = tmp_path / "stage2"
    tiny_lr = ["optim.lr=1e-9", "optim.min_lr=0", "train.max_steps=2", "train.checkpoint_every_steps=1"]
    result = run_ok("train", config, "--run-dir", stage2, f"model.init_from={stage1}", *tiny_lr)
    assert f"initialised from {stage1} (sha256 {digest}, head: loaded from {stage1}/checkpoints/step_4)" in result.stderr
    step1 = checkpoint_weights(stage2, 1)
    assert_parameters_close(step1, stage1_export)
    torch.testing.assert_close(step1["head.weight"], stage1_head, rtol=0, atol=1e-6)
    recorded = yaml.safe_load((stage2 / "config.yaml").read_text())["model"]
    assert (recorded["init_from"], recorded["init_from_sha256"]) == (str(stage1), digest)

    # The source is read only at step 0: without it, stage 2 resumes from its own checkpoints.
    stage1.rename(tmp_path / "stage1_moved")
    result = run_ok("resume", stage2, "train.max_steps=3")
    assert "initialised from" not in result.stderr
    result = run_ok("train", config, "--run-dir", stage2, f"model.init_from={stage1}", *tiny_lr[:2],
                    "train.max_steps=4", "train.checkpoint_every_steps=1")
    assert json.loads(run_ok("status", stage2, "--json").stdout)["step"] == 4
    assert yaml.safe_load((stage2 / "config.yaml").read_text())["model"]["init_from_sha256"] == digest
    # ...while another source is a different run
    result = cli("resume", stage2, f"model.init_from={tmp_path / 'stage1_moved'}")
    assert result.returncode == 2 and "model.init_from" in result.stderr


@pytest.mark.slow
def test_two_stage_recipe_through_the_cli_from_an_averaged_export(tmp_path, tone_corpus, stage_one):
    """Stage 1, `average --last 2`, then large-margin fine-tuning from the averaged export (as the recipes do)."""
    config, stage1 = stage_one
    run_ok("average", stage1, "--last", "2")
    averaged = stage1 / "export_avg2"
    average = load_file(str(averaged / "model.safetensors"))

    large_margin = ["data.crop_seconds=0.9", "loss.margin=0.5", "loss.margin_ramp_end_epoch=0", "optim.lr=1e-9",
                    "optim.min_lr=0", "train.max_steps=1"]
    stage2 = tmp_path / "stage2"
    result = run_ok("train", config, "--run-dir", stage2, f"model.init_from={averaged}", *large_margin)
    assert f"head: loaded from {stage1}/checkpoints/step_4" in result.stderr
    assert_parameters_close(checkpoint_weights(stage2, 1), average)
    margins = [json.loads(line)["margin"] for line in (stage2 / "metrics.jsonl").read_text().splitlines()
               if json.loads(line)["type"] == "train"]
    assert margins == [0.5]

    # Other speakers: another label map, so the head starts fresh (and has another shape).
    other = write_config(tmp_path, tone_corpus, corpus="others", speakers=2)
    result = run_ok("train", other, "--run-dir", tmp_path / "other_run", f"model.init_from={averaged}", *large_margin)
    assert "head: fresh" in result.stderr and "label map" in result.stderr
    assert checkpoint_weights(tmp_path / "other_run", 1)["head.weight"].shape == (2, 16)


@pytest.mark.parametrize("corpus", ["voxceleb", "multi"])
def test_large_margin_recipe_is_stage_one_with_wespeakers_lm_settings(corpus):
    recipes = Path(__file__).resolve().parents[1] / "recipes" / corpus
    stage1, stage2 = load_config(recipes / "ecapa_c1024.yaml"), load_config(recipes / "ecapa_c1024_lm.yaml")
    # the label map's inputs are stage 1's, so the head carries over; the network and its front end too
    assert (stage2.data.datasets, stage2.data.speed_factors, stage2.data.speed_as_classes) == (
        stage1.data.datasets, stage1.data.speed_factors, stage1.data.speed_as_classes)
    assert (stage2.features, stage2.data.augment, stage2.eval) == (stage1.features, stage1.data.augment, stage1.eval)
    assert [getattr(stage2.model, key) for key in ("variant", "channels", "embed_dim")] == [
        getattr(stage1.model, key) for key in ("variant", "channels", "embed_dim")]
    # WeSpeaker's ecapa_tdnn_lm.yaml: 600 frames, margin 0.5 fixed, SGD 1e-4 -> 2.5e-5
    assert stage2.data.crop_seconds == 6.0
    assert (stage2.loss.margin, stage2.loss.margin_ramp_start_epoch, stage2.loss.margin_ramp_end_epoch) == (0.5, 0, 0)
    assert (stage2.optim.name, stage2.optim.lr, stage2.optim.min_lr) == ("sgd", 1e-4, 2.5e-5)
    # it starts from stage 1's averaged export, which the README's commands write first
    run = {"voxceleb": "runs/vox2_c1024", "multi": "runs/multi_c1024"}[corpus]
    assert Path(stage2.model.init_from) == recipes.parents[1] / run / "export_avg10"
    readme = (recipes / "README.md").read_text()
    assert f"ecapa-accel average {run} --last 10" in readme and f"model.init_from={run}/export_avg10" in readme
