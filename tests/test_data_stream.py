"""The mixed training stream: proportions, determinism, resume at an offset, re-sharding, bad files, augmentation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import yaml

from ecapa_accel.cli import main
from ecapa_accel.config import config_from_dict
from ecapa_accel.data import build_training_data
from ecapa_accel.errors import UserError


def make_config(datasets: list[dict], **data) -> object:
    return config_from_dict({"data": {"datasets": datasets, "crop_seconds": 0.25, "num_workers": 0, **data},
                             "train": {"seed": 7}}, "test")


def two_datasets(tone_corpus) -> list[dict]:
    return [
        {"name": "alpha", "csv": str(tone_corpus("alpha", speakers=3, utterances=4, seconds=1.0)), "weight": 0.6},
        {"name": "beta", "csv": str(tone_corpus("beta", speakers=2, utterances=5, seconds=0.2, seed=1)),
         "weight": 0.4},
    ]


def write_list(folder: Path, waves: dict[str, np.ndarray], category: bool = False) -> Path:
    """A noise or RIR list (ID,dur,path[,category]) with its wav files."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, wave in waves.items():
        soundfile.write(folder / f"{name}.wav", wave.astype(np.float32), 16000, subtype="FLOAT")
        rows.append([name, f"{len(wave) / 16000:.3f}", f"{name}.wav"] + (["noise"] if category else []))
    path = folder / "list.csv"
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows([["ID", "dur", "path"] + (["category"] if category else []), *rows])
    return path


def augmented(tmp_path: Path, **augment) -> dict:
    """Augmentation settings with real noise and RIR lists."""
    rng = np.random.default_rng(3)
    noise = write_list(tmp_path / "noise", {f"n{i}": 0.1 * rng.standard_normal(8000) for i in range(3)}, True)
    decay = np.exp(-np.arange(1600) / 200.0) * rng.standard_normal(1600)
    rir = write_list(tmp_path / "rir", {"r0": decay, "r1": decay[::-1].copy()})
    return {"prob": 0.8, "noise_prob": 0.7, "reverb_prob": 0.5, "gain_db": [-3.0, 3.0],
            "noise_csv": str(noise), "rir_csv": str(rir), **augment}


def draw(data, epoch: int = 0, start: int = 0, micro_batch: int = 4, rank: int = 0, world: int = 1,
         workers: int = 0) -> list[dict]:
    return list(data.batches(epoch, start, micro_batch, rank, world, workers))


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


def test_realised_mix_matches_the_weights_over_10000_samples(tmp_path, tone_corpus, capsys):
    weights = {"big": 0.5, "mid": 0.3, "small": 0.2}
    datasets = []
    for i, (name, weight) in enumerate(weights.items()):
        manifest = tone_corpus(name, speakers=2, utterances=3, seconds=0.3, seed=i)
        header, *rows = manifest.read_text().splitlines()
        repeats = int(2000 * weight) // len(rows)  # 1000/600/400 rows: one epoch is 2000 samples
        listed = [f"{name}-{r}-{row}" for r in range(repeats) for row in rows]
        manifest.write_text("\n".join([header, *listed]) + "\n")
        datasets.append({"name": name, "csv": str(manifest), "weight": weight})
    config = tmp_path / "mix.yaml"
    config.write_text(yaml.safe_dump({"data": {"datasets": datasets, "crop_seconds": 0.025, "num_workers": 0},
                                      "train": {"batch_size": 500}}))
    with pytest.raises(SystemExit) as exit:
        main(["data", "inspect", str(config), "--batches", "20", "--json"])
    assert exit.value.code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["batches"] == 20 and report["samples"] == 10000
    assert report["speakers"] == 6 and report["samples_per_s"] > 0
    for name, weight in weights.items():
        assert abs(report["by_dataset"][name] / 10000 - weight) < 0.02, report


def test_epoch_length_follows_the_stopping_strategy(tone_corpus):
    datasets = two_datasets(tone_corpus)  # 12 rows at p=0.6, 10 rows at p=0.4
    assert build_training_data(make_config(datasets)).samples_per_epoch == 25  # all_exhausted: max(20, 25)
    first = build_training_data(make_config(datasets, stopping_strategy="first_exhausted"))
    assert first.samples_per_epoch == 20
    # Within an epoch no row repeats before its dataset is used up.
    rows = first.locate(0, range(first.samples_per_epoch))
    alpha = [row for dataset, row in rows if dataset == 0]
    assert len(set(alpha[:12])) == min(12, len(alpha))


def test_same_config_gives_bit_identical_batches_with_0_and_2_workers(tmp_path, tone_corpus):
    cfg = make_config(two_datasets(tone_corpus), speed_factors=[0.9, 1.0, 1.1], augment=augmented(tmp_path))
    serial = draw(build_training_data(cfg), micro_batch=5)
    parallel = draw(build_training_data(cfg), micro_batch=5, workers=2)
    assert len(serial) == 25 // 5
    assert_same(serial, parallel)
    assert serial[0]["waves"].dtype == torch.float32 and serial[0]["waves"].shape == (5, 4000)
    assert all(torch.isfinite(batch["waves"]).all() for batch in serial)
    other_epoch = draw(build_training_data(cfg), epoch=1, micro_batch=5)
    assert not torch.equal(serial[0]["waves"], other_epoch[0]["waves"])


def test_starting_at_an_offset_continues_the_uninterrupted_stream(tone_corpus):
    data = build_training_data(make_config(two_datasets(tone_corpus), augment={"prob": 0.5, "gain_db": [-6, 6]}))
    full = draw(data, micro_batch=3)
    assert [b["index"].tolist() for b in full[:2]] == [[0, 1, 2], [3, 4, 5]]
    assert len(full) == 25 // 3
    assert_same(draw(data, start=9, micro_batch=3), full[3:])
    assert_same(draw(data, start=9, micro_batch=3, workers=2), full[3:])


def test_two_processes_then_one_cover_every_sample_exactly_once(tone_corpus):
    data = build_training_data(make_config(two_datasets(tone_corpus), augment={"prob": 0.5, "gain_db": [-6, 6]}))
    reference = {int(i): w for b in draw(data, micro_batch=1) for i, w in zip(b["index"], b["waves"])}
    seen = []
    for rank in range(2):  # two processes, micro-batch 2: global batch 4, interrupted after 3 global batches
        seen += [b for b in draw(data, micro_batch=2, rank=rank, world=2)][:3]
    seen += draw(data, start=12, micro_batch=4)  # resumed on one process, same global batch
    positions = [int(i) for b in seen for i in b["index"]]
    assert sorted(positions) == list(range(24))  # 25 samples, the last incomplete global batch dropped
    for batch in seen:
        for position, wave in zip(batch["index"], batch["waves"]):
            assert torch.equal(wave, reference[int(position)])


def test_unreadable_file_is_replaced_deterministically_and_counted(tone_corpus):
    datasets = two_datasets(tone_corpus)
    broken = Path(datasets[0]["csv"]).parent / "spk1" / "utt2.wav"
    broken.write_bytes(b"RIFF\x00\x00not really audio" * 10)
    with pytest.raises(UserError, match="cannot be decoded .*alpha/train.csv row 7.*max_bad_fraction"):
        build_training_data(make_config(datasets, max_bad_fraction=0.02))  # 1 of 22 files
    data = build_training_data(make_config(datasets, max_bad_fraction=0.1))
    batches = draw(data, micro_batch=5)
    bad = torch.cat([b["bad"] for b in batches])
    uses = [located == (0, 6) for located in data.locate(0, range(25))]
    assert bad.tolist() == [int(used) for used in uses] and bad.sum() >= 1
    assert all(b["waves"].abs().amax(dim=1).gt(0).all() for b in batches)
    assert_same(batches, draw(data, micro_batch=5, workers=2))


def test_speed_perturbation_as_classes_changes_pitch_and_label(tmp_path):
    folder = tmp_path / "sine"
    (folder / "s").mkdir(parents=True)
    t = np.arange(32000) / 16000
    soundfile.write(folder / "s" / "a.wav", 0.5 * np.sin(2 * np.pi * 400 * t), 16000)
    (folder / "list.csv").write_text("path,spk\ns/a.wav,s\n")
    data = build_training_data(make_config([{"name": "sine", "csv": str(folder / "list.csv")}],
                                           speed_factors=[0.9, 1.0, 1.1], crop_seconds=1.0))
    assert data.label_map == {"sine/s": 0, "sine/s@speed0.9": 1, "sine/s@speed1.1": 2}
    pitch = {"sine/s": 400, "sine/s@speed0.9": 360, "sine/s@speed1.1": 440}
    names = {index: name for name, index in data.label_map.items()}
    seen = set()
    for epoch in range(8):
        batch = draw(data, epoch=epoch, micro_batch=1)[0]
        spectrum = torch.fft.rfft(batch["waves"][0]).abs()
        name = names[int(batch["labels"][0])]
        assert abs(int(spectrum.argmax()) - pitch[name]) <= 2  # 1 s crop: bins are 1 Hz
        seen.add(name)
    assert len(seen) > 1


def test_speed_perturbation_as_plain_augmentation_keeps_the_speaker_class(tmp_path):
    folder = tmp_path / "sine"
    folder.mkdir()
    t = np.arange(32000) / 16000
    soundfile.write(folder / "a.wav", 0.5 * np.sin(2 * np.pi * 400 * t), 16000)
    (folder / "list.csv").write_text("path,spk\na.wav,s\n")
    data = build_training_data(make_config([{"name": "sine", "csv": str(folder / "list.csv")}], crop_seconds=1.0,
                                           speed_factors=[0.9, 1.1], speed_as_classes=False, augment={"prob": 1.0}))
    assert data.label_map == {"sine/s": 0}
    pitches = set()
    for epoch in range(8):
        batch = draw(data, epoch=epoch, micro_batch=1)[0]
        assert batch["labels"].tolist() == [0]
        pitches.add(int(torch.fft.rfft(batch["waves"][0]).abs().argmax()))
    assert pitches <= {359, 360, 361, 439, 440, 441} and len(pitches) > 1


def test_short_audio_wraps_around_to_fill_the_crop(tmp_path):
    soundfile.write(tmp_path / "short.wav", np.linspace(-0.5, 0.5, 1000, dtype=np.float32), 16000, subtype="FLOAT")
    (tmp_path / "list.csv").write_text("path,spk\nshort.wav,s\n")
    wave = draw(build_training_data(make_config([{"name": "s", "csv": str(tmp_path / "list.csv")}])),
                micro_batch=1)[0]["waves"][0]
    assert len(wave) == 4000
    assert torch.equal(wave[:1000], wave[1000:2000]) and torch.equal(wave[:1000], wave[3000:])


def test_augmentation_adds_noise_at_the_configured_snr(tmp_path, tone_corpus):
    datasets = two_datasets(tone_corpus)
    clean = draw(build_training_data(make_config(datasets)), micro_batch=5)
    noisy_cfg = make_config(datasets, augment=augmented(tmp_path, prob=1.0, noise_prob=1.0, reverb_prob=0.0,
                                                       gain_db=[0, 0], snr_db={"noise": [10.0, 10.0]}))
    noisy = draw(build_training_data(noisy_cfg), micro_batch=5)
    for a, b in zip(clean, noisy):
        signal, noise = a["waves"], b["waves"] - a["waves"]
        snr = 10 * torch.log10(signal.pow(2).sum(1) / noise.pow(2).sum(1))
        assert torch.allclose(snr, torch.full_like(snr, 10.0), atol=0.05)


def test_reverberation_convolves_with_the_impulse_response(tmp_path, tone_corpus):
    datasets = two_datasets(tone_corpus)
    clean = draw(build_training_data(make_config(datasets)), micro_batch=5)
    delay = np.zeros(100)
    delay[40] = 0.5  # a pure 40-sample delay once normalised to unit energy
    rir = write_list(tmp_path / "delay", {"d": delay})
    cfg = make_config(datasets, augment={"prob": 1.0, "reverb_prob": 1.0, "rir_csv": str(rir)})
    reverberant = draw(build_training_data(cfg), micro_batch=5)
    for a, b in zip(clean, reverberant):
        assert torch.allclose(b["waves"][:, 40:], a["waves"][:, :-40], atol=1e-5)
        assert b["waves"][:, :40].abs().max() < 1e-5


def test_namespaces_and_resumed_label_map(tone_corpus):
    datasets = two_datasets(tone_corpus)
    data = build_training_data(make_config(datasets))
    assert list(data.label_map) == sorted(data.label_map) and data.num_classes == 5
    shared = [{**datasets[0], "namespace": "pool"}, {**datasets[1], "namespace": "pool"}]
    assert sorted(build_training_data(make_config(shared)).label_map) == ["pool/spk0", "pool/spk1", "pool/spk2"]
    kept = {name: 4 - index for name, index in data.label_map.items()}  # a run's map is used as saved
    assert build_training_data(make_config(datasets), label_map=kept).label_map == kept
    with pytest.raises(UserError, match="no longer match.*1 new.*'alpha/spk2'"):
        build_training_data(make_config(datasets), label_map={k: v for k, v in data.label_map.items()
                                                              if k != "alpha/spk2"})


def test_a_crop_decoded_into_a_batch_row_equals_the_crop_read_alone(tmp_path):
    """The stream decodes each crop straight into its row of the batch; every kind of file gives the same
    samples as a crop read on its own (mono/stereo, PCM/float, another rate, speed, segment, shorter than it)."""
    from ecapa_accel.data.audio import read_crop

    rng = np.random.default_rng(4)
    files = {"mono16k.wav": (16000, 1, 2.0, "PCM_16"), "float.wav": (16000, 1, 2.0, "FLOAT"),
             "stereo.wav": (16000, 2, 2.0, "PCM_24"), "8k.wav": (8000, 1, 2.0, "PCM_16"),
             "short.wav": (16000, 1, 0.1, "PCM_16")}
    for name, (rate, channels, seconds, subtype) in files.items():
        path = tmp_path / name
        soundfile.write(path, 0.1 * rng.standard_normal((int(rate * seconds), channels)), rate, subtype=subtype)
        for speed, start, stop in [(1.0, 0.0, None), (1.1, 0.0, None), (1.0, 0.05, 0.4)]:
            batch = torch.full((3, 4001), 7.0)
            alone = read_crop(str(path), 16000, 4001, 0.37, speed, start, stop)
            row = batch[1]
            assert read_crop(str(path), 16000, 4001, 0.37, speed, start, stop, out=row) is row
            assert torch.equal(batch[1], alone), (name, speed, start, stop)
            assert (batch[[0, 2]] == 7.0).all()  # the other rows are left alone


@pytest.mark.parametrize("container", ["WAV", "FLAC"])
def test_16_bit_pcm_crops_hold_libsndfiles_own_float_values(tmp_path, container):
    """16-bit PCM is read as int16 and scaled in numpy (faster than libsndfile's float conversion): the crop is
    bit for bit what soundfile's float32 read of the same frames gives, full-scale samples included."""
    from ecapa_accel.data.audio import read_crop

    samples = np.random.default_rng(5).integers(-32768, 32768, size=(20000, 1), dtype=np.int16)
    samples[:4, 0] = [-32768, 32767, 0, -1]
    path = tmp_path / f"pcm16.{container.lower()}"
    soundfile.write(path, samples, 16000, subtype="PCM_16", format=container)
    reference, _ = soundfile.read(path, dtype="float32")
    for fraction in (0.0, 0.5):
        crop = read_crop(str(path), 16000, 8000, fraction)
        offset = int(fraction * (20000 - 8000 + 1))
        assert crop.dtype == torch.float32
        assert torch.equal(crop, torch.from_numpy(reference[offset : offset + 8000]))
    assert torch.equal(read_crop(str(path), 16000, 8000, 0.0)[:4], torch.tensor([-1.0, 32767 / 32768, 0.0, -1 / 32768]))
