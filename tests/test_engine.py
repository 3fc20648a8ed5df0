"""The engine on small random models: the same answers as the contiguous-cache reference, whatever the
batching (alone, in a mixed batch, chunked, preempted, served from the prefix cache); sampling
parameters; streaming; the pool's accounting; bad requests refused without disturbing the others."""

import json
import math
import threading
import time

import pytest
import torch

from flatstack import LLM, SamplingParams
from flatstack.engine import RequestError, decode_graphs
from flatstack.engine.cuda_graphs import buckets
from flatstack.engine.decode_graphs import group_size
from flatstack.engine.native_decode import NativeDecode
from flatstack.engine.runner import ModelRunner
from flatstack.engine.sampling import apply_penalties, filter_logits
from flatstack.generate import generate
from flatstack.model import ModelConfig, Transformer, preset
from flatstack.tokenizer import byte_tokenizer

TOK = byte_tokenizer()
SMALL = dict(vocab_size=TOK.get_vocab_size(), d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=8,
             ffn_dim=96, max_seq_len=256)
CONFIGS = {
    "llama": ModelConfig(**SMALL),
    "grok": preset("grok-1-tiny", vocab_size=TOK.get_vocab_size()),  # soft cap, sandwich norms, MoE
    "window": ModelConfig(**SMALL, sliding_window=7),
    # dense, so its decode steps run through the compiled blocks: soft cap and Grok's four norms there
    "softcap": ModelConfig(**SMALL, attn_logit_softcap=30.0, norm_layout="sandwich", activation="gelu_tanh"),
}
PROMPTS = ["Hello there, how", "a", "The quick brown fox jumps over the lazy dog, and then it " * 2,
           "0123456789" * 5, "xyz"]


def engine(name="llama", **kw) -> LLM:
    model = Transformer(CONFIGS[name]).init_weights(seed=1, std=0.2).eval()
    return LLM(model, TOK, **kw)


def reference(llm: LLM, prompt: str, n: int) -> list[int]:
    return generate(llm.model, TOK.encode(prompt).ids, n, temperature=0, stop_ids=llm.eos_ids)


GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_equals_the_contiguous_cache_reference(name):
    # a small step budget: long prompts are prefilled in chunks beside other sequences' decodes
    llm = engine(name, max_num_batched_tokens=32)
    outs = llm.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.token_ids == reference(llm, prompt, 24), prompt
        assert out.finish_reason == "length"


@pytest.fixture
def compiled_blocks(monkeypatch):
    """The compiled decode blocks serve the CPU models the C decode step does not (float16 ones); here
    the float32 test models are sent to them."""
    monkeypatch.setattr(NativeDecode, "supports", staticmethod(lambda model, dtype: False))
    return monkeypatch


def test_eager_decode_equals_the_c_step_and_the_compiled_blocks(compiled_blocks):
    """--enforce-eager (every block called eagerly, keys and values written before attending), the C
    decode step, and the compiled decode blocks (attending around the pool, written after the step) give
    the same tokens."""
    eager, compiled = engine(enforce_eager=True), engine()
    compiled_blocks.undo()
    c_step = engine()
    assert c_step.decode_path == "native"
    for a, b in zip(eager.generate(PROMPTS, GREEDY), c_step.generate(PROMPTS, GREEDY), strict=True):
        assert a.token_ids == b.token_ids
    compiled.warm_up(wait=True)
    assert compiled.decode_path == "compiled" and eager.decode_path == "eager"
    for a, b in zip(eager.generate(PROMPTS, GREEDY), compiled.generate(PROMPTS, GREEDY), strict=True):
        assert a.token_ids == b.token_ids


@pytest.mark.parametrize("name", ["softcap", "grok"])
def test_the_gpu_runner_paths_equal_the_reference_on_the_cpu(name):
    """The GPU runner's two paths, run on the CPU: decode steps from the CUDA graphs' static buffers
    (eagerly, padded to a bucket, the padding writing into the scratch block), and the prompt chunks of
    several sequences packed into one FlexAttention call. The MoE (float32: not graph-safe) takes the
    packed prefill only."""
    for thread in threading.enumerate():  # an earlier test's decode graphs still compiling: torch's tracing
        if thread.name == "flatstack-compile":  # state is global, and create_block_mask traces too
            thread.join()
    llm = engine(name, max_num_batched_tokens=32, max_num_seqs=5, enforce_eager=True)
    llm.runner = runner = ModelRunner(llm.model, len(llm.blocks.blocks), llm.config.block_size, max_num_seqs=5,
                                      gpu_paths=True)
    assert runner.packed and (runner.graphed is None) == (name == "grok")
    if runner.graphed is not None:
        assert runner.graphed.sizes == [1, 2, 4, 5] and runner.decode_path == "eager"  # nothing captured here
    outs = llm.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.token_ids == reference(llm, prompt, 24), prompt


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["softcap", "grok"])
def test_the_engine_on_a_gpu_equals_the_reference(name):
    """On a GPU, float32: decode steps replayed from captured CUDA graphs through the Triton paged decode
    kernel, prompt chunks packed; the contiguous-cache reference's tokens on the same card."""
    model = Transformer(CONFIGS[name]).init_weights(seed=1, std=0.2).eval().cuda()
    llm = LLM(model, TOK, max_num_batched_tokens=32, max_num_seqs=5)
    llm.warm_up(wait=True)
    assert llm.decode_path == ("eager" if name == "grok" else "cuda_graphs")
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, GREEDY), strict=True):
        assert out.token_ids == reference(llm, prompt, 24), prompt


def test_cuda_graph_buckets():
    assert buckets(1) == [1] and buckets(8) == [1, 2, 4, 8] and buckets(30) == [1, 2, 4, 8, 16, 24, 30]


def test_requests_are_served_while_the_graphs_compile(compiled_blocks):
    """Before the decode graphs exist, decode steps run eagerly: the first tokens do not wait for the
    compiler, and they are the tokens the compiled steps give."""
    llm = engine()
    started = time.perf_counter()
    first = llm.generate(PROMPTS[:2], GREEDY)
    assert llm.decode_path in ("compiling", "compiled")
    if llm.decode_path == "compiling":  # nearly always: compiling takes seconds, these steps milliseconds
        assert time.perf_counter() - started < 60
    llm.warm_up(wait=True)
    assert [o.token_ids for o in llm.generate(PROMPTS[:2], GREEDY)] == [o.token_ids for o in first]


def test_group_size_divides_the_layers():
    assert [group_size(n) for n in (30, 32, 24, 2, 7)] == [6, 4, 6, 2, 1]


def test_compiled_groups_follow_each_layer_and_share_its_weights(monkeypatch, compiled_blocks):
    """Several groups of several blocks (4 layers in groups of 2): the tokens of eager decoding, and every
    block's weights views of the stacked tensors the groups read, not copies."""
    monkeypatch.setattr(decode_graphs, "GROUP", 2)
    cfg = ModelConfig(**{**SMALL, "n_layers": 4})
    eager = LLM(Transformer(cfg).init_weights(seed=3, std=0.2).eval(), TOK, enforce_eager=True)
    compiled = LLM(Transformer(cfg).init_weights(seed=3, std=0.2).eval(), TOK)
    compiled.warm_up(wait=True)
    for a, b in zip(eager.generate(PROMPTS, GREEDY), compiled.generate(PROMPTS, GREEDY), strict=True):
        assert a.token_ids == b.token_ids
    groups = compiled.runner.graphs.groups
    assert len(groups) == 2
    for g, (weights, _, _) in enumerate(groups):
        for i in range(2):
            layer = compiled.model.layers[2 * g + i]
            for name, stacked in weights.items():
                mine = layer.get_parameter(name) if name.endswith("norm.weight") else layer.get_buffer(name)
                assert mine.data_ptr() == stacked[i].data_ptr(), name


def mixed_batch(target: str) -> tuple[list, list]:
    prompts = [target] + [f"request {i}: " + "abc" * i for i in range(15)]
    params = [GREEDY] + [SamplingParams(temperature=0.9, top_k=20, top_p=0.9, max_tokens=8 + i, seed=i,
                                        ignore_eos=True) for i in range(15)]
    return prompts, params


def test_answers_do_not_depend_on_batching():
    target = "The quick brown fox jumps over the lazy dog"
    alone = engine().generate(target, GREEDY)[0].token_ids
    # in a batch of 16 mixed requests
    prompts, params = mixed_batch(target)
    assert engine().generate(prompts, params)[0].token_ids == alone
    # after preemption: a pool too small for all 16 at once
    small = engine(kv_cache_memory=40 * 16 * 2 * 2 * 2 * 8 * 4, block_size=16)
    outs = small.generate(prompts, params)
    assert small.scheduler.num_preemptions > 0
    assert outs[0].token_ids == alone
    assert small.blocks.num_used == 0
    # with a prefix-cache hit: the same prompt again, its full blocks served from the cache
    llm = engine()
    llm.generate(target + " again", GREEDY)
    out = llm.generate(target, GREEDY)[0]
    assert out.num_cached_tokens == 32 and out.token_ids == alone


def test_seeded_sampling_does_not_depend_on_batching():
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=20, seed=7, ignore_eos=True)
    alone = engine().generate("Once upon a time", params)[0].token_ids
    prompts, others = mixed_batch("Once upon a time")
    assert engine().generate(prompts, [params] + others[1:])[0].token_ids == alone
    small = engine(kv_cache_memory=40 * 16 * 2 * 2 * 2 * 8 * 4)
    assert small.generate(prompts, [params] + others[1:])[0].token_ids == alone
    assert engine().generate("Once upon a time", params)[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=20, seed=8, ignore_eos=True)
    assert engine().generate("Once upon a time", other_seed)[0].token_ids != alone


def test_prefix_cache_shares_blocks_and_counts_cached_tokens():
    llm = engine()
    shared = "You are a helpful assistant. Answer briefly and well. "  # 54 tokens: 3 full blocks
    a = llm.add_request(shared + "Question one?", SamplingParams(max_tokens=50, ignore_eos=True))
    llm.step()  # a's prompt is computed and its full blocks keyed
    b = llm.add_request(shared + "Question two?", SamplingParams(max_tokens=50, ignore_eos=True))
    llm.step()
    seq_a, seq_b = llm.requests[a], llm.requests[b]
    assert seq_b.num_cached == 48
    assert seq_a.block_table[:3] == seq_b.block_table[:3]
    assert all(llm.blocks.blocks[i].ref_count == 2 for i in seq_a.block_table[:3])
    llm.abort(a)
    llm.abort(b)
    assert llm.blocks.num_used == 0
    assert llm.stats["prefix_cache_hit_rate"] > 0


def test_pool_stays_within_its_budget_and_empties():
    budget = 1 << 20
    llm = engine(kv_cache_memory=budget)
    assert llm.runner.pool.nbytes <= budget
    before = llm.runner.pool.k.data_ptr()
    llm.generate([f"prompt {i} " * (i + 1) for i in range(20)], SamplingParams(max_tokens=30, ignore_eos=True))
    assert llm.runner.pool.k.data_ptr() == before and llm.runner.pool.nbytes <= budget
    assert llm.blocks.num_used == 0 and not llm.has_unfinished()


def test_stops_and_lengths():
    llm = engine()
    free = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    assert len(free.token_ids) == 30 and free.finish_reason == "length"
    # a stop string taken from the free-running text: the output ends just before it
    stop = free.text[10:13]
    cut = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=30, stop=[stop], ignore_eos=True))[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.find(stop)]
    # a stop token: not emitted
    token = free.token_ids[5]
    first = free.token_ids.index(token)
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[token]))[0]
    assert out.token_ids == free.token_ids[:first] and out.finish_reason == "stop"
    # EOS ends a request unless ignore_eos
    llm.eos_ids.clear()  # the one set the engine's output processor reads
    llm.eos_ids.add(free.token_ids[3])
    eos_first = free.token_ids.index(free.token_ids[3])
    assert llm.generate("Hello", SamplingParams(temperature=0, max_tokens=30))[0].token_ids == \
        free.token_ids[:eos_first]


def test_streaming_deltas_add_up_to_the_text():
    llm = engine()
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    full = llm.generate("Stream me", params)[0]
    deltas = list(llm.stream("Stream me", params))
    assert "".join(d.delta_text for d in deltas) == full.text
    assert sum((d.delta_token_ids for d in deltas), []) == full.token_ids
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    # with a stop string, nothing past its start is ever streamed
    stop = full.text[20:24]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop])
    streamed = "".join(d.delta_text for d in llm.stream("Stream me", params))
    assert streamed == full.text[: full.text.find(stop)]


def test_logprobs_are_the_models_own():
    llm = engine()
    out = llm.generate("Log", SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True))[0]
    ids = TOK.encode("Log").ids
    with torch.no_grad():
        logits = llm.model(torch.tensor([ids + out.token_ids]))[0, len(ids) - 1 :].float()
    expected = logits.log_softmax(-1)
    assert len(out.logprobs) == 5
    for i, lp in enumerate(out.logprobs):
        assert lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(float(expected[i, lp.token_id]), abs=1e-4)
        assert [t for t, _ in lp.top] == expected[i].topk(3).indices.tolist()
        assert lp.top[0][0] == lp.token_id  # greedy: the chosen token is the best one


def test_filters_and_penalties():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 3.0])
    greedy = int(logits.argmax())
    for params in (SamplingParams(top_k=1), SamplingParams(top_p=0.01), SamplingParams(min_p=1.0)):
        kept = filter_logits(logits, params).isfinite().nonzero().flatten().tolist()
        assert kept == [greedy]
    kept = filter_logits(logits, SamplingParams(top_k=3)).isfinite().nonzero().flatten().tolist()
    assert kept == [0, 1, 4]
    # top_p = 0.7: 3.0 (p=.61) alone does not cover it, with 2.0 (p=.23) it does
    kept = filter_logits(logits, SamplingParams(top_p=0.7)).isfinite().nonzero().flatten().tolist()
    assert kept == [0, 4]
    out = apply_penalties(logits.clone(), SamplingParams(repetition_penalty=2.0), [0], [3])
    assert out.tolist() == [1.0, 1.0, 0.5, -2.0, 3.0]
    out = apply_penalties(logits.clone(), SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), [1], [4, 4])
    assert out.tolist() == [2.0, 1.0, 0.5, -1.0, 3.0 - 0.5 - 0.5]


def test_penalties_change_greedy_output():
    llm = engine()
    plain = llm.generate("aaaa", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].token_ids
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, frequency_penalty=2.0)
    penalised = llm.generate("aaaa", params)[0].token_ids
    assert penalised != plain
    assert max(penalised.count(t) for t in set(penalised)) < max(plain.count(t) for t in set(plain))


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1), r"temperature must be in \[0, 100\]; got -1"),
    (dict(temperature=math.nan), "temperature must be a finite number; got nan"),
    (dict(top_p=0), r"top_p must be in \(0, 1\]; got 0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]; got 1.5"),
    (dict(max_tokens=0), "max_tokens must be an integer >= 1; got 0"),
    (dict(stop=[""]), "stop strings must be non-empty"),
    (dict(min_p=2), r"min_p must be in \[0, 1\]"),
    (dict(logprobs=50), r"logprobs must be in \[0, 20\]"),
])
def test_bad_sampling_parameters_are_named(kwargs, message):
    with pytest.raises(RequestError, match=message):
        SamplingParams(**kwargs)


def test_bad_requests_are_refused_and_the_engine_keeps_serving():
    llm = engine()
    running = llm.add_request("keep going", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    llm.step()
    with pytest.raises(RequestError, match="the prompt is empty"):
        llm.add_request("")
    with pytest.raises(RequestError, match="the prompt has 300 tokens; the model's context is 256"):
        llm.add_request("x" * 300)
    with pytest.raises(RequestError, match="max_tokens 250 \\+ 10 prompt tokens exceeds the model's context of 256"):
        llm.add_request("x" * 10, SamplingParams(max_tokens=250))
    with pytest.raises(RequestError, match="token id 999 is outside the vocabulary of size 259"):
        llm.add_request([1, 999])
    with pytest.raises(RequestError, match="need 16 KV blocks; the cache holds 4"):
        engine(kv_cache_memory=4 * 16 * 2 * 2 * 2 * 8 * 4).add_request("x" * 10, SamplingParams(max_tokens=240))
    outs = []
    while llm.has_unfinished():
        outs += llm.step()
    assert outs[-1].request_id == running and outs[-1].finish_reason == "length"
    assert len(outs[-1].token_ids) == 20


def test_abort_returns_blocks_at_once():
    llm = engine()
    ids = [llm.add_request("abort me " * 5, SamplingParams(max_tokens=100, ignore_eos=True)) for _ in range(4)]
    for _ in range(3):
        llm.step()
    assert llm.blocks.num_used > 0
    for i in ids:
        llm.abort(i)
    assert llm.blocks.num_used == 0 and not llm.has_unfinished()


def resident_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_resident_memory_stays_flat_over_a_long_run():
    llm = engine(kv_cache_memory=1 << 20)
    params = [SamplingParams(temperature=0.8, max_tokens=20 + i % 17, seed=i, ignore_eos=True) for i in range(48)]

    def wave(k):
        llm.generate([f"wave {k} request {i} " * (1 + i % 5) for i in range(48)], params)

    wave(0)
    wave(1)
    after_warmup = resident_bytes()
    for k in range(2, 8):
        wave(k)
    assert resident_bytes() - after_warmup < 16 << 20
    assert llm.blocks.num_used == 0 and not llm.requests


def test_chat_cli_streams_answers_through_the_chat_template(tmp_path):
    import subprocess
    import sys

    from flatstack.checkpoint import save

    TOK.save(str(tmp_path / "tokenizer.json"))
    save(Transformer(CONFIGS["llama"]).init_weights(seed=1, std=0.2), tmp_path / "ckpt", tokenizer_dir=tmp_path)
    run = subprocess.run([sys.executable, "-m", "flatstack.cli", "chat", str(tmp_path / "ckpt"), "--temperature", "0",
                          "--max-tokens", "5", "--ignore-eos"], input="Hello\nAgain\n", capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    llm = engine()
    first = llm.chat([{"role": "user", "content": "Hello"}], SamplingParams(temperature=0, max_tokens=5,
                                                                            ignore_eos=True)).text
    assert run.stdout.startswith("> " + first + "\n> ")
    assert run.stdout.count("> ") == 3  # two answers, then the prompt that read the end of input


def test_generate_cli_writes_json_lines(tmp_path, capsys):
    from flatstack.checkpoint import save
    from flatstack.cli import main

    TOK.save(str(tmp_path / "tokenizer.json"))
    save(Transformer(CONFIGS["llama"]).init_weights(seed=1, std=0.2), tmp_path / "ckpt", tokenizer_dir=tmp_path)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "from a file"}\n{"messages": [{"role": "user", "content": '
                                            '"hi"}]}\n')
    rc = main(["generate", str(tmp_path / "ckpt"), "--prompt", "abc", "--prompts-file", str(tmp_path / "prompts.jsonl"),
               "--temperature", "0", "--max-tokens", "6", "--ignore-eos", "--jsonl", "--logprobs", "1"])
    assert rc == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in records[:2]] == ["abc", "from a file"]
    assert all(len(r["token_ids"]) == 6 and r["finish_reason"] == "length" and len(r["logprobs"]) == 6
               for r in records)
    assert main(["generate", str(tmp_path / "ckpt"), "--prompt", "x", "--top-p", "0"]) == 1
    assert main(["generate", str(tmp_path / "ckpt"), "--prompt", "abc", "--quantize", "int8", "--temperature", "0",
                 "--max-tokens", "4", "--ignore-eos", "--jsonl"]) == 0
    assert len(json.loads(capsys.readouterr().out.splitlines()[-1])["token_ids"]) == 4
