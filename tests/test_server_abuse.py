"""The server probed as a hostile but legitimate client probes it: each defect found that way has a test
here (named after its number in the reliability issue), the bad-input kinds each get their status, the
error's shape and a good request right after, and a mixed load with a hostile request every second
leaves the pool, the queue and the server's memory where they were."""

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
from serving import (
    AUTH,
    CHAT,
    CONTEXT,
    GOOD,
    KEY,
    MODEL,
    C,
    H,
    ServerURL,
    assert_error_shape,
    idle,
    metric,
    post,
    rss_bytes,
    running_server,
    tiny_checkpoint,
    wait_idle,
)
from test_server import BAD

from flatstack import LLM, SamplingParams
from flatstack.engine import EngineLoop
from flatstack.server import ServerConfig, create_app

TIMEOUT = 1  # the server's header and body timeouts, in seconds
KEEP_ALIVE = 5  # well beyond the load test's client keep-alive expiry, so no idle connection is reused as it closes
MAX_CONNECTIONS = 160
QUEUE = 96  # room for the load test's 64 well-formed requests beside its hostile ones
LIMITS = ("--max-queue", str(QUEUE), "--max-body-bytes", "8M", "--header-timeout", str(TIMEOUT), "--body-timeout",
          str(TIMEOUT), "--keep-alive-timeout", str(KEEP_ALIVE), "--max-connections", str(MAX_CONNECTIONS),
          "--max-num-seqs", "64")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("abuse"))


@pytest.fixture(scope="module")
def server(ckpt):
    with running_server(ckpt, *LIMITS) as url:
        yield url


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    """A model wide enough that a long request takes seconds; /metrics open without the key."""
    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("slow"), d_model=512, n_layers=8, ffn_dim=2048)
    with running_server(ckpt, "--max-num-seqs", "4", "--metrics-without-key") as url:
        yield url


def raw(text: str) -> bytes:
    """A JSON body written by hand: for escapes like a lone surrogate, and literals like Infinity."""
    return text.encode()


MANY = [f"p{i}" for i in range(100_000)]
P = '{"model": "tiny", "max_tokens": 2, '
ABUSE = [
    # values at the edges of what sampling accepts: served, and nobody else harmed
    ("temperature 1e-40", C, {**GOOD, "temperature": 1e-40}, 200),
    ("temperature 5e-324", C, {**GOOD, "temperature": 5e-324}, 200),
    ("temperature 1e-300", C, {**GOOD, "temperature": 1e-300}, 200),
    ("temperature 1e-6", C, {**GOOD, "temperature": 1e-6}, 200),
    ("temperature 100", C, {**GOOD, "temperature": 100}, 200),
    ("top_p 1e-300", C, {**GOOD, "top_p": 1e-300}, 200),
    ("top_p 1e-45", C, {**GOOD, "top_p": 1e-45}, 200),
    ("top_p tiny at temperature 1e-40", C, {**GOOD, "top_p": 1e-300, "temperature": 1e-40}, 200),
    ("repetition_penalty 1e-40", C, {**GOOD, "repetition_penalty": 1e-40}, 200),
    ("repetition_penalty 1.9e-68", C, {**GOOD, "repetition_penalty": 1.9e-68}, 200),
    ("repetition_penalty 10", C, {**GOOD, "repetition_penalty": 10}, 200),
    ("repetition_penalty tiny, greedy", C, {**GOOD, "repetition_penalty": 1e-40, "temperature": 0}, 200),
    ("min_p 1", C, {**GOOD, "min_p": 1}, 200),
    ("min_p 1e-300", C, {**GOOD, "min_p": 1e-300}, 200),
    ("top_k 1", C, {**GOOD, "top_k": 1}, 200),
    ("top_k -1 (all)", C, {**GOOD, "top_k": -1}, 200),
    ("top_k past the vocabulary", C, {**GOOD, "top_k": 10**9}, 200),
    ("penalties at their limits", C, {**GOOD, "presence_penalty": 2, "frequency_penalty": -2}, 200),
    ("every filter at once", C, {**GOOD, "temperature": 1e-30, "top_p": 1e-30, "top_k": 1, "min_p": 1,
                                 "repetition_penalty": 1e-30, "presence_penalty": -2}, 200),
    ("chat temperature 1e-40", H, {**CHAT, "temperature": 1e-40}, 200),
    ("chat top_p 1e-300", H, {**CHAT, "top_p": 1e-300}, 200),
    # values out of range, or not numbers at all
    ("temperature Infinity", C, raw(P + '"prompt": "x", "temperature": Infinity}'), 400),
    ("temperature -Infinity", C, raw(P + '"prompt": "x", "temperature": -Infinity}'), 400),
    ("temperature NaN", C, raw(P + '"prompt": "x", "temperature": NaN}'), 400),
    ("top_p NaN", C, raw(P + '"prompt": "x", "top_p": NaN}'), 400),
    ("temperature 1e400", C, raw(P + '"prompt": "x", "temperature": 1e400}'), 400),
    ("repetition_penalty 11", C, {**GOOD, "repetition_penalty": 11}, 400),
    ("repetition_penalty negative", C, {**GOOD, "repetition_penalty": -1}, 400),
    ("repetition_penalty 1e308", C, {**GOOD, "repetition_penalty": 1e308}, 400),
    ("top_k -2", C, {**GOOD, "top_k": -2}, 400),
    ("min_p negative", C, {**GOOD, "min_p": -0.1}, 400),
    ("presence_penalty NaN", C, raw(P + '"prompt": "x", "presence_penalty": NaN}'), 400),
    ("max_tokens 10**30", C, {**GOOD, "max_tokens": 10**30}, 400),
    ("chat temperature 101", H, {**CHAT, "temperature": 101}, 400),
    ("chat repetition_penalty 0", H, {**CHAT, "repetition_penalty": 0}, 400),
    # integers written as floats are integers; halves are not
    ("n 1.0", C, {**GOOD, "n": 1.0}, 200),
    ("n 2.0", C, {**GOOD, "n": 2.0}, 200),
    ("max_tokens 2.0", C, {**GOOD, "max_tokens": 2.0}, 200),
    ("seed 1.0", C, {**GOOD, "seed": 1.0}, 200),
    ("chat n 2.0", H, {**CHAT, "n": 2.0}, 200),
    ("n 1.5", C, {**GOOD, "n": 1.5}, 422),
    ("n true", C, {**GOOD, "n": True}, 422),
    ("top_k 1.5", C, {**GOOD, "top_k": 1.5}, 422),
    ("n Infinity", C, raw(P + '"prompt": "x", "n": Infinity}'), 422),
    # seeds at the edge of their range
    ("seed 2**63-1 with n 2", C, {**GOOD, "seed": 2**63 - 1, "n": 2}, 200),
    ("seed 2**63-1 with n 16", C, {**GOOD, "seed": 2**63 - 1, "n": 16}, 200),
    ("seed 0", C, {**GOOD, "seed": 0}, 200),
    ("seed -1", C, {**GOOD, "seed": -1}, 400),
    ("seed 2**63", C, {**GOOD, "seed": 2**63}, 400),
    # OpenAI fields this server does not implement: named, not ignored
    ("response_format json_object", C, {**GOOD, "response_format": {"type": "json_object"}}, 400),
    ("chat response_format json_schema", H, {**CHAT, "response_format": {"type": "json_schema"}}, 400),
    ("chat tools", H, {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400),
    ("chat tool_choice required", H, {**CHAT, "tool_choice": "required"}, 400),
    ("chat functions", H, {**CHAT, "functions": [{"name": "f"}]}, 400),
    ("chat function_call named", H, {**CHAT, "function_call": {"name": "f"}}, 400),
    ("logit_bias", C, {**GOOD, "logit_bias": {"5": 10}}, 400),
    ("chat logit_bias", H, {**CHAT, "logit_bias": {"5": -100}}, 400),
    ("chat parallel_tool_calls", H, {**CHAT, "parallel_tool_calls": True}, 400),
    ("suffix", C, {**GOOD, "suffix": "end"}, 400),
    ("chat modalities audio", H, {**CHAT, "modalities": ["audio"]}, 400),
    ("chat prediction", H, {**CHAT, "prediction": {"type": "content", "content": "x"}}, 400),
    ("response_format text (the default)", H, {**CHAT, "response_format": {"type": "text"}}, 200),
    ("tools empty", H, {**CHAT, "tools": []}, 200),
    ("tool_choice none", H, {**CHAT, "tool_choice": "none"}, 200),
    ("logit_bias empty", C, {**GOOD, "logit_bias": {}}, 200),
    ("unknown field", C, {**GOOD, "frobnicate": 3}, 200),
    # text that is not Unicode: a lone surrogate, written as JSON allows
    ("prompt lone surrogate", C, raw(P + '"prompt": "a\\ud800"}'), 400),
    ("prompt lone low surrogate", C, raw(P + '"prompt": "\\udc00b"}'), 400),
    ("prompts list with a lone surrogate", C, raw(P + '"prompt": ["ok", "a\\ud800"]}'), 400),
    ("chat content lone surrogate", H, raw(P + '"messages": [{"role": "user", "content": "a\\ud800"}]}'), 400),
    ("chat system lone surrogate", H, raw(P + '"messages": [{"role": "system", "content": "\\ud800"}, '
                                          '{"role": "user", "content": "x"}]}'), 400),
    ("chat text part lone surrogate", H, raw(P + '"messages": [{"role": "user", "content": [{"type": "text", '
                                             '"text": "\\ud800"}]}]}'), 400),
    ("tokenize lone surrogate", "/tokenize", raw('{"prompt": "a\\ud800"}'), 400),
    ("tokenize messages lone surrogate", "/tokenize", raw('{"messages": [{"role": "user", "content": "\\ud800"}]}'),
     400),
    ("model lone surrogate", C, raw('{"model": "\\ud800", "prompt": "x", "max_tokens": 2}'), 404),
    ("a surrogate pair is fine", C, raw(P + '"prompt": "a\\ud83d\\ude00"}'), 200),
    ("stop string lone surrogate", C, raw(P + '"prompt": "x", "stop": ["\\ud800"]}'), 200),
    # sizes and counts, refused before tokenising
    ("100,000 prompts", C, {**GOOD, "prompt": MANY}, 400),
    ("one prompt past the queue limit", C, {**GOOD, "prompt": ["x"] * (QUEUE + 1)}, 400),
    ("prompts x n past the queue limit", C, {**GOOD, "prompt": ["x"] * (QUEUE // 2 + 1), "n": 2}, 400),
    ("a 3.9 MB prompt", C, {**GOOD, "prompt": "y" * 3_900_000}, 400),
    ("a 3.9 MB chat message", H, {**CHAT, "messages": [{"role": "user", "content": "y" * 3_900_000}]}, 400),
    ("100,000 token ids", C, {**GOOD, "prompt": [1] * 100_000}, 400),
    ("empty token lists", C, {**GOOD, "prompt": [[], []]}, 400),
    ("prompt of exactly the context", C, {**GOOD, "prompt": [1] * CONTEXT}, 400),
    ("max_tokens one past the context", C, {**GOOD, "prompt": [1], "max_tokens": CONTEXT}, 400),
    ("max_tokens to the end of the context", C, {**GOOD, "prompt": [1], "max_tokens": CONTEXT - 1}, 200),
    ("64 prompts, a full queue's worth", C, {**GOOD, "prompt": ["x"] * 64}, 200),
    ("16 stop strings", C, {**GOOD, "stop": [f"s{i}" for i in range(16)]}, 200),
    ("a 100,000-character stop string", C, {**GOOD, "stop": ["z" * 100_000]}, 200),
    ("stop_token_ids past the vocabulary", C, {**GOOD, "stop_token_ids": [10**12]}, 200),
    ("stop_token_ids negative", C, {**GOOD, "stop_token_ids": [-1]}, 400),
    ("stop_token_ids strings", C, {**GOOD, "stop_token_ids": ["a"]}, 422),
    ("logprobs 20", C, {**GOOD, "logprobs": 20}, 200),
    ("logprobs -1", C, {**GOOD, "logprobs": -1}, 400),
    ("chat top_logprobs -1", H, {**CHAT, "logprobs": True, "top_logprobs": -1}, 400),
    ("chat top_logprobs 20", H, {**CHAT, "logprobs": True, "top_logprobs": 20}, 200),
    ("echo while streaming", C, {**GOOD, "echo": True, "stream": True}, 200),
    ("stream_options without stream", C, {**GOOD, "stream_options": {"include_usage": True}}, 200),
    ("n 16 streamed", C, {**GOOD, "n": 16, "stream": True}, 200),
    # JSON that parsers trip on
    ("JSON nested 100,000 deep", C, b"[" * 100_000 + b"]" * 100_000, 422),
    ("object nested 10,000 deep", C, b'{"a":' * 10_000 + b"1" + b"}" * 10_000, 422),
    ("duplicate keys (the last wins)", C, raw('{"model": "tiny", "prompt": "x", "max_tokens": 2, "max_tokens": 3}'),
     200),
    ("trailing garbage", C, raw('{"model": "tiny", "prompt": "x"} trailing'), 422),
    ("a bare number", C, b"5", 422),
    ("a byte-order mark (skipped)", C, b"\xef\xbb\xbf" + json.dumps(GOOD).encode(), 200),
    ("NUL bytes in the prompt", C, {**GOOD, "prompt": "a\x00b"}, 200),
    ("a 1 MB string for the model", C, {**GOOD, "model": "m" * 1_000_000}, 404),
    # messages
    ("content null", H, {**CHAT, "messages": [{"role": "user", "content": None}]}, 200),
    ("content text parts", H, {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]},
     200),
    ("content part without text", H, {**CHAT, "messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400),
    ("content part text a number", H, {**CHAT, "messages": [{"role": "user", "content": [{"type": "text",
                                                                                           "text": 5}]}]}, 400),
    ("content parts not objects", H, {**CHAT, "messages": [{"role": "user", "content": ["a"]}]}, 422),
    ("10,000 messages", H, {**CHAT, "messages": [{"role": "user", "content": "a"}] * 10_000}, 400),
    ("message extra fields", H, {**CHAT, "messages": [{"role": "user", "content": "a", "name": "x"}]}, 200),
    ("messages null", H, {**CHAT, "messages": None}, 422),
    # tokenize and detokenize
    ("tokenize both prompt and messages", "/tokenize", {"prompt": "a", "messages": [{"role": "user",
                                                                                     "content": "a"}]}, 400),
    ("tokenize neither", "/tokenize", {}, 400),
    ("tokenize unknown model", "/tokenize", {"model": "nope", "prompt": "a"}, 404),
    ("tokenize prompt a number", "/tokenize", {"prompt": 5}, 422),
    ("tokenize 3.9 MB", "/tokenize", {"prompt": "z" * 3_900_000}, 200),
    ("detokenize negative id", "/detokenize", {"tokens": [-1]}, 400),
    ("detokenize id past the vocabulary", "/detokenize", {"tokens": [10**9]}, 400),
    ("detokenize strings", "/detokenize", {"tokens": ["a"]}, 422),
    ("detokenize floats that are integers", "/detokenize", {"tokens": [65.0]}, 200),
    ("detokenize missing tokens", "/detokenize", {}, 422),
    ("detokenize 500,000 ids", "/detokenize", {"tokens": [65] * 500_000}, 200),
    ("detokenize unknown model", "/detokenize", {"model": "x", "tokens": [65]}, 404),
    # routes and methods
    ("unknown route /v1/embeddings", "/v1/embeddings", GOOD, 404),
    ("unknown route /v2/completions", "/v2/completions", GOOD, 404),
    ("POST /health", "/health", {}, 405),
    ("POST /v1/models", "/v1/models", {}, 405),
]
BODY_LIMIT = 8 << 20


def check(server, path, body, status, **kw):
    r = post(server, path, body, timeout=60, **kw)
    if status == 200:
        assert r.status_code == 200, r.text[:500]
    else:
        assert_error_shape(r, status)
    return r


@pytest.mark.parametrize("name, path, body, status", BAD + ABUSE, ids=[b[0] for b in BAD + ABUSE])
def test_each_kind_of_bad_request_gets_its_status_and_the_next_request_succeeds(server, name, path, body, status):
    check(server, path, body, status)
    assert post(server, C, GOOD).status_code == 200


def test_there_are_at_least_150_kinds():
    assert len({name for name, *_ in BAD + ABUSE}) == len(BAD + ABUSE) >= 150


METHODS_AND_KEYS = [
    ("PUT", C, KEY, 405), ("DELETE", C, KEY, 405), ("GET", "/tokenize", KEY, 405),
    ("GET", "/v1/models", None, 401), ("GET", "/v1/models", "wrong", 401), ("GET", "/metrics", None, 401),
    ("POST", "/tokenize", None, 401), ("POST", "/detokenize", None, 401), ("GET", "/openapi.json", None, 401),
    ("GET", "/docs", None, 401), ("GET", "/nowhere", None, 401), ("GET", "/health", None, 200),
]


@pytest.mark.parametrize("method, path, key, status", METHODS_AND_KEYS,
                         ids=[f"{m} {p} {k}" for m, p, k, _ in METHODS_AND_KEYS])
def test_6_the_key_guards_every_route_but_health(server, method, path, key, status):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.request(method, f"{server}{path}", headers=headers, json={"prompt": "a"})
    if status == 200:
        assert r.status_code == 200
    else:
        assert_error_shape(r, status)
    assert post(server, C, GOOD).status_code == 200


def test_6_an_unauthenticated_body_is_not_read(server):
    start = time.perf_counter()
    r = post(server, "/tokenize", {"prompt": "x" * (6 << 20)}, key=None)
    assert_error_shape(r, 401)
    for scheme in ("Basic sekret", "Bearer", f"Bearer {KEY}x", f"Token {KEY}"):
        assert_error_shape(httpx.get(f"{server}/v1/models", headers={"Authorization": scheme}), 401)
    assert httpx.get(f"{server}/v1/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    assert time.perf_counter() - start < 10


def test_6_metrics_open_only_when_the_operator_says(slow):
    assert httpx.get(f"{slow}/metrics").status_code == 200  # started with --metrics-without-key
    assert_error_shape(post(slow, "/tokenize", {"prompt": "a"}, key=None), 401)


# ---------------------------------------------------------------------------------------------
# the eleven defects, one by one


async def completion(http: httpx.AsyncClient, server, body: dict) -> httpx.Response:
    return await http.post(f"{server}{C}", json=body, headers=AUTH)


def test_1_underflowing_sampling_values_harm_nobody(server):
    bodies = [{**GOOD, "prompt": f"well formed {i}", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
              for i in range(8)]
    alone = [post(server, C, b).json()["choices"][0]["text"] for b in bodies]
    hostile = [{**GOOD, "prompt": "x", **kw} for kw in ({"temperature": 1e-40}, {"temperature": 5e-324},
                                                        {"top_p": 1e-300}, {"repetition_penalty": 1e-40},
                                                        {"repetition_penalty": 1.9e-68})]

    async def run():
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*(completion(http, server, b) for b in bodies + hostile))

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * len(responses)
    assert [r.json()["choices"][0]["text"] for r in responses[:8]] == alone
    assert all(r.json()["usage"]["completion_tokens"] == 40 for r in responses[:8])
    assert not any(wait_idle(server).values())


def tiny_llm(ckpt) -> LLM:
    return LLM(ckpt, enforce_eager=True, kv_cache_memory=4 << 20)


class Engine:
    """An EngineLoop on a thread of its own, fed from an event loop on this one."""

    def __init__(self, llm: LLM, max_queue: int = 16, **kw):
        self.loop = EngineLoop(llm, max_queue, **kw)
        self.thread = threading.Thread(target=self.loop.run, daemon=True)
        self.thread.start()
        while not self.loop.running:  # warmed up: what a test patches from here on is what it sees
            time.sleep(0.05)

    def run(self, requests) -> list[list]:
        """Submit, and return what each request received until its ending (or 10 s of silence)."""

        async def go():
            listeners = self.loop.submit(requests)
            got = [[] for _ in requests]
            for items, listener in zip(got, listeners, strict=True):
                while not items or not (isinstance(items[-1], Exception) or items[-1].finished):
                    items.append(await asyncio.wait_for(listener.outputs.get(), 10))
            await asyncio.sleep(0.2)  # anything delivered after an ending would arrive now
            assert all(listener.outputs.empty() for listener in listeners), "a second ending"
            return got

        return asyncio.run(go())

    def close(self):
        self.loop.stop()
        self.thread.join(timeout=10)


def test_2_a_failing_step_ends_every_accepted_request_once(ckpt, monkeypatch):
    llm = tiny_llm(ckpt)
    engine = Engine(llm)
    real_step, calls = llm.step, []

    def step_then_fail():
        outputs = real_step()  # some sequences finish in this step: their outputs are lost with it
        calls.append(len(outputs))
        if len(calls) == 3:
            raise RuntimeError("a bug in the step")
        return outputs

    monkeypatch.setattr(llm, "step", step_then_fail)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, output_kind="delta") for m in (2, 3, 50)]
    got = engine.run([([65, 66, 67], p) for p in params])
    endings = [items[-1] for items in got]
    assert endings[0].finished and endings[0].finish_reason == "length"  # finished before the failure
    assert all(isinstance(e, RuntimeError) and "a bug in the step" in str(e) for e in endings[1:])
    assert engine.loop.pending == 0 and not llm.has_unfinished()
    assert llm.stats["kv_blocks_used"] == 0
    engine.close()


def test_2_a_request_whose_sampling_fails_ends_alone(ckpt, monkeypatch):
    import flatstack.engine.output as llm_module

    llm = tiny_llm(ckpt)
    real_sample = llm_module.sample

    def sample(logits, params, *rest):
        if params.temperature == 0.7:
            raise RuntimeError("this request's sampler broke")
        return real_sample(logits, params, *rest)

    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = llm.generate(["first", "third"], greedy)
    monkeypatch.setattr(llm_module, "sample", sample)
    outs = llm.generate(["first", "second", "third"], [greedy, SamplingParams(temperature=0.7, max_tokens=12), greedy])
    assert outs[1].finish_reason == "error" and "sampler broke" in outs[1].error
    assert [outs[0].text, outs[2].text] == [o.text for o in alone]
    assert llm.stats["kv_blocks_used"] == 0 and not llm.has_unfinished()


def chunks(total: int, size: int = 1 << 20):
    for _ in range(total // size):
        yield b"x" * size


async def achunks(total: int, size: int = 1 << 20):
    for _ in range(total // size):
        yield b"x" * size


def send_chunked(server, path: str, total: int) -> int | None:
    """The status of a chunked body of `total` bytes, or None if the server closed on us mid-body."""
    try:
        r = httpx.post(f"{server}{path}", content=chunks(total), headers={**AUTH, "content-type": "application/json"},
                       timeout=60)
        return r.status_code
    except httpx.TransportError:
        return None


@pytest.mark.parametrize("path, total", [(C, 256 << 20), ("/tokenize", 20 << 20)])
def test_3_chunked_bodies_obey_the_limit_while_read(server, path, total):
    before, start = rss_bytes(server.pid), time.perf_counter()
    assert send_chunked(server, path, total) in (413, None)
    assert time.perf_counter() - start < 10  # not read whole: 256 MB would take longer, and the memory
    assert rss_bytes(server.pid) - before < BODY_LIMIT + (32 << 20)
    assert post(server, C, GOOD).status_code == 200


def test_4_a_plain_request_whose_client_leaves_is_aborted_within_a_second(slow):
    body = {**GOOD, "n": 4, "max_tokens": 240, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        post(slow, C, body, timeout=1.5)  # the client gives up and closes its connection
    left = time.perf_counter()
    while any(idle(slow).values()):
        assert time.perf_counter() - left < 1.5, idle(slow)
        time.sleep(0.05)
    assert post(slow, C, GOOD).status_code == 200


def test_5_a_stream_that_fails_after_it_started_ends_with_an_error_event_and_done(ckpt, monkeypatch):
    llm = tiny_llm(ckpt)
    app = create_app(llm, ServerConfig(served_model_name=MODEL))
    engine = app.state.served.engine
    thread = threading.Thread(target=engine.run, daemon=True)
    thread.start()
    real_run, calls = llm.runner.run, []

    def run_then_fail(scheduled):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("the device fell over")
        return real_run(scheduled)

    while not engine.running:
        time.sleep(0.05)
    monkeypatch.setattr(llm.runner, "run", run_then_fail)

    async def stream():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            # logprobs: every token then makes an event, even one whose text is held back (a partial character)
            body = {**GOOD, "max_tokens": 50, "stream": True, "ignore_eos": True, "logprobs": 1}
            r = await http.post(C, json=body)
            return r.status_code, [line for line in r.text.split("\n") if line]

    status, lines = asyncio.run(stream())
    assert status == 200  # the stream had started
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert "the device fell over" in error["message"] and error["type"] == "internal_error"
    assert len(lines) > 2  # tokens came before the failure
    assert engine.pending == 0
    engine.stop()
    thread.join(timeout=10)


def test_7_outputs_carry_what_is_new_not_everything_so_far(ckpt):
    llm = tiny_llm(ckpt)
    n = 60
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=20)
    delta = [o for o in llm.stream("x", SamplingParams(**{**vars(params), "output_kind": "delta"}))]
    assert sum(len(o.token_ids) for o in delta) == n  # not n * (n + 1) / 2
    assert sum(len(o.logprobs) for o in delta) == n
    whole = list(llm.stream("x", params))[-1]
    assert "".join(o.text for o in delta) == whole.text
    assert [lp.token_id for o in delta for lp in o.logprobs] == whole.token_ids
    final = [o for o in llm.stream("x", SamplingParams(**{**vars(params), "output_kind": "final"}))]
    assert len(final) == 1 and final[0].text == whole.text


def test_7_a_stream_whose_reader_stalls_is_dropped(ckpt):
    llm = tiny_llm(ckpt)
    engine = Engine(llm, slow_reader_timeout=0.0)

    async def go():
        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True, output_kind="delta")
        [listener] = engine.loop.submit([(llm.check_request("x", params), params)])
        deadline = time.monotonic() + 10
        while engine.loop.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # reads nothing
        items = []
        while not listener.outputs.empty():
            items.append(listener.outputs.get_nowait())
        return items

    items = asyncio.run(go())
    assert isinstance(items[-1], RuntimeError) and "read nothing" in str(items[-1])
    assert len(items) < 200 and engine.loop.pending == 0 and llm.stats["kv_blocks_used"] == 0
    engine.close()


def health_stalls(server, action) -> tuple[float, object]:
    """The longest /health answer while `action()` runs, and its result."""
    worst, done = [0.0], threading.Event()

    def probe():
        with httpx.Client() as http:
            while not done.is_set():
                start = time.perf_counter()
                http.get(f"{server}/health")
                worst[0] = max(worst[0], time.perf_counter() - start)
                time.sleep(0.02)

    thread = threading.Thread(target=probe)
    thread.start()
    try:
        result = action()
    finally:
        done.set()
        thread.join()
    return worst[0], result


@pytest.mark.parametrize("body", [{**GOOD, "prompt": MANY}, {**GOOD, "prompt": "y" * 3_900_000},
                                  {**GOOD, "prompt": "y " * 1_500_000}], ids=["100k prompts", "3.9 MB", "3 MB words"])
def test_8_checks_that_cost_time_do_not_stall_the_server(server, body):
    worst, r = health_stalls(server, lambda: post(server, C, body, timeout=60))
    assert_error_shape(r, 400)
    assert worst < 0.5, worst


def test_9_lone_surrogates_are_a_400_naming_the_field(server):
    for path, text, param in [(C, P + '"prompt": "a\\ud800"}', "prompt"),
                              (H, P + '"messages": [{"role": "user", "content": "a\\ud800"}]}', "messages"),
                              ("/tokenize", '{"prompt": "a\\ud800"}', "prompt")]:
        r = post(server, path, raw(text))
        assert_error_shape(r, 400)
        assert r.json()["error"]["param"] == param


def connect(server) -> socket.socket:
    host, port = server.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=TIMEOUT + 5)


def closed_within(sock: socket.socket, seconds: float) -> bytes:
    """What the server sent before closing; fails if it did not close in time."""
    sock.settimeout(seconds)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def test_10_idle_and_half_sent_connections_are_closed(server):
    idle_sock = connect(server)
    half = connect(server)
    half.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: app")
    short = connect(server)
    short.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                  "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\": \"t".encode())
    start = time.perf_counter()
    assert closed_within(idle_sock, TIMEOUT + 3) == b""
    assert closed_within(half, TIMEOUT + 3) == b""
    answer = closed_within(short, TIMEOUT + 3)
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
    assert time.perf_counter() - start < TIMEOUT + 3
    for s in (idle_sock, half, short):
        s.close()
    assert post(server, C, GOOD).status_code == 200


def test_10_open_connections_are_capped(server):
    socks = [connect(server) for _ in range(MAX_CONNECTIONS)]
    try:
        assert httpx.get(f"{server}/health").status_code == 503  # over the cap
    finally:
        for s in socks:
            s.close()
    time.sleep(0.2)
    assert httpx.get(f"{server}/health").status_code == 200


def test_11_seed_n_and_unsupported_fields(server):
    r = post(server, C, {**GOOD, "seed": 2**63 - 1, "n": 2, "max_tokens": 8, "ignore_eos": True}).json()
    again = post(server, C, {**GOOD, "seed": 2**63 - 1, "n": 2, "max_tokens": 8, "ignore_eos": True}).json()
    assert [c["text"] for c in r["choices"]] == [c["text"] for c in again["choices"]]
    assert post(server, C, {**GOOD, "n": 1.0}).status_code == 200
    for field, value in [("response_format", {"type": "json_object"}), ("tools", [{"type": "function"}]),
                         ("logit_bias", {"1": 5})]:
        r = post(server, H, {**CHAT, field: value})
        assert_error_shape(r, 400)
        assert r.json()["error"]["param"] == field and field in r.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------
# load


PROMPTS = [f"load prompt {i}: " + "abc" * (i % 5) for i in range(8)]
LENGTHS = [12, 24, 48]


async def hostile_requests(server: ServerURL, http: httpx.AsyncClient) -> list:
    """One of each defect's request, a second apart; returns what each got (status or None)."""

    async def stalled_connection():
        host, port = server.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        await reader.read()  # until the server closes it
        writer.close()

    async def leaving(body, after):
        try:
            await http.post(f"{server}{C}", json=body, headers=AUTH, timeout=after)
        except httpx.TimeoutException:
            return None

    async def stream_and_leave(body):
        async with http.stream("POST", f"{server}{C}", json=body, headers=AUTH) as r:
            async for _ in r.aiter_lines():
                await asyncio.sleep(0.05)  # a slow reader that leaves early
                return r.status_code

    async def status(coro):
        try:
            r = await coro
        except httpx.TransportError:
            return None
        return r if r is None or isinstance(r, int) else r.status_code

    def p(body, key=KEY, path=C, **kw):
        headers = {"Authorization": f"Bearer {key}", "content-type": "application/json"} if key else {}
        return http.post(f"{server}{path}", headers=headers, **({"json": body} if not isinstance(body, bytes)
                                                                  else {"content": body}), **kw)

    kinds = [
        lambda: p({**GOOD, "prompt": "x", "temperature": 1e-40}),
        lambda: p({**GOOD, "repetition_penalty": 1e-40, "top_p": 1e-300, "temperature": 0.5}),
        lambda: http.post(f"{server}/tokenize", content=achunks(20 << 20), headers=AUTH),
        lambda: leaving({**GOOD, "n": 4, "max_tokens": 200, "ignore_eos": True}, 0.3),
        lambda: stream_and_leave({**GOOD, "n": 2, "max_tokens": 200, "stream": True, "ignore_eos": True}),
        lambda: p({"prompt": "z" * (5 << 20)}, key=None, path="/tokenize"),
        lambda: stream_and_leave({**GOOD, "max_tokens": 200, "stream": True, "logprobs": 20, "ignore_eos": True}),
        lambda: p({**GOOD, "prompt": MANY}),
        lambda: p(raw(P + '"prompt": "a\\ud800"}')),
        stalled_connection,
        lambda: p({**GOOD, "seed": 2**63 - 1, "n": 2, "response_format": {"type": "json_object"}}),
    ]
    tasks = []
    for kind in kinds:
        tasks.append(asyncio.ensure_future(status(kind())))
        await asyncio.sleep(1.0)
    return await asyncio.gather(*tasks)


def test_mixed_load_with_a_hostile_request_every_second(server):
    greedy = {"temperature": 0, "ignore_eos": True}
    alone = {(p, n): post(server, C, {**GOOD, "prompt": p, "max_tokens": n, **greedy}).json()["choices"][0]["text"]
             for p in PROMPTS for n in LENGTHS}

    async def worker(http, i, stop, done):
        j = 0
        while not stop.is_set() or j == 0:
            prompt, n = PROMPTS[(i + j) % len(PROMPTS)], LENGTHS[(i * 7 + j) % len(LENGTHS)]
            body = {**GOOD, "prompt": prompt, "max_tokens": n, **greedy}
            if (i + j) % 2:
                r = await http.post(f"{server}{C}", json=body, headers=AUTH)
                assert r.status_code == 200, r.text
                out = r.json()
                text, tokens = out["choices"][0]["text"], out["usage"]["completion_tokens"]
            else:
                text, tokens = "", None
                body = {**body, "stream": True, "stream_options": {"include_usage": True}}
                async with http.stream("POST", f"{server}{C}", json=body, headers=AUTH) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            chunk = json.loads(line[6:])
                            assert "error" not in chunk, chunk
                            text += "".join(c["text"] for c in chunk["choices"])
                            tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
            assert (text, tokens) == (alone[prompt, n], n), (prompt, n)
            done.append(1)
            j += 1

    async def load(hostile: bool):
        # a client lets idle connections go well before the server closes them: on two busy cores a response can
        # wait a second in the client's loop, and a connection reused as the server closes it fails the request
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=80, keepalive_expiry=1.0)
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            stop, done = asyncio.Event(), []
            workers = [asyncio.ensure_future(worker(http, i, stop, done)) for i in range(64)]
            got = await hostile_requests(server, http) if hostile else None
            stop.set()
            await asyncio.gather(*workers)
            return len(done), got

    asyncio.run(load(hostile=False))  # the allocator's pools and the tokenizer's caches warmed
    assert not any(wait_idle(server).values())
    before = rss_bytes(server.pid)
    completed, hostile = asyncio.run(load(hostile=True))
    assert completed >= 64
    assert hostile[7] == 400 and hostile[8] == 400 and hostile[5] == 401 and hostile[10] == 400, hostile
    assert idle(server) == {name: 0 for name in idle(server)} or not any(wait_idle(server).values())
    after = rss_bytes(server.pid)
    print(f"load: {completed} well-formed requests, hostile {hostile}, rss {before >> 20} -> {after >> 20} MiB")
    assert abs(after - before) <= 0.1 * before, (before, after)
    assert metric(server, "flatstack_num_requests_running") == 0
