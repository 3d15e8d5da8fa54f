"""Every recipe config loads (no data needed) and says what its README says."""

from __future__ import annotations

from pathlib import Path

import pytest

from ecapa_accel import load_config

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").glob("**/*.yaml"))
READMES = {path.parent.name: (path.parent / "README.md").read_text(encoding="utf-8") for path in RECIPES}


def recipe(name: str) -> Path:
    return REPO / "recipes" / name / "ecapa_c1024.yaml"


def test_every_recipe_folder_has_a_config_and_a_readme():
    assert {path.parent.name for path in RECIPES} == {"voxceleb", "cnceleb", "multi"}
    assert all((path.parent / "README.md").is_file() for path in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_recipe_loads_and_names_only_files_its_readme_creates(path):
    cfg = load_config(path, ["train.max_steps=100"])
    assert cfg.train.max_steps == 100
    named = [dataset.csv for dataset in cfg.data.datasets]
    named += [cfg.data.augment.noise_csv, cfg.data.augment.rir_csv, cfg.eval.trials, cfg.eval.audio_root]
    prepared = "\n".join(READMES.values()) if path.parent.name == "multi" else READMES[path.parent.name]
    for file in named:
        relative = Path(file).relative_to(REPO).as_posix()
        assert relative.startswith("data/") and relative in prepared, relative


def test_voxceleb_recipe_has_the_3dspeaker_settings_its_readme_lists():
    cfg = load_config(recipe("voxceleb"))
    readme = READMES["voxceleb"]
    claims = [
        (cfg.model.variant, "3dspeaker", "`variant: 3dspeaker`"),
        ((cfg.model.channels, cfg.model.embed_dim, cfg.features.n_mels), (1024, 192, 80), "C=1024, 192-d, 80 mels"),
        ((cfg.features.kind, cfg.features.window, cfg.features.dither, cfg.features.mean_norm),
         ("kaldi", "povey", 0.0, True), "povey window, per-utterance mean normalisation, no dither"),
        (cfg.data.crop_seconds, 3.0, "| crops | 3.0 s |"),
        (cfg.train.batch_size, 256, "| batch | 256 global"),
        ((cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.nesterov, cfg.optim.weight_decay),
         ("sgd", 0.2, 0.9, True, 1e-4), "SGD lr 0.2, momentum 0.9, Nesterov, weight decay 1e-4"),
        ((cfg.optim.warmup_epochs, cfg.optim.schedule, cfg.optim.min_lr, cfg.train.epochs),
         (5.0, "cosine", 5e-5, 70), "5 warmup epochs, then cosine to 5e-5 at epoch 70"),
        ((cfg.loss.scale, cfg.loss.margin, cfg.loss.margin_ramp_start_epoch, cfg.loss.margin_ramp_end_epoch),
         (32.0, 0.3, 20.0, 50.0), "scale 32; margin 0 until epoch 20, linear ramp to 0.3 at epoch 50"),
        ((cfg.data.speed_factors, cfg.data.speed_as_classes), ([0.9, 1.0, 1.1], True),
         "0.9 / 1.0 / 1.1, each speed a new class"),
        ((cfg.data.augment.prob, cfg.data.augment.snr_db), (0.8, {"noise": [0.0, 15.0]}),
         "p 0.8: MUSAN noise (SNR 0-15 dB)"),
        ((cfg.data.augment.noise_prob, cfg.data.augment.reverb_prob), (0.667, 0.667), "independently with p 0.667"),
        (cfg.train.mixed_precision, "fp16", "| precision | fp16"),
    ]
    for value, expected, text in claims:
        assert value == expected, text
        assert text in readme, text
    assert Path(cfg.eval.trials).name == "veri_test2.txt" and "Vox1-O" in readme
    for published in ("| 0.86 | 0.97 | 1.90 |", "0.856"):
        assert published in readme


def test_cnceleb_and_multi_recipes_train_the_same_model_with_the_same_recipe():
    reference = load_config(recipe("voxceleb"))
    for name in ("cnceleb", "multi"):
        cfg = load_config(recipe(name))
        assert (cfg.model, cfg.features, cfg.train.batch_size, cfg.data.speed_factors) == (
            reference.model, reference.features, reference.train.batch_size, reference.data.speed_factors)
        assert (cfg.optim.lr, cfg.optim.min_lr, cfg.loss.scale, cfg.loss.margin) == (0.2, 5e-5, 32.0, 0.3)
        assert cfg.data.augment == reference.data.augment


def test_multi_recipe_mixes_four_lists_and_its_schedule_covers_the_voxceleb_samples():
    vox, multi = load_config(recipe("voxceleb")), load_config(recipe("multi"))
    weights = {dataset.name: dataset.weight for dataset in multi.data.datasets}
    assert set(weights) == {"vox2", "cnceleb1", "cnceleb2", "inhouse"} and sum(weights.values()) == pytest.approx(1.0)
    assert multi.data.datasets[-1].namespace == "inhouse" and "namespace: inhouse" in READMES["multi"]
    # An epoch of the mix is rows(vox2) / 0.5 draws, twice a VoxCeleb2 epoch: half the epochs, same samples.
    epoch_ratio = 1.0 / weights["vox2"]
    assert multi.train.epochs * epoch_ratio == vox.train.epochs
    assert multi.optim.warmup_epochs * epoch_ratio == vox.optim.warmup_epochs
    assert (multi.loss.margin_ramp_start_epoch * epoch_ratio, multi.loss.margin_ramp_end_epoch * epoch_ratio) == (
        vox.loss.margin_ramp_start_epoch, vox.loss.margin_ramp_end_epoch)


def test_cnceleb_recipe_trains_on_development_speakers_only():
    cfg = load_config(recipe("cnceleb"))
    assert [Path(d.csv).name for d in cfg.data.datasets] == ["cnceleb1_dev.csv", "cnceleb2.csv"]
    assert "dev/dev.lst" in READMES["cnceleb"] and "8.01" in READMES["cnceleb"]
