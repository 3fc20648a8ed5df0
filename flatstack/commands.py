"""What each `flatstack <command>` does, once cli.py has parsed its options. Errors the user can fix are
CommandError (or ValueError, OSError): cli.main prints them as one line, not a traceback.

Each command imports what it needs when it runs, so `flatstack prepare` never loads torch.
"""

from __future__ import annotations

import json
import os
import sys
import typing
from dataclasses import fields
from pathlib import Path


class CommandError(ValueError):
    """A command that cannot go on; main prints its message as one line."""


def human(n: float, suffixes: str = "KMBT") -> str:
    """1234567 -> '1.2M'; with suffixes 'KMGT' for bytes."""
    for power in (4, 3, 2, 1):
        if abs(n) >= 1000**power:
            return f"{n / 1000**power:.1f}{suffixes[power - 1]}"
    return f"{n:.0f}"


def resolve_config(src: str):
    """A preset name or a checkpoint folder (native or Hugging Face) -> its config, without loading weights."""
    from flatstack.checkpoint import read_config
    from flatstack.model import PRESETS

    if src in PRESETS:
        return f"preset {src}", PRESETS[src]
    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(f"{src!r} is neither a preset ({', '.join(PRESETS)}) nor an existing path")
    return f"{'GGUF file' if path.suffix == '.gguf' else 'checkpoint'} {path}", read_config(path)


def cmd_plan(args) -> None:
    from flatstack.parallel.plan import CARDS, describe, plan_serving, plan_training

    if args.gpus < 1:
        raise CommandError(f"--gpus must be >= 1; got {args.gpus}")
    _, cfg = resolve_config(args.src)
    card = CARDS[args.gpu]
    if args.serve and args.ep > 1:
        raise CommandError("expert-parallel serving is not built: serving splits each expert by tensor parallel (--tp)")
    try:
        if args.serve:
            plan = plan_serving(cfg, args.gpus, card, args.seq_len, args.tp)
        else:
            tokens = args.batch_tokens or args.seq_len * args.gpus
            plan = plan_training(cfg, args.gpus, card, args.seq_len, tokens, args.optimizer,
                                 not args.no_activation_checkpointing, args.tp or 1, args.ep)
    except ValueError as e:
        raise CommandError(str(e)) from None
    if args.dp is not None and args.dp != plan["dp"]:
        raise CommandError(f"--dp {args.dp} does not match the layout: {args.gpus} GPUs at tensor parallel "
                           f"{plan['tp']} leave {plan['dp']} data-parallel groups")
    print(json.dumps(plan, indent=1) if args.json else describe(plan))


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


def cmd_prepare(args) -> None:
    from flatstack.data import PrepareConfig, prepare

    cfg = PrepareConfig(inputs=args.inputs, out=args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                        val_fraction=args.val_fraction, include=args.include, exclude=args.exclude,
                        max_bytes=args.max_bytes, shard_tokens=args.shard_tokens, progress=not args.quiet)
    meta = prepare(cfg)
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    print(f"wrote {args.out}: vocabulary {meta['vocab_size']} ({meta['tokenizer']}), {train['tokens']} train "
          f"and {val['tokens']} validation tokens ({meta['dtype']}), {len(meta['sources'])} source files")


def field_types(cls) -> dict[str, tuple[type, bool]]:
    """A config dataclass's fields -> (base type, whether None is allowed), from its resolved annotations."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if args else hint
        out[name] = (typing.get_origin(base) or base, type(None) in typing.get_args(hint))
    return out


def convert_value(kind: tuple[type, bool], raw: str | None, option: str):
    """A command-line string to the type a config field declares."""
    base, optional = kind
    if raw is None:
        if base is not bool:
            raise CommandError(f"--{option} needs a value")
        return True
    if optional and raw.lower() == "none":
        return None
    try:
        if base is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return raw.lower() in ("true", "1", "yes")
        if base in (int, float, str):
            return base(raw)
        return json.loads(raw)
    except ValueError:
        raise CommandError(f"--{option}: expected {base.__name__}, got {raw!r}") from None


def config_from_args(cls, args, **given):
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if f.name not in given}, **given)


def parse_overrides(tokens: list[str]) -> tuple[dict, dict]:
    """`--key value` pairs -> (TrainConfig fields, ModelConfig fields); dashes or underscores both work."""
    from flatstack.model import ModelConfig
    from flatstack.train import TrainConfig

    train_types, model_types = field_types(TrainConfig), field_types(ModelConfig)
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


def start_torchrun(nproc: int) -> None:
    """Become `torchrun --nproc-per-node N -m flatstack train ...` (the same arguments, less --nproc)."""
    argv, args = [], iter(sys.argv[1:])
    for a in args:
        if a == "--nproc":
            next(args, None)
        elif not a.startswith("--nproc="):
            argv.append(a)
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                              "--standalone", "-m", "flatstack", *argv])


def cmd_train(args, extra: list[str]) -> None:
    from flatstack.train import TrainConfig, TrainingError, train

    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        start_torchrun(args.nproc)
    base: dict = {}
    if args.resume:
        saved = Path(args.out or "") / "config.json"
        if not args.out or not saved.exists():
            raise CommandError(f"--resume needs --out RUN_DIR of an earlier run (no {saved})")
        base = json.loads(saved.read_text())
        for layout in ("tp", "ep"):  # how the ranks split the work is this launch's, not the run's
            base.pop(layout, None)
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
    if os.environ.get("RANK", "0") != "0":
        return  # rank 0 reports the run
    if result.get("val_loss") is not None:
        print(f"validation loss {result['val_loss']:.4f}, bits per byte {result['val_bpb']:.4f}")
    print(f"checkpoint: {result['checkpoint']}")
    print(f"loss curve: {result['loss_curve']}")
    if result["stopped"]:
        raise SystemExit(130)


def engine_from_args(args):
    from flatstack.engine import LLM
    from flatstack.engine.config import EngineConfig

    return LLM(args.model, **vars(config_from_args(EngineConfig, args, seed=None)))


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
    config = config_from_args(ServerConfig, args, served_model_name=args.served_model_name or Path(args.model).name)
    serve(llm, config, args.host, args.port)


def cmd_bench(args) -> None:
    from flatstack import bench

    show = lambda report: print(json.dumps(report, indent=1))  # noqa: E731
    if args.what == "serve":
        report = bench_serve_report(args)
    elif args.what == "kernels":
        from flatstack.bench_kernels import bench_kernels

        report = bench_kernels(args.device, args.small)
    elif args.what == "train":
        from flatstack import bench_train

        report = bench_train.bench_train(small=args.small, batch=args.batch, warmup=args.warmup,
                                         steps=args.steps, compile=not args.no_compile, device=args.device)
        show = bench_train.print_train_report
    else:
        report = bench_model_report(args)
        show = bench.print_decode_report if args.what == "decode" else show
    show(report)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1) + "\n")


def bench_serve_report(args) -> dict:
    from flatstack import bench_serve

    if args.startup:
        if not args.model:
            raise CommandError("bench serve --startup needs --model: the checkpoint to serve")
        return bench_serve.bench_startup(args.model, ["--quantize", args.quantize] if args.quantize else [])
    if not args.url:
        raise CommandError("bench serve needs the server's URL (flatstack bench serve http://127.0.0.1:8000), "
                           "or --startup --model CKPT")
    vars(args).update(bench_serve.PRESETS[args.preset] if args.preset else {})
    return bench_serve.bench_serve(args.url, args.concurrency, args.num_requests, args.request_rate,
                                   tuple(args.prompt_range), tuple(args.output_range), args.api_key,
                                   model_path=args.model, quantize=args.quantize, device=args.device)


def bench_model_report(args) -> dict:
    """decode and throughput: the model is --model or the positional argument."""
    from flatstack import bench

    model = args.model or args.url
    if not model:
        raise CommandError(f"bench {args.what} needs a model (a .gguf file or a Hugging Face folder for the "
                           "transformers baseline; a native checkpoint with --no-baseline)")
    if args.what == "throughput":
        return bench.bench_throughput(model, args.num_requests, tuple(args.prompt_range), tuple(args.output_range),
                                      args.quantize, not args.no_baseline, args.baseline_batch, device=args.device)
    if args.repeats < 1:
        raise CommandError(f"--repeats must be at least 1; got {args.repeats}")
    if args.llama_cpp:
        from flatstack.bench_llama_cpp import require_llama_cpp

        require_llama_cpp(model, args.device)
    return bench.bench_decode(model, args.prompt_tokens, args.max_tokens, args.quantize, not args.no_baseline,
                              args.repeats, args.llama_cpp, args.device, args.dtype)
