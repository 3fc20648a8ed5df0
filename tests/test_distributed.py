"""Training on 2 ranks (torchrun, gloo, the CPU): FSDP2, alone or with expert or tensor parallel, gives one
process's losses on the same global batch; a sharded checkpoint resumes on 1 rank and on 2 with the same
next losses, and exports to a native checkpoint with the same logits; a rank that raises ends the job with
its own error."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import flatstack
from flatstack.checkpoint import convert

# the MoE losses off: they are means over each rank's own tokens, so with them the ranks' gradients are not
# one process's; AdamW and Muon both run (Muon on the blocks' matrices)
COMMON = ["--seq-len", "32", "--batch-size", "4", "--warmup-steps", "2", "--eval-tokens", "512", "--samples", "0",
          "--progress", "false", "--threads", "1", "--moe-aux-coef", "0", "--moe-z-coef", "0", "--dist-timeout", "60"]
MODELS = {"dense": ["--model", "grok-1-tiny", "--n-experts", "0", "--ffn-dim", "128"],
          "moe": ["--model", "grok-1-tiny", "--optimizer", "muon"],
          "grok2": ["--model", "grok-2-tiny", "--n-layers", "1"]}


def train(data: Path, out: Path, nproc: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "flatstack", "train", "--data", str(data), "--out", str(out), "--nproc", str(nproc),
           *COMMON, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def said(done: subprocess.CompletedProcess) -> str:
    """A failed run's stderr, its start (a rank's own error) and its end (torchrun's report) when long."""
    err = done.stderr
    return err if len(err) <= 6000 else f"{err[:3000]}\n[...]\n{err[-3000:]}"


def losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


# 2 ranks: FSDP2 alone, expert parallel (each rank 4 of the 8 experts), tensor parallel (the two ranks split each
# block and read the same rows); each against one process on the same global batch
LAYOUTS = {"dense": ("dense", []), "moe": ("moe", []), "moe-ep": ("moe", ["--ep", "2"]),
           "dense-tp": ("dense", ["--tp", "2"]), "moe-tp": ("moe", ["--tp", "2"]),
           "grok2-tp": ("grok2", ["--tp", "2"])}


@pytest.fixture(scope="module")
def one_process(data_dir, tmp_path_factory):
    """The losses of one process, per model, trained once for every layout."""
    runs = {}
    for model in MODELS:
        out = tmp_path_factory.mktemp(model)
        done = train(data_dir, out, 1, "--max-steps", "4", "--ckpt-every", "0", *MODELS[model])
        assert done.returncode == 0, said(done)
        runs[model] = losses(out)
    return runs


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_ranks_give_one_process_losses(data_dir, tmp_path, one_process, layout):
    model, extra = LAYOUTS[layout]
    done = train(data_dir, tmp_path, 2, "--max-steps", "4", "--ckpt-every", "0", *MODELS[model], *extra)
    assert done.returncode == 0, said(done)
    assert len(one_process[model]) == 4
    assert losses(tmp_path) == pytest.approx(one_process[model], rel=1e-5)
    assert (tmp_path / "metrics.jsonl").read_text().count('"loss"') == 4  # rank 0 alone writes


def test_an_expert_parallel_checkpoint_resumes_on_one_rank(data_dir, tmp_path, one_process):
    """Written in the background (DCP's async save) at steps 1 and 2; each is in place once complete."""
    args = ["--ckpt-every", "1", *MODELS["moe"]]
    first = train(data_dir, tmp_path, 2, "--max-steps", "2", "--ep", "2", "--async-checkpoint", "true", *args)
    assert first.returncode == 0, said(first)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000001", "step_0000002"]
    done = train(data_dir, tmp_path, 1, "--max-steps", "4", "--resume", *args)
    assert done.returncode == 0, said(done)
    assert losses(tmp_path) == pytest.approx(one_process["moe"], rel=1e-5)


def test_a_sharded_checkpoint_resumes_on_one_or_two_ranks_and_exports(data_dir, tmp_path):
    args = ["--ckpt-every", "2", *MODELS["dense"]]
    whole = train(data_dir, tmp_path / "whole", 1, "--max-steps", "4", *args)
    assert whole.returncode == 0, said(whole)
    first = train(data_dir, tmp_path / "a", 2, "--max-steps", "2", *args)
    assert first.returncode == 0, said(first)
    step2 = tmp_path / "a" / "checkpoints" / "step_0000002"
    assert (step2 / ".metadata").exists() and len(list(step2.glob("*.distcp"))) == 2
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for run, nproc in (("a", 1), ("b", 2)):
        done = train(data_dir, tmp_path / run, nproc, "--max-steps", "4", "--resume", *args)
        assert done.returncode == 0, said(done)
        assert losses(tmp_path / run) == pytest.approx(losses(tmp_path / "whole"), rel=1e-5), run
    # the sharded checkpoint, exported, is the one process's native checkpoint of the same step
    native = tmp_path / "native"
    convert(step2, native, "dcp")
    reference = flatstack.load(tmp_path / "whole" / "checkpoints" / "step_0000002")
    tokens = torch.randint(0, reference.cfg.vocab_size, (2, 16))
    want = reference(tokens)
    for path in (native, step2):  # flatstack.load reads the sharded folder too
        torch.testing.assert_close(flatstack.load(path)(tokens), want, rtol=1e-5, atol=1e-5)


FAIL_ON_RANK_1 = """
import os, sys
import flatstack.train as t
real = t.optimizer_step
def failing(*args, **kw):
    if os.environ["RANK"] == "1" and args[6] == 1:
        raise RuntimeError("rank 1 broke at step 2")
    return real(*args, **kw)
t.optimizer_step = failing
from flatstack.cli import run
sys.argv = ["flatstack", *sys.argv[1:]]
run()
"""


def test_a_rank_that_raises_ends_the_job_with_its_error(data_dir, tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(FAIL_ON_RANK_1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", str(script),
           "train", "--data", str(data_dir), "--out", str(tmp_path / "run"), "--max-steps", "5", *COMMON,
           *MODELS["dense"]]
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert "rank 1 broke at step 2" in done.stderr + done.stdout
    assert time.monotonic() - started < 120  # not the 60 s timeout of each collective, over and over


def memory_report(nproc: int) -> dict:
    script = str(Path(__file__).parent.parent / "scripts" / "fsdp_memory.py")
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
                                 if nproc > 1 else [])
    done = subprocess.run([*launch, script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, said(done)
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))


def test_two_ranks_hold_half_the_state_each_as_the_plan_predicts():
    from flatstack.bench_train import DENSE
    from flatstack.parallel.plan import CARDS, plan_training

    one, two = memory_report(1), memory_report(2)
    plan = plan_training(DENSE, 2, CARDS["h200"], DENSE.max_seq_len, 2 * DENSE.max_seq_len)["per_gpu_bytes"]
    for kind in ("parameters", "gradients", "optimizer"):
        assert two[kind] / one[kind] == pytest.approx(0.5, abs=0.01), kind
        assert plan[kind] == pytest.approx(two[kind], rel=0.10), kind


def test_plan_lays_out_grok1_without_allocating_it(capsys):
    from flatstack.cli import main

    assert main(["plan", "grok-1", "--gpus", "64", "--gpu", "h200", "--train", "--json"]) == 0
    train = json.loads(capsys.readouterr().out)
    assert train["fits"] and train["per_gpu_bytes"]["parameters"] == pytest.approx(4 * 315.68e9 / 64, rel=0.01)
    assert train["fsdp_link"] == "network" and 0 < train["mfu_bound"] <= 1
    # expert parallel over 8: the same shards (every expert split over 64 ranks), an eighth of the FSDP2 traffic
    assert main(["plan", "grok-1", "--gpus", "64", "--gpu", "h200", "--train", "--ep", "8", "--json"]) == 0
    ep = json.loads(capsys.readouterr().out)
    assert ep["per_gpu_bytes"]["parameters"] == pytest.approx(train["per_gpu_bytes"]["parameters"], rel=0.01)
    assert ep["communication_s"]["fsdp"] < train["communication_s"]["fsdp"] / 6 and ep["mfu_bound"] > train["mfu_bound"]
    # serving: the fewest tensor-parallel GPUs that hold the weights, 8 (the KV heads split one each)
    assert main(["plan", "grok-1", "--gpus", "8", "--gpu", "h200", "--serve", "--json"]) == 0
    serve = json.loads(capsys.readouterr().out)
    assert serve["fits"] and serve["tp"] == 8 and serve["kv_cache_sequences"] > 0
    assert serve["per_gpu_bytes"]["weights"] == pytest.approx(2 * 315.68e9 / 8, rel=0.03)
