"""The Triton paged decode kernel (kernels/paged_decode_triton.py) held to `paged_attention.reference`: on the
CPU under Triton's interpreter, in float32 and float16 (the interpreter's bfloat16 tl.dot is not exact), and
compiled, in bfloat16 and inside a CUDA graph, where there is a GPU."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton (the gpu extra)")

from conftest import rel_err  # noqa: E402

from flatstack.kernels import paged_attention as pa  # noqa: E402

KERNEL = Path(pa.__file__).with_name("paged_decode_triton.py")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}


@pytest.fixture(scope="module")
def interpreted_module():
    """The kernel module loaded afresh, under its own name, with TRITON_INTERPRET=1 while `@triton.jit` runs:
    its kernels run on CPU tensors, and the module that the rest of the process imports (compiled, on a GPU)
    is left as it is."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec = importlib.util.spec_from_file_location("_paged_decode_interpreted", KERNEL)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before
    return module


@pytest.fixture
def interpreted(interpreted_module, monkeypatch):
    """Triton's own library functions (tl.max, tl.sum, tl.cdiv, ...) were made when triton was imported,
    compiled ones unless TRITON_INTERPRET was set then (another test file may have imported triton first):
    for each test they are swapped for interpreted ones, and put back after it, so that compiled kernels
    in the rest of the process see triton as it was."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for name, value in list(vars(tl).items()):
        if isinstance(value, JITFunction):
            monkeypatch.setattr(tl, name, InterpretedFunction(value.fn))
    return interpreted_module


def paged_case(lengths, group=4, Hkv=2, D=64, bs=16, dtype=torch.float32, spare=2, seed=0, device="cpu"):
    """q, pools and tables for sequences of `lengths`: their blocks scattered over the pool in shuffled
    order, every table `spare` entries wider than the longest needs, padded with random valid block ids."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // bs) for n in lengths]
    blocks = sum(need) + 3
    k_pool, v_pool = torch.randn(2, Hkv, blocks, bs, D, generator=gen).to(dtype)
    tables = torch.randint(0, blocks, (len(lengths), max(need) + spare), generator=gen)
    order = torch.randperm(blocks, generator=gen).tolist()
    for b, n in enumerate(need):
        tables[b, :n] = torch.tensor(order[:n], dtype=tables.dtype)
        order = order[n:]
    q = torch.randn(len(lengths), group * Hkv, D, generator=gen).to(dtype)
    lengths = torch.tensor(lengths)
    return [t.to(device) for t in (q, k_pool, v_pool, tables, lengths)]


LENGTHS = [1, 15, 16, 17, 40, 100]  # one position to several blocks of 16, across block edges


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("softcap, window", [(None, None), (2.0, None), (None, 20), (2.0, 33)])
@pytest.mark.parametrize("splits", [1, 3])
def test_interpreted_kernel_equals_the_reference(interpreted, dtype, softcap, window, splits):
    """Three splits leave the one-position sequence two splits with no keys: they must add nothing."""
    q, k_pool, v_pool, tables, lengths = paged_case(LENGTHS, dtype=dtype)
    out = interpreted.paged_decode(q, k_pool, v_pool, tables, lengths, 0.25, softcap, window, splits)
    ref = pa.reference(q, k_pool, v_pool, tables, lengths, 0.25, softcap, window)
    assert out.dtype == dtype and rel_err(out, ref) <= TOLERANCE[dtype]
    # in float16 the reference rounds its logits to float16 and the kernel does not: against the exact
    # answer (the same inputs in float32) the kernel is closer still
    exact = pa.reference(q.float(), k_pool.float(), v_pool.float(), tables, lengths, 0.25, softcap, window)
    assert rel_err(out, exact) <= max(TOLERANCE[dtype], 1e-3 if dtype == torch.float16 else 0)


@pytest.mark.parametrize("group, D", [(1, 64), (8, 64), (4, 128)])
def test_interpreted_kernel_over_gqa_ratios_and_head_dims(interpreted, group, D):
    """Splits chosen by the kernel itself; int32 tables; q strided as the runner passes it (a transposed view)."""
    q, k_pool, v_pool, tables, lengths = paged_case([7, 70, 33], group=group, D=D, seed=group)
    q = q.transpose(0, 1).contiguous().transpose(0, 1)
    out = interpreted.paged_decode(q, k_pool, v_pool, tables.int(), lengths, D**-0.5, 3.0, None)
    assert rel_err(out, pa.reference(q, k_pool, v_pool, tables, lengths, D**-0.5, 3.0)) <= 1e-5


@pytest.mark.parametrize("splits", [1, 3])
def test_interpreted_kernel_with_grok2s_temperature(interpreted, splits):
    """Grok-2: the capped logits of a query past position 12 times log2(p) / log2(12), in every split."""
    q, k_pool, v_pool, tables, lengths = paged_case(LENGTHS, group=2, seed=5)
    out = interpreted.paged_decode(q, k_pool, v_pool, tables, lengths, 0.25, 2.0, None, splits, temperature_len=12)
    ref = pa.reference(q, k_pool, v_pool, tables, lengths, 0.25, 2.0, None, 12)
    assert rel_err(out, ref) <= 1e-5
    assert rel_err(pa.reference(q, k_pool, v_pool, tables, lengths, 0.25, 2.0), ref) > 1e-3


def test_interpreted_kernel_with_small_blocks_and_an_odd_head_dim(interpreted):
    """Blocks of 8 (several to a tl.dot tile) and head_dim 80 (padded to 128 inside the kernel)."""
    q, k_pool, v_pool, tables, lengths = paged_case([5, 29, 64], group=2, D=80, bs=8, seed=7)
    out = interpreted.paged_decode(q, k_pool, v_pool, tables, lengths, 0.1, None, 9, 2)
    assert rel_err(out, pa.reference(q, k_pool, v_pool, tables, lengths, 0.1, None, 9)) <= 1e-5


@pytest.mark.parametrize("splits", [1, 4])
def test_a_sequence_with_no_positions_gets_zeros_not_nan(interpreted, splits):
    """A padding slot of a captured batch (length 0) sees no keys in any split: zeros, like the reference."""
    q, k_pool, v_pool, tables, lengths = paged_case([0, 18], group=2)
    out = interpreted.paged_decode(q, k_pool, v_pool, tables, lengths, 0.125, 30.0, None, splits)
    assert not out.isnan().any() and (out[0] == 0).all()
    assert rel_err(out, pa.reference(q, k_pool, v_pool, tables, lengths, 0.125, 30.0)) <= 1e-5


def test_splits_follow_the_shapes(interpreted):
    choose = interpreted.choose_splits
    assert choose(1, 8, 256) == 32  # one sequence: split its context as far as allowed
    assert choose(8, 8, 256) == 4  # 64 programs: about two waves over 132 SMs (5), as a power of two
    assert choose(3, 8, 256) == 8  # 11 wanted: every count a power of two, so few compiled variants
    assert choose(64, 8, 256) == 1  # the batch fills the GPU already
    assert choose(1, 8, 6) == 1  # too short to be worth a combine


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_kernel_in_bfloat16_and_in_a_cuda_graph():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set: the kernel would not be compiled")
    lengths = [4096, 1, 17, 1000, 2048, 333, 3999, 64]
    q, k_pool, v_pool, tables, lens = paged_case(lengths, group=6, Hkv=8, D=128, dtype=torch.bfloat16, spare=0,
                                                 device="cuda")

    def check(out):
        ref = pa.reference(q.float(), k_pool.float(), v_pool.float(), tables, lens, 128**-0.5, 30.0)
        assert out.dtype == torch.bfloat16 and rel_err(out, ref) <= 1e-2

    check(pa.decode_attention(q, k_pool, v_pool, tables, lens, 128**-0.5, 30.0))  # dispatches to Triton
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = pa.decode_attention(q, k_pool, v_pool, tables, lens, 128**-0.5, 30.0)
    lens.copy_(torch.tensor([1, 4096, 2500, 16, 15, 3000, 7, 4095]))  # new lengths, in place
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    check(out)
