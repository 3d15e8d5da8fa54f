"""Checkpoint policy: when to save, how to save atomically, which checkpoints are intact, what to prune.

A checkpoint is `accelerator.save_state` written into `checkpoints/.step_<N>.tmp`, completed by our
`trainer_state.json` (the data position and counters, plus the size and sha256 of every file beside it),
flushed to disk, then renamed to `checkpoints/step_<N>`. A rename is atomic, so a kill at any instant leaves
either the old set of complete checkpoints or the new one; dot-prefixed folders are never loaded and are swept
away by the next run. Before a checkpoint is loaded (resume, status, export) its files are verified against the
recorded sizes and checksums, so a damaged newest checkpoint is skipped for the newest intact one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import StorageError, UserError
from .files import sha256_file
from .rundir import RunDir, fsync_dir, fsync_tree, storage_errors

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step_(\d+)$")
# What accelerate's save_state writes for one model + optimizer + scheduler (legacy checkpoints have no file list).
_REQUIRED = ("model.safetensors", "optimizer.bin", "scheduler.bin")


@dataclass
class TrainerState:
    """Where the run stands; saved with every checkpoint (the data stream restarts from epoch + position)."""

    step: int = 0  # optimizer steps completed
    epoch: int = 0  # current epoch of the mixed stream
    position: int = 0  # samples of the current epoch already consumed
    bad_files: int = 0  # unreadable files replaced so far
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient
    best_eer: float | None = None
    best_step: int | None = None
    finished: bool = False
    # The LR schedule's horizon and, once a resume changed it, the (step, lr) the curve was re-planned from.
    horizon: int = 0
    lr_anchor: list[float] = field(default_factory=list)
    last_threshold: list[float] = field(default_factory=list)  # (step, EER threshold) of the newest validation

    def advance(self, batch_size: int, samples_per_epoch: int, total_steps: int) -> bool:
        """Count one optimizer step over `batch_size` samples; True when it ended the epoch."""
        self.step += 1
        self.position += batch_size
        end_of_epoch = self.position + batch_size > samples_per_epoch
        if end_of_epoch:
            self.epoch += 1
            self.position = 0
        self.finished = self.step >= total_steps
        return end_of_epoch


def _state_from_json(values) -> TrainerState:
    """A TrainerState from parsed JSON, every field type-checked (a damaged file must not half-load)."""
    if not isinstance(values, dict):
        raise ValueError("not a JSON object")
    hints = {f.name: f.type for f in dataclasses.fields(TrainerState)}
    kwargs = {}
    for name, value in values.items():
        if name == "files":
            continue
        if name not in hints:
            continue  # written by another version; not needed to resume
        expected = {"int": int, "bool": bool, "float | None": (float, int, type(None)),
                    "int | None": (int, type(None)), "list[float]": list}[hints[name]]
        if isinstance(value, bool) and expected is int or not isinstance(value, expected):
            raise ValueError(f"'{name}' has the wrong type ({type(value).__name__})")
        kwargs[name] = value
    for name in ("step", "epoch", "position"):
        if name not in kwargs or kwargs[name] < 0:
            raise ValueError(f"'{name}' is missing or negative")
    return TrainerState(**kwargs)


def read_state(checkpoint: Path) -> TrainerState:
    """The trainer state of a checkpoint (ValueError/OSError when it is damaged)."""
    return _state_from_json(json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8")))


def _file_list(folder: Path) -> dict[str, dict]:
    return {str(path.relative_to(folder)): {"size": path.stat().st_size, "sha256": sha256_file(path)}
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != STATE_FILE}


def damage(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint folder (None when it is intact): the file and the problem."""
    try:
        values = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
        _state_from_json(values)
    except FileNotFoundError:
        return f"{STATE_FILE} is missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError, TypeError) as error:
        return f"{STATE_FILE} is unreadable ({error})"
    files = values.get("files")
    if files is None:  # written before checkpoints listed their files
        missing = [name for name in _REQUIRED if not (checkpoint / name).is_file()]
        return f"{missing[0]} is missing" if missing else None
    if not isinstance(files, dict):
        return f"{STATE_FILE} is unreadable (bad file list)"
    for name, expected in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected.get("size"):
            return f"{name} is truncated or changed ({path.stat().st_size} bytes, expected {expected.get('size')})"
        if sha256_file(path) != expected.get("sha256"):
            return f"{name} does not match its checksum"
    return None


def _step_folders(run: RunDir) -> list[tuple[int, Path]]:
    if not run.checkpoints.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in run.checkpoints.iterdir() if (m := _NAME.match(path.name))]
    return sorted(found)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints whose write completed (`step_<N>` holding a trainer state), oldest first; not verified."""
    return [path for _, path in _step_folders(RunDir(run_dir)) if (path / STATE_FILE).is_file()]


def find_checkpoint(run_dir: Path, step: int | None = None, on_damaged=None) -> Path | None:
    """The newest intact checkpoint, or the one for `step` (UserError if it is absent or damaged).

    Damaged checkpoints met on the way are reported through `on_damaged(message)` and skipped; when folders
    exist but none is intact, that is a UserError naming the damage.
    """
    folders = _step_folders(RunDir(run_dir))
    if step is not None:
        for number, path in folders:
            if number == step:
                problem = damage(path)
                if problem:
                    raise UserError(f"{path}: damaged checkpoint: {problem}")
                return path
        available = ", ".join(path.name for _, path in folders) or "none"
        raise UserError(f"{RunDir(run_dir).checkpoints}: no checkpoint step_{step} (present: {available})")
    problems = []
    for _, path in reversed(folders):  # newest first: only what is newer than the newest intact one is hashed
        problem = damage(path)
        if problem is None:
            return path
        problems.append(_skipped(path, problem))
        if on_damaged is not None:
            on_damaged(problems[-1])
    _refuse_if_none_intact(problems, intact_found=False)
    return None


def _skipped(path: Path, problem: str) -> str:
    return f"{path}: damaged checkpoint skipped: {problem}"


def _refuse_if_none_intact(problems: list[str], intact_found: bool) -> None:
    if problems and not intact_found:
        raise UserError(f"{problems[0]}; no intact checkpoint is left (start a new --run-dir, or repair it)")


def sweep_incomplete(run_dir: Path) -> None:
    """Remove what a killed run left half-written (dot-prefixed folders)."""
    run = RunDir(run_dir)
    if run.checkpoints.is_dir():
        for path in run.checkpoints.iterdir():
            if path.name.startswith("."):
                shutil.rmtree(path, ignore_errors=True)


class CheckpointSaver:
    """Owns *when* to checkpoint (every N steps, every M minutes, end of epoch, end of run, stop request), how
    (atomically, keeping the newest K) and the best-model policy (lowest validation EER so far)."""

    def __init__(self, accelerator, run_dir: Path, every_steps: int, every_minutes: float, keep: int):
        self.accelerator = accelerator
        self.folder = RunDir(run_dir).checkpoints
        self.every_steps = every_steps
        self.every_seconds = every_minutes * 60
        self.keep = keep
        self.last_save_time = time.monotonic()

    def due_by_time(self) -> bool:
        """This process's clock says a timed checkpoint is due (processes agree on it before acting)."""
        return self.every_seconds > 0 and time.monotonic() - self.last_save_time >= self.every_seconds

    def should_save(self, state: TrainerState, end_of_epoch: bool, time_due: bool, stop_requested: bool) -> bool:
        by_steps = self.every_steps > 0 and state.step % self.every_steps == 0
        return by_steps or time_due or end_of_epoch or state.finished or stop_requested

    @staticmethod
    def is_new_best(state: TrainerState, eer: float) -> bool:
        """Record a validation result; True when it is the best so far (keep_best then exports it)."""
        if state.best_eer is not None and eer >= state.best_eer:
            return False
        state.best_eer, state.best_step = eer, state.step
        return True

    def save(self, state: TrainerState) -> Path:
        """Collective: every process calls it. Returns the complete checkpoint folder.

        A failed write (e.g. a full disk) on any process fails the save on all of them with one StorageError,
        after removing the partial folder; the complete checkpoints before it are untouched."""
        accelerator = self.accelerator
        final = self.folder / f"step_{state.step}"
        temporary = self.folder / f".step_{state.step}.tmp"
        failure = None
        if accelerator.is_main_process:
            failure = _attempt(final, lambda: (shutil.rmtree(temporary, ignore_errors=True),
                                               temporary.mkdir(parents=True)))
        if not self._all_succeeded(failure):
            self._fail(failure, temporary)
        failure = _attempt(final, lambda: accelerator.save_state(str(temporary)))
        if not self._all_succeeded(failure):
            self._fail(failure, temporary)
        if accelerator.is_main_process:
            failure = _attempt(final, lambda: self._complete(state, temporary, final))
        if not self._all_succeeded(failure):
            self._fail(failure, temporary)
        self.last_save_time = time.monotonic()
        return final

    def _complete(self, state: TrainerState, temporary: Path, final: Path) -> None:
        record = {**dataclasses.asdict(state), "files": _file_list(temporary)}
        (temporary / STATE_FILE).write_text(json.dumps(record), encoding="utf-8")
        fsync_tree(temporary)
        # Only a folder without a trainer state (never loaded) can stand here: it must not block the rename.
        shutil.rmtree(final, ignore_errors=True)
        os.rename(temporary, final)
        fsync_dir(self.folder)
        for old in complete_checkpoints(self.folder.parent)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def _all_succeeded(self, failure: Exception | None) -> bool:
        """A barrier that also tells every process whether any of them failed."""
        import torch

        flag = torch.tensor([failure is not None], dtype=torch.int64, device=self.accelerator.device)
        return int(self.accelerator.reduce(flag, reduction="sum").item()) == 0

    def _fail(self, failure: Exception | None, temporary: Path) -> None:
        if self.accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
        if failure is None:
            failure = StorageError(f"{temporary.parent}: another process failed to write the checkpoint")
        raise failure


def _attempt(final: Path, write) -> Exception | None:
    """Run one part of a checkpoint write; return its StorageError instead of raising (bugs still raise)."""
    try:
        with storage_errors(final, "the checkpoint"):
            write()
    except StorageError as error:
        return error
    return None


def run_status(run_dir: Path) -> dict:
    """`ecapa-accel status`: newest intact checkpoint's step and epoch, intact checkpoints, finished flag."""
    run = RunDir(run_dir)
    run.require_run()
    survey = [(step, path, damage(path)) for step, path in reversed(_step_folders(run))]  # each hashed once
    intact = [(step, path) for step, path, problem in survey if problem is None]
    newest_step, newest = intact[0] if intact else (-1, None)
    # Like resume, report the damaged checkpoints newer than the one it would resume from.
    damaged = [_skipped(path, problem) for step, path, problem in survey if problem and step > newest_step]
    _refuse_if_none_intact(damaged, intact_found=newest is not None)
    state = read_state(newest) if newest else TrainerState()
    return {
        "run_dir": str(run.path),
        "step": state.step,
        "epoch": state.epoch,
        "checkpoints": [path.name for _, path in reversed(intact)],
        "finished": state.finished,
        "damaged": damaged,
        "export": run.export.is_dir(),  # exports are renamed into place whole: present means complete
    }
