"""Poisoned outputs (docs/semantics.md#equivalence, poisoning).

No public op and no torch.ops.kasmina op takes an ``out=`` tensor, and gradients come out of
autograd, so a test cannot pre-fill the buffers a kernel writes. Instead `poison_check.py`
runs every equivalence case's kernel (forward and every gradient) in a subprocess under glibc's
MALLOC_PERTURB_, which fills every fresh allocation with 0x7F bytes (3.4e38 in
float32/bfloat16, NaN in float16, 1.4e306 in float64); MALLOC_MMAP_THRESHOLD_ keeps big blocks
on the heap so they are poisoned too, and the tcache (which recycles small blocks without
poisoning them) is switched off. An output element still holding those bytes was never
written. (The precision rules are judged by test_equivalence.py; this only looks for holes.)
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
# tcache hands small blocks back without perturbing them: switch it off
POISON_ENV = {"MALLOC_PERTURB_": "128", "MALLOC_MMAP_THRESHOLD_": str(2**32),
              "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="allocation poisoning uses glibc's MALLOC_PERTURB_"
)


def test_every_output_element_is_written():
    env = dict(os.environ)
    env.update(POISON_ENV)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "poison_check.py")], env=env,
                          capture_output=True, text=True, timeout=540)
    out = proc.stdout
    if proc.returncode == 2:
        pytest.fail("MALLOC_PERTURB_ does not poison torch's CPU allocations here: " + out + proc.stderr[-2000:])
    assert proc.returncode in (0, 1), proc.stderr[-4000:]
    checked = [line for line in out.splitlines() if line.startswith("CHECKED")]
    assert checked and int(checked[0].split()[1]) > 0, out[-2000:]
    findings = [line for line in out.splitlines() if line.startswith("UNWRITTEN")]
    assert not findings, "outputs with elements no kernel wrote:\n" + "\n".join(findings[:50])
