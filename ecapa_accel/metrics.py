"""Verification metrics on score lists: DET curve, EER, minDCF. numpy only (plots import it without torch).

A trial is accepted when its score is >= the threshold. The EER is where the miss and false-alarm rates of the
step-wise DET curve cross, linearly interpolated between the two thresholds around the crossing; minDCF is the
normalised detection cost minimised over every threshold (including "reject all").
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import UserError

DEFAULT_P_TARGET = 0.01


def _as_numpy(values, dtype) -> np.ndarray:
    torch = sys.modules.get("torch")  # a torch tensor can only exist once torch is imported
    if torch is not None and isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype).reshape(-1)


@dataclass(frozen=True)
class DetCurve:
    """Miss and false-alarm rates at every distinct threshold (ascending scores, then +inf = reject all)."""

    thresholds: np.ndarray
    miss: np.ndarray  # fraction of target trials scoring below the threshold
    false_alarm: np.ndarray  # fraction of non-target trials scoring at or above it

    def eer_point(self) -> tuple[float, float]:
        """(EER as a fraction, threshold): the crossing of the miss and false-alarm curves.

        The threshold is the score, among those on either side of the crossing, where the two rates are closest.
        """
        gap = self.false_alarm - self.miss  # never increases with the threshold; gap[0] = 1, gap[-1] = -1
        after = int(np.argmax(gap <= 0))
        before = after - 1
        fraction = gap[before] / (gap[before] - gap[after])
        eer = self.miss[before] + fraction * (self.miss[after] - self.miss[before])
        closest = after if -gap[after] <= gap[before] and np.isfinite(self.thresholds[after]) else before
        return float(eer), float(self.thresholds[closest])

    def min_dcf_point(self, p_target: float = DEFAULT_P_TARGET, c_miss: float = 1.0,
                      c_fa: float = 1.0) -> tuple[float, int]:
        """(normalised minDCF, index of the threshold where it is reached)."""
        if not 0 < p_target < 1 or c_miss <= 0 or c_fa <= 0:
            raise ValueError("p_target must be within (0, 1) and the costs positive")
        cost = c_miss * p_target * self.miss + c_fa * (1 - p_target) * self.false_alarm
        best = int(np.argmin(cost))
        return float(cost[best] / min(c_miss * p_target, c_fa * (1 - p_target))), best


def det_curve(scores, labels) -> DetCurve:
    """Error rates of `scores` (higher = more likely the same speaker) against `labels` (1 target, 0 non-target)."""
    scores = _as_numpy(scores, np.float64)
    labels = _as_numpy(labels, np.float64)
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 1 (target) or 0 (non-target)")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    targets = np.sort(scores[labels == 1])
    nontargets = np.sort(scores[labels == 0])
    if targets.size == 0 or nontargets.size == 0:
        raise UserError(
            f"scoring needs target and non-target trials; got {targets.size} target, {nontargets.size} non-target"
        )
    thresholds = np.append(np.unique(scores), np.inf)
    miss = np.searchsorted(targets, thresholds, side="left") / targets.size
    false_alarm = 1.0 - np.searchsorted(nontargets, thresholds, side="left") / nontargets.size
    return DetCurve(thresholds, miss, false_alarm)


def compute_eer(scores, labels) -> float:
    """Equal error rate in percent."""
    return 100.0 * det_curve(scores, labels).eer_point()[0]


def compute_eer_threshold(scores, labels) -> float:
    """The score threshold (accept score >= threshold) where the miss and false-alarm rates are closest."""
    return det_curve(scores, labels).eer_point()[1]


def compute_min_dcf(scores, labels, p_target: float = DEFAULT_P_TARGET, c_miss: float = 1.0,
                    c_fa: float = 1.0) -> float:
    """Minimum normalised detection cost: min over thresholds of DCF / min(c_miss * p_target, c_fa * (1 - p_target))."""
    return det_curve(scores, labels).min_dcf_point(p_target, c_miss, c_fa)[0]


def check_p_targets(p_targets: Sequence[float]) -> list[float]:
    """The prior probabilities of a target trial to report minDCF at; each within (0, 1)."""
    p_targets = list(p_targets)
    if not p_targets:
        raise UserError("--p-target: give at least one value")
    for p in p_targets:
        if not 0 < p < 1:
            raise UserError(f"--p-target must be within (0, 1), got {p:g}")
    return p_targets


def score_report(scores, labels, p_targets: Sequence[float] | None = None) -> dict:
    """`{"eer" (percent), "min_dcf", "trials", "threshold"}` of one score list.

    min_dcf is at p_target 0.01, or at the first of `p_targets`; with `p_targets` given, "min_dcf_at" maps each
    (written with %g, e.g. "0.01") to its minDCF.
    """
    curve = det_curve(scores, labels)
    eer, threshold = curve.eer_point()
    chosen = check_p_targets(p_targets) if p_targets is not None else [DEFAULT_P_TARGET]
    at = {f"{p:g}": curve.min_dcf_point(p)[0] for p in chosen}
    report = {"eer": 100.0 * eer, "min_dcf": at[f"{chosen[0]:g}"], "trials": len(labels),
              "threshold": threshold}
    if p_targets is not None:
        report["min_dcf_at"] = at
    return report
