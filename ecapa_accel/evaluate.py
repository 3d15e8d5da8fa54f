"""Speaker-verification scoring: trials files, full-utterance embeddings, cosine scores, AS-norm, `eval`, `verify`.

The metric maths (EER, minDCF, DET curve) lives in `ecapa_accel.metrics` and is re-exported here.
"""

from __future__ import annotations

import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .config import EvalConfig
from .data.audio import UnreadableAudio, audio_header
from .data.manifest import Problems, read_manifest
from .encoder import MAX_CHUNK_SECONDS, EcapaEncoder, decode_audio, mean_by_group
from .errors import UserError
from .metrics import (  # noqa: F401  (re-exported: the scoring API has always been importable from here)
    DetCurve,
    check_p_targets,
    compute_eer,
    compute_eer_threshold,
    compute_min_dcf,
    det_curve,
    score_report,
)


# ---- AS-norm


def cohort_top_k_stats(embeddings: torch.Tensor, cohort: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of each embedding's `top_k` highest cosine scores against the cohort."""
    cohort = F.normalize(cohort.float(), dim=1)
    k = min(top_k, cohort.shape[0])
    means, stds = [], []
    for rows in F.normalize(embeddings.float(), dim=1).split(4096):  # bounds the (rows x cohort) score matrix
        top = (rows @ cohort.T).topk(k, dim=1).values
        means.append(top.mean(dim=1))
        stds.append(top.std(dim=1, unbiased=False))
    return torch.cat(means), torch.cat(stds)


def as_norm(
    scores: torch.Tensor,
    enroll_stats: tuple[torch.Tensor, torch.Tensor],
    test_stats: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Adaptive symmetric score normalisation: the mean of the score z-normalised by each side's cohort statistics."""
    (enroll_mean, enroll_std), (test_mean, test_std) = enroll_stats, test_stats
    floor = 1e-6  # a cohort whose top scores are all equal must not divide by zero
    enroll_z = (scores - enroll_mean) / enroll_std.clamp_min(floor)
    test_z = (scores - test_mean) / test_std.clamp_min(floor)
    return 0.5 * (enroll_z + test_z)


# ---- trials, manifests and audio


@dataclass(frozen=True)
class Trial:
    enroll: str  # as written in the trials file: a path (VoxCeleb format) or an utterance ID (Kaldi format)
    test: str
    label: int  # 1 target, 0 non-target
    line: int


_VOXCELEB_LABELS = {"1": 1, "0": 0}
_KALDI_LABELS = {"target": 1, "nontarget": 0}


def read_trials(path: str | Path) -> tuple[list[Trial], str]:
    """Parse a trials file; returns the trials and the format found ("voxceleb" or "kaldi")."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise UserError(f"{path}: trials file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot read trials file ({error})") from None
    trials, layout = [], None
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        found = None
        if len(fields) == 3 and fields[0] in _VOXCELEB_LABELS:
            found = "voxceleb"
        elif len(fields) == 3 and fields[2] in _KALDI_LABELS:
            found = "kaldi"
        if found is None or layout not in (None, found):
            expected = {None: "'1 a.wav b.wav' (VoxCeleb) or 'utt_a utt_b target|nontarget' (Kaldi)",
                        "voxceleb": "'1 a.wav b.wav' like the lines above",
                        "kaldi": "'utt_a utt_b target|nontarget' like the lines above"}[layout]
            raise UserError(f"{path} line {number}: expected {expected}, got {line.strip()!r}")
        layout = found
        if found == "voxceleb":
            trials.append(Trial(fields[1], fields[2], _VOXCELEB_LABELS[fields[0]], number))
        else:
            trials.append(Trial(fields[0], fields[1], _KALDI_LABELS[fields[2]], number))
    if not trials:
        raise UserError(f"{path}: no trials in the file")
    return trials, layout


@dataclass(frozen=True)
class AudioItem:
    """A checked utterance: frames [start, stop) of an audio file at its own sample rate."""

    path: Path
    start: int
    stop: int
    sample_rate: int

    @property
    def seconds(self) -> float:
        return (self.stop - self.start) / self.sample_rate


def audio_item(path: str | Path, where: str, start: float | None = None, stop: float | None = None) -> AudioItem:
    """Check that `path` is readable audio (header only) and that the segment [start, stop) seconds lies inside it.

    A stop a little past the end (segment times rounded in a manifest) is clamped to the end of the file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{where}: audio file not found: {path}")
    try:
        rate, frames, _ = audio_header(str(path))
    except (FileNotFoundError, UnreadableAudio) as error:
        raise UserError(f"{where}: {path} is not a readable audio file ({error})") from None
    first = 0 if start is None else round(start * rate)
    last = frames if stop is None else min(frames, round(stop * rate))
    if not 0 <= first < last:
        raise UserError(f"{where}: {path} has no audio in the requested segment ({frames} frames)")
    return AudioItem(path, first, last, rate)


@dataclass(frozen=True)
class ManifestRow:
    item: AudioItem
    id: str
    speaker: str | None


def manifest_rows(path: str | Path) -> list[ManifestRow]:
    """The utterances of a manifest CSV (`path`; optional `ID`, `spk`, `start`, `stop`), read and checked by the
    data package's manifest reader, so that rows are numbered as `ecapa-accel data check` numbers them."""
    problems = Problems()
    manifest = read_manifest(path, problems, needs_speaker=False)
    problems.raise_if_any()
    paths = manifest.column("path")
    ids = manifest.column("ID") or paths
    speakers = manifest.column("spk")
    rows = []
    for row in range(len(manifest)):
        start, stop = manifest.segment(row)
        item = audio_item(manifest.audio_path(row), f"{manifest.csv} row {row + 1}", start, stop)
        rows.append(ManifestRow(item, ids[row] or paths[row], speakers[row] if speakers else None))
    return rows


def _decode(item: AudioItem, sample_rate: int) -> torch.Tensor:
    """Mono float32 waveform of the item at `sample_rate`."""
    return decode_audio(item.path, sample_rate, item.start, item.stop)


def _prefetched(function: Callable, items: Iterable, workers: int) -> Iterator:
    """`map(function, items)` computed by `workers` threads, at most 4 * workers results ahead of the consumer."""
    workers = max(1, workers)
    with ThreadPoolExecutor(workers) as pool:
        window = deque()
        for item in items:
            window.append(pool.submit(function, item))
            if len(window) > 4 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def embed_items(
    encoder: EcapaEncoder,
    items: Sequence[AudioItem],
    eval_cfg: EvalConfig | None = None,
    max_chunk_seconds: float = MAX_CHUNK_SECONDS,
) -> torch.Tensor:
    """Full-utterance embeddings (len(items), embed_dim) on the CPU, equal to `encoder.embed_file` on each item.

    Every length is checked before anything is decoded. Utterances are decoded by background threads, shortest
    first, and embedded by `encoder.embed_waves` (chunks and batches). A progress bar goes to stderr when it
    is a terminal.
    """
    eval_cfg = eval_cfg or EvalConfig()
    sample_rate = encoder.sample_rate
    for item in items:
        encoder.check_length(-(-(item.stop - item.start) * sample_rate // item.sample_rate), item.path)
    order = sorted(range(len(items)), key=lambda i: items[i].seconds)
    decoded = _prefetched(lambda i: (items[i].path, _decode(items[i], sample_rate)), order, eval_cfg.decode_workers)
    with closing(decoded), tqdm(decoded, total=len(items), desc="embedding", unit="file", leave=False,
                                 disable=None, file=sys.stderr) as progress:
        embeddings = encoder.embed_waves(progress, max_chunk_seconds, eval_cfg.batch_seconds)
    in_order = torch.empty_like(embeddings)
    in_order[torch.tensor(order, dtype=torch.long)] = embeddings
    return in_order


def cosine_scores(embeddings: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each (enroll, test) row pair."""
    unit = F.normalize(embeddings.float(), dim=1)
    return (unit[pairs[:, 0]] * unit[pairs[:, 1]]).sum(dim=1)


# ---- evaluation entry points


@dataclass(frozen=True)
class TrialList:
    """A parsed and checked trials file: its trials, each distinct utterance once, and index pairs into them."""

    trials: list[Trial]
    items: list[AudioItem]
    pairs: torch.Tensor  # (trials, 2): enroll and test index into `items`
    labels: np.ndarray  # 1 target, 0 non-target
    source: Path


def _trial_list(trials_path: Path, audio_root: str | Path | None, by_id: dict[str, AudioItem] | None,
                manifest: str | Path | None) -> TrialList:
    trials, layout = read_trials(trials_path)
    root = Path(audio_root) if audio_root else trials_path.parent
    hint = " (Kaldi-style IDs: pass a manifest CSV with ID,path columns)" if layout == "kaldi" and not by_id else ""
    index: dict[str, int] = {}
    items: list[AudioItem] = []
    for trial in trials:
        for key in (trial.enroll, trial.test):
            if key in index:
                continue
            where = f"{trials_path} line {trial.line}"
            if by_id is not None:
                if key not in by_id:
                    raise UserError(f"{where}: utterance '{key}' is not in manifest {manifest}")
                item = by_id[key]
            else:
                try:
                    item = audio_item(root / key, where)
                except UserError as error:
                    raise UserError(f"{error}{hint}") from None
            index[key] = len(items)
            items.append(item)
    pairs = torch.tensor([(index[t.enroll], index[t.test]) for t in trials])
    return TrialList(trials, items, pairs, np.array([trial.label for trial in trials]), trials_path)


def load_trials(eval_cfg: EvalConfig) -> TrialList:
    """Read `eval_cfg.trials` and check every audio file it names (headers only).

    Trial entries are paths relative to `eval_cfg.audio_root` (default: the trials file's folder), or IDs looked
    up in `eval_cfg.manifest` when one is given.
    """
    by_id = {row.id: row.item for row in manifest_rows(eval_cfg.manifest)} if eval_cfg.manifest else None
    return _trial_list(Path(eval_cfg.trials), eval_cfg.audio_root, by_id, eval_cfg.manifest)


def validate(encoder: EcapaEncoder, eval_cfg: EvalConfig, scores_out: Path | None = None) -> dict:
    """Score `eval_cfg.trials` with `encoder` (in-training validation): `{"eer", "min_dcf", "trials", "threshold"}`.

    Writes "score label" lines to `scores_out` when given.
    """
    trial_list = load_trials(eval_cfg)
    scores = cosine_scores(embed_items(encoder, trial_list.items, eval_cfg), trial_list.pairs).numpy()
    labels = trial_list.labels
    if scores_out is not None:
        Path(scores_out).write_text("".join(f"{s:.6f} {l}\n" for s, l in zip(scores, labels)), encoding="utf-8")
    return score_report(scores, labels)


def _cohort_members(rows: list[ManifestRow], source: str | Path) -> torch.Tensor:
    """The cohort member of each manifest row: one per speaker when the manifest names speakers, else per file."""
    keys = [row.speaker if row.speaker is not None else number for number, row in enumerate(rows)]
    members = {key: member for member, key in enumerate(dict.fromkeys(keys))}
    if len(members) < 2:
        raise UserError(f"{source}: AS-norm needs at least 2 cohort speakers or files, got {len(members)}")
    return torch.tensor([members[key] for key in keys])


def _distinct_items(trial_lists: list[TrialList]) -> tuple[list[AudioItem], list[torch.Tensor]]:
    """Every utterance of all trial lists once, and each list's pairs as indices into them."""
    index: dict[tuple, int] = {}
    items: list[AudioItem] = []
    pairs = []
    for trial_list in trial_lists:
        position = []
        for item in trial_list.items:
            key = (item.path.resolve(), item.start, item.stop)  # one file reached by two relative paths
            if key not in index:
                index[key] = len(items)
                items.append(item)
            position.append(index[key])
        pairs.append(torch.tensor(position)[trial_list.pairs])
    return items, pairs


def evaluate_trials(
    model_dir: str | Path,
    trials: str | Path | Sequence[str | Path],
    audio_root: str | Path | None = None,
    cohort: str | Path | None = None,
    scores_out: str | Path | Sequence[str | Path] | None = None,
    manifest: str | Path | None = None,
    top_k: int = 300,
    p_targets: Sequence[float] | None = None,
    device: str | torch.device | None = None,
) -> dict | list[dict]:
    """`ecapa-accel eval`: cosine-score trials lists with an export folder (or run directory).

    For one trials file returns `{"eer", "min_dcf", "trials", "threshold"}` for the raw cosine scores; with a
    cohort manifest also `"asnorm": {"eer", "min_dcf", "threshold", "top_k", "cohort_size"}` for the
    AS-normalised ones. minDCF is at p_target 0.01 or the first of `p_targets`; with `p_targets`, "min_dcf_at"
    maps each to its minDCF. For several trials files (a sequence of more than one) returns a list of such
    reports, each with "trials_file"; every audio file is embedded once for all of them. `scores_out` (one per trials file) gets one line per
    trial: `enroll test cosine [asnorm] label`.
    """
    trials_files = [Path(path) for path in ([trials] if isinstance(trials, (str, Path)) else trials)]
    several = len(trials_files) > 1
    if scores_out is not None:
        scores_files = [Path(path) for path in ([scores_out] if isinstance(scores_out, (str, Path)) else scores_out)]
        if len(scores_files) != len(trials_files):
            raise UserError(f"--scores: give one per --trials ({len(trials_files)} trials files, "
                            f"{len(scores_files)} scores files)")
    if top_k < 1:
        raise UserError(f"AS-norm top_k must be at least 1, got {top_k}")
    if p_targets is not None:
        check_p_targets(p_targets)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    encoder = EcapaEncoder.from_pretrained(model_dir).to(device).eval()
    by_id = {row.id: row.item for row in manifest_rows(manifest)} if manifest is not None else None
    trial_lists = [_trial_list(path, audio_root, by_id, manifest) for path in trials_files]
    cohort_rows = manifest_rows(cohort) if cohort is not None else []
    cohort_members = _cohort_members(cohort_rows, cohort) if cohort is not None else None

    items, pairs_of_list = _distinct_items(trial_lists)
    embeddings = embed_items(encoder, items + [row.item for row in cohort_rows], EvalConfig())
    trial_embeddings = embeddings[: len(items)]
    if cohort is not None:
        members = mean_by_group(embeddings[len(items):], cohort_members, int(cohort_members.max()) + 1)
        cohort_mean, cohort_std = cohort_top_k_stats(trial_embeddings, members, top_k)
    reports = []
    for number, (trial_list, pairs) in enumerate(zip(trial_lists, pairs_of_list)):
        scores = cosine_scores(trial_embeddings, pairs)
        report = {"trials_file": str(trial_list.source)} if several else {}
        report.update(score_report(scores, trial_list.labels, p_targets))
        columns = [scores]
        if cohort is not None:
            enroll, test = pairs[:, 0], pairs[:, 1]
            normalised = as_norm(scores, (cohort_mean[enroll], cohort_std[enroll]),
                                 (cohort_mean[test], cohort_std[test]))
            columns.append(normalised)
            report["asnorm"] = {**score_report(normalised, trial_list.labels, p_targets),
                                "top_k": min(top_k, members.shape[0]), "cohort_size": members.shape[0]}
        if scores_out is not None:
            _write_scores(scores_files[number], trial_list.trials, columns)
        reports.append(report)
    return reports if several else reports[0]


def _write_scores(path: Path, trials: list[Trial], columns: list[torch.Tensor]) -> None:
    lines = []
    for i, trial in enumerate(trials):
        values = " ".join(f"{float(column[i]):.6f}" for column in columns)
        lines.append(f"{trial.enroll} {trial.test} {values} {trial.label}\n")
    path.write_text("".join(lines), encoding="utf-8")


def verify_pair(model_dir: str | Path, first: str | Path, second: str | Path,
                device: str | torch.device | None = None) -> dict:
    """`ecapa-accel verify`: `{"score", "threshold", "same"}` for two audio files.

    `score` is the cosine of their embeddings; `threshold` is the export's calibrated threshold (config.json
    "threshold") or None, and `same` is score >= threshold (None without a threshold).
    """
    items = [audio_item(path, "verify") for path in (first, second)]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    encoder = EcapaEncoder.from_pretrained(model_dir).to(device).eval()
    score = float(cosine_scores(embed_items(encoder, items), torch.tensor([[0, 1]]))[0])
    threshold = encoder.threshold
    return {"score": score, "threshold": threshold, "same": None if threshold is None else score >= threshold}


def report_lines(report: dict | list[dict]) -> list[str]:
    """`ecapa-accel eval` without --json: a line for the raw scores (and one for AS-norm) per trials file."""
    lines = []
    for one in report if isinstance(report, list) else [report]:
        prefix = f"{one['trials_file']}: " if "trials_file" in one else ""
        lines.append(f"{prefix}{one['trials']} trials: {_rates(one)}")
        if "asnorm" in one:
            norm = one["asnorm"]
            lines.append(f"{prefix}AS-norm (top {norm['top_k']} of {norm['cohort_size']} cohort): {_rates(norm)}")
    return lines


def _rates(values: dict) -> str:
    costs = values.get("min_dcf_at")
    dcf = ", ".join(f"minDCF({p}) {v:.4f}" for p, v in costs.items()) if costs else f"minDCF {values['min_dcf']:.4f}"
    return f"EER {values['eer']:.3f}%, {dcf}, threshold {values['threshold']:.4f}"
