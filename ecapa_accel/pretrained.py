"""Starting a run from existing weights (`model.init_from`): an export folder, a run directory or a peer checkpoint.

`resolve_init` reads and checks the source before anything is written: the path, the peer format, the front end
(it must equal the run's `features` on every key that changes the features: the weights only work with their
own), the model config and every tensor shape. `apply_init` then loads the embedding network; the AAM head is
loaded too only when the source belongs to a run whose label map equals this run's (a run directory, or an
export folder inside one such as RUN_DIR/export_avg10), from that run's newest complete checkpoint; otherwise
the head starts fresh. The source is read only at step 0: a resumed run needs nothing but its own checkpoints,
and config.yaml records where its weights came from (`model.init_from` + `model.init_from_sha256`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .checkpoint import find_checkpoint
from .config import Config, FeaturesConfig, load_config
from .convert import peer_layouts, peer_model, read_state_dict
from .encoder import WEIGHTS_FILE, EcapaEncoder, export_folder
from .errors import UserError
from .files import sha256_file
from .model import EcapaTdnn, build_model
from .rundir import RunDir

# Front-end keys that change the features a network sees (dither only perturbs training input).
FRONT_END_KEYS = ("kind", "n_mels", "frame_length_ms", "frame_shift_ms", "window", "waveform_scale", "mean_norm")
MODEL_KEYS = ("variant", "channels", "embed_dim")
PEER_SAMPLE_RATE = 16000  # every peer's ECAPA-TDNN recipe
# What the training loop's checkpoint holds besides the embedding network: the AAM head's class weights.
CHECKPOINT_WEIGHTS = "model.safetensors"
HEAD_KEY = "head.weight"


@dataclass
class InitSource:
    """Checked initial weights for a run, read from `path` (everything `apply_init` needs)."""

    path: Path
    weights_file: Path  # the file whose sha256 config.yaml records
    sha256: str
    embedding: dict[str, torch.Tensor]  # the embedding network's state dict, checked against the run's model
    source_run: Path | None = None  # the run the weights come from, when they come from one
    label_map: dict[str, int] | None = None  # that run's speakers.json
    head: torch.Tensor | None = None  # that run's AAM class weights from its newest complete checkpoint
    head_checkpoint: Path | None = None


def resolve_init(cfg: Config) -> InitSource | None:
    """Read and check `cfg.model.init_from` against the run's config; None when the run starts from scratch.

    Raises `UserError` naming the key (`model.init_from*`, `features.<key>`, `model.<key>`, or a tensor with both
    shapes) for anything that does not fit. Reads only; writes nothing.
    """
    model_cfg = cfg.model
    if model_cfg.init_from is None:
        for key in ("init_from_format", "init_from_sha256"):
            if getattr(model_cfg, key) is not None:
                raise UserError(f"'model.{key}' is set but 'model.init_from' is not")
        return None
    path = Path(model_cfg.init_from)
    if not path.exists():
        raise UserError(f"model.init_from: {path} not found (an export folder, a run directory or a peer checkpoint)")
    if path.is_file():
        weights_file = path
        model, features, sample_rate = _read_peer(path, model_cfg.init_from_format)
        source_run = None
    else:
        if model_cfg.init_from_format is not None:
            raise UserError(f"model.init_from_format: only for a peer checkpoint file; {path} is a folder "
                            f"(set model.init_from_format=null)")
        encoder = EcapaEncoder.from_pretrained(path)
        weights_file = export_folder(path) / WEIGHTS_FILE
        model, features, sample_rate = encoder.model, encoder.features, encoder.sample_rate
        source_run = _run_of(path)

    _check_front_end(features, sample_rate, cfg, path)
    embedding = {key: value.detach().clone() for key, value in model.state_dict().items()}
    _check_model(model, embedding, cfg, path)
    sha256 = sha256_file(weights_file)
    if model_cfg.init_from_sha256 is not None and model_cfg.init_from_sha256 != sha256:
        raise UserError(f"model.init_from_sha256: {weights_file} has sha256 {sha256}, the config pins "
                        f"{model_cfg.init_from_sha256} (the source changed since the run started?)")
    source = InitSource(path=path, weights_file=weights_file, sha256=sha256, embedding=embedding,
                        source_run=source_run)
    if source_run is not None:
        source.label_map = RunDir(source_run).read_label_map()
        source.head_checkpoint = find_checkpoint(source_run)
        if source.head_checkpoint is not None:
            source.head = _read_head(source.head_checkpoint / CHECKPOINT_WEIGHTS)
    return source


def record_init(cfg: Config, source: InitSource | None, saved_config: Path) -> Config:
    """`cfg` as config.yaml should record it: `model.init_from_sha256` of the source read at step 0, or, when a
    resumed run's config leaves it unset, the one `saved_config` (the run's config.yaml) recorded."""
    if source is not None:
        sha256 = source.sha256
    elif cfg.model.init_from is not None and cfg.model.init_from_sha256 is None and saved_config.is_file():
        sha256 = load_config(saved_config).model.init_from_sha256
    else:
        return cfg
    recorded = copy.deepcopy(cfg)
    recorded.model.init_from_sha256 = sha256
    return recorded


def apply_init(source: InitSource, embedding: EcapaTdnn, head: torch.nn.Module, run_label_map: dict[str, int]) -> str:
    """Load the source into a freshly built run (before `accelerator.prepare`); returns the line to print.

    The head (an `AAMSoftmax`) is loaded only when the source run's label map equals `run_label_map`.
    """
    embedding.load_state_dict(source.embedding)
    if source.source_run is None:
        head_note = "fresh: the source is not in a run directory"
    elif source.label_map != run_label_map:
        head_note = f"fresh: the label map of {source.source_run} differs from this run's"
    elif source.head is None:
        head_note = f"fresh: {source.source_run} has no complete checkpoint holding the head"
    elif source.head.shape != head.weight.shape:
        head_note = (f"fresh: the head of {source.head_checkpoint} has shape {tuple(source.head.shape)}, this run's "
                     f"{tuple(head.weight.shape)}")
    else:
        with torch.no_grad():
            head.weight.copy_(source.head)
        head_note = f"loaded from {source.head_checkpoint}"
    return f"initialised from {source.path} (sha256 {source.sha256}, head: {head_note})"


def _read_peer(path: Path, peer: str | None) -> tuple[EcapaTdnn, FeaturesConfig, int]:
    state = read_state_dict(path)
    if peer is None:
        layouts = peer_layouts(state)
        if not layouts:
            raise UserError(f"{path}: the key names match no known ECAPA-TDNN layout; set model.init_from_format "
                            f"to the peer that wrote it (3dspeaker, wespeaker or speechbrain)")
        if len(layouts) > 1:
            raise UserError(f"{path}: the key names fit both {' and '.join(layouts)} checkpoints (one layout, "
                            f"different front ends); set model.init_from_format to the one that wrote it")
        (peer,) = layouts
    model, features = peer_model(peer, state, path)
    return model, features, PEER_SAMPLE_RATE


def _run_of(path: Path) -> Path | None:
    """The run directory that `path` (a run directory, or an export folder directly inside one) belongs to."""
    for candidate in (path, path.parent):
        if RunDir(candidate).is_run() and RunDir(candidate).speakers.is_file():
            return candidate
    return None


def _check_front_end(features: FeaturesConfig, sample_rate: int, cfg: Config, path: Path) -> None:
    for key in FRONT_END_KEYS:
        if key == "window" and features.kind == cfg.features.kind == "speechbrain":
            continue  # SpeechBrain's Fbank has its own window
        theirs, ours = getattr(features, key), getattr(cfg.features, key)
        if theirs != ours:
            raise UserError(f"features.{key}: the run has {ours!r} but {path} was trained with {theirs!r} "
                            f"(weights only work with their own front end; set features.{key}={theirs})")
    if sample_rate != cfg.data.sample_rate:
        raise UserError(f"data.sample_rate: the run has {cfg.data.sample_rate} but {path} was trained at "
                        f"{sample_rate} Hz")


def _check_model(model: EcapaTdnn, weights: dict[str, torch.Tensor], cfg: Config, path: Path) -> None:
    """The source's network must be the run's: same model keys and, strictly, the same tensors and shapes."""
    expected = build_model(cfg.model, cfg.features.n_mels).state_dict()
    problem = None
    for key, value in expected.items():
        if key not in weights:
            problem = f"tensor '{key}' of the run's model (shape {tuple(value.shape)}) is missing from the source"
            break
        if weights[key].shape != value.shape:
            problem = (f"tensor '{key}' has shape {tuple(weights[key].shape)} in the source, the run's model needs "
                       f"{tuple(value.shape)}")
            break
    unexpected = sorted(set(weights) - set(expected))
    if problem is None and unexpected:
        problem = f"tensor '{unexpected[0]}' (shape {tuple(weights[unexpected[0]].shape)}) is not in the run's model"
    for key in MODEL_KEYS:
        theirs, ours = getattr(model, key), getattr(cfg.model, key)
        if theirs != ours:
            detail = f"; {problem}" if problem else ""
            raise UserError(f"model.{key}: the run has {ours!r} but {path} holds a model with {theirs!r}{detail}")
    if problem is not None:
        raise UserError(f"model.init_from: {path}: {problem}")


def _read_head(path: Path) -> torch.Tensor | None:
    try:
        with safe_open(str(path), framework="pt") as weights:
            return weights.get_tensor(HEAD_KEY) if HEAD_KEY in weights.keys() else None
    except (OSError, SafetensorError) as error:
        raise UserError(f"{path}: not a readable safetensors file ({error})") from None
