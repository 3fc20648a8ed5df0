"""The inference engine: paged KV cache, continuous batching, prefix caching, per-request sampling.

config.py (EngineConfig), sequence.py (a request's state), block_manager.py (blocks and the prefix
cache), scheduler.py (who runs each step, and the bookkeeping after it), runner.py (the KV pool and the
forward pass), decode_graphs.py (compiled decode steps), sampling.py (parameters and the sampler),
output.py (tokens, text, stops, outputs), llm.py (LLM: the engine and its offline API), loop.py (the
engine on a thread of its own, with thread-safe submit and abort, for the server).
"""

from __future__ import annotations

import importlib

# Names resolve on first use (PEP 562): `flatstack.engine.config` imports without torch, so the CLI builds
# its options from EngineConfig without loading the engine.
EXPORTS = {"LLM": "llm", "check_text": "llm", "EngineConfig": "config", "EngineBusy": "loop", "EngineLoop": "loop",
           "Request": "loop", "RequestOutput": "output", "RequestError": "sampling", "SamplingParams": "sampling",
           "TokenLogprob": "sampling", "sample": "sampling", "sample_id": "sampling", "kv_bytes_per_token": "runner"}
__all__ = list(EXPORTS)


def __getattr__(name: str):
    if name not in EXPORTS:
        raise AttributeError(f"module 'flatstack.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(f"flatstack.engine.{EXPORTS[name]}"), name)
