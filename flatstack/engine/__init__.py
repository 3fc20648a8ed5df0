"""The inference engine: paged KV cache, continuous batching, prefix caching, per-request sampling.

config.py (EngineConfig), sequence.py (a request's state), block_manager.py (blocks and the prefix
cache), scheduler.py (who runs each step, and the bookkeeping after it), runner.py (the KV pool and the
forward pass), decode_graphs.py (compiled decode steps), sampling.py (parameters and the sampler),
output.py (tokens, text, stops, outputs), llm.py (LLM: the engine and its offline API), loop.py (the
engine on a thread of its own, with thread-safe submit and abort, for the server).
"""

from flatstack.engine.config import EngineConfig
from flatstack.engine.llm import LLM, check_text
from flatstack.engine.loop import EngineBusy, EngineLoop, Request
from flatstack.engine.output import RequestOutput
from flatstack.engine.sampling import RequestError, SamplingParams, TokenLogprob

__all__ = ["LLM", "EngineBusy", "EngineConfig", "EngineLoop", "Request", "RequestError", "RequestOutput",
           "SamplingParams", "TokenLogprob", "check_text"]
