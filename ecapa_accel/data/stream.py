"""The training stream: global sample positions -> model-ready crops, sharded over processes and workers.

A sample is a pure function of (train.seed, epoch, position): the epoch's order (`mixing.mix_epoch`) names the
row, and the sample's own uniform draws (`mixing.sample_draws`) pick the speed, the crop offset and the
augmentation. Sharding is arithmetic on positions, so starting mid-epoch decodes nothing that is skipped, and a
run resumed with another process count continues at the next unseen position.

Packed shards (`ecapa_accel.data.shards`) are read a block at a time: each data-loading process asks for the
blocks of its next batches ahead, within a bounded budget (remote blocks on a few threads into memory; local
ones into the kernel's page cache, decoded in place from the shard file).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from ..config import Config
from ..errors import UserError
from .audio import UnreadableAudio, read_crop
from .augment import Augmenter
from .manifest import Manifest, Problems, read_manifest
from .mixing import (SUBSTITUTE, build_label_map, epoch_length, mix_epoch, pick, random_stream, sample_draws,
                     speed_class)
from .shards import DEFAULT_BLOCK_ROWS, BlockCache, ShardDataset

logger = logging.getLogger(__name__)

MAX_SUBSTITUTES = 20  # unreadable files in a row before a sample gives up
READ_AHEAD_BATCHES = 8  # a process's next batches whose shard blocks it starts reading (within data.shard_memory_mb)
DRAWS = 2 + Augmenter.DRAWS  # uniforms per sample: speed, crop offset, then the augmenter's


@dataclass
class _Source:
    manifest: Manifest | ShardDataset
    classes: np.ndarray  # class index per (speaker, speed factor); one column when speeds are not classes
    first_row: int  # where this manifest starts in the concatenation of all rows
    blocks: np.ndarray | None  # block lengths when the dataset is shuffled by blocks (see `mixing`)


def _block_lengths(dataset, manifest: Manifest | ShardDataset) -> np.ndarray | None:
    """How a dataset is cut into blocks for shuffling: a pack's record batches, or `block_rows` rows of a CSV."""
    if isinstance(manifest, ShardDataset):
        if dataset.block_rows is not None and dataset.block_rows != manifest.block_rows:
            raise UserError(f"{manifest.index_path}: packed in blocks of {manifest.block_rows} rows, but "
                            f"data.datasets '{dataset.name}' asks for block_rows={dataset.block_rows}")
        return manifest.block_lengths
    if dataset.shuffle != "blocks":
        return None
    rows = dataset.block_rows or DEFAULT_BLOCK_ROWS
    return np.diff(np.append(np.arange(0, len(manifest), rows), len(manifest)))


class TrainingData:
    """Validated manifests mixed into one deterministic stream (build it with `build_training_data`).

    One epoch is `samples_per_epoch` draws from the weighted mixture; see `ecapa_accel.data.mixing`.
    """

    def __init__(self, cfg: Config, manifests: list[Manifest], label_map: dict[str, int], augmenter: Augmenter):
        data = cfg.data
        self.label_map = label_map
        self.num_classes = len(label_map)
        self.dataset_names = [dataset.name for dataset in data.datasets]
        self.seed = cfg.train.seed
        self.sample_rate = data.sample_rate
        self.crop_samples = round(data.crop_seconds * data.sample_rate)
        self.speed_factors = data.speed_factors
        self.speed_as_classes = data.speed_as_classes
        self.augmenter = augmenter
        factors = self.speed_factors if self.speed_as_classes else [1.0]
        self.speaker_of_class = [""] * self.num_classes  # namespaced speaker of each class (speed aside)
        self._sources = []
        first_row = 0
        for dataset, manifest in zip(data.datasets, manifests):
            namespace = dataset.namespace or dataset.name
            classes = np.empty((len(manifest.speakers), len(factors)), dtype=np.int64)
            for s, speaker in enumerate(manifest.speakers):
                for k, factor in enumerate(factors):
                    classes[s, k] = label_map[speed_class(f"{namespace}/{speaker}", factor)]
                    self.speaker_of_class[classes[s, k]] = f"{namespace}/{speaker}"
            self._sources.append(_Source(manifest, classes, first_row, _block_lengths(dataset, manifest)))
            first_row += len(manifest)
        self._sizes = [len(manifest) for manifest in manifests]
        self._first_rows = np.array([source.first_row for source in self._sources])
        self._weights = [dataset.weight for dataset in data.datasets]
        self.samples_per_epoch = epoch_length(self._sizes, self._weights, data.stopping_strategy)
        self._window = data.shuffle_window_blocks
        self._memory_bytes = int(data.shard_memory_mb * 2**20)
        self._order: tuple[int, np.ndarray] | None = None
        self._cache: tuple[int, BlockCache] | None = None  # (process id, its cache): forked workers start empty

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's sample order (per position, a row in the concatenated manifests); the last one is kept."""
        if self._order is None or self._order[0] != epoch:
            blocks = [source.blocks for source in self._sources]
            self._order = (epoch, mix_epoch(self._sizes, self._weights, self.samples_per_epoch, self.seed, epoch,
                                            blocks, self._window))
        return self._order[1]

    def block_cache(self) -> BlockCache:
        """This process's cache of shard blocks."""
        if self._cache is None or self._cache[0] != os.getpid():
            self._cache = (os.getpid(), BlockCache(self._memory_bytes))
        return self._cache[1]

    def read_ahead(self, epoch: int, positions: Sequence[int], stride: int) -> None:
        """Start reading the shard blocks of `positions` and of this process's next batches (`stride` apart)."""
        if not any(isinstance(source.manifest, ShardDataset) for source in self._sources):
            return
        wanted = np.concatenate([np.asarray(positions) + k * stride for k in range(READ_AHEAD_BATCHES + 1)])
        wanted = wanted[wanted < self.samples_per_epoch]
        rows = self.order(epoch)[wanted]
        datasets_of_rows = np.searchsorted(self._first_rows, rows, side="right") - 1
        blocks = np.full(len(rows), -1)
        for dataset, source in enumerate(self._sources):
            if isinstance(source.manifest, ShardDataset):
                mine = datasets_of_rows == dataset
                blocks[mine] = np.searchsorted(source.manifest.block_start, rows[mine] - source.first_row,
                                               side="right") - 1
        needed = dict.fromkeys(zip(datasets_of_rows[blocks >= 0].tolist(), blocks[blocks >= 0].tolist()))
        self.block_cache().read_ahead([(d, b, self._sources[d].manifest) for d, b in needed])

    def _audio(self, dataset: int, row: int):
        """What `read_crop` opens for a row: its file path, or its packed bytes."""
        manifest = self._sources[dataset].manifest
        if isinstance(manifest, ShardDataset):
            return self.block_cache().audio(dataset, manifest, row)
        return manifest.audio_path(row)

    def locate(self, epoch: int, positions: Sequence[int]) -> list[tuple[int, int]]:
        """(dataset index, row in its manifest) drawn at each global position of an epoch."""
        rows = self.order(epoch)[np.asarray(positions)]
        dataset_of_rows = np.searchsorted(self._first_rows, rows, side="right") - 1
        return list(zip(dataset_of_rows.tolist(), (rows - self._first_rows[dataset_of_rows]).tolist()))

    def paths_at(self, epoch: int, positions: Sequence[int]) -> list[str]:
        """The audio files drawn at positions of an epoch (to name them in messages)."""
        return [self._named(dataset, row) for dataset, row in self.locate(epoch, positions)]

    def _named(self, dataset: int, row: int) -> str:
        """A row's audio named for messages: its file, or its shard and CSV row."""
        manifest = self._sources[dataset].manifest
        return manifest.where(row) if isinstance(manifest, ShardDataset) else manifest.audio_path(row)

    def datasets_at(self, epoch: int, positions: Sequence[int]) -> list[str]:
        return [self.dataset_names[dataset] for dataset, _ in self.locate(epoch, positions)]

    def draws(self, epoch: int, positions: Sequence[int]) -> list[list[float]]:
        """The `DRAWS` uniforms of each position: the sample's own random choices."""
        return sample_draws(self.seed, epoch, np.asarray(positions), DRAWS).tolist()

    def sample(self, epoch: int, position: int, dataset: int, row: int, draws: list[float],
               out: torch.Tensor) -> tuple[int, bool]:
        """The crop at a global position of an epoch, written into `out` (float32, `crop_samples`), given the
        (dataset, row) that `locate` names for it and its `draws`; returns (class, whether an unreadable file was
        replaced)."""
        source = self._sources[dataset]
        speed_choice = pick(draws[0], len(self.speed_factors))
        crop_fraction = draws[1]
        augment = self.augmenter.draw(draws[2:])
        if self.speed_as_classes:
            factor, speed_column = self.speed_factors[speed_choice], speed_choice
        else:
            factor, speed_column = (self.speed_factors[speed_choice] if augment.applied else 1.0), 0
        replaced = False
        for attempt in range(MAX_SUBSTITUTES):
            start, stop = source.manifest.segment(row)
            try:
                wave = read_crop(self._audio(dataset, row), self.sample_rate, self.crop_samples, crop_fraction,
                                 factor, start, stop, out)
                break
            except UnreadableAudio as error:
                # Another row of the same dataset, chosen by (seed, epoch, position, attempt): still deterministic.
                substitutes = random_stream(self.seed, SUBSTITUTE, epoch, position, attempt)
                substitute = int(substitutes.integers(len(source.manifest)))
                named = self._named(dataset, row)
                if isinstance(source.manifest, Manifest):
                    named += f" ({source.manifest.where(row)})"
                logger.warning("unreadable audio %s: %s; using row %d instead", named, error, substitute + 1)
                row, replaced = substitute, True
        else:
            raise UserError(f"{source.manifest.csv}: {MAX_SUBSTITUTES} unreadable audio files in a row while "
                            f"loading epoch {epoch} position {position}; run `ecapa-accel data check` on it")
        augmented = self.augmenter.apply(wave, augment)
        if augmented is not out:
            out.copy_(augmented)
        return int(source.classes[source.manifest.speaker_index[row], speed_column]), replaced

    def batches(self, epoch: int, start: int, micro_batch: int, rank: int, world: int,
                num_workers: int) -> Iterator[dict]:
        """This rank's micro-batches of `epoch` from global position `start` on.

        The i-th covers positions start + i*world*micro_batch + rank*micro_batch + [0, micro_batch); iteration
        stops before a chunk of world*micro_batch positions that would run past `samples_per_epoch`. Items:
        {"waves": float32 (B, crop), "labels": int64 (B,), "index": int64 (B,), "bad": int64 (B,)}.
        """
        self.order(epoch)  # built here once; forked workers inherit it
        loader = DataLoader(
            _EpochSamples(self, epoch, stride=micro_batch * world * max(1, num_workers)),
            batch_sampler=_ShardedChunks(start, micro_batch, rank, world, self.samples_per_epoch),
            num_workers=num_workers,
            collate_fn=_already_a_batch,
            worker_init_fn=_leave_shutdown_to_the_main_process,
        )
        return self._cancelling_read_ahead(iter(loader))

    def _cancelling_read_ahead(self, batches: Iterator[dict]) -> Iterator[dict]:
        """`batches`, then (when exhausted or closed) the shard reads planned for later ones are dropped."""
        try:
            yield from batches
        finally:
            if self._cache is not None and self._cache[0] == os.getpid():
                self._cache[1].cancel_read_ahead()


class _EpochSamples(Dataset):
    """Map-style view of one epoch: index = global position."""

    def __init__(self, data: TrainingData, epoch: int, stride: int):
        self.data = data
        self.epoch = epoch
        self.stride = stride  # positions between this process's consecutive batches (its worker's share)

    def __len__(self) -> int:
        return self.data.samples_per_epoch

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([position])

    def __getitems__(self, positions: list[int]) -> dict[str, torch.Tensor]:
        """The batch of `positions` (see `TrainingData.batches`), each crop decoded into its row of "waves"."""
        located = self.data.locate(self.epoch, positions)
        draws = self.data.draws(self.epoch, positions)
        self.data.read_ahead(self.epoch, positions, self.stride)
        waves = _batch_memory(len(positions), self.data.crop_samples)
        labels, replaced = [], []
        with _one_thread():
            for wave, position, (dataset, row), own_draws in zip(waves, positions, located, draws):
                label, bad = self.data.sample(self.epoch, position, dataset, row, own_draws, wave)
                labels.append(label)
                replaced.append(bad)
        return {
            "waves": waves,
            "labels": torch.tensor(labels, dtype=torch.int64),
            "index": torch.tensor(positions, dtype=torch.int64),
            "bad": torch.tensor(replaced, dtype=torch.int64),
        }


class _ShardedChunks(Sampler):
    """Lists of positions for one rank: chunk c (world*micro_batch positions) gives rank r its r-th slice."""

    def __init__(self, start: int, micro_batch: int, rank: int, world: int, end: int):
        self.start, self.micro_batch, self.rank, self.end = start, micro_batch, rank, end
        self.chunk = world * micro_batch

    def __len__(self) -> int:
        return max(0, (self.end - self.start) // self.chunk)

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(len(self)):
            first = self.start + i * self.chunk + self.rank * self.micro_batch
            yield list(range(first, first + self.micro_batch))


def _batch_memory(rows: int, crop_samples: int) -> torch.Tensor:
    """An uninitialised (rows, crop_samples) float32 batch. In a DataLoader worker it is allocated in shared
    memory, where the batch goes anyway (no copy when it is sent); in the main process numpy allocates it:
    torch's allocator hands back freshly mapped pages for a batch of megabytes, and faulting them in costs as
    much as decoding a tenth of the batch."""
    if get_worker_info() is not None:
        return torch.empty(rows, crop_samples).share_memory_()
    return torch.from_numpy(np.empty((rows, crop_samples), dtype=np.float32))


def _leave_shutdown_to_the_main_process(worker_id: int) -> None:
    """SLURM and Ctrl-C signal the whole process group; a worker that died of it would fail the step the main
    process is finishing before its checkpoint. Workers exit when the main process closes the loader."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _already_a_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`_EpochSamples.__getitems__` builds the batch itself (no per-sample tensors to stack)."""
    return batch


@contextmanager
def _one_thread() -> Iterator[None]:
    """Torch's CPU kernels (resampling convolutions) round differently with other thread counts; DataLoader
    workers run one thread, so the main process (num_workers=0) must too for bit-identical samples."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _check_unreadable(manifests: list[Manifest | ShardDataset], max_bad_fraction: float) -> None:
    unreadable = sum(len(manifest.unreadable) for manifest in manifests)
    if not unreadable:
        return
    rows = sum(len(manifest) for manifest in manifests)
    example = next(manifest for manifest in manifests if manifest.unreadable)
    where = f"e.g. {example.where(example.unreadable[0])}"
    if unreadable > max_bad_fraction * rows:
        raise UserError(f"{unreadable} of {rows} listed audio files cannot be decoded ({where}), more than "
                        f"data.max_bad_fraction={max_bad_fraction}; run `ecapa-accel data check` on the CSVs")
    logger.warning("%d of %d listed audio files cannot be decoded (%s); training replaces them", unreadable, rows,
                   where)


def _check_same_speakers(run_map: dict[str, int], manifests_map: dict[str, int]) -> None:
    new = sorted(manifests_map.keys() - run_map.keys())
    gone = sorted(run_map.keys() - manifests_map.keys())
    if new or gone:
        change = [f"{len(new)} new (e.g. '{new[0]}')"] if new else []
        change += [f"{len(gone)} missing (e.g. '{gone[0]}')"] if gone else []
        raise UserError(f"speakers.json: the manifests' speakers no longer match the run's label map: "
                        f"{', '.join(change)}")
    if sorted(run_map.values()) != list(range(len(run_map))):
        raise UserError("speakers.json: class indices must be 0..N-1, each once")


def build_training_data(cfg: Config, label_map: dict[str, int] | None = None) -> TrainingData:
    """Validate every manifest (and the noise/RIR lists) and build the training stream.

    Raises `UserError` naming file and row before anything is written anywhere. With `label_map` (a resumed
    run's speakers.json) the manifests' speakers must be exactly those of the map, whose indices are kept.
    """
    if not cfg.data.datasets:
        raise UserError("config: data.datasets is empty; list at least one manifest CSV")
    problems = Problems()
    manifests = [ShardDataset(dataset.shards) if dataset.shards else
                 read_manifest(dataset.csv, problems, tolerate_unreadable=True) for dataset in cfg.data.datasets]
    augment = cfg.data.augment
    noises = read_manifest(augment.noise_csv, problems, needs_speaker=False) if augment.noise_csv else None
    rirs = read_manifest(augment.rir_csv, problems, needs_speaker=False) if augment.rir_csv else None
    problems.raise_if_any()
    _check_unreadable(manifests, cfg.data.max_bad_fraction)
    speakers = [
        f"{dataset.namespace or dataset.name}/{speaker}"
        for dataset, manifest in zip(cfg.data.datasets, manifests)
        for speaker in manifest.speakers
    ]
    ours = build_label_map(speakers, cfg.data.speed_factors, cfg.data.speed_as_classes)
    if label_map is not None:
        _check_same_speakers(label_map, ours)
        ours = dict(label_map)
    augmenter = Augmenter(augment, cfg.data.sample_rate, noises, rirs)
    return TrainingData(cfg, manifests, ours, augmenter)


def inspect_stream(cfg: Config, batches: int) -> dict:
    """`ecapa-accel data inspect`: draw real batches (decode, crop, augment) and report throughput and mix."""
    data = build_training_data(cfg)
    micro_batch = min(cfg.train.batch_size, data.samples_per_epoch)
    by_dataset = Counter({name: 0 for name in data.dataset_names})
    speakers, samples, drawn, epoch = set(), 0, 0, 0
    started = time.perf_counter()
    while drawn < batches:
        for batch in data.batches(epoch, 0, micro_batch, 0, 1, cfg.data.num_workers):
            by_dataset.update(data.datasets_at(epoch, batch["index"].tolist()))
            speakers.update(data.speaker_of_class[int(label)] for label in batch["labels"])
            samples += len(batch["labels"])
            drawn += 1
            if drawn == batches:
                break
        epoch += 1
    elapsed = time.perf_counter() - started
    return {
        "batches": drawn,
        "samples": samples,
        "samples_per_s": round(samples / elapsed, 1) if elapsed > 0 else 0.0,
        "speakers": len(speakers),
        "by_dataset": dict(by_dataset),
    }
