"""The one shape every fused op follows: `FusedOp`.

A fused op is a forward and a backward library op per fused backend, named
`piumr_kernels::<name>_<backend>` and `piumr_kernels::<name>_<backend>_backward`:

- cpp: the schemas and CPU kernels are defined in C++ (`csrc/<op>.cpp`); this layer adds the
  fake (shape) implementations;
- triton: the op is the Python launcher in `<op>/triton_kernels.py`, registered with
  `torch.library.triton_op` (torch.compile traces into it; its fake comes from tracing).

Both backends of an op share one schema, one fake, and one autograd formula, registered here
with `torch.library.register_autograd`. Gradients of outputs nobody used arrive as `None`
(never materialized zeros), and calls run under a guard that selects the inputs' CUDA
device, so a launcher never runs on whatever device happens to be current.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.autograd import forward_ad

from . import backends

NAMESPACE = "piumr_kernels"
FUSED_BACKENDS = ("cpp", "triton")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every op computes in: float64 stays float64, everything else is float32
    (csrc/accumulation.h is the same rule in C++)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tensors(args) -> list[torch.Tensor]:
    return [a for a in args if isinstance(a, torch.Tensor)]


def device_guard(args) -> contextlib.AbstractContextManager:
    """Makes the first CUDA input's device current while an op runs. Only needed with more
    than one GPU; under torch.compile Inductor emits its own guards."""
    for tensor in _tensors(args):
        if tensor.is_cuda and torch.cuda.device_count() > 1 and not torch.compiler.is_compiling():
            return torch.cuda.device(tensor.device)
        break
    return contextlib.nullcontext()


def check_same_device(op_name: str, argument_names: list[str], args) -> None:
    """All tensor arguments of one call on one device, else an error naming them."""
    devices = [(name, a.device) for name, a in zip(argument_names, args) if isinstance(a, torch.Tensor)]
    if len({device for _, device in devices}) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices)
        raise ValueError(f"{op_name}: all tensors must be on the same device, got {listed}")


@dataclass
class FusedOp:
    """Declares one fused op; `register()` wires it into torch.library.

    `fake_forward(*inputs)` / `fake_backward(*backward_inputs)`: empty outputs of the right
    shapes, dtypes and devices (for torch.compile and FakeTensorMode; the cpp ops need them,
    the triton ops are traced). `setup_context(ctx, inputs, output)` saves what the backward
    needs; `backward(ctx, backward_op, *grads)` returns one gradient (or None) per input,
    calling `backward_op` (the backend's backward library op). `triton_launchers()` imports
    and returns the `(forward, backward)` Triton launchers.
    """

    name: str
    fake_forward: Callable
    fake_backward: Callable
    setup_context: Callable
    backward: Callable
    triton_launchers: Callable[[], tuple[Callable, Callable]]
    _ops: dict = field(default_factory=dict, init=False, repr=False)
    _functions: dict = field(default_factory=dict, init=False, repr=False)

    def op_name(self, backend: str, backward: bool = False) -> str:
        return f"{NAMESPACE}::{self.name}_{backend}" + ("_backward" if backward else "")

    def register(self) -> None:
        """Registers the backends that can run here (cpp: the extension has the op)."""
        if backends.cpp_op_built(f"{self.name}_cpp"):
            torch.library.register_fake(self.op_name("cpp"))(self.fake_forward)
            torch.library.register_fake(self.op_name("cpp", backward=True))(self.fake_backward)
            self._register_autograd("cpp")
        if backends.backend_available("triton"):
            forward, backward = self.triton_launchers()
            torch.library.triton_op(self.op_name("triton"), forward, mutates_args=())
            torch.library.triton_op(self.op_name("triton", backward=True), backward, mutates_args=())
            self._register_autograd("triton")

    def _library_op(self, backend: str, backward: bool = False):
        key = (backend, backward)
        op = self._ops.get(key)
        if op is None:
            op = self._ops[key] = getattr(getattr(torch.ops, NAMESPACE), self.op_name(backend, backward).split("::")[1])
        return op

    def _register_autograd(self, backend: str) -> None:
        """Registers the op's autograd formula for `backend` with torch.library (what
        torch.compile and callers of `torch.ops.piumr_kernels.*` use) and builds the
        `autograd.Function` that eager calls of `__call__` apply: the same formula, entered
        without torch.library's generic Python wrapper, which costs more per call than a
        small CPU kernel."""
        op = self._library_op(backend)
        backward_op = self._library_op(backend, backward=True)

        def setup_context(ctx, inputs, output):
            ctx.set_materialize_grads(False)
            self.setup_context(ctx, inputs, output)

        def backward(ctx, *grads):
            def guarded_backward_op(*args):
                with device_guard(args):
                    return backward_op(*args)

            return self.backward(ctx, guarded_backward_op, *grads)

        torch.library.register_autograd(self.op_name(backend), backward, setup_context=setup_context)

        def forward(ctx, *args):
            with torch._C._AutoDispatchBelowAutograd():
                output = op(*args)
            setup_context(ctx, args, output)
            return output

        self._functions[backend] = type(
            f"{self.name}_{backend}_function",
            (torch.autograd.Function,),
            {"forward": staticmethod(forward), "backward": staticmethod(backward)},
        )

    def __call__(self, backend: str, *args):
        """Runs the forward of `backend` (cpp or triton) on `args`, on their device."""
        op = self._library_op(backend)
        tensors = _tensors(args)
        # Autograd formulas registered in Python have no forward-mode rule: a dual input
        # would silently lose its tangent.
        if forward_ad._current_level >= 0 and any(forward_ad.unpack_dual(t).tangent is not None for t in tensors):
            raise RuntimeError(
                f"{self.name}: forward-mode AD (dual tensors) is not supported by the {backend} backend; "
                "use the reference backend (piumr_kernels.use_backend('reference')) for forward-mode AD"
            )
        if len(tensors) > 1 and len({t.device for t in tensors}) > 1:
            names = [argument.name for argument in op.default._schema.arguments]
            check_same_device(self.name, names, args)
        with device_guard(tensors):
            if torch.compiler.is_compiling():
                return op(*args)
            if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
                return self._functions[backend].apply(*args)
            # No graph to record; dispatch modes and fake tensors still see the call.
            with torch._C._AutoDispatchBelowAutograd():
                return op(*args)
