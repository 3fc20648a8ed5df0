"""`flatstack <command>`: the user's entry point. Errors the user can fix print one line, never a traceback."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from flatstack.checkpoint import CONVERTERS, FORMAT_KEY, config_from_hf, convert, native_config, read_json
from flatstack.model import PRESETS, ModelConfig, model_stats

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_config(src: str) -> tuple[str, ModelConfig]:
    """A preset name or a checkpoint folder (native or Hugging Face) -> its config, without loading weights."""
    if src in PRESETS:
        return f"preset {src}", PRESETS[src]
    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(f"{src!r} is neither a preset ({', '.join(PRESETS)}) nor an existing path")
    raw = read_json(path / "config.json" if path.is_dir() else path)
    cfg = native_config(raw, path) if FORMAT_KEY in raw else config_from_hf(raw)
    return f"checkpoint {path}", cfg


def human(n: float, suffixes: str = "KMBT") -> str:
    """1234567 -> '1.2M'; with suffixes 'KMGT' for bytes."""
    for power in (4, 3, 2, 1):
        if abs(n) >= 1000**power:
            return f"{n / 1000**power:.1f}{suffixes[power - 1]}"
    return f"{n:.0f}"


def cmd_info(args) -> None:
    what, cfg = resolve_config(args.src)
    stats = model_stats(cfg, args.context)
    report = {
        "source": what,
        "config": cfg.to_dict(),
        "total_params": stats.total_params,
        "active_params_per_token": stats.active_params,
        "forward_flops_per_token": stats.flops_per_token,
        "train_flops_per_token": 3 * stats.flops_per_token,
        "flops_context": stats.context,
        "weight_bytes": {name: stats.total_params * bits // 8
                         for name, bits in (("float32", 32), ("bfloat16", 16), ("int8", 8), ("int4", 4))},
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return
    kind = f"MoE {cfg.n_experts} experts top-{cfg.experts_per_token}" if cfg.is_moe else "dense"
    print(f"{what}: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} query / {cfg.n_kv_heads} KV "
          f"heads of {cfg.head_dim}, FFN {cfg.ffn_dim}, {kind}, vocab {cfg.vocab_size}")
    print(f"  parameters       {human(stats.total_params)} total, {human(stats.active_params)} active per token")
    print(f"  FLOPs per token  {human(stats.flops_per_token)} forward, {human(3 * stats.flops_per_token)} "
          f"training (at context {stats.context})")
    print("  weight bytes     " + ", ".join(f"{k} {human(v, 'KMGT')}B" for k, v in report["weight_bytes"].items()))


def cmd_convert(args) -> None:
    out = convert(args.src, args.dst, args.source, args.config, DTYPES[args.dtype] if args.dtype else None)
    print(f"wrote {out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flatstack", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="parameters, FLOPs per token and bytes of a preset or checkpoint")
    s.add_argument("src", help=f"a preset ({', '.join(PRESETS)}) or a checkpoint folder")
    s.add_argument("--context", type=int, default=None, help="context length for attention FLOPs "
                   "(default: the model's max_seq_len)")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("convert", help="import a foreign checkpoint into the native format")
    s.add_argument("src", help="a Hugging Face folder, or a Grok-1 .npz/.safetensors of xAI-named arrays")
    s.add_argument("dst", help="the native checkpoint folder to write")
    s.add_argument("--from", dest="source", required=True, choices=CONVERTERS)
    s.add_argument("--config", help="config JSON (xai-grok1 only; default: the grok-1 preset)")
    s.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights (default: keep)")
    s.set_defaults(func=cmd_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError) as e:
        print(f"flatstack {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
