"""AAM-softmax loss: ArcFace values, stability at cos = +-1 under bf16 autocast, training, margin schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from ecapa_accel.config import LossConfig
from ecapa_accel.loss import AAMSoftmax, margin_at


def unit_vectors_at_angles(angles: list[float]) -> torch.Tensor:
    """2-d unit vectors at the given angles (radians) from the x axis."""
    angles = torch.tensor(angles, dtype=torch.float64)
    return torch.stack([angles.cos(), angles.sin()], dim=1).float()


def arcface_loss(theta_target: float, theta_other: float, scale: float, margin: float, easy: bool = False) -> float:
    """Two-class ArcFace loss written from the angles, as the papers state it."""
    if easy:
        target = math.cos(theta_target + margin) if math.cos(theta_target) > 0 else math.cos(theta_target)
    elif theta_target + margin <= math.pi:
        target = math.cos(theta_target + margin)
    else:
        target = math.cos(theta_target) - margin * math.sin(math.pi - margin)
    logits = torch.tensor([scale * target, scale * math.cos(theta_other)], dtype=torch.float64)
    return -torch.log_softmax(logits, dim=0)[0].item()


@pytest.mark.parametrize(
    "theta, margin, easy",
    [(1.0, 0.2, False), (0.3, 0.0, False), (3.0, 0.3, False), (2.0, 0.2, True), (1.2, 0.2, True)],
    ids=["margin", "no-margin", "past-pi-fallback", "easy-beyond-90deg", "easy-within-90deg"],
)
def test_loss_equals_arcface_written_from_angles(theta, margin, easy):
    head = AAMSoftmax(embed_dim=2, num_classes=2, scale=32.0, margin=margin, easy_margin=easy)
    with torch.no_grad():
        head.weight.copy_(unit_vectors_at_angles([0.0, 1.5]) * 3.0)  # class weights need not be unit length
    embedding = unit_vectors_at_angles([theta]) * 0.5
    loss, _ = head(embedding, torch.tensor([0]))
    assert loss.item() == pytest.approx(arcface_loss(theta, abs(1.5 - theta), 32.0, margin, easy), rel=1e-4, abs=1e-5)


def test_margin_argument_overrides_configured_margin():
    torch.manual_seed(0)
    head = AAMSoftmax(embed_dim=8, num_classes=5, margin=0.3)
    embeddings, labels = torch.randn(6, 8), torch.randint(0, 5, (6,))
    plain = AAMSoftmax(embed_dim=8, num_classes=5, margin=0.0)
    plain.load_state_dict(head.state_dict())
    assert head(embeddings, labels, margin=0.0)[0].item() == pytest.approx(plain(embeddings, labels)[0].item())
    assert head(embeddings, labels)[0] > plain(embeddings, labels)[0]


@pytest.mark.parametrize("easy_margin", [False, True])
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["on-class", "opposite-class"])
def test_gradients_finite_under_bf16_autocast_when_cosine_is_plus_or_minus_one(sign, easy_margin):
    torch.manual_seed(0)
    head = AAMSoftmax(embed_dim=16, num_classes=4, margin=0.2, easy_margin=easy_margin)
    with torch.no_grad():
        head.weight.copy_(2.0 * torch.eye(4, 16))  # cosines come out exactly +-1 and 0
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    embeddings = (sign * head.weight.detach()[labels]).clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, accuracy = head(embeddings.bfloat16(), labels)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isfinite(embeddings.grad).all() and torch.isfinite(head.weight.grad).all()
    assert accuracy.item() == (1.0 if sign > 0 else 0.0)


def test_training_on_separable_data_lowers_the_loss_and_classifies_everything():
    torch.manual_seed(0)
    centres = F.normalize(torch.randn(4, 8), dim=1)
    labels = torch.arange(4).repeat_interleave(8)
    embeddings = centres[labels] + 0.1 * torch.randn(32, 8)
    head = AAMSoftmax(embed_dim=8, num_classes=4, scale=16.0, margin=0.2)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9)
    first_loss, _ = head(embeddings, labels)
    for _ in range(40):
        loss, accuracy = head(embeddings, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final_loss, final_accuracy = head(embeddings, labels)
    assert final_loss < 0.3 * first_loss
    assert final_accuracy.item() == 1.0


def test_accuracy_is_the_fraction_whose_nearest_class_is_their_label():
    head = AAMSoftmax(embed_dim=2, num_classes=3, margin=0.5)
    with torch.no_grad():
        head.weight.copy_(unit_vectors_at_angles([0.0, 2.0, 4.0]))
    # The last embedding is nearest class 0 (0.9 rad vs 1.1 rad) although with the margin class 1 scores higher.
    embeddings = unit_vectors_at_angles([0.1, 2.1, 4.1, 0.9])
    _, accuracy = head(embeddings, torch.tensor([0, 1, 2, 0]))
    assert accuracy.item() == 1.0
    _, accuracy = head(embeddings, torch.tensor([0, 2, 2, 1]))
    assert accuracy.item() == 0.5


def test_margin_schedule_ramps_linearly_between_epochs():
    cfg = LossConfig(margin=0.2, margin_ramp_start_epoch=2.0, margin_ramp_end_epoch=4.0)
    steps_per_epoch = 100
    assert margin_at(0, steps_per_epoch, cfg) == 0.0
    assert margin_at(199, steps_per_epoch, cfg) == 0.0
    assert margin_at(200, steps_per_epoch, cfg) == 0.0
    assert margin_at(250, steps_per_epoch, cfg) == pytest.approx(0.05)
    assert margin_at(300, steps_per_epoch, cfg) == pytest.approx(0.1)
    assert margin_at(400, steps_per_epoch, cfg) == pytest.approx(0.2)
    assert margin_at(10_000, steps_per_epoch, cfg) == pytest.approx(0.2)


def test_margin_schedule_without_ramp_is_the_full_margin_from_the_start():
    cfg = LossConfig(margin=0.3, margin_ramp_start_epoch=5.0, margin_ramp_end_epoch=5.0)
    assert margin_at(0, 10, cfg) == 0.3
    assert margin_at(1000, 10, cfg) == 0.3
