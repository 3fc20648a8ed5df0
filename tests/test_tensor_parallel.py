"""Tensor-parallel inference on 2 ranks (gloo, the CPU): the same greedy tokens as one process, for a dense
model and a mixture of experts, through `LLM(path, tp=2)` and `flatstack serve --tp 2`."""

from pathlib import Path

import httpx
import pytest
from serving import AUTH, MODEL, C, running_server

from flatstack.checkpoint import save
from flatstack.engine import LLM, SamplingParams
from flatstack.engine.tensor_parallel import shard_model
from flatstack.model import ModelConfig, Transformer
from flatstack.tokenizer import byte_tokenizer

PROMPTS = ["hello there", "the quick brown fox jumps over", "a"]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
# dense: biased q/k/v (their biases split with the heads); moe: Grok-1's layout, 4 experts, 2 a token
CONFIGS = {"dense": dict(qkv_bias=True),
           "moe": dict(n_experts=4, experts_per_token=2, norm_layout="sandwich", activation="gelu_tanh",
                       attn_logit_softcap=30.0)}


def checkpoint(folder: Path, kind: str) -> Path:
    tok = byte_tokenizer()
    tok.save(str(folder / "tokenizer.json"))
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      head_dim=16, ffn_dim=96, max_seq_len=256, **CONFIGS[kind])
    return save(Transformer(cfg).init_weights(seed=0, std=0.3), folder / "ckpt", tokenizer_dir=folder)


def greedy_ids(path: Path, tp: int) -> list[list[int]]:
    llm = LLM(path, tp=tp, kv_cache_memory=1 << 20)
    try:
        return [out.token_ids for out in llm.generate(PROMPTS, GREEDY)]
    finally:
        llm.close()


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_two_ranks_give_one_process_greedy_tokens(tmp_path, kind):
    path = checkpoint(tmp_path, kind)
    one = greedy_ids(path, 1)
    assert all(len(set(ids)) > 3 for ids in one), one  # tokens that depend on the model, not one repeated
    assert greedy_ids(path, 2) == one


def test_serve_with_two_ranks(tmp_path):
    path = checkpoint(tmp_path, "moe")
    llm = LLM(path)
    want = [out.text for out in llm.generate(PROMPTS, GREEDY)]
    with running_server(path, "--tp", "2") as url:
        got = [httpx.post(f"{url}{C}", headers=AUTH, timeout=60,
                          json={"model": MODEL, "prompt": p, "max_tokens": 16, "temperature": 0,
                                "ignore_eos": True}).json()["choices"][0]["text"] for p in PROMPTS]
    assert got == want


def test_heads_that_do_not_divide_are_refused():
    cfg = ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64)
    with pytest.raises(ValueError, match="n_kv_heads"):
        shard_model(Transformer(cfg), 0, 4)
