"""Properties of the model itself: the KV-cache seam gives the same logits as a full forward."""

import pytest
import torch
from conftest import rel_err

from flatstack.model import KVCache, ModelConfig, Transformer, preset


@pytest.mark.parametrize("name", ["grok-1-tiny", "llama-small", "mistral-window"])
def test_incremental_decoding_with_cache_equals_full_forward(name):
    small = dict(vocab_size=101, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=8, ffn_dim=96,
                 max_seq_len=64)
    cfg = {
        "grok-1-tiny": preset("grok-1-tiny"),
        "llama-small": ModelConfig(**small),
        "mistral-window": ModelConfig(**small, sliding_window=5),
    }[name]
    model = Transformer(cfg).init_weights(seed=3).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 14))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(cfg, batch=2, max_len=32, dtype=torch.float32)
        steps = [model(tokens[:, :9], 0, cache)]  # a prefill, then one token at a time
        steps += [model(tokens[:, t : t + 1], t, cache) for t in range(9, 14)]
    assert rel_err(torch.cat(steps, dim=1), full) <= 1e-5


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(vocab_size=10, d_model=8, n_layers=1, n_heads=3, n_kv_heads=2, head_dim=4, ffn_dim=8)
    with pytest.raises(ValueError, match="unknown preset 'gpt-5'.*grok-1"):
        preset("gpt-5")


def test_sequence_longer_than_context_is_refused():
    model = Transformer(preset("grok-1-tiny", max_seq_len=8)).init_weights(seed=0)
    with pytest.raises(ValueError, match="exceeds max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_init_scales_residual_outputs():
    model = Transformer(preset("grok-1-tiny", n_layers=8)).init_weights(seed=0)
    std_in = model.layers[0].attn.wq.weight.std().item()
    std_out = model.layers[0].attn.wo.weight.std().item()
    assert std_out == pytest.approx(std_in / 4, rel=0.1)
    assert model.layers[0].ffn.w_down.std().item() == pytest.approx(std_in / 4, rel=0.1)
