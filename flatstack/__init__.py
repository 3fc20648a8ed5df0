"""flatstack: one small codebase from raw text to a served model.

The names below load on first use, so commands that do not need torch (prepare) never import it.
"""

import importlib

_EXPORTS = {
    "LLM": "flatstack.engine",
    "SamplingParams": "flatstack.engine",
    "load": "flatstack.checkpoint",
    "save": "flatstack.checkpoint",
    "KVCache": "flatstack.model",
    "ModelConfig": "flatstack.model",
    "Transformer": "flatstack.model",
    "preset": "flatstack.model",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'flatstack' has no attribute {name!r}")
