"""Training and evaluation plots (PNG, matplotlib Agg) from RUN_DIR/metrics.jsonl and the evaluation score files."""

from __future__ import annotations

from pathlib import Path
from statistics import NormalDist
from typing import Callable

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .errors import UserError
from .metrics import det_curve
from .rundir import RunDir

_DET_TICKS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.95, 0.99)


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl (the run directory's own reader: a last line cut short is ignored)."""
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise UserError(f"{run_dir}: run directory not found")
    if not run.metrics.is_file():
        raise UserError(f"{run.metrics}: not found (has the run logged anything yet?)")
    return run.read_metrics()


def _series(records: list[dict], kind: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [(r["step"], r[key]) for r in records if r.get("type") == kind and isinstance(r.get(key), (int, float))]
    steps, values = zip(*rows) if rows else ((), ())
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def _new_figure(rows: int, title: str) -> tuple[Figure, list]:
    figure = Figure(figsize=(8, 3.2 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    figure.suptitle(title)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("optimizer step")
    return figure, list(axes)


def _plot_series(ax, records: list[dict], key: str, label: str, scale: float = 1.0) -> None:
    steps, values = _series(records, "train", key)
    ax.plot(steps, values * scale, label=f"{label}, per log window", linewidth=1)
    epoch_steps, epoch_values = _series(records, "epoch", key)
    if epoch_steps.size:
        ax.plot(epoch_steps, epoch_values * scale, "o", label=f"{label}, epoch mean")
    ax.legend(loc="best")


def _loss_accuracy(records: list[dict], out: Path) -> str | None:
    steps, loss = _series(records, "train", "loss")
    if not steps.size:
        return "no training records with 'loss'"
    figure, (loss_ax, acc_ax) = _new_figure(2, "Training loss and accuracy")
    _plot_series(loss_ax, records, "loss", "loss")
    loss_ax.set_ylabel("AAM-softmax loss")
    if (loss > 0).all():
        loss_ax.set_yscale("log")
    _plot_series(acc_ax, records, "acc", "accuracy", scale=100.0)  # logged as a fraction
    acc_ax.set_ylabel("training accuracy (%)")
    figure.savefig(out, dpi=100)
    return None


def _schedule(records: list[dict], out: Path) -> str | None:
    lr_steps, lr = _series(records, "train", "lr")
    margin_steps, margin = _series(records, "train", "margin")
    if not lr_steps.size and not margin_steps.size:
        return "no training records with 'lr' or 'margin'"
    figure, (lr_ax, margin_ax) = _new_figure(2, "Learning rate and AAM margin schedules")
    lr_ax.plot(lr_steps, lr)
    lr_ax.set_ylabel("learning rate")
    if lr.size and (lr > 0).all():
        lr_ax.set_yscale("log")
    margin_ax.plot(margin_steps, margin)
    margin_ax.set_ylabel("AAM margin (radians)")
    figure.savefig(out, dpi=100)
    return None


def _throughput(records: list[dict], out: Path) -> str | None:
    steps, rate = _series(records, "train", "samples_per_s")
    if not steps.size:
        return "no training records with 'samples_per_s'"
    figure, (ax,) = _new_figure(1, "Training throughput")
    ax.plot(steps, rate)
    ax.set_ylabel("samples / s (all processes)")
    ax.set_ylim(bottom=0)
    figure.savefig(out, dpi=100)
    return None


def _validation(records: list[dict], out: Path) -> str | None:
    steps, eer = _series(records, "eval", "eer")
    if not steps.size:
        return "no evaluation records"
    dcf_steps, min_dcf = _series(records, "eval", "min_dcf")
    figure, (eer_ax, dcf_ax) = _new_figure(2, "Validation trials")
    eer_ax.plot(steps, eer, "o-")
    eer_ax.set_ylabel("EER (%)")
    eer_ax.margins(y=0.2)  # room for the label of the best point
    best = int(np.argmin(eer))
    eer_ax.annotate(f"best {eer[best]:.2f}% at step {steps[best]:.0f}", (steps[best], eer[best]),
                    textcoords="offset points", xytext=(0, 10), ha="center")
    dcf_ax.plot(dcf_steps, min_dcf, "o-", color="tab:orange")
    dcf_ax.set_ylabel("minDCF (p_target 0.01)")
    figure.savefig(out, dpi=100)
    return None


def _read_scores(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Scores and labels from lines ending in "score label" (the last score column of `eval --scores` files)."""
    scores, labels = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            scores.append(float(fields[-2]))
            labels.append(int(fields[-1]))
        except (ValueError, IndexError):
            raise UserError(f"{path} line {number}: expected 'score label', got {line.strip()!r}") from None
    return np.asarray(scores), np.asarray(labels)


def _probit(rates: np.ndarray, low: float, high: float) -> np.ndarray:
    normal = NormalDist()
    return np.array([normal.inv_cdf(p) for p in np.clip(rates, low, high)])


def _det(run_dir: Path, records: list[dict], out: Path) -> str | None:
    evaluations = [r for r in records if r.get("type") == "eval" and r.get("scores")]
    if not evaluations:
        return "no evaluation record with a scores file"
    last = evaluations[-1]
    scores_path = run_dir / last["scores"]
    if not scores_path.is_file():
        return f"the scores file of the last evaluation is missing: {scores_path}"
    try:
        scores, labels = _read_scores(scores_path)
        curve = det_curve(scores, labels)
    except (UserError, ValueError) as error:
        return f"cannot use {scores_path}: {error}"
    eer, _ = curve.eer_point()
    min_dcf, best = curve.min_dcf_point()
    nonzero = np.concatenate([curve.miss, curve.false_alarm, [eer]])
    smallest = nonzero[nonzero > 0].min(initial=0.01)
    low = max((tick for tick in _DET_TICKS if tick <= smallest), default=_DET_TICKS[0])
    high = _DET_TICKS[-1]
    ticks = [tick for tick in _DET_TICKS if low <= tick <= high]

    figure = Figure(figsize=(6.5, 6.5), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    ax.plot(_probit(curve.false_alarm, low, high), _probit(curve.miss, low, high), label="DET curve")
    ax.plot(_probit(np.array([low, high]), low, high), _probit(np.array([low, high]), low, high), "k:", linewidth=0.8,
            label="miss = false alarm")
    eer_xy = _probit(np.array([eer]), low, high)[0]
    ax.plot(eer_xy, eer_xy, "o", color="tab:red", label=f"EER {100 * eer:.2f}%")
    ax.plot(_probit(curve.false_alarm[best:best + 1], low, high), _probit(curve.miss[best:best + 1], low, high), "s",
            color="tab:green", label=f"minDCF {min_dcf:.3f} (p_target 0.01)")
    positions = _probit(np.array(ticks), low, high)
    tick_labels = [f"{100 * tick:g}" for tick in ticks]
    ax.set_xticks(positions, tick_labels)
    ax.set_yticks(positions, tick_labels)
    ax.set_xlim(positions[0], positions[-1])
    ax.set_ylim(positions[0], positions[-1])
    ax.set_xlabel("false-alarm rate (%, probit scale)")
    ax.set_ylabel("miss rate (%, probit scale)")
    ax.set_title(f"DET curve at step {last['step']} ({labels.size} trials)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right")
    figure.savefig(out, dpi=100)
    return None


def plot_run(run_dir: str | Path, on_skip: Callable[[str], None] | None = None) -> list[Path]:
    """Write RUN_DIR/plots/*.png from the run's metrics; returns the files written.

    A plot whose data is absent is skipped; `on_skip` receives one line saying which and why.
    """
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    plots = {
        "loss_accuracy.png": lambda out: _loss_accuracy(records, out),
        "schedule.png": lambda out: _schedule(records, out),
        "throughput.png": lambda out: _throughput(records, out),
        "validation_eer.png": lambda out: _validation(records, out),
        "det.png": lambda out: _det(run_dir, records, out),
    }
    written = []
    for name, draw in plots.items():
        reason = draw(out_dir / name)
        if reason is None:
            written.append(out_dir / name)
        elif on_skip is not None:
            on_skip(f"skipped {name}: {reason}")
    return written
