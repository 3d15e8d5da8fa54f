"""Training data: manifest CSVs (validated) or packed shards, mixed into one deterministic, shardable stream of
crops."""

from .manifest import Manifest, check_manifests, read_manifest
from .prepare import prepare_manifest
from .shards import ShardDataset, check_datasets, pack_manifest
from .stream import TrainingData, build_training_data, inspect_stream

__all__ = [
    "Manifest",
    "ShardDataset",
    "TrainingData",
    "build_training_data",
    "check_datasets",
    "check_manifests",
    "inspect_stream",
    "pack_manifest",
    "prepare_manifest",
    "read_manifest",
]
