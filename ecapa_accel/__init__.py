"""ecapa-accel: ECAPA-TDNN speaker embeddings trained with Hugging Face accelerate and datasets."""

from .config import Config, load_config
from .errors import UserError

__all__ = ["Config", "UserError", "load_config"]
__version__ = "0.1.0"
