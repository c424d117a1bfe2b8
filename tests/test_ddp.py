"""Issue 7 item 8: DistributedDataParallel with the gloo backend, two processes on CPU,
training the python/ CNN example with the native backend, gives the gradients of a
single-process eager run on the full batches (float32 tolerance), at every step."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

import ddp_cnn  # noqa: E402

STEPS = 3


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="this torch build has no torch.distributed gloo backend")
def test_ddp_two_processes_native_matches_single_process_eager():
    ddp = ddp_cnn.run_ddp(world_size=2, steps=STEPS, batch_size=16, backend="native")
    reference = ddp_cnn.run_single_process_reference(steps=STEPS, batch_size=16)
    assert ddp["backend"] == "native" and ddp["swapped"]
    assert len(ddp["gradients"]) == len(reference["gradients"]) == STEPS
    for step, (got, want) in enumerate(zip(ddp["gradients"], reference["gradients"])):
        assert set(got) == set(want)
        for name, g in want.items():
            assert g.abs().max() > 0, f"step {step} {name}: zero gradient (vacuous comparison)"
            torch.testing.assert_close(got[name], g, msg=lambda m: f"step {step} {name}: {m}")
    for name, p in reference["parameters"].items():
        torch.testing.assert_close(ddp["parameters"][name], p)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="this torch build has no torch.distributed gloo backend")
def test_ddp_example_under_torchrun():
    """The README's multi-machine recipe, on one machine: torchrun starts the processes and
    they join the group from the environment; rank 0 prints the comparison."""
    import os
    import re
    import subprocess

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(root / "python" / "ddp_cnn.py"), "--steps", "2"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = re.search(r"2 processes, native\) .* max gradient difference (\S+), max parameter difference (\S+)",
                      proc.stdout)
    assert found, proc.stdout
    assert float(found.group(1)) < 1e-5 and float(found.group(2)) < 1e-5
