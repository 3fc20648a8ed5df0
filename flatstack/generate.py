"""One prompt at a time through the contiguous KV cache, with the engine's sampler: what training uses
for its samples (on the model being trained, which the engine would adapt in place), and the plain
reference the engine's paged, batched path is tested against."""

from __future__ import annotations

import torch

from flatstack.engine import SamplingParams, sample_id
from flatstack.model import KVCache, Transformer
from flatstack.tokenizer import EOS, IM_END, chat_segments


def encode_prompt(tok, text: str, chat: bool) -> tuple[list[int], set[int]]:
    """Prompt ids and stop ids. Plain text follows an end-of-text token, as every document does in
    training; with chat, the text is a user turn and the ids end where the assistant's answer begins."""
    if chat:
        ids = tok.encode("".join(t for t, _ in chat_segments([{"role": "user", "content": text}], True)),
                         add_special_tokens=False).ids
    else:
        eos = tok.token_to_id(EOS)
        ids = ([eos] if eos is not None else []) + tok.encode(text, add_special_tokens=False).ids
    stops = {i for i in (tok.token_to_id(EOS), tok.token_to_id(IM_END)) if i is not None}
    return ids, stops


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    stop_ids: set[int] | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """New token ids after `prompt` (at least one id), stopping early at a stop id (not returned)."""
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    params = SamplingParams(max_tokens=max(max_new_tokens, 1), temperature=temperature, top_k=top_k or 0)
    cfg = model.cfg
    room = cfg.max_seq_len - len(prompt)
    if room <= 0:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the model's context is {cfg.max_seq_len}")
    max_new_tokens = min(max_new_tokens, room)
    device = model.tok_embeddings.weight.device
    dtype = model.tok_embeddings.weight.dtype
    cache = KVCache(cfg, 1, len(prompt) + max_new_tokens, dtype, device)
    tokens = torch.tensor([prompt], device=device)
    logits = model(tokens, 0, cache)[0, -1]
    out: list[int] = []
    generator = generator if generator is not None else torch.default_generator
    for _ in range(max_new_tokens):
        next_id = sample_id(logits.float().to(generator.device), params, prompt, out, generator)
        if stop_ids and next_id in stop_ids:
            break
        out.append(next_id)
        if len(out) == max_new_tokens:
            break
        logits = model(torch.tensor([[next_id]], device=device), len(prompt) + len(out) - 1, cache)[0, -1]
    return out
