"""xAI's own Grok-1 code produced the fixture's logits; the converted checkpoint must reproduce them."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED, rel_err

import flatstack
from flatstack import model as model_mod
from flatstack.checkpoint import build_model
from flatstack.checkpoint.grok1 import grok1_config, grok1_tensors_to_native, read_grok1_arrays

FIXTURE = SHARED / "fixtures" / "grok1_tiny.npz"
FIXTURE_CFG = SHARED / "fixtures" / "grok1_tiny.json"
BOUND = 2e-6


@pytest.fixture(scope="module")
def reference():
    with np.load(FIXTURE) as d:
        return torch.from_numpy(d["tokens"].astype(np.int64)), torch.from_numpy(d["logits"])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The fixture converted through the real console command, with the fixture's own JSON."""
    out = tmp_path_factory.mktemp("grok") / "ckpt"
    cmd = [sys.executable, "-m", "flatstack.cli", "convert", str(FIXTURE), str(out), "--from", "xai-grok1",
           "--config", str(FIXTURE_CFG)]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


def test_converted_fixture_matches_xai_reference(converted, reference):
    tokens, ref = reference
    model = flatstack.load(converted)
    with torch.no_grad():
        logits = model(tokens)
    for b in range(tokens.shape[0]):
        assert rel_err(logits[b], ref[b]) <= BOUND, (b, rel_err(logits[b], ref[b]))


def test_converted_config_is_grok_architecture(converted):
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["norm_layout"] == "sandwich" and cfg["activation"] == "gelu_tanh"
    assert cfg["renormalize_topk"] is False and cfg["attn_logit_softcap"] == 30.0
    assert cfg["n_experts"] == 8 and cfg["experts_per_token"] == 2


def interleaved_rope(x, cos, sin):
    """The GPT-J/Meta layout: rotates pairs (x[2i], x[2i+1]) instead of (x[i], x[i + D/2])."""
    half = x.shape[-1] // 2
    c, s = cos[..., :half].repeat_interleave(2, -1), sin[..., :half].repeat_interleave(2, -1)
    rot = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
    return x * c + rot * s


@pytest.mark.parametrize("mistake", ["exact_erf_gelu", "renormalised_top2", "interleaved_rope"])
def test_each_deliberate_mistake_breaks_parity(mistake, reference, monkeypatch):
    """The bound is tight enough to catch each plausible misreading of the reference."""
    tokens, ref = reference
    cfg = grok1_config(FIXTURE_CFG)
    if mistake == "renormalised_top2":
        cfg.renormalize_topk = True
    model = build_model(cfg, grok1_tensors_to_native(read_grok1_arrays(FIXTURE)))
    if mistake == "exact_erf_gelu":
        for layer in model.layers:
            layer.ffn.act = F.gelu
    if mistake == "interleaved_rope":
        monkeypatch.setattr(model_mod, "apply_rope", interleaved_rope)
    with torch.no_grad():
        assert rel_err(model(tokens), ref) > BOUND


def test_bfloat16_close_to_float32(converted, reference):
    tokens, _ = reference
    with torch.no_grad():
        f32 = flatstack.load(converted)(tokens)
        bf16 = flatstack.load(converted, dtype=torch.bfloat16)(tokens)
    assert bf16.dtype == torch.bfloat16
    assert rel_err(bf16, f32) <= 2e-2, rel_err(bf16, f32)
