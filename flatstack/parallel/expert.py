"""Expert parallel for MoE layers: each of `ep` ranks holds E/ep of every layer's experts, and the tokens
go to the rank of each expert they chose and come back, through two all-to-alls (token counts first, so
each rank knows what it receives, then the tokens; the backward runs the same exchange in reverse).

The expert stacks become DTensors sharded along the expert dim over the EP mesh, so FSDP2 shards them
further over the rest of the ranks (a 2-D mesh) and DCP saves them whole-addressable, loadable on any
number of ranks. The router stays with the block, replicated as every other weight. The MoE modules keep
their parameters and routing; only their forward changes (the class of each instance is swapped to
`ExpertParallelMoE`, from outside, as torch's parallel styles wrap a module's forward).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor
from torch.distributed.device_mesh import DeviceMesh

from flatstack.model import MoE, Transformer, run_experts


class ExpertParallelMoE(MoE):
    mesh: DeviceMesh  # the EP ranks of this rank's group

    def forward(self, x):
        shape = x.shape
        x, experts, weights, w = self.route(x.reshape(-1, shape[-1]))
        group, ep = self.mesh.get_group(), self.mesh.size()
        w = tuple(t.to_local() if hasattr(t, "to_local") else t for t in w)  # this rank's experts [E/ep, ...]
        local = w[0].shape[0]
        # the (token, slot) pairs in expert order: the experts of rank 0 first, then rank 1's, ...
        flat = experts.flatten()
        order = flat.argsort(stable=True)
        sent = x[order // experts.shape[1]]
        counts = torch.bincount(flat, minlength=local * ep).view(ep, local)
        received_counts = torch.empty_like(counts)
        dist.all_to_all_single(received_counts, counts, group=group)  # [source rank, my expert]
        send_splits, receive_splits = counts.sum(1).tolist(), received_counts.sum(1).tolist()  # one host sync
        received = wait_tensor(all_to_all_single_autograd(sent, receive_splits, send_splits, group))
        # what arrived is grouped by source rank, then by expert: each row's expert among this rank's
        expert_of = torch.repeat_interleave(torch.arange(local, device=x.device).repeat(ep),
                                            received_counts.flatten())
        out = run_experts(received, expert_of[:, None], received.new_ones(len(received), 1), w, self.act)
        if not len(received):  # no token for this rank's experts: their gradients are still owed (zeros) to
            out = out + sum(t.sum() for t in w) * 0  # FSDP2's reduce-scatter, which every rank joins
        back = wait_tensor(all_to_all_single_autograd(out, send_splits, receive_splits, group))
        y = x.new_zeros(shape)  # returned whole, not as a view: FSDP2 hooks the output of the module
        y.view(-1, shape[-1]).index_add_(0, order // experts.shape[1], back * weights.flatten()[order, None])
        return y


def apply_expert_parallel(model: Transformer, mesh: DeviceMesh) -> None:
    """Split every MoE layer's experts over `mesh` (a 1-D mesh of the EP ranks)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    E, ep = model.cfg.n_experts, mesh.size()
    if E % ep:
        raise ValueError(f"expert parallel over {ep} ranks needs the experts ({E}) divisible by {ep}")
    for block in model.layers:
        moe = block.ffn
        for name in ("w_gate", "w_up", "w_down"):
            p = getattr(moe, name)
            setattr(moe, name, torch.nn.Parameter(distribute_tensor(p.data, mesh, [Shard(0)])))
        moe.__class__ = ExpertParallelMoE
        moe.mesh = mesh
