"""The training loop: build -> prepare -> loop (accumulate, step, log, checkpoint) -> export.

Run it with `accelerate launch -m ecapa_accel.train CONFIG --run-dir DIR [KEY=VALUE ...]` (the entry module
`train.py` calls this one) or `ecapa-accel train ...` (same code, one process). A run directory that already
holds a run is resumed.

The data loader is not passed through `accelerator.prepare`: our stream shards itself by global sample
position, which is what makes resume exact (also mid-epoch and with a different process count).
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, broadcast, set_seed
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .checkpoint import CheckpointSaver, TrainerState, find_checkpoint, read_state, sweep_incomplete
from .config import (
    Config,
    flatten,
    load_config,
    save_config,
    to_dict,
    unsafe_resume_changes,
)
from .data import build_training_data
from .encoder import EcapaEncoder
from .errors import UserError
from .features import FeatureExtractor
from .loss import AAMSoftmax, margin_at
from .model import EcapaTdnn, build_model
from .optim import build_optimizer, learning_rate
from .preflight import check_before_write

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}


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


def _check_run_dir(cfg: Config, run_dir: Path) -> Path | None:
    """Refuse incompatible reuse of a run directory; return the checkpoint to resume from, if any."""
    saved = run_dir / "config.yaml"
    checkpoint = find_checkpoint(run_dir)
    if not saved.is_file():
        if checkpoint is not None:
            raise UserError(f"{run_dir}: holds checkpoints but no config.yaml; cannot resume it")
        return None
    previous = _run_config(run_dir)
    changed = unsafe_resume_changes(previous, cfg)
    if changed:
        raise UserError(f"{saved}: the run was started with a different '{changed[0]}'"
                        f" ({len(changed)} incompatible key(s)); use a new --run-dir")
    return checkpoint


def _run_config(run_dir: Path, overrides: list[str] | None = None) -> Config:
    """The resolved config a run was started with (RUN_DIR/config.yaml holds absolute paths), plus overrides."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.yaml)")
    return load_config(saved, overrides)


def _load_label_map(run_dir: Path) -> dict[str, int] | None:
    path = run_dir / "speakers.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


class _StopRequest:
    """Remembers SIGTERM/SIGINT so the loop can finish the current step, checkpoint and exit."""

    def __init__(self):
        self.signal: int | None = None
        for sig in EXIT_CODES:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def restore(self) -> None:
        for sig in EXIT_CODES:
            signal.signal(sig, signal.SIG_DFL)


def _append_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def _truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume, drop records that the killed run logged after the checkpoint it resumes from."""
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def export_model(embedding: EcapaTdnn, cfg: Config, out_dir: Path) -> Path:
    EcapaEncoder(embedding, cfg.features, cfg.data.sample_rate).save_pretrained(out_dir)
    return out_dir


def export_run(run_dir: Path, out_dir: Path | None = None, step: int | None = None) -> str:
    """`ecapa-accel export`: write an export folder from a complete checkpoint (default: the newest)."""
    run_dir = Path(run_dir)
    cfg = _run_config(run_dir)
    checkpoint = find_checkpoint(run_dir, step)
    if checkpoint is None:
        raise UserError(f"{run_dir}: no complete checkpoint to export")
    weights = load_file(str(checkpoint / "model.safetensors"))
    embedding = build_model(cfg.model, cfg.features.n_mels)
    embedding.load_state_dict({k.removeprefix("embedding."): v for k, v in weights.items() if k.startswith("embedding.")})
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "export"
    export_model(embedding, cfg, out_dir)
    return f"exported {checkpoint.name} to {out_dir}"


def train(cfg: Config, run_dir: str | Path) -> Path:
    """Train (or resume) the run in `run_dir`; returns the export folder of the finished run."""
    run_dir = Path(run_dir)
    check_before_write(cfg, run_dir)
    resume_from = _check_run_dir(cfg, run_dir)
    data = build_training_data(cfg, label_map=_load_label_map(run_dir))  # validates before anything is written
    steps_per_epoch = data.samples_per_epoch // cfg.train.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"data: one epoch holds {data.samples_per_epoch} samples, fewer than "
                        f"train.batch_size={cfg.train.batch_size}")

    # ---- build
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        step_scheduler_with_optimizer=False,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
    )
    micro_batch, accelerator.gradient_accumulation_steps = batch_split(
        cfg.train.batch_size, accelerator.num_processes, cfg.train.max_device_batch_size
    )
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        if not (run_dir / "speakers.json").is_file():
            (run_dir / "speakers.json").write_text(json.dumps(data.label_map, indent=0, sort_keys=True),
                                                   encoding="utf-8")
        sweep_incomplete(run_dir)
    accelerator.wait_for_everyone()
    set_seed(cfg.train.seed)

    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)

    front_end = FeatureExtractor(cfg.features, cfg.data.sample_rate).to(accelerator.device)
    embedding = build_model(cfg.model, cfg.features.n_mels)
    head = AAMSoftmax(cfg.model.embed_dim, data.num_classes, cfg.loss.scale, cfg.loss.margin, cfg.loss.easy_margin)
    net = SpeakerClassifier(embedding, head)
    optimizer = build_optimizer(net.parameters(), cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate(step, steps_per_epoch, total_steps, cfg.optim) / cfg.optim.lr
    )

    # ---- prepare
    net, optimizer, scheduler = accelerator.prepare(net, optimizer, scheduler)
    state = TrainerState(world_size=accelerator.num_processes)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        state = read_state(resume_from)
        state.world_size = accelerator.num_processes
        if accelerator.is_main_process:
            _truncate_metrics(run_dir, state.step)
    state.finished = state.step >= total_steps
    saver = CheckpointSaver(accelerator, run_dir, cfg.train.checkpoint_every_steps,
                            cfg.train.checkpoint_every_minutes, cfg.train.keep_checkpoints)
    accelerator.init_trackers("train", config={k: str(v) for k, v in flatten(to_dict(cfg)).items()})
    stop = _StopRequest()
    progress = tqdm(total=total_steps, initial=state.step, disable=not accelerator.is_local_main_process,
                    desc="train", unit="step", dynamic_ncols=True)
    if resume_from is not None and accelerator.is_local_main_process:  # tqdm.write ignores `disable`
        progress.write(f"resumed from {resume_from} (epoch {state.epoch}, sample {state.position})", file=sys.stderr)

    # ---- loop
    net.train()
    window_loss, window_acc, window_micro, window_start = 0.0, 0.0, 0, time.perf_counter()
    while not state.finished and stop.signal is None:
        batches = data.batches(state.epoch, state.position, micro_batch, accelerator.process_index,
                               accelerator.num_processes, cfg.data.num_workers)
        step_bad = 0
        for batch in batches:
            waves = batch["waves"].to(accelerator.device, non_blocking=True)
            labels = batch["labels"].to(accelerator.device, non_blocking=True)
            step_bad += int(batch["bad"].sum())
            with accelerator.accumulate(net):
                with torch.no_grad():
                    feats = front_end(waves)
                loss, accuracy = net(feats, labels, margin_at(state.step, steps_per_epoch, cfg.loss))
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.optim.grad_clip > 0:
                    accelerator.clip_grad_norm_(net.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad()
            window_loss += loss.detach().float()
            window_acc += accuracy.detach().float()
            window_micro += 1
            if not accelerator.sync_gradients:
                continue

            # ---- one optimizer step done
            scheduler.step()
            state.step += 1
            state.position += cfg.train.batch_size
            state.samples_seen += cfg.train.batch_size
            end_of_epoch = state.position + cfg.train.batch_size > data.samples_per_epoch
            if end_of_epoch:
                state.epoch += 1
                state.position = 0
            state.finished = state.step >= total_steps
            # All processes agree on stopping, time-based checkpoints and the bad-file count.
            agreed = torch.tensor([step_bad, stop.signal is not None, saver.due_by_time()],
                                  dtype=torch.int64, device=accelerator.device)
            agreed = accelerator.reduce(agreed, reduction="sum").tolist()
            state.bad_files += agreed[0]
            step_bad = 0
            if agreed[1] and stop.signal is None:
                stop.signal = signal.SIGTERM
            progress.update(1)

            if state.step % cfg.train.log_every_steps == 0 or state.finished:
                elapsed = time.perf_counter() - window_start
                record = {
                    "type": "train", "step": state.step, "epoch": state.epoch,
                    "loss": window_loss.item() / window_micro, "acc": window_acc.item() / window_micro,
                    "lr": scheduler.get_last_lr()[0], "margin": margin_at(state.step, steps_per_epoch, cfg.loss),
                    "samples_per_s": window_micro * micro_batch * accelerator.num_processes / elapsed,
                    "bad_files": state.bad_files, "time": time.time(),
                }
                _log(accelerator, run_dir, record)
                progress.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['acc']:.3f}",
                                     lr=f"{record['lr']:.2e}", sps=f"{record['samples_per_s']:.0f}")
                window_loss, window_acc, window_micro, window_start = 0.0, 0.0, 0, time.perf_counter()
            _check_bad_fraction(state, data.samples_per_epoch, cfg.data.max_bad_fraction)

            evaluate_now = cfg.eval.trials and (
                end_of_epoch or state.finished
                or (cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0)
            )
            if evaluate_now:
                _validate(accelerator, net, cfg, run_dir, state)
            if (saver.due_by_steps(state.step) or agreed[2] or end_of_epoch or state.finished
                    or stop.signal is not None):
                saver.save(state)
            if end_of_epoch or state.finished or stop.signal is not None:
                break
        del batches

    # ---- finish
    progress.close()
    stop.restore()
    export_dir = run_dir / "export"
    if state.finished and accelerator.is_main_process and not (cfg.eval.keep_best and export_dir.is_dir()):
        export_model(accelerator.unwrap_model(net).embedding, cfg, export_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # also ends the process group: no collective calls after this
    if stop.signal is not None:
        if accelerator.is_main_process:
            print(f"stopped by signal at step {state.step}; checkpoint saved; resume with "
                  f"`ecapa-accel resume {run_dir}`", file=sys.stderr)
        sys.exit(EXIT_CODES[signal.Signals(stop.signal)])
    return export_dir


def _log(accelerator: Accelerator, run_dir: Path, record: dict) -> None:
    if accelerator.is_main_process:
        _append_metrics(run_dir, record)
    scalars = {f"{record['type']}/{k}": v for k, v in record.items() if isinstance(v, (int, float))
               and k not in ("step", "time")}
    accelerator.log(scalars, step=record["step"])


def _check_bad_fraction(state: TrainerState, samples_per_epoch: int, max_fraction: float) -> None:
    # Measured against at least one epoch so that a few bad files early on do not end the run.
    if state.bad_files > max_fraction * max(state.samples_seen, samples_per_epoch):
        raise UserError(f"data: {state.bad_files} unreadable audio files replaced in {state.samples_seen} samples, "
                        f"more than data.max_bad_fraction={max_fraction}; run `ecapa-accel data check` on the CSVs")


def _validate(accelerator: Accelerator, net, cfg: Config, run_dir: Path, state: TrainerState) -> None:
    """Score the validation trials on the main process and log EER/minDCF; other processes wait."""
    from .evaluate import validate

    if accelerator.is_main_process:
        embedding = accelerator.unwrap_model(net).embedding
        encoder = EcapaEncoder(embedding, cfg.features, cfg.data.sample_rate).to(accelerator.device).eval()
        scores = Path("eval") / f"step_{state.step}.txt"
        (run_dir / "eval").mkdir(exist_ok=True)
        with torch.no_grad():
            result = validate(encoder, cfg.eval, run_dir / scores)
        embedding.train()
        record = {"type": "eval", "step": state.step, "epoch": state.epoch, "eer": result["eer"],
                  "min_dcf": result["min_dcf"], "threshold": result["threshold"], "scores": str(scores)}
        _log(accelerator, run_dir, record)
        if cfg.eval.keep_best and (state.best_eer is None or result["eer"] < state.best_eer):
            export_model(embedding, cfg, run_dir / "export")
        if state.best_eer is None or result["eer"] < state.best_eer:
            state.best_eer = result["eer"]
    # Every process keeps the same trainer state, so the best EER travels from the main process.
    best = torch.tensor([state.best_eer if state.best_eer is not None else -1.0], device=accelerator.device)
    best = broadcast(best, from_process=0).item()
    state.best_eer = None if best < 0 else best


def resume(run_dir: str | Path, overrides: list[str] | None = None) -> Path:
    """`ecapa-accel resume DIR [KEY=VALUE ...]`: continue from DIR/config.yaml (safe overrides only)."""
    run_dir = Path(run_dir)
    return train(_run_config(run_dir, overrides), run_dir)
