"""The routes, and how a request's outputs become a response: one JSON body, or server-sent events."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import Response, StreamingResponse

from flatstack.engine import EngineBusy, Request, RequestError, RequestOutput
from flatstack.server.metrics import CONTENT_TYPE
from flatstack.server.protocol import (
    TOP_LOGPROBS_MAX,
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    chat_logprobs,
    chat_messages,
    completion_logprobs,
    sampling_params,
    sse,
    usage,
)

router = APIRouter()
DISCONNECT_POLL_S = 0.5  # a non-streaming request notices its client left within this


def served(request: HTTPRequest):
    return request.app.state.served


async def until_disconnected(request: HTTPRequest) -> None:
    """Returns when the client hangs up (the body was read already: nothing else can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def submit(http: HTTPRequest, requests: list) -> list[Request]:
    try:
        return served(http).engine.submit(requests)
    except EngineBusy as e:
        raise APIError(503, str(e), type_="server_overloaded", headers={"Retry-After": "1"}) from None


async def results(request: HTTPRequest, listeners: list[Request]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, output) as they come; every choice is aborted if the client leaves or on error."""
    s = served(request)
    metrics, start, finished = s.metrics, time.perf_counter(), 0
    last: list[float | None] = [None] * len(listeners)
    waiting = {asyncio.ensure_future(lst.outputs.get()): i for i, lst in enumerate(listeners)}
    gone = asyncio.ensure_future(until_disconnected(request))
    try:
        while waiting:
            done, _ = await asyncio.wait([*waiting, gone], return_when=asyncio.FIRST_COMPLETED)
            if gone in done:
                return
            for task in done:
                i = waiting.pop(task)
                listeners[i].read_at = time.monotonic()
                out = task.result()
                if isinstance(out, Exception):
                    if isinstance(out, RequestError):
                        raise APIError(400, str(out), param=out.param)
                    raise APIError(500, f"generation failed: {out}", "internal_error")
                now = time.perf_counter()
                if out.delta_token_ids:
                    if last[i] is None:
                        metrics.ttft.observe(now - start)
                    else:
                        metrics.itl.observe((now - last[i]) / len(out.delta_token_ids))
                    last[i] = now
                metrics.generation_tokens.inc(len(out.delta_token_ids))
                if out.finished:
                    finished += 1
                    metrics.prompt_tokens.inc(len(out.prompt_token_ids))
                else:
                    waiting[asyncio.ensure_future(listeners[i].outputs.get())] = i
                yield i, out
    finally:
        for task in [*waiting, gone]:
            task.cancel()
        if finished < len(listeners):
            s.engine.abort([lst.request_id for lst in listeners])


async def collect(request: HTTPRequest, requests: list) -> list[RequestOutput] | None:
    """Every choice's final output, or None if the client left first."""
    listeners = submit(request, requests)
    finals: list[RequestOutput | None] = [None] * len(listeners)
    async for i, out in results(request, listeners):
        finals[i] = out
    return None if any(f is None for f in finals) else finals


def event_stream(request: HTTPRequest, requests: list, envelope: dict, prelude: list[dict], pieces: Callable,
                 include_usage: bool, n: int) -> StreamingResponse:
    """Server-sent events: the prelude choices, then `pieces(i, output)` choices as outputs come, then the
    usage in a chunk of its own (if asked), then [DONE]. The sequences are submitted before the response
    starts, so a full queue is a 503, not a stream; a failure after the start is an error event."""
    listeners = submit(request, requests)

    async def events():
        finals: list[RequestOutput | None] = [None] * len(listeners)
        completion_tokens = 0
        try:
            for c in prelude:
                yield sse({**envelope, "choices": [c]})
            async for i, out in results(request, listeners):
                completion_tokens += len(out.delta_token_ids)
                if out.finished:
                    finals[i] = out
                for c in pieces(i, out):
                    yield sse({**envelope, "choices": [c]})
            if include_usage and all(f is not None for f in finals):
                yield sse({**envelope, "choices": [], "usage": usage(finals, completion_tokens, n)})
        except APIError as e:
            yield sse(e.body())
        except Exception as e:  # noqa: BLE001 - a stream has no status left to fail with: say it, then end
            yield sse(APIError(500, f"internal error: {type(e).__name__}: {e}", "internal_error").body())
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def left() -> Response:
    return Response(status_code=499)  # the client left: nobody reads this


@router.get("/health")
async def health(request: HTTPRequest):
    if not served(request).engine.running:
        return APIError(503, "the engine is not running (or still warming up)", "internal_error").response()
    return {"status": "ok"}


@router.get("/v1/models")
async def models(request: HTTPRequest):
    s = served(request)
    return {"object": "list", "data": [{"id": s.config.served_model_name, "object": "model",
                                        "created": int(time.time()), "owned_by": "flatstack",
                                        "max_model_len": s.cfg.max_seq_len, "vocab_size": s.cfg.vocab_size}]}


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: HTTPRequest):
    s = served(request)
    s.check_model(req.model)
    if req.logprobs is not None and req.echo:
        raise APIError(400, "echo with logprobs is not supported", param="echo")
    prompts = req.prompts()
    params = sampling_params(req, req.max_tokens, req.logprobs, "delta" if req.stream else "final")
    requests = await s.requests(prompts, params, req.n, req.max_tokens)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    echo = [s.llm.tokenizer.decode(ids, skip_special_tokens=False) if req.echo else "" for ids, _ in requests]

    def choice(i: int, text: str, out: RequestOutput) -> dict:
        lps = completion_logprobs(out.logprobs, s.token_text) if req.logprobs is not None else None
        return {"index": i, "text": text, "finish_reason": out.finish_reason, "logprobs": lps}

    if req.stream:
        envelope = {"id": rid, "object": "text_completion", "created": created, "model": req.model}
        prelude = [{"index": i, "text": e, "finish_reason": None, "logprobs": None} for i, e in enumerate(echo) if e]

        def pieces(i: int, out: RequestOutput) -> list[dict]:
            return [choice(i, out.text, out)] if out.text or out.finished or out.logprobs else []

        return event_stream(request, requests, envelope, prelude, pieces, req.include_usage, req.n)
    finals = await collect(request, requests)
    if finals is None:
        return left()
    return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
            "choices": [choice(i, echo[i] + o.text, o) for i, o in enumerate(finals)],
            "usage": usage(finals, sum(len(o.token_ids) for o in finals), req.n)}


@router.post("/v1/chat/completions")
async def chat(req: ChatRequest, request: HTTPRequest):
    s = served(request)
    s.check_model(req.model)
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= TOP_LOGPROBS_MAX:
        raise APIError(400, f"top_logprobs must be in [0, {TOP_LOGPROBS_MAX}]; got {req.top_logprobs}",
                       param="top_logprobs")
    messages = chat_messages(req.messages)
    prompt = await asyncio.to_thread(s.chat_prompt, messages, True)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(req, req.max_new_tokens, logprobs, "delta" if req.stream else "final")
    requests = await s.requests([prompt], params, req.n, req.max_new_tokens)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(i: int, delta: dict, finish: str | None, lps=None) -> dict:
        return {"index": i, "delta": delta, "finish_reason": finish,
                "logprobs": chat_logprobs(lps, s.token_text) if req.logprobs and lps is not None else None}

    def pieces(i: int, out: RequestOutput) -> list[dict]:
        new = [chunk(i, {"content": out.text}, None, out.logprobs)] if out.text or out.logprobs else []
        return new + ([chunk(i, {}, out.finish_reason)] if out.finished else [])

    if req.stream:
        envelope = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model}
        prelude = [chunk(i, {"role": "assistant", "content": ""}, None) for i in range(len(requests))]
        return event_stream(request, requests, envelope, prelude, pieces, req.include_usage, req.n)
    finals = await collect(request, requests)
    if finals is None:
        return left()
    choices = [{"index": i, "message": {"role": "assistant", "content": o.text}, "finish_reason": o.finish_reason,
                "logprobs": chat_logprobs(o.logprobs, s.token_text) if req.logprobs else None}
               for i, o in enumerate(finals)]
    return {"id": rid, "object": "chat.completion", "created": created, "model": req.model, "choices": choices,
            "usage": usage(finals, sum(len(o.token_ids) for o in finals), req.n)}


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, request: HTTPRequest):
    s = served(request)
    s.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of prompt or messages", param="prompt")
    if req.messages is not None:
        text = await asyncio.to_thread(s.chat_prompt, chat_messages(req.messages), req.add_generation_prompt)
    else:
        text = req.prompt
    try:
        ids = await asyncio.to_thread(s.llm.encode, text)
    except RequestError as e:
        raise APIError(400, str(e), param="messages" if req.messages is not None else "prompt") from None
    return {"tokens": ids, "count": len(ids), "max_model_len": s.cfg.max_seq_len}


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, request: HTTPRequest):
    s = served(request)
    s.check_model(req.model)
    bad = next((t for t in req.tokens if not 0 <= t < s.cfg.vocab_size), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary of size {s.cfg.vocab_size}", param="tokens")
    text = await asyncio.to_thread(lambda: s.llm.tokenizer.decode_batch([req.tokens], skip_special_tokens=False)[0])
    return {"prompt": text}


@router.get("/metrics")
async def metrics(request: HTTPRequest):
    return Response(served(request).metrics.exposition(), media_type=CONTENT_TYPE)

