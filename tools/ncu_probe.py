"""A few native and Triton calls on CUDA for Nsight Compute to profile (not a test):

    ncu --clock-control none --kernel-name regex:"blend_elementwise|_blend_|pool|reduce" \\
        --section SpeedOfLight --section Occupancy --section MemoryWorkloadAnalysis \\
        python3 tools/ncu_probe.py

blend_add forward and backward (native, then triton) and gated_pool forward and backward
(native) at Esper's transformer shape (32, 256, 384), float32, per-sample alpha; each twice.
"""

import torch

import kasmina_kernels as kk

SHAPE = (32, 256, 384)

torch.manual_seed(0)
h = torch.randn(SHAPE, device="cuda", requires_grad=True)
s = torch.randn(SHAPE, device="cuda", requires_grad=True)
alpha = torch.rand(SHAPE[0], 1, 1, device="cuda", requires_grad=True)
grad = torch.randn(SHAPE, device="cuda")
for backend in ("native", "triton"):
    for _ in range(2):
        y = kk.blend_add(h, s, alpha, backend=backend)
        torch.autograd.grad(y, (h, s, alpha), grad)
x = torch.randn(SHAPE, device="cuda", requires_grad=True)
for _ in range(2):
    y = kk.gated_pool(x, "transformer", backend="native")
    torch.autograd.grad(y, x, torch.randn_like(y))
torch.cuda.synchronize()
