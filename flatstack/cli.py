"""`flatstack <command>`: the user's entry point. The options of each command (those of the engine and the
server derived from their config dataclasses); what the commands do is commands.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from dataclasses import fields

from flatstack.commands import (
    cmd_bench,
    cmd_chat,
    cmd_convert,
    cmd_generate,
    cmd_info,
    cmd_plan,
    cmd_prepare,
    cmd_serve,
    cmd_train,
    field_types,
)


def parse_size(text: str) -> int:
    """'8M' -> 8388608; plain integers as they are."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        if text[-1:].upper() in units:
            return int(float(text[:-1]) * units[text[-1].upper()])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1000000, 8M, 2G)") from None


def size_text(n: int) -> str:
    """1073741824 -> '1G': a size as parse_size reads it."""
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def add_config_args(s: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """An option for each field of a config dataclass: its default, help text and choices are the
    dataclass's own (a True boolean becomes --no-NAME)."""
    types = field_types(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        base, _ = types[f.name]
        option, meta = "--" + f.name.replace("_", "-"), f.metadata
        shown = size_text(f.default) if meta.get("size") else f.default
        default = f" (default {shown})" if f.default not in (None, False, True, "") else ""
        if base is bool:
            flag = f"--no-{f.name.replace('_', '-')}" if f.default else option
            s.add_argument(flag, dest=f.name, action="store_false" if f.default else "store_true",
                           help=("do not " if f.default else "") + meta["help"])
            continue
        kind = parse_size if meta.get("size") else base
        s.add_argument(option, type=kind, default=f.default, choices=meta.get("choices"),
                       help=meta["help"] + default)


def add_engine_args(s: argparse.ArgumentParser) -> None:
    from flatstack.engine.config import EngineConfig

    s.add_argument("model", help="a native checkpoint, a Hugging Face folder or a .gguf file")
    add_config_args(s, EngineConfig, skip=("seed",))  # --seed is the sampling seed on these commands


def add_sampling_args(s: argparse.ArgumentParser, temperature: float) -> None:
    s.add_argument("--max-tokens", "--max-new-tokens", dest="max_tokens", type=int, default=256)
    s.add_argument("--temperature", type=float, default=temperature)
    s.add_argument("--top-k", type=int, default=0, help="0: all tokens")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--min-p", type=float, default=0.0)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--presence-penalty", type=float, default=0.0)
    s.add_argument("--frequency-penalty", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    s.add_argument("--ignore-eos", action="store_true")
    s.add_argument("--logprobs", type=int, default=None, help="log-probabilities of the chosen and top-N tokens")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flatstack", description="A complete LLM stack in a few flat modules.")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (add_checkpoint_commands, add_training_commands, add_inference_commands, add_bench_command):
        add(sub)
    return p


def add_checkpoint_commands(sub) -> None:
    from flatstack.engine.config import DTYPES

    s = sub.add_parser("info", help="parameters, FLOPs per token and bytes of a preset or checkpoint")
    s.add_argument("src", help="a preset name (an unknown name lists them), a checkpoint folder or a .gguf file")
    s.add_argument("--context", type=int, default=None, help="context for attention FLOPs (default: max_seq_len)")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("plan", help="how a model lays out on N GPUs (memory per GPU, step time), computed here")
    s.add_argument("src", help="a preset name, a checkpoint folder or a .gguf file")
    s.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    s.add_argument("--gpu", choices=("h100", "h200", "b200", "gb300"), default="h200", help="the card (default h200)")
    mode = s.add_mutually_exclusive_group()
    mode.add_argument("--train", action="store_true", help="a training layout (the default)")
    mode.add_argument("--serve", action="store_true", help="a serving layout")
    s.add_argument("--seq-len", type=int, default=8192, help="train: sequence length; serve: context (default 8192)")
    s.add_argument("--batch-tokens", type=int, default=None,
                   help="train: tokens per step (default: one sequence per GPU)")
    s.add_argument("--no-activation-checkpointing", action="store_true",
                   help="train: every layer keeps its activations for the backward")
    s.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw", help="train: its state's size")
    s.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel GPUs per group (train default 1; serve default: the fewest that fit)")
    s.add_argument("--ep", type=int, default=1, help="train: expert-parallel GPUs (default 1)")
    s.add_argument("--dp", type=int, default=None, help="data-parallel groups, checked against --gpus / --tp")
    s.add_argument("--json", action="store_true", help="print the plan as JSON")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("convert", help="import a foreign checkpoint into the native format")
    s.add_argument("src", help="a Hugging Face folder, a .gguf file (llama architecture), or a Grok-1 "
                   ".npz/.safetensors of xAI-named arrays")
    s.add_argument("dst", help="the native checkpoint folder to write")
    s.add_argument("--from", dest="source", required=True, choices=("hf", "gguf", "xai-grok1", "dcp"))
    s.add_argument("--config", help="config JSON (xai-grok1 only; default: the grok-1 preset)")
    s.add_argument("--dtype", choices=DTYPES, help="cast the weights (default: keep)")
    s.set_defaults(func=cmd_convert)


def add_training_commands(sub) -> None:
    s = sub.add_parser("prepare", help="text, folders or JSON Lines -> tokenizer and token shards")
    s.add_argument("inputs", nargs="+", help="text files, folders (recursive), .jsonl with 'text' or 'messages'")
    s.add_argument("--out", required=True, help="DATA_DIR to write")
    s.add_argument("--tokenizer", default="bpe", help="bpe (trained), byte, char, or a tokenizer.json / "
                   "checkpoint folder to reuse (default: bpe)")
    s.add_argument("--vocab-size", type=int, default=4096, help="for --tokenizer bpe (default 4096)")
    s.add_argument("--val-fraction", type=float, default=0.1, help="the tail of each file (and a hash-chosen "
                   "share of JSONL records) kept for validation (default 0.1)")
    s.add_argument("--include", action="append", default=[], help="glob on file names inside folders, e.g. '*.py'")
    s.add_argument("--exclude", action="append", default=[], help="glob on paths to skip, e.g. '*/test/*'")
    s.add_argument("--max-bytes", type=parse_size, default=None, help="read at most this much input (e.g. 8M)")
    s.add_argument("--shard-tokens", type=parse_size, default=1 << 26, help="tokens per shard file")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("train", help="train from scratch, continue, or fine-tune",
                       epilog="Any TrainConfig field (--max-steps, --eval-every, --ckpt-every, --seed, --lr, "
                       "--optimizer adamw|muon, --schedule cosine|wsd|constant, --batch-size, --seq-len, "
                       "--batch-tokens, --compile, ...) or ModelConfig field for presets (--d-model, --n-layers, "
                       "...) can be given as --key value.")
    s.add_argument("--data", help="DATA_DIR from flatstack prepare")
    s.add_argument("--model", help="a preset name (see flatstack info) or a checkpoint (default grok-1-tiny)")
    s.add_argument("--out", help="RUN_DIR (default runs/run)")
    s.add_argument("--init-from", help="a checkpoint to fine-tune or continue (native or Hugging Face)")
    s.add_argument("--config", help="a TOML file of settings ([model_overrides] table for model fields)")
    s.add_argument("--resume", action="store_true", help="continue RUN_DIR from its last checkpoint")
    s.add_argument("--nproc", type=int, default=1,
                   help="train on N ranks of this machine: starts torchrun (FSDP2 data parallel; --batch-size is "
                   "the global batch). On several machines, run torchrun yourself: docs/distributed.md")
    s.set_defaults(func=cmd_train)


def add_inference_commands(sub) -> None:
    from flatstack.server.config import ServerConfig

    s = sub.add_parser("generate", help="generate from a model with the batching engine")
    add_engine_args(s)
    s.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    s.add_argument("--prompts-file", help="one prompt per line, or JSON Lines with 'prompt' or 'messages'")
    s.add_argument("--chat", action="store_true", help="send each prompt as a user turn through the chat template")
    s.add_argument("--jsonl", action="store_true", help="one JSON object per prompt: text, token ids, finish "
                   "reason, prompt and cached tokens (and logprobs)")
    add_sampling_args(s, temperature=0.8)
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("chat", help="chat with a model in the terminal, streaming its answers")
    add_engine_args(s)
    s.add_argument("--system", help="a system message to start with")
    add_sampling_args(s, temperature=0.7)
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server over the engine")
    add_engine_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    s.add_argument("--port", type=int, default=8000)
    add_config_args(s, ServerConfig)
    s.set_defaults(func=cmd_serve)


def add_bench_command(sub) -> None:
    from flatstack.engine.config import QUANTIZE

    s = sub.add_parser("bench", help="benchmarks against this machine's ceilings and a same-run baseline")
    s.add_argument("what", choices=("train", "decode", "throughput", "serve", "kernels"))
    s.add_argument("url", nargs="?", metavar="URL_OR_MODEL", help="serve: the server's URL, e.g. "
                   "http://127.0.0.1:8000; decode, throughput: the model (or --model)")
    s.add_argument("--json-out", help="also write the JSON report here")
    s.add_argument("--small", action="store_true", help="train, kernels: tiny shapes, a quick check that it runs")
    s.add_argument("--batch", type=int, default=8, help="train: sequences per step (default 8)")
    s.add_argument("--warmup", type=int, default=2, help="train: untimed steps first (default 2)")
    s.add_argument("--steps", type=int, default=3, help="train: timed steps; the median is reported (default 3)")
    s.add_argument("--no-compile", action="store_true", help="train: flatstack without torch.compile")
    s.add_argument("--device", help="cpu or cuda (default: train, kernels: cuda if available; decode, "
                   "throughput: cpu); on cuda in bf16")
    s.add_argument("--model", help="decode, throughput: a .gguf file, a Hugging Face folder or a checkpoint; "
                   "serve: the model the server serves (for the step roofline), or to start with --startup")
    s.add_argument("--quantize", choices=QUANTIZE, help="decode, throughput, serve --startup: weight-only "
                   "quantisation; serve URL: the server's (for the step roofline's weight bytes)")
    s.add_argument("--dtype", choices=("float32", "bfloat16"), help="decode on the CPU: the model's dtype "
                   "(default: as stored; a GGUF file's quantised tensors load as float32)")
    s.add_argument("--no-baseline", action="store_true", help="decode, throughput: skip transformers")
    s.add_argument("--prompt-tokens", type=int, default=128, help="decode: prompt length (default 128)")
    s.add_argument("--max-tokens", type=int, default=128, help="decode: tokens generated (default 128)")
    s.add_argument("--llama-cpp", action="store_true",
                   help="decode: also llama.cpp on the .gguf file at the same precision (F32, BF16, Q8_0, Q4_1; "
                   "re-saved once into ~/.cache/flatstack/gguf); needs pip install -e '.[bench]'")
    s.add_argument("--repeats", type=int, default=3,
                   help="decode: runs, each between two bandwidth measurements; the median is reported (default 3)")
    s.add_argument("--num-requests", type=int, default=32, help="throughput, serve: requests (default 32)")
    s.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64],
                   help="serve: max concurrencies to run, each a load of its own (default 1 4 16 64)")
    s.add_argument("--request-rate", type=float, default=float("inf"),
                   help="serve: Poisson arrivals per second (default inf: all at once, up to the concurrency)")
    s.add_argument("--api-key", help="serve: the server's API key")
    s.add_argument("--preset", choices=("roofline",), help="serve: roofline = concurrency 1 4 16 64, prompts "
                   "of 128 tokens, 128 output tokens (each level runs at least as many requests as its concurrency)")
    s.add_argument("--startup", action="store_true", help="serve: start `flatstack serve --model` twice (cold and "
                   "warm compile cache) and time /health and the first token from process start")
    s.add_argument("--prompt-range", type=int, nargs=2, default=[64, 256], metavar=("MIN", "MAX"),
                   help="throughput, serve: prompt lengths drawn uniformly (default 64 256)")
    s.add_argument("--output-range", type=int, nargs=2, default=[32, 128], metavar=("MIN", "MAX"),
                   help="throughput, serve: output lengths drawn uniformly (default 32 128)")
    s.add_argument("--baseline-batch", type=int, default=8, help="throughput: transformers batch (default 8)")
    s.set_defaults(func=cmd_bench)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "train":
            args.func(args, extra)
        else:
            args.func(args)
    except (ValueError, OSError) as e:
        print(f"flatstack {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


def run() -> None:
    """The `flatstack` program: main, then exit. Two kinds of process end without tearing the interpreter
    down, once output is flushed and nothing else is left to do: one whose decode graphs are still
    compiling on their own thread (the teardown can abort in C++ mid-compile), and a torchrun rank, whose
    distributed objects (gloo's transport, the meshes' groups) can abort in their C++ destructors at exit
    ("terminate called without an active exception") after the job has finished and written everything."""
    code = main()
    compiling = any(t.name == "flatstack-compile" and t.is_alive() for t in threading.enumerate())
    if compiling or "TORCHELASTIC_RUN_ID" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
