"""ECAPA-TDNN: the peers' parameter counts, batch independence at inference, a training step."""

import pytest
import torch

from ecapa_accel.config import ModelConfig
from ecapa_accel.model import EcapaTdnn, build_model


@pytest.mark.parametrize(
    ("variant", "channels", "parameters"),
    [
        ("3dspeaker", 1024, 20_767_552),  # 3D-Speaker / SpeechBrain VoxCeleb recipes
        ("3dspeaker", 512, 6_194_048),
        ("wespeaker", 1024, 14_657_088),  # ECAPA_TDNN_GLOB_c1024
        ("wespeaker", 512, 6_190_720),  # ECAPA_TDNN_GLOB_c512
    ],
)
def test_parameter_counts_match_the_peers(variant, channels, parameters):
    with torch.device("meta"):
        model = EcapaTdnn(n_mels=80, channels=channels, embed_dim=192, variant=variant)
    assert sum(parameter.numel() for parameter in model.parameters()) == parameters


@pytest.mark.parametrize("variant", ["3dspeaker", "wespeaker"])
def test_inference_embeds_each_utterance_independently_of_its_batch(variant):
    torch.manual_seed(0)
    model = build_model(ModelConfig(variant=variant, channels=32, embed_dim=12), n_mels=20).eval()
    feats = torch.randn(3, 57, 20)
    with torch.no_grad():
        batched = model(feats)
        alone = torch.cat([model(feats[i : i + 1]) for i in range(3)])
        short = model(feats[:, :9])
    assert batched.shape == (3, 12) and short.shape == (3, 12)
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1])


@pytest.mark.parametrize(("variant", "autocast"), [("3dspeaker", False), ("wespeaker", False), ("3dspeaker", True)])
def test_a_training_step_gives_every_parameter_a_finite_gradient(variant, autocast):
    torch.manual_seed(0)
    model = EcapaTdnn(n_mels=16, channels=16, embed_dim=8, variant=variant).train()
    before = model.state_dict()["stem.norm.running_mean"].clone()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        embeddings = model(torch.randn(4, 40, 16))
    embeddings.float().square().sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name
    assert not torch.equal(model.state_dict()["stem.norm.running_mean"], before)


def test_a_width_the_res2_split_cannot_take_is_refused():
    # Configs are checked by `config.validate` (a UserError naming 'model.channels'); direct misuse is a ValueError.
    with pytest.raises(ValueError, match="multiple of 8"):
        build_model(ModelConfig(channels=100), n_mels=80)
