"""The triton backend: fused Triton kernels, forward and backward, for every op, and their
torch glue. Runs on CUDA tensors, and on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, slow, for tests). Exposes the same functions, with the same
signatures, as `kasmina_kernels.native`. Kernels by family: `lerp.py` (ADD, GATE, isolation),
`multiply.py` (MULTIPLY, the valve), `elementwise.py` (the kernel those, STE and the effective
alpha share), `gate.py` (gated pooling, the gate network); `_common.py` holds the shared
loads, stores, rounding and iteration helpers.

Each kernel op of the table (`optable`, `Op.kernel`) is registered as
``kasmina::triton_<name>``, with its backward op, through native's registration
(`native.register`): the table's schemas and fake kernels (the pooled input's gradient is
dense on every device), a vmap rule, and the extension's C++ autograd kernel, so both backends
follow one autograd convention. A backward kernel takes the gradient, the forward's inputs and
one ``need_<input>_grad`` flag per input whose gradient may be skipped; as native's, a weight
gradient nobody needs is zeros and a seed input's an empty placeholder.
"""

from __future__ import annotations

import torch

from .. import native
from ..optable import BY_NAME, NAMES
from . import elementwise, gate


def _on_tensor_device(kernel):
    """`kernel` run with the current CUDA device set to its operands' (the first CUDA tensor's:
    a 0-dim alpha may be a CPU scalar). Triton compiles for and launches on the current
    device, whatever device the pointers belong to, and a model on another GPU than the
    current one (several environments driven from one thread) would get a launch on the
    wrong device: an error, or values read across devices."""
    def run(*args):
        for a in args:
            if isinstance(a, torch.Tensor) and a.is_cuda:
                if a.get_device() != torch.cuda.current_device():
                    with torch.cuda.device(a.device):
                        return kernel(*args)
                break
        return kernel(*args)
    return run


def _backward_kernel(op, backward):
    """The registered backward kernel of `op`: `backward(grad, *inputs, need)` takes one need
    flag per input of `Op.grads` (the leading inputs) and returns their gradients in that
    order, None where not needed."""
    flag_index = [op.grads.index(f) for f in op.need_flags]
    n_inputs = len(op.inputs)

    def kernel(grad, *args):
        need = [True] * len(op.grads)
        for i, flag in zip(flag_index, args[n_inputs:]):  # a residual past the flags is unused
            need[i] = flag
        grads = backward(grad, *args[:n_inputs], need)
        out = tuple(
            g if g is not None
            else torch.zeros(x.shape, dtype=x.dtype, device=x.device) if name in op.weights
            else args[0].new_empty((0,))
            for g, x, name in zip(grads, args, op.grads))
        return out[0] if len(out) == 1 else out
    return kernel


# The forward and backward kernels of each kernel op of the table (`Op.kernel`).
_KERNELS = {
    "blend_add": (elementwise.blend_add_forward, elementwise.blend_add_backward),
    "blend_multiply": (elementwise.blend_multiply_forward, elementwise.blend_multiply_backward),
    "blend_gate": (elementwise.blend_gate_forward, elementwise.blend_gate_backward),
    "ste_forward": (elementwise.ste_forward, None),
    "multiply_valve_multiplier": (elementwise.valve_multiplier_forward, elementwise.valve_multiplier_backward),
    "gate_effective_alpha": (elementwise.gate_effective_alpha_forward, elementwise.gate_effective_alpha_backward),
    "gated_pool": (gate.gated_pool_forward, gate.gated_pool_backward),
    "gate_network": (gate.gate_network_forward, gate.gate_network_backward),
}
_library = torch.library.Library("kasmina", "FRAGMENT")  # kept alive: dropping it drops the ops
native.register(_library, "triton_", dense_pooled=True, kernels={
    name: (_on_tensor_device(forward), backward and _on_tensor_device(_backward_kernel(BY_NAME[name], backward)))
    for name, (forward, backward) in _KERNELS.items()})
globals().update(native.functions("triton_"))

__all__ = list(NAMES)
