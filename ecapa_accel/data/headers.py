"""Audio headers of a manifest's files, cached so that a restart pays for `os.stat` rather than a header read.

Opening a million headers takes minutes at every training start. The cache is an Arrow IPC file beside the
manifest's Arrow cache (same CSV content hash, one file per CSV folder since relative paths resolve against it),
with one row per distinct path, sorted: the file's size and mtime_ns when its header was read, and what the
header said. A header is reused while size and mtime_ns are both unchanged; `data check` and training share it.
Float files (subtype FLOAT/DOUBLE) are decoded whole when their header is read: only they can hold NaN or
infinite samples, which count as unreadable audio.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .audio import UnreadableAudio, audio_header

logger = logging.getLogger(__name__)

READABLE, MISSING, UNREADABLE, BLANK = range(4)
CACHE_SCHEMA = pa.schema([
    ("path", pa.string()),
    ("size", pa.int64()),  # -1: read the header again next time (missing, or modified too recently to trust)
    ("mtime_ns", pa.int64()),
    ("sample_rate", pa.int32()),
    ("frames", pa.int64()),
    ("channels", pa.int32()),
    ("readable", pa.bool_()),
    ("reason", pa.string()),  # why an unreadable file cannot be decoded; null otherwise
])
# File systems that keep mtime in whole seconds (or two, FAT) cannot tell apart two writes that close together.
RACY_NS = 2_000_000_000


@dataclass
class AudioHeaders:
    """What the header of each distinct path says; arrays are indexed like the `paths` given to `read_headers`."""

    status: np.ndarray  # int8: READABLE, MISSING, UNREADABLE or BLANK (empty path)
    sample_rate: np.ndarray  # int32, 0 unless readable
    frames: np.ndarray  # int64
    channels: np.ndarray  # int32
    reasons: dict[int, str] = field(default_factory=dict)  # index -> why it cannot be decoded
    reused: int = 0  # headers taken from the cache
    read: int = 0  # headers read from the audio files


def cache_file(cache_dir: str, folder: Path) -> str:
    """Where the headers of a manifest (content-hashed `cache_dir`) whose paths resolve against `folder` live."""
    where = hashlib.sha256(os.path.realpath(folder).encode()).hexdigest()[:16]
    # v2: float files are decoded whole for non-finite samples; a v1 cache may call such a file readable.
    return os.path.join(cache_dir, f"audio-headers-v2-{where}.arrow")


def iter_text(column: pa.Array | pa.ChunkedArray) -> Iterator[str]:
    """The values of a string column, a slice at a time: a million Python strings at once would cost ~100 MB."""
    for start in range(0, len(column), 65536):
        yield from column.slice(start, 65536).to_pylist()


def read_headers(folder: Path, paths: pa.Array, cached_at: str) -> AudioHeaders:
    """Headers of the distinct `paths` (relative to `folder`): from the cache file `cached_at` where the file's
    size and mtime_ns are unchanged, else read with soundfile; the cache is rewritten when anything was read."""
    count = len(paths)
    size = np.full(count, -1, dtype=np.int64)
    mtime_ns = np.zeros(count, dtype=np.int64)
    headers = AudioHeaders(np.full(count, MISSING, dtype=np.int8), np.zeros(count, dtype=np.int32),
                           np.zeros(count, dtype=np.int64), np.zeros(count, dtype=np.int32))
    for i, relative in enumerate(iter_text(paths)):
        if not relative.strip():
            headers.status[i] = BLANK
            continue
        try:
            stat = os.stat(os.path.join(folder, relative))
        except OSError:  # as soundfile sees it: not there (or not reachable) is "not found"
            continue
        size[i], mtime_ns[i] = stat.st_size, stat.st_mtime_ns
    cached = _load(cached_at, paths)
    reuse = np.zeros(count, dtype=bool)
    if cached is not None:
        reuse = (size >= 0) & (cached.size == size) & (cached.mtime_ns == mtime_ns)
        for mine, theirs in ((headers.status, cached.status), (headers.sample_rate, cached.sample_rate),
                             (headers.frames, cached.frames), (headers.channels, cached.channels)):
            mine[reuse] = theirs[reuse]
        headers.reasons = {i: reason for i, reason in cached.reasons.items() if reuse[i]}
        headers.reused = int(np.count_nonzero(reuse))
    for i in np.flatnonzero((size >= 0) & ~reuse):  # numpy ints: a list of a million would cost ~40 MB
        headers.read += 1
        try:
            headers.sample_rate[i], headers.frames[i], headers.channels[i] = audio_header(
                os.path.join(folder, paths[int(i)].as_py()))
            headers.status[i] = READABLE
        except FileNotFoundError:
            size[i] = -1
        except UnreadableAudio as error:
            headers.status[i] = UNREADABLE
            headers.reasons[int(i)] = str(error)
    if headers.read:
        size[mtime_ns >= time.time_ns() - RACY_NS] = -1  # a write in the same timestamp tick would go unseen
        _store(cached_at, paths, size, mtime_ns, headers)
    return headers


@dataclass
class _Cached:
    size: np.ndarray
    mtime_ns: np.ndarray
    status: np.ndarray
    sample_rate: np.ndarray
    frames: np.ndarray
    channels: np.ndarray
    reasons: dict[int, str]


def _load(cached_at: str, paths: pa.Array) -> _Cached | None:
    """The cache when it exists, is intact and lists exactly `paths`; None otherwise."""
    try:
        with pa.memory_map(cached_at) as source:
            table = pa.ipc.open_file(source).read_all()
    except FileNotFoundError:
        return None
    except (OSError, pa.ArrowException) as error:
        logger.warning("ignoring the unusable audio header cache %s: %s", cached_at, error)
        return None
    if table.schema != CACHE_SCHEMA or not table.column("path").combine_chunks().equals(paths):
        return None
    column = {name: table.column(name).combine_chunks() for name in CACHE_SCHEMA.names}
    readable = column["readable"].to_numpy(zero_copy_only=False)
    reasons = column["reason"]
    unreadable = np.flatnonzero(pc.is_valid(reasons).to_numpy(zero_copy_only=False))
    return _Cached(
        size=column["size"].to_numpy(),
        mtime_ns=column["mtime_ns"].to_numpy(),
        status=np.where(readable, READABLE, UNREADABLE).astype(np.int8),
        sample_rate=column["sample_rate"].to_numpy(),
        frames=column["frames"].to_numpy(),
        channels=column["channels"].to_numpy(),
        reasons={int(i): reasons[int(i)].as_py() for i in unreadable},
    )


def _store(cached_at: str, paths: pa.Array, size: np.ndarray, mtime_ns: np.ndarray, headers: AudioHeaders) -> None:
    """Write the cache atomically (temporary file, then rename): processes validating at once never see half."""
    reasons = np.full(len(paths), None, dtype=object)
    for i, reason in headers.reasons.items():
        reasons[i] = reason
    table = pa.table([paths, size, mtime_ns, headers.sample_rate, headers.frames, headers.channels,
                      headers.status == READABLE, pa.array(reasons, pa.string())], schema=CACHE_SCHEMA)
    folder = os.path.dirname(cached_at)
    temporary = None
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".audio-headers-", suffix=".tmp", delete=False) as sink:
            temporary = sink.name
            with pa.ipc.new_file(sink, CACHE_SCHEMA) as writer:
                writer.write_table(table)
        os.replace(temporary, cached_at)
    except OSError as error:  # the cache only saves time; validation has its answer already
        logger.warning("cannot write the audio header cache %s: %s", cached_at, error)
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)
