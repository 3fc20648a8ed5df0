"""Grok-2 from xAI's release layout: parity with an SGLang-derived reference (tests/grok2_reference.py), each
deliberate mistake caught, the same logits through a converted checkpoint, the engine and 2-rank tensor
parallel; the tiktoken-style tokenizer rebuilt; bad release folders named."""

import copy
import json
import shutil
from pathlib import Path

import pytest
import regex
import torch
from grok2_reference import MISTAKES, forward, tiny_config, tiny_weights, write_release
from safetensors.torch import load_file, save_file

import flatstack
from flatstack.checkpoint import CheckpointError, convert, tokenizer_files
from flatstack.engine import LLM, SamplingParams
from flatstack.engine.runner import ModelRunner
from flatstack.engine.tensor_parallel import load_shard, shard_model
from flatstack.model import ModelConfig, Transformer, model_stats, preset
from flatstack.tokenizer import TIKTOKEN_SPLITS, byte_tokenizer, bytes_to_symbols, tokenizer_from_tiktoken, train_bpe

SPECIALS = ["<|pad|>", "<|separator|>", "<|eos|>"]  # ids 0, 1, 2, before the regular tokens, as in the release
TEXT = ("def f(x):\n    return x ** 2  # squares 12345\nnaïve café — 東京 🙂 <|separator|> Human: hi<|eos|>"
        "  spaces\tand\r\nnew lines don't I'll")


@pytest.fixture(scope="module")
def tok_json(tmp_path_factory) -> dict:
    """A tiktoken-style vocabulary in the release's format, ranks from a byte-level BPE trained here."""
    text = (Path(__file__).parents[2] / "shared" / "data" / "tinyshakespeare.txt").read_text()[:200_000]
    hf = train_bpe([text], 600)
    symbol_byte = {s: b for b, s in enumerate(bytes_to_symbols())}
    regular = [{"token": i + len(SPECIALS), "bytes": [symbol_byte[c] for c in token]}
               for token, i in sorted(hf.get_vocab().items(), key=lambda kv: kv[1]) if not token.startswith("<|")]
    special = [{"token": i, "bytes": list(s.encode())} for i, s in enumerate(SPECIALS)]
    return {"regular_tokens": regular, "special_tokens": special, "word_split": "V1"}


@pytest.fixture(scope="module")
def release(tmp_path_factory, tok_json) -> tuple[Path, dict, dict]:
    folder = tmp_path_factory.mktemp("grok2")
    c = tiny_config(len(tok_json["regular_tokens"]) + len(SPECIALS))
    W = tiny_weights(c)
    write_release(folder, c, W)
    (folder / "tokenizer.tok.json").write_text(json.dumps(tok_json))
    return folder, c, W


TOKENS = [5, 17, 200, 3, 42, 99, 7, 7, 123, 400, 11, 250, 31, 64, 8, 300, 19, 77, 150, 2]  # 20 > the 8 of L


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def test_the_release_matches_the_reference_and_each_mistake_is_caught(release):
    folder, c, W = release
    with torch.no_grad():
        ours = flatstack.load(folder)(torch.tensor([TOKENS]))[0]
    assert relative_error(ours, forward(TOKENS, W, c)) < 1e-5
    for mistake in MISTAKES:
        assert relative_error(ours, forward(TOKENS, W, c, mistake)) > 1e-5, mistake


def test_the_caps_bite(release):
    """The tiny weights reach far along the final cap's curve (the other caps: no_router_cap and
    temperature_before_cap above)."""
    _, c, W = release
    assert forward(TOKENS, W, c).abs().max() > 0.8 * c["final_logit_softcapping"]


def test_converted_engine_and_tensor_parallel_agree(release, tmp_path):
    folder, c, W = release
    native = convert(folder, tmp_path / "native", "hf")
    tokens = torch.tensor([TOKENS])
    with torch.no_grad():
        want = flatstack.load(folder)(tokens)
        torch.testing.assert_close(flatstack.load(native)(tokens), want, rtol=0, atol=0)
    # greedy continuations through the engine (chunked prefill of 8 tokens, a shared prefix cached)
    prompts = [TOKENS, TOKENS[:12] + [9, 9, 9]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm = LLM(native, max_num_batched_tokens=8, block_size=4)
    assert llm.apply_chat_template([{"role": "user", "content": " hi "}]) == "Human: hi<|separator|>\n\nAssistant:"
    outs = [o.token_ids for o in llm.generate(prompts, params)]
    model = flatstack.load(native)
    for prompt, got in zip(prompts, outs, strict=True):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(6):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert got == seq[len(prompt):]
    # the GPU runner's paths on the CPU: prompt chunks packed into one FlexAttention call, the temperature
    # per query token
    packed = LLM(native, max_num_batched_tokens=8, block_size=4)
    packed.runner = ModelRunner(packed.model, len(packed.blocks.blocks), 4, gpu_paths=True)
    assert packed.runner.packed and [o.token_ids for o in packed.generate(prompts, params)] == outs
    tp = LLM(folder, tp=2, max_num_batched_tokens=8, block_size=4)
    try:
        assert [o.token_ids for o in tp.generate(prompts, params)] == outs
    finally:
        tp.close()


def test_the_cuda_graph_decode_applies_the_temperature():
    """Grok-2's attention in a dense float32 model (graph-safe): decode steps from the CUDA graphs' static
    buffers, run eagerly on the CPU, give the plain forward's greedy tokens past the temperature length."""
    cfg = ModelConfig(vocab_size=300, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96,
                      max_seq_len=128, attn_logit_softcap=3.0, attn_temperature_len=8)
    model = Transformer(cfg).init_weights(seed=3, std=0.3).eval()
    llm = LLM(copy.deepcopy(model), byte_tokenizer(), max_num_batched_tokens=8, block_size=4, max_num_seqs=4)
    llm.runner = ModelRunner(llm.model, len(llm.blocks.blocks), 4, max_num_seqs=4, gpu_paths=True)
    assert llm.runner.graphed is not None
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    for prompt, out in zip([TOKENS[:5], TOKENS[:9]], llm.generate([TOKENS[:5], TOKENS[:9]], params), strict=True):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(12):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert out.token_ids == seq[len(prompt):]


def test_a_tensor_parallel_rank_reads_only_its_slices(release, tmp_path):
    """Rank 0 of 2 needs the release's TP-000 file alone (its experts' first halves): with TP-001 gone it
    still loads, equal to the whole model cut; the whole model names the missing file."""
    folder = broken(release, tmp_path, lambda f: (f / "pytorch_model-00001-TP-001.safetensors").unlink())
    with pytest.raises(CheckpointError, match="TP-001"):
        flatstack.load(folder)
    whole = flatstack.load(release[0])
    shard_model(whole, 0, 2)
    shard = load_shard(folder, 0, 2, None, "cpu").state_dict()
    for (name, want), got in zip(whole.state_dict().items(), shard.values(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)


def direct_bpe(text: str, data: dict) -> list[int]:
    """tiktoken's algorithm over the ranks: specials whole, the rest split by the pattern, each piece's bytes
    merged pair by pair, the lowest-ranked merge first."""
    ranks = {bytes(t["bytes"]): t["token"] for t in data["regular_tokens"]}
    specials = {bytes(t["bytes"]).decode(): t["token"] for t in data["special_tokens"]}
    ids = []
    for part in regex.split("(" + "|".join(map(regex.escape, specials)) + ")", text):
        if part in specials:
            ids.append(specials[part])
            continue
        for piece in regex.findall(TIKTOKEN_SPLITS["V1"], part):
            if piece.encode() in ranks:  # tiktoken: a piece that is a token whole
                ids.append(ranks[piece.encode()])
                continue
            parts = [bytes([b]) for b in piece.encode()]
            while len(parts) > 1:
                pairs = [(ranks.get(a + b), i) for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False))]
                rank, i = min((p for p in pairs if p[0] is not None), default=(None, None))
                if rank is None:
                    break
                parts[i : i + 2] = [parts[i] + parts[i + 1]]
            ids += [ranks[p] for p in parts]
    return ids


def test_the_tiktoken_vocabulary_is_rebuilt(tok_json, release):
    tok = tokenizer_from_tiktoken(tok_json)
    ids = tok.encode(TEXT).ids
    assert ids == direct_bpe(TEXT, tok_json)
    assert len(ids) < len(TEXT.encode()) * 0.8  # merges happened
    assert tok.decode(ids, skip_special_tokens=False) == TEXT
    assert 1 in ids and 2 in ids  # <|separator|>, <|eos|>
    files = tokenizer_files(release[0])
    assert "Human:" in json.loads(files["tokenizer_config.json"])["chat_template"]
    assert flatstack.checkpoint.read_config(release[0]).eos_token_id == [2, 1]


def broken(release, tmp_path, change) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(release[0], folder)
    change(folder)
    return folder


def test_bad_release_folders_are_named(release, tmp_path):
    def no_rank_1(folder):
        (folder / "pytorch_model-00001-TP-001.safetensors").unlink()

    def wrong_slice(folder):
        path = folder / "pytorch_model-00001-TP-001.safetensors"
        tensors = load_file(str(path))
        name = "model.layers.1.block_sparse_moe.experts.2.w2.weight"
        tensors[name] = tensors[name][:, :-1].contiguous()
        save_file(tensors, str(path))

    def config(**changes):
        def change(folder):
            raw = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**raw, **changes}))
        return change

    cases = [(no_rank_1, "TP-001"),
             (wrong_slice, r"experts\.2\.w2\.weight has shape \(64, 23\); expected \(64, 24\)"),
             (config(rope_type="yarn"), "rope_type 'yarn'"),
             (config(head_dim="16"), "'head_dim' is '16'; expected int")]
    for i, (change, message) in enumerate(cases):
        with pytest.raises(CheckpointError, match=message):
            flatstack.load(broken(release, tmp_path / str(i), change))


def test_info_counts_grok2_without_allocating_it():
    stats = model_stats(preset("grok-2"))
    assert stats.total_params == pytest.approx(269.5e9, rel=0.005)
    assert 100e9 < stats.active_params < 130e9
