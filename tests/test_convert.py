"""`ecapa-accel convert`: peer checkpoints laid out with each peer's exact key names and shapes.

The layouts and the reference forwards below are written from the peers' model files
(3D-Speaker speakerlab/models/ecapa_tdnn/ECAPA_TDNN.py, SpeechBrain speechbrain/lobes/models/ECAPA_TDNN.py,
WeSpeaker wespeaker/models/ecapa_tdnn.py + pooling_layers.py), independently of our model and converter.
"""

import argparse
import json

import pytest
import torch
import torch.nn.functional as F

from ecapa_accel.cli import main
from ecapa_accel.encoder import EcapaEncoder


def _batch_norm_keys(shapes, prefix, size):
    for leaf in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"{prefix}.{leaf}"] = (size,)
    shapes[f"{prefix}.num_batches_tracked"] = ()


def _weight_keys(shapes, prefix, *weight_shape):
    shapes[f"{prefix}.weight"] = weight_shape
    shapes[f"{prefix}.bias"] = (weight_shape[0],)


def speechbrain_layout(n_mels, channels, embed_dim):
    """Key -> shape of a 3D-Speaker / SpeechBrain ECAPA_TDNN state dict (channels [C, C, C, C, 3C])."""
    shapes = {}

    def tdnn(prefix, in_channels, out_channels, kernel_size):
        _weight_keys(shapes, f"{prefix}.conv.conv", out_channels, in_channels, kernel_size)
        _batch_norm_keys(shapes, f"{prefix}.norm.norm", out_channels)

    tdnn("blocks.0", n_mels, channels, 5)
    for block in (1, 2, 3):
        tdnn(f"blocks.{block}.tdnn1", channels, channels, 1)
        for branch in range(7):
            tdnn(f"blocks.{block}.res2net_block.blocks.{branch}", channels // 8, channels // 8, 3)
        tdnn(f"blocks.{block}.tdnn2", channels, channels, 1)
        _weight_keys(shapes, f"blocks.{block}.se_block.conv1.conv", 128, channels, 1)
        _weight_keys(shapes, f"blocks.{block}.se_block.conv2.conv", channels, 128, 1)
    tdnn("mfa", 3 * channels, 3 * channels, 1)
    tdnn("asp.tdnn", 9 * channels, 128, 1)
    _weight_keys(shapes, "asp.conv.conv", 3 * channels, 128, 1)
    _batch_norm_keys(shapes, "asp_bn.norm", 6 * channels)
    _weight_keys(shapes, "fc.conv", embed_dim, 6 * channels, 1)
    return shapes


def wespeaker_layout(n_mels, channels, embed_dim, classes=5):
    """Key -> shape of a WeSpeaker ECAPA_TDNN_GLOB state dict, with its ArcMargin `projection` head."""
    shapes = {}
    _weight_keys(shapes, "layer1.conv", channels, n_mels, 5)
    _batch_norm_keys(shapes, "layer1.bn", channels)
    for layer in (2, 3, 4):
        block = f"layer{layer}.se_res2block"
        _weight_keys(shapes, f"{block}.0.conv", channels, channels, 1)
        _batch_norm_keys(shapes, f"{block}.0.bn", channels)
        for branch in range(7):
            _weight_keys(shapes, f"{block}.1.convs.{branch}", channels // 8, channels // 8, 3)
        for branch in range(7):
            _batch_norm_keys(shapes, f"{block}.1.bns.{branch}", channels // 8)
        _weight_keys(shapes, f"{block}.2.conv", channels, channels, 1)
        _batch_norm_keys(shapes, f"{block}.2.bn", channels)
        _weight_keys(shapes, f"{block}.3.linear1", 128, channels)
        _weight_keys(shapes, f"{block}.3.linear2", channels, 128)
    _weight_keys(shapes, "conv", 1536, 3 * channels, 1)
    _weight_keys(shapes, "pool.linear1", 128, 3 * 1536, 1)
    _weight_keys(shapes, "pool.linear2", 1536, 128, 1)
    _batch_norm_keys(shapes, "bn", 3072)
    _weight_keys(shapes, "linear", embed_dim, 3072)
    shapes["projection.weight"] = (classes, embed_dim)
    return shapes


def random_state(shapes, seed=0):
    """Trained-looking values: fan-in scaled weights and non-trivial BatchNorm statistics."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(shape, generator=generator)
        elif key.endswith(("running_mean", "bias")):
            state[key] = 0.1 * torch.randn(shape, generator=generator)
        elif len(shape) == 1:  # BatchNorm scale
            state[key] = 0.5 + torch.rand(shape, generator=generator)
        else:
            fan_in = shape[1] * (shape[2] if len(shape) == 3 else 1)
            state[key] = torch.randn(shape, generator=generator) / fan_in**0.5
    return state


def _norm(x, p, prefix):
    return F.batch_norm(x, p[f"{prefix}.running_mean"], p[f"{prefix}.running_var"], p[f"{prefix}.weight"],
                        p[f"{prefix}.bias"], training=False, eps=1e-5)


def speechbrain_reference(p, feats):
    """SpeechBrain / 3D-Speaker ECAPA_TDNN.forward in eval mode."""

    def tdnn(x, prefix, dilation=1):
        weight = p[f"{prefix}.conv.conv.weight"]
        pad = dilation * (weight.shape[-1] - 1) // 2
        x = F.conv1d(F.pad(x, (pad, pad), mode="reflect"), weight, p[f"{prefix}.conv.conv.bias"], dilation=dilation)
        return _norm(F.relu(x), p, f"{prefix}.norm.norm")

    x = tdnn(feats.transpose(1, 2), "blocks.0")
    outputs = []
    for block, dilation in ((1, 2), (2, 3), (3, 4)):
        h = tdnn(x, f"blocks.{block}.tdnn1")
        chunks = h.chunk(8, dim=1)
        ys = [chunks[0]]
        for i in range(1, 8):
            ys.append(tdnn(chunks[i] if i == 1 else chunks[i] + ys[-1], f"blocks.{block}.res2net_block.blocks.{i - 1}",
                           dilation))
        h = tdnn(torch.cat(ys, dim=1), f"blocks.{block}.tdnn2")
        se = f"blocks.{block}.se_block"
        s = F.relu(F.conv1d(h.mean(2, keepdim=True), p[f"{se}.conv1.conv.weight"], p[f"{se}.conv1.conv.bias"]))
        s = torch.sigmoid(F.conv1d(s, p[f"{se}.conv2.conv.weight"], p[f"{se}.conv2.conv.bias"]))
        x = s * h + x
        outputs.append(x)
    x = tdnn(torch.cat(outputs, dim=1), "mfa")
    mean = x.mean(2, keepdim=True)
    std = ((x - mean) ** 2).mean(2, keepdim=True).clamp(1e-12).sqrt()
    attention = tdnn(torch.cat([x, mean.expand_as(x), std.expand_as(x)], dim=1), "asp.tdnn")
    attention = F.conv1d(torch.tanh(attention), p["asp.conv.conv.weight"], p["asp.conv.conv.bias"]).softmax(dim=2)
    mean = (attention * x).sum(2)
    std = (attention * (x - mean[..., None]) ** 2).sum(2).clamp(1e-12).sqrt()
    pooled = _norm(torch.cat([mean, std], dim=1), p, "asp_bn.norm")
    return F.linear(pooled, p["fc.conv.weight"][..., 0], p["fc.conv.bias"])


def wespeaker_reference(p, feats):
    """WeSpeaker ECAPA_TDNN (global context attention) forward in eval mode: the embedding output."""

    def conv_relu_bn(x, conv, bn, dilation=1):
        weight = p[f"{conv}.weight"]
        x = F.conv1d(x, weight, p[f"{conv}.bias"], padding=dilation * (weight.shape[-1] - 1) // 2, dilation=dilation)
        return _norm(F.relu(x), p, bn)

    x = conv_relu_bn(feats.transpose(1, 2), "layer1.conv", "layer1.bn")
    outputs = []
    for layer, dilation in ((2, 2), (3, 3), (4, 4)):
        block = f"layer{layer}.se_res2block"
        h = conv_relu_bn(x, f"{block}.0.conv", f"{block}.0.bn")
        chunks = h.chunk(8, dim=1)
        ys = []
        for i in range(7):
            ys.append(conv_relu_bn(chunks[i] if i == 0 else chunks[i] + ys[-1], f"{block}.1.convs.{i}",
                                   f"{block}.1.bns.{i}", dilation))
        h = conv_relu_bn(torch.cat([*ys, chunks[7]], dim=1), f"{block}.2.conv", f"{block}.2.bn")
        s = F.relu(F.linear(h.mean(2), p[f"{block}.3.linear1.weight"], p[f"{block}.3.linear1.bias"]))
        s = torch.sigmoid(F.linear(s, p[f"{block}.3.linear2.weight"], p[f"{block}.3.linear2.bias"]))
        x = x + h * s[..., None]
        outputs.append(x)
    x = F.relu(F.conv1d(torch.cat(outputs, dim=1), p["conv.weight"], p["conv.bias"]))
    context = torch.cat([x, x.mean(2, keepdim=True).expand_as(x), (x.var(2, keepdim=True) + 1e-7).sqrt().expand_as(x)], 1)
    attention = torch.tanh(F.conv1d(context, p["pool.linear1.weight"], p["pool.linear1.bias"]))
    attention = F.conv1d(attention, p["pool.linear2.weight"], p["pool.linear2.bias"]).softmax(dim=2)
    mean = (attention * x).sum(2)
    std = ((attention * x**2).sum(2) - mean**2).clamp(min=1e-7).sqrt()
    pooled = _norm(torch.cat([mean, std], dim=1), p, "bn")
    return F.linear(pooled, p["linear.weight"], p["linear.bias"])


def convert(peer, src, out):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--from", peer, str(src), str(out)])
    return exit_info.value.code


@pytest.mark.parametrize(
    ("peer", "layout", "reference", "front_end"),
    [
        ("3dspeaker", speechbrain_layout, speechbrain_reference, {"kind": "kaldi", "window": "povey",
                                                                  "waveform_scale": 1.0}),
        ("speechbrain", speechbrain_layout, speechbrain_reference, {"kind": "speechbrain"}),
        ("wespeaker", wespeaker_layout, wespeaker_reference, {"kind": "kaldi", "window": "hamming",
                                                              "waveform_scale": 32768.0}),
    ],
)
def test_converted_peer_checkpoint_gives_the_peer_embeddings(tmp_path, capsys, peer, layout, reference, front_end):
    state = random_state(layout(n_mels=24, channels=32, embed_dim=16))
    if peer == "wespeaker":  # averaged WeSpeaker checkpoints hold float counters; DDP ones a module. prefix
        saved = {"model": {f"module.{key}": value.float() if value.dim() == 0 else value
                           for key, value in state.items()}}
    else:
        saved = state
    torch.save(saved, tmp_path / "peer.ckpt")

    assert convert(peer, tmp_path / "peer.ckpt", tmp_path / "export") == 0
    assert "32 channels, 16-d embeddings, 24 mels" in capsys.readouterr().out

    encoder = EcapaEncoder.from_pretrained(tmp_path / "export")
    feats = torch.randn(3, 61, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = encoder.model(feats)
    torch.testing.assert_close(ours, reference(state, feats), rtol=1e-4, atol=1e-5)
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["features"] | front_end == config["features"]
    assert config["features"]["n_mels"] == 24 and config["sample_rate"] == 16000


def test_full_size_3dspeaker_checkpoint_has_231_entries_and_converts(tmp_path, capsys):
    shapes = speechbrain_layout(n_mels=80, channels=1024, embed_dim=192)
    assert len(shapes) == 231
    for key, shape in [("blocks.0.conv.conv.weight", (1024, 80, 5)), ("mfa.conv.conv.weight", (3072, 3072, 1)),
                       ("asp.tdnn.conv.conv.weight", (128, 9216, 1)), ("asp_bn.norm.running_var", (6144,)),
                       ("fc.conv.weight", (192, 6144, 1))]:
        assert shapes[key] == shape
    torch.save({key: torch.zeros(shape) for key, shape in shapes.items()}, tmp_path / "embedding_model.ckpt")
    assert convert("3dspeaker", tmp_path / "embedding_model.ckpt", tmp_path / "export") == 0
    assert "20,767,552 parameters" in capsys.readouterr().out


def _with_unknown_key(state):
    return state | {"blocks.1.extra.weight": torch.zeros(3)}


def _with_wrong_shape(state):
    return state | {"asp.conv.conv.weight": torch.zeros(96, 64, 1)}


def _without_key(state):
    return {key: value for key, value in state.items() if key != "fc.conv.bias"}


@pytest.mark.parametrize(
    ("edit", "named"),
    [(_with_unknown_key, "'blocks.1.extra.weight'"), (_with_wrong_shape, "'asp.conv.conv.weight'"),
     (_without_key, "'fc.conv.bias'")],
)
def test_bad_keys_exit_2_with_one_line_naming_the_key(tmp_path, capsys, edit, named):
    torch.save(edit(random_state(speechbrain_layout(n_mels=24, channels=32, embed_dim=16))), tmp_path / "bad.ckpt")
    assert convert("speechbrain", tmp_path / "bad.ckpt", tmp_path / "export") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and named in err
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("content", ["text", "pickled object"])
def test_files_that_are_not_weights_only_checkpoints_exit_2_naming_the_file(tmp_path, capsys, content):
    src = tmp_path / "not_a_checkpoint.pt"
    if content == "text":
        src.write_text("ID,path,spk\n")
    else:  # loading it would need arbitrary unpickling
        torch.save({"model": argparse.Namespace(layers=3)}, src)
    assert convert("wespeaker", src, tmp_path / "export") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(src) in err
    assert not (tmp_path / "export").exists()
