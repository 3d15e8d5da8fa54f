"""Convert 3D-Speaker, WeSpeaker and SpeechBrain ECAPA-TDNN checkpoints into export folders.

The peer's key names are mapped onto ours; channels, embedding size and mel count come from the tensor shapes;
the export records the peer's own front end so that the converted model embeds like the peer's inference.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import INIT_FORMATS, FeaturesConfig
from .encoder import EcapaEncoder
from .errors import UserError
from .model import RES2_SCALE, EcapaTdnn

PEERS = INIT_FORMATS  # the peers whose checkpoints convert (and model.init_from) read

PEER_FRONT_ENDS = {
    "3dspeaker": {"kind": "kaldi", "window": "povey", "waveform_scale": 1.0},
    "wespeaker": {"kind": "kaldi", "window": "hamming", "waveform_scale": 32768.0},
    "speechbrain": {"kind": "speechbrain"},
}


def _speechbrain_modules() -> dict[str, str]:
    """Our module names -> SpeechBrain's (3D-Speaker adapted SpeechBrain's model and kept its names)."""

    def unit(ours: str, theirs: str) -> dict[str, str]:
        return {f"{ours}.conv": f"{theirs}.conv.conv", f"{ours}.norm": f"{theirs}.norm.norm"}

    modules = unit("stem", "blocks.0")
    for index in range(3):
        ours, theirs = f"blocks.{index}", f"blocks.{index + 1}"
        modules |= unit(f"{ours}.conv_in", f"{theirs}.tdnn1") | unit(f"{ours}.conv_out", f"{theirs}.tdnn2")
        for branch in range(RES2_SCALE - 1):
            modules |= unit(f"{ours}.res2.branches.{branch}", f"{theirs}.res2net_block.blocks.{branch}")
        modules[f"{ours}.se.squeeze"] = f"{theirs}.se_block.conv1.conv"
        modules[f"{ours}.se.excite"] = f"{theirs}.se_block.conv2.conv"
    modules |= unit("aggregate", "mfa")
    modules |= {
        "pooling.attention_in": "asp.tdnn.conv.conv",
        "pooling.attention_norm": "asp.tdnn.norm.norm",
        "pooling.attention_out": "asp.conv.conv",
        "pooling_norm": "asp_bn.norm",
        "embedding": "fc.conv",
    }
    return modules


def _wespeaker_modules() -> dict[str, str]:
    """Our module names -> WeSpeaker's ECAPA_TDNN_GLOB names."""
    modules = {"stem.conv": "layer1.conv", "stem.norm": "layer1.bn"}
    for index in range(3):
        ours, theirs = f"blocks.{index}", f"layer{index + 2}.se_res2block"
        modules |= {
            f"{ours}.conv_in.conv": f"{theirs}.0.conv",
            f"{ours}.conv_in.norm": f"{theirs}.0.bn",
            f"{ours}.conv_out.conv": f"{theirs}.2.conv",
            f"{ours}.conv_out.norm": f"{theirs}.2.bn",
            f"{ours}.se.squeeze": f"{theirs}.3.linear1",
            f"{ours}.se.excite": f"{theirs}.3.linear2",
        }
        for branch in range(RES2_SCALE - 1):
            modules[f"{ours}.res2.branches.{branch}.conv"] = f"{theirs}.1.convs.{branch}"
            modules[f"{ours}.res2.branches.{branch}.norm"] = f"{theirs}.1.bns.{branch}"
    modules |= {
        "aggregate.conv": "conv",
        "pooling.attention_in": "pool.linear1",
        "pooling.attention_out": "pool.linear2",
        "pooling_norm": "bn",
        "embedding": "linear",
    }
    return modules


def _is_dropped(peer: str, key: str) -> bool:
    """Entries that are not embedding-network weights: BatchNorm counters and WeSpeaker's ArcMargin head."""
    return key.endswith("num_batches_tracked") or (peer == "wespeaker" and key.startswith("projection."))


def read_state_dict(src: Path) -> dict[str, torch.Tensor]:
    """A peer checkpoint's tensors (weights_only load; `model`/`state_dict` wrappers and `module.` prefixes removed)."""
    if not src.is_file():
        raise UserError(f"{src}: checkpoint file not found")
    try:
        loaded = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types here (pickle, zip, weights-only refusal); all mean "unreadable"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{src}: not a PyTorch checkpoint loadable with weights_only=True ({reason})") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
            break
    if not isinstance(loaded, dict):
        raise UserError(f"{src}: holds a {type(loaded).__name__}, not a state dict")
    state = {}
    for key, value in loaded.items():
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{src}: entry '{key}' is not a tensor")
        state[str(key).removeprefix("module.")] = value
    return state


def _shape_of(state: dict[str, torch.Tensor], key: str, src: Path, peer: str, dims: int) -> tuple[int, ...]:
    if key not in state:
        raise UserError(f"{src}: missing key '{key}' (not a {peer} ECAPA-TDNN checkpoint?)")
    shape = tuple(state[key].shape)
    if len(shape) != dims:
        raise UserError(f"{src}: key '{key}' has shape {shape}, expected {dims} dimensions")
    return shape


def peer_layouts(state: dict[str, torch.Tensor]) -> tuple[str, ...]:
    """The peers whose key names `state` uses (3D-Speaker kept SpeechBrain's, so those two always come together)."""
    if f"{_wespeaker_modules()['stem.conv']}.weight" in state:
        return ("wespeaker",)
    if f"{_speechbrain_modules()['stem.conv']}.weight" in state:
        return ("3dspeaker", "speechbrain")
    return ()


def convert_checkpoint(peer: str, src: Path, out_dir: Path) -> str:
    """Convert a peer's ECAPA-TDNN checkpoint into an export folder; returns a one-line summary."""
    if peer not in PEERS:
        raise UserError(f"unknown peer '{peer}'; choose one of {', '.join(PEERS)}")
    src, out_dir = Path(src), Path(out_dir)
    model, features = peer_model(peer, read_state_dict(src), src)
    EcapaEncoder(model, features).save_pretrained(out_dir)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    return (f"converted {src} ({peer}: {model.channels} channels, {model.embed_dim}-d embeddings, "
            f"{features.n_mels} mels, {parameters:,} parameters, {features.kind} front end) -> {out_dir}")


def peer_model(peer: str, state: dict[str, torch.Tensor], src: Path) -> tuple[EcapaTdnn, FeaturesConfig]:
    """A peer's state dict as our network (weights loaded) and the peer's front end; nothing is written."""
    modules = _wespeaker_modules() if peer == "wespeaker" else _speechbrain_modules()

    channels, n_mels, _ = _shape_of(state, f"{modules['stem.conv']}.weight", src, peer, dims=3)
    embed_dim = _shape_of(state, f"{modules['embedding']}.weight", src, peer, dims=3 if peer != "wespeaker" else 2)[0]
    if channels % RES2_SCALE:
        raise UserError(f"{src}: {channels} channels is not a multiple of {RES2_SCALE}")
    variant = "wespeaker" if peer == "wespeaker" else "3dspeaker"
    model = EcapaTdnn(n_mels, channels, embed_dim, variant)

    ours = model.state_dict()
    peer_to_ours = {}
    for key in ours:
        module, leaf = key.rsplit(".", 1)
        peer_to_ours[f"{modules[module]}.{leaf}"] = key
    described = f"a {peer} ECAPA-TDNN with {channels} channels, {n_mels} mels and {embed_dim}-d embeddings"
    converted = {}
    for peer_key, value in state.items():
        if _is_dropped(peer, peer_key):
            continue
        if peer_key not in peer_to_ours:
            raise UserError(f"{src}: unknown key '{peer_key}' for {described}")
        expected = ours[peer_to_ours[peer_key]].shape
        # the peers store per-utterance projections as 1x1 convolutions, ours are linear layers
        if value.shape != expected and value.shape != (*expected, 1):
            raise UserError(f"{src}: key '{peer_key}' has shape {tuple(value.shape)}, {described} needs "
                            f"{tuple(expected)}")
        converted[peer_to_ours[peer_key]] = value.reshape(expected).to(ours[peer_to_ours[peer_key]].dtype)
    for peer_key, key in peer_to_ours.items():
        if key not in converted and not _is_dropped(peer, peer_key):
            raise UserError(f"{src}: missing key '{peer_key}' for {described}")
    model.load_state_dict(ours | converted)
    return model, FeaturesConfig(n_mels=n_mels, **PEER_FRONT_ENDS[peer])
