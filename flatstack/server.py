"""`flatstack serve`: the engine behind an OpenAI-compatible HTTP API (FastAPI and uvicorn, nothing else).

The engine steps on the main thread and uvicorn serves on another (torch's CPU kernels, compiled ones
above all, ran at half speed on a second thread when measured). HTTP handlers check a request on the
event loop (tokenising, the sampling ranges, the context), then hand its sequences to the engine thread
through a command queue;
each request reads its outputs from its own asyncio queue, filled by the engine thread. A client that
goes away aborts its request, and its KV blocks return to the pool on the engine's next turn. Errors
come back in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from flatstack.engine import LLM, RequestError, RequestOutput, SamplingParams
from flatstack.engine.sequence import Sequence


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# ---------------------------------------------------------------------------------------------
# request bodies (strict: a string is not a number, a number is not a boolean)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # flatstack extras, as vLLM names them
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    tokens: list[int]


N_MAX = 16  # choices per request


def message_text(m: ChatMessage) -> str:
    """A message's content: a string, or OpenAI's list of parts of which the text parts are kept."""
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    texts = []
    for part in m.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"message content parts must be text parts; got type {part.get('type')!r}",
                           param="messages")
        texts.append(part["text"])
    return "".join(texts)


# ---------------------------------------------------------------------------------------------
# metrics


class Histogram:
    def __init__(self, buckets: list[float]):
        self.buckets, self.counts, self.total, self.n = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out = [f"# TYPE {name} histogram"]
        out += [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts, strict=True)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total}", f"{name}_count {self.n}"]
        return out


LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]


@dataclass
class Metrics:
    requests: dict[int, int] = field(default_factory=dict)  # by HTTP status
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))


# ---------------------------------------------------------------------------------------------
# the engine thread


class EngineLoop:
    """Runs `llm.step()` in `run()`; everything that touches the engine's queues happens on that thread."""

    def __init__(self, llm: LLM, max_queue: int):
        self.llm, self.max_queue = llm, max_queue
        self.commands: queue.Queue = queue.Queue()
        self.listeners: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.stats = llm.stats
        self.pending = 0  # sequences accepted and not yet finished or aborted
        self.pending_lock = threading.Lock()
        self.error: str | None = None
        self.running = False

    def stop(self) -> None:
        self.commands.put(("stop", None))

    def submit(self, seqs: list[Sequence]) -> list[asyncio.Queue]:
        with self.pending_lock:
            if self.pending + len(seqs) > self.max_queue:
                raise APIError(503, f"the server is at its limit of {self.max_queue} queued sequences; retry "
                               "later", type_="server_overloaded", headers={"Retry-After": "1"})
            self.pending += len(seqs)
        loop = asyncio.get_running_loop()
        queues = []
        for seq in seqs:
            q: asyncio.Queue = asyncio.Queue()
            self.listeners[seq.request_id] = (loop, q)
            queues.append(q)
        self.commands.put(("add", seqs))
        return queues

    def abort(self, request_ids: list[str]) -> None:
        self.commands.put(("abort", request_ids))

    def deliver(self, out: RequestOutput | Exception, request_id: str) -> None:
        entry = self.listeners.get(request_id)
        if entry is None:
            return
        loop, q = entry
        if isinstance(out, Exception) or out.finished:
            self.forget(request_id)
        loop.call_soon_threadsafe(q.put_nowait, out)

    def forget(self, request_id: str) -> None:
        if self.listeners.pop(request_id, None) is not None:
            with self.pending_lock:
                self.pending -= 1

    def handle(self, kind: str, payload) -> bool:
        if kind == "stop":
            return False
        if kind == "add":
            for seq in payload:
                try:
                    self.llm.add_sequence(seq)
                except RequestError as e:
                    self.deliver(e, seq.request_id)
        elif kind == "abort":
            for request_id in payload:
                self.llm.abort(request_id)
                self.forget(request_id)
        return True

    def run(self) -> None:
        try:
            self.llm.warm_up()  # requests that arrive meanwhile wait in the command queue
            self.running = True  # /health answers 200 from here: the decode graphs are compiled
            self.loop()
        finally:
            self.running = False

    def loop(self) -> None:
        while True:
            try:
                # wait for work only when the engine is idle (waking now and then, for signals)
                item = self.commands.get(timeout=0.5 if not self.llm.has_unfinished() else 0)
            except queue.Empty:
                item = None
            while item is not None:
                if not self.handle(*item):
                    return
                try:
                    item = self.commands.get_nowait()
                except queue.Empty:
                    item = None
            if not self.llm.has_unfinished():
                self.stats = self.llm.stats
                continue
            try:
                outputs = self.llm.step()
            except Exception as e:  # a bug, not bad input: fail what is running, keep serving
                self.error = f"{type(e).__name__}: {e}"
                for request_id in list(self.llm.requests):
                    self.llm.abort(request_id)
                    self.deliver(RuntimeError(self.error), request_id)
                continue
            self.stats = self.llm.stats
            for out in outputs:
                self.deliver(out, out.request_id)


# ---------------------------------------------------------------------------------------------
# the app


@dataclass
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    max_queue: int = 1024
    max_body_bytes: int = 4 << 20


def create_app(llm: LLM, config: ServerConfig) -> FastAPI:
    engine = EngineLoop(llm, config.max_queue)
    metrics = Metrics()
    cfg = llm.model.cfg
    pool_tokens = len(llm.blocks.blocks) * llm.blocks.block_size
    app = FastAPI(title="flatstack", version="0.1.0")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """Body size, API key, and the request count by status, before any route runs."""
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > config.max_body_bytes):
            response = error_response(413, f"request body is over the limit of {config.max_body_bytes} bytes",
                                      "invalid_request_error", code="request_too_large")
        elif config.api_key is not None and request.url.path.startswith("/v1/") and not key_ok(request):
            response = error_response(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                      "authentication_error", code="invalid_api_key")
        else:
            response = await call_next(request)
        metrics.requests[response.status_code] = metrics.requests.get(response.status_code, 0) + 1
        return response

    def key_ok(request: Request) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), config.api_key.encode())

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message = f"request body is not valid JSON: {first.get('ctx', {}).get('error', message)}"
        elif where:
            message = f"{'.'.join(where)}: {message}"
        return error_response(422, message, "invalid_request_error", param=".".join(where) or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 400:  # FastAPI could not even decode the body (not UTF-8, say)
            return error_response(422, f"request body is not valid JSON: {e.detail}", "invalid_request_error")
        message = f"no route {request.method} {request.url.path}" if e.status_code == 404 else str(e.detail)
        return error_response(e.status_code, message, "invalid_request_error", code=str(e.status_code))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        return error_response(500, f"internal error: {type(e).__name__}: {e}", "internal_error")

    def check_model(name: str) -> None:
        if name != config.served_model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {config.served_model_name!r}",
                           param="model", code="model_not_found")

    def sampling(req: SamplingFields, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        if not 1 <= req.n <= N_MAX:
            raise APIError(400, f"n must be in [1, {N_MAX}]; got {req.n}", param="n")
        if req.stop is not None and isinstance(req.stop, list) and len(req.stop) > 16:
            raise APIError(400, f"stop takes at most 16 strings; got {len(req.stop)}", param="stop")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            if not math.isfinite(getattr(req, name)):
                raise APIError(400, f"{name} must be a finite number", param=name)
        try:
            return SamplingParams(
                max_tokens=max_tokens if max_tokens is not None else 1, temperature=req.temperature,
                top_k=req.top_k, top_p=req.top_p, min_p=req.min_p, repetition_penalty=req.repetition_penalty,
                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, seed=req.seed,
                stop=req.stop or [], stop_token_ids=req.stop_token_ids or [], ignore_eos=req.ignore_eos,
                logprobs=logprobs)
        except RequestError as e:
            raise APIError(400, str(e), param=str(e).split(" ", 1)[0]) from None

    def sequences(prompts: list[str | list[int]], params: SamplingParams, n: int,
                  max_tokens: int | None) -> list[Sequence]:
        """n sequences per prompt; choice j of a seeded request uses seed + j. Without max_tokens, a
        request may run to the end of the context."""
        seqs = []
        try:
            for prompt in prompts:
                ids = llm.encode(prompt)  # once per prompt, not per choice
                if max_tokens is None:  # to the end of the context, or of what the KV pool holds
                    params = replace(params, max_tokens=max(min(cfg.max_seq_len, pool_tokens) - len(ids), 1))
                for j in range(n):
                    p = params if params.seed is None or not j else replace(params, seed=params.seed + j)
                    seqs.append(llm.make_sequence(ids, p, uuid.uuid4().hex))
        except RequestError as e:
            raise APIError(400, str(e), param="max_tokens" if "max_tokens" in str(e) else "prompt") from None
        return seqs

    async def results(request: Request, seqs: list[Sequence]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) as they come; aborts every choice if the client leaves or on error."""
        queues = engine.submit(seqs)
        start = time.perf_counter()
        last = [None] * len(seqs)
        waiting = {asyncio.ensure_future(q.get()): i for i, q in enumerate(queues)}
        finished, checked = 0, start
        try:
            while waiting:
                done, _ = await asyncio.wait(waiting, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                if time.perf_counter() - checked >= 1.0:
                    checked = time.perf_counter()
                    if await request.is_disconnected():
                        return
                for task in done:
                    i = waiting.pop(task)
                    out = task.result()
                    if isinstance(out, Exception):
                        raise APIError(400 if isinstance(out, RequestError) else 500, str(out),
                                       type_="invalid_request_error" if isinstance(out, RequestError)
                                       else "internal_error")
                    now = time.perf_counter()
                    if out.delta_token_ids:
                        if last[i] is None:
                            metrics.ttft.observe(now - start)
                        else:
                            metrics.itl.observe((now - last[i]) / len(out.delta_token_ids))
                        last[i] = now
                    metrics.generated_tokens += len(out.delta_token_ids)
                    if out.finished:
                        finished += 1
                        metrics.prompt_tokens += len(out.prompt_token_ids)
                    else:
                        waiting[asyncio.ensure_future(queues[i].get())] = i
                    yield i, out
        finally:
            for task in waiting:
                task.cancel()
            if finished < len(seqs):
                engine.abort([s.request_id for s in seqs])

    def usage(outs: list[RequestOutput], n: int) -> dict:
        prompt = sum(len(o.prompt_token_ids) for o in outs[::n])
        completion = sum(len(o.token_ids) for o in outs)
        cached = sum(o.num_cached_tokens for o in outs[::n])
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def token_text(token_id: int) -> str:
        return llm.tokenizer.decode([token_id], skip_special_tokens=False)

    def completion_logprobs(out: RequestOutput, lps) -> dict:
        tokens = [token_text(lp.token_id) for lp in lps]
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{token_text(t): v for t, v in lp.top} for lp in lps], "text_offset": offsets}

    def chat_logprobs(lps) -> dict:
        def entry(token_id, logprob):
            text = token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**entry(lp.token_id, lp.logprob),
                             "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in lps]}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def collect(request: Request, seqs: list[Sequence]) -> list[RequestOutput] | None:
        """Every choice's final output, or None if the client left first."""
        finals: list[RequestOutput | None] = [None] * len(seqs)
        async for i, out in results(request, seqs):
            if out.finished:
                finals[i] = out
        return None if any(f is None for f in finals) else finals

    def event_stream(request: Request, seqs: list[Sequence], envelope: dict, prelude: list[dict], pieces,
                     include_usage: bool, n: int) -> StreamingResponse:
        """Server-sent events: the prelude choices, then `pieces(i, output, new logprobs)` choices as outputs
        come, then the usage in a chunk of its own (if asked), then [DONE]."""

        async def events():
            sent_logprobs = [0] * len(seqs)
            finals: list[RequestOutput | None] = [None] * len(seqs)
            for c in prelude:
                yield sse({**envelope, "choices": [c]})
            async for i, out in results(request, seqs):
                lps = (out.logprobs or [])[sent_logprobs[i] : sent_logprobs[i] + len(out.delta_token_ids)]
                sent_logprobs[i] += len(lps)
                if out.finished:
                    finals[i] = out
                for c in pieces(i, out, lps):
                    yield sse({**envelope, "choices": [c]})
            if include_usage:
                yield sse({**envelope, "choices": [], "usage": usage(finals, n)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    # -- routes ---------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        if not engine.running:
            return error_response(503, "the engine is not running (or still compiling its decode graphs)",
                                  "internal_error")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.served_model_name, "object": "model",
                                            "created": int(time.time()), "owned_by": "flatstack",
                                            "max_model_len": cfg.max_seq_len, "vocab_size": cfg.vocab_size}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        if req.logprobs is not None and req.echo:
            raise APIError(400, "echo with logprobs is not supported", param="echo")
        prompts = req.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        params = sampling(req, req.max_tokens, req.logprobs)
        seqs = sequences(prompts, params, req.n, req.max_tokens)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo = [llm.tokenizer.decode(s.prompt_ids, skip_special_tokens=False) if req.echo else "" for s in seqs]

        def choice(i: int, text: str, out: RequestOutput, lps) -> dict:
            return {"index": i, "text": text, "finish_reason": out.finish_reason,
                    "logprobs": completion_logprobs(out, lps) if req.logprobs is not None else None}

        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            envelope = {"id": rid, "object": "text_completion", "created": created, "model": req.model}
            prelude = [{"index": i, "text": e, "finish_reason": None, "logprobs": None}
                       for i, e in enumerate(echo) if e]

            def pieces(i: int, out: RequestOutput, lps) -> list[dict]:
                return [choice(i, out.delta_text, out, lps)] if out.delta_text or out.finished or lps else []

            return event_stream(request, seqs, envelope, prelude, pieces, include_usage, req.n)
        finals = await collect(request, seqs)
        if finals is None:
            return PlainTextResponse("", status_code=499)  # the client left
        return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                "choices": [choice(i, echo[i] + o.text, o, o.logprobs) for i, o in enumerate(finals)],
                "usage": usage(finals, req.n)}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        check_model(req.model)
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= 20:
            raise APIError(400, f"top_logprobs must be in [0, 20]; got {req.top_logprobs}", param="top_logprobs")
        messages = [{"role": m.role, "content": message_text(m)} for m in req.messages]
        try:
            prompt = llm.apply_chat_template(messages)
        except (RequestError, ValueError) as e:
            raise APIError(400, str(e), param="messages") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = sampling(req, max_tokens, logprobs)
        seqs = sequences([prompt], params, req.n, max_tokens)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(i: int, delta: dict, finish: str | None, lps=None) -> dict:
            return {"index": i, "delta": delta, "finish_reason": finish,
                    "logprobs": chat_logprobs(lps) if req.logprobs and lps is not None else None}

        def pieces(i: int, out: RequestOutput, lps) -> list[dict]:
            new = [chunk(i, {"content": out.delta_text}, None, lps)] if out.delta_text or lps else []
            return new + ([chunk(i, {}, out.finish_reason)] if out.finished else [])

        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            envelope = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model}
            prelude = [chunk(i, {"role": "assistant", "content": ""}, None) for i in range(len(seqs))]
            return event_stream(request, seqs, envelope, prelude, pieces, include_usage, req.n)
        finals = await collect(request, seqs)
        if finals is None:
            return PlainTextResponse("", status_code=499)
        choices = [{"index": i, "message": {"role": "assistant", "content": o.text}, "finish_reason": o.finish_reason,
                    "logprobs": chat_logprobs(o.logprobs) if req.logprobs else None} for i, o in enumerate(finals)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": req.model, "choices": choices,
                "usage": usage(finals, req.n)}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        if req.model is not None:
            check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if req.messages is not None:
            text = llm.apply_chat_template([{"role": m.role, "content": message_text(m)} for m in req.messages],
                                           req.add_generation_prompt)
        else:
            text = req.prompt
        ids = llm.encode(text)
        return {"tokens": ids, "count": len(ids), "max_model_len": cfg.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        if req.model is not None:
            check_model(req.model)
        bad = next((t for t in req.tokens if not 0 <= t < cfg.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary of size {cfg.vocab_size}", param="tokens")
        return {"prompt": llm.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    @app.get("/metrics")
    async def prometheus():
        s = engine.stats
        lines = ["# TYPE flatstack_requests_total counter"]
        lines += [f'flatstack_requests_total{{status="{k}"}} {v}' for k, v in sorted(metrics.requests.items())]
        lines += [
            "# TYPE flatstack_prompt_tokens_total counter", f"flatstack_prompt_tokens_total {metrics.prompt_tokens}",
            "# TYPE flatstack_generation_tokens_total counter",
            f"flatstack_generation_tokens_total {metrics.generated_tokens}",
            "# TYPE flatstack_num_requests_running gauge", f"flatstack_num_requests_running {s['running']}",
            "# TYPE flatstack_num_requests_waiting gauge", f"flatstack_num_requests_waiting {s['waiting']}",
            "# TYPE flatstack_kv_blocks_used gauge", f"flatstack_kv_blocks_used {s['kv_blocks_used']}",
            "# TYPE flatstack_kv_blocks_free gauge", f"flatstack_kv_blocks_free {s['kv_blocks_free']}",
            "# TYPE flatstack_prefix_cache_hit_rate gauge",
            f"flatstack_prefix_cache_hit_rate {s['prefix_cache_hit_rate']}",
            "# TYPE flatstack_preemptions_total counter", f"flatstack_preemptions_total {s['preemptions']}",
        ]
        lines += metrics.ttft.lines("flatstack_time_to_first_token_seconds")
        lines += metrics.itl.lines("flatstack_inter_token_latency_seconds")
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    app.state.engine = engine
    return app


def serve(llm: LLM, config: ServerConfig, host: str, port: int) -> None:
    """uvicorn on a thread of its own, the engine on this one, until Ctrl-C or SIGTERM."""
    import signal

    import uvicorn

    app = create_app(llm, config)
    engine: EngineLoop = app.state.engine
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    http = threading.Thread(target=server.run, name="flatstack-http", daemon=True)
    http.start()
    while not server.started:
        if not http.is_alive():
            raise OSError(f"cannot serve on {host}:{port} (is the port in use?)")
        time.sleep(0.05)
    signal.signal(signal.SIGTERM, lambda *_: engine.stop())
    print(f"flatstack serve: {config.served_model_name} on http://{host}:{port}/v1", flush=True)
    try:
        engine.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        http.join(timeout=10)
