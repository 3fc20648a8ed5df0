"""The inference engine: paged KV cache, continuous batching, prefix caching, per-request sampling.

sequence.py (a request's state), block_manager.py (blocks and the prefix cache), scheduler.py (who runs
each step), runner.py (the KV pool and the forward pass), sampling.py (parameters and the sampler),
llm.py (the engine and its offline API).
"""

from flatstack.engine.llm import LLM, RequestOutput
from flatstack.engine.sampling import RequestError, SamplingParams, TokenLogprob

__all__ = ["LLM", "RequestError", "RequestOutput", "SamplingParams", "TokenLogprob"]
