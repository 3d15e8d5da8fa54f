"""Starting a run from existing weights (`model.init_from`): export folders, run directories, peer checkpoints.

Fast tests go through the library API and the CLI's refusals (which stop before anything is written); the
slow ones train through the CLI: stage 1, then stage 2 from its run directory or its averaged export.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import yaml
from test_convert import random_state, speechbrain_layout, wespeaker_layout

from ecapa_accel import UserError, load_config
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
