"""Packed audio shards: a manifest's audio bytes in Arrow stream files, each audio file at a known byte offset.

Layout of a pack (one folder, local or behind any fsspec URL):

    index.json         format, version, pack id, block size, and per shard: file name, rows, bytes, sha256
    rows.parquet       the catalogue: one row per packed utterance (ID, speaker, segment, rate, frames, shard,
                       record batch, audio bytes and their offset in the shard, CSV row) and no audio; read whole
                       at training start
    shard-00000.arrow  Arrow IPC streams (what Hugging Face `datasets` writes: `Dataset.from_file` opens one):
    ...                the audio bytes as they were on disk (no re-encoding) plus the same per-row columns, one
                       record batch per block of `block_rows` rows; the pack id and version in the schema

Arrow keeps a column's values back to back and uncompressed, so every audio file lies whole at a byte offset of
its shard, written to the catalogue at pack time. Training reads a block (one record batch) as one byte range:
locally libsndfile decodes each file in place from the open shard (the kernel reads the block ahead, nothing is
copied); remotely the block's range is fetched with one request and files are decoded from memory.

Rows keep the CSV's order (minus files that cannot be decoded, which are reported and left out), and every
shard but the last holds whole blocks, so block b is rows [b * block_rows, (b + 1) * block_rows) of the pack:
a CSV read with `shuffle: blocks` and the same `block_rows` is cut into the same blocks and gives the same
samples. Writing is atomic: a shard, the catalogue and the index are written under dotted temporary names and
renamed when complete, the index last; a pack without index.json is unfinished and `pack` resumes it.
"""

from __future__ import annotations

import fnmatch
import glob as globbing
import hashlib
import io
import json
import logging
import multiprocessing.util
import os
import posixpath
import re
import weakref
from collections import Counter, OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import filelock
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import soundfile
from fsspec.implementations.local import LocalFileSystem

from ..errors import UserError
from ..files import sha256_file
from .audio import DECODE_ERRORS, UnreadableAudio
from .manifest import Problems, check_manifests, read_manifest

logger = logging.getLogger(__name__)

FORMAT = "ecapa-accel-shards"
VERSION = 2  # 1: Parquet shards (their pages had to be decoded, a copy of every file)
INDEX = "index.json"
CATALOGUE = "rows.parquet"
METADATA_KEY = b"ecapa_accel.pack"
END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # the last 8 bytes of a complete Arrow IPC stream
HEAD_BYTES = 4096  # read from a shard's start at start-up: its schema message (with the pack id), usually whole
IN_PLACE_FORMATS = ("WAV", "WAVEX")  # decoded from the shard file itself; other formats from their bytes
IN_PLACE_SUBTYPES = ("PCM_S8", "PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE", "ULAW", "ALAW")
TAIL_FRAMES = 4096  # frames compared at pack time to tell that a file decodes the same in place
DEFAULT_BLOCK_ROWS = 64
DEFAULT_SHARD_SIZE = "512MB"
READ_AHEAD_THREADS = 16  # blocks read at once ahead of need, per data-loading process (remote: requests in flight)
OPEN_SHARDS = 64  # local shard files a process keeps open for decoding
_INHERITED: list = []  # file systems a forked process inherited (see `ShardDataset.fs`)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}

PER_ROW_FIELDS = [
    ("ID", pa.string()),
    ("spk", pa.string()),
    ("start", pa.float64()),  # seconds; NaN: the file's start
    ("stop", pa.float64()),  # seconds; NaN: the file's end
    ("dur", pa.float64()),  # seconds of the segment
    ("sample_rate", pa.int32()),
    ("frames", pa.int64()),
    ("channels", pa.int32()),
    ("csv_row", pa.int64()),  # row in the packed CSV, from 1 as in every message
]
SHARD_SCHEMA = pa.schema([*PER_ROW_FIELDS, ("audio", pa.large_binary())])
CATALOGUE_SCHEMA = pa.schema([
    *PER_ROW_FIELDS,
    ("shard", pa.int32()),
    ("batch", pa.int32()),  # record batch (block) within the shard
    ("bytes", pa.int64()),  # the audio file's size
    ("offset", pa.int64()),  # where the audio file starts in its shard
    ("in_place", pa.bool_()),  # whether libsndfile decodes it from the shard file at `offset` as it does alone
])


def parse_size(text: str) -> int:
    """'512MB', '1GB', '64KiB', '1000' -> bytes."""
    match = _SIZE.match(str(text))
    if not match:
        raise UserError(f"--shard-size: '{text}' is not a size such as 512MB or 2GB")
    number, unit = float(match.group(1)), match.group(2).upper()
    scale = _UNITS[unit[:1]] if "I" not in unit else 1024 ** "BKMGT".index(unit[0])
    if number * scale < 1:
        raise UserError(f"--shard-size: '{text}' must be positive")
    return int(number * scale)


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


# ---- packing


def _plan(sizes: np.ndarray, block_rows: int, shard_bytes: int) -> list[list[tuple[int, int]]]:
    """Shards as lists of blocks (first, end) over the packed rows: a shard closes at the first block boundary
    at or past `shard_bytes`."""
    shards, current, current_bytes = [], [], 0
    for first in range(0, len(sizes), block_rows):
        end = min(first + block_rows, len(sizes))
        current.append((first, end))
        current_bytes += int(sizes[first:end].sum())
        if current_bytes >= shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
    if current:
        shards.append(current)
    return shards


def _write_atomically(path: str, write: Callable[[str], None]) -> None:
    """`write(temporary)` then fsync and rename to `path`: a reader never sees a partial file under `path`."""
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, f".{name}.tmp")
    try:
        write(temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _shard_pack(schema: pa.Schema) -> dict | None:
    """The pack a shard's schema says it belongs to ({"version", "pack_id"}), None when it says nothing."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    try:
        pack = json.loads(raw) if raw else None
    except ValueError:
        return None
    return pack if isinstance(pack, dict) else None


def _decodes_in_place(fd: int, offset: int, data: memoryview) -> bool:
    """Whether libsndfile, opening the shard file `fd` at `offset`, sees the audio file `data` as it is alone:
    a WAV of plain samples (where a seek is arithmetic: other formats refuse to be embedded, as Ogg, or fail to
    seek inside another file, as FLAC with libsndfile 1.2) with the same header and the same last frames (a WAV
    whose sizes are unset would run on into the next file)."""
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as alone:
            if alone.format not in IN_PLACE_FORMATS or alone.subtype not in IN_PLACE_SUBTYPES:
                return False
            os.lseek(fd, offset, os.SEEK_SET)
            with soundfile.SoundFile(fd, closefd=False) as inside:
                header = (alone.format, alone.subtype, alone.samplerate, alone.channels, alone.frames)
                if (inside.format, inside.subtype, inside.samplerate, inside.channels, inside.frames) != header:
                    return False
                tail = min(alone.frames, TAIL_FRAMES)
                inside.seek(alone.frames - tail)
                alone.seek(alone.frames - tail)
                return np.array_equal(inside.read(tail, dtype="float32"), alone.read(tail, dtype="float32"),
                                      equal_nan=True)
    except DECODE_ERRORS:
        return False


def _locate_audio(path: str, pack_id: str) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(rows of each record batch, byte offset of each row's audio file in the shard, whether it decodes in
    place) of a complete shard file; ValueError or an Arrow error when it is not one, `UserError` when it belongs
    to another pack.

    The offsets are where the memory-mapped reader finds the audio values (Arrow reads an uncompressed stream
    from a mapping without a copy); each file's bytes are checked to be there."""
    with pa.memory_map(path) as mapped, open(path, "rb") as handle:
        base, size = mapped.read_buffer(1).address, mapped.size()
        mapped.seek(0)
        reader = pa.ipc.open_stream(mapped)
        pack = _shard_pack(reader.schema)
        if pack is None or pack.get("pack_id") != pack_id:
            raise UserError(f"{path}: belongs to another pack (other CSV, settings or version); pack into an empty "
                            "folder or remove the old shards")
        rows, offsets, in_place = [], [], []
        for batch in reader:
            audio = batch.column("audio")
            values = audio.buffers()[2]
            view = memoryview(values).cast("B")  # Arrow exports signed chars: compared with bytes, half would differ
            ends = np.frombuffer(audio.buffers()[1], dtype=np.int64)[audio.offset : audio.offset + len(audio) + 1]
            first = values.address - base
            if not 0 <= first <= size - values.size:
                raise ValueError("its audio values are not where the stream holds them")
            for k in range(len(audio)):
                data = view[ends[k] : ends[k + 1]]
                offsets.append(first + int(ends[k]))
                if os.pread(handle.fileno(), len(data), offsets[-1]) != data:
                    raise ValueError(f"the audio of row {sum(rows) + k} is not at its offset")
                in_place.append(_decodes_in_place(handle.fileno(), offsets[-1], data))
            rows.append(len(audio))
        marker = len(END_OF_STREAM)
        if size < marker or os.pread(handle.fileno(), marker, size - marker) != END_OF_STREAM:
            raise ValueError("no end-of-stream marker (truncated?)")
    return rows, np.array(offsets, dtype=np.int64), np.array(in_place, dtype=bool)


def pack_manifest(csv_path: str | Path, out_dir: str | Path, shard_size: str = DEFAULT_SHARD_SIZE,
                  block_rows: int = DEFAULT_BLOCK_ROWS) -> list[str]:
    """`ecapa-accel pack`: validate a manifest like `data check`, then write its audio into Arrow shards.

    Files that exist but cannot be decoded are left out and reported (one line each, capped); the last line
    sums up. A re-run into the same folder resumes an unfinished pack of the same CSV and settings, is a no-op
    on a finished one, and refuses a folder holding anything else.
    """
    shard_bytes = parse_size(shard_size)
    if block_rows < 1:
        raise UserError(f"--block-rows must be at least 1, got {block_rows}")
    csv_path, out_dir = Path(csv_path), Path(out_dir)
    problems = Problems()
    manifest = read_manifest(csv_path, problems, tolerate_unreadable=True)
    problems.raise_if_any()
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder")
    strangers = [p.name for p in out_dir.iterdir()
                 if not re.fullmatch(r"(shard-\d{5}\.arrow|rows\.parquet|index\.json|\..*)", p.name)] \
        if out_dir.is_dir() else []
    if strangers:
        raise UserError(f"{out_dir}: holds other files ({strangers[0]}, ...); pack into an empty folder")

    unreadable = set(manifest.unreadable)
    kept = np.array([row for row in range(len(manifest)) if row not in unreadable], dtype=np.int64)
    if not len(kept):
        raise UserError(f"{csv_path}: none of its {len(manifest)} audio files can be decoded; nothing to pack")
    paths = [manifest.audio_path(int(row)) for row in kept]
    sizes = np.array([os.path.getsize(path) for path in paths], dtype=np.int64)
    with open(csv_path, "rb") as handle:
        csv_digest = hashlib.sha256(handle.read()).hexdigest()
    settings = {"version": VERSION, "csv_sha256": csv_digest, "block_rows": block_rows, "shard_bytes": shard_bytes}
    pack_id = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]
    plan = _plan(sizes, block_rows, shard_bytes)

    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with filelock.FileLock(str(out_dir / ".pack.lock"), timeout=0):
            return _pack_into(manifest, csv_path, out_dir, kept, paths, sizes, plan, pack_id, settings)
    except filelock.Timeout:
        raise UserError(f"{out_dir}: another `ecapa-accel pack` is writing into it") from None


def _pack_into(manifest, csv_path: Path, out_dir: Path, kept: np.ndarray, paths: list[str], sizes: np.ndarray,
               plan: list[list[tuple[int, int]]], pack_id: str, settings: dict) -> list[str]:
    """The writing part of `pack_manifest`, under the folder's lock."""
    for stale in out_dir.glob(".*.tmp"):  # left by a killed pack: never complete, never read
        stale.unlink()
    index_path = out_dir / INDEX
    if index_path.is_file():
        index = json.loads(index_path.read_text(encoding="utf-8"))
        if index.get("pack_id") != pack_id:
            raise UserError(f"{index_path}: {out_dir} holds a finished pack of another CSV or with other "
                            "settings; pack into an empty folder")
        return _pack_report(manifest, csv_path, out_dir, index, resumed=0, already=True)
    per_row = _per_row_columns(manifest, kept)
    shards, resumed, offsets, in_place = [], 0, [], []
    for number, blocks in enumerate(plan):
        path = str(out_dir / _shard_name(number))
        planned = [end - first for first, end in blocks]
        located = _existing_shard(path, pack_id) if os.path.exists(path) else None
        if located is not None and located[0] == planned:
            resumed += 1
        else:
            _write_atomically(path, lambda temporary: _write_shard(
                temporary, per_row, paths, blocks, pack_id, manifest.csv, kept))
            located = _locate_audio(path, pack_id)
            assert located[0] == planned, (path, located[0], planned)  # one record batch per block, as written
        offsets.append(located[1])
        in_place.append(located[2])
        shards.append({"file": _shard_name(number), "rows": sum(planned), "bytes": os.path.getsize(path),
                       "sha256": sha256_file(path)})
    catalogue = per_row
    for name, values in [("shard", _shard_of_rows(plan)), ("batch", _batch_of_rows(plan)), ("bytes", sizes),
                         ("offset", np.concatenate(offsets)), ("in_place", np.concatenate(in_place))]:
        catalogue = catalogue.append_column(name, pa.array(values, CATALOGUE_SCHEMA.field(name).type))
    _write_atomically(str(out_dir / CATALOGUE), lambda temporary: pq.write_table(catalogue, temporary))
    index = {
        "format": FORMAT, "version": VERSION, "pack_id": pack_id, "csv": str(csv_path.resolve()),
        "csv_sha256": settings["csv_sha256"], "rows": len(kept), "block_rows": settings["block_rows"],
        "shard_bytes": settings["shard_bytes"],
        "catalogue": CATALOGUE, "left_out": len(manifest.unreadable), "shards": shards,
    }
    _write_atomically(str(index_path), lambda temporary: Path(temporary).write_text(
        json.dumps(index, indent=1) + "\n", encoding="utf-8"))
    return _pack_report(manifest, csv_path, out_dir, index, resumed=resumed, already=False)


def _per_row_columns(manifest, kept: np.ndarray) -> pa.Table:
    """The per-row columns of the packed rows (no audio), in CSV order."""
    table = manifest.rows.data
    ids = table.column("ID").take(kept) if "ID" in manifest.rows.column_names else \
        pa.array([f"{manifest.csv.stem}-{row + 1}" for row in kept])
    nan = np.full(len(manifest), np.nan)
    start = (nan if manifest.start is None else manifest.start)[kept]
    stop = (nan if manifest.stop is None else manifest.stop)[kept]
    rate = np.zeros(len(kept), dtype=np.int32)
    frames = np.zeros(len(kept), dtype=np.int64)
    channels = np.zeros(len(kept), dtype=np.int32)
    for i, row in enumerate(kept.tolist()):
        with soundfile.SoundFile(manifest.audio_path(row)) as audio:
            rate[i], frames[i], channels[i] = audio.samplerate, audio.frames, audio.channels
    length = frames / np.maximum(rate, 1)
    dur = np.minimum(np.where(np.isnan(stop), length, stop), length) - np.nan_to_num(start)
    return pa.table([
        pa.array(ids, pa.string()), table.column("spk").take(kept).cast(pa.string()),
        pa.array(start, pa.float64()), pa.array(stop, pa.float64()),  # NaN: no bound (numpy without a copy)
        pa.array(dur), pa.array(rate), pa.array(frames), pa.array(channels), pa.array(kept + 1),
    ], schema=pa.schema(PER_ROW_FIELDS))


def _shard_of_rows(plan: list[list[tuple[int, int]]]) -> np.ndarray:
    return np.concatenate([np.full(blocks[-1][1] - blocks[0][0], n) for n, blocks in enumerate(plan)])


def _batch_of_rows(plan: list[list[tuple[int, int]]]) -> np.ndarray:
    return np.concatenate([np.full(end - first, g) for blocks in plan for g, (first, end) in enumerate(blocks)])


def _existing_shard(path: str, pack_id: str) -> tuple[list[int], np.ndarray, np.ndarray] | None:
    """What `_locate_audio` finds in a shard left by an earlier `pack` of the same plan (renamed files are
    complete unless damaged since: then None, and it is written again); a shard of another pack is refused."""
    try:
        return _locate_audio(path, pack_id)
    except (OSError, ValueError, pa.ArrowException):
        logger.warning("%s is damaged; writing it again", path)
        return None


def _write_shard(path: str, per_row: pa.Table, paths: list[str], blocks: list[tuple[int, int]], pack_id: str,
                 csv_path: Path, kept: np.ndarray) -> None:
    """One Arrow IPC stream, uncompressed (audio bytes as they are), one record batch per block."""
    schema = SHARD_SCHEMA.with_metadata({METADATA_KEY: json.dumps({"version": VERSION, "pack_id": pack_id})})
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for first, end in blocks:
            audio = []
            for i in range(first, end):
                data = Path(paths[i]).read_bytes()
                try:
                    soundfile.info(io.BytesIO(data))
                except (soundfile.SoundFileError, RuntimeError) as error:
                    raise UserError(f"{csv_path} row {kept[i] + 1}: {paths[i]} changed since it was validated "
                                    f"and cannot be decoded ({error}); run `ecapa-accel pack` again") from None
                audio.append(data)
            block = per_row.slice(first, end - first).append_column("audio", pa.array(audio, pa.large_binary()))
            writer.write_table(block.replace_schema_metadata(schema.metadata), max_chunksize=end - first)


def _pack_report(manifest, csv_path: Path, out_dir: Path, index: dict, resumed: int, already: bool) -> list[str]:
    lines = [f"{csv_path} row {row + 1}: cannot decode {manifest.rows.data.column('path')[row].as_py()}; "
             "left out" for row in manifest.unreadable[:10]]
    if len(manifest.unreadable) > 10:
        lines.append(f"... and {len(manifest.unreadable) - 10} more undecodable files")
    total = sum(shard["bytes"] for shard in index["shards"])
    state = "already packed" if already else (f"resumed ({resumed} shards kept)" if resumed else "packed")
    lines.append(f"{out_dir}: {state}: {index['rows']:,} rows in {len(index['shards'])} shards "
                 f"({total / 1e6:,.1f} MB), {index['left_out']:,} undecodable files left out")
    return lines


# ---- reading


def _read_shard_ends(fs: fsspec.AbstractFileSystem, paths: list[str], sizes: list[int]) -> list:
    """Per shard, (its schema message, its last 8 bytes: the end-of-stream marker that a shard shorter than its
    index says lacks) or the error that reading them raised. One batch of range requests, run concurrently by
    fsspec; a schema longer than `HEAD_BYTES` (its length is in its first 8 bytes) is read again whole."""
    ends = fs.cat_ranges(paths * 2, [0] * len(paths) + [max(0, size - len(END_OF_STREAM)) for size in sizes],
                         [min(size, HEAD_BYTES) for size in sizes] + sizes, on_error="return")
    results = []
    for path, size, head, tail in zip(paths, sizes, ends[: len(paths)], ends[len(paths) :]):
        error = next((part for part in (head, tail) if isinstance(part, Exception)), None)
        schema_end = 8 + int.from_bytes(head[4:8], "little") if error is None and len(head) >= 8 else 0
        if error is None and schema_end > len(head):
            try:
                head = fs.cat_file(path, start=0, end=min(size, schema_end))
            except Exception as failure:
                error = failure
        results.append(error if error is not None else (head, tail))
    return results


def _open_location(spec: str) -> tuple[fsspec.AbstractFileSystem, str, str | None]:
    """(file system, pack folder, glob of shard file names or None) for a folder, glob or index.json."""
    try:
        fs, path = fsspec.core.url_to_fs(spec)
    except (ImportError, ValueError) as error:  # e.g. s3:// without s3fs
        raise UserError(f"{spec}: cannot open ({error})") from None
    path = path.rstrip("/")
    name = posixpath.basename(path)
    if name == INDEX or name.endswith(".json"):
        return fs, posixpath.dirname(path), None
    if globbing.has_magic(name):
        return fs, posixpath.dirname(path), name
    return fs, path, None


class ShardDataset:
    """A packed dataset opened for training: the catalogue in memory, audio read a block at a time.

    Offers what the training stream uses of a `Manifest` (speakers, speaker_index, segment, unreadable,
    len) plus the blocks it is read in and the audio of a row.
    """

    def __init__(self, spec: str):
        self.spec = spec
        self._fs, self.folder, pattern = _open_location(spec)
        self._fs_pid = os.getpid()
        self.local = isinstance(self._fs, LocalFileSystem)
        self._open_files: OrderedDict[int, int] = OrderedDict()  # shard -> file descriptor (local, this process)
        self.index_path = posixpath.join(self.folder, INDEX)
        self.index = self._read_index()
        self.block_rows = int(self.index["block_rows"])
        listed = self.index["shards"]
        chosen = [n for n, shard in enumerate(listed) if pattern is None or fnmatch.fnmatch(shard["file"], pattern)]
        if not chosen:
            raise UserError(f"{spec}: no shard of {self.index_path} matches '{pattern}'")
        self.shards = [listed[n] for n in chosen]
        self._paths = [posixpath.join(self.folder, shard["file"]) for shard in self.shards]
        catalogue = self._open_catalogue()
        # A few columns at a time, each dropped once used: a million rows of all of them at once take ~70 MB.
        columns = catalogue.read(columns=["shard", "batch", "csv_row"])
        shard_column = columns.column("shard").to_numpy()
        keep = np.isin(shard_column, chosen)
        if keep.all():
            keep = None
        else:
            columns, shard_column = columns.filter(pa.array(keep)), shard_column[keep]

        def read(names: list[str], catalogue: pq.ParquetFile = catalogue) -> pa.Table:
            table = catalogue.read(columns=names)
            return table if keep is None else table.filter(pa.array(keep))

        renumber = np.full(len(listed), -1, dtype=np.int32)
        renumber[chosen] = np.arange(len(chosen), dtype=np.int32)
        self.shard_of_row = renumber[shard_column]
        batch = columns.column("batch").to_numpy()
        boundary = np.ones(len(batch), dtype=bool)
        boundary[1:] = (self.shard_of_row[1:] != self.shard_of_row[:-1]) | (batch[1:] != batch[:-1])
        self.block_start = np.flatnonzero(boundary)
        self.block_lengths = np.diff(np.append(self.block_start, len(batch)))
        self.block_shard = self.shard_of_row[self.block_start]
        self.csv_row = columns.column("csv_row").to_numpy()
        located = read(["offset", "bytes", "in_place"])
        self.offset = located.column("offset").to_numpy()
        self.size = located.column("bytes").to_numpy()
        self.in_place = located.column("in_place").to_numpy(zero_copy_only=False)
        last = self.block_start + self.block_lengths - 1
        self.block_offset = self.offset[self.block_start]  # a block's audio is one byte range of its shard
        self.block_bytes = self.offset[last] + self.size[last] - self.block_offset

        labels = read(["spk"]).column("spk")
        self.speakers = sorted(pc.unique(labels).to_pylist())
        speaker_index = pc.index_in(labels, value_set=pa.array(self.speakers)).to_numpy()
        self.speaker_index = speaker_index.astype(np.int32, copy=False)
        bounds = read(["start", "stop"])
        self.start = bounds.column("start").to_numpy(zero_copy_only=False)
        self.stop = bounds.column("stop").to_numpy(zero_copy_only=False)
        summary = read(["dur", "sample_rate", "channels"])
        self.seconds = float(pc.sum(summary.column("dur")).as_py() or 0.0)
        self.sample_rates, self.channels = (
            Counter({item["values"]: item["counts"] for item in pc.value_counts(summary.column(name)).to_pylist()})
            for name in ("sample_rate", "channels"))
        del read, catalogue, columns, located, labels, bounds, summary, batch, boundary
        self._damaged, self.unreadable = self._check_shards()

    def __len__(self) -> int:
        return len(self.shard_of_row)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The pack's file system; a forked data-loading worker opens its own (fsspec's async ones are not
        fork-safe), and its own shard files (a shared file offset would move under another process)."""
        if self._fs_pid != os.getpid():
            # The parent's is kept, never freed here: freeing its HTTP connections would take their sockets off
            # the parent's event loop (an epoll set that parent and child share), and a parent request on one
            # of them would wait forever.
            _INHERITED.append(self._fs)
            self._fs, self._fs_pid = _open_location(self.spec)[0], os.getpid()
            self._open_files = OrderedDict()
        return self._fs

    @property
    def csv(self) -> str:
        """Where the dataset comes from, for messages (a `Manifest` names its CSV here)."""
        return self.spec

    def _read_index(self) -> dict:
        try:
            text = self.fs.cat_file(self.index_path)
        except FileNotFoundError:
            if self.fs.isdir(self.folder) or "://" in self.index_path:
                raise UserError(f"{self.spec}: no {INDEX} at {self.index_path} (write a pack with "
                                "`ecapa-accel pack CSV OUT_DIR`)") from None
            raise UserError(f"{self.spec}: no such folder") from None
        except Exception as error:  # fsspec back ends raise their own errors (aiohttp, botocore)
            raise UserError(f"{self.spec}: cannot read {self.index_path}: {_reason(error)}") from None
        try:
            index = json.loads(text)
        except ValueError:
            raise UserError(f"{self.index_path}: not a JSON pack index") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise UserError(f"{self.index_path}: not an ecapa-accel pack index")
        if index.get("version") != VERSION:
            raise UserError(f"{self.index_path}: pack format version {index.get('version')}, this ecapa-accel "
                            f"reads version {VERSION}; pack the CSV again")
        return index

    def _open_catalogue(self) -> pq.ParquetFile:
        """The pack's per-row table: memory-mapped when local, else fetched whole with one request."""
        path = posixpath.join(self.folder, self.index.get("catalogue", CATALOGUE))
        try:
            source = path if self.local else pa.BufferReader(self.fs.cat_file(path))
            catalogue = pq.ParquetFile(source, memory_map=True)
        except FileNotFoundError:
            raise UserError(f"{self.index_path}: its catalogue {path} is missing") from None
        except Exception as error:
            raise UserError(f"{path}: cannot read the pack's catalogue: {_reason(error)}") from None
        missing = set(CATALOGUE_SCHEMA.names) - set(catalogue.schema_arrow.names)
        if missing or catalogue.metadata.num_rows != self.index["rows"]:
            raise UserError(f"{path}: not the catalogue its index describes ({catalogue.metadata.num_rows} rows, "
                            f"{self.index['rows']} listed{'; no column ' + min(missing) if missing else ''})")
        return catalogue

    def _check_shards(self) -> tuple[set[int], list[int]]:
        """Every chosen shard's schema (its start) and end-of-stream marker (at the size the index lists), read
        concurrently. A missing shard or one of another pack is a `UserError`; a damaged or truncated one makes
        its rows unreadable (counted like broken files)."""
        try:
            fetched = _read_shard_ends(self.fs, self._paths, [int(shard["bytes"]) for shard in self.shards])
        except Exception as error:  # the file system failed as a whole (a refused connection)
            raise UserError(f"{self.spec}: cannot read its shards: {_reason(error)}") from None
        damaged = set()
        for n, ends in enumerate(fetched):
            if isinstance(ends, FileNotFoundError):
                raise UserError(f"{self.index_path}: lists {self.shards[n]['file']}, which is missing "
                                f"({self._paths[n]})")
            problem = ends if isinstance(ends, Exception) else None
            if problem is None:
                head, tail = ends
                try:
                    pack = _shard_pack(pa.ipc.read_schema(pa.py_buffer(head)))
                except Exception as error:
                    problem = ValueError(f"no Arrow stream schema at its start ({_reason(error)})")
            if problem is None:
                if pack is None or pack.get("version") != VERSION:
                    version = None if pack is None else pack.get("version")
                    raise UserError(f"{self._paths[n]}: shard of pack format version {version}, this ecapa-accel "
                                    f"reads version {VERSION}; pack the CSV again")
                if pack.get("pack_id") != self.index["pack_id"]:
                    raise UserError(f"{self._paths[n]}: belongs to another pack than {self.index_path}")
                if tail != END_OF_STREAM:
                    problem = ValueError(f"no end of stream at byte {self.shards[n]['bytes']} (truncated?)")
            if problem is not None:
                logger.warning("%s: unreadable shard (%s); its rows count as unreadable audio", self._paths[n],
                               _reason(problem))
                damaged.add(n)
        unreadable = np.flatnonzero(np.isin(self.shard_of_row, list(damaged))).tolist()
        return damaged, unreadable

    def segment(self, row: int) -> tuple[float, float | None]:
        start, stop = self.start[row], self.stop[row]
        return (0.0 if np.isnan(start) else float(start)), (None if np.isnan(stop) else float(stop))

    def where(self, row: int) -> str:
        """A row named for messages: shard file and the CSV row it was packed from."""
        return f"{self.shards[self.shard_of_row[row]]['file']} (CSV row {self.csv_row[row]})"

    def block_of(self, row: int) -> int:
        return int(np.searchsorted(self.block_start, row, side="right")) - 1

    def _readable_shard(self, shard: int) -> str:
        if shard in self._damaged:
            raise UnreadableAudio(f"shard {self._paths[shard]} is damaged")
        return self._paths[shard]

    def read_block(self, block: int) -> bytes | None:
        """A block's audio files, back to back as in its shard. Remote: one ranged read. Local: the kernel is
        asked to read the range ahead (`posix_fadvise`), and None returned: rows are decoded in place."""
        path = self._readable_shard(int(self.block_shard[block]))
        start, size = int(self.block_offset[block]), int(self.block_bytes[block])
        try:
            if self.local:
                if hasattr(os, "posix_fadvise"):
                    fd = os.open(path, os.O_RDONLY)  # its own: the decoding thread's files may close meanwhile
                    try:
                        os.posix_fadvise(fd, start, size, os.POSIX_FADV_WILLNEED)
                    finally:
                        os.close(fd)
                return None
            data = self.fs.cat_file(path, start=start, end=start + size)
        except Exception as error:  # a vanished file, a network error
            raise UnreadableAudio(f"shard {path} bytes {start}-{start + size}: {_reason(error)}") from None
        if len(data) != size:
            raise UnreadableAudio(f"shard {path} bytes {start}-{start + size}: {len(data)} bytes read (truncated?)")
        return data

    def _shard_file(self, shard: int) -> int:
        """This process's open descriptor of a local shard (the least recently used closed past `OPEN_SHARDS`)."""
        self.fs  # a forked process starts its own descriptors (the parent's stay the parent's)
        fd = self._open_files.get(shard)
        if fd is None:
            path = self._readable_shard(shard)
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as error:
                raise UnreadableAudio(f"shard {path}: {_reason(error)}") from None
            self._open_files[shard] = fd
            while len(self._open_files) > OPEN_SHARDS:
                os.close(self._open_files.popitem(last=False)[1])
        self._open_files.move_to_end(shard)
        return fd

    def local_audio(self, row: int) -> int | io.BytesIO:
        """What `read_crop` opens for a row of a local pack: the shard's descriptor positioned at the row's audio
        file, which libsndfile decodes in place, or the file's bytes when it cannot be decoded in place."""
        shard = int(self.shard_of_row[row])
        fd, offset, size = self._shard_file(shard), int(self.offset[row]), int(self.size[row])
        if self.in_place[row]:
            os.lseek(fd, offset, os.SEEK_SET)
            return fd
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise UnreadableAudio(f"{self.where(row)}: {len(data)} of {size} bytes at {offset} (truncated?)")
        return io.BytesIO(data)

    def summary(self) -> str:
        total = sum(int(shard["bytes"]) for shard in self.shards)
        parts = [f"{len(self):,} rows in {len(self.shards)} shards ({total / 1e6:,.1f} MB)",
                 f"{len(self.speakers):,} speakers", f"{self.seconds / 3600:,.2f} h",
                 ", ".join(f"{rate} Hz ({n:,})" for rate, n in sorted(self.sample_rates.items())),
                 ", ".join(f"{ch} channel{'s' * (ch > 1)} ({n:,})" for ch, n in sorted(self.channels.items())),
                 f"{int(self.in_place.sum()):,} decoded in place (WAV), {int((~self.in_place).sum()):,} from bytes"]
        if self.unreadable:
            parts.append(f"{len(self.unreadable):,} rows in damaged shards")
        return f"{self.spec}: " + ", ".join(parts)


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__


def is_shards(spec: str | Path) -> bool:
    """Whether a `data check` argument names a pack (folder, glob, index.json or URL) rather than a CSV."""
    text = str(spec)
    return "://" in text or text.endswith(".json") or globbing.has_magic(os.path.basename(text)) or \
        os.path.isdir(text)


class BlockCache:
    """Blocks of audio bytes held by one process, within a byte budget, least recently used evicted first.

    `read_ahead` starts reading the blocks named for the next batches on a few threads (hiding remote latency)
    while they fit in the budget next to the blocks in use; `audio` waits for a block, reading it if needed.
    A block that cannot be read is remembered as such, so a damaged shard is not read again for every row.
    For a local pack the kernel holds the blocks (in its page cache, `ShardDataset.read_block`): the budget
    bounds how much is asked to be read ahead, and a block is asked for once while it is remembered here.
    """

    def __init__(self, budget_bytes: int, threads: int = READ_AHEAD_THREADS):
        self.budget = budget_bytes
        self.readers = ThreadPoolExecutor(threads, thread_name_prefix="shard-read-ahead")
        self.blocks: OrderedDict[tuple[int, int], tuple[Future, int]] = OrderedDict()
        self.used = 0
        self.reads = 0
        # A process exiting (a DataLoader worker at the end of an epoch) would first run every read planned
        # ahead: its threads are joined at exit. Dropped before that (the finaliser holds no reference).
        multiprocessing.util.Finalize(self, _cancel_read_ahead, args=(weakref.ref(self),), exitpriority=0)

    def _make_room(self, size: int, keep: set) -> bool:
        for key in list(self.blocks):
            if self.used + size <= self.budget:
                break
            if key not in keep:
                self.used -= self.blocks.pop(key)[1]
        return self.used + size <= self.budget

    def _start(self, key: tuple[int, int], dataset: ShardDataset) -> None:
        size = int(dataset.block_bytes[key[1]])
        self.blocks[key] = (self.readers.submit(dataset.read_block, key[1]), size)
        self.used += size
        self.reads += 1

    def cancel_read_ahead(self) -> None:
        """Forget the blocks not read yet (the iteration that wanted them has ended): a process exits after the
        reads under way, not after all that were planned."""
        for key, (future, size) in list(self.blocks.items()):
            if future.cancel():
                del self.blocks[key]
                self.used -= size

    def read_ahead(self, wanted: list[tuple[int, int, ShardDataset]]) -> None:
        """Start reading (dataset, block) pairs in order of need while they fit; the first ones are kept."""
        keep = set()
        for dataset_index, block, dataset in wanted:
            key = (dataset_index, block)
            keep.add(key)
            if key in self.blocks:
                self.blocks.move_to_end(key)
                continue
            if not self._make_room(int(dataset.block_bytes[block]), keep):
                break
            self._start(key, dataset)

    def audio(self, dataset_index: int, dataset: ShardDataset, row: int) -> int | io.BytesIO:
        """What `read_crop` opens for a row: for a local pack `ShardDataset.local_audio`; else the row's audio
        file from its block in memory (waiting for the block, reading it if needed). `UnreadableAudio` when its
        block cannot be read."""
        if dataset.local:
            return dataset.local_audio(row)
        block = dataset.block_of(row)
        key = (dataset_index, block)
        if key not in self.blocks:
            self._make_room(int(dataset.block_bytes[block]), {key})
            self._start(key, dataset)
        self.blocks.move_to_end(key)
        data = self.blocks[key][0].result()  # raises the block's UnreadableAudio
        # Decoded from memory (a BytesIO: soundfile's reads from it cost less than from a `pa.BufferReader`);
        # written to an anonymous file to be decoded in place, a block costs more in fresh pages than it saves.
        first = int(dataset.offset[row] - dataset.block_offset[block])
        return io.BytesIO(memoryview(data)[first : first + int(dataset.size[row])])


def _cancel_read_ahead(cache: weakref.ref) -> None:
    if cache() is not None:
        cache().cancel_read_ahead()


def check_datasets(specs: list[str | Path]) -> list[str]:
    """`ecapa-accel data check`: CSVs as `check_manifests` checks them, then packs (index, catalogue, the start
    and end of every shard); summary lines or `UserError`."""
    csvs = [Path(spec) for spec in specs if not is_shards(spec)]
    lines = check_manifests(csvs) if csvs else []
    return lines + [ShardDataset(str(spec)).summary() for spec in specs if is_shards(spec)]
