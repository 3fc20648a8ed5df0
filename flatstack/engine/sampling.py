"""Per-request sampling: the parameters a request carries, checked when it arrives, and the sampler that
turns one step's logits into one token per sequence.

Each sequence samples from its own `torch.Generator`, seeded from the request's seed when it gives one,
so a seeded request draws the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


class RequestError(ValueError):
    """A request the engine refuses; the message names the field, the value and the allowed range.
    `param` is the request field at fault, for APIs that report it (None: the request as a whole)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# Temperatures below this sample the argmax (as vLLM does): dividing logits by a smaller one only
# overflows, and the distribution it describes is already the argmax to float32's precision.
GREEDY_BELOW = 1e-5
OUTPUT_KINDS = ("cumulative", "delta", "final")


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0 or -1: all tokens
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output (CTRL's rule)
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from each token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per earlier occurrence in the output
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings, not included in the text
    stop_token_ids: list[int] = field(default_factory=list)  # stop tokens besides EOS, not emitted
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; n >= 0: the chosen token's log-probability and the top n
    # what each output carries: "cumulative" (everything so far, plus the deltas), "delta" (only what is
    # new: a server's queue then holds O(tokens), not O(tokens^2)), "final" (one output, at the end)
    output_kind: str = "cumulative"

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RequestError(f"{name} must be a finite number; got {value!r}", name)
            return value

        def integer(name: str, low: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise RequestError(f"{name} must be an integer >= {low}; got {value!r}", name)

        integer("max_tokens", 1)
        integer("top_k", 0)
        if not 0 <= number("temperature") <= 100:
            raise RequestError(f"temperature must be in [0, 100]; got {self.temperature}", "temperature")
        if not 0 < number("top_p") <= 1:
            raise RequestError(f"top_p must be in (0, 1]; got {self.top_p}", "top_p")
        if not 0 <= number("min_p") <= 1:
            raise RequestError(f"min_p must be in [0, 1]; got {self.min_p}", "min_p")
        if not 0 < number("repetition_penalty") <= 10:
            raise RequestError(f"repetition_penalty must be in (0, 10]; got {self.repetition_penalty}",
                               "repetition_penalty")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= number(name) <= 2:
                raise RequestError(f"{name} must be in [-2, 2]; got {getattr(self, name)}", name)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise RequestError(f"seed must be an integer in [0, 2**63); got {self.seed!r}", "seed")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise RequestError(f"stop strings must be non-empty strings; got {s!r}", "stop")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise RequestError(f"stop_token_ids must be non-negative integers; got {t!r}", "stop_token_ids")
        if self.logprobs is not None:
            integer("logprobs", 0)
            if self.logprobs > 20:
                raise RequestError(f"logprobs must be in [0, 20]; got {self.logprobs}", "logprobs")
        if self.output_kind not in OUTPUT_KINDS:
            raise RequestError(f"output_kind must be one of {OUTPUT_KINDS}; got {self.output_kind!r}", "output_kind")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the top-N tokens of the step, best first


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    """logits [V] of one sequence, penalised by what it has already seen. A tiny repetition penalty
    divides a logit into infinity: results are clamped to float32's finite range, so the softmax after
    them stays a distribution."""
    if params.repetition_penalty != 1 and (prompt or output):
        seen = torch.tensor(sorted(set(prompt) | set(output)), dtype=torch.long)
        values = logits[seen]
        p = params.repetition_penalty
        logits[seen] = torch.where(values > 0, values / p, values * p)
    if output and (params.presence_penalty or params.frequency_penalty):
        ids, counts = torch.tensor(output, dtype=torch.long).unique(return_counts=True)
        logits[ids] -= params.frequency_penalty * counts.to(logits.dtype) + params.presence_penalty
    finite = torch.finfo(logits.dtype).max
    return logits.clamp(-finite, finite)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p as -inf masks on logits [V]. The best logit is
    subtracted before the division, so no temperature the sampler accepts overflows: the best token
    keeps logit 0 and probability > 0 whatever the filters say."""
    logits = (logits - logits.max()) / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token once the tokens before it already cover top_p; the first always stays (a top_p
        # that rounds to 0 in float32 would otherwise drop every token)
        drop = probs.cumsum(-1) - probs >= params.top_p
        drop[0] = False
        logits = logits.masked_fill(torch.empty_like(drop).scatter(0, order, drop), float("-inf"))
    if params.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int],
           generator: torch.Generator) -> torch.Tensor:
    """One token id from logits [V] (float32) of one sequence, as a 0-dim tensor on the logits' device
    (the engine reads every sequence's at once: one host transfer a step), or -1 where the logits are not
    finite numbers. `generator` (the request's own) lives on the logits' device."""
    if params.penalised:
        logits = apply_penalties(logits.clone(), params, prompt, output)
    if params.greedy:
        return logits.argmax()
    probs = filter_logits(logits, params).softmax(-1)
    finite = torch.isfinite(probs).all()  # only logits that are NaN themselves fail it
    # checked without a host sync; multinomial over NaN on a GPU is a device-side assert that ends the process
    probs = torch.where(finite, probs, torch.ones_like(probs))
    return torch.where(finite, torch.multinomial(probs, 1, generator=generator)[0], -1)


NOT_FINITE = "the model's logits are not finite numbers; cannot sample"


def sample_id(logits: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int],
              generator: torch.Generator) -> int:
    """`sample` read at once, for callers that take one token at a time."""
    token = int(sample(logits, params, prompt, output, generator))
    if token < 0:
        raise RuntimeError(NOT_FINITE)
    return token


def token_logprob(logits: torch.Tensor, token: int, top_n: int) -> TokenLogprob:
    """The model's own log-probabilities (before penalties and temperature), as OpenAI reports them."""
    logprobs = logits.log_softmax(-1)
    top = logprobs.topk(top_n) if top_n else None
    pairs = [] if top is None else list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
    return TokenLogprob(token, float(logprobs[token]), pairs)
