"""Decode steps on the CPU in one C call (kernels/decode_step.c): every block of a dense model (float32 or
bfloat16; the step's activations are float32 either way) over the step's tokens (decodes, and short prompt
chunks beside them, a row per token), the products in the C kernels of whatever format the weights are in
(kernels/linear_rows.c), attention through the block tables, the new keys and values written into the pool.
No compile: it serves from the first step, for any number of sequences.

`NativeDecode.supports` says which models it runs (dense, float32 or bfloat16, weights the kernels read);
the others keep the compiled or eager paths. The C structs point into the model's own tensors, which this
object keeps alive; the model must not be moved or re-loaded while it is in use.
"""

from __future__ import annotations

import ctypes

import torch

from flatstack.kernels import native
from flatstack.model import Transformer

ACTIVATION_CODES = {"silu": 0, "gelu_tanh": 1, "gelu": 2}
NORMS = ("attn_norm", "ffn_norm", "post_attn_norm", "post_ffn_norm", "q_norm", "k_norm")
PRODUCTS = ("q", "k", "v", "o", "gate", "up", "down")


class Layer(ctypes.Structure):
    _fields_ = [*((name, ctypes.c_void_p) for name in NORMS), *((name, native.Linear) for name in PRODUCTS),
                ("k_pool", ctypes.c_void_p), ("v_pool", ctypes.c_void_p)]


class Model(ctypes.Structure):
    _fields_ = [*((name, ctypes.c_int64) for name in ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim",
                                                      "ffn_dim", "num_blocks", "block_size", "activation",
                                                      "window", "temperature_len", "kv_bf16")),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("softcap", ctypes.c_float),
                ("layers", ctypes.POINTER(Layer)), ("final_norm", ctypes.c_void_p), ("head", native.Linear)]


def block_products(block) -> dict:
    attn, ffn = block.attn, block.ffn
    return {"q": attn.wq, "k": attn.wk, "v": attn.wv, "o": attn.wo, "gate": ffn.w_gate, "up": ffn.w_up,
            "down": ffn.w_down}


def norm_weight(block, name: str) -> torch.Tensor | None:
    owner = block.attn if name in ("q_norm", "k_norm") else block
    norm = getattr(owner, name, None)
    return None if norm is None else norm.weight.data.float().contiguous()


class NativeDecode:
    """`head`: the engine's LM head linear; if the kernels read its format, the step ends with the final norm
    and the head's product, and `run` returns the logits before the output multiplier and soft cap."""

    def __init__(self, model: Transformer, k_pool: torch.Tensor, v_pool: torch.Tensor, head):
        cfg = model.cfg
        self.keep: list[torch.Tensor] = []  # the norms' float32 copies the structs point into
        layers = (Layer * cfg.n_layers)()
        for i, block in enumerate(model.layers):
            for name in NORMS:
                w = norm_weight(block, name)
                if w is not None:
                    self.keep.append(w)
                setattr(layers[i], name, native.address(w))
            for name, linear in block_products(block).items():
                setattr(layers[i], name, linear.kernel_weight())
            layers[i].k_pool, layers[i].v_pool = k_pool[i].data_ptr(), v_pool[i].data_ptr()
        self.layers, self.model = layers, model  # the model holds the weights the structs point into
        attn = model.layers[0].attn
        self.struct = Model(cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim,
                            k_pool.shape[2], k_pool.shape[3], ACTIVATION_CODES[cfg.activation],
                            cfg.sliding_window or 0, cfg.attn_temperature_len or 0, k_pool.dtype == torch.bfloat16,
                            cfg.rms_norm_eps, attn.scale, cfg.attn_logit_softcap or 0.0, layers)
        head_weight = head.kernel_weight()
        if head_weight is not None:
            self.final_norm = model.norm.weight.data.float().contiguous()
            self.struct.final_norm, self.struct.head = self.final_norm.data_ptr(), head_weight
        self.head = head  # holds the weights the struct points into
        self.vocab = None if head_weight is None else head_weight.n

    @staticmethod
    def supports(model: Transformer, pool_dtype: torch.dtype) -> bool:
        """Dense float32 or bfloat16 models on the CPU whose every product has a format the C kernels read."""
        cfg = model.cfg
        cpu = model.tok_embeddings.weight.device.type == "cpu"
        if cfg.is_moe or pool_dtype not in (torch.float32, torch.bfloat16) or not cpu or native.library() is None:
            return False
        return all(linear.kernel_weight() is not None for block in model.layers
                   for linear in block_products(block).values())

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor,
            lengths: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """x [M, D], the step's embedded tokens (a decode's one, or a prompt chunk's each), through every block
        (in place where float32); cos, sin [M, head_dim]; slots [M] the tokens' pool slots; tables [M, width]
        their sequences' tables; lengths [M] each token's context, itself included; heads [R] the rows that
        sample. -> the head's logits [R, V] at those rows if it has the head, else the last block's output x."""
        x, cos, sin = x.float().contiguous(), cos.float().contiguous(), sin.float().contiguous()
        slots, tables, lengths = slots.long().contiguous(), tables.long().contiguous(), lengths.long().contiguous()
        heads = heads.long().contiguous()
        logits = None if self.vocab is None else torch.empty(len(heads), self.vocab)
        native.library().decode_step(ctypes.byref(self.struct), x.data_ptr(), x.shape[0], cos.data_ptr(),
                                     sin.data_ptr(), slots.data_ptr(), tables.data_ptr(), tables.shape[1],
                                     lengths.data_ptr(), heads.data_ptr(), len(heads), native.address(logits))
        return x if logits is None else logits
