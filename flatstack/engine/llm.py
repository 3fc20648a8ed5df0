"""The engine and its offline API: `LLM(path).generate(prompts, SamplingParams(...))`.

A step is schedule, run, postprocess: the scheduler picks the step's sequences and tokens, the runner
forwards them, the scheduler books what was computed, and the output processor samples, detokenises,
stops and says what each request gained. `generate` and `stream` drive `step`; the server drives it from
the engine loop's thread (loop.py).
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from tokenizers import Tokenizer

from flatstack.engine.block_manager import BlockManager
from flatstack.engine.config import EngineConfig
from flatstack.engine.output import OutputProcessor, RequestOutput
from flatstack.engine.runner import ModelRunner, kv_bytes_per_token
from flatstack.engine.sampling import RequestError, SamplingParams
from flatstack.engine.scheduler import Scheduler
from flatstack.engine.sequence import Sequence
from flatstack.engine.tensor_parallel import Ranks, load_shard, rank_device, shard_model
from flatstack.model import Transformer
from flatstack.tokenizer import EOS, IM_END, chat_template_of, render_chat


def check_text(text: str, param: str) -> None:
    """Text must be encodable as UTF-8: JSON lets a client send a lone surrogate ("\\ud800"), which the
    tokenizer cannot take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"{param} is not valid Unicode: a lone surrogate at character {e.start}", param) from None


class LLM:
    """The engine over one model. `model` is a path (native checkpoint, Hugging Face folder, .gguf file)
    or a `Transformer`, which is then adapted in place for inference (its linears swapped for the
    kernels/linear.py ones, its blocks' weights stacked for the compiled decode steps), so pass a copy of
    a model that is still training. `settings` are EngineConfig's fields."""

    def __init__(self, model: str | os.PathLike | Transformer, tokenizer: Tokenizer | str | os.PathLike | None = None,
                 **settings):
        self.config = config = EngineConfig(**settings)
        # tensor parallel: the other ranks start loading their shards while this one loads its own
        self.ranks = Ranks(model, asdict(config), config.tp) if config.tp > 1 else None
        try:
            self.start(model, tokenizer)
        except BaseException:
            self.close()  # the other ranks stop too
            raise
        self.rng = random.Random(config.seed)
        self.requests: dict[str, Sequence] = {}
        self.counter = itertools.count()

    def start(self, model, tokenizer) -> None:
        """This rank's model and tokenizer, then the engine's parts around them."""
        config = self.config
        if self.ranks is not None and not isinstance(model, Transformer):  # this rank's share, read alone
            source = model
            model = load_shard(source, 0, config.tp, config.torch_dtype, rank_device(config.device, 0))
            tokenizer = tokenizer if tokenizer is not None else source
        elif self.ranks is not None:
            shard_model(model, 0, config.tp)
        stored = stored_blocks(model, config)
        self.model, self.tokenizer, files = load_model_and_tokenizer(model, tokenizer, config)
        num_blocks = self.kv_blocks()
        if self.ranks is not None:
            self.ranks.send(num_blocks)
        self.chat_template = chat_template_of(files, self.tokenizer)
        self.blocks = BlockManager(num_blocks, config.block_size, config.prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        # the CPU's compiled decode graphs and CUDA graphs are not built around the ranks' all-reduces
        self.runner = ModelRunner(self.model, num_blocks, config.block_size, config.quantize or "float",
                                  compile_decode=not config.enforce_eager and config.tp == 1,
                                  max_num_seqs=config.max_num_seqs, ranks=self.ranks, stored=stored)
        self.eos_ids = eos_ids(self.model, self.tokenizer)
        self.outputs = OutputProcessor(self.tokenizer, self.eos_ids, self.scheduler)

    def kv_blocks(self) -> int:
        config = self.config
        per_block = config.block_size * kv_bytes_per_token(self.model, self.model.tok_embeddings.weight.dtype)
        if config.kv_cache_memory < per_block:
            raise ValueError(f"--kv-cache-memory {config.kv_cache_memory} bytes holds no block of "
                             f"{config.block_size} tokens ({per_block} bytes)")
        return config.kv_cache_memory // per_block

    def close(self) -> None:
        """Stop the other ranks of a tensor-parallel engine (also done at exit)."""
        if self.ranks is not None:
            self.ranks.close()

    # -- requests -------------------------------------------------------------------------------

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            check_text(prompt, "prompt")
            # encode_batch lets go of the GIL while it works (encode does not): a long prompt
            # tokenised on a server's worker thread does not stall its event loop or the engine
            return self.tokenizer.encode_batch([prompt])[0].ids
        if not isinstance(prompt, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise RequestError(f"a prompt is a string or a list of token ids; got {type(prompt).__name__}", "prompt")
        return list(prompt)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise RequestError("this model has no chat template", "messages")
        ids = {"bos_token": self.model.cfg.bos_token_id, "eos_token": min(self.eos_ids, default=None)}
        special = {name: (self.tokenizer.id_to_token(i) if i is not None else None) or "" for name, i in ids.items()}
        return render_chat(self.chat_template, messages, add_generation_prompt, **special)

    def check_request(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """The prompt's token ids, once the request is known to fit: the vocabulary, the context, the KV
        pool. Touches no queue, so the server checks requests on its worker threads."""
        ids = self.encode(prompt)
        cfg = self.model.cfg
        if not ids:
            raise RequestError("the prompt is empty", "prompt")
        bad = next((t for t in ids if not 0 <= t < cfg.vocab_size), None)
        if bad is not None:
            raise RequestError(f"prompt token id {bad} is outside the vocabulary of size {cfg.vocab_size}", "prompt")
        if len(ids) >= cfg.max_seq_len:
            raise RequestError(f"the prompt has {len(ids)} tokens; the model's context is {cfg.max_seq_len}", "prompt")
        if len(ids) + params.max_tokens > cfg.max_seq_len:
            raise RequestError(f"max_tokens {params.max_tokens} + {len(ids)} prompt tokens exceeds the model's "
                               f"context of {cfg.max_seq_len} (at most {cfg.max_seq_len - len(ids)} new tokens)",
                               "max_tokens")
        need = self.blocks.blocks_for(len(ids) + params.max_tokens)
        if need > len(self.blocks.blocks):
            raise RequestError(f"the prompt and max_tokens need {need} KV blocks; the cache holds "
                               f"{len(self.blocks.blocks)} (raise --kv-cache-memory)", "max_tokens")
        return ids

    def make_sequence(self, prompt: str | list[int], params: SamplingParams | None = None,
                      request_id: str | None = None) -> Sequence:
        params = params or SamplingParams()
        return self.sequence(self.check_request(prompt, params), params, request_id)

    def sequence(self, ids: list[int], params: SamplingParams, request_id: str | None = None) -> Sequence:
        """The sequence of a request `check_request` has passed (its ids), with the request's own RNG."""
        seed = params.seed if params.seed is not None else self.rng.getrandbits(63)
        request_id = request_id if request_id is not None else str(next(self.counter))
        # its own list: the prompt grows into the sequence's tokens, and choices of a request share the ids
        return Sequence(request_id, list(ids), len(ids), params, torch.Generator(self.runner.device).manual_seed(seed))

    def add_sequence(self, seq: Sequence) -> str:
        if seq.request_id in self.requests:
            raise RequestError(f"request id {seq.request_id!r} is already in use")
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq.request_id

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Check and queue a request; a bad one raises RequestError and leaves the engine as it was."""
        return self.add_sequence(self.make_sequence(prompt, params, request_id))

    def abort(self, request_id: str) -> None:
        """Drop a request now; its blocks return to the pool at once."""
        seq = self.requests.pop(request_id, None)
        if seq is not None and not seq.finished:
            self.scheduler.finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- stepping -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One forward pass over the scheduled batch; an output for every request that advanced."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        logits = self.runner.run(scheduled)
        outputs = self.outputs.process(self.scheduler.postprocess(scheduled), logits)
        for out in outputs:
            if out.finished:
                self.requests.pop(out.request_id, None)
        return outputs

    def warm_up(self, wait: bool = False) -> None:
        """Start compiling the decode graphs now rather than at the first decode step; requests are served
        eagerly until they are ready. `wait`: return once they are (and raise if compiling failed)."""
        if wait:
            self.runner.wait_compiled()
        else:
            self.runner.start_compiling()

    # -- offline API ----------------------------------------------------------------------------

    def generate(self, prompts: str | list[int] | list[str | list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = False) -> list[RequestOutput]:
        """Outputs in prompt order, once every prompt has finished."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise RequestError(f"{len(params_list)} sampling parameters for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, p in zip(prompts, params_list, strict=True):
                ids.append(self.add_request(prompt, p))
        except RequestError:
            for request_id in ids:
                self.abort(request_id)
            raise
        finals: dict[str, RequestOutput] = {}
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), unit="req")
        while len(finals) < len(ids):
            for out in self.step():
                if out.finished:
                    finals[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [finals[i] for i in ids]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Outputs of one request as it advances (other queued requests advance with it)."""
        request_id = self.add_request(prompt, params)
        try:
            while True:
                for out in self.step():
                    if out.request_id == request_id:
                        yield out
                        if out.finished:
                            return
        finally:
            self.abort(request_id)

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> RequestOutput:
        return self.generate([self.apply_chat_template(messages)], params)[0]

    @property
    def decode_path(self) -> str:
        """What serves decode steps now: "cuda_graphs" (GPU), "native" (the C step), "compiled", "compiling"
        (eager meanwhile) or "eager"."""
        return self.runner.decode_path

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the whole KV pool holds."""
        return len(self.blocks.blocks) * self.blocks.block_size

    @property
    def stats(self) -> dict:
        b = self.blocks
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_blocks_used": b.num_used,
            "kv_blocks_free": b.num_free,
            "kv_pool_bytes": self.runner.pool.nbytes,
            "prefix_cache_hit_rate": b.cached_tokens / b.prompt_tokens if b.prompt_tokens else 0.0,
            "preemptions": self.scheduler.num_preemptions,
        }


def stored_blocks(model, config: EngineConfig) -> dict | None:
    """Quantised inference from a GGUF file: its weights already in the format asked for, as stored."""
    from flatstack.checkpoint import detect_format
    from flatstack.checkpoint.gguf import stored_linears

    if config.quantize is None or isinstance(model, Transformer) or config.tp > 1 or detect_format(model) != "gguf":
        return None
    return stored_linears(Path(model), config.quantize)


def load_model_and_tokenizer(model, tokenizer, config: EngineConfig) -> tuple[Transformer, Tokenizer, dict]:
    """The model (loaded unless given), its tokenizer, and the tokenizer files found beside it."""
    from flatstack.checkpoint import load, tokenizer_files

    files: dict[str, str] = {}
    source = tokenizer if tokenizer is not None else model
    if not isinstance(model, Transformer):
        path, model = model, load(model, dtype=config.torch_dtype, device=config.device)
        files = tokenizer_files(path)  # after the weights: a bad file's weights are what its error names
    if isinstance(tokenizer, Tokenizer):
        return model, tokenizer, files
    if tokenizer is not None:
        files = tokenizer_files(tokenizer)
    if "tokenizer.json" not in files:
        raise ValueError(f"{source} has no tokenizer.json; pass tokenizer=")
    return model, Tokenizer.from_str(files["tokenizer.json"]), files


def eos_ids(model: Transformer, tokenizer: Tokenizer) -> set[int]:
    """The model's end-of-sequence ids, or else the tokenizer's end-of-text and end-of-turn tokens."""
    eos = model.cfg.eos_token_id
    if eos is None:
        eos = [i for i in (tokenizer.token_to_id(EOS), tokenizer.token_to_id(IM_END)) if i is not None]
    return set(eos if isinstance(eos, list) else [eos])
