"""Checkpoint policy: when to save, how to save atomically, which checkpoints are complete, what to prune.

A checkpoint is `accelerator.save_state` written into `checkpoints/.step_<N>.tmp`, completed by our
`trainer_state.json` (the data position and counters), flushed to disk, then renamed to `checkpoints/step_<N>`.
A rename is atomic, so a kill at any instant leaves either the old set of complete checkpoints or the new one;
dot-prefixed folders are never loaded and are swept away by the next run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

STATE_FILE = "trainer_state.json"
_COMPLETE = re.compile(r"^step_(\d+)$")


@dataclass
class TrainerState:
    """Where the run stands; saved with every checkpoint (the data stream restarts from epoch + position)."""

    step: int = 0  # optimizer steps completed
    epoch: int = 0  # current epoch of the mixed stream
    position: int = 0  # samples of the current epoch already consumed
    samples_seen: int = 0
    bad_files: int = 0  # unreadable files replaced so far
    world_size: int = 1  # process count that wrote the checkpoint
    best_eer: float | None = None
    finished: bool = False


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (`step_<N>` holding a trainer state), oldest first."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _COMPLETE.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def find_checkpoint(run_dir: Path, step: int | None = None) -> Path | None:
    """The newest complete checkpoint, or the one for `step` (UserError if that one is not complete)."""
    checkpoints = complete_checkpoints(run_dir)
    if step is None:
        return checkpoints[-1] if checkpoints else None
    for path in checkpoints:
        if path.name == f"step_{step}":
            return path
    available = ", ".join(p.name for p in checkpoints) or "none"
    raise UserError(f"{checkpoints_dir(run_dir)}: no complete checkpoint step_{step} (complete: {available})")


def read_state(checkpoint: Path) -> TrainerState:
    values = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    return TrainerState(**values)


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sweep_incomplete(run_dir: Path) -> None:
    """Remove what a killed run left half-written (dot-prefixed folders)."""
    folder = checkpoints_dir(run_dir)
    if folder.is_dir():
        for path in folder.iterdir():
            if path.name.startswith("."):
                shutil.rmtree(path, ignore_errors=True)


class CheckpointSaver:
    """Decides when to checkpoint (every N steps, every M minutes) and saves atomically, keeping the newest K."""

    def __init__(self, accelerator, run_dir: Path, every_steps: int, every_minutes: float, keep: int):
        self.accelerator = accelerator
        self.folder = checkpoints_dir(run_dir)
        self.every_steps = every_steps
        self.every_seconds = every_minutes * 60
        self.keep = keep
        self.last_save_time = time.monotonic()

    def due_by_steps(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def due_by_time(self) -> bool:
        return self.every_seconds > 0 and time.monotonic() - self.last_save_time >= self.every_seconds

    def save(self, state: TrainerState) -> Path:
        """Collective: every process calls it. Returns the complete checkpoint folder."""
        accelerator = self.accelerator
        final = self.folder / f"step_{state.step}"
        temporary = self.folder / f".step_{state.step}.tmp"
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(temporary))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (temporary / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state)), encoding="utf-8")
            _fsync_tree(temporary)
            # Only a folder without a trainer state (never loaded) can stand here: it must not block the rename.
            shutil.rmtree(final, ignore_errors=True)
            os.rename(temporary, final)
            _fsync_dir(self.folder)
            for old in complete_checkpoints(self.folder.parent)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        self.last_save_time = time.monotonic()
        return final


def run_status(run_dir: Path) -> dict:
    """`ecapa-accel status`: newest complete checkpoint's step and epoch, all complete checkpoints, finished flag."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.yaml)")
    checkpoints = complete_checkpoints(run_dir)
    state = read_state(checkpoints[-1]) if checkpoints else TrainerState()
    return {
        "run_dir": str(run_dir),
        "step": state.step,
        "epoch": state.epoch,
        "checkpoints": [path.name for path in checkpoints],
        "finished": state.finished,
    }
