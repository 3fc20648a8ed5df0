"""`flatstack <command>`: the user's entry point. Errors the user can fix print one line, not a traceback.

Each command imports what it needs when it runs, so `flatstack prepare` never loads torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

PRESET_HELP = "grok-1, grok-1-tiny, llama-3.2-1b, qwen3-0.6b, mixtral-8x7b, smollm2-135m"


class CommandError(ValueError):
    """A command that cannot go on; main prints its message as one line."""


def human(n: float, suffixes: str = "KMBT") -> str:
    """1234567 -> '1.2M'; with suffixes 'KMGT' for bytes."""
    for power in (4, 3, 2, 1):
        if abs(n) >= 1000**power:
            return f"{n / 1000**power:.1f}{suffixes[power - 1]}"
    return f"{n:.0f}"


def parse_size(text: str) -> int:
    """'8M' -> 8388608; plain integers as they are."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        if text[-1:].upper() in units:
            return int(float(text[:-1]) * units[text[-1].upper()])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1000000, 8M, 2G)") from None


# ---------------------------------------------------------------------------------------------
# info, convert


def resolve_config(src: str):
    """A preset name or a checkpoint folder (native or Hugging Face) -> its config, without loading weights."""
    from flatstack.checkpoint import FORMAT_KEY, config_from_hf, native_config, open_gguf, read_json
    from flatstack.model import PRESETS

    if src in PRESETS:
        return f"preset {src}", PRESETS[src]
    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(f"{src!r} is neither a preset ({', '.join(PRESETS)}) nor an existing path")
    if path.suffix == ".gguf" and path.is_file():
        return f"GGUF file {path}", open_gguf(path)[2]
    raw = read_json(path / "config.json" if path.is_dir() else path)
    cfg = native_config(raw, path) if FORMAT_KEY in raw else config_from_hf(raw)
    return f"checkpoint {path}", cfg


def cmd_info(args) -> None:
    from flatstack.model import model_stats

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
    print(f"  parameters       {human(stats.total_params)} total, {human(stats.active_params)} active/token")
    print(f"  FLOPs per token  {human(stats.flops_per_token)} forward, {human(3 * stats.flops_per_token)} "
          f"training (at context {stats.context})")
    sizes = ", ".join(f"{k} {human(v, 'KMGT')}B" for k, v in report["weight_bytes"].items())
    print(f"  weight bytes     {sizes}")


def cmd_convert(args) -> None:
    import torch

    from flatstack.checkpoint import convert

    dtype = getattr(torch, args.dtype) if args.dtype else None
    print(f"wrote {convert(args.src, args.dst, args.source, args.config, dtype)}")


# ---------------------------------------------------------------------------------------------
# prepare, train, generate


def cmd_prepare(args) -> None:
    from flatstack.data import PrepareConfig, prepare

    cfg = PrepareConfig(inputs=args.inputs, out=args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                        val_fraction=args.val_fraction, include=args.include, exclude=args.exclude,
                        max_bytes=args.max_bytes, shard_tokens=args.shard_tokens, progress=not args.quiet)
    meta = prepare(cfg)
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    print(f"wrote {args.out}: vocabulary {meta['vocab_size']} ({meta['tokenizer']}), {train['tokens']} train "
          f"and {val['tokens']} validation tokens ({meta['dtype']}), {len(meta['sources'])} source files")


def convert_value(type_name: str, raw: str | None, option: str):
    """A command-line string to the type a config field declares (its annotation, as a string)."""
    optional = "None" in type_name
    base = type_name.replace(" | None", "").strip()
    if raw is None:
        if base != "bool":
            raise CommandError(f"--{option} needs a value")
        return True
    if optional and raw.lower() == "none":
        return None
    try:
        if base == "bool":
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return raw.lower() in ("true", "1", "yes")
        if base == "int":
            return int(raw)
        if base == "float":
            return float(raw)
        if base == "str":
            return raw
        return json.loads(raw)
    except ValueError:
        raise CommandError(f"--{option}: expected {base}, got {raw!r}") from None


def parse_overrides(tokens: list[str]) -> tuple[dict, dict]:
    """`--key value` pairs -> (TrainConfig fields, ModelConfig fields); dashes or underscores both work."""
    from flatstack.model import ModelConfig
    from flatstack.train import TrainConfig

    train_types = {f.name: f.type for f in fields(TrainConfig)}
    model_types = {f.name: f.type for f in fields(ModelConfig)}
    train_over, model_over = {}, {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise CommandError(f"unexpected argument {token!r}; options are --key value")
        option, _, inline = token[2:].partition("=")
        key = option.replace("-", "_")
        if inline:
            raw, i = inline, i + 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            raw, i = tokens[i + 1], i + 2
        else:
            raw, i = None, i + 1
        if key in train_types and key != "model_overrides":
            train_over[key] = convert_value(train_types[key], raw, option)
        elif key in model_types and key != "extra":
            model_over[key] = convert_value(model_types[key], raw, option)
        else:
            raise CommandError(f"unknown option --{option}; see `flatstack train --help` and the ModelConfig fields")
    return train_over, model_over


def read_toml(path: str) -> tuple[dict, dict]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise CommandError(f"--config {path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise CommandError(f"--config {path}: {e}") from None
    model = raw.pop("model_overrides", {})
    return {k.replace("-", "_"): v for k, v in raw.items()}, {k.replace("-", "_"): v for k, v in model.items()}


def cmd_train(args, extra: list[str]) -> None:
    from flatstack.train import TrainConfig, TrainingError, train

    base: dict = {}
    if args.resume:
        saved = Path(args.out or "") / "config.json"
        if not args.out or not saved.exists():
            raise CommandError(f"--resume needs --out RUN_DIR of an earlier run (no {saved})")
        base = json.loads(saved.read_text())
    toml_train, toml_model = read_toml(args.config) if args.config else ({}, {})
    cli_train, cli_model = parse_overrides(extra)
    named = {k: v for k, v in (("data", args.data), ("model", args.model), ("out", args.out),
                               ("init_from", args.init_from)) if v is not None}
    merged = {**base, **toml_train, **cli_train, **named}
    merged["model_overrides"] = {**base.get("model_overrides", {}), **toml_model, **cli_model}
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise CommandError(f"unknown training settings {unknown}")
    if not merged.get("data"):
        raise CommandError("--data DATA_DIR is required (make one with flatstack prepare)")
    try:
        result = train(TrainConfig(**merged), resume=args.resume)
    except TrainingError as e:
        raise CommandError(str(e)) from None
    if result.get("val_loss") is not None:
        print(f"validation loss {result['val_loss']:.4f}, bits per byte {result['val_bpb']:.4f}")
    print(f"checkpoint: {result['checkpoint']}")
    print(f"loss curve: {result['loss_curve']}")
    if result["stopped"]:
        raise SystemExit(130)


def add_engine_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("model", help="a native checkpoint, a Hugging Face folder or a .gguf file")
    s.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="weights dtype (default: as stored)")
    s.add_argument("--device", help="cpu or cuda (default cpu)")
    s.add_argument("--kv-cache-memory", type=parse_size, default="1G", help="bytes of KV cache (default 1G)")
    s.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    s.add_argument("--max-num-seqs", type=int, default=64, help="sequences per step (default 64)")
    s.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per step (default 512)")
    s.add_argument("--no-prefix-caching", action="store_true", help="do not reuse cached prompt blocks")
    s.add_argument("--quantize", choices=("int8", "int4"), help="weight-only quantisation for inference")
    s.add_argument("--enforce-eager", action="store_true",
                   help="do not compile the decode step's blocks (no compile wait; slower decoding)")


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


def engine_from_args(args):
    import torch

    from flatstack.engine import LLM

    return LLM(args.model, dtype=getattr(torch, args.dtype) if args.dtype else None, device=args.device,
               kv_cache_memory=args.kv_cache_memory, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens, prefix_caching=not args.no_prefix_caching,
               quantize=args.quantize, enforce_eager=args.enforce_eager)


def sampling_from_args(args):
    from flatstack.engine import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos,
        logprobs=args.logprobs)


def read_prompts(path: str) -> list[str | list[dict]]:
    """A prompts file: JSON Lines with "prompt" or "messages" per line, or else one prompt per line."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.lstrip().startswith("{"):
            prompts.append(line)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CommandError(f"{path}:{n}: not JSON: {e}") from None
        if isinstance(record.get("prompt"), str):
            prompts.append(record["prompt"])
        elif isinstance(record.get("messages"), list):
            prompts.append(record["messages"])
        else:
            raise CommandError(f"{path}:{n}: a JSON line needs a string 'prompt' or a 'messages' list")
    return prompts


def cmd_generate(args) -> None:
    prompts: list[str | list[dict]] = list(args.prompt) + (read_prompts(args.prompts_file) if args.prompts_file
                                                          else [])
    if not prompts:
        raise CommandError("give prompts with --prompt TEXT (repeatable) or --prompts-file FILE")
    params = sampling_from_args(args)
    llm = engine_from_args(args)
    rendered = [llm.apply_chat_template(p if isinstance(p, list) else [{"role": "user", "content": p}])
                if args.chat or isinstance(p, list) else p for p in prompts]
    outs = llm.generate(rendered, params, progress=len(prompts) > 1 and sys.stderr.isatty())
    for prompt, out in zip(prompts, outs, strict=True):
        if not args.jsonl:
            print(("" if args.chat or isinstance(prompt, list) else prompt) + out.text)
            continue
        record = {"prompt": prompt, "text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
                  "prompt_tokens": len(out.prompt_token_ids), "cached_prompt_tokens": out.num_cached_tokens}
        if out.logprobs is not None:
            record["logprobs"] = [{"token_id": lp.token_id, "logprob": lp.logprob, "top": lp.top}
                                  for lp in out.logprobs]
        print(json.dumps(record, ensure_ascii=False), flush=True)


def cmd_chat(args) -> None:
    """An interactive chat in the terminal: the model's chat template, tokens printed as they come."""
    llm = engine_from_args(args)
    params = sampling_from_args(args)
    llm.apply_chat_template([{"role": "user", "content": ""}])  # fail now if there is no template
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("flatstack chat: an empty line or Ctrl-D ends it; Ctrl-C stops an answer.", file=sys.stderr)
    while True:
        try:
            text = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if not text.strip():
            return
        messages.append({"role": "user", "content": text})
        answer = ""
        try:
            for out in llm.stream(llm.apply_chat_template(messages), params):
                print(out.delta_text, end="", flush=True)
                answer = out.text
        except KeyboardInterrupt:
            pass  # the stream's own cleanup aborts the request
        print()
        messages.append({"role": "assistant", "content": answer})


def cmd_serve(args) -> None:
    from flatstack.server import ServerConfig, serve

    llm = engine_from_args(args)
    name = args.served_model_name or Path(args.model).name
    config = ServerConfig(
        served_model_name=name, api_key=args.api_key, max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
        metrics_without_key=args.metrics_without_key, header_timeout=args.header_timeout,
        body_timeout=args.body_timeout, keep_alive_timeout=args.keep_alive_timeout,
        max_connections=args.max_connections, slow_reader_timeout=args.slow_reader_timeout)
    serve(llm, config, args.host, args.port)


def cmd_bench(args) -> None:
    from flatstack import bench

    if args.what == "serve":
        from flatstack import bench_serve

        if args.startup:
            if not args.model:
                raise CommandError("bench serve --startup needs --model: the checkpoint to serve")
            report = bench_serve.bench_startup(args.model, ["--quantize", args.quantize] if args.quantize else [])
        elif not args.url:
            raise CommandError("bench serve needs the server's URL (flatstack bench serve http://127.0.0.1:8000), "
                               "or --startup --model CKPT")
        else:
            report = bench_serve.bench_serve(args.url, args.concurrency, args.num_requests, args.request_rate,
                                             tuple(args.prompt_range), tuple(args.output_range), args.api_key)
        print(json.dumps(report, indent=1))
    elif args.what == "train":
        report = bench.bench_train(small=args.small, batch=args.batch, warmup=args.warmup, steps=args.steps,
                                   compile=not args.no_compile, device=args.device)
        bench.print_train_report(report)
    else:
        if not args.model:
            raise CommandError(f"bench {args.what} needs --model (a .gguf file or a Hugging Face folder for the "
                               "transformers baseline; a native checkpoint with --no-baseline)")
        if args.what == "decode":
            if args.repeats < 1:
                raise CommandError(f"--repeats must be at least 1; got {args.repeats}")
            if args.llama_cpp:
                import importlib.util

                if not args.model.endswith(".gguf"):
                    raise CommandError(f"--llama-cpp needs a .gguf file; got {args.model}")
                if importlib.util.find_spec("llama_cpp") is None:
                    raise CommandError("--llama-cpp needs llama-cpp-python: pip install llama-cpp-python")
            report = bench.bench_decode(args.model, args.prompt_tokens, args.max_tokens, args.quantize,
                                        not args.no_baseline, args.repeats, args.llama_cpp)
        else:
            report = bench.bench_throughput(args.model, args.num_requests, tuple(args.prompt_range),
                                            tuple(args.output_range), args.quantize, not args.no_baseline,
                                            args.baseline_batch)
        print(json.dumps(report, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flatstack", description="A complete LLM stack in a few flat modules.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="parameters, FLOPs per token and bytes of a preset or checkpoint")
    s.add_argument("src", help=f"a preset ({PRESET_HELP}), a checkpoint folder or a .gguf file")
    s.add_argument("--context", type=int, default=None, help="context for attention FLOPs (default: max_seq_len)")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("convert", help="import a foreign checkpoint into the native format")
    s.add_argument("src", help="a Hugging Face folder, a .gguf file (llama architecture), or a Grok-1 "
                   ".npz/.safetensors of xAI-named arrays")
    s.add_argument("dst", help="the native checkpoint folder to write")
    s.add_argument("--from", dest="source", required=True, choices=("hf", "gguf", "xai-grok1"))
    s.add_argument("--config", help="config JSON (xai-grok1 only; default: the grok-1 preset)")
    s.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="cast the weights (default: keep)")
    s.set_defaults(func=cmd_convert)

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
    s.add_argument("--model", help=f"a preset ({PRESET_HELP}) or a checkpoint (default grok-1-tiny)")
    s.add_argument("--out", help="RUN_DIR (default runs/run)")
    s.add_argument("--init-from", help="a checkpoint to fine-tune or continue (native or Hugging Face)")
    s.add_argument("--config", help="a TOML file of settings ([model_overrides] table for model fields)")
    s.add_argument("--resume", action="store_true", help="continue RUN_DIR from its last checkpoint")
    s.set_defaults(func=cmd_train)

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
    s.add_argument("--api-key", help="require Authorization: Bearer KEY on every route but /health")
    s.add_argument("--served-model-name", help="the model name clients ask for (default: the path's name)")
    s.add_argument("--max-queue", type=int, default=1024, help="sequences accepted at once; past it, 503")
    s.add_argument("--max-body-bytes", type=parse_size, default="4M", help="largest request body, chunked or "
                   "not (default 4M); past it, 413")
    s.add_argument("--metrics-without-key", action="store_true", help="serve /metrics without the API key")
    s.add_argument("--header-timeout", type=float, default=10.0, help="seconds for a new connection to send its "
                   "request's headers before it is closed (default 10)")
    s.add_argument("--body-timeout", type=float, default=30.0, help="seconds for a request body to arrive; "
                   "past it, 408 (default 30)")
    s.add_argument("--keep-alive-timeout", type=float, default=5.0, help="seconds an idle connection stays "
                   "open between requests (default 5)")
    s.add_argument("--max-connections", type=int, default=512, help="connections open at once; past it, 503 "
                   "(default 512)")
    s.add_argument("--slow-reader-timeout", type=float, default=30.0, help="a stream whose client reads "
                   "nothing this long is ended (default 30)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("bench", help="benchmarks against this machine's ceilings and a same-run baseline")
    s.add_argument("what", choices=("train", "decode", "throughput", "serve"))
    s.add_argument("url", nargs="?", help="serve: the server's URL, e.g. http://127.0.0.1:8000")
    s.add_argument("--json-out", help="also write the JSON report here")
    s.add_argument("--small", action="store_true", help="train: tiny models, a quick check that it runs")
    s.add_argument("--batch", type=int, default=8, help="train: sequences per step (default 8)")
    s.add_argument("--warmup", type=int, default=2, help="train: untimed steps first (default 2)")
    s.add_argument("--steps", type=int, default=3, help="train: timed steps; the median is reported (default 3)")
    s.add_argument("--no-compile", action="store_true", help="train: flatstack without torch.compile")
    s.add_argument("--device", help="train: cpu or cuda (default: cuda if available)")
    s.add_argument("--model", help="decode, throughput: a .gguf file, a Hugging Face folder or a checkpoint")
    s.add_argument("--quantize", choices=("int8", "int4"), help="decode, throughput: weight-only quantisation")
    s.add_argument("--no-baseline", action="store_true", help="decode, throughput: skip transformers")
    s.add_argument("--prompt-tokens", type=int, default=128, help="decode: prompt length (default 128)")
    s.add_argument("--max-tokens", type=int, default=128, help="decode: tokens generated (default 128)")
    s.add_argument("--llama-cpp", action="store_true",
                   help="decode: also llama.cpp on the same .gguf file (needs pip install llama-cpp-python)")
    s.add_argument("--repeats", type=int, default=3,
                   help="decode: runs, each between two bandwidth measurements; the median is reported (default 3)")
    s.add_argument("--num-requests", type=int, default=32, help="throughput, serve: requests (default 32)")
    s.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64],
                   help="serve: max concurrencies to run, each a load of its own (default 1 4 16 64)")
    s.add_argument("--request-rate", type=float, default=float("inf"),
                   help="serve: Poisson arrivals per second (default inf: all at once, up to the concurrency)")
    s.add_argument("--api-key", help="serve: the server's API key")
    s.add_argument("--startup", action="store_true", help="serve: start `flatstack serve --model` twice (cold and "
                   "warm compile cache) and time /health and the first token from process start")
    s.add_argument("--prompt-range", type=int, nargs=2, default=[64, 256], metavar=("MIN", "MAX"))
    s.add_argument("--output-range", type=int, nargs=2, default=[32, 128], metavar=("MIN", "MAX"))
    s.add_argument("--baseline-batch", type=int, default=8, help="throughput: transformers batch (default 8)")
    s.set_defaults(func=cmd_bench)
    return p


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


if __name__ == "__main__":
    sys.exit(main())
