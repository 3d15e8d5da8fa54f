"""Additive angular margin (AAM) softmax loss and its margin schedule."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ecapa_accel.config import LossConfig

# Keeps sin(theta) = sqrt(1 - cos^2) differentiable when an embedding lies on (or opposite) its class weight.
SINE_SQUARED_FLOOR = 1e-6


class AAMSoftmax(nn.Module):
    """Class-weight matrix plus ArcFace loss: the target logit is s * cos(theta + m), the others s * cos(theta).

    Where theta + m would pass pi, the target logit falls back to s * (cos(theta) - m sin(pi - m)) (ArcFace), or with
    `easy_margin` the margin applies only while cos(theta) > 0. Computed in fp32 even under fp16/bf16 autocast.
    """

    def __init__(
        self, embed_dim: int, num_classes: int, scale: float = 32.0, margin: float = 0.2, easy_margin: bool = False
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embed_dim))
        nn.init.xavier_uniform_(self.weight)
        self.scale = scale
        self.margin = margin
        self.easy_margin = easy_margin

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, margin: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, embed_dim) embeddings, (B,) class indices -> (mean loss, accuracy).

        `margin` overrides the configured margin (for a schedule). Accuracy is the fraction of embeddings whose
        closest class weight (highest cosine, no margin) is their label.
        """
        margin = self.margin if margin is None else margin
        with torch.autocast(embeddings.device.type, enabled=False):
            cosine = F.linear(F.normalize(embeddings.float()), F.normalize(self.weight.float()))
            target_cosine = cosine.gather(1, labels[:, None])
            target_sine = (1.0 - target_cosine.square()).clamp(min=SINE_SQUARED_FLOOR).sqrt()
            with_margin = target_cosine * math.cos(margin) - target_sine * math.sin(margin)
            if self.easy_margin:
                with_margin = torch.where(target_cosine > 0, with_margin, target_cosine)
            else:
                beyond_pi = target_cosine <= math.cos(math.pi - margin)
                with_margin = torch.where(beyond_pi, target_cosine - margin * math.sin(math.pi - margin), with_margin)
            logits = cosine.scatter(1, labels[:, None], with_margin)
            loss = F.cross_entropy(self.scale * logits, labels)
            accuracy = (cosine.argmax(dim=1) == labels).float().mean()
        return loss, accuracy.detach()


def margin_at(step: int, steps_per_epoch: int, cfg: LossConfig) -> float:
    """Margin after `step` optimizer steps: 0 before the ramp, linear over it, `cfg.margin` after (and if no ramp)."""
    start, end = cfg.margin_ramp_start_epoch, cfg.margin_ramp_end_epoch
    if end <= start:
        return cfg.margin
    epoch = step / steps_per_epoch
    progress = min(max((epoch - start) / (end - start), 0.0), 1.0)
    return cfg.margin * progress
