"""The C decode step (engine/native_decode.py, kernels/decode_step.c) against the engine's eager step on
the same pool: every dense variant the model file has (biases, q/k norms, Grok's four norms and soft cap,
a sliding window, Grok-2's temperature, the three activations), every weight format, bfloat16 models,
sequences of different lengths across block boundaries."""

import copy

import pytest
import torch

from flatstack.engine.runner import ModelRunner, Planned
from flatstack.model import ModelConfig, Transformer

SMALL = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96,
             max_seq_len=64)
CONFIGS = {
    "llama-bias-qknorm": ModelConfig(**SMALL, qkv_bias=True, qk_norm=True),
    "grok-dense": ModelConfig(**SMALL, attn_logit_softcap=30.0, norm_layout="sandwich", activation="gelu_tanh",
                              output_multiplier=0.5, final_logit_softcap=20.0, tied_embeddings=True),
    "window": ModelConfig(**SMALL, sliding_window=5),
    "temperature": ModelConfig(**SMALL, attn_temperature_len=4, activation="gelu", attn_logit_softcap=30.0),
}
BLOCK = 4
PROMPTS = [[5, 9, 2], list(range(10, 19)), list(range(30, 44))]
TABLES = [[3, 0, 7], [1, 2, 4, 11], [5, 6, 8, 9, 10]]


def runners(name: str, weights: str, dtype=torch.float32) -> tuple[ModelRunner, ModelRunner]:
    model = Transformer(CONFIGS[name]).init_weights(seed=1, std=0.2).eval().to(dtype)
    eager, native = (ModelRunner(copy.deepcopy(model), 12, BLOCK, weights, compile_decode=c) for c in (False, True))
    assert eager.decode_path == "eager" and native.decode_path == "native"
    return eager, native


@pytest.mark.parametrize("weights", ["float", "int8", "int4"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_c_decode_step_equals_the_eager_step(name, weights):
    eager, native = runners(name, weights)
    prefill = [Planned(p, 0, t, True) for p, t in zip(PROMPTS, TABLES, strict=True)]
    first = [r.execute(prefill) for r in (eager, native)]
    torch.testing.assert_close(first[1], first[0], rtol=0, atol=0)  # the same path: prefill is not native
    tokens = first[0].argmax(-1).tolist()
    for step in range(4):
        decode = [Planned([tok], len(p) + step, t, True) for tok, p, t in zip(tokens, PROMPTS, TABLES, strict=True)]
        want, got = (r.execute(decode) for r in (eager, native))
        # quantised: the activations are rounded to int8 in both, and a last-bit difference upstream can move
        # one of them by a step
        tolerance = 1e-4 if weights == "float" else 2e-2
        assert (got - want).abs().max() <= tolerance * want.abs().max(), step
        tokens = want.argmax(-1).tolist()
    for layer in range(CONFIGS[name].n_layers):  # the pools hold the same keys and values
        torch.testing.assert_close(native.pool.k[layer], eager.pool.k[layer], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(native.pool.v[layer], eager.pool.v[layer], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ["llama-bias-qknorm", "grok-dense"])
def test_the_c_decode_step_runs_bfloat16_models_in_float32(name):
    """A bfloat16 model (weights, pool) through the C step, whose activations are float32: closer to the
    same weights run in float32 than the eager bfloat16 step is, and its new keys and values are theirs
    rounded to bfloat16."""
    eager, native = runners(name, "float", torch.bfloat16)
    reference = ModelRunner(copy.deepcopy(eager.model).float(), 12, BLOCK, compile_decode=False)
    runs = (reference, eager, native)
    prefill = [Planned(p, 0, t, True) for p, t in zip(PROMPTS, TABLES, strict=True)]
    for r in runs:
        r.execute(prefill)
    for r in runs[1:]:  # from the same keys and values
        for layer in range(CONFIGS[name].n_layers):
            r.pool.k[layer].copy_(reference.pool.k[layer])
            r.pool.v[layer].copy_(reference.pool.v[layer])
    decode = [Planned([7], len(p), t, True) for p, t in zip(PROMPTS, TABLES, strict=True)]
    want, eager_out, got = (r.execute(decode) for r in runs)
    error, eager_error = (got - want).abs().max(), (eager_out - want).abs().max()
    assert error <= 2e-2 * want.abs().max() and error < eager_error, (error, eager_error)
    slots = [t[len(p) // BLOCK] * BLOCK + len(p) % BLOCK for p, t in zip(PROMPTS, TABLES, strict=True)]
    for pool, ref in ((native.pool.k, reference.pool.k), (native.pool.v, reference.pool.v)):  # the first layer's:
        new, exact = pool[0].flatten(1, 2)[:, slots], ref[0].flatten(1, 2)[:, slots]  # the later ones' inputs
        assert new.dtype == torch.bfloat16  # differ by what attention over a bfloat16 pool changes
        torch.testing.assert_close(new.float(), exact, rtol=2 ** -8, atol=1e-5)


def test_models_the_c_step_does_not_run_keep_their_paths():
    moe = Transformer(ModelConfig(**SMALL, n_experts=4)).init_weights(seed=1).eval()
    assert ModelRunner(moe, 12, BLOCK).native is None


@pytest.mark.parametrize("weights", ["float", "int8"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_decodes_beside_prompt_chunks_take_the_c_step(name, weights):
    """A step of decodes and prompt chunks (one chunk that ends the prompt and samples, one that does not) is
    a row per token in the C step, each at its own position: the eager step's logits, keys and values."""
    eager, native = runners(name, weights)
    calls = []
    step_in_c = native.native_step
    native.native_step = lambda step: calls.append(len(step)) or step_in_c(step)
    first = [Planned(PROMPTS[0], 0, TABLES[0], True)]
    token = [r.execute(first) for r in (eager, native)][0].argmax(-1).item()
    cut = 5
    steps = [[Planned([token], len(PROMPTS[0]), TABLES[0], True), Planned(PROMPTS[1], 0, TABLES[1], True),
              Planned(PROMPTS[2][:cut], 0, TABLES[2], False)],
             [Planned([3], len(PROMPTS[0]) + 1, TABLES[0], True), Planned([4], len(PROMPTS[1]), TABLES[1], True),
              Planned(PROMPTS[2][cut:], cut, TABLES[2], True)]]
    tolerance = 1e-4 if weights == "float" else 2e-2
    for samplers, step in zip((2, 3), steps, strict=True):
        want, got = (r.execute(step) for r in (eager, native))
        assert got.shape == want.shape == (samplers, CONFIGS[name].vocab_size)
        assert (got - want).abs().max() <= tolerance * want.abs().max()
    assert calls == [3, 3]
    for layer in range(CONFIGS[name].n_layers):
        torch.testing.assert_close(native.pool.k[layer], eager.pool.k[layer], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(native.pool.v[layer], eager.pool.v[layer], rtol=1e-3, atol=1e-3)
