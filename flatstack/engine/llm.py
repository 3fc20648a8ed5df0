"""The engine and its offline API: `LLM(path).generate(prompts, SamplingParams(...))`.

`LLM` owns the model, the tokenizer, the block manager, the scheduler and the runner. `add_request`
checks a request and queues it; `step` runs one batched forward pass and returns what each request
gained (new tokens and text, and whether it finished). `generate` and `stream` drive `step`; the
server drives it from its own thread.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from flatstack.engine.block_manager import BlockManager
from flatstack.engine.runner import ModelRunner, kv_bytes_per_token
from flatstack.engine.sampling import RequestError, SamplingParams, TokenLogprob, sample, token_logprob
from flatstack.engine.scheduler import Scheduler
from flatstack.engine.sequence import Sequence
from flatstack.model import Transformer
from flatstack.tokenizer import EOS, IM_END, chat_template_of, render_chat

DEFAULT_KV_CACHE_MEMORY = 1 << 30


def check_text(text: str, param: str) -> None:
    """Text must be encodable as UTF-8: JSON lets a client send a lone surrogate ("\\ud800"), which the
    tokenizer cannot take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"{param} is not valid Unicode: a lone surrogate at character {e.start}", param) from None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    # every generated token so far (a stop token is not included), or only the new ones where the
    # request's output_kind is "delta"; the same for `text` and `logprobs`
    token_ids: list[int]
    text: str  # the decoded output so far, cut before a stop string
    delta_text: str  # what `text` gained since this request's last output (streaming)
    delta_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort" or "error"
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    logprobs: list[TokenLogprob] | None
    error: str | None = None  # why this request failed (finish_reason "error"); other requests go on


class LLM:
    """The engine over one model. `model` is a path (native checkpoint, Hugging Face folder, .gguf file)
    or a `Transformer`, which is then adapted in place for inference (its linears swapped for the
    kernels/linear.py ones, its blocks' weights stacked for the compiled decode steps, engine/runner.py),
    so pass a copy of a model that is still training."""

    def __init__(
        self,
        model: str | os.PathLike | Transformer,
        tokenizer: Tokenizer | str | os.PathLike | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        kv_cache_memory: int = DEFAULT_KV_CACHE_MEMORY,
        block_size: int = 16,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        prefix_caching: bool = True,
        quantize: str | None = None,
        enforce_eager: bool = False,
        seed: int | None = None,
    ):
        from flatstack.checkpoint import load, tokenizer_files

        files: dict[str, str] = {}
        if isinstance(model, Transformer):
            self.model = model
        else:
            self.model = load(model, dtype=dtype, device=device)
            files = tokenizer_files(model)
        if isinstance(tokenizer, Tokenizer):
            self.tokenizer = tokenizer
        elif tokenizer is not None:
            files = tokenizer_files(tokenizer)
            self.tokenizer = Tokenizer.from_str(files["tokenizer.json"])
        elif "tokenizer.json" in files:
            self.tokenizer = Tokenizer.from_str(files["tokenizer.json"])
        else:
            raise ValueError(f"{model} has no tokenizer.json; pass tokenizer=")
        self.chat_template = chat_template_of(files, self.tokenizer)
        cfg = self.model.cfg
        if block_size < 1 or max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("block_size, max_num_seqs and max_num_batched_tokens must be >= 1")
        weight = self.model.tok_embeddings.weight
        num_blocks = kv_cache_memory // (block_size * kv_bytes_per_token(self.model, weight.dtype))
        if num_blocks < 1:
            raise ValueError(f"--kv-cache-memory {kv_cache_memory} bytes holds no block of {block_size} tokens "
                             f"({block_size * kv_bytes_per_token(self.model, weight.dtype)} bytes)")
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        if quantize not in (None, "int8", "int4"):
            raise ValueError(f"quantize must be int8 or int4; got {quantize!r}")
        self.runner = ModelRunner(self.model, num_blocks, block_size, quantize or "float",
                                  compile_decode=not enforce_eager)
        eos = cfg.eos_token_id
        if eos is None:
            eos = [i for i in (self.tokenizer.token_to_id(EOS), self.tokenizer.token_to_id(IM_END)) if i is not None]
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.rng = random.Random(seed)
        self.requests: dict[str, Sequence] = {}
        self.counter = itertools.count()

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

    def make_sequence(self, prompt: str | list[int], params: SamplingParams | None = None,
                      request_id: str | None = None) -> Sequence:
        """Check a request and build its sequence, without touching the queues (so the server can check
        requests on its own thread while the engine steps on another)."""
        params = params or SamplingParams()
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
        seed = params.seed if params.seed is not None else self.rng.getrandbits(63)
        request_id = request_id if request_id is not None else str(next(self.counter))
        return Sequence(request_id, ids, len(ids), params, torch.Generator().manual_seed(seed))

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
        """One forward pass over the scheduled batch; an output for every request that advanced. A
        request whose sampling or stop handling fails ends with an error output; the others go on."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        logits = self.runner.run(scheduled)
        sampling = []
        for seq, n in scheduled:
            before = seq.num_computed
            seq.num_computed += n
            self.blocks.register_computed(seq, before)
            if seq.num_computed == seq.num_tokens:
                sampling.append(seq)
        outputs = []
        best = logits.argmax(-1).tolist()  # greedy rows without penalties need nothing more
        for seq, row, argmax in zip(sampling, logits, best, strict=True):
            try:
                self.append_token(seq, row, argmax)
                out = self.output(seq)
            except Exception as e:  # this request's own failure: end it alone
                if not seq.finished:
                    self.scheduler.finish(seq, "error")
                out = self.error_output(seq, f"{type(e).__name__}: {e}")
            if out is not None:
                outputs.append(out)
            if seq.finished:
                self.requests.pop(seq.request_id, None)
        return outputs

    def append_token(self, seq: Sequence, logits: torch.Tensor, argmax: int) -> None:
        p = seq.params
        if p.greedy and not p.penalised:
            token = argmax
        else:  # the history is sliced only when penalties read it
            history = (seq.prompt_ids, seq.output_ids) if p.penalised else ([], [])
            token = sample(logits, p, *history, seq.generator)
        if token in p.stop_token_ids or (token in self.eos_ids and not p.ignore_eos):
            self.detokenize(seq, final=True)
            self.scheduler.finish(seq, "stop")  # the stop token itself is not emitted
            return
        seq.token_ids.append(token)
        if p.logprobs is not None:
            seq.logprobs.append(token_logprob(logits, token, p.logprobs))
        searched = len(seq.text)
        done = seq.num_output >= p.max_tokens
        self.detokenize(seq, final=done)
        for stop in p.stop:
            cut = seq.text.find(stop, max(0, searched - len(stop) + 1))
            if cut >= 0:
                seq.text = seq.text[:cut]
                self.scheduler.finish(seq, "stop")
                return
        if done:
            self.scheduler.finish(seq, "length")

    def detokenize(self, seq: Sequence, final: bool) -> None:
        """Extend `seq.text` by its new tokens' text, decoding a short window, not the whole output (as vLLM
        does). The window's tokens before `detok_read` are decoded twice, so whatever a decoder does at the
        start of a window (a partial character, a dropped leading space) cancels out. Text that ends inside
        a multi-byte character waits for its next token, unless this is the last."""
        window = seq.token_ids[seq.num_prompt + seq.detok_prefix :]
        before = self.tokenizer.decode(window[: seq.detok_read - seq.detok_prefix])
        after = self.tokenizer.decode(window)
        if after.endswith("\ufffd") and not final:
            return
        seq.text += after[len(before) :]
        seq.detok_prefix, seq.detok_read = seq.detok_read, seq.num_output

    def output(self, seq: Sequence) -> RequestOutput | None:
        """What the request gained since its last output (None where its output_kind is "final" and it
        runs on). While it runs, text that may still turn out to start a stop string is held back."""
        kind = seq.params.output_kind
        if kind == "final" and not seq.finished:
            return None
        text = seq.text
        if not seq.finished:
            hold = max((len(s) - 1 for s in seq.params.stop), default=0)
            text = text[: max(len(text) - hold, seq.num_emitted)]
        delta, seq.num_emitted = text[seq.num_emitted :], len(text)
        emitted, seq.num_emitted_tokens = seq.num_emitted_tokens, seq.num_output
        delta_ids = seq.token_ids[seq.num_prompt + emitted :]
        logprobs = None
        if seq.params.logprobs is not None:
            logprobs = seq.logprobs[emitted:] if kind == "delta" else list(seq.logprobs)
        if kind == "delta":
            text, tokens = delta, delta_ids
        else:
            tokens = seq.output_ids
        return RequestOutput(
            request_id=seq.request_id, prompt_token_ids=seq.prompt_ids, token_ids=tokens, text=text,
            delta_text=delta, delta_token_ids=delta_ids, finished=seq.finished, finish_reason=seq.finish_reason,
            num_cached_tokens=seq.num_cached, logprobs=logprobs)

    def error_output(self, seq: Sequence, error: str) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id, prompt_token_ids=seq.prompt_ids, token_ids=[], text="", delta_text="",
            delta_token_ids=[], finished=True, finish_reason="error", num_cached_tokens=seq.num_cached,
            logprobs=None, error=error)

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
        """What serves decode steps of few sequences now: "compiled", "compiling" (eager meanwhile) or "eager"."""
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
