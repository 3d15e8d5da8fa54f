"""Manifest CSVs: load with Hugging Face `datasets`, validate every row, summarise.

A manifest has a header row and one row per utterance. Required columns: `path` (alias `wav`) and `spk`
(alias `spk_id`; not needed for noise/RIR lists); optional: `ID`, `dur` (alias `duration`), `start`, `stop`
(seconds within the file). Relative paths resolve against the CSV's folder. Rows are numbered from 1
(the first line after the header) in every message.

The Arrow cache of a CSV lives in a folder named after the SHA-256 of its content: `datasets` keys its own
cache on path and modification time, so a CSV rewritten within the same second would otherwise be served stale.
The audio headers of its files are cached beside it (`ecapa_accel.data.headers`).
"""

from __future__ import annotations

import csv
import functools
import logging
import os
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import datasets
import numpy as np
import pandas
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import UserError
from ..files import sha256_file
from .headers import MISSING, READABLE, UNREADABLE, cache_file, iter_text, read_headers

logger = logging.getLogger(__name__)

COLUMN_ALIASES = {
    "ID": ("ID",),
    "path": ("path", "wav"),
    "spk": ("spk", "spk_id"),
    "dur": ("dur", "duration"),
    "start": ("start",),
    "stop": ("stop",),
    "category": ("category",),
}
SECONDS_COLUMNS = ("dur", "start", "stop")
STOP_TOLERANCE_S = 0.05  # segment ends computed from rounded times may overshoot the file by a few frames
MAX_LISTED_PROBLEMS = 10


class Problems:
    """Collects one line per problem; `raise_if_any` turns them into one `UserError` (capped, then a count)."""

    def __init__(self, limit: int = MAX_LISTED_PROBLEMS):
        self.limit = limit
        self.lines: list[str] = []
        self.count = 0

    def add(self, line: str) -> None:
        self.count += 1
        if len(self.lines) < self.limit:
            self.lines.append(line)

    def raise_if_any(self) -> None:
        if not self.count:
            return
        more = self.count - len(self.lines)
        raise UserError("\n".join(self.lines + ([f"... and {more} more problems"] if more else [])))


@dataclass
class Manifest:
    """One validated CSV. Rows stay in a memory-mapped Arrow table; per-row numbers are numpy arrays."""

    csv: Path
    rows: datasets.Dataset  # string columns under their canonical names (path, spk, ...)
    speakers: list[str]  # distinct speaker labels, sorted ([] for noise/RIR lists)
    speaker_index: np.ndarray | None  # int32 per row: index into `speakers`
    start: np.ndarray | None  # float64 seconds per row (NaN: file start)
    stop: np.ndarray | None  # float64 seconds per row (NaN: file end)
    seconds: float | None  # total audio in the listed segments; None when unknown (audio not checked, no dur)
    sample_rates: Counter = field(default_factory=Counter)
    channels: Counter = field(default_factory=Counter)
    unreadable: list[int] = field(default_factory=list)  # rows whose audio header cannot be read

    def __len__(self) -> int:
        return len(self.rows)

    @functools.cached_property
    def _paths(self) -> pa.ChunkedArray:
        return self.rows.data.column("path")

    @functools.cached_property
    def _folder(self) -> str:
        return str(self.csv.parent)

    def audio_path(self, row: int) -> str:
        """The row's audio file, resolved against the CSV's folder."""
        return os.path.join(self._folder, self._paths[row].as_py())

    def where(self, row: int) -> str:
        """A row named for messages."""
        return f"{self.csv} row {row + 1}"

    def segment(self, row: int) -> tuple[float, float | None]:
        """(start, stop) in seconds; stop None means the end of the file."""
        start = 0.0 if self.start is None or np.isnan(self.start[row]) else float(self.start[row])
        stop = None if self.stop is None or np.isnan(self.stop[row]) else float(self.stop[row])
        return start, stop

    def column(self, name: str) -> list[str] | None:
        """All values of an optional text column (small lists such as noise categories), or None."""
        return self.rows.data.column(name).to_pylist() if name in self.rows.column_names else None

    def summary(self) -> str:
        files = len(_distinct_values(self._paths)[0])
        parts = [f"{len(self):,} rows ({files:,} files)"]
        if self.speaker_index is not None:
            parts.append(f"{len(self.speakers):,} speakers")
        if self.seconds is not None:
            parts.append(f"{self.seconds / 3600:,.2f} h")
        if self.sample_rates:
            parts.append(", ".join(f"{rate} Hz ({n:,})" for rate, n in sorted(self.sample_rates.items())))
        if self.channels:
            parts.append(", ".join(f"{ch} channel{'s' * (ch > 1)} ({n:,})" for ch, n in sorted(self.channels.items())))
        if self.unreadable:
            parts.append(f"{len(self.unreadable):,} unreadable")
        return f"{self.csv}: " + ", ".join(parts)


def _cache_dir(path: Path) -> str:
    return os.path.join(datasets.config.HF_DATASETS_CACHE, "ecapa_accel_manifests", sha256_file(path)[:32])


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars or log lines from `datasets` around our own one-line errors."""
    logging = datasets.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity(logging.CRITICAL + 10)
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _read_header(path: Path) -> tuple[list[str], str | None]:
    """(column names, None) or ([], what is wrong with the file)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, skipinitialspace=True)
            header, first_row = next(reader, None), next(reader, None)
    except FileNotFoundError:
        return [], "manifest not found"
    except UnicodeDecodeError:
        return [], "not UTF-8 text"
    except OSError as error:
        return [], f"cannot read ({error.strerror})"
    if not header or not any(name.strip() for name in header):
        return [], "empty file (a header row is required)"
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        return [], f"header: column {', '.join(map(repr, duplicated))} appears twice"
    if first_row is None:
        return [], "no rows after the header"
    return header, None


def _load_rows(path: Path, header: list[str], cache_dir: str, problems: Problems) -> datasets.Dataset | None:
    """All columns as strings (empty cells stay ''), memory-mapped from a content-keyed cache."""
    features = datasets.Features({name: datasets.Value("string") for name in header})
    try:
        with _quiet_datasets(), warnings.catch_warnings():
            # A row longer than the header would otherwise be dropped silently or turned into an index.
            warnings.simplefilter("error", pandas.errors.ParserWarning)
            return datasets.load_dataset(
                "csv", data_files=str(path), split="train", cache_dir=cache_dir, features=features,
                encoding="utf-8-sig", skipinitialspace=True, na_filter=False, index_col=False,
            )
    except Exception as error:  # datasets wraps pandas' parser errors; report the root cause in one line
        while error.__cause__ is not None or error.__context__ is not None:
            error = error.__cause__ or error.__context__
        message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        problems.add(f"{path}: cannot parse CSV: {message}")
        return None


def _canonical_columns(path: Path, header: list[str], needs_speaker: bool, problems: Problems) -> dict | None:
    """{canonical name: column in the CSV} for the columns we use."""
    found = {}
    for canonical, aliases in COLUMN_ALIASES.items():
        present = [alias for alias in aliases if alias in header]
        if present:
            found[canonical] = present[0]
    required = ["path"] + (["spk"] if needs_speaker else [])
    missing = [name for name in required if name not in found]
    if missing:
        wanted = " and ".join(f"'{name}'" + (f" (or '{COLUMN_ALIASES[name][1]}')" if len(COLUMN_ALIASES[name]) > 1
                                                else "") for name in missing)
        problems.add(f"{path}: header has no {wanted} column (columns: {', '.join(header)})")
        return None
    return found


def _row_label(row: int, ids: pa.ChunkedArray | None) -> str:
    return f"row {row + 1}" + (f" (ID {ids[row].as_py()})" if ids is not None else "")


def _blank(column: pa.ChunkedArray) -> np.ndarray:
    return pc.match_substring_regex(column, r"^\s*$").to_numpy()


def _parse_seconds(column: pa.ChunkedArray) -> tuple[np.ndarray, list[int]]:
    """Text -> float64 seconds (NaN where empty) and the rows that hold something else than a finite number."""
    text = pc.utf8_trim_whitespace(column)
    empty = pc.equal(text, "")
    try:
        values = pc.cast(pc.if_else(empty, pa.scalar(None, pa.string()), text), pa.float64()).to_numpy()
    except pa.ArrowInvalid:
        values = np.full(len(column), np.nan)
        for row, value in enumerate(iter_text(text)):
            try:
                values[row] = float(value) if value else np.nan
            except ValueError:
                values[row] = np.inf
    bad = ~np.isfinite(values) & ~np.isnan(values)
    bad |= np.isnan(values) & ~empty.to_numpy()  # "nan" written out is not a duration
    return values, np.flatnonzero(bad).tolist()


def _duplicates(column: pa.ChunkedArray) -> dict[str, list[int]]:
    """Value -> rows, for values listed more than once. Compares 64-bit hashes first: a hash set of a million
    strings would cost ~70 MB."""
    hashes = np.fromiter((hash(value) for value in iter_text(column)), dtype=np.int64, count=len(column))
    order = np.argsort(hashes, kind="stable")
    same = hashes[order[1:]] == hashes[order[:-1]]
    candidates = np.union1d(order[1:][same], order[:-1][same])
    groups: dict[str, list[int]] = {}
    for row in candidates.tolist():
        groups.setdefault(column[row].as_py(), []).append(row)
    return {value: rows for value, rows in groups.items() if len(rows) > 1}


def _distinct_values(column: pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    """The distinct values of a string column (sorted) and each row's index among them. By sorting: Arrow's
    hash kernels take ~200 MB for a million paths, this ~50 MB."""
    order = pc.sort_indices(column).to_numpy()
    ordered = column.take(order).combine_chunks()
    first = np.ones(len(ordered), dtype=bool)
    first[1:] = pc.not_equal(ordered.slice(1), ordered.slice(0, len(ordered) - 1)).to_numpy(zero_copy_only=False)
    index = np.empty(len(ordered), dtype=np.int64)
    index[order] = np.cumsum(first) - 1
    return ordered.filter(pa.array(first)), index


def _rows_where(mask: np.ndarray) -> list[int]:
    return np.flatnonzero(mask).tolist()


def read_manifest(
    path: str | Path,
    problems: Problems,
    *,
    needs_speaker: bool = True,
    check_audio: bool = True,
    tolerate_unreadable: bool = False,
) -> Manifest | None:
    """Load and validate one CSV, adding a line to `problems` per fault; None when it cannot be used at all.

    check_audio: every listed file must exist and have a readable header (sample rate, frames, channels);
    segments must lie inside the file. tolerate_unreadable: a file that exists but cannot be decoded is
    recorded in `Manifest.unreadable` (training skips it) instead of being a problem.
    """
    path = Path(path)
    header, fault = _read_header(path)
    if fault:
        problems.add(f"{path}: {fault}")
        return None
    columns = _canonical_columns(path, header, needs_speaker, problems)
    if columns is None:
        return None
    cache_dir = _cache_dir(path)
    rows = _load_rows(path, header, cache_dir, problems)
    if rows is None:
        return None
    rows = rows.select_columns(list(columns.values()))
    rows = rows.rename_columns({csv_name: name for name, csv_name in columns.items() if csv_name != name})
    table = rows.data
    ids = table.column("ID") if "ID" in columns else None
    where = functools.partial(_row_label, ids=ids)

    for row in _rows_where(_blank(table.column("path"))):
        problems.add(f"{path} {where(row)}: empty path")
    speakers, speaker_index = [], None
    if "spk" in columns:
        labels = table.column("spk")
        for row in _rows_where(_blank(labels)):
            problems.add(f"{path} {where(row)}: empty speaker label")
        speakers = sorted(pc.unique(labels).to_pylist())
        speaker_index = pc.index_in(labels, value_set=pa.array(speakers)).to_numpy().astype(np.int32)
    if ids is not None:
        for value, rows_with in _duplicates(ids).items():
            problems.add(f"{path}: duplicate ID '{value}' in rows {', '.join(str(r + 1) for r in rows_with[:5])}")

    seconds = {}
    for name in SECONDS_COLUMNS:
        if name in columns:
            seconds[name], bad_rows = _parse_seconds(table.column(name))
            for row in bad_rows:
                problems.add(f"{path} {where(row)}: {columns[name]} '{table.column(name)[row].as_py()}' "
                             "is not a number of seconds")
    start, stop, dur = seconds.get("start"), seconds.get("stop"), seconds.get("dur")
    if dur is not None:
        for row in _rows_where(dur <= 0):
            problems.add(f"{path} {where(row)}: {columns['dur']} must be positive, got {dur[row]:g}")
    if start is not None:
        for row in _rows_where(start < 0):
            problems.add(f"{path} {where(row)}: start must be >= 0, got {start[row]:g}")
    if start is not None and stop is not None:
        for row in _rows_where(stop <= start):
            problems.add(f"{path} {where(row)}: stop {stop[row]:g} s is not after start {start[row]:g} s")
    elif stop is not None:
        for row in _rows_where(stop <= 0):
            problems.add(f"{path} {where(row)}: stop must be positive, got {stop[row]:g}")

    manifest = Manifest(path, rows, speakers, speaker_index, start, stop, None)
    if check_audio:
        _check_audio(manifest, problems, where, tolerate_unreadable, cache_dir)
    elif dur is not None:
        manifest.seconds = float(np.nansum(dur))
    return manifest


def _check_audio(manifest: Manifest, problems: Problems, where: Callable[[int], str],
                 tolerate_unreadable: bool, cache_dir: str) -> None:
    """Every file exists and has a readable header; segments lie inside their files; totals for the summary."""
    paths = manifest.rows.data.column("path")
    distinct, file_of_row = _distinct_values(paths)  # rows often repeat a file (segments): one header per file
    headers = read_headers(manifest.csv.parent, distinct, cache_file(cache_dir, manifest.csv.parent))
    logger.info("%s: audio headers of %d files: %d unchanged since the last check, %d read", manifest.csv,
                len(distinct), headers.reused, headers.read)
    status = headers.status[file_of_row]
    readable = status == READABLE
    for counts, values in ((manifest.sample_rates, headers.sample_rate), (manifest.channels, headers.channels)):
        found, times = np.unique(values[file_of_row[readable]], return_counts=True)
        counts.update(dict(zip(found.tolist(), times.tolist())))
    length = (headers.frames / np.maximum(headers.sample_rate, 1))[file_of_row]
    start = 0.0 if manifest.start is None else np.nan_to_num(manifest.start, nan=0.0)
    stop = np.nan if manifest.stop is None else manifest.stop
    stop_given = ~np.isnan(np.broadcast_to(stop, status.shape))
    end = np.where(stop_given, stop, start)  # the last second of the segment, which must exist
    past_end = readable & (end > length + STOP_TOLERANCE_S)
    inside = readable & ~past_end
    segment = np.minimum(np.where(stop_given, stop, length), length) - start
    manifest.seconds = float(np.sum(segment, where=inside))
    if tolerate_unreadable:
        manifest.unreadable = np.flatnonzero(status == UNREADABLE).tolist()
    faulty = (status == MISSING) | past_end | ((status == UNREADABLE) & (not tolerate_unreadable))
    for row in np.flatnonzero(faulty).tolist():
        relative = paths[row].as_py()
        if status[row] == MISSING:
            problems.add(f"{manifest.csv} {where(row)}: audio file not found: {relative}")
        elif status[row] == UNREADABLE:
            problems.add(f"{manifest.csv} {where(row)}: cannot read audio {relative}: "
                         f"{headers.reasons[int(file_of_row[row])]}")
        else:
            name = "stop" if stop_given[row] else "start"
            problems.add(f"{manifest.csv} {where(row)}: {name} {end[row]:g} s is past the end of {relative} "
                         f"({length[row]:.3f} s; start/stop are seconds)")


def check_manifests(paths: list[Path]) -> list[str]:
    """`ecapa-accel data check`: validate CSVs (columns, values, audio headers); summary lines or `UserError`."""
    problems = Problems()
    manifests = [read_manifest(path, problems) for path in paths]
    problems.raise_if_any()
    lines = [manifest.summary() for manifest in manifests]
    if len(manifests) > 1:
        rows = sum(len(m) for m in manifests)
        hours = sum(m.seconds for m in manifests) / 3600
        lines.append(f"total: {rows:,} rows, {hours:.2f} h in {len(manifests)} manifests")
    return lines
