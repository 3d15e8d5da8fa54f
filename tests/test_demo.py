"""The demo end to end: synthetic corpus, training pre-empted by SIGTERM and resumed, held-out evaluation."""

from __future__ import annotations

import pytest

from ecapa_accel.checkpoint import run_status
from ecapa_accel.cli import main
from ecapa_accel.demo import run_demo

pytestmark = pytest.mark.slow  # CLI subprocesses: the slow tier

STEPS = 100  # the CLI's demo runs 300; 100 steps already learn the voices well past the references


def test_demo_is_preempted_resumes_and_beats_the_references_on_unseen_speakers(tmp_path, capfd):
    result = run_demo(tmp_path / "demo", steps=STEPS)
    out, err = capfd.readouterr()

    # The SIGTERM landed half way: the trainer checkpointed, exited 143, and `resume` carried on to the end.
    assert STEPS // 2 <= result["interrupted_at_step"] < STEPS
    assert f"stopped by SIGTERM at step {result['interrupted_at_step']}" in err
    assert "stopped with exit status 143" in out and "resumed from" in out + err
    status = run_status(result["run_dir"])
    assert status["finished"] and status["step"] == STEPS

    trained, baseline, untrained = result["trained"], result["baseline"], result["untrained"]
    assert trained["trials"] == baseline["trials"] == untrained["trials"] == 560
    assert trained["eer"] < baseline["eer"] and trained["eer"] < untrained["eer"], (trained, baseline, untrained)
    assert f"{trained['eer']:6.2f}" in out and f"{baseline['eer']:6.2f}" in out

    run_dir = result["run_dir"]
    assert (run_dir / "export" / "model.safetensors").is_file()
    assert {path.name for path in result["plots"]} >= {"loss_accuracy.png", "validation_eer.png", "det.png"}
    assert f"ecapa-accel eval {run_dir / 'export'}" in out

    # A second demo into the same folder would mix two runs: refused with one line, exit 2.
    with pytest.raises(SystemExit) as refused:
        main(["demo", str(tmp_path / "demo")])
    assert refused.value.code == 2
    assert "already holds a run" in capfd.readouterr().err
