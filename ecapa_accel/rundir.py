"""The run directory: the one module that knows its layout and reads and writes its files.

    RUN_DIR/config.yaml      resolved config (what the user asked for)
    RUN_DIR/speakers.json    label map: namespaced speaker -> class index
    RUN_DIR/checkpoints/     complete checkpoints step_<N>/ (see checkpoint.py); dot-names are in progress
    RUN_DIR/metrics.jsonl    one JSON object per logged step / epoch / evaluation
    RUN_DIR/logs/            tracker output (TensorBoard)
    RUN_DIR/eval/            validation score files step_<N>.txt
    RUN_DIR/manifests.json   sha256 of each manifest at the start (a changed manifest cannot resume exactly)
    RUN_DIR/export/          the trained embedding model (EcapaEncoder.save_pretrained + training_step.json)

Files whose loss would cost the run (config, label map, metrics rewrite) are replaced atomically: written
beside the target under a dot-name, flushed, then renamed over it.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import StorageError, UserError
from .files import sha256_file

_LOW_SPACE = 128 << 20  # bytes; below this a failed write is reported as a full disk

CONFIG = "config.yaml"
SPEAKERS = "speakers.json"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
LOGS = "logs"
EVAL = "eval"
EXPORT = "export"
FINGERPRINTS = "manifests.json"
EXPORT_STEP = "training_step.json"  # inside an export written by training: the step its weights come from


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(folder)


@contextmanager
def storage_errors(path: Path, what: str) -> Iterator[None]:
    """Turn a failed write into one StorageError line naming `path`, e.g. "No space left on device".

    torch's zip writer reports a full disk as a RuntimeError ("unexpected pos ..."), so that one is mapped too
    when the disk is indeed (nearly) full."""
    try:
        yield
    except OSError as error:
        raise StorageError(f"{path}: cannot write {what}: {error.strerror or error}") from None
    except RuntimeError:
        free = shutil.disk_usage(path if path.exists() else path.parent).free
        if free >= _LOW_SPACE:
            raise
        raise StorageError(f"{path}: cannot write {what}: No space left on device ({free >> 20} MiB free)") from None


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a crash leaves either the old file or the new one."""
    temporary = path.with_name(f".{path.name}.tmp")
    with storage_errors(path, "the file"):
        try:
            with open(temporary, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        fsync_dir(path.parent)


@contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """Yield a temporary dot-folder beside `final`; on success it is flushed and renamed to `final`.

    An existing `final` is moved aside first and removed after the rename, so a crash at any instant leaves a
    complete folder (old or new) or, between the two renames, only dot-folders that nothing ever loads.
    """
    temporary = final.with_name(f".{final.name}.tmp")
    previous = final.with_name(f".{final.name}.old")
    try:
        with storage_errors(final, "the folder"):
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
            yield temporary
            fsync_tree(temporary)
            if final.exists():
                shutil.rmtree(previous, ignore_errors=True)
                os.rename(final, previous)
            os.rename(temporary, final)
            fsync_dir(final.parent)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
        shutil.rmtree(previous, ignore_errors=True)


class RunDir:
    """Paths and file formats of one run directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = self.path / CONFIG
        self.speakers = self.path / SPEAKERS
        self.checkpoints = self.path / CHECKPOINTS
        self.metrics = self.path / METRICS
        self.logs = self.path / LOGS
        self.eval = self.path / EVAL
        self.export = self.path / EXPORT

    def __str__(self) -> str:
        return str(self.path)

    def is_run(self) -> bool:
        return self.config.is_file()

    def require_run(self) -> None:
        if not self.is_run():
            raise UserError(f"{self.path}: not a run directory (no {CONFIG})")

    # ---- config.yaml
    def write_config_text(self, text: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.config, text)

    # ---- speakers.json
    def read_label_map(self) -> dict[str, int] | None:
        if not self.speakers.is_file():
            return None
        return json.loads(self.speakers.read_text(encoding="utf-8"))

    def write_label_map(self, label_map: dict[str, int]) -> None:
        write_text_atomic(self.speakers, json.dumps(label_map, indent=0, sort_keys=True))

    # ---- metrics.jsonl
    def read_metrics(self) -> list[dict]:
        """All records; a last line cut short by a kill is ignored, any other broken line is a UserError."""
        if not self.metrics.is_file():
            return []
        lines = self.metrics.read_text(encoding="utf-8").splitlines()
        records = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):
                    break
                raise UserError(f"{self.metrics} line {number}: not a JSON object") from None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise UserError(f"{self.metrics} line {number}: a record must be a JSON object with an integer 'step'")
            records.append(record)
        return records

    def append_metrics(self, record: dict) -> None:
        with storage_errors(self.metrics, "a metrics record"), open(self.metrics, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """On resume, drop the records that a killed run logged after the checkpoint it resumes from."""
        if self.metrics.is_file():
            kept = [record for record in self.read_metrics() if record["step"] <= step]
            write_text_atomic(self.metrics, "".join(json.dumps(record) + "\n" for record in kept))

    # ---- manifests.json
    def read_fingerprints(self) -> dict[str, str]:
        path = self.path / FINGERPRINTS
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def write_fingerprints(self, fingerprints: dict[str, str]) -> None:
        write_text_atomic(self.path / FINGERPRINTS, json.dumps(fingerprints, indent=1, sort_keys=True))

    # ---- export/
    def export_step(self) -> int | None:
        """The training step whose weights export/ holds, if its files still match what training wrote
        (None: no export, one not written by training, or one that changed since)."""
        try:
            record = json.loads((self.export / EXPORT_STEP).read_text(encoding="utf-8"))
            present = _file_digests(self.export)  # files added later (e.g. model.onnx) do not matter
            intact = all(present.get(name) == digest for name, digest in record["files"].items())
            return int(record["step"]) if intact else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # ---- eval/
    def scores_file(self, step: int) -> Path:
        self.eval.mkdir(exist_ok=True)
        return self.eval / f"step_{step}.txt"


def _file_digests(folder: Path) -> dict[str, str]:
    return {path.name: sha256_file(path)
            for path in sorted(folder.iterdir()) if path.is_file() and path.name != EXPORT_STEP}


def write_export_step(export_folder: Path, step: int) -> None:
    """Record inside an export (before it is renamed into place) the step it comes from and its files' sha256."""
    record = {"step": step, "files": _file_digests(Path(export_folder))}
    (Path(export_folder) / EXPORT_STEP).write_text(json.dumps(record), encoding="utf-8")
