"""`ecapa-accel launch [accelerate launch options] CONFIG --run-dir DIR [KEY=VALUE ...]`: accelerate's launcher,
made safe to pre-empt. This is the command for SLURM scripts and anything else that stops jobs with signals.

Why it exists (measured with accelerate 1.15 / torch 2.14): `accelerate launch` alone cannot end a pre-empted
job with 143/130. With one process its launcher dies at once on SIGTERM and leaves the training process running;
with several, torch elastic's agent turns the signal into a `SignalException` traceback and exit 1, and kills
ranks that take longer than 30 s to checkpoint.

What it does, and nothing more:
1. runs `python -m accelerate.commands.launch OPTIONS -m ecapa_accel.train CONFIG --run-dir DIR ...` as a child
   in its own session, with SIGTERM/SIGINT blocked in the launcher (the entry module unblocks them in each
   rank) and told to die with us (PR_SET_PDEATHSIG), so that only this process decides what a signal means;
2. on the first SIGTERM/SIGINT sends that signal once to every training rank (the launcher's children, also
   those that start later), then waits; the ranks finish the step, checkpoint it and exit 143/130;
3. when the ranks' outcome is a pre-emption (143/130) or a user error (2), drops the launcher's traceback and
   exits with that status; any other outcome shows all of the launcher's output and exits with its status.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time

import psutil

from .errors import UserError

PR_SET_PDEATHSIG = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
QUIET_OUTCOMES = (2, 128 + signal.SIGTERM, 128 + signal.SIGINT)  # user error, pre-empted by SIGTERM / SIGINT
# How the launcher reports a failed rank: torch elastic's summary (the root cause comes last) and the
# one-process launcher's CalledProcessError.
_RANK_EXIT = re.compile(rb"exitcode\s*:\s*(-?\d+)|returned non-zero exit status (-?\d+)")
# The launcher's own report: a traceback (held with all that follows), torch elastic's log lines (glog style,
# "E1202 06:32:42.949000 ..."; held one by one).
_TRACEBACK = b"Traceback (most recent call last):"
_ELASTIC_LOG = re.compile(rb"^[IWE]\d{4} \d\d:\d\d:\d\d")


def die_with_parent(signum: int) -> None:
    """Ask Linux to send `signum` to this process when its parent dies (no-op elsewhere). Used so that a rank
    never outlives its launcher, and the launcher never outlives `ecapa-accel launch`."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)


def _launcher_child_setup() -> None:
    # Blocked, not ignored: the ranks inherit the mask and unblock in the entry module, so a signal we forward
    # while a rank is still starting stays pending instead of being lost.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    die_with_parent(signal.SIGKILL)  # the ranks then get their own PDEATHSIG (SIGTERM) and checkpoint


def launcher_command(argv: list[str]) -> list[str]:
    """`accelerate launch` argv for `[accelerate options] CONFIG --run-dir DIR [KEY=VALUE ...]`.

    CONFIG is the last argument that is neither `--run-dir DIR` nor a KEY=VALUE override; what comes before it
    goes to accelerate's launcher unchanged (its own parser judges it, and would cost us a torch import)."""
    ours, rest, index = [], [], 0
    while index < len(argv):
        if argv[index] == "--run-dir" and index + 1 < len(argv):
            ours += argv[index:index + 2]
            index += 2
            continue
        (ours if argv[index].startswith("--run-dir=") else rest).append(argv[index])
        index += 1
    config_at = len(rest) - 1
    while config_at >= 0 and "=" in rest[config_at] and not rest[config_at].startswith("-"):
        config_at -= 1
    if config_at < 0 or rest[config_at].startswith("-") or not ours:
        raise UserError("ecapa-accel launch: expected [accelerate launch options] CONFIG --run-dir DIR "
                        "[KEY=VALUE ...]")
    return [sys.executable, "-m", "accelerate.commands.launch", *rest[:config_at], "-m", "ecapa_accel.train",
            rest[config_at], *ours, *rest[config_at + 1:]]


class _Relay:
    """Copies the launcher's stderr to ours as it comes, but holds back its report (traceback, elastic log
    lines) until the outcome says whether it is noise; repeated identical `error:` lines of several ranks are
    shown once."""

    def __init__(self, stream):
        self.stream = stream
        self.held: list[bytes] = []
        self.in_traceback = False
        self.errors_shown: set[bytes] = set()
        self.thread = threading.Thread(target=self._copy, daemon=True)
        self.thread.start()

    def _copy(self) -> None:
        pending = b""
        while chunk := os.read(self.stream.fileno(), 65536):
            pending += chunk
            *pieces, pending = re.split(rb"(?<=[\r\n])", pending)  # lines and tqdm's \r updates
            for piece in pieces:
                self._route(piece)
        if pending:
            self._route(pending)

    def _route(self, piece: bytes) -> None:
        self.in_traceback = self.in_traceback or piece.startswith(_TRACEBACK)
        if self.in_traceback or _ELASTIC_LOG.match(piece):
            self.held.append(piece)
            return
        if piece.startswith(b"error: "):
            if piece in self.errors_shown:
                return
            self.errors_shown.add(piece)
        sys.stderr.buffer.write(piece)
        sys.stderr.buffer.flush()

    def finish(self) -> bytes:
        self.thread.join()
        return b"".join(self.held)


def _outcome(launcher_status: int, report: bytes) -> int | None:
    """The ranks' exit status the launcher reports (elastic's root cause or the one process's), if any."""
    if launcher_status == 0:
        return 0
    found = _RANK_EXIT.findall(report)
    if not found:
        return None
    code = int(found[-1][0] or found[-1][1])
    return 128 - code if code < 0 else code  # a rank killed by signal N reads as 128 + N


def launch_training(argv: list[str]) -> int:
    """Run the training launcher for `argv` (OPTIONS CONFIG --run-dir DIR ...); return our exit status."""
    command = launcher_command(argv)
    env = {**os.environ, "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGHUP,SIGQUIT"}  # elastic leaves TERM/INT alone
    requested: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: requested.append(signum))
                for signum in STOP_SIGNALS}
    signalled: set[int] = set()
    try:
        launcher = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, start_new_session=True,
                                    preexec_fn=_launcher_child_setup)
        relay = _Relay(launcher.stderr)
        while launcher.poll() is None:
            if requested:  # forward the first signal once to each rank, including ranks still starting
                for rank in _children(launcher.pid):
                    if rank.pid not in signalled:
                        signalled.add(rank.pid)
                        _send(rank, requested[0])
            time.sleep(0.05)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    report = relay.finish()
    outcome = _outcome(launcher.returncode, report)
    if outcome in QUIET_OUTCOMES:
        # A pre-emption ends with the status of the signal we were sent (each rank saw that one first).
        return 128 + requested[0] if requested and outcome != 2 else outcome
    sys.stderr.buffer.write(report)  # after success: warnings only
    sys.stderr.buffer.flush()
    return 0 if outcome == 0 else launcher.returncode if launcher.returncode > 0 else 1


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []


def _send(process: psutil.Process, signum: int) -> None:
    try:
        process.send_signal(signum)
    except psutil.NoSuchProcess:
        pass
