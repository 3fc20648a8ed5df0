"""The OpenAI API's bodies: requests checked strictly (a string is not a number, a number is not a
boolean), their mapping to the engine's `SamplingParams`, and the pieces of the responses. Every error
is an `APIError` that names its field in `param`."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from flatstack.engine import RequestError, RequestOutput, SamplingParams, TokenLogprob

N_MAX = 16  # choices per request
STOP_MAX = 16  # stop strings per request
TOP_LOGPROBS_MAX = 20
# OpenAI fields this server does not implement: answered with 400 naming the field, not ignored. A value
# that asks for nothing (null, empty, "none", plain text output) passes.
UNSUPPORTED = ("response_format", "tools", "tool_choice", "functions", "function_call", "logit_bias",
               "parallel_tool_calls", "suffix", "audio", "modalities", "prediction", "web_search_options")
NEUTRAL = (None, [], {}, "none", "auto", {"type": "text"})


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def whole_number(value: Any) -> Any:
    """2.0 is the integer 2 (JSON does not tell them apart; some clients write one for the other);
    2.5, "2" and true stay errors for the strict check after this."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Int = Annotated[int, BeforeValidator(whole_number)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # extras: checked against UNSUPPORTED, else ignored
    model: str
    max_tokens: Int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: Int = 1
    stop: str | list[str] | None = None
    seed: Int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # flatstack extras, as vLLM names them
    top_k: Int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    stop_token_ids: list[Int] | None = None

    def check_supported(self) -> None:
        for name in UNSUPPORTED:
            value = (self.model_extra or {}).get(name)
            if value not in NEUTRAL:
                raise APIError(400, f"{name} is not supported by this server", param=name,
                               code="unsupported_parameter")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[Int] | list[list[Int]]
    max_tokens: Int | None = 16  # OpenAI's default for completions
    logprobs: Int | None = None
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        prompts = self.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        return prompts


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        """The content: a string, or OpenAI's list of parts of which the text parts are kept."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"message content parts must be text parts; got type {part.get('type')!r}",
                               param="messages")
            texts.append(part["text"])
        return "".join(texts)


def chat_messages(messages: list[ChatMessage]) -> list[dict]:
    return [{"role": m.role, "content": m.text()} for m in messages]


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = None
    logprobs: bool = False
    top_logprobs: Int | None = None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    tokens: list[Int]


def sampling_params(req: SamplingFields, max_tokens: int | None, logprobs: int | None,
                    output_kind: str) -> SamplingParams:
    """The engine's parameters for a request; a value out of range is a 400 naming its field."""
    req.check_supported()
    if not 1 <= req.n <= N_MAX:
        raise APIError(400, f"n must be in [1, {N_MAX}]; got {req.n}", param="n")
    if isinstance(req.stop, list) and len(req.stop) > STOP_MAX:
        raise APIError(400, f"stop takes at most {STOP_MAX} strings; got {len(req.stop)}", param="stop")
    try:
        return SamplingParams(
            max_tokens=max_tokens if max_tokens is not None else 1, temperature=req.temperature,
            top_k=req.top_k, top_p=req.top_p, min_p=req.min_p, repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, seed=req.seed,
            stop=req.stop or [], stop_token_ids=req.stop_token_ids or [], ignore_eos=req.ignore_eos,
            logprobs=logprobs, output_kind=output_kind)
    except RequestError as e:
        raise APIError(400, str(e), param=e.param) from None


def choice_seed(seed: int | None, j: int) -> int | None:
    """Choice j of a seeded request draws from seed + j, wrapped into the seed's range."""
    return None if seed is None else (seed + j) % 2**63


# ---------------------------------------------------------------------------------------------
# responses


def usage(outs: list[RequestOutput], completion_tokens: int, n: int) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outs[::n])
    cached = sum(o.num_cached_tokens for o in outs[::n])
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


def completion_logprobs(lps: list[TokenLogprob], token_text) -> dict:
    tokens = [token_text(lp.token_id) for lp in lps]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{token_text(t): v for t, v in lp.top} for lp in lps], "text_offset": offsets}


def chat_logprobs(lps: list[TokenLogprob], token_text) -> dict:
    def entry(token_id, logprob):
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in lps]}


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
