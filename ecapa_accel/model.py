"""ECAPA-TDNN speaker embedding network (Desplanques et al., 2020) in the two layouts the peers train.

variant "3dspeaker": the network of 3D-Speaker and SpeechBrain (reflect padding, Conv1d -> ReLU -> BatchNorm
units, SE-Res2 blocks, multi-layer aggregation over 3 x channels, attentive statistics pooling with global
context and a BatchNorm in its attention, BatchNorm, linear projection).
variant "wespeaker": WeSpeaker's ECAPA_TDNN_GLOB (zero padding, the Res2 pass-through group last, aggregation
to a fixed 1536 channels without BatchNorm, attention without BatchNorm).
Both reproduce their peer's arithmetic, so converted peer weights give the peer's embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import RES2_SCALE, ModelConfig

VARIANTS = ("3dspeaker", "wespeaker")
SE_CHANNELS = 128
ATTENTION_CHANNELS = 128
WESPEAKER_AGGREGATE_CHANNELS = 1536  # WeSpeaker fixes the aggregation width at 3 x 512 for every block width
MIN_FRAMES = 5  # reflect padding of the dilation-4 convolution needs more frames than its padding


class ConvReluNorm(nn.Module):
    """Conv1d -> ReLU -> BatchNorm1d with 'same' padding: the TDNN unit of every peer."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        dilation: int = 1,
        padding_mode: str = "zeros",
        norm: bool = True,
    ):
        super().__init__()
        self.conv = nn.Conv1d(
            in_channels,
            out_channels,
            kernel_size,
            dilation=dilation,
            padding=dilation * (kernel_size - 1) // 2,
            # a 1x1 convolution pads nothing; "zeros" spares the no-op reflect pad copy
            padding_mode=padding_mode if kernel_size > 1 else "zeros",
        )
        self.norm = nn.BatchNorm1d(out_channels) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(F.relu(self.conv(x)))


class Res2Conv(nn.Module):
    """Res2Net convolution: one channel group passes through, the others run a chain where each adds the previous output.

    SpeechBrain/3D-Speaker pass the first group through and chain groups 1..7; WeSpeaker chains groups 0..6 and
    appends the last group unchanged.
    """

    def __init__(self, channels: int, kernel_size: int, dilation: int, padding_mode: str, passthrough_first: bool):
        super().__init__()
        width = channels // RES2_SCALE
        self.branches = nn.ModuleList(
            ConvReluNorm(width, width, kernel_size, dilation, padding_mode) for _ in range(RES2_SCALE - 1)
        )
        self.passthrough_first = passthrough_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = x.chunk(RES2_SCALE, dim=1)
        if self.passthrough_first:
            passthrough, chained = groups[0], groups[1:]
        else:
            passthrough, chained = groups[-1], groups[:-1]
        outputs = []
        for branch, group in zip(self.branches, chained):
            outputs.append(branch(group + outputs[-1] if outputs else group))
        pieces = [passthrough, *outputs] if self.passthrough_first else [*outputs, passthrough]
        return torch.cat(pieces, dim=1)


class SqueezeExcite(nn.Module):
    """Channel gates from the utterance mean: linear -> ReLU -> linear -> sigmoid."""

    def __init__(self, channels: int, bottleneck: int = SE_CHANNELS):
        super().__init__()
        self.squeeze = nn.Linear(channels, bottleneck)
        self.excite = nn.Linear(bottleneck, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.excite(F.relu(self.squeeze(x.mean(dim=2)))))
        return x * gate.unsqueeze(2)


class SERes2Block(nn.Module):
    """1x1 unit -> dilated Res2 convolution -> 1x1 unit -> squeeze-excitation, plus the residual."""

    def __init__(self, channels: int, dilation: int, padding_mode: str, passthrough_first: bool):
        super().__init__()
        self.conv_in = ConvReluNorm(channels, channels)
        self.res2 = Res2Conv(channels, 3, dilation, padding_mode, passthrough_first)
        self.conv_out = ConvReluNorm(channels, channels)
        self.se = SqueezeExcite(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.se(self.conv_out(self.res2(self.conv_in(x))))


class AttentiveStatsPooling(nn.Module):
    """Attention-weighted mean and standard deviation over time; the attention also sees the utterance's mean and std.

    The attention's first 1x1 convolution acts on [frames; mean; std] (3 x channels in, as the peers store it);
    the mean and std parts are the same for every frame, so they are applied once per utterance instead of
    being repeated over time.
    """

    def __init__(self, channels: int, attention_norm: bool, unbiased_context: bool, variance_floor: float):
        super().__init__()
        self.attention_in = nn.Conv1d(3 * channels, ATTENTION_CHANNELS, 1)
        self.attention_norm = nn.BatchNorm1d(ATTENTION_CHANNELS) if attention_norm else None
        self.attention_out = nn.Conv1d(ATTENTION_CHANNELS, channels, 1)
        self.unbiased_context = unbiased_context
        self.variance_floor = variance_floor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()  # statistics in fp32 even under autocast
        channels = x.shape[1]
        mean = x.mean(dim=2)
        if self.unbiased_context:  # WeSpeaker: sqrt(torch.var + floor)
            context_std = torch.sqrt(x.var(dim=2) + self.variance_floor)
        else:  # SpeechBrain / 3D-Speaker: biased variance clamped at the floor
            context_std = torch.sqrt(x.var(dim=2, correction=0).clamp(min=self.variance_floor))
        weight = self.attention_in.weight.squeeze(2)
        frame_weight, context_weight = weight[:, :channels], weight[:, channels:]
        context = F.linear(torch.cat([mean, context_std], dim=1), context_weight, self.attention_in.bias)
        hidden = F.conv1d(x, frame_weight.unsqueeze(2)) + context.unsqueeze(2)
        if self.attention_norm is not None:  # 3D-Speaker: conv -> ReLU -> BN before tanh
            hidden = self.attention_norm(F.relu(hidden))
        logits = self.attention_out(torch.tanh(hidden))
        attention = torch.softmax(logits.float(), dim=2)
        weighted_mean = (attention * x).sum(dim=2)
        weighted_var = (attention * (x - weighted_mean.unsqueeze(2)).square()).sum(dim=2)
        return torch.cat([weighted_mean, weighted_var.clamp(min=self.variance_floor).sqrt()], dim=1)


class EcapaTdnn(nn.Module):
    """ECAPA-TDNN: (batch, frames, n_mels) features -> (batch, embed_dim) speaker embeddings."""

    def __init__(self, n_mels: int = 80, channels: int = 1024, embed_dim: int = 192, variant: str = "3dspeaker"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
        if channels % RES2_SCALE:
            raise ValueError(f"channels must be a multiple of {RES2_SCALE}; got {channels}")
        self.n_mels, self.channels, self.embed_dim, self.variant = n_mels, channels, embed_dim, variant
        speechbrain_layout = variant == "3dspeaker"
        padding_mode = "reflect" if speechbrain_layout else "zeros"
        aggregate_channels = 3 * channels if speechbrain_layout else WESPEAKER_AGGREGATE_CHANNELS

        self.stem = ConvReluNorm(n_mels, channels, kernel_size=5, padding_mode=padding_mode)
        self.blocks = nn.ModuleList(
            SERes2Block(channels, dilation, padding_mode, passthrough_first=speechbrain_layout) for dilation in (2, 3, 4)
        )
        self.aggregate = ConvReluNorm(3 * channels, aggregate_channels, norm=speechbrain_layout)
        self.pooling = AttentiveStatsPooling(
            aggregate_channels,
            attention_norm=speechbrain_layout,
            unbiased_context=not speechbrain_layout,
            variance_floor=1e-12 if speechbrain_layout else 1e-7,
        )
        self.pooling_norm = nn.BatchNorm1d(2 * aggregate_channels)
        self.embedding = nn.Linear(2 * aggregate_channels, embed_dim)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = self.stem(feats.transpose(1, 2))
        block_outputs = []
        for block in self.blocks:
            x = block(x)
            block_outputs.append(x)
        x = self.aggregate(torch.cat(block_outputs, dim=1))
        return self.embedding(self.pooling_norm(self.pooling(x)))


def build_model(model_cfg: ModelConfig, n_mels: int) -> EcapaTdnn:
    """The network a config describes (`config.validate` has checked its values)."""
    return EcapaTdnn(n_mels, model_cfg.channels, model_cfg.embed_dim, model_cfg.variant)
