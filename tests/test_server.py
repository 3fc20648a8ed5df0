"""`flatstack serve` as a real process on loopback, driven by the official openai client and raw HTTP: the
API's shapes, streaming, concurrency, disconnecting clients, and bad input of every kind."""

import asyncio
import json
import os
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai import APIStatusError, AsyncOpenAI, OpenAI
from serving import (
    CHAT,
    CONTEXT,
    GOOD,
    KEY,
    MODEL,
    C,
    H,
    assert_error_shape,
    metric,
    post,
    running_server,
    tiny_checkpoint,
    wait_idle,
)

from flatstack.tokenizer import byte_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def slow_checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("slow"), d_model=512, n_layers=8, ffn_dim=2048)


@pytest.fixture(scope="module")
def server(checkpoint):
    with running_server(checkpoint, "--max-num-seqs", "32") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def kv_used(server) -> int:
    return int(metric(server, "flatstack_kv_blocks_used"))


GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}


def test_completion_usage_and_lengths(client):
    out = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=12, **GREEDY)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len("Hello there") and out.usage.completion_tokens == 12
    assert out.usage.total_tokens == len("Hello there") + 12
    # a list of prompts, and token ids as a prompt: the same text either way
    ids = byte_tokenizer().encode("Hello there").ids
    for prompt in ([ids, ids], ids, ["Hello there", "Hello there"]):
        many = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, **GREEDY)
        assert [c.text for c in many.choices] == [out.choices[0].text] * len(many.choices)
        assert [c.index for c in many.choices] == list(range(len(many.choices)))


def test_chat_completion(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10, **GREEDY)
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert out.usage.completion_tokens == 10
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, **GREEDY)
    assert again.choices[0].message.content == choice.message.content
    assert again.usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again: its blocks are cached


def test_n_and_seed_reproducibility(client):
    kw = dict(model=MODEL, prompt="Once", max_tokens=16, temperature=1.0, n=3, seed=11,
              extra_body={"ignore_eos": True})
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert len(a.choices) == 3 and [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # each choice has its own stream of randomness
    c = client.completions.create(**{**kw, "seed": 12})
    assert [x.text for x in c.choices] != [x.text for x in a.choices]


def test_stop_strings(client):
    free = client.completions.create(model=MODEL, prompt="abc", max_tokens=40, **GREEDY).choices[0].text
    stop = free[15:17]
    cut = client.completions.create(model=MODEL, prompt="abc", max_tokens=40, stop=[stop], **GREEDY).choices[0]
    assert cut.finish_reason == "stop" and cut.text == free[: free.find(stop)]


def test_logprobs(client):
    out = client.completions.create(model=MODEL, prompt="log", max_tokens=5, logprobs=2, **GREEDY).choices[0]
    lp = out.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) == 2 for t in lp.top_logprobs)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                          logprobs=True, top_logprobs=3, **GREEDY).choices[0]
    assert len(chat.logprobs.content) == 4 and all(len(t.top_logprobs) == 3 for t in chat.logprobs.content)
    # greedy: the chosen token is the most likely one
    assert all(t.top_logprobs[0].logprob == pytest.approx(t.logprob) for t in chat.logprobs.content)


def test_streamed_text_equals_non_streamed(client):
    whole = client.completions.create(model=MODEL, prompt="Stream", max_tokens=30, **GREEDY)
    chunks = list(client.completions.create(model=MODEL, prompt="Stream", max_tokens=30, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    messages = [{"role": "user", "content": "Stream"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, **GREEDY)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, stream=True,
                                                 **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content


def test_raw_stream_ends_with_done(server):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 3, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_64_concurrent_streams_complete_and_match_alone(server, client):
    prompts = [f"request {i}: " + "xyz" * (i % 7) for i in range(64)]
    lengths = [8 + i % 9 for i in range(64)]
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=n, **GREEDY).choices[0].text
             for p, n in zip(prompts, lengths, strict=True)]

    async def one(aclient, prompt, n):
        stream = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=n, stream=True,
                                                  stream_options={"include_usage": True}, **GREEDY)
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
            usage = chunk.usage or usage
        return text, usage.completion_tokens

    async def run():
        aclient = AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=300)
        return await asyncio.gather(*(one(aclient, p, n) for p, n in zip(prompts, lengths, strict=True)))

    results = asyncio.run(run())
    assert [n for _, n in results] == lengths
    assert [t for t, _ in results] == alone
    assert kv_used(server) == 0


def test_clients_that_disconnect_leave_the_pool_as_it_was(server, client):
    before = kv_used(server)

    async def leave(http):
        body = {"model": MODEL, "prompt": "leave early " * 5, "max_tokens": 200, "stream": True, "ignore_eos": True}
        async with http.stream("POST", f"{server}/v1/completions", json=body,
                               headers={"Authorization": f"Bearer {KEY}"}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: ") and '"text": ""' not in line:
                    return  # one token in: hang up

    async def run():
        async with httpx.AsyncClient(timeout=300) as http:
            await asyncio.gather(*(leave(http) for _ in range(100)))

    asyncio.run(run())
    deadline = time.time() + 60
    while kv_used(server) != before and time.time() < deadline:
        time.sleep(0.2)
    assert kv_used(server) == before
    assert client.completions.create(model=MODEL, prompt="still here", max_tokens=4, **GREEDY).choices[0].text


def test_tokenize_detokenize(server):
    h = {"Authorization": f"Bearer {KEY}"}
    ids = httpx.post(f"{server}/tokenize", json={"prompt": "héllo"}, headers=h).json()
    assert ids["tokens"] == byte_tokenizer().encode("héllo").ids
    assert ids["count"] == 6 and ids["max_model_len"] == CONTEXT
    text = httpx.post(f"{server}/detokenize", json={"tokens": ids["tokens"]}, headers=h).json()
    assert text == {"prompt": "héllo"}
    chat = httpx.post(f"{server}/tokenize", json={"messages": [{"role": "user", "content": "a"}]}, headers=h).json()
    assert chat["count"] > 1


def test_metrics_exposition(server, client):
    client.completions.create(model=MODEL, prompt="m", max_tokens=3, **GREEDY)
    text = httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in ("flatstack_requests_total{status=\"200\"}", "flatstack_prompt_tokens_total",
                 "flatstack_generation_tokens_total", "flatstack_num_requests_running",
                 "flatstack_num_requests_waiting", "flatstack_kv_blocks_used", "flatstack_kv_blocks_free",
                 "flatstack_prefix_cache_hit_rate", "flatstack_time_to_first_token_seconds_bucket",
                 "flatstack_inter_token_latency_seconds_count"):
        assert name in text, name


# ---------------------------------------------------------------------------------------------
# bad input

BAD = [
    # (name, path, body: dict, or bytes sent as they are, expected status)
    ("truncated json", C, b'{"model": "tiny", "prompt": ', 422),
    ("not json", C, b"not json at all", 422),
    ("empty body", C, b"", 422),
    ("json array", C, b"[]", 422),
    ("json string", C, b'"prompt"', 422),
    ("json null", C, b"null", 422),
    ("invalid utf-8", C, b'{"model": "tiny", "prompt": "\xff\xfe"}', 422),
    ("model number", C, {**GOOD, "model": 5}, 422),
    ("prompt number", C, {**GOOD, "prompt": 5}, 422),
    ("prompt floats", C, {**GOOD, "prompt": [1.5, 2.5]}, 422),
    ("prompt object", C, {**GOOD, "prompt": {"a": 1}}, 422),
    ("max_tokens string", C, {**GOOD, "max_tokens": "10"}, 422),
    ("max_tokens float", C, {**GOOD, "max_tokens": 1.5}, 422),
    ("temperature string", C, {**GOOD, "temperature": "hot"}, 422),
    ("temperature list", C, {**GOOD, "temperature": [1]}, 422),
    ("top_p string", C, {**GOOD, "top_p": "x"}, 422),
    ("n string", C, {**GOOD, "n": "2"}, 422),
    ("stream string", C, {**GOOD, "stream": "yes"}, 422),
    ("stop number", C, {**GOOD, "stop": 5}, 422),
    ("stop numbers", C, {**GOOD, "stop": [1, 2]}, 422),
    ("seed string", C, {**GOOD, "seed": "1"}, 422),
    ("logprobs string", C, {**GOOD, "logprobs": "3"}, 422),
    ("echo string", C, {**GOOD, "echo": "true"}, 422),
    ("stream_options number", C, {**GOOD, "stream_options": 5}, 422),
    ("include_usage string", C, {**GOOD, "stream_options": {"include_usage": "yes"}}, 422),
    ("missing model", C, {"prompt": "ok"}, 422),
    ("missing prompt", C, {"model": MODEL}, 422),
    ("negative max_tokens", C, {**GOOD, "max_tokens": -1}, 400),
    ("zero max_tokens", C, {**GOOD, "max_tokens": 0}, 400),
    ("huge max_tokens", C, {**GOOD, "max_tokens": 10**9}, 400),
    ("n zero", C, {**GOOD, "n": 0}, 400),
    ("n 10000", C, {**GOOD, "n": 10000}, 400),
    ("negative temperature", C, {**GOOD, "temperature": -1}, 400),
    ("huge temperature", C, {**GOOD, "temperature": 1000}, 400),
    ("top_p zero", C, {**GOOD, "top_p": 0}, 400),
    ("top_p above one", C, {**GOOD, "top_p": 1.5}, 400),
    ("negative top_k", C, {**GOOD, "top_k": -5}, 400),
    ("min_p above one", C, {**GOOD, "min_p": 2}, 400),
    ("presence_penalty out of range", C, {**GOOD, "presence_penalty": 5}, 400),
    ("frequency_penalty out of range", C, {**GOOD, "frequency_penalty": -5}, 400),
    ("repetition_penalty zero", C, {**GOOD, "repetition_penalty": 0}, 400),
    ("logprobs too many", C, {**GOOD, "logprobs": 50}, 400),
    ("empty prompt", C, {**GOOD, "prompt": ""}, 400),
    ("empty prompt list", C, {**GOOD, "prompt": []}, 400),
    ("token id beyond vocabulary", C, {**GOOD, "prompt": [999999]}, 400),
    ("negative token id", C, {**GOOD, "prompt": [-1]}, 400),
    ("prompt longer than the context", C, {**GOOD, "prompt": "x" * (CONTEXT + 10)}, 400),
    ("empty stop string", C, {**GOOD, "stop": [""]}, 400),
    ("too many stop strings", C, {**GOOD, "stop": [f"s{i}" for i in range(17)]}, 400),
    ("seed too large", C, {**GOOD, "seed": 2**70}, 400),
    ("echo with logprobs", C, {**GOOD, "echo": True, "logprobs": 1}, 400),
    ("unknown model", C, {**GOOD, "model": "gpt-9"}, 404),
    ("unknown role", H, {**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, 422),
    ("empty messages", H, {**CHAT, "messages": []}, 422),
    ("messages not a list", H, {**CHAT, "messages": "hi"}, 422),
    ("message without role", H, {**CHAT, "messages": [{"content": "hi"}]}, 422),
    ("content a number", H, {**CHAT, "messages": [{"role": "user", "content": 5}]}, 422),
    ("content an image part", H, {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400),
    ("top_logprobs too many", H, {**CHAT, "logprobs": True, "top_logprobs": 50}, 400),
    ("logprobs a string", H, {**CHAT, "logprobs": "yes"}, 422),
    ("chat huge max_completion_tokens", H, {**CHAT, "max_completion_tokens": 10**6}, 400),
    ("chat unknown model", H, {**CHAT, "model": "nope"}, 404),
    ("unknown route", "/v1/engines", {}, 404),
]


@pytest.mark.parametrize("name, path, body, status", BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_its_status_and_the_server_goes_on(server, name, path, body, status):
    r = post(server, path, body)
    assert_error_shape(r, status)
    assert post(server, C, GOOD).status_code == 200


def test_bad_value_errors_name_the_field(server):
    error = post(server, C, {**GOOD, "top_p": 1.5}).json()["error"]
    assert error["param"] == "top_p" and "(0, 1]" in error["message"]
    error = post(server, C, {**GOOD, "temperature": "hot"}).json()["error"]
    assert error["param"] == "temperature"


def test_keys_bodies_and_methods(server):
    assert_error_shape(post(server, C, GOOD, key=None), 401)
    assert_error_shape(post(server, C, GOOD, key="wrong"), 401)
    assert_error_shape(post(server, C, {**GOOD, "prompt": "x" * (50 << 20)}), 413)
    assert_error_shape(httpx.get(f"{server}{C}", headers={"Authorization": f"Bearer {KEY}"}), 405)
    with pytest.raises(APIStatusError) as e:
        OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    assert e.value.status_code == 401
    assert post(server, C, GOOD).status_code == 200


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                                      max_size=4), max_leaves=12)
FIELDS = ["prompt", "messages", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "logprobs",
          "echo", "stream", "top_k", "min_p", "stream_options", "max_completion_tokens", "top_logprobs"]


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "60")), deadline=None,
          suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from([C, H]),
       body=st.fixed_dictionaries({"model": st.just(MODEL)},
                                  optional={f: JSON for f in FIELDS}).map(lambda d: {**d, "max_tokens": 3}
                                                                          if "max_tokens" not in d else d))
def test_fuzzed_requests_never_break_the_server(server, path, body):
    try:
        r = post(server, path, json.loads(json.dumps(body, allow_nan=True)), timeout=60)
    except ValueError:
        return  # not encodable as JSON at all (NaN is allowed; nothing else is)
    assert r.status_code in (200, 400, 404, 413, 422), (r.status_code, r.text)
    if r.status_code != 200:
        assert_error_shape(r, r.status_code)
    assert httpx.get(f"{server}/health").status_code == 200


def test_bench_serve_reports_vllm_metrics(server):
    from flatstack.bench_serve import bench_serve

    report = bench_serve(server, [1, 3], num_prompts=6, prompt_range=(4, 20), output_range=(3, 8), api_key=KEY)
    assert [r["max_concurrency"] for r in report["runs"]] == [1, 3]
    for run in report["runs"]:
        assert run["completed"] == 6 and run["failed"] == 0
        assert run["output_tokens_per_s"] > 0 and run["request_throughput"] > 0
        for name in ("ttft_ms", "tpot_ms", "itl_ms"):
            assert 0 < run[name]["median"] <= run[name]["p99"]
    assert report["runs"][0]["output_tokens_per_s_ratio_to_first"] == 1.0


def test_past_the_queue_limit_requests_get_503_and_retry_after(slow_checkpoint):
    with running_server(slow_checkpoint, "--max-queue", "2", "--max-num-seqs", "1") as url:
        assert_error_shape(post(url, C, {**GOOD, "n": 3}), 400)  # can never fit: not a retry later
        body = {**GOOD, "n": 2, "max_tokens": 200, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{url}{C}", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # kept: a generator dropped here would close the stream
            next(lines)  # both sequences are in: the queue is full
            full = post(url, C, GOOD)
            assert_error_shape(full, 503)
            assert full.headers["retry-after"] == "1"
            stream = post(url, C, {**GOOD, "stream": True})  # a stream is refused before it starts
            assert_error_shape(stream, 503)
        assert not any(wait_idle(url).values())  # the stream's client left: its slots came back
        assert post(url, C, {**GOOD, "n": 2}).status_code == 200


def test_served_by_the_c_decode_step_from_the_first_request(checkpoint):
    """A dense float32 model decodes through the C step from its first request (nothing compiles first;
    /metrics names the path), with the greedy text of the eager torch path."""
    from flatstack import LLM, SamplingParams

    body = {**GOOD, "prompt": "early", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    with running_server(checkpoint) as url:
        answer = post(url, C, body)
        text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert answer.status_code == 200 and 'flatstack_decode_path{path="native"} 1.0' in text
    eager = LLM(checkpoint, enforce_eager=True, kv_cache_memory=4 << 20)
    want = eager.generate(["early"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].text
    assert answer.json()["choices"][0]["text"] == want
