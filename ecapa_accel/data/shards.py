"""Packed audio shards: a manifest's audio bytes in Parquet files, read a block (row group) at a time.

Layout of a pack (one folder, local or behind any fsspec URL):

    index.json           format, version, pack id, block size, and per shard: file name, rows, bytes, sha256
    rows.parquet         the catalogue: one row per packed utterance (ID, speaker, segment, rate, frames, shard,
                         row group, audio bytes, CSV row) and no audio; read whole at training start
    shard-00000.parquet  the audio bytes as they were on disk (no re-encoding) plus the same per-row columns,
    ...                  in row groups of `block_rows` rows; the pack id and version sit in the file metadata

Rows keep the CSV's order (minus files that cannot be decoded, which are reported and left out), and every
shard but the last holds whole blocks, so block b is rows [b * block_rows, (b + 1) * block_rows) of the pack:
a CSV read with `shuffle: blocks` and the same `block_rows` is cut into the same blocks and gives the same
samples. Writing is atomic: a shard, the catalogue and the index are written under dotted temporary names and
renamed when complete, the index last; a pack without index.json is unfinished and `pack` resumes it.
"""

from __future__ import annotations

import fnmatch
import functools
import glob as globbing
import hashlib
import io
import json
import logging
import os
import posixpath
import re
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
from .audio import UnreadableAudio
from .manifest import Problems, check_manifests, read_manifest

logger = logging.getLogger(__name__)

FORMAT = "ecapa-accel-shards"
VERSION = 1
INDEX = "index.json"
CATALOGUE = "rows.parquet"
METADATA_KEY = b"ecapa_accel.pack"
DEFAULT_BLOCK_ROWS = 64
DEFAULT_SHARD_SIZE = "512MB"
FOOTER_THREADS = 16  # shard footers read at once at start-up (remote latency)
READ_AHEAD_THREADS = 16  # blocks read at once ahead of need, per data-loading process (remote: requests in flight)
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
CATALOGUE_SCHEMA = pa.schema([*PER_ROW_FIELDS, ("shard", pa.int32()), ("group", pa.int32()), ("bytes", pa.int64())])


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
    return f"shard-{index:05d}.parquet"


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


def _footer_pack(metadata: pq.FileMetaData) -> dict | None:
    raw = (metadata.metadata or {}).get(METADATA_KEY)
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def _existing_shard(path: str, pack_id: str, rows: int) -> bool:
    """Whether a shard left by an earlier `pack` of the same plan is complete (renamed files always are,
    unless damaged since); a shard of another pack is refused."""
    try:
        metadata = pq.read_metadata(path)
    except (OSError, pa.ArrowException):
        logger.warning("%s is damaged; writing it again", path)
        return False
    pack = _footer_pack(metadata)
    if pack is None or pack.get("pack_id") != pack_id:
        raise UserError(f"{path}: belongs to another pack (other CSV, settings or version); pack into an empty "
                        "folder or remove the old shards")
    return metadata.num_rows == rows


def pack_manifest(csv_path: str | Path, out_dir: str | Path, shard_size: str = DEFAULT_SHARD_SIZE,
                  block_rows: int = DEFAULT_BLOCK_ROWS) -> list[str]:
    """`ecapa-accel pack`: validate a manifest like `data check`, then write its audio into Parquet shards.

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
                 if not re.fullmatch(r"(shard-\d{5}\.parquet|rows\.parquet|index\.json|\..*)", p.name)] \
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
    shards, resumed = [], 0
    for number, blocks in enumerate(plan):
        first, end = blocks[0][0], blocks[-1][1]
        path = str(out_dir / _shard_name(number))
        if os.path.exists(path) and _existing_shard(path, pack_id, end - first):
            resumed += 1
        else:
            _write_atomically(path, lambda temporary: _write_shard(
                temporary, per_row, paths, blocks, pack_id, manifest.csv, kept))
        shards.append({"file": _shard_name(number), "rows": end - first, "bytes": os.path.getsize(path),
                       "sha256": sha256_file(path)})
    catalogue = per_row.append_column("shard", pa.array(_shard_of_rows(plan), pa.int32()))
    catalogue = catalogue.append_column("group", pa.array(_group_of_rows(plan), pa.int32()))
    catalogue = catalogue.append_column("bytes", pa.array(sizes, pa.int64()))
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


def _group_of_rows(plan: list[list[tuple[int, int]]]) -> np.ndarray:
    return np.concatenate([np.full(end - first, g) for blocks in plan for g, (first, end) in enumerate(blocks)])


def _write_shard(path: str, per_row: pa.Table, paths: list[str], blocks: list[tuple[int, int]], pack_id: str,
                 csv_path: Path, kept: np.ndarray) -> None:
    schema = SHARD_SCHEMA.with_metadata({METADATA_KEY: json.dumps({"version": VERSION, "pack_id": pack_id})})
    others = [name for name in schema.names if name != "audio"]
    # Audio bytes as they are: no compression, no dictionary, no min/max statistics in the footer.
    with pq.ParquetWriter(path, schema, compression={name: "zstd" for name in others} | {"audio": "none"},
                          use_dictionary=["spk"], write_statistics=others) as writer:
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
            writer.write_table(block.replace_schema_metadata(schema.metadata), row_group_size=end - first)


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


class _RangeFile(io.RawIOBase):
    """A read-only file whose reads are single range requests (`fs.cat_file(path, start, end)`): Parquet reads
    a whole column chunk with one read, so a row group costs one request, local or remote."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, size: int):
        self.fs, self.path, self.size, self.position = fs, path, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.position = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence] + offset
        return self.position

    def read(self, size: int = -1) -> bytes:
        end = self.size if size is None or size < 0 else min(self.size, self.position + size)
        if end <= self.position:
            return b""
        data = self.fs.cat_file(self.path, start=self.position, end=end)
        self.position += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _read_footer(fs: fsspec.AbstractFileSystem, path: str, size: int) -> bytes:
    """A shard's Parquet footer from at most two range reads of its end, as the bytes that `_parse_footer`
    reads."""
    tail = fs.cat_file(path, start=max(0, size - 65536), end=size)
    if len(tail) < 12 or tail[-4:] != b"PAR1":
        raise ValueError(f"no Parquet footer at its end ({len(tail)} bytes read; truncated?)")
    length = int.from_bytes(tail[-8:-4], "little")
    if length + 8 > len(tail):
        tail = fs.cat_file(path, start=max(0, size - length - 8), end=size)
    return b"PAR1" + tail[-(length + 8):]


@functools.lru_cache(maxsize=16)  # the shards being read; a parsed footer takes ~150 KB
def _parse_footer(footer: bytes) -> pq.FileMetaData:
    return pq.read_metadata(pa.BufferReader(footer))


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
        columns = catalogue.read(columns=["shard", "group", "bytes", "csv_row"])
        shard_column = columns.column("shard").to_numpy()
        keep = np.isin(shard_column, chosen)
        if keep.all():
            keep = None
        else:
            columns, shard_column = columns.filter(pa.array(keep)), shard_column[keep]
        renumber = np.full(len(listed), -1, dtype=np.int32)
        renumber[chosen] = np.arange(len(chosen), dtype=np.int32)
        self.shard_of_row = renumber[shard_column]
        group = columns.column("group").to_numpy()
        boundary = np.ones(len(group), dtype=bool)
        boundary[1:] = (self.shard_of_row[1:] != self.shard_of_row[:-1]) | (group[1:] != group[:-1])
        self.block_start = np.flatnonzero(boundary)
        self.block_lengths = np.diff(np.append(self.block_start, len(group)))
        self.block_shard = self.shard_of_row[self.block_start]
        self.block_group = group[self.block_start]
        self.block_bytes = np.add.reduceat(columns.column("bytes").to_numpy(), self.block_start)
        self.csv_row = columns.column("csv_row").to_numpy()

        def read(names: list[str]) -> pa.Table:
            table = catalogue.read(columns=names)
            return table if keep is None else table.filter(pa.array(keep))

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
        del catalogue, columns, labels, bounds, summary, group, boundary
        self._footers, self.unreadable = self._read_footers()

    def __len__(self) -> int:
        return len(self.shard_of_row)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The pack's file system; a forked data-loading worker opens its own (fsspec's async ones are not
        fork-safe)."""
        if self._fs_pid != os.getpid():
            self._fs, self._fs_pid = _open_location(self.spec)[0], os.getpid()
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
            source = path if isinstance(self.fs, LocalFileSystem) else pa.BufferReader(self.fs.cat_file(path))
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

    def _read_footers(self) -> tuple[list[bytes | None], list[int]]:
        """Every chosen shard's footer (one or two range reads each, fetched in parallel, checked one at a time
        here: parsed on many threads at once they would leave ~100 MB of malloc arenas behind). A missing shard
        or one of another pack is a `UserError`; a damaged one makes its rows unreadable (counted like broken
        files)."""
        def fetch(n: int) -> bytes | Exception:
            try:
                return _read_footer(self.fs, self._paths[n], int(self.shards[n]["bytes"]))
            except Exception as error:
                return error

        with ThreadPoolExecutor(FOOTER_THREADS) as pool:
            fetched = list(pool.map(fetch, range(len(self.shards))))
        footers, damaged = [], []
        for n, footer in enumerate(fetched):
            if isinstance(footer, FileNotFoundError):
                raise UserError(f"{self.index_path}: lists {self.shards[n]['file']}, which is missing "
                                f"({self._paths[n]})")
            problem = footer if isinstance(footer, Exception) else None
            if problem is None:
                try:
                    metadata = _parse_footer(footer)  # not kept: parsed, a thousand of them take ~150 MB
                except Exception as error:
                    problem = error
            if problem is None:
                pack = _footer_pack(metadata)
                if pack is None or pack.get("version") != VERSION:
                    version = None if pack is None else pack.get("version")
                    raise UserError(f"{self._paths[n]}: shard of pack format version {version}, this ecapa-accel "
                                    f"reads version {VERSION}; pack the CSV again")
                if pack.get("pack_id") != self.index["pack_id"]:
                    raise UserError(f"{self._paths[n]}: belongs to another pack than {self.index_path}")
                if metadata.num_rows != self.shards[n]["rows"]:
                    problem = ValueError(f"{metadata.num_rows} rows, its index lists {self.shards[n]['rows']}")
            if problem is not None:
                logger.warning("%s: unreadable shard (%s); its rows count as unreadable audio", self._paths[n],
                               _reason(problem))
                footers.append(None)
                damaged.append(n)
            else:
                footers.append(footer)
        unreadable = np.flatnonzero(np.isin(self.shard_of_row, damaged)).tolist()
        return footers, unreadable

    def segment(self, row: int) -> tuple[float, float | None]:
        start, stop = self.start[row], self.stop[row]
        return (0.0 if np.isnan(start) else float(start)), (None if np.isnan(stop) else float(stop))

    def where(self, row: int) -> str:
        """A row named for messages: shard file and the CSV row it was packed from."""
        return f"{self.shards[self.shard_of_row[row]]['file']} (CSV row {self.csv_row[row]})"

    def block_of(self, row: int) -> int:
        return int(np.searchsorted(self.block_start, row, side="right")) - 1

    def read_block(self, block: int) -> pa.Array:
        """The audio bytes of a block's rows: one ranged read of its row group's audio column."""
        shard = int(self.block_shard[block])
        footer = self._footers[shard]
        if footer is None:
            raise UnreadableAudio(f"shard {self._paths[shard]} is damaged")
        try:
            # Local files are read, not memory-mapped: a fresh mapping faults in every page, a read copies once.
            source = self._paths[shard] if isinstance(self.fs, LocalFileSystem) else \
                _RangeFile(self.fs, self._paths[shard], int(self.shards[shard]["bytes"]))
            shard_file = pq.ParquetFile(source, metadata=_parse_footer(footer))
            column = shard_file.read_row_group(int(self.block_group[block]), columns=["audio"],
                                               use_threads=False).column("audio")
            audio = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()  # combining copies
        except Exception as error:  # truncated or corrupt pages, a vanished file, a network error
            raise UnreadableAudio(f"shard {self._paths[shard]} row group {self.block_group[block]}: "
                                  f"{_reason(error)}") from None
        if len(audio) != self.block_lengths[block]:
            raise UnreadableAudio(f"shard {self._paths[shard]} row group {self.block_group[block]}: "
                                  f"{len(audio)} rows, expected {self.block_lengths[block]}")
        return audio

    def summary(self) -> str:
        total = sum(int(shard["bytes"]) for shard in self.shards)
        parts = [f"{len(self):,} rows in {len(self.shards)} shards ({total / 1e6:,.1f} MB)",
                 f"{len(self.speakers):,} speakers", f"{self.seconds / 3600:,.2f} h",
                 ", ".join(f"{rate} Hz ({n:,})" for rate, n in sorted(self.sample_rates.items())),
                 ", ".join(f"{ch} channel{'s' * (ch > 1)} ({n:,})" for ch, n in sorted(self.channels.items()))]
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
    """

    def __init__(self, budget_bytes: int, threads: int = READ_AHEAD_THREADS):
        self.budget = budget_bytes
        self.readers = ThreadPoolExecutor(threads, thread_name_prefix="shard-read-ahead")
        self.blocks: OrderedDict[tuple[int, int], tuple[Future, int]] = OrderedDict()
        self.used = 0
        self.reads = 0

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

    def audio(self, dataset_index: int, dataset: ShardDataset, row: int) -> io.BytesIO:
        """The audio file of a row, as it was packed, as an in-memory file (soundfile decodes from a BytesIO
        faster than from a `pa.BufferReader`, whose reads cost more per call); `UnreadableAudio` when its block
        cannot be read."""
        block = dataset.block_of(row)
        key = (dataset_index, block)
        if key not in self.blocks:
            self._make_room(int(dataset.block_bytes[block]), {key})
            self._start(key, dataset)
        self.blocks.move_to_end(key)
        audio = self.blocks[key][0].result()  # raises the block's UnreadableAudio
        return io.BytesIO(audio[row - int(dataset.block_start[block])].as_py())


def check_datasets(specs: list[str | Path]) -> list[str]:
    """`ecapa-accel data check`: CSVs as `check_manifests` checks them, then packs (index, catalogue, every
    shard's footer); summary lines or `UserError`."""
    csvs = [Path(spec) for spec in specs if not is_shards(spec)]
    lines = check_manifests(csvs) if csvs else []
    return lines + [ShardDataset(str(spec)).summary() for spec in specs if is_shards(spec)]
