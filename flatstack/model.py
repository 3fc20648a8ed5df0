"""One Transformer for Grok-1, Grok-2, Llama, Mistral, Qwen2/3 and Mixtral, for training and inference alike.

The architectures differ only in switches on `ModelConfig`: how norms wrap each block, the
feed-forward activation, dense or mixture-of-experts, attention-logit scale and soft cap, q/k norm,
q/k/v bias, embedding and output multipliers. Training calls `model(tokens)` on whole sequences;
inference passes a `KVCache` and the position of the first new token, and the same attention code
writes and reads it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from flatstack.kernels import attention, moe


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"silu": F.silu, "gelu_tanh": gelu_tanh, "gelu": F.gelu}  # gelu: the exact erf form (Grok-2)


@dataclass
class ModelConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    max_seq_len: int = 2048
    # feed-forward: "silu" (Llama, Qwen, Mixtral), "gelu_tanh" (Grok-1) or "gelu" (Grok-2) gates the up projection
    activation: str = "silu"
    # mixture of experts: 0 means a dense feed-forward
    n_experts: int = 0
    experts_per_token: int = 2
    renormalize_topk: bool = True  # Mixtral renormalises the top-k router weights; Grok-1 does not
    router_logit_softcap: float | None = None  # Grok-2: cap * tanh(logits / cap) before the router's softmax
    residual_ffn_dim: int = 0  # Grok-2: a dense MLP of this width beside the experts, (mlp + moe) / sqrt(2)
    # norms: "pre" (one RMSNorm before attention and one before the FFN) or "sandwich" (Grok-1:
    # also one after each, before the residual add)
    norm_layout: str = "pre"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"type": "llama3", "factor", "low_freq_factor", ...}
    attn_logit_scale: float | None = None  # None: 1/sqrt(head_dim)
    attn_logit_softcap: float | None = None  # Grok-1: 30 * tanh(logits / 30)
    # Grok-2: capped logits times log2(p) / log2(L) for a query at 0-based position p > L
    attn_temperature_len: int | None = None
    sliding_window: int | None = None  # Mistral: each query sees at most this many keys
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    qkv_bias: bool = False  # Qwen2
    embedding_multiplier: float = 1.0
    output_multiplier: float = 1.0
    final_logit_softcap: float | None = None  # Grok-2: cap * tanh(logits * output_multiplier / cap)
    tied_embeddings: bool = False
    # token ids the tokenizer treats as special; kept so a checkpoint carries them
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict = field(default_factory=dict)  # provenance, never read by the model

    def __post_init__(self) -> None:
        checks = {
            "vocab_size": self.vocab_size > 0,
            "d_model": self.d_model > 0,
            "n_layers": self.n_layers > 0,
            "n_heads": self.n_heads > 0,
            "n_kv_heads": self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0,
            "head_dim": self.head_dim > 0 and self.head_dim % 2 == 0,
            "ffn_dim": self.ffn_dim > 0,
            "activation": self.activation in ACTIVATIONS,
            "norm_layout": self.norm_layout in ("pre", "sandwich"),
            "experts_per_token": self.n_experts == 0 or 0 < self.experts_per_token <= self.n_experts,
            "residual_ffn_dim": self.residual_ffn_dim >= 0 and (self.residual_ffn_dim == 0 or self.is_moe),
            "attn_temperature_len": self.attn_temperature_len is None or self.attn_temperature_len > 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            name = bad[0]
            raise ValueError(f"invalid ModelConfig.{name}={getattr(self, name)!r} (config: {self})")
        scaling = self.rope_scaling
        if scaling is not None and (not isinstance(scaling, dict) or scaling.get("type") != "llama3"):
            raise ValueError(f"unsupported rope_scaling {self.rope_scaling!r}; supported: type 'llama3'")

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)


GROK1 = ModelConfig(
    vocab_size=131072, d_model=6144, n_layers=64, n_heads=48, n_kv_heads=8, head_dim=128,
    ffn_dim=32768, max_seq_len=8192, activation="gelu_tanh", n_experts=8, experts_per_token=2,
    renormalize_topk=False, norm_layout="sandwich", rms_norm_eps=1e-5, rope_theta=10000.0,
    attn_logit_scale=None, attn_logit_softcap=30.0,  # None: 1/sqrt(head_dim), Grok-1's 0.0884 at 128
    embedding_multiplier=78.38367176906169, output_multiplier=0.5773502691896257, tied_embeddings=True,
)

# xAI's Grok-2 release (config.json of xai-org/grok-2, as SGLang reads it): 8 experts of 16,384 beside a dense
# MLP of 32,768, soft caps on attention (30), router (30) and output (50), plain RoPE at theta 208,533,496
GROK2 = ModelConfig(
    vocab_size=131072, d_model=8192, n_layers=64, n_heads=64, n_kv_heads=8, head_dim=128, ffn_dim=16384,
    max_seq_len=131072, activation="gelu", n_experts=8, experts_per_token=2, renormalize_topk=False,
    router_logit_softcap=30.0, residual_ffn_dim=32768, norm_layout="sandwich", rms_norm_eps=1e-5,
    rope_theta=208533496.0, attn_logit_softcap=30.0, attn_temperature_len=1024,
    embedding_multiplier=90.50966799187809, output_multiplier=0.5, final_logit_softcap=50.0, tied_embeddings=False,
)

PRESETS: dict[str, ModelConfig] = {
    "grok-1": GROK1,
    # Grok-1's architecture at the size of the xAI reference fixture; byte-sized vocabulary.
    "grok-1-tiny": replace(
        GROK1, vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
        ffn_dim=344, max_seq_len=256, embedding_multiplier=8.0,
    ),
    "grok-2": GROK2,
    # Grok-2's architecture at a test's size; byte-sized vocabulary, the temperature from position 64
    "grok-2-tiny": replace(
        GROK2, vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
        residual_ffn_dim=256, max_seq_len=256, attn_temperature_len=64, embedding_multiplier=8.0,
    ),
    "llama-3.2-1b": ModelConfig(
        vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
        ffn_dim=8192, max_seq_len=131072, rope_theta=500000.0, tied_embeddings=True,
        rope_scaling={"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        bos_token_id=128000, eos_token_id=128001,
    ),
    "qwen3-0.6b": ModelConfig(
        vocab_size=151936, d_model=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128,
        ffn_dim=3072, max_seq_len=40960, rope_theta=1000000.0, rms_norm_eps=1e-6, qk_norm=True,
        tied_embeddings=True, eos_token_id=151645,
    ),
    "mixtral-8x7b": ModelConfig(
        vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
        ffn_dim=14336, max_seq_len=32768, rope_theta=1000000.0, n_experts=8, experts_per_token=2,
        bos_token_id=1, eos_token_id=2,
    ),
    "smollm2-135m": ModelConfig(
        vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
        ffn_dim=1536, max_seq_len=8192, rope_theta=100000.0, tied_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# ---------------------------------------------------------------------------------------------
# ops


class RMSNorm(nn.Module):
    """RMSNorm in float32 whatever the activation dtype (as Grok-1 and Llama do), cast back after."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)


def rope_frequencies(cfg: ModelConfig, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] in float32, with Llama 3's long-context rescaling if set."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device).float() / cfg.head_dim))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    # Llama 3.1+: long wavelengths are slowed by `factor`, short ones kept, a smooth blend between.
    old_ctx = s["original_max_position_embeddings"]
    low_wavelen = old_ctx / s["low_freq_factor"]
    high_wavelen = old_ctx / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
    smooth = (old_ctx / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    blended = (1 - smooth) * scaled / s["factor"] + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos and sin [T, head_dim] for the half-rotation layout (first half pairs with second half)."""
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]. Rotates the pair (x[i], x[i + D/2]), as Grok-1 and Hugging Face Llama do."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# ---------------------------------------------------------------------------------------------
# KV cache: the seam between training and inference


class KVCache:
    """Contiguous per-layer keys and values [B, n_kv_heads, max_len, head_dim].

    Attention hands the cache its queries and the new keys and values of positions start..start+T;
    the cache stores them and runs `attend` over everything cached up to start+T. The engine's paged
    batch offers the same `attend` over block tables, so the model does not know which one it writes to.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device=None):
        self.k: list[torch.Tensor | None] = [None] * cfg.n_layers
        self.v: list[torch.Tensor | None] = [None] * cfg.n_layers
        self.batch, self.max_len, self.dtype, self.device = batch, max_len, dtype, device

    def attend(self, layer: int, q, k, v, start: int, attend):
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        if self.k[layer] is None:  # sized by the first keys: a tensor-parallel rank holds only its heads
            shape = (self.batch, k.shape[1], self.max_len, k.shape[3])
            self.k[layer] = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.v[layer] = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return attend(q, self.k[layer][:, :, :end], self.v[layer][:, :, :end])


# ---------------------------------------------------------------------------------------------
# blocks


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, q_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.d_model, kv_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.d_model, kv_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(q_dim, cfg.d_model, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.scale = cfg.attn_logit_scale if cfg.attn_logit_scale is not None else cfg.head_dim**-0.5

    def forward(self, x, cos, sin, start: int = 0, cache: KVCache | None = None):
        cfg = self.cfg
        B, T, _ = x.shape
        # heads counted from the projections: a tensor-parallel rank holds only its share of them
        q = self.wq(x).view(B, T, -1, cfg.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, -1, cfg.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, -1, cfg.head_dim).transpose(1, 2)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = self.attend(q, k, v) if cache is None else cache.attend(self.layer, q, k, v, start, self.attend)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))

    def attend(self, q, k, v):
        """q: [B, H, T, D]; k, v: [B, Hkv, S, D]; the T queries are the last T of the S positions (causal,
        within the sliding window)."""
        cfg = self.cfg
        H, T, S, Hkv = q.shape[1], q.shape[2], k.shape[2], k.shape[1]
        plain = cfg.attn_logit_softcap is None and cfg.sliding_window is None and cfg.attn_temperature_len is None
        if plain:
            # Fast path: fused attention; a bottom-right causal mask when queries are the last T keys.
            mask = None if T == S else attention.causal_mask(T, S, None, q.device)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=T == S > 1, scale=self.scale,
                                                  enable_gqa=H != Hkv)
        # a soft cap, a window or a temperature: FlexAttention on GPUs, where it never builds the [T, S] logits
        # and has a backward; on the CPU (forward only, and compiled per shape) the reference
        attend = attention.flex if q.device.type == "cuda" else attention.reference
        return attend(q, k, v, self.scale, cfg.attn_logit_softcap, cfg.sliding_window, cfg.attn_temperature_len)


class MLP(nn.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, width: int | None = None):
        super().__init__()
        width = width or cfg.ffn_dim
        self.w_gate = nn.Linear(cfg.d_model, width, bias=False)
        self.w_up = nn.Linear(cfg.d_model, width, bias=False)
        self.w_down = nn.Linear(width, cfg.d_model, bias=False)
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x):
        return self.w_down(self.act(self.w_gate(x)) * self.w_up(x))


class MoE(nn.Module):
    """Softmax router over all experts, top-k, each token sent to its k experts.

    Expert weights are stacked [E, out, in] so the whole layer is three tensors: what a grouped GEMM
    (kernels/moe.py, in bf16) or an expert-parallel shard wants. The training losses read the router's logits (load
    balance, z-loss) through a forward hook on `router` that the trainer installs.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        E, D, Fd = cfg.n_experts, cfg.d_model, cfg.ffn_dim
        self.router = nn.Linear(D, E, bias=False)
        self.w_gate = nn.Parameter(torch.empty(E, Fd, D))
        self.w_up = nn.Parameter(torch.empty(E, Fd, D))
        self.w_down = nn.Parameter(torch.empty(E, D, Fd))
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x):
        shape = x.shape
        x, experts, weights, w = self.route(x.reshape(-1, shape[-1]))
        return run_experts(x, experts, weights, w, self.act).view(shape)

    def route(self, x: torch.Tensor):
        """Tokens [N, D] -> (tokens, their k experts [N, k], weights [N, k], the expert stacks), the tokens,
        weights and stacks in the dtype the expert products run in."""
        cfg = self.cfg
        logits = self.router(x).float()  # routing in float32, as both references do
        if cfg.router_logit_softcap is not None:
            logits = cfg.router_logit_softcap * torch.tanh(logits / cfg.router_logit_softcap)
        probs = torch.softmax(logits, dim=-1)
        weights, experts = probs.topk(cfg.experts_per_token, dim=-1)
        if cfg.renormalize_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        w = (self.w_gate, self.w_up, self.w_down)
        if torch.is_autocast_enabled(x.device.type):  # autocast does not reach the expert products: cast as it would
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w = x.to(dtype), tuple(t.to(dtype) for t in w)
        return x, experts, weights.to(x.dtype), w


def run_experts(x, experts, weights, w, act) -> torch.Tensor:
    """Each token [N, D] through its experts [N, k] of the stacks `w`, summed with its weights [N, k]."""
    run = moe.grouped if moe.grouped_ok(x, w[0]) else moe.reference
    return run(x, experts, weights, *w, act)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.sandwich = cfg.norm_layout == "sandwich"
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.ffn = MoE(cfg) if cfg.is_moe else MLP(cfg)
        if cfg.residual_ffn_dim:
            self.mlp = MLP(cfg, cfg.residual_ffn_dim)
        if self.sandwich:
            self.post_attn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
            self.post_ffn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, start: int = 0, cache: KVCache | None = None):
        h = self.attn(self.attn_norm(x), cos, sin, start, cache)
        if self.sandwich:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.ffn_norm(x)
        h = self.ffn(h) if not hasattr(self, "mlp") else (self.ffn(h) + self.mlp(h)) * 2**-0.5
        if self.sandwich:
            h = self.post_ffn_norm(h)
        return x + h


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # an uninitialised table (init_weights or a checkpoint fills it): on the meta device, the default
        # normal_ init alone would import a second of torch's reference decompositions
        table = torch.empty(cfg.vocab_size, cfg.d_model)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model, _weight=table)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        if not cfg.tied_embeddings:
            self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def init_weights(self, seed: int | None = None, std: float = 0.02) -> Transformer:
        """Normal(0, std) matrices, residual outputs scaled by 1/sqrt(2 * n_layers), unit norms."""
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(seed)
        for name, p in self.named_parameters():
            if p.ndim == 1:
                data = torch.ones(p.shape) if name.endswith("norm.weight") else torch.zeros(p.shape)
            else:
                residual_out = name.endswith(("wo.weight", "w_down", "w_down.weight"))
                s = std / math.sqrt(2 * self.cfg.n_layers) if residual_out else std
                data = torch.randn(p.shape, generator=gen) * s
            with torch.no_grad():
                p.copy_(data.to(p.dtype))
        return self

    @property
    def head_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.cfg.tied_embeddings else self.output.weight

    # The parts, in the order a forward pass takes them; callers that run the blocks their own way (the
    # engine's paged and compiled steps, the trainer's activation checkpointing) compose these.

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok_embeddings(tokens)
        return x * self.cfg.embedding_multiplier if self.cfg.embedding_multiplier != 1.0 else x

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, head_dim] at the given positions."""
        return rope_cos_sin(rope_frequencies(self.cfg, positions.device), positions, dtype)

    def logits(self, hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """The LM head: final hidden states [..., D] -> logits [..., V]; `head` is a replacement product
        for the head's weight (the engine's fused or quantised one)."""
        cfg = self.cfg
        logits = F.linear(hidden, self.head_weight) if head is None else head(hidden)
        logits = logits * cfg.output_multiplier if cfg.output_multiplier != 1.0 else logits
        if cfg.final_logit_softcap is not None:
            logits = cfg.final_logit_softcap * torch.tanh(logits / cfg.final_logit_softcap)
        return logits

    def hidden(self, tokens: torch.Tensor, start: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        """tokens [B, T] at positions start.. -> the final normed hidden states [B, T, D], before the LM
        head. Training feeds these to the fused head-and-loss op, so the logits never exist whole."""
        T = tokens.shape[1]
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} positions exceeds max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(tokens)
        cos, sin = self.rope(torch.arange(start, start + T, device=tokens.device), x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, start, cache)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor, start: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        """tokens [B, T] int64 -> logits [B, T, V], the token ids checked first. With a cache, tokens sit at
        positions start.."""
        check_tokens(tokens, self.cfg.vocab_size)
        return self.logits(self.hidden(tokens, start, cache))


def check_tokens(tokens: torch.Tensor, vocab_size: int) -> None:
    if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"token ids must be an integer tensor [B, T]; got {tokens.dtype} {tuple(tokens.shape)}")
    if tokens.numel() == 0:
        raise ValueError("token ids are empty")
    bad = (tokens < 0) | (tokens >= vocab_size)
    if bad.any():
        raise ValueError(f"token id {int(tokens[bad][0])} is outside the vocabulary of size {vocab_size}")


# ---------------------------------------------------------------------------------------------
# counting


@dataclass
class ModelStats:
    total_params: int
    active_params: int  # per token: top-k of the experts, embeddings counted once
    flops_per_token: int  # forward, matmuls only, at `context` tokens of attention
    context: int


def model_stats(cfg: ModelConfig, context: int | None = None) -> ModelStats:
    """Parameters and forward FLOPs per token, from the real module built on the meta device."""
    with torch.device("meta"):
        model = Transformer(cfg)
    total = active = 0
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        is_expert = ".ffn.w_" in name and cfg.is_moe
        active += n * cfg.experts_per_token // cfg.n_experts if is_expert else n
    context = context or cfg.max_seq_len
    # Every weight except the embedding lookup is one multiply-add per token; the LM head is a matmul
    # even when tied. Attention scores and values: 2 * 2 * heads * head_dim per key, causal average.
    matmul_params = active if cfg.tied_embeddings else active - cfg.vocab_size * cfg.d_model
    attn = 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * (context // 2)
    return ModelStats(total, active, 2 * matmul_params + attn, context)
