"""Waveform -> speaker embedding: the front end and ECAPA-TDNN together, stored as an export folder.

An export folder holds `model.safetensors` (the ECAPA-TDNN weights) and `config.json`:
`{"format": "ecapa-accel", "model": {variant, channels, embed_dim}, "features": <FeaturesConfig>,
"sample_rate": 16000}`, so a model always embeds with the front end it was trained (or converted) with.
Optional keys: "threshold" (a calibrated cosine decision threshold: `verify` then says same/different) and
"averaged_steps" (the checkpoints `ecapa-accel average` took the mean of).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import warnings
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import EvalConfig, FeaturesConfig, config_from_dict
from .data.audio import UnreadableAudio, audio_header, read_audio
from .errors import UserError
from .features import FeatureExtractor
from .model import MIN_FRAMES, EcapaTdnn, build_model
from .rundir import RunDir

EXPORT_FORMAT = "ecapa-accel"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
ONNX_FILE = "model.onnx"
ONNX_OPSET = 17
MAX_CHUNK_SECONDS = 300.0  # longer files are embedded in near-equal chunks whose embeddings are averaged


class EcapaEncoder(nn.Module):
    """Front end + ECAPA-TDNN: (batch, samples) float waveforms -> (batch, embed_dim) embeddings.

    The constructor keeps the model's train/eval mode (the training loop wraps its live model);
    call `.eval()` before embedding. `from_pretrained` returns an encoder in eval mode.
    """

    def __init__(self, model: EcapaTdnn, features: FeaturesConfig, sample_rate: int = 16000, *,
                 threshold: float | None = None, averaged_steps: list[int] | None = None):
        super().__init__()
        if features.n_mels != model.n_mels:
            raise ValueError(f"features.n_mels={features.n_mels} but the model takes {model.n_mels} mels")
        self.model = model
        self.front_end = FeatureExtractor(features, sample_rate)
        self.features = features
        self.sample_rate = sample_rate
        self.threshold = threshold  # cosine score at or above which two utterances are the same speaker
        self.averaged_steps = averaged_steps  # the checkpoints whose mean these weights are

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        return self.model(self.front_end(waves))

    def embed_file(self, path: str | Path, max_chunk_seconds: float = MAX_CHUNK_SECONDS) -> torch.Tensor:
        """Embed a whole audio file (mixed to mono, resampled if needed) -> (embed_dim,) on the CPU."""
        return self.embed_waves([(path, decode_audio(path, self.sample_rate))], max_chunk_seconds)[0]

    @torch.inference_mode()
    def embed_waves(
        self,
        named_waves: Iterable[tuple[str | Path, torch.Tensor]],
        max_chunk_seconds: float = MAX_CHUNK_SECONDS,
        batch_seconds: float = EvalConfig.batch_seconds,
    ) -> torch.Tensor:
        """Full-utterance embeddings of (name, mono waveform at `sample_rate`) pairs -> (count, embed_dim) on the CPU.

        A waveform longer than `max_chunk_seconds` is embedded in near-equal chunks whose embeddings are averaged.
        Chunks of equal length share forward batches of up to `batch_seconds` of audio, so no padding ever
        changes an embedding; feed waveforms shortest first for full batches. Names appear in errors only.
        """
        device = next(self.model.parameters()).device
        chunk = max_chunk_seconds * self.sample_rate
        budget = batch_seconds * self.sample_rate
        pending: dict[int, list[tuple[int, torch.Tensor]]] = {}  # chunk length -> (owner, chunk) waiting
        owners: list[int] = []
        outputs: list[torch.Tensor] = []

        def run(length: int) -> None:
            group = pending.pop(length)
            outputs.append(self(torch.stack([piece for _, piece in group]).to(device)).float().cpu())
            owners.extend(owner for owner, _ in group)

        count = 0
        for owner, (name, wave) in enumerate(named_waves):
            count += 1
            pieces = wave.tensor_split(max(1, math.ceil(wave.numel() / chunk)))
            for piece in pieces:
                self.check_length(piece.numel(), name)
            lengths = {piece.numel() for piece in pieces}
            for length in [length for length in pending if length not in lengths]:
                run(length)  # shortest first: utterances of one length arrive together, so that group is complete
            for piece in pieces:
                group = pending.setdefault(piece.numel(), [])
                group.append((owner, piece))
                if piece.numel() * len(group) >= budget:
                    run(piece.numel())
        for length in list(pending):
            run(length)
        if not outputs:
            return torch.zeros(0, self.model.embed_dim)
        return mean_by_group(torch.cat(outputs), torch.tensor(owners), count)

    def check_length(self, samples: int, name: str | Path) -> None:
        """UserError naming `name` when `samples` samples at `sample_rate` are too short to embed."""
        if self.front_end.num_frames(samples) < MIN_FRAMES:
            raise UserError(f"{name}: too short to embed ({samples / self.sample_rate:.3f} s)")

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write the export folder (model.safetensors + config.json); returns its path."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        weights = {key: value.detach().cpu().contiguous() for key, value in self.model.state_dict().items()}
        save_file(weights, str(out_dir / WEIGHTS_FILE))
        config = {
            "format": EXPORT_FORMAT,
            "model": {"variant": self.model.variant, "channels": self.model.channels, "embed_dim": self.model.embed_dim},
            "features": dataclasses.asdict(self.features),
            "sample_rate": self.sample_rate,
        }
        if self.threshold is not None:
            config["threshold"] = self.threshold
        if self.averaged_steps is not None:
            config["averaged_steps"] = self.averaged_steps
        (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return out_dir

    def to_onnx(self, path: str | Path) -> Path:
        """Write the embedding network as ONNX: input "features" (batch, frames, n_mels) float32, output
        "embedding" (batch, embed_dim); batch and frames are dynamic. The front end is not in the graph: compute
        features as `config.json`'s "features" describe (`encoder.front_end` does it in PyTorch).

        Uses torch's TorchScript-based exporter (`dynamo=False`): the torch.export-based default needs the
        onnxscript package, and the TorchScript one handles this network's dynamic frame axis exactly.
        """
        onnx = require_onnx()
        path = Path(path)
        model = copy.deepcopy(self.model).cpu().eval()
        example = torch.zeros(2, 200, model.n_mels)  # shapes only: both axes are exported as dynamic
        temporary = path.with_name(f".{path.name}.tmp")
        with warnings.catch_warnings():  # the exporter's deprecation and constant-folding notices
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(temporary), input_names=["features"],
                              output_names=["embedding"], opset_version=ONNX_OPSET, dynamo=False,
                              dynamic_axes={"features": {0: "batch", 1: "frames"}, "embedding": {0: "batch"}})
        onnx.checker.check_model(str(temporary))
        os.replace(temporary, path)  # a kill leaves no half-written model.onnx
        return path

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> EcapaEncoder:
        """Load an export folder, or a run directory's `export/`; mistakes raise `UserError` naming the path."""
        folder = export_folder(Path(model_dir))
        config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        values = _read_export_config(config_path)
        cfg = config_from_dict({"model": values["model"], "features": values["features"]}, str(config_path))
        sample_rate = values["sample_rate"]
        if not isinstance(sample_rate, int) or isinstance(sample_rate, bool) or sample_rate <= 0:
            raise UserError(f"{config_path}: 'sample_rate' must be a positive integer, got {sample_rate!r}")
        model = build_model(cfg.model, cfg.features.n_mels)
        model.load_state_dict(_read_weights(weights_path, model))
        return cls(model, cfg.features, sample_rate, threshold=values.get("threshold"),
                   averaged_steps=values.get("averaged_steps")).eval()


def export_folder(model_dir: Path) -> Path:
    """`model_dir` itself when it is an export folder, else the run directory's `export/`."""
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: model folder not found")
    if (model_dir / CONFIG_FILE).exists() or (model_dir / WEIGHTS_FILE).exists():
        return model_dir
    if RunDir(model_dir).export.is_dir():
        return RunDir(model_dir).export
    raise UserError(f"{model_dir}: neither an export folder ({WEIGHTS_FILE} + {CONFIG_FILE}) nor a run directory "
                    "with export/")


def require_onnx():
    """The `onnx` module, or a UserError saying how to install the extra."""
    try:
        import onnx
    except ImportError:
        raise UserError("ONNX export needs the onnx extra: pip install 'ecapa-accel[onnx]'") from None
    return onnx


def write_onnx(model_dir: str | Path) -> str:
    """`ecapa-accel export --onnx`: add model.onnx to an export folder (or to a run directory's export/)."""
    folder = export_folder(Path(model_dir))
    encoder = EcapaEncoder.from_pretrained(folder)
    path = encoder.to_onnx(folder / ONNX_FILE)
    model = encoder.model
    return f"wrote {path}: features (batch, frames, {model.n_mels}) -> embedding (batch, {model.embed_dim})"


def _read_export_config(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: missing (an export folder holds {WEIGHTS_FILE} and {CONFIG_FILE})")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: not readable JSON ({error})") from None
    if not isinstance(values, dict) or values.get("format") != EXPORT_FORMAT:
        raise UserError(f'{path}: not an ecapa-accel export config (needs "format": "{EXPORT_FORMAT}")')
    for key in ("model", "features", "sample_rate"):
        if key not in values:
            raise UserError(f"{path}: missing key '{key}'")
    unknown = sorted(set(values) - {"format", "model", "features", "sample_rate", "threshold", "averaged_steps"})
    if unknown:
        raise UserError(f"{path}: unknown key '{unknown[0]}'")
    threshold = values.get("threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
        raise UserError(f"{path}: 'threshold' must be a number (a cosine score), got {threshold!r}")
    steps = values.get("averaged_steps")
    if steps is not None and not (isinstance(steps, list) and all(type(step) is int for step in steps)):
        raise UserError(f"{path}: 'averaged_steps' must be a list of step numbers, got {steps!r}")
    return values


def _read_weights(path: Path, model: EcapaTdnn) -> dict[str, torch.Tensor]:
    """The weights file's tensors, checked against the network its config describes."""
    if not path.is_file():
        raise UserError(f"{path}: missing (an export folder holds {WEIGHTS_FILE} and {CONFIG_FILE})")
    try:
        weights = load_file(str(path))
    except (OSError, SafetensorError) as error:
        raise UserError(f"{path}: not a readable safetensors file ({error})") from None
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in weights:
            raise UserError(f"{path}: missing tensor '{key}'")
        if weights[key].shape != value.shape:
            raise UserError(f"{path}: tensor '{key}' has shape {tuple(weights[key].shape)}, the config needs "
                            f"{tuple(value.shape)}")
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise UserError(f"{path}: unexpected tensor '{unexpected[0]}'")
    return weights


def mean_by_group(rows: torch.Tensor, groups: torch.Tensor, count: int) -> torch.Tensor:
    """(count, dim): the mean of the rows of each group (`groups[i]` is row i's group, 0 <= group < count)."""
    sums = torch.zeros(count, rows.shape[1]).index_add_(0, groups, rows)
    return sums / torch.bincount(groups, minlength=count).float()[:, None]


def decode_audio(path: str | Path, sample_rate: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Frames [start, stop) of an audio file (whole by default), mono float32 at `sample_rate`; errors name it."""
    if not Path(path).is_file():
        raise UserError(f"{path}: audio file not found")
    try:
        return read_audio(str(path), sample_rate, start, stop)
    except UnreadableAudio as error:
        raise UserError(f"{path}: cannot decode audio ({error})") from None


def read_mono(path: str | Path) -> tuple[torch.Tensor, int]:
    """Decode an audio file -> (float32 mono waveform, its own sample rate); channels are averaged."""
    if not Path(path).is_file():
        raise UserError(f"{path}: audio file not found")
    try:
        rate = audio_header(str(path))[0]
    except UnreadableAudio as error:
        raise UserError(f"{path}: cannot decode audio ({error})") from None
    return decode_audio(path, rate), rate


def embed_files(model_dir: Path, paths: list[Path], out: Path | None = None) -> list[str]:
    """`ecapa-accel embed`: JSON lines `{"path", "embedding"}`, or a safetensors file keyed by path with `out`."""
    if out is not None and Path(out).suffix != ".safetensors":
        raise UserError(f"{out}: --out must name a .safetensors file")
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"{path}: audio file not found")
    encoder = EcapaEncoder.from_pretrained(model_dir)
    embeddings = {str(path): encoder.embed_file(path) for path in paths}
    if out is None:
        return [json.dumps({"path": path, "embedding": value.tolist()}) for path, value in embeddings.items()]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file({path: value.contiguous() for path, value in embeddings.items()}, str(out))
    return [f"wrote {len(embeddings)} embeddings of dimension {encoder.model.embed_dim} to {out}"]
