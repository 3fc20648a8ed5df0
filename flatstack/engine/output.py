"""After the forward pass: each sampling sequence's next token, its text (detokenised incrementally),
its stops, and what its request is told (`RequestOutput`: everything so far, only what is new, or one
final output, as the request asked)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from flatstack.engine.sampling import NOT_FINITE, TokenLogprob, sample, token_logprob
from flatstack.engine.scheduler import Scheduler
from flatstack.engine.sequence import Sequence


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


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, eos_ids: set[int], scheduler: Scheduler):
        self.tokenizer, self.eos_ids, self.scheduler = tokenizer, eos_ids, scheduler

    def process(self, seqs: list[Sequence], logits: torch.Tensor) -> list[RequestOutput]:
        """A token for each sequence from its row of logits [len(seqs), V]; an output for each that has
        one to give. A sequence whose sampling or stop handling fails ends alone, with an error output."""
        tokens, failed = self.pick_all(seqs, logits)
        outputs = []
        for i, (seq, row, token) in enumerate(zip(seqs, logits, tokens, strict=True)):
            try:
                if i in failed:
                    raise failed[i]
                self.append_token(seq, row, token)
                out = self.output(seq)
            except Exception as e:  # this request's own failure
                if not seq.finished:
                    self.scheduler.finish(seq, "error")
                out = error_output(seq, f"{type(e).__name__}: {e}")
            if out is not None:
                outputs.append(out)
        return outputs

    def pick_all(self, seqs: list[Sequence], logits: torch.Tensor) -> tuple[list[int], dict[int, Exception]]:
        """Each sequence's token, picked on the logits' device and read back in one transfer, and the
        failures by row. Greedy rows without penalties need only the argmax: on the CPU numpy's, a tenth of
        torch's time over a large vocabulary, which is a share of a small model's decode step."""
        if logits.device.type == "cpu" and all(seq.params.greedy and not seq.params.penalised for seq in seqs):
            return logits.numpy().argmax(-1).tolist(), {}
        best = logits.argmax(-1)
        picks, failed = [], {}
        for i, (seq, row) in enumerate(zip(seqs, logits, strict=True)):
            try:
                picks.append(best[i] if seq.params.greedy and not seq.params.penalised else self.pick(seq, row))
            except Exception as e:  # this request's own failure
                picks.append(best[i])
                failed[i] = e
        return (torch.stack(picks).tolist() if picks else []), failed

    def pick(self, seq: Sequence, logits: torch.Tensor) -> torch.Tensor:
        p = seq.params
        history = (seq.prompt_ids, seq.output_ids) if p.penalised else ([], [])  # sliced only when read
        return sample(logits, p, *history, seq.generator)

    def append_token(self, seq: Sequence, logits: torch.Tensor, token: int) -> None:
        p = seq.params
        if token < 0:
            raise RuntimeError(NOT_FINITE)
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
        text, tokens = (delta, delta_ids) if kind == "delta" else (text, seq.output_ids)
        return RequestOutput(
            request_id=seq.request_id, prompt_token_ids=seq.prompt_ids, token_ids=tokens, text=text,
            delta_text=delta, delta_token_ids=delta_ids, finished=seq.finished, finish_reason=seq.finish_reason,
            num_cached_tokens=seq.num_cached, logprobs=logprobs)


def error_output(seq: Sequence, error: str) -> RequestOutput:
    return RequestOutput(
        request_id=seq.request_id, prompt_token_ids=seq.prompt_ids, token_ids=[], text="", delta_text="",
        delta_token_ids=[], finished=True, finish_reason="error", num_cached_tokens=seq.num_cached,
        logprobs=None, error=error)
