"""Tensor-parallel inference: one model's heads and feed-forward split across N processes of one machine
(`LLM(path, tp=N)`, `flatstack serve MODEL --tp N`), over gloo on CPUs and NCCL on GPUs.

Rank r keeps query and KV heads [r*H/N, (r+1)*H/N) (whole GQA groups, so N must divide the KV heads), the
same share of the MLP's hidden units and of every expert's, and the matching input columns of `wo` and
`w_down` (column then row parallel, as Megatron-LM splits them): its attention and feed-forward outputs
are partial sums, added over the ranks by one all-reduce each. Embedding, norms, router and LM head stay
whole on every rank, so every rank routes alike and computes the same logits. Each rank's paged KV pool
holds its own heads: `kv_cache_memory` is per rank.

Rank 0 is the caller's process: it schedules, samples and detokenises; each step it broadcasts the
step's plan (runner.Planned entries) and every rank runs the same forward. The other ranks are started
by rank 0 (spawned processes) and do nothing but load their shard and run the steps they are sent.
"""

from __future__ import annotations

import atexit
import datetime
import os
import signal
import socket
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from flatstack.model import MoE, Transformer

TIMEOUT = datetime.timedelta(minutes=30)  # a rank loading a large checkpoint may take minutes
# the other ranks wait for rank 0's next step for as long as the engine stays idle
IDLE = datetime.timedelta(days=365)


def check_divisible(model: Transformer, tp: int) -> None:
    cfg = model.cfg
    for name, value in (("n_kv_heads", cfg.n_kv_heads), ("ffn_dim", cfg.ffn_dim),
                        ("residual_ffn_dim", cfg.residual_ffn_dim)):
        if value % tp:
            raise ValueError(f"tensor parallel over {tp} ranks needs {name} ({value}) divisible by {tp}")


def shard_model(model: Transformer, rank: int, tp: int) -> None:
    """Cut `model` to rank `rank`'s share of `tp`, in place; `model.cfg` then describes the shard (its
    head and hidden-unit counts are the rank's), which sizes the KV pool."""
    check_divisible(model, tp)
    for block in model.layers:
        attn, ffn = block.attn, block.ffn
        for linear in (attn.wq, attn.wk, attn.wv):
            keep(linear, "weight", 0, rank, tp)
            keep(linear, "bias", 0, rank, tp)
        keep(attn.wo, "weight", 1, rank, tp)
        if isinstance(ffn, MoE):  # stacks [E, F, D] and [E, D, F]: each expert's hidden units
            keep(ffn, "w_gate", 1, rank, tp)
            keep(ffn, "w_up", 1, rank, tp)
            keep(ffn, "w_down", 2, rank, tp)
        residual = getattr(block, "mlp", None)  # Grok-2's dense MLP beside the experts
        for mlp in ([] if isinstance(ffn, MoE) else [ffn]) + ([residual] if residual is not None else []):
            keep(mlp.w_gate, "weight", 0, rank, tp)
            keep(mlp.w_up, "weight", 0, rank, tp)
            keep(mlp.w_down, "weight", 1, rank, tp)
        if residual is not None:
            residual.register_forward_hook(sum_over_ranks)
        attn.register_forward_hook(sum_over_ranks)
        ffn.register_forward_hook(sum_over_ranks)
    cfg = model.cfg
    model.cfg = replace(cfg, n_heads=cfg.n_heads // tp, n_kv_heads=cfg.n_kv_heads // tp, ffn_dim=cfg.ffn_dim // tp,
                        residual_ffn_dim=cfg.residual_ffn_dim // tp)


def load_shard(path, rank: int, tp: int, dtype: torch.dtype | None, device: torch.device) -> Transformer:
    """Rank `rank`'s share of the checkpoint at `path`, never the whole model in memory: the model is laid out
    on the meta device and cut (`shard_model`), then each tensor is read (memory-mapped) and narrowed to the
    shard's shape. A checkpoint cut for tensor parallel (the Grok-2 release) gives this rank's slices from
    the files that hold them."""
    from flatstack.checkpoint import read_tensors

    cfg, tensors = read_tensors(path, part=(rank, tp))
    with torch.device("meta"):
        model = Transformer(cfg)
    shard_model(model, rank, tp)
    state = {}
    for name, p in model.state_dict().items():
        t = tensors.pop(name)
        for dim, (have, want) in enumerate(zip(t.shape, p.shape, strict=True)):
            if have != want:
                t = t.narrow(dim, rank * want, want)
        state[name] = t.to(device=device, dtype=dtype or t.dtype, copy=True)
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False)


def keep(module: nn.Module, name: str, dim: int, rank: int, tp: int) -> None:
    """Replace parameter `name` by its `rank`-th of `tp` slices along `dim` (a copy: the whole is freed)."""
    p = getattr(module, name)
    if p is None:
        return
    setattr(module, name, nn.Parameter(p.data.chunk(tp, dim)[rank].clone(), requires_grad=False))


def sum_over_ranks(module, args, out: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(rank: int, tp: int, port: int, device: torch.device):
    """Join the ranks; returns the group that carries rank 0's step plans (gloo, waiting without a deadline:
    the collectives of a step keep TIMEOUT)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=tp, timeout=TIMEOUT)
    return dist.new_group(backend="gloo", timeout=IDLE)


def share_cores(device: torch.device, tp: int) -> None:
    """On the CPU, each rank its share of the cores: N ranks of all the cores each would fight over them."""
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))


def rank_device(device: str | None, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device is not None and device.startswith("cuda") else torch.device("cpu")


class Ranks:
    """The other ranks, seen from rank 0: started with the engine, sent every step, stopped at `close`
    (or at exit)."""

    def __init__(self, source, settings: dict, tp: int):
        device = rank_device(settings.get("device"), 0)
        if device.type == "cuda" and torch.cuda.device_count() < tp:
            raise ValueError(f"tensor parallel over {tp} ranks needs {tp} GPUs; this machine has "
                             f"{torch.cuda.device_count()}")
        port = free_port()
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=serve_rank, args=(rank, tp, port, source, settings), daemon=True,
                                  name=f"flatstack-tp-rank{rank}") for rank in range(1, tp)]
        for p in self.procs:
            p.start()
        share_cores(device, tp)
        try:
            self.plans = join(0, tp, port, device)
        except BaseException:
            self.stop()
            raise
        atexit.register(self.close)

    def send(self, step) -> None:
        """The step's plan to every rank; a rank that died fails it (gloo sees the closed connection)."""
        dead = [p.name for p in self.procs if not p.is_alive()]
        if dead or not self.procs:
            raise RuntimeError(f"tensor-parallel rank(s) {', '.join(dead) or 'all'} stopped (an error above, or "
                               "a failed step); start the engine again")
        dist.broadcast_object_list([step], src=0, group=self.plans)

    def abort(self) -> None:
        """After a step failed on this rank: the others wait inside that step's collectives, which nothing
        will complete; end them now (the engine cannot step again)."""
        for p in self.procs:
            p.kill()
        self.stop()
        dist.destroy_process_group()

    def close(self) -> None:
        """Tell the ranks to stop (if they all still run), wait for them, leave the process group."""
        if not self.procs:
            return
        try:
            if all(p.is_alive() for p in self.procs):
                self.send(None)
        finally:
            self.stop()
            dist.destroy_process_group()

    def stop(self) -> None:
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        self.procs = []


def receive(plans):
    box = [None]
    dist.broadcast_object_list(box, src=0, group=plans)
    return box[0]


def serve_rank(rank: int, tp: int, port: int, source, settings: dict) -> None:
    """A rank other than 0: load the model, keep this rank's shard, then run every step rank 0 sends."""
    from flatstack.engine.config import EngineConfig
    from flatstack.engine.runner import ModelRunner

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle: it stops the ranks
    config = EngineConfig(**settings)
    device = rank_device(config.device, rank)
    share_cores(device, tp)
    plans = join(rank, tp, port, device)
    if isinstance(source, Transformer):
        model = source
        shard_model(model, rank, tp)
        model.to(device)
    else:
        model = load_shard(source, rank, tp, config.torch_dtype, device)
    num_blocks = receive(plans)
    if num_blocks is None:  # rank 0 failed before the engine started
        return
    runner = ModelRunner(model, num_blocks, config.block_size, config.quantize or "float", compile_decode=False,
                         max_num_seqs=config.max_num_seqs)
    while (step := receive(plans)) is not None:
        runner.execute(step)
    dist.destroy_process_group()
