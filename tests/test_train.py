"""The training loop: accumulation, MoE losses, SFT masking, kill-and-resume, signals, NaN, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import flatstack
from flatstack.cli import main
from flatstack.data import PrepareConfig, prepare
from flatstack.losses import RouterLogits, apply_activation_checkpointing, moe_losses
from flatstack.model import Transformer, preset
from flatstack.train import Run, TrainConfig, TrainingError, train

SMALL = dict(model="grok-1-tiny", seq_len=32, batch_size=4, warmup_steps=5, eval_tokens=2000, samples=0,
             progress=False, threads=1)


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    chats = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                           {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(300)]
    (root / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    prepare(PrepareConfig(inputs=[str(root / "chat.jsonl")], out=str(root / "d"), tokenizer="byte", progress=False))
    return root / "d"


def test_grad_accumulation_4x2_equals_batch_8(data_dir, tmp_path):
    """One optimizer step on 8 sequences, as 4 micro-batches of 2 or one of 8, lands on the same weights."""
    cfg = TrainConfig(data=str(data_dir), out=str(tmp_path / "r"), model_overrides={"n_experts": 0}, **SMALL)
    rng = np.random.default_rng(0)
    x, y, _ = Run(cfg).train_data.sample(8, cfg.seq_len, rng)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    weights = []
    for micro, accum in ((2, 4), (8, 1)):
        run = Run(replace(cfg, batch_size=micro, grad_accum=accum))
        run.batches = lambda step, m=micro, a=accum: [(x[i * m:(i + 1) * m], y[i * m:(i + 1) * m], None)
                                                      for i in range(a)]
        record = run.train_step()
        weights.append((record["loss"], [p.detach().clone() for p in run.model.parameters()]))
    (loss_a, wa), (loss_b, wb) = weights
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for a, b in zip(wa, wb, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    initial = list(Run(cfg).model.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(wa, initial, strict=True)), "the step changed nothing"


def test_moe_balance_loss_moves_the_router():
    """Minimising the load-balancing loss alone evens out the load of a router that favours one expert."""
    torch.manual_seed(0)
    model = Transformer(preset("grok-1-tiny", n_layers=1)).init_weights(seed=0)
    moe = model.layers[0].ffn
    routed = RouterLogits(model)
    shared = torch.randn(64)
    x = torch.randn(256, 64) + 2 * shared  # tokens share a direction, and expert 0's row points along it
    with torch.no_grad():
        moe.router.weight[0] = 0.25 * shared / shared.norm()

    def balance_and_load_of_expert0() -> tuple[torch.Tensor, float]:
        moe(x)
        seen = routed.take()
        logits = seen[0][0]
        return moe_losses(seen)[0], (logits.topk(2, dim=-1).indices == 0).any(-1).float().mean().item()

    balance_before, before = balance_and_load_of_expert0()
    assert before > 0.9
    # a small step: at 0.02 the router overshoots, and which expert takes the load flips from step to step
    # (where step 50 lands then depends on the machine's rounding)
    opt = torch.optim.SGD(moe.router.parameters(), lr=0.002)
    for _ in range(50):
        opt.zero_grad()
        balance_and_load_of_expert0()[0].backward()
        opt.step()
    balance_after, after = balance_and_load_of_expert0()
    assert balance_after.item() < balance_before.item() - 0.1
    assert after < before - 0.3, (before, after)


def test_sft_loss_counts_only_assistant_tokens(chat_dir, tmp_path):
    cfg = TrainConfig(data=str(chat_dir), out=str(tmp_path / "r"), **SMALL)
    run = Run(cfg)
    (x, y, mask), = run.batches(0)
    assert mask is not None and 0 < mask.sum() < mask.numel()
    with torch.no_grad():
        logits = run.model(x)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
    expected = ce[mask.flatten() == 1].mean().item()
    record = run.train_step()
    assert record["loss"] == pytest.approx(expected, rel=1e-5)
    # what the mask keeps decodes to assistant answers only
    kept = run.tokenizer.decode(y[mask == 1].tolist(), skip_special_tokens=True)
    assert "plus" not in kept and "It is" in kept


def train_cmd(data_dir, out, *extra) -> list[str]:
    return [sys.executable, "-m", "flatstack.cli", "train", "--data", str(data_dir), "--out", str(out),
            "--model", "grok-1-tiny", "--seq-len", "32", "--batch-size", "4", "--warmup-steps", "5",
            "--eval-every", "10", "--eval-tokens", "2000", "--samples", "0", "--progress", "false",
            "--threads", "1", *map(str, extra)]


def losses(run_dir) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if "loss" in r]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def wait_for_step(run_dir, step: int, proc, timeout: float = 120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and any(json.loads(line).get("step", 0) >= step
                                    for line in metrics.read_text().splitlines() if line.endswith("}")):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


def test_sigkill_then_resume_equals_uninterrupted_run(data_dir, tmp_path):
    steps = 40
    subprocess.run(train_cmd(data_dir, tmp_path / "full", "--max-steps", steps, "--ckpt-every", 7), check=True,
                   capture_output=True)
    proc = subprocess.Popen(train_cmd(data_dir, tmp_path / "cut", "--max-steps", steps, "--ckpt-every", 7),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(tmp_path / "cut", 17, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(train_cmd(data_dir, tmp_path / "cut", "--resume", "--max-steps", steps),
                             check=True, capture_output=True, text=True)
    assert "resumed from" in resumed.stdout
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(cut) == list(range(1, steps + 1))
    assert cut == full  # bitwise: same thread count, same data position, same RNG


def test_kill_during_checkpoint_write_leaves_previous_loadable(data_dir, tmp_path):
    """The process dies inside its second checkpoint write: the first stays whole and resumable."""
    code = (
        "import os, signal, sys\n"
        "import flatstack.checkpoint.native as c\n"
        "orig, calls = c.write_safetensors, []\n"
        "def dying(*a, **k):\n"
        "    calls.append(1)\n"
        "    orig(*a, **k)\n"
        "    if len(calls) == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
        "c.write_safetensors = dying\n"
        "from flatstack.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    cmd = train_cmd(data_dir, tmp_path / "r", "--max-steps", 20, "--ckpt-every", 5)
    proc = subprocess.run([sys.executable, "-c", code, *cmd[3:]], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    ckpts = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert "step_0000005" in ckpts and "step_0000010" not in ckpts
    model = flatstack.load(tmp_path / "r" / "checkpoints" / "step_0000005")
    assert model(torch.zeros(1, 4, dtype=torch.long)).isfinite().all()
    subprocess.run(train_cmd(data_dir, tmp_path / "r", "--resume", "--max-steps", 12), check=True,
                   capture_output=True)
    assert max(losses(tmp_path / "r")) == 12


def test_ctrl_c_saves_and_exits_cleanly(data_dir, tmp_path):
    proc = subprocess.Popen(train_cmd(data_dir, tmp_path / "r", "--max-steps", 100000, "--ckpt-every", 0),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(tmp_path / "r", 3, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "stopped by signal" in out
    step = max(losses(tmp_path / "r"))
    assert (tmp_path / "r" / "checkpoints" / f"step_{step:07d}" / "train_state.pt").exists()


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(data_dir, tmp_path, monkeypatch):
    import flatstack.train_step as step_mod

    real = step_mod.token_loss_sum
    calls = []

    def poisoned(*args):
        calls.append(1)
        loss = real(*args)
        return loss * float("nan") if len(calls) > 6 and torch.is_grad_enabled() else loss

    monkeypatch.setattr(step_mod, "token_loss_sum", poisoned)
    cfg = TrainConfig(data=str(data_dir), out=str(tmp_path / "r"), max_steps=20, ckpt_every=3, eval_every=0,
                      **SMALL)
    with pytest.raises(TrainingError, match=r"loss is nan at step 7.*step_0000006"):
        train(cfg)
    assert flatstack.load(tmp_path / "r" / "checkpoints" / "step_0000006") is not None


@pytest.mark.parametrize("case", ["missing_data", "context", "unknown_option", "bad_value", "batch_tokens",
                                  "momentum"])
def test_bad_training_input_names_the_option(case, data_dir, tmp_path, capsys):
    out = tmp_path / "r"
    args = {
        "missing_data": ["--data", str(tmp_path / "nodata")],
        "context": ["--data", str(data_dir), "--seq-len", "512"],
        "unknown_option": ["--data", str(data_dir), "--learning-rat", "3"],
        "bad_value": ["--data", str(data_dir), "--max-steps", "many"],
        "batch_tokens": ["--data", str(data_dir), "--seq-len", "32", "--batch-size", "4", "--batch-tokens", "100"],
        "momentum": ["--data", str(data_dir), "--muon-momentum", "1.0"],
    }[case]
    expect = {
        "missing_data": "nodata is not a prepared data folder",
        "context": "--seq-len 512 does not fit the model's context",
        "unknown_option": "unknown option --learning-rat",
        "bad_value": "--max-steps: expected int, got 'many'",
        "batch_tokens": "--batch-tokens 100 is not a multiple",
        "momentum": "--muon-momentum must be in [0, 1)",
    }[case]
    extra = ["--max-seq-len", "256"] if case == "context" else []
    rc = main(["train", "--out", str(out), "--progress", "false", *args, *extra])
    err = capsys.readouterr().err
    assert rc == 1 and expect in err and "Traceback" not in err, err
    assert not out.exists()


def test_generate_cli_samples_from_a_run(data_dir, tmp_path, capsys):
    cfg = TrainConfig(data=str(data_dir), out=str(tmp_path / "r"), max_steps=3, **SMALL)
    result = train(cfg)
    capsys.readouterr()
    assert main(["generate", result["checkpoint"], "--prompt", "ROMEO:", "--max-new-tokens", "20"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")
    assert os.path.exists(result["loss_curve"])


@pytest.mark.parametrize("config", ["main.toml", "shakespeare_char.toml"])
def test_shipped_configs_train(config, data_dir, tmp_path, capsys):
    """The TOML files `make run` and the README's benchmark use are valid and run end to end."""
    path = Path(__file__).resolve().parents[1] / "configs" / config
    rc = main(["train", "--data", str(data_dir), "--out", str(tmp_path / "r"), "--config", str(path),
               "--max-steps", "2", "--eval-tokens", "500", "--sample-tokens", "5", "--seq-len", "32",
               "--batch-size", "2", "--progress", "false"])
    out = capsys.readouterr().out
    assert rc == 0 and "validation loss" in out and "loss curve:" in out


def test_muon_batched_by_shape_equals_one_matrix_at_a_time():
    from flatstack.optim import Muon, newton_schulz

    gen = torch.Generator().manual_seed(0)
    shapes = [(16, 16), (16, 16), (40, 16), (16, 40), (4, 40, 16), (4, 16, 40)]  # tall, wide, expert stacks
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    expected = []
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
        mom = 0.05 * p.grad  # the momentum buffer after one step from zero, mu = 0.95
        g = p.grad.lerp(mom, 0.95).reshape(-1, *p.shape[-2:])
        update = torch.stack([newton_schulz(m) for m in g]).reshape(p.shape)
        scale = max(1.0, p.shape[-2] / p.shape[-1]) ** 0.5
        expected.append(p.detach() * (1 - 0.1 * 0.01) - 0.1 * scale * update)
    Muon(params, lr=0.1, weight_decay=0.01).step()
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-4, atol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients():
    model = Transformer(preset("grok-1-tiny")).init_weights(seed=0).train()
    x = torch.randint(0, 256, (2, 16))
    grads = []
    for recompute in (False, True):
        model.zero_grad()
        if recompute:
            keys = list(model.state_dict())
            apply_activation_checkpointing(model)
            assert list(model.state_dict()) == keys  # applied around the blocks: checkpoints keep their names
        model(x).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_fine_tune_from_checkpoint_keeps_last_k(chat_dir, tmp_path):
    """--init-from starts from the checkpoint's weights (its first loss is the checkpoint's level, far
    below a fresh model's), and only the last --keep-checkpoints folders stay."""
    base = train(TrainConfig(data=str(chat_dir), out=str(tmp_path / "base"), max_steps=30, ckpt_every=10,
                             eval_every=0, **{**SMALL, "warmup_steps": 2}))
    assert sorted(p.name for p in (tmp_path / "base" / "checkpoints").iterdir()) == ["step_0000020",
                                                                                      "step_0000030"]
    sft = TrainConfig(data=str(chat_dir), out=str(tmp_path / "sft"), init_from=base["checkpoint"], max_steps=1,
                      eval_every=0, **SMALL)
    train(sft)
    first = losses(tmp_path / "sft")[1]
    fresh = losses(tmp_path / "base")[1]
    assert first < fresh - 1.0, (first, fresh)
