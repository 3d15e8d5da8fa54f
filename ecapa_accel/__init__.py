"""ecapa-accel: ECAPA-TDNN speaker embeddings trained with Hugging Face accelerate and datasets.

Heavy modules (torch, accelerate, datasets) load on first use, so that `import ecapa_accel` and the CLI's
`--help` stay fast.
"""

import sys
import types
from importlib import import_module

from .config import Config, load_config
from .errors import Preempted, UserError

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
    "compute_eer": "metrics",
    "compute_min_dcf": "metrics",
    "evaluate_trials": "evaluate",
    "verify_pair": "evaluate",
    "average_run": "average",
    "convert_checkpoint": "convert",
    "run_status": "checkpoint",
}

__all__ = ["Config", "Preempted", "UserError", "load_config", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'ecapa_accel' has no attribute '{name}'")
    value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    if name != "train":  # served by the _Package property below
        globals()[name] = value
    return value


class _Package(types.ModuleType):
    """Keeps `ecapa_accel.train` the training function: importing the entry module `ecapa_accel.train` (what
    `accelerate launch -m ecapa_accel.train` runs) would otherwise rebind the package attribute to the module."""

    @property
    def train(self):
        return __getattr__("train")

    @train.setter
    def train(self, value):
        if not isinstance(value, types.ModuleType):
            raise AttributeError("ecapa_accel.train is the training function")


sys.modules[__name__].__class__ = _Package
