"""Each fast op equals its plain torch reference, values and gradients."""

import platform

import pytest
import torch

from flatstack.kernels import linear_cross_entropy as lce


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize(("scale", "softcap"), [(1.0, None), (0.577, None), (0.5, 2.0)])
def test_linear_cross_entropy_matches_reference(with_mask, scale, softcap, monkeypatch):
    """Row weights stand for a loss mask divided by the number of counted rows; a soft cap (Grok-2's final
    one, low enough here that it bends most logits) caps the scaled logits."""
    monkeypatch.setattr(lce, "CHUNK_ELEMENTS", 7 * 50)  # several chunks, the last one short
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(23, 16, generator=gen, requires_grad=True)
    w = torch.randn(50, 16, generator=gen, requires_grad=True)
    t = torch.randint(0, 50, (23,), generator=gen)
    mask = (torch.rand(23, generator=gen) > 0.4).float() / 9 if with_mask else None
    ref = lce.reference(h, w, t, mask, scale, softcap)
    ref_grads = torch.autograd.grad(ref * 1.7, (h, w))
    ours = lce.linear_cross_entropy(h, w, t, mask, scale, softcap)
    grads = torch.autograd.grad(ours * 1.7, (h, w))
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_without_grad_only_computes_the_loss():
    h, w = torch.randn(5, 8), torch.randn(11, 8)
    t = torch.randint(0, 11, (5,))
    with torch.no_grad():
        torch.testing.assert_close(lce.linear_cross_entropy(h, w, t), lce.reference(h, w, t))


@pytest.mark.parametrize("kind", ["float", "int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3, 40, 70])  # the C kernel (up to NATIVE_ROWS), the GEMM past it
def test_inference_linears_match_their_reference(kind, rows):
    from flatstack.kernels.linear import LINEARS, NATIVE_ROWS, decode_step

    gen = torch.Generator().manual_seed(1)
    w, b = torch.randn(96, 64, generator=gen), torch.randn(96, generator=gen)
    x = torch.randn(1, rows, 64, generator=gen)
    layer = LINEARS[kind](w, b)
    with torch.no_grad(), decode_step():
        native = rows <= NATIVE_ROWS and kind != "float"  # quantised: activations quantised like the kernel's
        ref = torch.nn.functional.linear(x, w, b) if kind == "float" else \
            layer.quantized_reference(x) if native else layer.reference(x)
        out = layer(x)
    assert out.shape == (1, rows, 96)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def kernel_layer(kind: str, n: int, k: int, gen: torch.Generator, bias: bool):
    from flatstack.kernels.linear import LINEARS

    w, b = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen) if bias else None
    if kind == "bfloat16":
        return LINEARS["float"](w.bfloat16(), b), lambda x: torch.nn.functional.linear(x, w.bfloat16().float(), b)
    layer = LINEARS[kind](w, b)
    return layer, (lambda x: torch.nn.functional.linear(x, w, b)) if kind == "float" else layer.quantized_reference


# row and lane tails: n not a multiple of the 4-row tile, k not of 16 lanes (float) nor of four blocks (int4)
@pytest.mark.parametrize("n, k", [(96, 64), (4 * 7 + 3, 32 * 5), (9, 32 * 7), (2, 32), (37, 16 * 5 + 9)])
@pytest.mark.parametrize("kind", ["float", "bfloat16", "int8", "int4"])
def test_c_linear_kernels_match_the_reference_for_1_to_64_rows(kind, n, k):
    """Every weight format the C kernel reads (kernels/linear_rows.c), against the torch reference of the
    same arithmetic (quantised formats: activations quantised per block, as the kernel does), for every
    row count a decode step can have."""
    from flatstack.kernels import native
    from flatstack.kernels.linear import NATIVE_ROWS

    if kind in ("int8", "int4") and k % 32:
        pytest.skip("quantised blocks need k to be a multiple of 32")
    assert native.library() is not None  # a C compiler is there wherever TorchInductor runs on the CPU
    gen = torch.Generator().manual_seed(3)
    for m in range(1, NATIVE_ROWS + 1):
        layer, reference = kernel_layer(kind, n, k, gen, bias=m % 2 == 0)
        x = torch.randn(m, k, generator=gen)
        with torch.no_grad():
            out, ref = native.linear_rows(layer.kernel_weight(), x), reference(x)
        assert out.shape == (m, n)
        assert (out - ref).abs().max() <= 2e-5 * ref.abs().max(), m


def test_the_kernels_built_for_a_cpu_without_avx512_give_the_same_products(tmp_path):
    """The plain-loop fallback (what a CPU without AVX-512 VNNI runs), built here for baseline x86-64:
    every format's products equal the vectorised kernel's."""
    from flatstack.kernels import native

    if platform.machine() != "x86_64":
        pytest.skip("the fallback is built for baseline x86-64")
    generic = tmp_path / "generic.so"
    native.build(generic, march="x86-64")
    lib = native.load(generic)
    assert not lib.linear_rows_vectorised()
    gen = torch.Generator().manual_seed(6)
    for kind in ("float", "bfloat16", "int8", "int4"):
        for m in (1, 5, 64):
            layer, _ = kernel_layer(kind, 37, 96, gen, bias=True)
            x = torch.randn(m, 96, generator=gen)
            want = native.linear_rows(layer.kernel_weight(), x)
            torch.testing.assert_close(native.linear_rows(layer.kernel_weight(), x, lib), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_the_compiled_reduction_matches_the_reference(kind):
    """The TorchInductor reduction the compiled decode blocks (bfloat16 models) use."""
    from flatstack.kernels.linear import LINEARS, compiled_rows

    gen = torch.Generator().manual_seed(5)
    layer = LINEARS[kind](torch.randn(40, 96, generator=gen))
    x = torch.randn(3, 96, generator=gen)
    out = compiled_rows(kind)(x, *[t for t in layer.kernel_tensors() if t is not None])
    torch.testing.assert_close(out, layer.reference(x), rtol=1e-4, atol=1e-4)


def test_without_a_c_compiler_the_kernels_fall_back_to_torch(monkeypatch, tmp_path):
    from flatstack.kernels import linear, native

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built there yet
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    native.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="no C compiler"):
            assert native.library() is None
        layer = linear.Int8Linear(torch.randn(40, 32, generator=torch.Generator().manual_seed(4)))
        x = torch.randn(1, 32)
        with torch.no_grad(), linear.decode_step():
            assert not linear.use_native(x, layer, always=True)
            torch.testing.assert_close(layer(x), layer.reference(x), rtol=1e-5, atol=1e-5)
        # decode attention keeps its torch path
        from flatstack.kernels import paged_attention as pa

        k_pool, v_pool = torch.randn(2, 2, 6, 4, 8)
        q, tables, lengths = torch.randn(2, 4, 8), torch.tensor([[3, 1], [5, 0]]), torch.tensor([7, 2])
        torch.testing.assert_close(pa.decode_attention(q, k_pool, v_pool, tables, lengths, 0.3),
                                   pa.reference(q, k_pool, v_pool, tables, lengths, 0.3), rtol=1e-5, atol=1e-5)
    finally:
        native.library.cache_clear()


@pytest.mark.parametrize("kind, bound", [("int8", 0.01), ("int4", 0.1)])
def test_quantised_weights_stay_close_to_float(kind, bound):
    from flatstack.kernels.linear import LINEARS

    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    deq = LINEARS[kind](w).dequantize()
    assert ((deq - w).norm() / w.norm()).item() <= bound


@pytest.mark.parametrize("softcap, window, temperature_len", [(None, None, None), (30.0, None, None), (None, 5, None),
                                                             (1.5, None, 4)])
def test_paged_decode_attention_matches_reference(softcap, window, temperature_len):
    """temperature_len 4: Grok-2's temperature at the queries of positions 10 and 15 (not at 2)."""
    from flatstack.kernels import paged_attention as pa

    gen = torch.Generator().manual_seed(3)
    Hkv, blocks, bs, D, H = 2, 12, 4, 8, 6
    k_pool, v_pool = torch.randn(2, Hkv, blocks, bs, D, generator=gen)
    q = torch.randn(3, H, D, generator=gen)
    tables = torch.tensor([[5, 2, 9, 0], [1, 0, 0, 0], [11, 3, 7, 4]])  # padded with block 0
    lengths = torch.tensor([11, 3, 16])
    args = (q, k_pool, v_pool, tables, lengths, 0.3, softcap, window, temperature_len)
    ref = pa.reference(*args)
    out = pa.paged_decode_attention(*args)
    assert (out - ref).abs().max() <= 1e-5
    # the C kernel (what decode_attention picks here): the same, reading the blocks where they lie
    native_out = pa.decode_attention(*args)
    assert (native_out - ref).abs().max() <= 1e-5
    if temperature_len is not None:  # and the temperature matters here
        assert (pa.reference(*args[:-1]) - ref).abs().max() > 1e-3
    # bfloat16 pools (bfloat16 models): the C kernel widens each row and computes in float32
    q16, k16, v16 = q.bfloat16(), k_pool.bfloat16(), v_pool.bfloat16()
    wide = pa.reference(q16.float(), k16.float(), v16.float(), *args[3:])
    out16 = pa.decode_attention(q16, k16, v16, *args[3:])
    assert out16.dtype == torch.bfloat16
    assert (out16.float() - wide).abs().max() <= 2 ** -8 * wide.abs().max()


def test_native_decode_attention_on_a_real_sized_step():
    """Query heads in groups of 3 over head_dim 64, 40 sequences of 1 to 300 positions in a shuffled pool."""
    from flatstack.kernels import native
    from flatstack.kernels import paged_attention as pa

    gen = torch.Generator().manual_seed(5)
    Hkv, blocks, bs, D, H, B = 3, 900, 16, 64, 9, 40
    k_pool, v_pool = torch.randn(2, Hkv, blocks, bs, D, generator=gen)
    tables = torch.randperm(blocks, generator=gen)[: B * 20].view(B, 20)
    lengths = torch.randint(1, 20 * bs + 1, (B,), generator=gen)
    q = torch.randn(B, H, D, generator=gen)
    out = native.paged_decode(q, k_pool, v_pool, tables, lengths, 0.125)
    torch.testing.assert_close(out, pa.paged_decode_attention(q, k_pool, v_pool, tables, lengths, 0.125),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("softcap, window", [(None, None), (30.0, None), (None, 5)])
def test_decode_attention_before_write_equals_writing_first(softcap, window):
    """The compiled decode step's form (the new key and value beside the pool) equals writing them into
    their slots and attending through the block tables."""
    from flatstack.kernels import paged_attention as pa

    gen = torch.Generator().manual_seed(4)
    Hkv, blocks, bs, D, H = 2, 12, 4, 8, 6
    k_pool, v_pool = torch.randn(2, Hkv, blocks, bs, D, generator=gen)
    q = torch.randn(3, H, D, generator=gen)
    k_new, v_new = torch.randn(2, 3, Hkv, D, generator=gen)
    tables = torch.tensor([[5, 2, 9, 0], [1, 0, 0, 0], [11, 3, 7, 4]])
    context = torch.tensor([10, 0, 15])  # the second sequence has no context yet: only its own token
    out = pa.decode_attention_before_write(q, k_new, v_new, k_pool, v_pool, tables, context, 0.3, softcap, window)
    for b in range(3):
        block, offset = tables[b, context[b] // bs], context[b] % bs
        k_pool[:, block, offset], v_pool[:, block, offset] = k_new[b], v_new[b]
    ref = pa.reference(q, k_pool, v_pool, tables, context + 1, 0.3, softcap, window)
    assert (out - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("T, S", [(7, 7), (3, 11), (1, 9)])
def test_fused_sdpa_path_matches_the_attention_reference(T, S):
    """The model's fast path (torch's fused attention, no soft cap or window) against the one reference."""
    from flatstack.kernels import attention
    from flatstack.model import Attention, ModelConfig

    cfg = ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64)
    attn = Attention(cfg, 0)
    q, k, v = torch.randn(2, 4, T, 8), torch.randn(2, 2, S, 8), torch.randn(2, 2, S, 8)
    torch.testing.assert_close(attn.attend(q, k, v), attention.reference(q, k, v, attn.scale), rtol=1e-5, atol=1e-5)


def moe_inputs(N=37, D=64, Fd=96, E=8, k=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=gen).bfloat16()
    w = [(torch.randn(E, *s, generator=gen) * 0.1).bfloat16() for s in ((Fd, D), (Fd, D), (D, Fd))]
    logits = torch.randn(N, E, generator=gen)
    logits[:, -1] = -1e9  # the last expert gets no token
    weights, experts = logits.softmax(-1).topk(k, dim=-1)
    return x, experts, weights.bfloat16(), w


def test_grouped_moe_equals_the_per_expert_loop_forward_and_backward():
    from flatstack.kernels import moe

    x, experts, weights, w = moe_inputs()
    act = torch.nn.functional.silu
    results = []
    for run in (moe.reference, moe.grouped):
        leaves = [t.clone().requires_grad_() for t in (x, weights, *w)]
        out = run(leaves[0], experts, leaves[1], *leaves[2:], act)
        out.float().square().sum().backward()
        results.append((out.detach(), [t.grad for t in leaves]))
    (ref, ref_grads), (got, got_grads) = results
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
    for a, b in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)
    assert results[1][1][-1][-1].abs().sum() == 0  # the expert without tokens gets no gradient


def test_grouped_moe_compiles_whole():
    """No host sync, no data-dependent branch: one graph (fullgraph), equal to the eager form."""
    from flatstack.kernels import moe

    x, experts, weights, w = moe_inputs(seed=1)
    act = torch.nn.functional.silu
    compiled = torch.compile(moe.grouped, fullgraph=True)
    torch.testing.assert_close(compiled(x, experts, weights, *w, act), moe.grouped(x, experts, weights, *w, act),
                               rtol=2e-2, atol=2e-2)


def test_a_bf16_moe_model_routes_through_the_grouped_experts(monkeypatch):
    from flatstack.kernels import moe
    from flatstack.model import Transformer, preset

    model = Transformer(preset("grok-1-tiny")).init_weights(seed=0).bfloat16()
    tokens = torch.randint(0, 256, (2, 9))
    calls = []
    monkeypatch.setattr(moe, "grouped", lambda *a: calls.append(1) or moe.reference(*a))
    with torch.no_grad():
        model(tokens)
    assert calls and moe.grouped_ok(torch.zeros(1, 64, dtype=torch.bfloat16), model.layers[0].ffn.w_gate)


FLEX_CASES = [  # (heads, kv heads, head_dim, T, S, soft cap, window): GQA ratios 1, 3 and 8, lengths off the
    # 128-token block size, queries offset into the keys as a chunked prefill's are
    (8, 8, 64, 77, 77, None, 16),
    (6, 2, 128, 129, 129, 30.0, 64),
    (8, 1, 64, 100, 300, 30.0, None),
    (8, 1, 128, 200, 500, 30.0, 128),
]


@pytest.mark.parametrize("H, Hkv, D, T, S, softcap, window", FLEX_CASES)
def test_flex_attention_equals_the_reference(H, Hkv, D, T, S, softcap, window):
    from flatstack.kernels import attention

    gen = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(1, h, n, D, generator=gen) for h, n in ((H, T), (Hkv, S), (Hkv, S)))
    with torch.no_grad():
        got = attention.flex(q, k, v, D**-0.5, softcap, window)
    torch.testing.assert_close(got, attention.reference(q, k, v, D**-0.5, softcap, window), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("softcap, window", [(None, None), (30.0, None), (None, 5), (30.0, 9)])
def test_packed_prompt_chunks_equal_the_reference_per_sequence(softcap, window):
    """Chunks of three sequences in one row (the engine's packed prefill): each chunk's queries sit at the
    end of their own context, whose slots are padded to whole blocks of 16; the result is the reference run
    on each sequence alone."""
    from flatstack.kernels import attention

    H, Hkv, D, bs = 6, 2, 64, 16
    gen = torch.Generator().manual_seed(0)
    chunks = [(0, 7), (20, 13), (33, 1)]  # (positions cached before, new tokens)
    q = torch.randn(1, H, sum(n for _, n in chunks), D, generator=gen)
    contexts = [torch.randn(2, 1, Hkv, -(-(c + n) // bs) * bs, D, generator=gen) for c, n in chunks]
    k, v = (torch.cat([ctx[i] for ctx in contexts], dim=2) for i in (0, 1))
    q_seq = torch.cat([torch.full((n,), i) for i, (_, n) in enumerate(chunks)])
    q_pos = torch.cat([torch.arange(c, c + n) for c, n in chunks])
    k_seq = torch.cat([torch.full((ctx.shape[3],), i) for i, ctx in enumerate(contexts)])
    k_pos = torch.cat([torch.arange(ctx.shape[3]) for ctx in contexts])
    with torch.no_grad():
        got = attention.packed(q, k, v, attention.packed_mask(q_seq, q_pos, k_seq, k_pos, window), D**-0.5, softcap)
    offset = 0
    for (c, n), ctx in zip(chunks, contexts, strict=True):
        want = attention.reference(q[:, :, offset : offset + n], ctx[0][:, :, : c + n], ctx[1][:, :, : c + n],
                                   D**-0.5, softcap, window)
        torch.testing.assert_close(got[:, :, offset : offset + n], want, rtol=1e-5, atol=1e-5)
        offset += n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_flex_attention_forward_and_backward_on_a_gpu():
    """Training's attention on a GPU: FlexAttention with the soft cap and a window, bf16, values and
    gradients against the reference computed in float32."""
    from flatstack.kernels import attention

    H, Hkv, D, T = 48, 8, 128, 1000
    gen = torch.Generator("cuda").manual_seed(0)
    inputs = [torch.randn(1, h, T, D, device="cuda", generator=gen) for h in (H, Hkv, Hkv)]
    grad = torch.randn(1, H, T, D, device="cuda", generator=gen)
    results = []
    for fn, dtype in ((attention.flex, torch.bfloat16), (attention.reference, torch.float32)):
        q, k, v = (t.to(dtype).requires_grad_() for t in inputs)
        out = fn(q, k, v, D**-0.5, 30.0, 256)
        out.backward(grad.to(dtype))
        results.append([t.float() for t in (out, q.grad, k.grad, v.grad)])
    for got, want in zip(*results, strict=True):
        assert (got - want).norm() / want.norm() < 2e-2
