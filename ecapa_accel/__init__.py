"""ecapa-accel: ECAPA-TDNN speaker embeddings trained with Hugging Face accelerate and datasets.

Heavy modules (torch, accelerate, datasets) load on first use, so that `import ecapa_accel` and the CLI's
`--help` stay fast.
"""

from importlib import import_module

from .config import Config, load_config
from .errors import UserError

__version__ = "0.1.0"

_LAZY = {
    "train": "trainer",
    "resume": "trainer",
    "export_run": "trainer",
    "EcapaTdnn": "model",
    "build_model": "model",
    "EcapaEncoder": "encoder",
    "FeatureExtractor": "features",
    "AAMSoftmax": "loss",
    "build_training_data": "data",
    "compute_eer": "evaluate",
    "compute_min_dcf": "evaluate",
    "evaluate_trials": "evaluate",
    "convert_checkpoint": "convert",
    "run_status": "checkpoint",
}

__all__ = ["Config", "UserError", "load_config", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'ecapa_accel' has no attribute '{name}'")
    value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value
