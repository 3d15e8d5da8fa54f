"""`ecapa-accel plot` on a synthetic run directory: metrics.jsonl plus an evaluation scores file."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
from conftest import run_cli
from matplotlib.image import imread

ALL_PLOTS = {"loss_accuracy.png", "schedule.png", "throughput.png", "validation_eer.png", "det.png"}


def write_run(run_dir, evaluations=True):
    """Two epochs of 10 logged steps each, an evaluation after each epoch with its scores file."""
    rng = np.random.default_rng(0)
    records = []
    for step in range(10, 201, 10):
        records.append({"type": "train", "step": step, "epoch": step // 100, "loss": 12 * math.exp(-step / 80),
                        "acc": 1 - math.exp(-step / 60), "lr": 0.2 * min(1.0, step / 50) * (1 - step / 250),
                        "margin": min(0.2, step / 500), "samples_per_s": 250 + rng.normal(0, 10), "time": step})
        if step % 100 == 0:
            records.append({"type": "epoch", "step": step, "epoch": step // 100, "loss": 12 * math.exp(-step / 80),
                            "acc": 1 - math.exp(-step / 60), "bad_files": 0})
            if evaluations:
                labels = rng.random(400) < 0.3
                scores = rng.normal(size=400) + (1.0 + step / 100) * labels
                (run_dir / "eval").mkdir(parents=True, exist_ok=True)
                (run_dir / f"eval/step_{step}.txt").write_text(
                    "".join(f"{s:.6f} {int(l)}\n" for s, l in zip(scores, labels)))
                records.append({"type": "eval", "step": step, "epoch": step // 100, "eer": 30.0 - step / 10,
                                "min_dcf": 0.9 - step / 1000, "threshold": 0.5, "scores": f"eval/step_{step}.txt"})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def assert_real_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 400 and height >= 300
    pixels = imread(path)
    assert pixels[..., :3].std() > 0.05  # drawn content, not a blank canvas
    assert len(data) > 10_000


def test_plot_writes_every_plot_of_a_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    write_run(run_dir)
    code, out, err = run_cli(capsys, "plot", run_dir)
    assert code == 0, err
    written = {line.rsplit("/", 1)[-1] for line in out.splitlines()}
    assert written == ALL_PLOTS
    for name in ALL_PLOTS:
        assert_real_png(run_dir / "plots" / name)


def test_plot_skips_what_is_absent_and_says_so(tmp_path, capsys):
    run_dir = tmp_path / "run"
    write_run(run_dir, evaluations=False)
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"type": "train", "step": 210, "lo')  # a kill cut the last line short
    code, out, _ = run_cli(capsys, "plot", run_dir)
    assert code == 0
    assert "skipped validation_eer.png: no evaluation records" in out
    assert "skipped det.png: no evaluation record with a scores file" in out
    assert sorted((run_dir / "plots").iterdir()) == sorted(run_dir / "plots" / n for n in ALL_PLOTS - {
        "validation_eer.png", "det.png"})

    # An evaluation whose scores file is gone: the DET curve is skipped, the EER plot still drawn.
    with open(run_dir / "metrics.jsonl", "w") as handle:
        handle.write(json.dumps({"type": "eval", "step": 5, "eer": 20.0, "min_dcf": 0.8, "scores": "eval/x.txt"}))
    code, out, _ = run_cli(capsys, "plot", run_dir)
    assert code == 0
    assert "skipped det.png: the scores file of the last evaluation is missing" in out
    assert_real_png(run_dir / "plots" / "validation_eer.png")


@pytest.mark.parametrize("make, message", [
    (lambda run: None, "run directory not found"),
    (lambda run: run.mkdir(), "metrics.jsonl: not found"),
    (lambda run: (run.mkdir(), (run / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')),
     "metrics.jsonl line 2: not a JSON object"),
])
def test_plot_bad_run_dir_exits_2(tmp_path, capsys, make, message):
    run_dir = tmp_path / "run"
    make(run_dir)
    code, out, err = run_cli(capsys, "plot", run_dir)
    assert code == 2
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_metrics_and_plots_import_without_torch_or_soundfile():
    import subprocess
    import sys

    code = ("import sys, ecapa_accel.metrics, ecapa_accel.plot, ecapa_accel as ea; "
            "assert ea.compute_eer([0.1, 0.9, 0.2, 0.8], [0, 1, 0, 1]) == 0.0; "
            "heavy = {'torch', 'soundfile', 'datasets'} & set(sys.modules); assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
