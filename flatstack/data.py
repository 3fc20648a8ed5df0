"""Text to token shards (`flatstack prepare`), and the memory-mapped reader training samples from.

Inputs stream through in blocks of about a megabyte, so memory stays bounded whatever the corpus
size: text files are split by position (the first 1 - val_fraction of each file's bytes train, the
rest validate), JSON Lines records by a hash of the line. Documents are separated by the
end-of-text token. Chat records add a loss mask (1 on assistant tokens). Everything is written into
a temporary folder renamed into place at the end, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import codecs
import fnmatch
import hashlib
import json
import os
import shutil
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from flatstack.atomic import replace_dir
from flatstack.tokenizer import (
    CHAT_TEMPLATE,
    EOS,
    IM_START,
    TOKENIZER_KINDS,
    byte_tokenizer,
    char_tokenizer,
    chat_segments,
    check_messages,
    load_tokenizer,
    train_bpe,
)

BLOCK_BYTES = 1 << 18
JSONL_SUFFIXES = (".jsonl", ".ndjson")
SPLITS = ("train", "val")


class DataError(ValueError):
    """Bad input to prepare or train: the message names the file, line or option."""


@dataclass
class Piece:
    """A run of text bound for one split. `doc_start`: an end-of-text token goes before it."""

    split: str
    text: str
    doc_start: bool
    chat: list[tuple[str, bool]] | None = None  # chat records: (text, trained) segments instead of text


@dataclass
class PrepareConfig:
    inputs: list[str]
    out: str
    tokenizer: str = "bpe"  # bpe | byte | char | path to a tokenizer.json or a folder holding one
    vocab_size: int = 4096
    val_fraction: float = 0.1
    include: list[str] = field(default_factory=list)  # glob patterns on file names inside folders
    exclude: list[str] = field(default_factory=list)  # glob patterns on paths
    max_bytes: int | None = None  # stop after this many input bytes (a quick corpus from a big tree)
    shard_tokens: int = 1 << 26
    progress: bool = True


# ---------------------------------------------------------------------------------------------
# reading inputs


def find_sources(cfg: PrepareConfig) -> list[Path]:
    files: list[Path] = []
    for raw in cfg.inputs:
        p = Path(raw)
        if not p.exists():
            raise DataError(f"input {raw!r} does not exist")
        if p.is_file():
            files.append(p)
            continue
        for root, dirs, names in os.walk(p):
            dirs.sort()
            for name in sorted(names):
                f = Path(root) / name
                if cfg.include and not any(fnmatch.fnmatch(name, g) for g in cfg.include):
                    continue
                if any(fnmatch.fnmatch(str(f), g) for g in cfg.exclude):
                    continue
                files.append(f)
    return files


def read_text_file(path: Path, val_fraction: float, budget: list[int]) -> Iterator[Piece]:
    """A UTF-8 file: its first 1 - val_fraction of bytes train, the rest validate."""
    size = path.stat().st_size
    cut = int(size * (1 - val_fraction))  # as nanoGPT splits: data[:int(n * 0.9)]
    with open(path, "rb") as f:
        f.seek(cut)
        byte = f.read(1)
        while byte and 0x80 <= byte[0] < 0xC0:  # a UTF-8 continuation byte: move past the character
            cut, byte = cut + 1, f.read(1)
    yield from read_span(path, "train", 0, cut, budget)
    yield from read_span(path, "val", cut, size, budget)


def read_span(path: Path, split: str, lo: int, hi: int, budget: list[int]) -> Iterator[Piece]:
    """Bytes lo..hi decoded in blocks cut at line ends, so a tokenizer never sees a word split in two."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry, doc_start, offset = "", True, lo
    with open(path, "rb") as f:
        f.seek(lo)
        while offset < hi and budget[0] > 0:
            block = f.read(min(BLOCK_BYTES, hi - offset, budget[0]))
            if not block:
                break
            budget[0] -= len(block)
            offset += len(block)
            last = offset >= hi
            try:
                text = carry + decoder.decode(block, final=last)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: undecodable bytes near byte {offset - len(block) + e.start} "
                                f"({e.reason}); inputs must be UTF-8") from None
            end = len(text) if last else text.rfind("\n") + 1
            if end:
                yield Piece(split, text[:end], doc_start)
                doc_start = False
            carry = text[end:]
    if carry:
        yield Piece(split, carry, doc_start)


def read_jsonl_file(path: Path, val_fraction: float, budget: list[int]) -> Iterator[Piece]:
    """One document per line: {"text": ...} or {"messages": [{"role", "content"}, ...]}."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if budget[0] <= 0:
                return
            budget[0] -= len(line)
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DataError(f"{where}: not a JSON object ({e})") from None
            split = "val" if zlib.crc32(line) / 2**32 < val_fraction else "train"
            if isinstance(record, dict) and isinstance(record.get("text"), str):
                yield Piece(split, record["text"], True)
            elif isinstance(record, dict) and "messages" in record:
                segments = chat_segments(check_messages(record["messages"], where))
                yield Piece(split, "".join(t for t, _ in segments), True, chat=segments)
            else:
                raise DataError(f"{where}: record has no string 'text' field and no 'messages' list")


def read_pieces(sources: list[Path], cfg: PrepareConfig, on_bytes=None) -> Iterator[Piece]:
    budget = [cfg.max_bytes if cfg.max_bytes is not None else 1 << 62]
    for path in sources:
        before = budget[0]
        reader = read_jsonl_file if path.suffix in JSONL_SUFFIXES else read_text_file
        try:
            yield from reader(path, cfg.val_fraction, budget)
        except OSError as e:
            raise DataError(f"cannot read {path}: {e}") from None
        if on_bytes:
            on_bytes(before - budget[0])
        if budget[0] <= 0:
            return


# ---------------------------------------------------------------------------------------------
# writing shards


class ShardWriter:
    """Appends token ids (and, once chat data appears, a loss mask) to fixed-size shards of one split."""

    def __init__(self, folder: Path, split: str, dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.ids: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.buffered = 0
        self.has_mask = False
        self.tokens = self.loss_tokens = self.loss_bytes = 0

    def add(self, ids: np.ndarray, mask: np.ndarray | None, loss_bytes: int) -> None:
        if mask is not None and not self.has_mask:
            self.start_mask()
        self.ids.append(ids)
        if self.has_mask:
            self.masks.append(mask if mask is not None else np.ones(len(ids), np.uint8))
        self.buffered += len(ids)
        self.tokens += len(ids)
        self.loss_tokens += int(mask.sum()) if mask is not None else len(ids)
        self.loss_bytes += loss_bytes
        while self.buffered >= self.shard_tokens:
            self.flush(self.shard_tokens)

    def start_mask(self) -> None:
        """Text before the first chat record counts in full: write all-ones masks for it."""
        self.has_mask = True
        for shard in self.shards:
            shard["mask"] = shard["file"].replace(".bin", ".mask.bin")
            np.ones(shard["tokens"], np.uint8).tofile(self.folder / shard["mask"])
        self.masks = [np.ones(len(a), np.uint8) for a in self.ids]

    def flush(self, n: int) -> None:
        ids = np.concatenate(self.ids) if self.ids else np.zeros(0, self.dtype)
        name = f"{self.split}_{len(self.shards):05d}.bin"
        ids[:n].astype(self.dtype).tofile(self.folder / name)
        shard = {"file": name, "tokens": int(min(n, len(ids)))}
        self.ids = [ids[n:]] if len(ids) > n else []
        if self.has_mask:
            masks = np.concatenate(self.masks)
            masks[:n].tofile(self.folder / name.replace(".bin", ".mask.bin"))
            shard["mask"] = name.replace(".bin", ".mask.bin")
            self.masks = [masks[n:]] if len(masks) > n else []
        self.shards.append(shard)
        self.buffered = max(0, self.buffered - n)

    def close(self) -> dict:
        if self.buffered:
            self.flush(self.buffered)
        return {"tokens": self.tokens, "loss_tokens": self.loss_tokens, "loss_bytes": self.loss_bytes,
                "shards": self.shards}


def build_tokenizer(cfg: PrepareConfig, sources: list[Path]):
    if cfg.tokenizer == "byte":
        return byte_tokenizer()
    if cfg.tokenizer == "bpe":
        return train_bpe((p.text for p in read_pieces(sources, cfg) if p.split == "train"), cfg.vocab_size)
    if cfg.tokenizer == "char":
        chars: set[str] = set()
        for p in read_pieces(sources, cfg):
            chars.update(p.text)
        return char_tokenizer(chars)
    path = Path(cfg.tokenizer)
    if not path.exists():
        raise DataError(f"--tokenizer {cfg.tokenizer!r} is neither one of {', '.join(TOKENIZER_KINDS)} "
                        "nor an existing tokenizer.json or folder")
    return load_tokenizer(path)


def prepare(cfg: PrepareConfig) -> dict:
    """Tokenize the inputs into DATA_DIR; returns the meta.json it wrote."""
    if not 0 < cfg.val_fraction < 1:
        raise DataError(f"--val-fraction must be between 0 and 1 (exclusive); got {cfg.val_fraction}")
    sources = find_sources(cfg)
    total_bytes = sum(p.stat().st_size for p in sources)
    if cfg.max_bytes is not None:
        total_bytes = min(total_bytes, cfg.max_bytes)
    if total_bytes == 0:
        raise DataError(f"empty corpus: no bytes in {', '.join(cfg.inputs)}")
    tok = build_tokenizer(cfg, sources)
    eos = tok.token_to_id(EOS)
    if eos is None:
        raise DataError(f"the tokenizer has no {EOS} token to separate documents")
    vocab_size = tok.get_vocab_size()
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32

    out = Path(cfg.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        meta = write_shards(cfg, sources, tok, eos, dtype, tmp, total_bytes)
        meta.update(version=1, vocab_size=vocab_size, eos_id=eos, dtype=np.dtype(dtype).name,
                    tokenizer=cfg.tokenizer if cfg.tokenizer in TOKENIZER_KINDS else str(cfg.tokenizer),
                    val_fraction=cfg.val_fraction, chat_template=CHAT_TEMPLATE)
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)
    return meta


def write_shards(cfg, sources, tok, eos, dtype, folder: Path, total_bytes: int) -> dict:
    writers = {s: ShardWriter(folder, s, dtype, cfg.shard_tokens) for s in SPLITS}
    hashes = []
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=not cfg.progress)
    start = time.perf_counter()
    batch: list[Piece] = []
    batch_chars = 0

    def encode(pieces: list[Piece]) -> None:
        plain = [p for p in pieces if p.chat is None]
        encoded = iter(tok.encode_batch_fast([p.text for p in plain], add_special_tokens=False))
        for p in pieces:
            if p.chat is None:
                ids = np.asarray(next(encoded).ids, np.int64)
                mask = None
                loss_bytes = len(p.text.encode())
            else:
                if tok.token_to_id(IM_START) is None:
                    raise DataError(f"chat data needs the {IM_START} token, which the tokenizer lacks")
                seg_ids = [tok.encode(t, add_special_tokens=False).ids for t, _ in p.chat]
                ids = np.asarray([i for s in seg_ids for i in s], np.int64)
                mask = np.concatenate([np.full(len(s), trained, np.uint8)
                                       for s, (_, trained) in zip(seg_ids, p.chat, strict=True)])
                loss_bytes = sum(len(t.encode()) for t, trained in p.chat if trained)
            if p.doc_start:
                ids = np.concatenate([[eos], ids])
                mask = None if mask is None else np.concatenate([[0], mask]).astype(np.uint8)
            writers[p.split].add(ids, mask, loss_bytes)
        bar.set_postfix(tokens_per_s=f"{sum(w.tokens for w in writers.values()) / (time.perf_counter() - start):.3g}")

    for path in sources:
        hashes.append({"path": str(path), "bytes": path.stat().st_size, "sha256": file_sha256(path)})
    for piece in read_pieces(sources, cfg, on_bytes=bar.update):
        batch.append(piece)
        batch_chars += len(piece.text)
        if batch_chars >= BLOCK_BYTES:
            encode(batch)
            batch, batch_chars = [], 0
    if batch:
        encode(batch)
    bar.close()
    splits = {s: w.close() for s, w in writers.items()}
    for s in SPLITS:
        if splits[s]["tokens"] == 0:
            raise DataError(f"the {s} split is empty; use more text or another --val-fraction")
        if splits[s]["loss_tokens"] == 0:
            raise DataError(f"the {s} split has no tokens to train on (chat data without assistant turns?)")
    return {"splits": splits, "has_mask": any(w.has_mask for w in writers.values()), "sources": hashes}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK_BYTES):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# reading shards


class TokenData:
    """One split of a prepared folder, memory-mapped, read as if it were one array."""

    def __init__(self, folder: str | Path, split: str):
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.exists():
            raise DataError(f"{self.folder} is not a prepared data folder (no meta.json); run flatstack prepare")
        self.meta = json.loads(meta_path.read_text())
        info = self.meta["splits"][split]
        dtype = np.dtype(self.meta["dtype"])
        self.tokens = [np.memmap(self.folder / s["file"], dtype=dtype, mode="r") for s in info["shards"]]
        self.masks = ([np.memmap(self.folder / s["mask"], dtype=np.uint8, mode="r") for s in info["shards"]]
                      if self.meta["has_mask"] and all("mask" in s for s in info["shards"]) else None)
        self.offsets = np.cumsum([0] + [len(t) for t in self.tokens])
        self.loss_tokens, self.loss_bytes = info["loss_tokens"], info["loss_bytes"]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Tokens (int64) and mask of global positions start..start+n, across shard ends."""
        ids, masks = [], []
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while n > 0 and shard < len(self.tokens):
            lo = start - int(self.offsets[shard])
            take = min(n, len(self.tokens[shard]) - lo)
            ids.append(np.asarray(self.tokens[shard][lo : lo + take], np.int64))
            if self.masks is not None:
                masks.append(np.asarray(self.masks[shard][lo : lo + take]))
            start, n, shard = start + take, n - take, shard + 1
        return np.concatenate(ids), (np.concatenate(masks) if self.masks is not None else None)

    def sample(self, batch: int, seq_len: int, rng: np.random.Generator):
        """Random windows: inputs [B, T], targets [B, T] and the targets' loss mask (or None)."""
        if len(self) < seq_len + 1:
            raise DataError(f"--seq-len {seq_len} does not fit: this split holds only {len(self)} tokens")
        starts = rng.integers(0, len(self) - seq_len, size=batch)
        rows = [self.read(int(s), seq_len + 1) for s in starts]
        x = np.stack([r[0][:-1] for r in rows])
        y = np.stack([r[0][1:] for r in rows])
        mask = np.stack([r[1][1:] for r in rows]) if self.masks is not None else None
        return x, y, mask

    def windows(self, seq_len: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """Consecutive windows that predict every token of the split once (the first excepted)."""
        for start in range(0, len(self) - 1, seq_len):
            n = min(seq_len, len(self) - 1 - start)
            ids, mask = self.read(start, n + 1)
            yield ids[:-1], ids[1:], (mask[1:] if mask is not None else None)
