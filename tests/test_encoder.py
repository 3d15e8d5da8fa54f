"""EcapaEncoder and export folders: round trip, audio files, `ecapa-accel embed`, loading mistakes."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torchaudio.functional
from safetensors.torch import load_file, save_file

from ecapa_accel.cli import main
from ecapa_accel.config import FeaturesConfig
from ecapa_accel.encoder import EcapaEncoder
from ecapa_accel.errors import UserError
from ecapa_accel.model import EcapaTdnn


def tiny_encoder(variant="3dspeaker", kind="kaldi"):
    torch.manual_seed(0)
    model = EcapaTdnn(n_mels=24, channels=16, embed_dim=8, variant=variant)
    with torch.no_grad():  # trained-looking BatchNorm statistics, so that the round trip has something to carry
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return EcapaEncoder(model, FeaturesConfig(kind=kind, n_mels=24)).eval()


def waves(batch=2, seconds=0.6, seed=0):
    return 0.1 * torch.randn(batch, int(seconds * 16000), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("variant", "kind"), [("3dspeaker", "kaldi"), ("wespeaker", "speechbrain")])
def test_export_round_trip_gives_identical_embeddings(tmp_path, variant, kind):
    encoder = tiny_encoder(variant, kind)
    encoder.save_pretrained(tmp_path / "run" / "export")
    config = json.loads((tmp_path / "run" / "export" / "config.json").read_text())
    assert config["format"] == "ecapa-accel" and config["sample_rate"] == 16000
    assert config["model"] == {"variant": variant, "channels": 16, "embed_dim": 8}
    assert config["features"]["kind"] == kind and config["features"]["n_mels"] == 24

    batch = waves()
    with torch.no_grad():
        expected = encoder(batch)
        for model_dir in (tmp_path / "run" / "export", tmp_path / "run"):  # export folder or run directory
            loaded = EcapaEncoder.from_pretrained(model_dir)
            assert not loaded.training
            assert torch.equal(loaded(batch), expected)


def test_embed_file_mixes_channels_and_resamples(tmp_path):
    encoder = tiny_encoder()
    stereo = 0.1 * np.random.default_rng(0).standard_normal((8000, 2)).astype(np.float32)
    soundfile.write(tmp_path / "stereo_8k.wav", stereo, 8000, subtype="FLOAT")
    mono_16k = torchaudio.functional.resample(torch.from_numpy(stereo.mean(axis=1)), 8000, 16000)
    with torch.no_grad():
        expected = encoder(mono_16k[None])[0]
    embedding = encoder.embed_file(tmp_path / "stereo_8k.wav")
    assert embedding.shape == (8,)
    torch.testing.assert_close(embedding, expected, rtol=1e-4, atol=1e-5)


def test_long_files_are_embedded_in_chunks_and_averaged(tmp_path):
    encoder = tiny_encoder()
    wave = waves(batch=1, seconds=1.2)[0]
    soundfile.write(tmp_path / "long.wav", wave.numpy(), 16000, subtype="FLOAT")
    with torch.no_grad():
        chunks = torch.stack([encoder(chunk[None])[0] for chunk in wave.tensor_split(3)])
        whole = encoder(wave[None])[0]
    chunked = encoder.embed_file(tmp_path / "long.wav", max_chunk_seconds=0.5)
    torch.testing.assert_close(chunked, chunks.mean(dim=0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(encoder.embed_file(tmp_path / "long.wav"), whole, rtol=1e-4, atol=1e-5)


def test_embed_command_prints_json_lines_or_writes_safetensors(tmp_path, tone_corpus, capsys, monkeypatch):
    tiny_encoder().save_pretrained(tmp_path / "model")
    tone_corpus("set", speakers=2, utterances=1)
    monkeypatch.chdir(tmp_path)
    paths = ["set/spk0/utt0.wav", "set/spk1/utt0.wav"]
    expected = EcapaEncoder.from_pretrained(tmp_path / "model")

    with pytest.raises(SystemExit) as exit_info:
        main(["embed", "model", *paths])
    assert exit_info.value.code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["path"] for line in lines] == paths
    for line in lines:
        torch.testing.assert_close(torch.tensor(line["embedding"]), expected.embed_file(line["path"]))

    with pytest.raises(SystemExit) as exit_info:
        main(["embed", "model", *paths, "--out", "out/embeddings.safetensors"])
    assert exit_info.value.code == 0
    assert "2 embeddings" in capsys.readouterr().out
    stored = load_file("out/embeddings.safetensors")
    assert sorted(stored) == paths
    for path in paths:
        torch.testing.assert_close(stored[path], expected.embed_file(path))


@pytest.mark.parametrize("problem", ["missing", "not audio", "too short"])
def test_embed_command_names_the_audio_file_it_cannot_use(tmp_path, capsys, problem):
    tiny_encoder().save_pretrained(tmp_path / "model")
    audio = tmp_path / "a.wav"
    if problem == "not audio":
        audio.write_text("not a wav file")
    elif problem == "too short":
        soundfile.write(audio, np.zeros(480, dtype=np.float32), 16000)
    with pytest.raises(SystemExit) as exit_info:
        main(["embed", str(tmp_path / "model"), str(audio)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and str(audio) in err


def _write_config(folder: Path, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda d: None, "nowhere: model folder not found"),
        (lambda d: (d / "config.json").unlink(), "config.json: missing"),
        (lambda d: (d / "model.safetensors").unlink(), "model.safetensors: missing"),
        (lambda d: _write_config(d, format="wespeaker"), "config.json: not an ecapa-accel export config"),
        (lambda d: _write_config(d, features={"kind": "mfcc"}), "'features.kind' must be one of"),
        (lambda d: _write_config(d, model={"variant": "3dspeaker", "channels": 32, "embed_dim": 8}),
         "tensor 'stem.conv.weight' has shape (16, 24, 5), the config needs (32, 24, 5)"),
        (lambda d: save_file({"x": torch.zeros(1)}, str(d / "model.safetensors")), "missing tensor 'stem.conv.weight'"),
        (lambda d: (d / "model.safetensors").write_bytes(b"garbage"), "model.safetensors: not a readable safetensors"),
    ],
)
def test_loading_a_damaged_export_is_a_user_error_naming_the_path(tmp_path, damage, named):
    folder = tmp_path / "export"
    tiny_encoder().save_pretrained(folder)
    damage(folder)
    model_dir = tmp_path / "nowhere" if named.startswith("nowhere") else folder
    with pytest.raises(UserError) as error:
        EcapaEncoder.from_pretrained(model_dir)
    assert named in str(error.value) and "\n" not in str(error.value)


def test_export_config_carries_a_threshold_and_averaged_steps(tmp_path):
    encoder = tiny_encoder()
    encoder.threshold, encoder.averaged_steps = 0.42, [800, 900]
    encoder.save_pretrained(tmp_path / "export")
    loaded = EcapaEncoder.from_pretrained(tmp_path / "export")
    assert (loaded.threshold, loaded.averaged_steps) == (0.42, [800, 900])
    assert EcapaEncoder.from_pretrained(tiny_encoder().save_pretrained(tmp_path / "plain")).threshold is None

    _write_config(tmp_path / "export", threshold="high")
    with pytest.raises(UserError, match="'threshold' must be a number"):
        EcapaEncoder.from_pretrained(tmp_path / "export")
