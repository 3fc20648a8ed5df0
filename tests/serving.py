"""Helpers for the tests that run `flatstack serve` as a real process on loopback."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from flatstack.checkpoint import save
from flatstack.model import ModelConfig, Transformer
from flatstack.tokenizer import byte_tokenizer

KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "tiny"
CONTEXT = 256
C, H = "/v1/completions", "/v1/chat/completions"
GOOD = {"model": MODEL, "prompt": "ok", "max_tokens": 2}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "ok"}], "max_tokens": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_checkpoint(folder: Path, d_model: int = 64, n_layers: int = 2, ffn_dim: int = 128) -> Path:
    """A random model with a byte tokenizer (ChatML markers included). A wider one decodes slowly
    enough for a test to act while a request runs."""
    tok = byte_tokenizer()
    tok.save(str(folder / "tokenizer.json"))
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), d_model=d_model, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                      head_dim=d_model // 4, ffn_dim=ffn_dim, max_seq_len=CONTEXT)
    return save(Transformer(cfg).init_weights(seed=0, std=0.3), folder / "ckpt", tokenizer_dir=folder)


class ServerURL(str):
    """The server's base URL; `pid` is its process, for its memory."""

    pid: int


@contextlib.contextmanager
def running_server(ckpt, *extra: str, key: str | None = KEY):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flatstack.cli", "serve", str(ckpt), "--port", str(port),
         *(["--api-key", key] if key is not None else []), "--served-model-name", MODEL, "--kv-cache-memory", "4M",
         *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = ServerURL(f"http://127.0.0.1:{port}")
    url.pid = proc.pid
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"server did not start: {proc.stdout.read()}")
        time.sleep(0.2)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def post(server, path, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    if isinstance(body, bytes):
        return httpx.post(f"{server}{path}", content=body, headers={**headers, "content-type": "application/json"},
                          **kw)
    return httpx.post(f"{server}{path}", json=body, headers=headers, **kw)


def assert_error_shape(r, status):
    assert r.status_code == status, (r.status_code, r.text)
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error


def metric(server, name: str) -> float:
    text = httpx.get(f"{server}/metrics", headers=AUTH).text
    return float(re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M).group(1))


def idle(server) -> dict:
    """The gauges that must return to zero once every request has ended."""
    names = ("flatstack_num_requests_running", "flatstack_num_requests_waiting", "flatstack_kv_blocks_used",
             "flatstack_queue_sequences")
    return {n: metric(server, n) for n in names}


def wait_idle(server, timeout: float = 30) -> dict:
    deadline = time.time() + timeout
    while any(idle(server).values()) and time.time() < deadline:
        time.sleep(0.1)
    return idle(server)


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024
