"""Tensor parallel for training: in every block, q, k, v and the MLP's gate and up projections split by
output (column parallel: each rank its heads and hidden units), `wo` and `w_down` by input (row parallel:
partial sums, all-reduced), through torch's DTensor parallel styles. The ranks of a TP group see the same
batch; FSDP2 shards everything over the data-parallel dimension of the 2-D mesh.

What stays whole on each TP rank: embedding, norms, LM head and, in MoE layers, router and experts (they
take expert parallel instead). Attention counts its heads from its projections, so the model runs
unchanged on its share. Inference splits the same way with plain tensors (engine/tensor_parallel.py)."""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh

from flatstack.model import MLP, Transformer


def apply_tensor_parallel(model: Transformer, mesh: DeviceMesh) -> None:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    cfg, tp = model.cfg, mesh.size()
    for name, value in (("n_kv_heads", cfg.n_kv_heads), ("ffn_dim", cfg.ffn_dim),
                        ("residual_ffn_dim", cfg.residual_ffn_dim)):
        if value % tp:
            raise ValueError(f"tensor parallel over {tp} ranks needs {name} ({value}) divisible by {tp}")
    plan = {"attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(), "attn.wv": ColwiseParallel(),
            "attn.wo": RowwiseParallel()}
    for block in model.layers:
        mlps = [name for name in ("ffn", "mlp") if isinstance(getattr(block, name, None), MLP)]  # mlp: Grok-2's
        mlp = {f"{name}.{w}": style for name in mlps
               for w, style in (("w_gate", ColwiseParallel()), ("w_up", ColwiseParallel()),
                                ("w_down", RowwiseParallel()))}
        parallelize_module(block, mesh, {**plan, **mlp})
