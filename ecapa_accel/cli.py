"""The `ecapa-accel` command line: parses arguments and calls library functions, nothing more.

Library modules are imported inside each command so that `--help` stays instant.
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from .exits import exit_with_status
from .train import main as train_entry

app = typer.Typer(
    help="Train ECAPA-TDNN speaker embeddings on several datasets with Hugging Face accelerate; "
    "resume exactly after any crash.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain help and usage errors: no boxes around messages
)
data_app = typer.Typer(help="Check manifests and look at the training stream.", no_args_is_help=True,
                       rich_markup_mode=None)
app.add_typer(data_app, name="data")

OVERRIDES = typer.Argument(None, help="Dotted KEY=VALUE overrides, e.g. train.max_steps=100.", show_default=False)
JSON_FLAG = typer.Option(False, "--json", help="Print one JSON object on stdout.")


def _print_json(obj) -> None:
    typer.echo(json.dumps(obj))


# The same command as `accelerate launch -m ecapa_accel.train`, run in this process.
app.command("train", help="Train in this process (use `accelerate launch -m ecapa_accel.train` for several "
            "processes); a run directory that holds a run is resumed.")(train_entry)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def launch(ctx: typer.Context) -> None:
    """`ecapa-accel launch [accelerate launch options] CONFIG --run-dir DIR [KEY=VALUE ...]`: `accelerate launch
    -m ecapa_accel.train` made safe to pre-empt: SIGTERM/SIGINT end every rank with a checkpoint of the same
    step and exit 143/130, no traceback, no process left. Use it in SLURM scripts."""
    from .launch import launch_training

    sys.exit(launch_training(ctx.args))


@app.command()
def resume(
    run_dir: Path = typer.Argument(..., help="Run directory holding config.yaml."),
    overrides: Optional[List[str]] = OVERRIDES,
    step: Optional[int] = typer.Option(None, "--step", help="Checkpoint step to resume (default: newest intact)."),
) -> None:
    """Continue a run from RUN_DIR/config.yaml and its newest intact checkpoint (or --step N)."""
    from .trainer import resume as resume_run

    resume_run(run_dir, overrides, step)


@app.command()
def status(run_dir: Path = typer.Argument(..., help="Run directory."), as_json: bool = JSON_FLAG) -> None:
    """Show the step, epoch, intact (and damaged) checkpoints and the export of a run."""
    from .checkpoint import run_status

    info = run_status(run_dir)
    if as_json:
        _print_json(info)
        return
    state = "finished" if info["finished"] else "not finished"
    typer.echo(f"{info['run_dir']}: step {info['step']}, epoch {info['epoch']}, {state}")
    typer.echo("checkpoints: " + (", ".join(info["checkpoints"]) or "none"))
    for line in info["damaged"]:
        typer.echo(line)
    typer.echo(f"export: {'complete' if info['export'] else 'none'}")


@data_app.command("check")
def data_check(
    csvs: List[str] = typer.Argument(..., help="Manifest CSV files, or packs (folder, index.json, glob, URL)."),
) -> None:
    """Validate manifests (columns, IDs, segments, audio headers) or packs, and summarise them."""
    from .data import check_datasets

    for line in check_datasets(csvs):
        typer.echo(line)


@data_app.command("inspect")
def data_inspect(
    config: Path = typer.Argument(..., help="YAML config."),
    batches: int = typer.Option(10, "--batches", help="Number of real batches to draw."),
    as_json: bool = JSON_FLAG,
    overrides: Optional[List[str]] = OVERRIDES,
) -> None:
    """Draw real training batches (decode, crop, augment: all but the model) and report throughput and mix."""
    from .config import load_config
    from .data import inspect_stream

    report = inspect_stream(load_config(config, overrides), batches)
    if as_json:
        _print_json(report)
        return
    for key, value in report.items():
        typer.echo(f"{key}: {value}")


class Layout(str, Enum):
    voxceleb = "voxceleb"
    cnceleb = "cnceleb"
    folder = "folder"


@app.command()
def prepare(
    layout: Layout = typer.Argument(..., help="Corpus layout."),
    root: Path = typer.Argument(..., help="Corpus root folder."),
    out_csv: Path = typer.Argument(..., help="Manifest to write."),
) -> None:
    """Write a manifest CSV from a standard corpus layout (VoxCeleb, CN-Celeb, ROOT/<speaker>/**)."""
    from .data import prepare_manifest

    typer.echo(prepare_manifest(layout.value, root, out_csv))


@app.command()
def pack(
    csv: Path = typer.Argument(..., help="Manifest CSV to pack."),
    out_dir: Path = typer.Argument(..., help="Folder for the shards and index.json (resumed if unfinished)."),
    shard_size: str = typer.Option("512MB", "--shard-size", help="Audio per shard, e.g. 512MB or 2GB."),
    block_rows: int = typer.Option(64, "--block-rows", help="Rows per block (the unit read and shuffled)."),
) -> None:
    """Pack a manifest's audio (bytes as they are) into Arrow shards for large or remote corpora."""
    from .data import pack_manifest

    for line in pack_manifest(csv, out_dir, shard_size, block_rows):
        typer.echo(line)


@app.command("eval")
def eval_command(
    model_dir: Path = typer.Argument(..., help="Export folder or run directory."),
    trials: List[Path] = typer.Option(..., "--trials", help="Trials: '1 a.wav b.wav' or 'utt_a utt_b target'; "
                                      "repeat for several lists (each audio file is embedded once)."),
    audio_root: Optional[Path] = typer.Option(None, "--audio-root", help="Folder trial paths resolve against."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="CSV (ID,path) mapping trial IDs to audio."),
    cohort: Optional[Path] = typer.Option(None, "--cohort", help="Cohort manifest CSV for AS-norm."),
    top_k: int = typer.Option(300, "--top-k", help="AS-norm: highest cohort scores used per side."),
    p_target: Optional[List[float]] = typer.Option(
        None, "--p-target", help="Prior of a target trial for minDCF (default 0.01); repeat for several: min_dcf "
        "is at the first, min_dcf_at lists all."
    ),
    scores: Optional[List[Path]] = typer.Option(
        None, "--scores", help="Write 'enroll test cosine label' per trial; with --cohort 'enroll test cosine "
        "asnorm label'. One per --trials."
    ),
    as_json: bool = JSON_FLAG,
) -> None:
    """Score verification trials with cosine similarity and report EER and minDCF (raw, and AS-norm with --cohort).

    --json prints one object for one trials file, a list of objects (each with "trials_file") for several.
    """
    from .evaluate import evaluate_trials, report_lines

    report = evaluate_trials(model_dir, trials, audio_root=audio_root, cohort=cohort, scores_out=scores or None,
                             manifest=manifest, top_k=top_k, p_targets=p_target or None)
    if as_json:
        _print_json(report)
        return
    for line in report_lines(report):
        typer.echo(line)


@app.command()
def verify(
    model_dir: Path = typer.Argument(..., help="Export folder or run directory."),
    first: Path = typer.Argument(..., help="Audio file A."),
    second: Path = typer.Argument(..., help="Audio file B."),
    as_json: bool = JSON_FLAG,
) -> None:
    """Print the cosine score of two audio files, and same/different when the export has a calibrated threshold."""
    from .evaluate import verify_pair

    result = verify_pair(model_dir, first, second)
    if as_json:
        _print_json(result)
    elif result["threshold"] is None:
        typer.echo(f"{result['score']:.6f}")
    else:
        decision = "same" if result["same"] else "different"
        typer.echo(f"{result['score']:.6f} {decision} (threshold {result['threshold']:.6f})")


@app.command()
def embed(
    model_dir: Path = typer.Argument(..., help="Export folder or run directory."),
    audio: List[Path] = typer.Argument(..., help="Audio files."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write a .safetensors file (one tensor per path)."),
) -> None:
    """Embed audio files: JSON lines on stdout, or a safetensors file with --out."""
    from .encoder import embed_files

    for line in embed_files(model_dir, audio, out):
        typer.echo(line)


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="Run directory."),
    out_dir: Optional[Path] = typer.Argument(None, help="Export folder (default RUN_DIR/export)."),
    step: Optional[int] = typer.Option(None, "--step", help="Checkpoint step (default: newest complete)."),
    onnx: bool = typer.Option(False, "--onnx", help="Also write model.onnx (features -> embedding)."),
) -> None:
    """Write an export folder (model.safetensors + config.json) from a complete checkpoint."""
    from .encoder import require_onnx, write_onnx
    from .trainer import export_run

    if onnx:
        require_onnx()  # before anything is written
    typer.echo(export_run(run_dir, out_dir, step))
    if onnx:
        typer.echo(write_onnx(out_dir if out_dir is not None else run_dir))


@app.command()
def average(
    run_dir: Path = typer.Argument(..., help="Run directory (finished or still running)."),
    last: Optional[int] = typer.Option(None, "--last", help="Average the newest N complete checkpoints."),
    steps: Optional[str] = typer.Option(None, "--steps", help="Average these steps, e.g. 800,900,1000."),
    out: Optional[Path] = typer.Option(None, "--out", help="Export folder (default RUN_DIR/export_avg<N>)."),
) -> None:
    """Write an export folder holding the mean of complete checkpoints (default: all of them).

    Parameters and BatchNorm statistics are averaged; num_batches_tracked is the newest checkpoint's.
    """
    from .average import average_run, parse_steps

    typer.echo(average_run(run_dir, last=last, steps=parse_steps(steps) if steps is not None else None, out_dir=out))


class Peer(str, Enum):
    threedspeaker = "3dspeaker"
    wespeaker = "wespeaker"
    speechbrain = "speechbrain"


@app.command()
def convert(
    peer: Peer = typer.Option(..., "--from", help="Which toolkit wrote SRC."),
    src: Path = typer.Argument(..., help="Peer checkpoint (embedding_model.ckpt, avg_model.pt, ...)."),
    out_dir: Path = typer.Argument(..., help="Export folder to write."),
) -> None:
    """Convert a 3D-Speaker, WeSpeaker or SpeechBrain ECAPA checkpoint into an export folder."""
    from .convert import convert_checkpoint

    typer.echo(convert_checkpoint(peer.value, src, out_dir))


@app.command()
def plot(run_dir: Path = typer.Argument(..., help="Run directory.")) -> None:
    """Write training and evaluation plots (PNG) into RUN_DIR/plots/."""
    from .plot import plot_run

    for path in plot_run(run_dir, on_skip=typer.echo):
        typer.echo(path)


@app.command()
def demo(out_dir: Path = typer.Argument(Path("ecapa-demo"), help="Where the demo corpus and run go.")) -> None:
    """Generate a synthetic corpus, train (interrupted and resumed), evaluate: no download needed."""
    from .demo import run_demo

    run_demo(out_dir)


def main(argv: list[str] | None = None) -> None:
    exit_with_status(lambda: app(args=argv, prog_name="ecapa-accel"))


if __name__ == "__main__":
    main()
