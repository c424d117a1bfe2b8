"""Quickstart: blend a channels_last host with a seed through every op, on every backend this
machine has, and compare each with the eager reference.

    python python/quickstart.py            # CPU
    python python/quickstart.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse

import torch

import kasmina_kernels as kk
from kasmina_kernels.bench.command import device_arg, shape_arg
from kasmina_kernels.bench.timing import wall_per_call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=device_arg, default=torch.device("cpu"))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--shape", type=shape_arg(range(4, 5)), default=(8, 64, 16, 16),
                        help="(B,C,H,W), comma separated (default: 8,64,16,16)")
    args = parser.parse_args()
    device, shape = args.device, args.shape
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)

    # A host in channels_last, as CNN hosts run under autocast; the seed in plain NCHW.
    host = torch.randn(shape, generator=gen).to(device, dtype).contiguous(memory_format=torch.channels_last)
    seed = torch.randn(shape, generator=gen).to(device, dtype)
    alpha = torch.rand(shape[0], 1, 1, 1, generator=gen).to(device)
    channels = shape[1]
    hidden = kk.reference.gate_hidden_size(channels)
    w1 = (torch.randn(hidden, channels, generator=gen) / channels**0.5).to(device, dtype)
    b1 = torch.zeros(hidden).to(device, dtype)
    w2 = (torch.randn(1, hidden, generator=gen) / hidden**0.5).to(device, dtype)
    b2 = torch.zeros(1).to(device, dtype)

    backends = kk.available_backends(device)
    print(f"backends on {device.type}: {backends}; auto -> {kk.resolve_backend(host)}")
    print(f"{'op':24s} {'backend':10s} {'max |diff| vs reference':>24s} {'us/call':>10s}")
    for backend in backends:
        gate = kk.gate_network(host, w1, b1, w2, b2, topology="cnn", backend=backend)
        calls = {"blend_add": ((host, seed, alpha), {}), "blend_multiply": ((host, seed, alpha), {}),
                 "blend_gate": ((host, seed, alpha, gate), {}),
                 "gate_network": ((host, w1, b1, w2, b2), {"topology": "cnn"})}
        for name, (a, k) in calls.items():
            out = getattr(kk, name)(*a, **k, backend=backend)
            assert out.dtype == host.dtype
            diff = (out.double() - getattr(kk.reference, name)(*a, **k).double()).abs().max().item()
            [sample] = wall_per_call([lambda i: getattr(kk, name)(*a, **k, backend=backend)], device, 1,
                                     calls=50, rounds=1)
            print(f"{name:24s} {backend:10s} {diff:24.3e} {sample.median * 1e6:10.1f}")

if __name__ == "__main__":
    main()
