"""The training loop: build -> prepare -> loop (accumulate, step, log, checkpoint) -> finish.

Run it with `accelerate launch -m ecapa_accel.train CONFIG --run-dir DIR [KEY=VALUE ...]` (the entry module
`train.py` calls this one) or `ecapa-accel train ...` (same code, one process). A run directory that already
holds a run is resumed.

The data loader is not passed through `accelerator.prepare`: our stream shards itself by global sample
position, which is what makes resume exact (also mid-epoch and with a different process count).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, broadcast, set_seed
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .checkpoint import CheckpointSaver, TrainerState, find_checkpoint, read_state, sweep_incomplete
from .config import Config, config_text, flatten, load_config, to_dict, unsafe_resume_changes
from .data import build_training_data
from .encoder import EcapaEncoder
from .errors import Preempted, UserError
from .features import FeatureExtractor
from .files import sha256_file
from .loss import AAMSoftmax, margin_at
from .model import EcapaTdnn, build_model
from .optim import build_optimizer, learning_rate
from .preflight import check_before_write
from .pretrained import apply_init, record_init, resolve_init
from .rundir import RunDir, atomic_folder, write_export_step
from .runlock import run_lock

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SpeakerClassifier(torch.nn.Module):
    """The embedding network plus its AAM-softmax head: what the optimizer trains."""

    def __init__(self, embedding: EcapaTdnn, head: AAMSoftmax):
        super().__init__()
        self.embedding = embedding
        self.head = head

    def forward(self, feats: torch.Tensor, labels: torch.Tensor, margin: float):
        return self.head(self.embedding(feats), labels, margin)


def batch_split(global_batch: int, processes: int, max_device_batch: int | None) -> tuple[int, int]:
    """(micro-batch per process, accumulation steps) whose product over processes is the global batch."""
    if global_batch % processes:
        raise UserError(f"train.batch_size={global_batch} must be divisible by the number of processes ({processes})")
    per_process = global_batch // processes
    accumulation = 1
    if max_device_batch:
        accumulation = math.ceil(per_process / max_device_batch)
        while per_process % accumulation:
            accumulation += 1
    return per_process // accumulation, accumulation


def _say(message: str) -> None:
    """One stderr line per node (every process of a job runs the same checks before the Accelerator exists)."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


def _manifest_fingerprints(cfg: Config) -> dict[str, str]:
    """sha256 of each dataset's manifest file: a manifest changed under a run cannot resume exactly."""
    prints = {}
    for dataset in cfg.data.datasets:
        source = Path(dataset.csv or dataset.shards)  # a pack's index file; folders and URLs are not hashed
        if source.is_file():
            prints[str(source)] = sha256_file(source)
    return prints


def _check_run_dir(cfg: Config, run: RunDir, step: int | None = None) -> Path | None:
    """Refuse incompatible reuse of a run directory; return the checkpoint to resume from, if any."""
    checkpoint = find_checkpoint(run.path, step, on_damaged=_say)
    if not run.is_run():
        if checkpoint is not None:
            raise UserError(f"{run.path}: holds checkpoints but no config.yaml; cannot resume it")
        return None
    changed = unsafe_resume_changes(_run_config(run), cfg)
    if changed:
        raise UserError(f"{run.config}: the run was started with a different '{changed[0]}'"
                        f" ({len(changed)} incompatible key(s)); use a new --run-dir")
    recorded = run.read_fingerprints()
    for csv, digest in _manifest_fingerprints(cfg).items():
        if recorded.get(csv, digest) != digest:
            raise UserError(f"{csv}: the manifest changed since the run started; an exact resume needs the same "
                            "rows (restore it, or start a new --run-dir)")
    return checkpoint


def _run_config(run: RunDir, overrides: list[str] | None = None) -> Config:
    """The resolved config a run was started with (RUN_DIR/config.yaml holds absolute paths), plus overrides."""
    run.require_run()
    return load_config(run.config, overrides)


def _build_accelerator(cfg: Config, run: RunDir) -> Accelerator:
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launcher and launcher != cfg.train.mixed_precision:
        _say(f"train.mixed_precision={cfg.train.mixed_precision} (config) is used; the launcher's "
             f"mixed precision '{launcher}' is ignored")
    return Accelerator(
        mixed_precision=cfg.train.mixed_precision,  # the YAML decides: it is part of the run's resolved config
        step_scheduler_with_optimizer=False,  # our schedule counts optimizer steps, not micro-steps
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(run.path), logging_dir=str(run.logs)),
    )


def _write_run_files(cfg: Config, run: RunDir, label_map: dict[str, int]) -> None:
    run.write_config_text(config_text(cfg))
    if run.read_label_map() is None:
        run.write_label_map(label_map)
    if not run.read_fingerprints():
        run.write_fingerprints(_manifest_fingerprints(cfg))
    sweep_incomplete(run.path)


class StopRequest:
    """Remembers SIGTERM/SIGINT so the loop can finish the current step, checkpoint and stop; restores the
    caller's handlers on exit."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.signal = self.signal or signum


class WindowMeter:
    """Loss, accuracy and throughput averaged over the micro-batches since `start_step` (the last log line, or
    the start of the epoch)."""

    def __init__(self, start_step: int = 0):
        self.start_step, self.start = start_step, time.perf_counter()
        self.loss, self.accuracy, self.micro_batches, self.samples = 0.0, 0.0, 0, 0

    def add(self, loss: torch.Tensor, accuracy: torch.Tensor, samples: int) -> None:
        self.loss += loss.detach().float()
        self.accuracy += accuracy.detach().float()
        self.micro_batches += 1
        self.samples += samples

    def record(self, kind: str, state: TrainerState, lr: float, margin: float) -> dict:
        elapsed = time.perf_counter() - self.start
        return {"type": kind, "step": state.step, "epoch": state.epoch,
                "loss": float(self.loss) / self.micro_batches, "acc": float(self.accuracy) / self.micro_batches,
                "lr": lr, "margin": margin, "samples_per_s": self.samples / elapsed,
                "samples_per_step": self.samples // max(1, state.step - self.start_step),
                "bad_files": state.bad_files, "skipped_steps": state.skipped_steps, "time": time.time()}


class NonFiniteGuard:
    """Keeps a non-finite loss or gradient from reaching the weights: the optimizer step is skipped (see
    `_gradients_finite`), BatchNorm statistics are put back as they were before the batch, the step is counted,
    and too many in a row fail the run naming the batch's files."""

    def __init__(self, cfg):
        self.max_in_a_row = cfg.max_nonfinite_steps
        self.in_a_row = 0
        self.buffers: list[torch.Tensor] | None = None

    def remember(self, net) -> None:
        if self.buffers is None:  # first micro-batch of an optimizer step
            self.buffers = [buffer.clone() for buffer in net.buffers()]

    def settle(self, net, finite: bool, state: TrainerState, batch_paths) -> None:
        if not finite:
            with torch.no_grad():
                for buffer, saved in zip(net.buffers(), self.buffers):
                    buffer.copy_(saved)
        self.buffers = None
        self.in_a_row = 0 if finite else self.in_a_row + 1
        state.skipped_steps += not finite
        if self.in_a_row > self.max_in_a_row:
            paths = batch_paths()
            shown = ", ".join(paths[:4]) + (f" (+{len(paths) - 4} more)" if len(paths) > 4 else "")
            raise UserError(f"train: {self.in_a_row} optimizer steps in a row had a non-finite loss or gradient "
                            f"(last: step {state.step + 1}, batch {shown}); more than train.max_nonfinite_steps="
                            f"{self.max_in_a_row}: check optim.lr and the audio")


def export_model(embedding: EcapaTdnn, cfg: Config, out_dir: Path, step: int | None = None,
                 threshold: float | None = None) -> Path:
    """Write an export folder atomically: a crash leaves the previous export or the new one, never a torn one.
    `step`, when given, is recorded inside it (the training step whose weights it holds); `threshold` is the
    EER threshold of a validation of those weights (`verify` then decides same/different)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out_dir) as temporary:
        EcapaEncoder(embedding, cfg.features, cfg.data.sample_rate, threshold=threshold).save_pretrained(temporary)
        if step is not None:
            write_export_step(temporary, step)
    return out_dir


def export_run(run_dir: Path, out_dir: Path | None = None, step: int | None = None) -> str:
    """`ecapa-accel export`: write an export folder from an intact checkpoint (default: the newest)."""
    run = RunDir(run_dir)
    cfg = _run_config(run)
    checkpoint = find_checkpoint(run.path, step, on_damaged=_say)
    if checkpoint is None:
        raise UserError(f"{run.path}: no complete checkpoint to export")
    weights = load_file(str(checkpoint / "model.safetensors"))
    embedding = build_model(cfg.model, cfg.features.n_mels)
    embedding.load_state_dict({k.removeprefix("embedding."): v for k, v in weights.items() if k.startswith("embedding.")})
    out_dir = Path(out_dir) if out_dir is not None else run.export
    export_model(embedding, cfg, out_dir)
    return f"exported {checkpoint.name} to {out_dir}"


def _build_trainable(cfg: Config, data, init, state: TrainerState, steps_per_epoch: int):
    """The network (embedding + AAM head, optionally from pretrained weights), its optimizer and LR schedule."""
    net = SpeakerClassifier(
        build_model(cfg.model, cfg.features.n_mels),
        AAMSoftmax(cfg.model.embed_dim, data.num_classes, cfg.loss.scale, cfg.loss.margin, cfg.loss.easy_margin),
    )
    if init is not None:
        _say(apply_init(init, net.embedding, net.head, data.label_map))
    optimizer = build_optimizer(net.parameters(), cfg.optim)
    # Reads `state` at every step: a resume that moves the horizon re-plans the curve in place.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate(
        step, steps_per_epoch, state.horizon, cfg.optim, state.lr_anchor) / cfg.optim.lr)
    return net, optimizer, scheduler


def _plan(cfg: Config, run: RunDir, resume_step: int | None):
    """Every check that can run before anything is written: (checkpoint to resume, data, steps per epoch,
    schedule horizon, steps to train)."""
    check_before_write(cfg, run.path)
    resume_from = _check_run_dir(cfg, run, resume_step)
    data = build_training_data(cfg, label_map=run.read_label_map())
    steps_per_epoch = data.samples_per_epoch // cfg.train.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"data: one epoch holds {data.samples_per_epoch} samples, fewer than "
                        f"train.batch_size={cfg.train.batch_size}")
    horizon = cfg.train.epochs * steps_per_epoch  # where the LR schedule ends; max_steps only stops the run
    total_steps = horizon if cfg.train.max_steps is None else min(horizon, cfg.train.max_steps)
    return resume_from, data, steps_per_epoch, horizon, total_steps


def train(cfg: Config, run_dir: str | Path, resume_step: int | None = None) -> Path:
    """Train (or resume) the run in `run_dir`; returns the export folder of the finished run.

    `resume_step` picks the checkpoint to resume (default: the newest intact one). Raises `Preempted` after
    checkpointing when SIGTERM/SIGINT asked the run to stop."""
    run = RunDir(run_dir)
    resume_from, data, steps_per_epoch, horizon, total_steps = _plan(cfg, run, resume_step)
    init = resolve_init(cfg) if resume_from is None else None  # model.init_from is read at step 0 only
    cfg = record_init(cfg, init, run.config)  # config.yaml keeps where the weights came from

    with ExitStack() as cleanup:
        stop = cleanup.enter_context(StopRequest())  # entered first: the caller's handlers come back last
        # ---- build
        accelerator = _build_accelerator(cfg, run)
        cleanup.callback(accelerator.end_training)  # trackers closed on every path; runs after the loop's waits
        cleanup.enter_context(run_lock(run.path, accelerator))  # one job per run dir; before any write
        if resume_from is None and run.is_run():
            _say(f"{run.path}: no complete checkpoint yet; starting at step 0")
        # The split needs the process count, which only the Accelerator knows (PartialState ignores ACCELERATE_USE_CPU).
        micro_batch, accelerator.gradient_accumulation_steps = batch_split(
            cfg.train.batch_size, accelerator.num_processes, cfg.train.max_device_batch_size
        )
        if accelerator.is_main_process:
            _write_run_files(cfg, run, data.label_map)
        accelerator.wait_for_everyone()
        set_seed(cfg.train.seed)
        front_end = FeatureExtractor(cfg.features, cfg.data.sample_rate).to(accelerator.device)
        state = read_state(resume_from) if resume_from is not None else TrainerState(horizon=horizon)
        net, optimizer, scheduler = _build_trainable(cfg, data, init, state, steps_per_epoch)

        # ---- prepare
        net, optimizer, scheduler = accelerator.prepare(net, optimizer, scheduler)
        if accelerator.is_main_process:
            run.truncate_metrics(state.step)  # what a killed run logged after its checkpoint is redone
        if resume_from is not None:
            accelerator.load_state(str(resume_from))
            accelerator.step = 0  # micro-step counter: restart on an optimizer-step boundary (accumulation may differ)
            _replan_horizon(accelerator, run, state, horizon, cfg.optim.warmup_epochs * steps_per_epoch,
                            scheduler)
        state.finished = state.step >= total_steps
        saver = CheckpointSaver(accelerator, run.path, cfg.train.checkpoint_every_steps,
                                cfg.train.checkpoint_every_minutes, cfg.train.keep_checkpoints)
        accelerator.init_trackers("train", config={k: str(v) for k, v in flatten(to_dict(cfg)).items()})
        progress = cleanup.enter_context(tqdm(total=total_steps, initial=state.step, desc="train", unit="step",
                                              disable=not accelerator.is_local_main_process, dynamic_ncols=True))
        if resume_from is not None and accelerator.is_local_main_process:  # tqdm.write ignores `disable`
            progress.write(f"resumed from {resume_from} (epoch {state.epoch}, sample {state.position})",
                           file=sys.stderr)

        # ---- loop
        net.train()
        meter, epoch_meter = WindowMeter(state.step), WindowMeter(state.step)
        guard, step_bad = NonFiniteGuard(cfg.train), 0
        # Whether to stop is decided by all processes together at each step: a signal that reaches one of them
        # after that agreement waits for the next one, or ranks would leave the loop at different steps and hang
        # (one process needs no agreement).
        stopping = False
        while not state.finished and not stopping:
            batches = data.batches(state.epoch, state.position, micro_batch, accelerator.process_index,
                                   accelerator.num_processes, cfg.data.num_workers)
            steps_before = state.step
            for batch in batches:
                waves = batch["waves"].to(accelerator.device, non_blocking=True)
                labels = batch["labels"].to(accelerator.device, non_blocking=True)
                step_bad += int(batch["bad"].sum())
                guard.remember(net)
                with accelerator.accumulate(net):
                    with torch.no_grad():
                        feats = front_end(waves)
                    loss, accuracy = net(feats, labels, margin_at(state.step, steps_per_epoch, cfg.loss))
                    accelerator.backward(loss)
                    finite = _gradients_finite(accelerator, net, cfg.optim.grad_clip)
                    if finite or accelerator.scaler is not None:  # fp16: the GradScaler skips and rescales itself
                        optimizer.step()
                    optimizer.zero_grad()
                meter.add(loss, accuracy, len(labels) * accelerator.num_processes)
                epoch_meter.add(loss, accuracy, len(labels) * accelerator.num_processes)
                if not accelerator.sync_gradients:
                    continue

                # ---- one optimizer step done (or skipped for a non-finite value)
                guard.settle(net, finite, state, lambda: data.paths_at(state.epoch, batch["index"].tolist()))
                scheduler.step()
                end_of_epoch = state.advance(cfg.train.batch_size, data.samples_per_epoch, total_steps)
                bad_files, stop_requested, time_due = _agree(accelerator, step_bad, stop.signal, saver.due_by_time())
                state.bad_files, step_bad = state.bad_files + bad_files, 0
                stopping = stop_requested or (accelerator.num_processes == 1 and stop.signal is not None)
                stop.signal = stop.signal or (signal.SIGTERM if stop_requested else None)
                progress.update(1)
                lr, margin = scheduler.get_last_lr()[0], margin_at(state.step, steps_per_epoch, cfg.loss)
                if state.step % cfg.train.log_every_steps == 0 or state.finished:
                    meter = _log(accelerator, run, meter.record("train", state, lr, margin), progress)
                if end_of_epoch:
                    epoch_meter = _log(accelerator, run, epoch_meter.record("epoch", state, lr, margin))
                _check_bad_fraction(state, cfg.train.batch_size, data.samples_per_epoch, cfg.data.max_bad_fraction)
                if cfg.eval.trials and (end_of_epoch or state.finished or (
                        cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0)):
                    _validate(accelerator, net, cfg, run, state)
                if saver.should_save(state, end_of_epoch, time_due, stopping):
                    saver.save(state)
                if end_of_epoch or state.finished or stopping:
                    break
            del batches  # closes the DataLoader workers before the next epoch's loader forks new ones
            if state.step == steps_before and not state.finished and not stopping:
                raise UserError(f"data: epoch {state.epoch} yielded no complete batch from sample {state.position}; "
                                "did a manifest shrink under the run?")

        # ---- finish
        if state.finished and accelerator.is_main_process and not _best_export_kept(cfg, run, state):
            threshold = state.last_threshold[1] if state.last_threshold[:1] == [state.step] else None
            export_model(accelerator.unwrap_model(net).embedding, cfg, run.export, step=state.step,
                         threshold=threshold)
        if state.finished and accelerator.is_main_process:
            print(_summary(run, state), file=sys.stderr)
        accelerator.wait_for_everyone()  # end_training (on leaving the block) ends the process group
    if stopping:
        raise Preempted(stop.signal, state.step, run.path)
    return run.export


def _gradients_finite(accelerator: Accelerator, net, grad_clip: float) -> bool:
    """At an optimizer step: clip, and tell whether the gradient norm is finite (the same on every process,
    since DDP has averaged the gradients). Between micro-steps there is nothing to check."""
    if not accelerator.sync_gradients:
        return True
    if grad_clip > 0:
        norm = accelerator.clip_grad_norm_(net.parameters(), grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in net.parameters() if p.grad is not None])
    return bool(torch.isfinite(norm))


def _agree(accelerator: Accelerator, bad_files: int, stop_signal, time_due: bool) -> tuple[int, bool, bool]:
    """All processes agree on the bad-file count, on stopping and on a timed checkpoint (one all-reduce)."""
    local = torch.tensor([bad_files, stop_signal is not None, time_due], dtype=torch.int64, device=accelerator.device)
    bad_files, stop_requested, time_due = accelerator.reduce(local, reduction="sum").tolist()
    return bad_files, bool(stop_requested), bool(time_due)


def _replan_horizon(accelerator: Accelerator, run: RunDir, state: TrainerState, horizon: int,
                    warmup_steps: float, scheduler) -> None:
    """A resume that changes train.epochs moves the end of the LR schedule: the rest of the cosine is re-planned
    from the LR in effect now, so the LR never jumps (printed once, recorded in metrics.jsonl). Changing
    train.max_steps only moves where the run stops and leaves the schedule as it was."""
    if state.horizon == horizon:
        return
    if state.horizon == 0:  # a checkpoint written before horizons were recorded
        state.horizon = horizon
        return
    current = scheduler.get_last_lr()[0]
    previous, state.horizon = state.horizon, horizon
    if state.step >= warmup_steps:  # during warmup the cosine has not started: it simply ends elsewhere
        state.lr_anchor = [state.step, current]
    if accelerator.is_main_process:
        run.append_metrics({"type": "schedule", "step": state.step, "lr": current, "horizon": horizon,
                            "previous_horizon": previous})
        print(f"train.epochs changed: the LR schedule now ends at step {horizon} (was {previous}); it continues "
              f"from its current value {current:.3g} at step {state.step}, without a jump", file=sys.stderr)


def _summary(run: RunDir, state: TrainerState) -> str:
    """The one line a finished run ends with."""
    losses = [record["loss"] for record in run.read_metrics() if record["type"] == "train"]
    parts = [f"finished: {state.step} steps", f"final loss {losses[-1]:.3f}" if losses else None,
             f"best EER {state.best_eer:.2f}% at step {state.best_step}" if state.best_eer is not None else None,
             f"{state.skipped_steps} non-finite steps skipped" if state.skipped_steps else None,
             f"export {run.export}"]
    return ", ".join(part for part in parts if part)


def _best_export_kept(cfg: Config, run: RunDir, state: TrainerState) -> bool:
    """keep_best: the export already holds the best validated step (exports are atomic, so it is complete)."""
    return cfg.eval.keep_best and state.best_step is not None and run.export_step() == state.best_step


def _log(accelerator: Accelerator, run: RunDir, record: dict, progress: tqdm | None = None) -> WindowMeter:
    """Write a record to metrics.jsonl (main process) and the trackers; returns a fresh meter for the next window."""
    if accelerator.is_main_process:
        run.append_metrics(record)
    scalars = {f"{record['type']}/{k}": v for k, v in record.items() if isinstance(v, (int, float))
               and k not in ("step", "time")}
    accelerator.log(scalars, step=record["step"])
    if progress is not None:
        progress.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['acc']:.3f}", lr=f"{record['lr']:.2e}",
                             sps=f"{record['samples_per_s']:.0f}")
    return WindowMeter(record["step"])


def _check_bad_fraction(state: TrainerState, batch_size: int, samples_per_epoch: int, max_fraction: float) -> None:
    # Measured against at least one epoch so that a few bad files early on do not end the run.
    samples_seen = state.step * batch_size
    if state.bad_files > max_fraction * max(samples_seen, samples_per_epoch):
        raise UserError(f"data: {state.bad_files} unreadable audio files replaced in {samples_seen} samples, "
                        f"more than data.max_bad_fraction={max_fraction}; run `ecapa-accel data check` on the CSVs")


def _validate(accelerator: Accelerator, net, cfg: Config, run: RunDir, state: TrainerState) -> None:
    """Score the validation trials on the main process and log EER/minDCF; other processes wait."""
    from .evaluate import validate

    if accelerator.is_main_process:
        embedding = accelerator.unwrap_model(net).embedding
        encoder = EcapaEncoder(embedding, cfg.features, cfg.data.sample_rate).to(accelerator.device).eval()
        scores = run.scores_file(state.step)
        with torch.no_grad():
            result = validate(encoder, cfg.eval, scores)
        embedding.train()
        record = {"type": "eval", "step": state.step, "epoch": state.epoch, "eer": result["eer"],
                  "min_dcf": result["min_dcf"], "threshold": result["threshold"],
                  "scores": str(scores.relative_to(run.path))}
        _log(accelerator, run, record)
        if CheckpointSaver.is_new_best(state, result["eer"]) and cfg.eval.keep_best:
            export_model(embedding, cfg, run.export, step=state.step, threshold=result["threshold"])
        state.last_threshold = [state.step, result["threshold"]]
    # Every process keeps the same trainer state, so the best result travels from the main process.
    best = torch.tensor([state.best_eer if state.best_eer is not None else -1.0,
                         state.best_step if state.best_step is not None else -1],
                        dtype=torch.float64, device=accelerator.device)
    best_eer, best_step = broadcast(best, from_process=0).tolist()
    state.best_eer, state.best_step = (None, None) if best_step < 0 else (best_eer, int(best_step))


def resume(run_dir: str | Path, overrides: list[str] | None = None, step: int | None = None) -> Path:
    """`ecapa-accel resume DIR [--step N] [KEY=VALUE ...]`: continue from DIR/config.yaml (safe overrides only)."""
    run = RunDir(run_dir)
    return train(_run_config(run, overrides), run.path, resume_step=step)
