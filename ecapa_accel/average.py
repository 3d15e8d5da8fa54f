"""Checkpoint averaging: an export folder whose weights are the element-wise mean of several checkpoints.

WeSpeaker averages its last checkpoints (`average_model.py`) before scoring and before large-margin fine-tuning;
`ecapa-accel average` does the same with a run's complete checkpoints. Every floating-point tensor of the
embedding network (parameters and BatchNorm running mean/variance) is the mean over the chosen checkpoints;
integer buffers (BatchNorm's `num_batches_tracked`, a count that has no meaningful mean) take the newest chosen
checkpoint's value. The AAM head is not part of an export. A running run can be averaged: only complete
checkpoints are read, and one pruned by the run while it is read is reported, not half-used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .checkpoint import complete_checkpoints, find_checkpoint
from .config import load_config
from .encoder import CONFIG_FILE, EcapaEncoder
from .errors import UserError
from .model import build_model
from .rundir import RunDir, atomic_folder

CHECKPOINT_WEIGHTS = "model.safetensors"  # written by accelerator.save_state: the embedding network and the head
EMBEDDING_PREFIX = "embedding."


def parse_steps(text: str) -> list[int]:
    """`--steps 800,900,1000` -> [800, 900, 1000]."""
    try:
        steps = [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"--steps: expected comma-separated step numbers such as 800,900,1000, got {text!r}") from None
    return steps


def choose_checkpoints(run_dir: Path, last: int | None = None, steps: Sequence[int] | None = None) -> list[Path]:
    """The complete checkpoints to average, oldest first: the newest `last`, the given `steps`, or all of them."""
    if last is not None and steps is not None:
        raise UserError("give --last N or --steps A,B,C, not both")
    available = complete_checkpoints(run_dir)
    if not available:
        raise UserError(f"{run_dir}: no complete checkpoint to average")
    names = ", ".join(path.name for path in available)
    if steps is not None:
        repeated = sorted({step for step in steps if list(steps).count(step) > 1})
        if repeated:
            raise UserError(f"--steps: step {repeated[0]} is given twice")
        steps = sorted(steps)
    elif last is not None and last < 1:
        raise UserError(f"--last must be at least 1, got {last}")
    elif last is not None and last > len(available):
        raise UserError(f"--last {last}: {run_dir} has only {len(available)} complete checkpoint(s) ({names})")
    else:
        chosen = available if last is None else available[-last:]
        steps = [_step_of(path) for path in chosen]
    return [find_checkpoint(run_dir, step) for step in steps]  # UserError naming an unknown or damaged step


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("step_"))  # complete checkpoints are named step_<N>


def average_weights(checkpoints: Sequence[Path]) -> dict[str, torch.Tensor]:
    """The embedding network's tensors averaged over `checkpoints` (oldest first); integer tensors from the last."""
    sums: dict[str, torch.Tensor] = {}
    newest: dict[str, torch.Tensor] = {}
    for checkpoint in checkpoints:
        weights = _read_embedding(checkpoint)
        if newest and weights.keys() != newest.keys():
            raise UserError(f"{checkpoint}: holds other tensors than {checkpoints[0].name}")
        for key, value in weights.items():
            if value.is_floating_point():
                sums[key] = sums[key] + value.double() if key in sums else value.double()
        newest = weights
    return {key: (sums[key] / len(checkpoints)).to(value.dtype) if key in sums else value
            for key, value in newest.items()}


def _read_embedding(checkpoint: Path) -> dict[str, torch.Tensor]:
    path = checkpoint / CHECKPOINT_WEIGHTS
    try:
        weights = load_file(str(path))
    except FileNotFoundError:
        raise UserError(f"{path}: gone while averaging (pruned by the running run?); run average again") from None
    except (OSError, SafetensorError) as error:
        raise UserError(f"{path}: not a readable safetensors file ({error})") from None
    embedding = {key.removeprefix(EMBEDDING_PREFIX): value for key, value in weights.items()
                 if key.startswith(EMBEDDING_PREFIX)}
    if not embedding:
        raise UserError(f"{path}: no '{EMBEDDING_PREFIX}*' tensors (not an ecapa-accel checkpoint)")
    return embedding


def average_run(run_dir: str | Path, last: int | None = None, steps: Sequence[int] | None = None,
                out_dir: str | Path | None = None) -> str:
    """`ecapa-accel average`: write the averaged export folder (default RUN_DIR/export_avg<N>); returns one line."""
    run = RunDir(run_dir)
    run.require_run()
    cfg = load_config(run.config)
    checkpoints = choose_checkpoints(run_dir, last, steps)
    out_dir = Path(out_dir) if out_dir is not None else run.path / f"export_avg{len(checkpoints)}"
    if out_dir.exists() and not (out_dir / CONFIG_FILE).is_file():
        raise UserError(f"{out_dir}: exists and is not an export folder; choose another --out")
    step_numbers = [_step_of(checkpoint) for checkpoint in checkpoints]
    embedding = build_model(cfg.model, cfg.features.n_mels)
    weights = average_weights(checkpoints)
    try:
        embedding.load_state_dict(weights)
    except RuntimeError as error:
        raise UserError(f"{checkpoints[-1]}: does not match the run's model config ({str(error).splitlines()[0]})"
                        ) from None
    encoder = EcapaEncoder(embedding, cfg.features, cfg.data.sample_rate, averaged_steps=step_numbers)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out_dir) as temporary:  # a kill leaves the previous folder or the new one
        encoder.save_pretrained(temporary)
    listed = ", ".join(str(step) for step in step_numbers)
    return f"averaged {len(checkpoints)} checkpoint(s) (steps {listed}) into {out_dir}"

