"""Training data: manifest CSVs (validated), mixed into one deterministic, shardable stream of crops."""

from .manifest import Manifest, check_manifests, read_manifest
from .prepare import prepare_manifest
from .stream import TrainingData, build_training_data, inspect_stream

__all__ = [
    "Manifest",
    "TrainingData",
    "build_training_data",
    "check_manifests",
    "inspect_stream",
    "prepare_manifest",
    "read_manifest",
]
