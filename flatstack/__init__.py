"""flatstack: one small codebase from raw text to a served model."""

from flatstack.checkpoint import load, save
from flatstack.model import KVCache, ModelConfig, Transformer, preset

__all__ = ["KVCache", "ModelConfig", "Transformer", "load", "preset", "save"]
