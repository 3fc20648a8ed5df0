"""Per-rank bytes of parameters, gradients and AdamW state under FSDP2, beside one process's, after one
training step of a GPT-2-small-sized model (`bench_train.DENSE`, 124M parameters) on the CPU, and what
`flatstack plan` predicts for the same layout. One JSON line per rank.

    torchrun --standalone --nproc-per-node 2 scripts/fsdp_memory.py     # sharded over 2 ranks
    python scripts/fsdp_memory.py                                       # one process
"""

import json
import os

import torch

from flatstack.bench_train import DENSE
from flatstack.model import Transformer
from flatstack.optim import build_optimizers
from flatstack.parallel.fsdp import shard
from flatstack.parallel.world import setup
from flatstack.train_config import TrainConfig


def local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors if t is not None)


def main() -> None:
    w = setup(torch.device("cpu"), 120)
    torch.manual_seed(0)
    model = Transformer(DENSE).init_weights(seed=0).train()
    if "WORLD_SIZE" in os.environ:
        shard(model)
    optimizers = build_optimizers(model, TrainConfig(), torch.device("cpu"))
    x = torch.randint(0, DENSE.vocab_size, (2, 64))
    model(x).float().mean().backward()
    for opt in optimizers:
        opt.step()
    params = list(model.parameters())
    state = [v for opt in optimizers for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    # AdamW's per-parameter "step" counters are scalars: not what the plan counts
    state = [t for t in state if t.ndim > 0]
    report = {"rank": w.rank, "ranks": w.size, "parameters": local_bytes(params),
              "gradients": local_bytes(p.grad for p in params), "optimizer": local_bytes(state)}
    if w.main:
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
