"""Runs that survive a cluster, through the real commands: pre-emption signals through each launcher, one job per
run directory, two machines on loopback and a one-process resume.

Each case starts its command in a new session, as a scheduler would, and signals either that process (the
launcher) or its whole process group (SLURM, Ctrl-C). By default one case per launcher and way of signalling is
run (the file stays around three minutes on two cores); ECAPA_ACCEL_FULL_MATRIX=1 runs every combination.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import write_tone_corpus
from test_train import assert_identical, cli, tiny_config, tree, wait_for

pytestmark = pytest.mark.slow

STEPS = 30  # long enough that a signal sent after step 2 lands mid-run
CPU_LAUNCH = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
LAUNCHERS = {
    "train": ["-m", "ecapa_accel.cli", "train"],
    "accelerate-1": ["-m", "accelerate.commands.launch", *CPU_LAUNCH, "--num_processes", "1", "-m", "ecapa_accel.train"],
    "launch-1": ["-m", "ecapa_accel.cli", "launch", *CPU_LAUNCH, "--num_processes", "1"],
    "launch-2": ["-m", "ecapa_accel.cli", "launch", *CPU_LAUNCH, "--multi_gpu", "--num_processes", "2"],
}
CPU_ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}  # same math in and out of a launcher


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    return root, tiny_config(root, lambda name, **kwargs: write_tone_corpus(root, name, **kwargs), max_steps=STEPS,
                             checkpoint_every_steps=100)


@pytest.fixture(autouse=True)
def no_job_left_behind(corpus):
    """A failed case must not leave its job training (and loading the machine) under the next ones."""
    yield
    for process in job_processes(corpus[0]):
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def start(launcher: str, config: Path, run: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *LAUNCHERS[launcher], str(config), "--run-dir", str(run), *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CPU_ENV,
                            start_new_session=True)


def job_processes(run: Path) -> list[psutil.Process]:
    """Every live process of a job (launcher, agent, ranks, data workers): they all name the run directory."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        if str(run) in " ".join(process.info["cmdline"] or []) and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [record["step"] for record in records if record["type"] == "train"]


def weights(run: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step}" / "model.safetensors"))


def signal_job(process: subprocess.Popen, run: Path, delivery: str) -> tuple[int, float]:
    """Signal a running job once it has logged two steps; (the signal's exit status, seconds to exit)."""
    if delivery == "term-early":  # while the ranks are still starting (importing, validating the data)
        wait_for(lambda: any("accelerate.commands.launch" not in process.cmdline()
                             and "ecapa_accel.train" in process.cmdline() for process in job_processes(run)), process)
    else:
        wait_for(lambda: len(logged_steps(run)) >= 2, process)
    signum = signal.SIGINT if delivery.startswith("int") else signal.SIGTERM
    sent = time.monotonic()
    if delivery.endswith("group"):
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    if delivery == "term-twice":
        time.sleep(0.05)
        process.send_signal(signum)
    process.wait(timeout=120)
    return 128 + signum, time.monotonic() - sent


def assert_stopped_cleanly(process: subprocess.Popen, run: Path, expected_status: int) -> None:
    stderr = process.stderr.read()
    assert process.returncode == expected_status, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    plain = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip() and not line.startswith("train:")]
    assert len(plain) <= 5, plain
    assert not job_processes(run)
    with pytest.raises(ProcessLookupError):
        os.killpg(process.pid, 0)
    status = json.loads(cli("status", str(run), "--json").stdout)
    assert not status["finished"] and status["step"] == max(logged_steps(run)) < STEPS, status
    assert status["checkpoints"][-1] == f"step_{status['step']}"
    assert not [name for name in os.listdir(run / "checkpoints") if name.startswith(".")]


@pytest.fixture(scope="module")
def reference(corpus):
    """The uninterrupted one-process run's final weights."""
    root, config = corpus
    run = root / "reference"
    result = cli("train", str(config), "--run-dir", str(run), env=CPU_ENV)
    assert result.returncode == 0, result.stderr
    return weights(run)


@pytest.fixture(scope="module")
def two_machines(corpus):
    """Two `accelerate launch` "machines" on loopback, one process each: (run dir, results, final weights)."""
    root, config = corpus
    run = root / "two-machines"
    results = launch_machines(config, [run, run])
    return run, results, weights(run)


def start_machines(config: Path, run_dirs: list[Path], launcher: list[str]) -> list[subprocess.Popen]:
    """One launcher per "machine" on loopback (`--machine_rank` 0, 1, ...), one process each, own sessions."""
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [
        subprocess.Popen([sys.executable, *launcher, "--multi_gpu", "--num_processes", str(len(run_dirs)),
                          "--num_machines", str(len(run_dirs)), "--machine_rank", str(rank),
                          "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                          "--mixed_precision", "no", "--dynamo_backend", "no", *(["-m", "ecapa_accel.train"]
                          if "accelerate.commands.launch" in launcher else []), str(config), "--run-dir",
                          str(run_dir)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CPU_ENV,
                         start_new_session=True)
        for rank, run_dir in enumerate(run_dirs)
    ]


def launch_machines(config: Path, run_dirs: list[Path]) -> list[subprocess.CompletedProcess]:
    machines = start_machines(config, run_dirs, ["-m", "accelerate.commands.launch"])
    return [subprocess.CompletedProcess(m.args, m.wait(timeout=300), *m.communicate()) for m in machines]


CASES = [  # (launcher, delivery, resume and compare): each launcher, each signal, each way of delivering it
    ("train", "int-group", False),
    ("train", "term-twice", False),
    ("accelerate-1", "term-launcher", False),
    ("launch-1", "term-group", True),
    ("launch-2", "int-group", True),
    ("launch-2", "term-launcher", False),
    ("launch-2", "term-twice", False),
    ("launch-2", "term-early", False),
]
if os.environ.get("ECAPA_ACCEL_FULL_MATRIX"):
    CASES += [(launcher, delivery, False) for launcher in ("train", "launch-1", "launch-2")
              for delivery in ("term-launcher", "int-launcher", "term-group", "int-group", "term-twice")
              if (launcher, delivery, True) not in CASES and (launcher, delivery, False) not in CASES]


@pytest.mark.parametrize("launcher,delivery,resume", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_preempted_job_checkpoints_one_step_and_exits_with_the_signal(corpus, request, launcher, delivery, resume):
    root, config = corpus
    run = root / f"{launcher}-{delivery}"
    process = start(launcher, config, run)
    expected_status, seconds = signal_job(process, run, delivery)
    print(f"{launcher} {delivery}: exit {process.returncode} after {seconds:.1f} s")

    if launcher == "accelerate-1":
        # accelerate's own one-process launcher dies at once; its rank must not outlive it, and checkpoints.
        assert process.returncode in (expected_status, -signal.SIGTERM)
        deadline = time.monotonic() + 60
        while job_processes(run) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not job_processes(run), "the training process outlived its launcher"
        status = json.loads(cli("status", str(run), "--json").stdout)
        assert status["checkpoints"][-1] == f"step_{status['step']}" and status["step"] == max(logged_steps(run))
        return
    if delivery == "term-early":
        stderr = process.stderr.read()
        assert process.returncode == expected_status and "Traceback" not in stderr, stderr[-3000:]
        assert not job_processes(run)
        assert not (run / "checkpoints").is_dir() or not os.listdir(run / "checkpoints")
        return
    assert_stopped_cleanly(process, run, expected_status)
    if not resume:
        return
    if launcher == "launch-2":
        expected = request.getfixturevalue("two_machines")[2]  # the same two ranks, uninterrupted
        result = subprocess.run([sys.executable, *LAUNCHERS[launcher], str(config), "--run-dir", str(run)],
                                capture_output=True, text=True, env=CPU_ENV, timeout=300)
    else:
        expected = request.getfixturevalue("reference")
        result = cli("resume", str(run), env=CPU_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_identical(weights(run), expected)


def test_second_job_into_a_live_run_dir_is_refused_and_the_first_unaffected(corpus):
    root, config = corpus
    run = root / "shared-dir"
    first = start("train", config, run, "train.max_steps=100000")
    wait_for(lambda: len(logged_steps(run)) >= 1, first)
    before = {name: data for name, data in tree(run).items() if not name.startswith(("metrics", "logs", "check"))}

    sent = time.monotonic()
    second = cli("train", str(config), "--run-dir", str(run), env=CPU_ENV)
    print(f"second job refused after {time.monotonic() - sent:.1f} s")
    assert second.returncode == 2, second.stderr
    errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(run) in errors[0], second.stderr
    assert f"pid {first.pid}" in errors[0] and socket.gethostname() in errors[0], errors[0]
    assert "Traceback" not in second.stderr
    assert {name: tree(run)[name] for name in before} == before

    logged = len(logged_steps(run))
    wait_for(lambda: len(logged_steps(run)) > logged + 2, first)  # the first job trains on
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 143, stderr[-3000:]
    steps = logged_steps(run)
    assert steps == list(range(1, len(steps) + 1))  # one job's steps, nothing interleaved


def test_lock_of_a_killed_job_is_taken_over_and_the_resume_is_exact(corpus, reference):
    root, config = corpus
    run = root / "killed"
    process = start("train", config, run)
    wait_for(lambda: len(logged_steps(run)) >= 4, process)
    process.send_signal(signal.SIGKILL)
    process.wait()

    result = cli("resume", str(run), env=CPU_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    notices = [line for line in result.stderr.splitlines() if "stale lock" in line]
    assert len(notices) == 1 and "taken over" in notices[0] and f"pid {process.pid}" in notices[0], result.stderr
    assert_identical(weights(run), reference)
    assert not (run / ".lock.holder").exists()  # released at the end


def test_two_machines_on_loopback_then_one_process_keeps_the_global_batch(two_machines):
    run, results, _ = two_machines
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(cli("status", str(run), "--json").stdout)["step"] == STEPS

    result = cli("resume", str(run), f"train.max_steps={STEPS + 2}", env=CPU_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((run / "checkpoints" / f"step_{STEPS + 2}" / "trainer_state.json").read_text())
    assert state["epoch"] * 24 + state["position"] == (STEPS + 2) * 4  # 24 samples per epoch, 4 per step
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["samples_per_step"] for r in records if r["type"] == "train"] == [4] * (STEPS + 2)
    assert logged_steps(run) == list(range(1, STEPS + 3))


def test_machines_that_do_not_share_the_run_dir_fail_with_one_clear_line(corpus):
    root, config = corpus
    started = time.monotonic()
    results = launch_machines(config, [root / "machine-0", root / "machine-1"])
    assert time.monotonic() - started < 120  # an error, not a hang
    for result in results:
        assert result.returncode != 0
    for result in results:  # each machine's one rank says it, naming its own --run-dir
        lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and "shared by all machines" in lines[0], result.stderr[-3000:]


def test_a_signal_to_one_machine_stops_both_at_the_same_step(corpus):
    """SLURM may signal one node first: its ranks tell the others at the step's agreement, and the other node's
    `ecapa-accel launch`, never signalled, recognises its rank's 143 and exits 143 too."""
    root, config = corpus
    run = root / "two-machines-preempted"
    machines = start_machines(config, [run, run], ["-m", "ecapa_accel.cli", "launch"])
    wait_for(lambda: len(logged_steps(run)) >= 2, machines[0])
    os.killpg(machines[0].pid, signal.SIGTERM)
    for machine in machines:
        machine.wait(timeout=120)
    for machine in machines:
        assert_stopped_cleanly(machine, run, 128 + signal.SIGTERM)
