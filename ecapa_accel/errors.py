"""Exceptions that end a command with a chosen exit status (the CLI and the entry module map them)."""

import signal


class UserError(Exception):
    """A bad config, CSV, path, key or resume request; the message is one line naming the culprit."""


class StorageError(UserError):
    """Writing into the run directory failed (disk full, permissions, ...): one line naming the path and the OS
    error; what was complete before stays complete, so the run resumes once the cause is fixed."""


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGINT after checkpointing; a scheduler should requeue (exit 143/130)."""

    def __init__(self, signum: int, step: int, run_dir):
        self.signal = signal.Signals(signum)
        self.step = step
        self.exit_code = 128 + int(self.signal)
        super().__init__(f"stopped by {self.signal.name} at step {step}; checkpoint saved; resume with "
                         f"`ecapa-accel resume {run_dir}`")
