"""Tokenizers, all as Hugging Face `tokenizers` objects saved to one `tokenizer.json`: a trained
byte-level BPE, a byte tokenizer (the 256 byte symbols, no merges), a character tokenizer, or an
existing file. Plus the ChatML chat template that fine-tuning data and generation share.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"  # separates documents; ends generation
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIALS = [EOS, IM_START, IM_END]
CHAT_ROLES = ("system", "user", "assistant")
# ChatML is defined once, by chat_segments below; this is its Jinja export, for what reads
# tokenizer_config.json (Hugging Face tools, the engine), held equal to it by tests/test_data.py.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOKENIZER_KINDS = ("bpe", "byte", "char")


class TokenizerError(ValueError):
    pass


def byte_level_alphabet() -> list[str]:
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE: every byte has a symbol, so any text round-trips; merges learned from `texts`."""
    floor = 256 + len(SPECIALS)
    if vocab_size < floor:
        raise TokenizerError(f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least {floor} "
                             f"(256 bytes + {len(SPECIALS)} special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=byte_level_alphabet(),
                                  special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def byte_tokenizer() -> Tokenizer:
    """One token per UTF-8 byte (ids 0-255 in byte order's symbol order), then the specials."""
    vocab = {symbol: i for i, symbol in enumerate(byte_level_alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok


def char_tokenizer(chars: Iterable[str]) -> Tokenizer:
    """One token per character seen in the corpus (sorted), then the specials; unseen characters fail."""
    vocab = {c: i for i, c in enumerate(sorted(set(chars)))}
    if not vocab:
        raise TokenizerError("no characters to build a character tokenizer from (empty corpus)")
    tok = Tokenizer(models.WordLevel(vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    return tok


GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # llama.cpp's token types


def tokenizer_from_gguf(meta: dict) -> Tokenizer:
    """The byte-level BPE a GGUF file describes in its metadata (tokenizer.ggml.*), as llama.cpp reads it:
    control tokens are special and never split; the 'smollm' pre-tokenizer splits digits one by one."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise TokenizerError(f"GGUF tokenizer model {kind!r} is not supported; supported: gpt2 (byte-level BPE)")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if meta.get("tokenizer.ggml.pre") == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type", [])
    added = [AddedToken(tokens[i], special=t == GGUF_CONTROL, normalized=False)
             for i, t in enumerate(types) if t in (GGUF_CONTROL, GGUF_USER_DEFINED)]
    tok.add_tokens(added)
    return tok


# tiktoken's split patterns the Grok-2 release names by `word_split` (SGLang's tiktoken_tokenizer.py: PAT_STR_B)
TIKTOKEN_SPLITS = {
    "V1": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+",
}
# Grok-2's chat format, as SGLang's template writes it: "Human: ...<|separator|>\n\n", then "Assistant:"
GROK2_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}Human: {{ m['content'] | trim }}"
    "{% elif m['role'] == 'system' %}System: {{ m['content'] | trim }}"
    "{% else %}Assistant: {{ m['content'] }}{% endif %}<|separator|>\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def tokenizer_from_tiktoken(data: dict) -> Tokenizer:
    """A tiktoken-style vocabulary (the Grok-2 release's tokenizer.tok.json: `regular_tokens` and
    `special_tokens`, each {"token": id, "bytes": [...]}, and `word_split` or `pat_str`) as a byte-level BPE:
    a token's rank is its id, and BPE that merges the lowest-ranked pair first is BPE with every split of
    every token as a merge, ordered by the merged token's rank (as transformers converts tiktoken files)."""
    pattern = data.get("pat_str") or TIKTOKEN_SPLITS.get(data.get("word_split", "V1"))
    if pattern is None:
        raise TokenizerError(f"tokenizer.tok.json word_split {data.get('word_split')!r} is unknown; known: "
                             f"{', '.join(TIKTOKEN_SPLITS)}")
    byte_symbol = dict(zip(range(256), bytes_to_symbols(), strict=True))
    ranks = {bytes(t["bytes"]): t["token"] for t in data["regular_tokens"]}
    vocab = {"".join(byte_symbol[b] for b in token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    symbols = [("".join(byte_symbol[b] for b in a), "".join(byte_symbol[b] for b in b_)) for *_, a, b_ in merges]
    specials = {bytes(t["bytes"]).decode("utf-8"): t["token"] for t in data.get("special_tokens", [])}
    clash = set(specials.values()) & set(vocab.values())
    if clash:
        raise TokenizerError(f"tokenizer.tok.json gives id {min(clash)} to a regular and a special token")
    # the special tokens keep their own ids: in the vocabulary, then marked special (never split)
    # ignore_merges: a piece that is a token whole is that token, as tiktoken emits it, whatever the merges
    tok = Tokenizer(models.BPE(vocab={**vocab, **specials}, merges=symbols, fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(text, special=True, normalized=False) for text in specials])
    return tok


def bytes_to_symbols() -> list[str]:
    """GPT-2's printable symbol for each byte 0..255 (what the ByteLevel pre-tokenizer emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer.json, or a folder (a checkpoint or data folder) that holds one."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.exists():
        raise FileNotFoundError(f"no tokenizer at {p}")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # the Rust side raises a bare Exception
        raise TokenizerError(f"cannot read tokenizer {p}: {e}") from e


def chat_segments(messages: list[dict], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """ChatML as (text, trained) pieces: only the assistant's content and its end marker are trained on."""
    segments = []
    for m in messages:
        role, content = m["role"], m["content"]
        segments.append((f"{IM_START}{role}\n", False))
        if role == "assistant":
            segments.append((f"{content}{IM_END}", True))
            segments.append(("\n", False))
        else:
            segments.append((f"{content}{IM_END}\n", False))
    if add_generation_prompt:
        segments.append((f"{IM_START}assistant\n", False))
    return segments


def check_messages(messages, where: str) -> list[dict]:
    """Validate a chat record; the error names where it came from."""
    if not isinstance(messages, list) or not messages:
        raise TokenizerError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise TokenizerError(f"{where}: message {i} needs a string 'content' and a 'role'")
        if m.get("role") not in CHAT_ROLES:
            raise TokenizerError(f"{where}: message {i} has unknown role {m.get('role')!r}; "
                                 f"roles: {', '.join(CHAT_ROLES)}")
    return messages


def chat_template_of(files: dict[str, str], tok: Tokenizer) -> str | None:
    """A checkpoint's chat template: tokenizer_config.json's, chat_template.jinja, or ChatML when the
    tokenizer has its markers (every chat model flatstack trains)."""
    if "chat_template.jinja" in files:
        return files["chat_template.jinja"]
    if "tokenizer_config.json" in files:
        template = json.loads(files["tokenizer_config.json"]).get("chat_template")
        if isinstance(template, list):  # the named-templates form: take the default
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template:
            return template
    if tok.token_to_id(IM_START) is not None and tok.token_to_id(IM_END) is not None:
        return CHAT_TEMPLATE
    return None


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True, **special) -> str:
    """Render messages through a Jinja chat template in a sandbox, as Hugging Face does."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TokenizerError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **special)
    except TemplateError as e:
        raise TokenizerError(f"chat template failed: {e}") from e
