"""Logits of Hugging Face transformers (an independent implementation) against flatstack.load on the
same randomly initialised, save_pretrained-ed model, float32 on the CPU."""

import pytest
import torch
import transformers
from conftest import rel_err

import flatstack

COMMON = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
              max_position_embeddings=128, rms_norm_eps=1e-6)

CASES = {
    # GQA with 3 query heads per KV head, untied, Llama 3 long-context RoPE scaling
    "llama-gqa3-untied-llama3rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama-tied-mha": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)),
    # a window shorter than the sequence, so the sliding mask matters
    "mistral-sliding-window": ("MistralConfig", "MistralForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=1, sliding_window=7, tie_word_embeddings=False)),
    "qwen2-bias-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True)),
    # head_dim independent of hidden_size / heads, q/k norm
    "qwen3-qknorm": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)),
    "mixtral-4experts": ("MixtralConfig", "MixtralForCausalLM", dict(
        num_attention_heads=6, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        tie_word_embeddings=False)),
}


def make_hf_model(case: str, folder, max_shard_size=None):
    config_cls, model_cls, extra = CASES[case]
    cfg = getattr(transformers, config_cls)(**COMMON, **extra)
    cfg._attn_implementation = "eager"
    model = getattr(transformers, model_cls)(cfg).eval()
    # Random everything, norms and biases included, so no term can hide behind a zero or a one.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.08 * noise)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return model


def two_sequences(vocab: int, T: int = 20) -> torch.Tensor:
    gen = torch.Generator().manual_seed(2)
    return torch.randint(0, vocab, (2, T), generator=gen)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    hf = make_hf_model(case, tmp_path)
    tokens = two_sequences(COMMON["vocab_size"])
    with torch.no_grad():
        ref = hf(tokens).logits
        ours = flatstack.load(tmp_path)(tokens)
    assert ours.shape == ref.shape
    assert not torch.equal(ref[0], ref[1])
    assert rel_err(ours, ref) <= 1e-5, rel_err(ours, ref)


def test_sharded_hf_folder_and_convert_roundtrip(tmp_path):
    hf = make_hf_model("mixtral-4experts", tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    tokens = two_sequences(COMMON["vocab_size"])
    flatstack.checkpoint.convert(tmp_path / "hf", tmp_path / "native", "hf")
    with torch.no_grad():
        ref = hf(tokens).logits
        ours = flatstack.load(tmp_path / "native")(tokens)
    assert rel_err(ours, ref) <= 1e-5
