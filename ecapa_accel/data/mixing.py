"""Several manifests as one stream: the label map, the length of an epoch and each epoch's sample order.

What an epoch is: `samples_per_epoch` draws from the weighted mixture, the same number every epoch, with

    first_exhausted:  samples_per_epoch = min_i(rows_i / p_i)   (the dataset used up first is read about once;
                                                                  the others are under-sampled)
    all_exhausted:    samples_per_epoch = max_i(rows_i / p_i)   (the dataset used up last is read about once;
                                                                  the others are over-sampled)

where p_i are the normalised weights. Each draw picks a dataset with probability p_i
(`datasets.interleave_datasets`); within a dataset the rows come in a shuffled order and a dataset that runs out
continues with a fresh shuffle, so no row repeats before all rows of its dataset have been used.

A dataset read in blocks (packed shards, or a CSV with `shuffle: blocks`) is shuffled so that each block is read
once per pass: the blocks come in a seeded order, `window` consecutive blocks of it form a window, and the rows
of a window come in a seeded order of their own (`block_shuffled_rows`). Every pass is still a permutation of
all rows, and a run of draws mixes the rows of `window` blocks.

Everything here is a pure function of (train.seed, epoch): the basis of exact resume. So are a sample's own
random draws (`sample_draws`: speed, crop offset, augmentation), made a chunk of positions at a time.
"""

from __future__ import annotations

import math

import datasets
import numpy as np

# Purposes of random streams, so that no two of them share a seed.
ORDER, MIX, SAMPLE, SUBSTITUTE, BLOCK_ORDER = range(5)
DRAW_CHUNK = 256  # consecutive positions whose per-sample draws come from one generator


def random_stream(seed: int, *keys: int) -> np.random.Generator:
    """A numpy generator that depends on (seed, *keys) only."""
    return np.random.default_rng(np.random.SeedSequence([seed % 2**64, *keys]))


def normalised(weights: list[float]) -> list[float]:
    total = sum(weights)
    return [weight / total for weight in weights]


def speed_class(speaker: str, factor: float) -> str:
    """Class name of a speaker heard at a speed factor (3D-Speaker/WeSpeaker: speaker x speed is a new class)."""
    return speaker if factor == 1.0 else f"{speaker}@speed{factor:g}"


def build_label_map(speakers: list[str], speed_factors: list[float], speed_as_classes: bool) -> dict[str, int]:
    """Namespaced speaker (plus speed variants when they are classes) -> class index, in sorted order."""
    factors = speed_factors if speed_as_classes else [1.0]
    names = sorted({speed_class(speaker, factor) for speaker in speakers for factor in factors})
    return {name: index for index, name in enumerate(names)}


def epoch_length(sizes: list[int], weights: list[float], stopping_strategy: str) -> int:
    """Samples in one epoch of the mixture (see the module docstring)."""
    ratios = [size / p for size, p in zip(sizes, normalised(weights))]
    if stopping_strategy == "first_exhausted":
        return max(1, math.floor(min(ratios) + 1e-6))
    return max(1, math.ceil(max(ratios) - 1e-6))


def _shuffled_rows(size: int, count: int, offset: int, seed: int, epoch: int, dataset: int) -> np.ndarray:
    """`count` row numbers: shuffled passes over the dataset, each pass a new shuffle."""
    passes = [offset + random_stream(seed, ORDER, epoch, dataset, n).permutation(size)
              for n in range(math.ceil(count / size))]
    return np.concatenate(passes)[:count]


def block_shuffled_rows(block_lengths: np.ndarray, count: int, window: int, seed: int, epoch: int,
                        dataset: int) -> np.ndarray:
    """`count` row numbers of a dataset made of consecutive blocks: passes over all rows, each pass a seeded
    order of the blocks cut into windows of `window` blocks, the rows of each window in a seeded order."""
    size = int(np.sum(block_lengths))
    starts = np.cumsum([0, *block_lengths[:-1]])
    order = np.empty(math.ceil(count / size) * size, dtype=np.int64)  # filled in place: one array of a million
    filled = 0
    for n in range(len(order) // size):
        blocks = random_stream(seed, BLOCK_ORDER, epoch, dataset, n).permutation(len(block_lengths))
        for w in range(0, len(blocks), window):
            chosen = blocks[w : w + window]
            rows = np.concatenate([np.arange(starts[b], starts[b] + block_lengths[b]) for b in chosen])
            order[filled : filled + len(rows)] = rows[
                random_stream(seed, BLOCK_ORDER, epoch, dataset, n, w + 1).permutation(len(rows))]
            filled += len(rows)
    return order[:count]


def sample_draws(seed: int, epoch: int, positions: np.ndarray, width: int) -> np.ndarray:
    """(len(positions), width) uniforms in [0, 1): row i depends on (seed, epoch, positions[i]) only. The
    positions of a chunk of `DRAW_CHUNK` share one generator (a generator per sample costs more than its use)."""
    chunks = positions // DRAW_CHUNK
    draws = np.empty((len(positions), width))
    for chunk in np.unique(chunks).tolist():
        mine = chunks == chunk
        table = random_stream(seed, SAMPLE, epoch, chunk).random((DRAW_CHUNK, width))
        draws[mine] = table[positions[mine] % DRAW_CHUNK]
    return draws


def pick(uniform: float, count: int) -> int:
    """One of `count` items chosen by one of `sample_draws`' uniforms."""
    return min(int(uniform * count), count - 1)


def mix_epoch(sizes: list[int], weights: list[float], length: int, seed: int, epoch: int,
              blocks: list[np.ndarray | None] | None = None, window: int = 1) -> np.ndarray:
    """The epoch's order: per position, a row number into the concatenation of all manifests (dataset d's
    rows start at sum(sizes[:d])). At least `length` long.
    blocks[d]: the block lengths of a dataset read in blocks (None: rows shuffled one by one)."""
    blocks = blocks or [None] * len(sizes)
    probabilities = normalised(weights)
    offsets = np.cumsum([0, *sizes[:-1]])
    mix_seed = int(random_stream(seed, MIX, epoch).integers(2**63))
    # Expected draws + 6 sigma per dataset, more if one runs out: the result never depends on these counts.
    counts = [math.ceil(length * p + 6 * math.sqrt(length * p * (1 - p))) + 1 for p in probabilities]
    while True:
        sources = [_shuffled_rows(size, count, offset, seed, epoch, d) if blocks[d] is None else
                   offset + block_shuffled_rows(blocks[d], count, window, seed, epoch, d)
                   for d, (size, count, offset) in enumerate(zip(sizes, counts, offsets))]
        if len(sources) == 1:  # every draw picks the only dataset: interleaving would return it as it is
            return sources[0]
        # With the counts above, the first source runs out just past `length` draws.
        mixed = datasets.interleave_datasets(
            [datasets.Dataset.from_dict({"row": rows}) for rows in sources], probabilities=probabilities,
            seed=mix_seed, stopping_strategy="first_exhausted")
        if len(mixed) >= length:
            return mixed.with_format("numpy")["row"][:]
        counts = [2 * count for count in counts]
