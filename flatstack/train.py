"""The training loop: from prepared token shards to checkpoints, for pretraining and fine-tuning.

A step draws its micro-batches from an RNG seeded by (seed, step, micro-step), so the data position is
the step number itself; a checkpoint holds the weights, optimizer, step and every RNG state, and
`--resume` continues bit for bit. Checkpoints are folders written beside their final name and renamed
into place, so a kill at any moment leaves the previous one whole.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from flatstack.allocator import keep_freed_memory
from flatstack.ceilings import matmul_flops
from flatstack.checkpoint import load, save
from flatstack.checkpoint.dcp import is_dcp
from flatstack.data import DataError, TokenData
from flatstack.generate import encode_prompt, generate
from flatstack.losses import RouterLogits, apply_activation_checkpointing, compile_blocks, token_loss_sum
from flatstack.model import PRESETS, Transformer, model_stats, preset
from flatstack.optim import build_optimizers
from flatstack.parallel.dcp import load_sharded, save_sharded
from flatstack.parallel.layout import Layout, check_degrees, parallelize
from flatstack.parallel.world import all_sum, barrier, launched, leave, rank_device, setup
from flatstack.plot import plot_losses
from flatstack.tokenizer import load_tokenizer
from flatstack.train_config import TrainConfig, TrainingError, validate
from flatstack.train_step import optimizer_step

# ---------------------------------------------------------------------------------------------
# the run


class Run:
    """Everything one training run holds; `train()` drives it."""

    def __init__(self, cfg: TrainConfig):
        validate(cfg)
        self.cfg = cfg
        device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.world = setup(device, cfg.dist_timeout)  # ranks started by torchrun; one process: nothing to join
        self.sharded = launched()  # under torchrun, even as one rank, the model is sharded over the ranks
        self.device = rank_device(device, self.world)
        if (cfg.tp > 1 or cfg.ep > 1) and not self.sharded:
            raise DataError("--tp and --ep split the model over ranks: start the run with --nproc N (or torchrun)")
        try:
            check_degrees(self.world.size, cfg.tp, cfg.ep)
        except ValueError as e:
            raise DataError(str(e)) from None
        data_ranks = self.world.size // cfg.tp  # the ranks of a tensor-parallel group read the same rows
        if cfg.batch_size % data_ranks:
            raise DataError(f"--batch-size {cfg.batch_size} does not split over {data_ranks} data-parallel ranks")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.train_data = TokenData(cfg.data, "train")
        self.val_data = TokenData(cfg.data, "val")
        self.tokenizer = load_tokenizer(cfg.data)
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.model = self.build_model()
        mcfg = self.model.cfg
        if cfg.seq_len > mcfg.max_seq_len:
            raise DataError(f"--seq-len {cfg.seq_len} does not fit the model's context (max_seq_len "
                            f"{mcfg.max_seq_len}); lower --seq-len or raise --max-seq-len")
        vocab = self.train_data.meta["vocab_size"]
        if vocab > mcfg.vocab_size:
            raise DataError(f"the data's tokenizer has {vocab} tokens but the model's vocabulary is "
                            f"{mcfg.vocab_size}; prepare the data with the model's tokenizer")
        for split in (self.train_data, self.val_data):
            if len(split) < cfg.seq_len + 1:
                raise DataError(f"--seq-len {cfg.seq_len} does not fit the data: a split holds only "
                                f"{len(split)} tokens")
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(self.model)
        self.router_logits = RouterLogits(self.model)
        if cfg.compile:
            compile_blocks(self.model)
        self.layout = parallelize(self.model, self.world.rank, self.world.size, self.device, cfg.tp, cfg.ep) \
            if self.sharded else Layout()
        self.forward = self.model.hidden  # the model up to its final norm; the LM head is fused with the loss
        # sharded checkpoints written in the background talk over a group of their own, beside training's
        self.background = dist.new_group(backend="gloo") if self.sharded and cfg.async_checkpoint else None
        self.pending = None  # what completes the checkpoint being written
        self.optimizers = build_optimizers(self.model, cfg, self.device)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else torch.autocast("cpu", enabled=False))
        self.step = 0
        self.flops_per_token = 3 * model_stats(mcfg, cfg.seq_len).flops_per_token
        self.stop_requested = False
        self.history: dict[str, list] = {"train": [], "val": []}

    def build_model(self) -> Transformer:
        cfg = self.cfg
        source = cfg.init_from or (cfg.model if cfg.model not in PRESETS else None)
        if source is not None:
            if cfg.model_overrides:
                raise DataError("model overrides apply to presets only, not to --init-from checkpoints")
            model = load(source, dtype=torch.float32, device=self.device)
        else:
            # the data's tokenizer decides the special tokens, not the preset's original vocabulary (whose
            # ids mean other characters here): None lets the engine take the tokenizer's own markers
            sizes = {"vocab_size": self.train_data.meta["vocab_size"], "max_seq_len": cfg.seq_len,
                     "bos_token_id": None, "eos_token_id": None}
            try:
                mcfg = preset(cfg.model, **{**sizes, **cfg.model_overrides})
            except (TypeError, ValueError) as e:
                raise DataError(f"model {cfg.model!r}: {e}") from None
            with torch.device(self.device):
                model = Transformer(mcfg)
            model.init_weights(seed=cfg.seed)
        return model.train()

    # -- state -----------------------------------------------------------------------------------

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (a folder counts once its rename made it visible)."""
        if not self.ckpt_dir.exists():
            return []
        found = [p for p in self.ckpt_dir.iterdir() if re.fullmatch(r"step_\d+", p.name)]
        return sorted(found, key=lambda p: int(p.name[5:]))

    def save_checkpoint(self) -> Path:
        state = {
            "step": self.step,
            # sharded runs keep the optimizer state in their shards
            "optimizers": [opt.state_dict() for opt in self.optimizers] if not self.sharded else None,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "history": self.history,
            "config": asdict(self.cfg),
        }
        path = self.ckpt_dir / f"step_{self.step:07d}"
        self.complete_checkpoint()
        if self.sharded:
            self.pending = save_sharded(self.model, self.optimizers, path, state, Path(self.cfg.data), self.world,
                                        self.background)
            if self.background is None:
                self.complete_checkpoint()
        else:
            save(self.model, path, tokenizer_dir=self.cfg.data, train_state=state)
            self.drop_old_checkpoints()
        return path

    def complete_checkpoint(self) -> None:
        """Wait for a checkpoint written in the background, if one is, and put it in place."""
        if self.pending is not None:
            self.pending()
            self.pending = None
            self.drop_old_checkpoints()

    def drop_old_checkpoints(self) -> None:
        if self.world.main:
            for old in self.checkpoints()[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()

    def resume(self) -> None:
        ckpts = self.checkpoints()
        if not ckpts:
            raise DataError(f"--resume: no checkpoint in {self.ckpt_dir}")
        path = ckpts[-1]
        state = torch.load(path / "train_state.pt", weights_only=False)
        if is_dcp(path):  # written by any number of ranks; read by this one
            load_sharded(self.model, self.optimizers, path)
        elif self.sharded:
            raise DataError(f"{path} was written by one process without torchrun; resume it the same way")
        else:
            self.model.load_state_dict(load(path, dtype=torch.float32, device=self.device).state_dict())
            for opt, s in zip(self.optimizers, state["optimizers"], strict=True):
                opt.load_state_dict(s)
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step = state["step"]
        self.history = state["history"]
        # Steps logged after this checkpoint will be run again: drop them so each step appears once.
        metrics = self.out / "metrics.jsonl"
        if metrics.exists() and self.world.main:
            kept = [line for line in metrics.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= self.step]
            tmp = metrics.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, metrics)
        if self.world.main:
            print(f"resumed from {path} at step {self.step}")

    # -- steps -----------------------------------------------------------------------------------

    def stopping(self) -> bool:
        """A signal asked to stop, on any rank: all stop at the same step (or the rest would wait for it)."""
        if self.sharded:
            flag = all_sum(torch.tensor([float(self.stop_requested)], device=self.device))
            self.stop_requested = bool(flag.item())
        return self.stop_requested

    def batches(self, step: int):
        """The micro-batches of one step: a function of (seed, step) only, so resuming replays them."""
        cfg = self.cfg
        per_rank = cfg.batch_size // self.layout.dp
        rows = slice(self.layout.dp_rank * per_rank, (self.layout.dp_rank + 1) * per_rank)  # this rank's slice
        for micro in range(cfg.grad_accum):
            rng = np.random.default_rng([cfg.seed, step, micro])
            x, y, mask = (a if a is None else a[rows] for a in self.train_data.sample(cfg.batch_size, cfg.seq_len, rng))
            yield (torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device),
                   None if mask is None else torch.from_numpy(mask).to(self.device, torch.float32))

    def train_step(self) -> dict:
        try:
            record = optimizer_step(self.model, self.forward, self.router_logits, self.optimizers,
                                    list(self.batches(self.step)), self.cfg, self.step, self.autocast, self.layout)
        except TrainingError as e:
            self.complete_checkpoint()  # one written in the background is in place before it is named
            last = self.checkpoints()
            raise TrainingError(f"{e}; stopping. Last good checkpoint: {last[-1] if last else 'none'}") from None
        self.step += 1
        return record

    @torch.no_grad()
    def evaluate(self) -> dict:
        cfg = self.cfg
        self.model.eval()
        total, count = torch.zeros((), dtype=torch.float64), 0.0
        budget = cfg.eval_tokens or len(self.val_data)
        group: list = []

        def flush():
            nonlocal total, count
            x = torch.from_numpy(np.stack([g[0] for g in group])).to(self.device)
            y = torch.from_numpy(np.stack([g[1] for g in group])).to(self.device)
            m = None if group[0][2] is None else torch.from_numpy(np.stack([g[2] for g in group])).to(self.device)
            with self.autocast:
                total += token_loss_sum(self.model, self.forward(x), y, m).double().cpu()
            count += y.numel() if m is None else float(m.sum())
            group.clear()

        seen = 0
        for x, y, m in self.val_data.windows(cfg.seq_len):
            if seen >= budget:
                break
            if group and len(x) != len(group[0][0]):
                flush()  # the last, shorter window goes alone
            group.append((x, y, m))
            seen += len(y)
            if len(group) == cfg.eval_batch:
                flush()
        if group:
            flush()
        self.model.train()
        val_loss = float(total) / max(count, 1.0)
        bytes_per_token = self.val_data.loss_bytes / max(1, self.val_data.loss_tokens)
        return {"step": self.step, "val_loss": val_loss, "val_bpb": val_loss / math.log(2) / bytes_per_token,
                "val_tokens": int(count)}

    def samples(self) -> list[str]:
        """Samples after an end-of-text token and the sample prompt; on chat data, the prompt is a user turn
        and the sample the assistant's answer."""
        cfg = self.cfg
        chat = self.train_data.masks is not None
        prompt, stops = encode_prompt(self.tokenizer, cfg.sample_prompt, chat)
        gen = torch.Generator().manual_seed(cfg.seed)  # its own RNG: sampling must not move the training RNG
        self.model.eval()
        texts = []
        for _ in range(cfg.samples):
            ids = generate(self.model, prompt, cfg.sample_tokens, temperature=0.8, top_k=50, stop_ids=stops,
                           generator=gen)
            texts.append((f"user: {cfg.sample_prompt}\nassistant: " if chat else cfg.sample_prompt)
                         + self.tokenizer.decode(ids))
        self.model.train()
        return texts


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def evaluate_and_report(run: Run, bar, metrics: Path, plot: Path) -> dict:
    """Every rank evaluates and samples (each forward needs every rank's shards); rank 0 writes and prints."""
    result = run.evaluate()
    run.history["val"].append((run.step, result["val_loss"]))
    samples = run.samples() if run.cfg.samples else []
    if run.world.main:
        append_jsonl(metrics, result)
        plot_losses(run.history, plot)
        bar.write(f"step {run.step}: val_loss {result['val_loss']:.4f}, val_bpb {result['val_bpb']:.4f}")
        for text in samples:
            bar.write(f"--- sample ---\n{text}\n--------------")
    return result


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Run to cfg.max_steps (or a stop signal); returns the last evaluation."""
    keep_freed_memory()
    run = Run(cfg)  # every input error is raised here, before anything is written
    if resume:
        run.resume()
    elif run.checkpoints():
        raise DataError(f"{run.out} already holds checkpoints; pass --resume to continue it, or another --out")
    main = run.world.main  # every rank trains, evaluates and samples (the shards need them all); rank 0 writes
    if main:
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / "config.json").write_text(json.dumps(asdict(cfg), indent=1) + "\n")
    barrier()
    metrics, plot = run.out / "metrics.jsonl", run.out / "loss.png"
    peak = matmul_flops(run.device, torch.bfloat16 if run.device.type == "cuda" else torch.float32)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    stats = model_stats(run.model.cfg, cfg.seq_len)
    if main:
        print(f"model: {stats.total_params / 1e6:.2f}M parameters ({stats.active_params / 1e6:.2f}M active), "
              f"{tokens_per_step} tokens/step, matmul peak {peak / 1e9:.1f} GFLOP/s on {run.device}"
              + (f", {run.world.size} ranks" if run.world.size > 1 else ""))

    def on_signal(signum, frame):
        run.stop_requested = True
        signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    last_eval: dict = {}
    bar = tqdm(total=cfg.max_steps, initial=run.step, desc="train", disable=not (cfg.progress and main),
               file=sys.stdout)
    try:
        while run.step < cfg.max_steps and not run.stopping():
            t0 = time.perf_counter()
            record = run.train_step()
            dt = time.perf_counter() - t0
            record["tokens_per_s"] = tokens_per_step / dt
            record["mfu"] = record["tokens_per_s"] * run.flops_per_token / peak
            if main:
                append_jsonl(metrics, record)
            run.history["train"].append((run.step, record["loss"]))
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                            tok_s=f"{record['tokens_per_s']:.0f}", mfu=f"{record['mfu']:.1%}")
            done = run.step == cfg.max_steps
            if done or (cfg.eval_every and run.step % cfg.eval_every == 0):
                last_eval = evaluate_and_report(run, bar, metrics, plot)
            if done or (cfg.ckpt_every and run.step % cfg.ckpt_every == 0):
                run.save_checkpoint()
        if run.stopping():  # asked on any rank: every rank saves (the save is collective)
            path = run.save_checkpoint()
            bar.write(f"stopped by signal at step {run.step}; checkpoint saved to {path}")
        run.complete_checkpoint()
    finally:
        bar.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    last = run.checkpoints()
    leave()  # every rank is done with the group: its threads end here, not in the interpreter's teardown
    return {**last_eval, "checkpoint": str(last[-1]) if last else None, "loss_curve": str(plot),
            "stopped": run.stop_requested}
