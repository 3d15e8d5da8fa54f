"""Speaker-verification scoring: EER and minDCF, trials files, full-utterance embeddings, cosine scores, AS-norm.

A trial is accepted when its score is >= the threshold. The EER is where the miss and false-alarm rates of the
step-wise DET curve cross, linearly interpolated between the two thresholds around the crossing; minDCF is the
normalised detection cost minimised over every threshold (including "reject all").
"""

from __future__ import annotations

import csv
import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import soundfile
import torch
import torch.nn.functional as F
import torchaudio.functional as AF

from .config import EvalConfig
from .encoder import MAX_CHUNK_SECONDS, EcapaEncoder, read_mono
from .errors import UserError
from .model import MIN_FRAMES

ArrayLike = Sequence[float] | np.ndarray | torch.Tensor


# ---- metrics


def _as_numpy(values: ArrayLike, dtype) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype).reshape(-1)


@dataclass(frozen=True)
class DetCurve:
    """Miss and false-alarm rates at every distinct threshold (ascending scores, then +inf = reject all)."""

    thresholds: np.ndarray
    miss: np.ndarray  # fraction of target trials scoring below the threshold
    false_alarm: np.ndarray  # fraction of non-target trials scoring at or above it

    def eer_point(self) -> tuple[float, float]:
        """(EER as a fraction, threshold): the crossing of the miss and false-alarm curves.

        The threshold is the score, among those on either side of the crossing, where the two rates are closest.
        """
        gap = self.false_alarm - self.miss  # never increases with the threshold; gap[0] = 1, gap[-1] = -1
        after = int(np.argmax(gap <= 0))
        before = after - 1
        fraction = gap[before] / (gap[before] - gap[after])
        eer = self.miss[before] + fraction * (self.miss[after] - self.miss[before])
        closest = after if -gap[after] <= gap[before] and np.isfinite(self.thresholds[after]) else before
        return float(eer), float(self.thresholds[closest])

    def min_dcf_point(self, p_target: float = 0.01, c_miss: float = 1.0, c_fa: float = 1.0) -> tuple[float, int]:
        """(normalised minDCF, index of the threshold where it is reached)."""
        if not 0 < p_target < 1 or c_miss <= 0 or c_fa <= 0:
            raise ValueError("p_target must be within (0, 1) and the costs positive")
        cost = c_miss * p_target * self.miss + c_fa * (1 - p_target) * self.false_alarm
        best = int(np.argmin(cost))
        return float(cost[best] / min(c_miss * p_target, c_fa * (1 - p_target))), best


def det_curve(scores: ArrayLike, labels: ArrayLike) -> DetCurve:
    """Error rates of `scores` (higher = more likely the same speaker) against `labels` (1 target, 0 non-target)."""
    scores = _as_numpy(scores, np.float64)
    labels = _as_numpy(labels, np.float64)
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 1 (target) or 0 (non-target)")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    targets = np.sort(scores[labels == 1])
    nontargets = np.sort(scores[labels == 0])
    if targets.size == 0 or nontargets.size == 0:
        raise UserError(
            f"scoring needs target and non-target trials; got {targets.size} target, {nontargets.size} non-target"
        )
    thresholds = np.append(np.unique(scores), np.inf)
    miss = np.searchsorted(targets, thresholds, side="left") / targets.size
    false_alarm = 1.0 - np.searchsorted(nontargets, thresholds, side="left") / nontargets.size
    return DetCurve(thresholds, miss, false_alarm)


def compute_eer(scores: ArrayLike, labels: ArrayLike) -> float:
    """Equal error rate in percent."""
    return 100.0 * det_curve(scores, labels).eer_point()[0]


def compute_eer_threshold(scores: ArrayLike, labels: ArrayLike) -> float:
    """The score threshold (accept score >= threshold) where the miss and false-alarm rates are closest."""
    return det_curve(scores, labels).eer_point()[1]


def compute_min_dcf(
    scores: ArrayLike, labels: ArrayLike, p_target: float = 0.01, c_miss: float = 1.0, c_fa: float = 1.0
) -> float:
    """Minimum normalised detection cost: min over thresholds of DCF / min(c_miss * p_target, c_fa * (1 - p_target))."""
    return det_curve(scores, labels).min_dcf_point(p_target, c_miss, c_fa)[0]


def score_report(scores: ArrayLike, labels: ArrayLike) -> dict:
    """`{"eer" (percent), "min_dcf" (p_target 0.01), "trials", "threshold"}` of one score list."""
    curve = det_curve(scores, labels)
    eer, threshold = curve.eer_point()
    return {"eer": 100.0 * eer, "min_dcf": curve.min_dcf_point()[0], "trials": len(labels), "threshold": threshold}


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
    """Check that `path` is readable audio (header only) and that the segment [start, stop) seconds lies inside it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{where}: audio file not found: {path}")
    try:
        info = soundfile.info(str(path))
    except (soundfile.SoundFileError, RuntimeError) as error:
        message = " ".join(str(error).split())
        raise UserError(f"{where}: {path} is not a readable audio file ({message})") from None
    first = 0 if start is None else round(start * info.samplerate)
    last = info.frames if stop is None else round(stop * info.samplerate)
    if not 0 <= first < last <= info.frames:
        raise UserError(f"{where}: {path} has no audio in the requested segment ({info.frames} frames)")
    return AudioItem(path, first, last, info.samplerate)


@dataclass(frozen=True)
class ManifestRow:
    item: AudioItem
    id: str
    speaker: str | None


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """Rows of a manifest CSV (`path` or `wav`; optional `ID`, `spk`/`spk_id`, `start`, `stop`), audio checked."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            records = list(reader)
            columns = set(reader.fieldnames or ())
    except FileNotFoundError:
        raise UserError(f"{path}: manifest not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"{path}: cannot read manifest ({error})") from None
    path_column = next((c for c in ("path", "wav") if c in columns), None)
    if path_column is None:
        raise UserError(f"{path}: manifest needs a 'path' (or 'wav') column; found {', '.join(sorted(columns))}")
    speaker_column = next((c for c in ("spk", "spk_id") if c in columns), None)
    rows = []
    for number, record in enumerate(records, start=2):  # row 1 is the header
        where = f"{path} row {number}"
        if not record.get(path_column):
            raise UserError(f"{where}: empty '{path_column}'")
        try:
            start = float(record["start"]) if record.get("start") else None
            stop = float(record["stop"]) if record.get("stop") else None
        except ValueError:
            raise UserError(f"{where}: 'start'/'stop' must be numbers (seconds)") from None
        item = audio_item(path.parent / record[path_column], where, start, stop)
        rows.append(ManifestRow(item, record.get("ID") or record[path_column],
                                record[speaker_column] if speaker_column else None))
    return rows


def _decode(item: AudioItem, sample_rate: int) -> torch.Tensor:
    """Mono float32 waveform of the item at `sample_rate`."""
    wave, rate = read_mono(item.path)
    wave = wave[item.start:item.stop]
    return wave if rate == sample_rate else AF.resample(wave, rate, sample_rate)


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

    Utterances are decoded once, shortest first, by background threads; utterances of equal length share forward
    batches, so no padding ever changes an embedding. Files longer than `max_chunk_seconds` are embedded in
    near-equal chunks whose embeddings are averaged, as `embed_file` does.
    """
    eval_cfg = eval_cfg or EvalConfig()
    sample_rate = encoder.sample_rate
    for item in items:
        samples = -(-(item.stop - item.start) * sample_rate // item.sample_rate)  # resampled length, rounded up
        if encoder.front_end.num_frames(samples) < MIN_FRAMES:
            raise UserError(f"{item.path}: too short to embed ({item.seconds:.3f} s)")
    device = next(encoder.parameters()).device
    chunk = max_chunk_seconds * sample_rate
    budget = eval_cfg.batch_seconds * sample_rate
    pending: dict[int, list[tuple[int, torch.Tensor]]] = {}
    owners: list[int] = []
    outputs: list[torch.Tensor] = []

    def run(length: int) -> None:
        group = pending.pop(length)
        with torch.inference_mode():
            outputs.append(encoder(torch.stack([piece for _, piece in group]).to(device)).float().cpu())
        owners.extend(owner for owner, _ in group)

    order = sorted(range(len(items)), key=lambda i: items[i].seconds)
    for owner, wave in _prefetched(lambda i: (i, _decode(items[i], sample_rate)), order, eval_cfg.decode_workers):
        pieces = wave.tensor_split(max(1, math.ceil(wave.numel() / chunk)))
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
    return _group_means(torch.cat(outputs), torch.tensor(owners), len(items))


def _group_means(rows: torch.Tensor, owners: torch.Tensor, groups: int) -> torch.Tensor:
    """(groups, dim): the mean of the rows each group owns."""
    sums = torch.zeros(groups, rows.shape[1]).index_add_(0, owners, rows)
    return sums / torch.bincount(owners, minlength=groups).float()[:, None]


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


def load_trials(eval_cfg: EvalConfig) -> TrialList:
    """Read `eval_cfg.trials` and check every audio file it names (headers only).

    Trial entries are paths relative to `eval_cfg.audio_root` (default: the trials file's folder), or IDs looked
    up in `eval_cfg.manifest` when one is given.
    """
    trials_path = Path(eval_cfg.trials)
    trials, layout = read_trials(trials_path)
    root = Path(eval_cfg.audio_root) if eval_cfg.audio_root else trials_path.parent
    by_id = {row.id: row.item for row in read_manifest(eval_cfg.manifest)} if eval_cfg.manifest else None
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
                    raise UserError(f"{where}: utterance '{key}' is not in manifest {eval_cfg.manifest}")
                item = by_id[key]
            else:
                try:
                    item = audio_item(root / key, where)
                except UserError as error:
                    raise UserError(f"{error}{hint}") from None
            index[key] = len(items)
            items.append(item)
    pairs = torch.tensor([(index[t.enroll], index[t.test]) for t in trials])
    return TrialList(trials, items, pairs, np.array([trial.label for trial in trials]))


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


def _cohort_owners(rows: list[ManifestRow], source: str | Path) -> torch.Tensor:
    """The cohort member of each manifest row: one per speaker when the manifest names speakers, else per file."""
    if not rows:
        raise UserError(f"{source}: the cohort manifest lists no audio")
    keys = [row.speaker if row.speaker is not None else number for number, row in enumerate(rows)]
    members = {key: member for member, key in enumerate(dict.fromkeys(keys))}
    if len(members) < 2:
        raise UserError(f"{source}: AS-norm needs at least 2 cohort speakers or files, got {len(members)}")
    return torch.tensor([members[key] for key in keys])


def evaluate_trials(
    model_dir: str | Path,
    trials: str | Path,
    audio_root: str | Path | None = None,
    cohort: str | Path | None = None,
    scores_out: str | Path | None = None,
    manifest: str | Path | None = None,
    top_k: int = 300,
    device: str | torch.device | None = None,
) -> dict:
    """`ecapa-accel eval`: cosine-score a trials list with an export folder (or run directory).

    Returns `{"eer", "min_dcf", "trials", "threshold"}` for the raw cosine scores; with a cohort manifest also
    `"asnorm": {"eer", "min_dcf", "threshold", "top_k", "cohort_size"}` for the AS-normalised ones. `scores_out`
    gets one line per trial: `enroll test cosine [asnorm] label`.
    """
    if top_k < 1:
        raise UserError(f"AS-norm top_k must be at least 1, got {top_k}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    encoder = EcapaEncoder.from_pretrained(model_dir).to(device).eval()
    eval_cfg = EvalConfig(trials=str(trials), audio_root=str(audio_root) if audio_root else None,
                          manifest=str(manifest) if manifest else None)
    trial_list = load_trials(eval_cfg)
    cohort_rows = read_manifest(cohort) if cohort is not None else []
    cohort_owners = _cohort_owners(cohort_rows, cohort) if cohort is not None else None
    embeddings = embed_items(encoder, trial_list.items + [row.item for row in cohort_rows], eval_cfg)
    trial_embeddings = embeddings[: len(trial_list.items)]
    pairs = trial_list.pairs
    scores = cosine_scores(trial_embeddings, pairs)
    report = score_report(scores, trial_list.labels)
    columns = [scores]
    if cohort is not None:
        members = _group_means(embeddings[len(trial_list.items):], cohort_owners, int(cohort_owners.max()) + 1)
        mean, std = cohort_top_k_stats(trial_embeddings, members, top_k)
        normalised = as_norm(scores, (mean[pairs[:, 0]], std[pairs[:, 0]]), (mean[pairs[:, 1]], std[pairs[:, 1]]))
        columns.append(normalised)
        report["asnorm"] = {**score_report(normalised, trial_list.labels), "top_k": min(top_k, members.shape[0]),
                            "cohort_size": members.shape[0]}
    if scores_out is not None:
        lines = []
        for i, trial in enumerate(trial_list.trials):
            values = " ".join(f"{float(column[i]):.6f}" for column in columns)
            lines.append(f"{trial.enroll} {trial.test} {values} {trial.label}\n")
        Path(scores_out).write_text("".join(lines), encoding="utf-8")
    return report
