"""One training job per run directory: an OS-level lock on RUN_DIR/.lock, held by the job's main process.

The lock is `filelock.FileLock` (flock(2)): the kernel releases it when its holder dies, whatever the cause
(exit, exception, kill -9), so a dead job never blocks the next one. Beside it, RUN_DIR/.lock.holder names the
holder (host, pid, start time) so that a refused job can say who holds the directory; a holder file left behind
by a job that died without releasing is how the next job knows it took over a stale lock.

Only the main process (rank 0) of a job locks; the other ranks of the same job are never refused. The outcome
travels from rank 0 to every rank before any of them goes on, so a refused multi-process job ends on every
rank with the same one-line error instead of leaving ranks waiting in a collective.

Network file systems: flock on NFS is forwarded to the server as a POSIX lock (Linux >= 2.6.12 clients, NFSv3
with lockd or NFSv4). It is released when the holder process dies; if the holder's node crashes, the server
frees it after its lease time (NFSv4: about 90 s). Where the file system has no flock at all (ENOSYS),
filelock falls back to a marker file that a crash leaves behind; then the holder file's pid is checked when
the holder ran on this host (a dead pid means a stale lock), and a holder on another host must be cleared by
hand (delete RUN_DIR/.lock after checking that job is gone).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from .errors import UserError

LOCK = ".lock"
HOLDER = ".lock.holder"


def _read_holder(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / HOLDER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # no holder file, or one cut short by a crash


def _describe(holder: dict | None) -> str:
    if not holder:
        return "an unknown job (no holder file)"
    return f"pid {holder.get('pid')} on host {holder.get('host')}"


def _holder_is_dead(holder: dict | None) -> bool:
    """Only meaningful where flock is missing: a holder on this host whose pid no longer exists."""
    if not holder or holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError, KeyError):
        return False
    return False


def _acquire(run_dir: Path) -> tuple[FileLock | None, dict | str]:
    """(held lock, holder record) or (None, refusal message). Creates RUN_DIR: call only after validation."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / LOCK), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        holder = _read_holder(run_dir)
        if not _holder_is_dead(holder):
            return None, (f"{run_dir}: in use by another training job ({_describe(holder)}); "
                          "wait for it to end or use another --run-dir")
        (run_dir / LOCK).unlink(missing_ok=True)  # a marker lock (no flock here) left by a dead process
        lock = FileLock(str(run_dir / LOCK), timeout=0)
        lock.acquire()
    previous = _read_holder(run_dir)
    if previous is not None:
        print(f"{run_dir}: stale lock of {_describe(previous)} (that job ended without releasing it) taken over",
              file=sys.stderr)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
          "job": uuid.uuid4().hex}
    (run_dir / HOLDER).write_text(json.dumps(me) + "\n", encoding="utf-8")
    return lock, me


@contextmanager
def run_lock(run_dir: str | Path, accelerator=None) -> Iterator[None]:
    """Hold RUN_DIR's lock for the job while the block runs; raise UserError on every rank if another live job
    holds it, or if some rank does not see the main process's run directory (not on a shared file system).
    `accelerator` (an `accelerate.Accelerator`, or None for one process) tells which process is the main one
    and carries the outcome to the others."""
    run_dir = Path(run_dir)
    several = accelerator is not None and accelerator.num_processes > 1
    lock, outcome = None, None
    if accelerator is None or accelerator.is_main_process:
        try:
            lock, outcome = _acquire(run_dir)
        except OSError as error:  # reported on every rank like a refusal, so that none waits for rank 0
            outcome = f"{run_dir}: cannot lock the run directory: {error.strerror or error}"
    try:
        if several:
            from accelerate.utils import broadcast_object_list

            outcome = broadcast_object_list([outcome], from_process=0)[0]
        if isinstance(outcome, str):
            raise UserError(outcome)
        if several:
            _check_shared(run_dir, outcome, accelerator)
        yield
    finally:
        if lock is not None:
            (run_dir / HOLDER).unlink(missing_ok=True)
            lock.release()


def _check_shared(run_dir: Path, holder: dict, accelerator) -> None:
    """Every rank must see the holder file the main process just wrote, or checkpoints would be split over
    machines; a few seconds of retries cover NFS attribute caching."""
    from accelerate.utils import gather_object

    deadline = time.monotonic() + 10
    while (seen := _read_holder(run_dir) == holder) is False and time.monotonic() < deadline:
        time.sleep(0.5)
    blind = [rank for rank, ok in enumerate(gather_object([seen])) if not ok]
    if blind:
        raise UserError(f"{run_dir}: not the same directory on every machine (rank {', '.join(map(str, blind))} "
                        f"cannot see {HOLDER} written by rank 0 on {holder['host']}); "
                        "--run-dir must be on a file system shared by all machines")
