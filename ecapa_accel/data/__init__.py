"""Training data: manifest CSVs (validated) or packed shards, mixed into one deterministic, shardable stream of
crops.

Submodules load on first use, so that `from ecapa_accel.data.audio import ...` (embedding, verification) does
not pay for importing `datasets`.
"""

from importlib import import_module

_LAZY = {
    "Manifest": "manifest",
    "check_manifests": "manifest",
    "read_manifest": "manifest",
    "prepare_manifest": "prepare",
    "ShardDataset": "shards",
    "check_datasets": "shards",
    "pack_manifest": "shards",
    "TrainingData": "stream",
    "build_training_data": "stream",
    "inspect_stream": "stream",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'ecapa_accel.data' has no attribute '{name}'")
    value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value
