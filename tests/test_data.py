"""Tokenizers and `flatstack prepare`: round trips, exact shards, chat masks, bounded memory, bad input."""

import json
import random
import subprocess
import sys

import numpy as np
import pytest
from conftest import SHARED

from flatstack.cli import main
from flatstack.data import PrepareConfig, TokenData, prepare
from flatstack.tokenizer import EOS, IM_END, byte_tokenizer, char_tokenizer, load_tokenizer, train_bpe


def random_unicode(rng: random.Random, n: int) -> str:
    """Every plane, controls and combining marks included; surrogates cannot be encoded, so skipped."""
    out = []
    while len(out) < n:
        cp = rng.choice([rng.randrange(0, 0x80), rng.randrange(0x80, 0x800), rng.randrange(0x800, 0x10000),
                         rng.randrange(0x10000, 0x110000)])
        if not 0xD800 <= cp < 0xE000:
            out.append(chr(cp))
    return "".join(out)


TRICKY = ["", " ", "  leading and trailing  ", "\r\n\t\x00\x7f", "héllo wörld", "日本語のテキスト", "🌍🚀👩‍👩‍👧",
          "a\u0301", "\ufeffbom", "<|endoftext|> literal", "x" * 5000]


@pytest.fixture(scope="module")
def bpe():
    text = (SHARED / "data" / "tinyshakespeare.txt").read_text()[:200_000]
    return train_bpe([text], vocab_size=600)


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_byte_level_round_trips_any_text(kind, bpe):
    tok = bpe if kind == "bpe" else byte_tokenizer()
    rng = random.Random(0)
    for text in TRICKY + [random_unicode(rng, rng.randrange(1, 300)) for _ in range(200)]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text, repr(text)


def test_byte_tokenizer_is_one_token_per_byte_and_decodes_invalid_utf8_as_bytes():
    tok = byte_tokenizer()
    text = "héllo 🌍"
    assert len(tok.encode(text).ids) == len(text.encode())
    # Any id sequence, even one that spells invalid UTF-8, decodes like Python's lossy decoder.
    byte_of = {tok.encode(bytes([b]).decode("latin-1")).ids[0]: b for b in range(128)}
    assert len(byte_of) == 128
    symbols = {tok.token_to_id(s): s for s in tok.get_vocab()}
    rng = random.Random(1)
    alphabet = sorted(i for i in symbols if i < 256)
    for _ in range(200):
        ids = [rng.choice(alphabet) for _ in range(rng.randrange(1, 12))]
        raw = bytes(byte_value(symbols[i]) for i in ids)
        assert tok.decode(ids) == raw.decode("utf-8", errors="replace")


def byte_value(symbol: str) -> int:
    """The byte a GPT-2 byte-level symbol stands for."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    table = {chr(b): b for b in printable}
    n = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + n)] = b
            n += 1
    return table[symbol]


def test_char_tokenizer_round_trip():
    text = (SHARED / "data" / "tinyshakespeare.txt").read_text()
    tok = char_tokenizer(text)
    assert tok.get_vocab_size() == 65 + 3
    sample = text[:5000]
    assert tok.decode(tok.encode(sample).ids) == sample


def test_shards_hold_exactly_the_inputs(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    a = "first file\nwith two lines\n" * 40
    b = "zweite Datei – ümlaut 🌍\n" * 30
    (src / "a.txt").write_text(a)
    (src / "sub" / "b.txt").write_text(b)
    records = [{"text": f"record {i} " * 5} for i in range(50)]
    (src / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    meta = prepare(PrepareConfig(inputs=[str(src)], out=str(tmp_path / "d"), tokenizer="byte", shard_tokens=300,
                                 progress=False))
    assert meta["dtype"] == "uint16" and len(meta["splits"]["train"]["shards"]) > 3
    tok = load_tokenizer(tmp_path / "d")
    decoded = {}
    for split in ("train", "val"):
        data = TokenData(tmp_path / "d", split)
        ids, mask = data.read(0, len(data))
        assert mask is None and len(ids) == meta["splits"][split]["tokens"]
        decoded[split] = tok.decode(ids.tolist(), skip_special_tokens=False)
    # files in sorted order: a.txt, c.jsonl, sub/b.txt; the tail 10% of each text file validates
    cut_a, cut_b = int(len(a.encode()) * 0.9), int(len(b.encode()) * 0.9)
    while (b.encode()[cut_b] & 0xC0) == 0x80:
        cut_b += 1
    train_records = [r["text"] for r in records if not in_val(r)]
    val_records = [r["text"] for r in records if in_val(r)]
    assert val_records and train_records
    expect_train = EOS + a[:cut_a] + "".join(EOS + t for t in train_records) + EOS + b.encode()[:cut_b].decode()
    expect_val = EOS + a[cut_a:] + "".join(EOS + t for t in val_records) + EOS + b.encode()[cut_b:].decode()
    assert decoded["train"] == expect_train
    assert decoded["val"] == expect_val
    assert [s["path"].rsplit("/", 1)[1] for s in meta["sources"]] == ["a.txt", "c.jsonl", "b.txt"]


def in_val(record) -> bool:
    import zlib

    return zlib.crc32((json.dumps(record) + "\n").encode()) / 2**32 < 0.1


def test_chat_mask_covers_only_assistant_tokens(tmp_path):
    chats = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Q{i}?"},
                           {"role": "assistant", "content": f"Answer {i}."}]} for i in range(40)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    prepare(PrepareConfig(inputs=[str(tmp_path / "chat.jsonl")], out=str(tmp_path / "d"), tokenizer="bpe",
                          vocab_size=300, progress=False))
    tok = load_tokenizer(tmp_path / "d")
    data = TokenData(tmp_path / "d", "train")
    ids, mask = data.read(0, len(data))
    trained = tok.decode(ids[mask == 1].tolist(), skip_special_tokens=False)
    expected = "".join(f"Answer {i}.{IM_END}" for i in range(40) if not in_val(chats[i]))
    assert trained == expected
    assert "Q1?" in tok.decode(ids[mask == 0].tolist(), skip_special_tokens=False)


def test_memory_stays_bounded(tmp_path):
    """A corpus 10x larger must not need more memory: prepare streams it."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randrange(2, 8))) for _ in range(3000)]
    block = "".join(" ".join(rng.choices(words, k=12)) + "\n" for _ in range(20000))  # ~1.6 MB
    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    small.write_text(block * 2)
    large.write_text(block * 20)

    def peak_rss_mb(path) -> float:
        code = ("import resource, sys; from flatstack.cli import main; rc = main(sys.argv[1:]); "
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024); sys.exit(rc)")
        out = subprocess.run([sys.executable, "-c", code, "prepare", str(path), "--out", str(tmp_path / path.stem),
                              "--tokenizer", "byte", "--quiet", "--shard-tokens", "1M"],
                             check=True, capture_output=True, text=True).stdout
        return float(out.strip().splitlines()[-1])

    small_mb, large_mb = peak_rss_mb(small), peak_rss_mb(large)
    corpus_mb = large.stat().st_size / 2**20
    assert large_mb - small_mb < corpus_mb / 3, (small_mb, large_mb, corpus_mb)


def run_prepare(capsys, *args) -> tuple[int, str]:
    rc = main(["prepare", *map(str, args), "--quiet"])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("case", ["empty", "missing", "undecodable", "no_field", "bad_role", "bad_json",
                                  "vocab_too_small", "bad_val_fraction"])
def test_bad_input_is_named_and_nothing_written(case, tmp_path, capsys):
    f = tmp_path / "in.txt"
    out = tmp_path / "out"
    extra: list = []
    if case == "empty":
        f.write_text("")
        expect = "empty corpus"
    elif case == "missing":
        f = tmp_path / "nope.txt"
        expect = "nope.txt' does not exist"
    elif case == "undecodable":
        f.write_bytes(b"good line\n" * 10 + b"bad \xff\xfe here\n")
        expect = "in.txt: undecodable bytes near byte 104"
    elif case == "no_field":
        f = tmp_path / "in.jsonl"
        f.write_text('{"text": "ok"}\n{"body": "no text"}\n')
        expect = "in.jsonl:2: record has no string 'text'"
    elif case == "bad_role":
        f = tmp_path / "in.jsonl"
        f.write_text(json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}) + "\n")
        expect = "in.jsonl:1: message 0 has unknown role 'wizard'"
    elif case == "bad_json":
        f = tmp_path / "in.jsonl"
        f.write_text('{"text": "ok"}\n{broken\n')
        expect = "in.jsonl:2: not a JSON object"
    elif case == "vocab_too_small":
        f.write_text("some text\n" * 100)
        extra = ["--vocab-size", "100"]
        expect = "--vocab-size 100 is too small"
    else:
        f.write_text("some text\n" * 100)
        extra = ["--val-fraction", "1.5"]
        expect = "--val-fraction must be between 0 and 1"
    rc, err = run_prepare(capsys, f, "--out", out, *extra)
    assert rc == 1 and expect in err and "Traceback" not in err, err
    assert not out.exists() and not (tmp_path / "out.tmp").exists()


def test_uint32_when_vocabulary_exceeds_uint16(tmp_path):
    """A tokenizer with more than 65536 entries needs 4-byte shards."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70000)}
    vocab[EOS] = 70000
    tok = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "in.txt").write_text(" ".join(f"w{i}" for i in range(65000, 70000)) + "\n")
    meta = prepare(PrepareConfig(inputs=[str(tmp_path / "in.txt")], out=str(tmp_path / "d"),
                                 tokenizer=str(tmp_path / "tokenizer.json"), progress=False))
    assert meta["dtype"] == "uint32"
    ids, _ = TokenData(tmp_path / "d", "train").read(0, 10)
    assert ids.dtype == np.int64 and ids[1] == 65000


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chatml_has_one_definition_and_its_jinja_export_equals_it(add_generation_prompt):
    from flatstack.tokenizer import CHAT_TEMPLATE, chat_segments, render_chat

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": ""}]
    assert render_chat(CHAT_TEMPLATE, messages, add_generation_prompt) == \
        "".join(text for text, _ in chat_segments(messages, add_generation_prompt))
