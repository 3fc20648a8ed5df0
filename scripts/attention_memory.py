"""Peak memory and time of one Grok-1-shaped prefill attention layer (48 query heads, 8 KV heads, head_dim
128, soft cap 30) on the CPU: FlexAttention against the eager reference, each in a process of its own.

    .venv/bin/python scripts/attention_memory.py 8192 flex
    .venv/bin/python scripts/attention_memory.py 2048 flex
    .venv/bin/python scripts/attention_memory.py 2048 reference

Peak is the process's maximum resident memory above what it held once the inputs existed (and, for flex,
once it had compiled at another length); times are of a first and a second call at the measured length.
"""

import resource
import sys
import time

import torch

from flatstack.kernels import attention

T, kind = int(sys.argv[1]), sys.argv[2]
H, Hkv, D, CAP = 48, 8, 128, 30.0
q, k, v = torch.randn(1, H, T, D), torch.randn(1, Hkv, T, D), torch.randn(1, Hkv, T, D)
run = attention.flex if kind == "flex" else attention.reference
with torch.no_grad():
    if kind == "flex":
        run(q[:, :, :256], k[:, :, :256], v[:, :, :256], D**-0.5, CAP)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(2):
        start = time.perf_counter()
        run(q, k, v, D**-0.5, CAP)
        times.append(time.perf_counter() - start)
peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
print(f"{kind} T={T}: first call {times[0]:.2f} s, second {times[1]:.2f} s, peak above inputs {peak:.0f} MB")
