"""Data-parallel training of the esper_cnn example with the native backend (docs/examples.md#ddp):
DistributedDataParallel over gloo, each process on its equal slice of every batch with the
drop-ins swapped in, checked against a single-process eager run on the whole batch (DDP
averages the gradients and the loss is a mean, so every step's gradients must agree). The
launcher spawns the processes itself; under torchrun (RANK and WORLD_SIZE set) every process
joins the group from the environment and rank 0 prints the comparison.

    python python/ddp_cnn.py                      # spawns 2 processes on this machine, 5 steps
    python python/ddp_cnn.py --world-size 4 --steps 10
    torchrun --standalone --nproc-per-node 2 python/ddp_cnn.py          # the same, under torchrun
    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        python/ddp_cnn.py                         # on each of two machines
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import esper_cnn
import example_harness
import kasmina_kernels as kk
import seed_slots


def train_and_record(model, train_model, batches, shard: slice) -> dict:
    """Train `train_model` (`model` or its DDP wrapper) on `shard` of every batch; return the
    gradients of every step and the final parameters of `model`."""
    optimizer = example_harness.sgd(model)
    gradients = []
    for step, (x, y) in enumerate(batches):
        example_harness.training_step(train_model, optimizer, x[shard], y[shard], step, autocast_dtype=None)
        gradients.append({name: p.grad.detach().clone() for name, p in model.named_parameters()})
    return {"gradients": gradients, "parameters": {n: p.detach().clone() for n, p in model.named_parameters()}}


def train_in_group(steps: int, batch_size: int, backend: str, out: str | None = None, **init) -> None:
    """Join the gloo group (`init`: rank and world size, else from the environment), train the
    CNN under DDP on this rank's slice of every batch with the drop-ins swapped in and
    `backend`; rank 0 saves its record to `out`, or without `out` prints the comparison."""
    dist.init_process_group("gloo", **init)
    try:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be a multiple of the world size {world_size}")
        per_rank = batch_size // world_size
        with kk.swap_in(seed_slots), kk.use_backend(backend):
            model = esper_cnn.build_model()
            batches = esper_cnn.make_batches(steps, batch_size)
            record = train_and_record(model, DistributedDataParallel(model), batches,
                                      slice(rank * per_rank, (rank + 1) * per_rank))
            # what actually ran, for the caller to check
            record["backend"] = kk.resolve_backend(batches[0][0])
            record["swapped"] = seed_slots.blend_gate is kk.blend_ops.blend_gate
        if rank == 0 and out is not None:
            torch.save(record, out)
        elif rank == 0:
            report(record, run_single_process_reference(steps, batch_size), world_size, steps)
        # every rank reaches here before any tears the group down: a rank that destroys its gloo
        # pairs while a peer still uses them can abort the peer
        dist.barrier()
    finally:
        dist.destroy_process_group()


def exit_process() -> None:
    """End a DDP process without finalizing the interpreter. A gloo worker thread can still hold
    the group's last works after the barrier, and releasing them (their tensors' Python objects,
    the Python context the autograd engine keeps for a backward) needs the GIL: during
    finalization that thread is terminated and the process aborts."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def ddp_worker(rank: int, world_size: int, port: int, steps: int, batch_size: int, backend: str, out: str):
    """One process of the local spawned run, in the group on 127.0.0.1:`port`."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    train_in_group(steps, batch_size, backend, out, rank=rank, world_size=world_size)
    exit_process()


def run_ddp(world_size: int = 2, steps: int = 5, batch_size: int = 16, backend: str = "native") -> dict:
    """Spawn the DDP run on this machine; return rank 0's record (per-step gradients, final
    parameters)."""
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} must be a multiple of world_size {world_size}")
    with socket.socket() as s:  # a free port for the group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.pt")
        mp.spawn(ddp_worker, args=(world_size, port, steps, batch_size, backend, out), nprocs=world_size, join=True)
        return torch.load(out)


def run_single_process_reference(steps: int = 5, batch_size: int = 16) -> dict:
    """The eager model (nothing swapped) trained in this process on the full batches."""
    model = esper_cnn.build_model()
    return train_and_record(model, model, esper_cnn.make_batches(steps, batch_size), slice(None))


def report(ddp: dict, reference: dict, world_size: int, steps: int) -> None:
    """The largest gradient difference over all steps and the largest final parameter difference."""
    grad = max((a[k] - b[k]).abs().max().item()
               for a, b in zip(ddp["gradients"], reference["gradients"]) for k in b)
    param = max((ddp["parameters"][k] - v).abs().max().item() for k, v in reference["parameters"].items())
    print(f"DDP (gloo, {world_size} processes, {ddp['backend']}) vs one eager process, {steps} steps: "
          f"max gradient difference {grad:.3e}, max parameter difference {param:.3e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=2, help="processes to spawn (ignored under torchrun)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--backend", default="native", help="kasmina backend in the DDP processes")
    args = parser.parse_args()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun or a similar launcher
        train_in_group(args.steps, args.batch_size, args.backend)
        exit_process()
    ddp = run_ddp(args.world_size, args.steps, args.batch_size, args.backend)
    report(ddp, run_single_process_reference(args.steps, args.batch_size), args.world_size, args.steps)


if __name__ == "__main__":
    main()
