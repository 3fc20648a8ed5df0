"""A request inside the engine: its tokens, how many of them sit in the KV cache, its blocks, its RNG."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from enum import Enum

import torch

from flatstack.engine.sampling import SamplingParams, TokenLogprob


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    token_ids: list[int]  # the prompt, then every generated token
    num_prompt: int
    params: SamplingParams
    generator: torch.Generator
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose keys and values are in the cache
    num_cached: int = 0  # prompt tokens served from the prefix cache at the last admission
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" or "length"
    logprobs: list[TokenLogprob] = field(default_factory=list)
    text: str = ""  # the decoded output, cut at a stop string
    detok_prefix: int = 0  # incremental detokenisation: output tokens [prefix, read) were decoded last time
    detok_read: int = 0
    num_emitted: int = 0  # characters of `text` already handed to the caller (streaming)
    num_emitted_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt :]

    @functools.cached_property
    def prompt_ids(self) -> list[int]:
        """The prompt never changes: sliced once, not per token."""
        return self.token_ids[: self.num_prompt]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
