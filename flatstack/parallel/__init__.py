"""torch.distributed plans applied around the unchanged model, as torchtitan does.

world.py (the process group: ranks, setup with a timeout, the few collectives the trainer calls),
fsdp.py (FSDP2 data parallel), dcp.py (sharded checkpoints through torch.distributed.checkpoint,
loadable on any number of ranks, exportable to the native format).

`torchrun` (or `flatstack train --nproc N`, which starts it) gives each process its RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous. Each rank takes its slice of every global batch (train.py); its loss is
its share of the global batch's mean times the number of ranks, since FSDP averages the ranks' gradients
(gloo has no pre-scaled sum), so the step's gradient is one process's on the same global batch,
whatever the number of ranks.
"""
