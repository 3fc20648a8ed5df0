"""The engine's settings: one validated dataclass, the single source of their defaults and help text for
`LLM`, the CLI (whose options are derived from these fields) and the server."""

from __future__ import annotations

from dataclasses import dataclass, field

DTYPES = ("float32", "bfloat16", "float16")
QUANTIZE = ("int8", "int4")


def setting(default, help: str, **extra):
    """A field whose metadata the CLI turns into an option: `help`, and `choices` or `size` (a byte count
    written like 8M) where they apply. Imports nothing heavy: the CLI reads it to build its options."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class EngineConfig:
    dtype: str | None = setting(None, "weights dtype (default: as stored)", choices=DTYPES)
    device: str | None = setting(None, "cpu or cuda (default: cpu)")
    kv_cache_memory: int = setting(1 << 30, "bytes of KV cache", size=True)
    block_size: int = setting(16, "tokens per KV block")
    max_num_seqs: int = setting(64, "sequences per step")
    max_num_batched_tokens: int = setting(512, "tokens per step")
    prefix_caching: bool = setting(True, "reuse the KV blocks of prompt prefixes seen before")
    quantize: str | None = setting(None, "weight-only quantisation for inference", choices=QUANTIZE)
    enforce_eager: bool = setting(False, "decode op by op in torch: no C decode step, no compiled graph (slower)")
    seed: int | None = setting(None, "seed of the random seeds given to requests without one")
    tp: int = setting(1, "tensor-parallel ranks: processes of this machine that split the model's heads and "
                         "feed-forward (KV cache memory is per rank)")

    def __post_init__(self) -> None:
        if self.dtype is not None and not isinstance(self.dtype, str):  # a torch.dtype
            self.dtype = str(self.dtype).removeprefix("torch.")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}; got {self.dtype!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "kv_cache_memory", "tp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {QUANTIZE}; got {self.quantize!r}")

    @property
    def torch_dtype(self):
        import torch

        return None if self.dtype is None else getattr(torch, self.dtype)
