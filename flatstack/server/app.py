"""`flatstack serve`: the engine behind an OpenAI-compatible HTTP API (FastAPI and uvicorn).

The engine steps on the main thread (torch's CPU kernels, compiled ones above all, ran at half speed on
a second thread when measured) and uvicorn serves on another. A route checks its request (counts and
sizes first, then tokenising on a worker thread, off the event loop), submits its sequences to the
engine loop and reads their outputs: a stream as deltas, a plain request as one final output. A client
that leaves, streaming or not, aborts its request within a second. Errors come back in OpenAI's shape,
{"error": {"message", "type", "param", "code"}}; a stream that fails after it started ends with an
error event and [DONE]."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from flatstack.engine import LLM, EngineLoop, RequestError, check_text
from flatstack.server import routes
from flatstack.server.config import ServerConfig
from flatstack.server.http import Guard, protocol
from flatstack.server.metrics import Metrics
from flatstack.server.page import add_page
from flatstack.server.protocol import APIError, choice_seed


def longest_token_chars(llm: LLM) -> int:
    return max((len(t) for t in llm.tokenizer.get_vocab(with_added_tokens=True)), default=1)


class Served:
    """What the routes share: the engine and its loop, the metrics, the settings."""

    def __init__(self, llm: LLM, config: ServerConfig):
        self.llm, self.config, self.cfg = llm, config, llm.model.cfg
        self.engine = EngineLoop(llm, config.max_queue, config.slow_reader_timeout)
        self.metrics = Metrics(lambda: self.engine.stats, lambda: self.engine.pending,
                               lambda: llm.decode_path)
        # A token covers at most as many characters as its own text has (x4 for what a normaliser may
        # fold): a longer prompt cannot fit the context, and is refused without tokenising it.
        self.max_prompt_chars = 4 * self.cfg.max_seq_len * longest_token_chars(llm)

    def token_text(self, token_id: int) -> str:
        return self.llm.tokenizer.decode([token_id], skip_special_tokens=False)

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            for m in messages:
                check_text(m["content"], "messages")
            return self.llm.apply_chat_template(messages, add_generation_prompt)
        except (RequestError, ValueError) as e:
            raise APIError(400, str(e), param="messages") from None

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.served_model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves "
                           f"{self.config.served_model_name!r}", param="model", code="model_not_found")

    async def requests(self, prompts: list, params, n: int, max_tokens: int | None) -> list[tuple[list[int], object]]:
        """(prompt ids, parameters) for n choices per prompt, checked; tokenising runs on a worker thread.
        Without max_tokens, a request may run to the end of the context (or of what the KV pool holds)."""
        if len(prompts) * n > self.config.max_queue:
            raise APIError(400, f"{len(prompts)} prompts x n={n} is more sequences than this server queues "
                           f"({self.config.max_queue})", param="prompt")
        for p in prompts:
            if isinstance(p, str) and len(p) > self.max_prompt_chars:
                raise APIError(400, f"a prompt of {len(p)} characters cannot fit the model's context of "
                               f"{self.cfg.max_seq_len} tokens", param="prompt")
        return await asyncio.to_thread(self.check_requests, prompts, params, n, max_tokens)

    def check_requests(self, prompts: list, params, n: int, max_tokens: int | None) -> list:
        llm, requests = self.llm, []
        try:
            for prompt in prompts:
                ids = llm.encode(prompt)  # once per prompt, not per choice
                if max_tokens is None:
                    room = min(self.cfg.max_seq_len, llm.kv_capacity_tokens) - len(ids)
                    params = replace(params, max_tokens=max(room, 1))
                llm.check_request(ids, params)
                requests += [(ids, replace(params, seed=choice_seed(params.seed, j))) for j in range(n)]
        except RequestError as e:
            raise APIError(400, str(e), param=e.param or "prompt") from None
        return requests


def validation_error(request: Request, e: RequestValidationError) -> Response:
    first = e.errors()[0] if e.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    message = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        message = f"request body is not valid JSON: {first.get('ctx', {}).get('error', message)}"
    elif where:
        message = f"{where}: {message}"
    return APIError(422, message, param=where or None).response()


def http_error(request: Request, e: StarletteHTTPException) -> Response:
    if e.status_code == 400:  # FastAPI could not even decode the body (not UTF-8, say)
        return APIError(422, f"request body is not valid JSON: {e.detail}").response()
    message = f"no route {request.method} {request.url.path}" if e.status_code == 404 else str(e.detail)
    return APIError(e.status_code, message, code=str(e.status_code)).response()


def internal_error(request: Request, e: Exception) -> Response:
    return APIError(500, f"internal error: {type(e).__name__}: {e}", "internal_error").response()


def create_app(llm: LLM, config: ServerConfig) -> FastAPI:
    served = Served(llm, config)
    app = FastAPI(title="flatstack", version="0.1.0")
    app.state.served = served
    app.include_router(routes.router)
    app.add_exception_handler(APIError, lambda request, e: e.response())
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    open_paths = {"/health"} | ({"/metrics"} if config.metrics_without_key else set())
    if config.ui:
        add_page(app)
        open_paths.add("/")  # the page holds no secret: it asks for the key and sends it itself
    app.add_middleware(Guard, api_key=config.api_key, open_paths=open_paths, max_body_bytes=config.max_body_bytes,
                       body_timeout=config.body_timeout, on_status=served.metrics.count)
    return app


def serve(llm: LLM, config: ServerConfig, host: str, port: int) -> None:
    """uvicorn on a thread of its own, the engine on this one, until Ctrl-C or SIGTERM."""
    import signal

    import uvicorn

    app = create_app(llm, config)
    engine: EngineLoop = app.state.served.engine
    server = uvicorn.Server(uvicorn.Config(
        app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5,
        http=protocol(config.header_timeout), timeout_keep_alive=config.keep_alive_timeout,
        limit_concurrency=config.max_connections))
    http = threading.Thread(target=server.run, name="flatstack-http", daemon=True)
    http.start()
    while not server.started:
        if not http.is_alive():
            raise OSError(f"cannot serve on {host}:{port} (is the port in use?)")
        time.sleep(0.05)
    signal.signal(signal.SIGTERM, lambda *_: engine.stop())
    page = f", chat page at http://{host}:{port}/" if config.ui else ""
    print(f"flatstack serve: {config.served_model_name} on http://{host}:{port}/v1{page}", flush=True)
    # what exists now (the model, the tokenizer, every import) lives as long as the server: frozen out of the
    # collector's reach, whose full collections would otherwise walk it all every few hundred steps (a tenth
    # of a decode step's time); collectable again at the end, where extensions check for what leaked
    gc.collect()
    gc.freeze()
    try:
        engine.run()
    except KeyboardInterrupt:
        pass
    finally:
        gc.unfreeze()
        server.should_exit = True
        http.join(timeout=10)
