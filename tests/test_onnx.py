"""ONNX export: onnxruntime embeds like PyTorch at any batch size and length; `ecapa-accel export --onnx`."""

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import yaml

from ecapa_accel.config import FeaturesConfig
from ecapa_accel.encoder import EcapaEncoder
from ecapa_accel.model import EcapaTdnn


def trained_looking_encoder(variant: str) -> EcapaEncoder:
    torch.manual_seed(0)
    model = EcapaTdnn(n_mels=24, channels=16, embed_dim=8, variant=variant)
    with torch.no_grad():  # BatchNorm statistics away from (0, 1), so that the graph must carry them
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return EcapaEncoder(model, FeaturesConfig(n_mels=24)).eval()


def onnx_embeddings(path, features: torch.Tensor) -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["embedding"], {"features": features.numpy()})[0])


@pytest.mark.parametrize("variant", ["3dspeaker", "wespeaker"])
def test_onnxruntime_matches_pytorch_at_two_lengths(tmp_path, variant):
    encoder = trained_looking_encoder(variant)
    path = encoder.to_onnx(tmp_path / "model.onnx")
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["features"] and [o.name for o in graph.output] == ["embedding"]

    generator = torch.Generator().manual_seed(1)
    for seconds, batch in ((1.0, 3), (4.3, 1)):  # neither the example shape used for tracing
        waves = 0.1 * torch.randn(batch, int(seconds * 16000), generator=generator)
        with torch.no_grad():
            features = encoder.front_end(waves)
            expected = encoder.model(features)
        got = onnx_embeddings(path, features)
        assert got.shape == expected.shape == (batch, 8)
        cosine = torch.cosine_similarity(got, expected, dim=1)
        assert (cosine >= 0.99999).all(), cosine


@pytest.mark.slow
def test_export_command_writes_model_onnx_beside_the_weights(tmp_path, tone_corpus, cli_here):
    corpus = tone_corpus("alpha", speakers=3, utterances=4, seconds=1.0)
    config = {
        "data": {"datasets": [{"name": "alpha", "csv": str(corpus)}], "crop_seconds": 0.5, "num_workers": 0},
        "features": {"n_mels": 24},
        "model": {"channels": 16, "embed_dim": 8},
        "train": {"batch_size": 4, "max_steps": 2, "checkpoint_every_minutes": 0},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = tmp_path / "run"

    assert cli_here("train", tmp_path / "config.yaml", "--run-dir", run).returncode == 0
    result = cli_here("export", run, tmp_path / "exported", "--onnx")
    assert result.returncode == 0, result.stderr
    assert "model.onnx" in result.stdout
    folder = tmp_path / "exported"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.onnx", "model.safetensors"]
    assert json.loads((folder / "config.json").read_text())["features"]["n_mels"] == 24

    encoder = EcapaEncoder.from_pretrained(folder)
    features = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 150, 24)).astype(np.float32))
    with torch.no_grad():
        expected = encoder.model(features)
    assert (torch.cosine_similarity(onnx_embeddings(folder / "model.onnx", features), expected, dim=1) >= 0.99999).all()
