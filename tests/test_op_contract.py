"""The contract every fused op keeps, checked the same way for every (op, backend).

Sample inputs, tolerances and the fp64 references come from tests/op_harness.py (its module
docstring has the tolerance table). For every op and backend:

- every library op (`torch.ops.piumr_kernels.<name>_<backend>` and `..._backward`, cpp and
  triton) is registered and passes `torch.library.opcheck` (schema, autograd registration,
  fake tensor, aot_dispatch_dynamic) on the arguments the public function really passes it,
  captured with a TorchDispatchMode while it runs forward and backward;
- the public function under fullgraph `torch.compile` (aot_eager: the traced graph through
  the fake implementations and autograd formulas, the same kernels) matches eager, forward
  and input gradients;
- forward and input gradients (non-uniform upstream gradients on every differentiable
  output) match the fp64 reference within the harness tolerance, with `torch.empty`
  poisoned (NaN-filled) so an output element a kernel forgets to write cannot pass;
- output dtypes are those of the reference backend;
- fp64 `gradcheck` on the backends that take float64 (reference, cpp).

Op-specific semantics (tiers, masking, partitions, errors, ...) stay in the per-op files.
"""

from __future__ import annotations

import dataclasses
import functools

import op_harness as H
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from piumr_kernels import backends

# ----------------------------------------------------------------------------- registration


def test_every_library_op_is_registered():
    """Forward and backward library ops for each op and each fused backend that can run here."""
    missing = []
    for op in H.OPS:
        for backend in H.FUSED_BACKENDS:
            if not backends.backend_available(backend):
                continue
            for name in H.library_op_names(op, backend):
                if H.library_op(name) is None:
                    missing.append(name)
    assert not missing, f"library ops not registered: {missing}"


def test_fused_ops_match_the_harness():
    """The declared FusedOps (piumr_kernels.fused_op.REGISTRY, or the op modules' FusedOp
    instances until it exists) are exactly the ops the harness covers, and each names its
    library ops `piumr_kernels::<name>_<backend>[_backward]`."""
    ops = H.fused_ops()
    if not ops:
        pytest.skip("no FusedOp declared yet (the op layer refactor is in progress)")
    assert set(ops) == set(H.LIBRARY_NAME.values()), (
        f"FusedOps {sorted(ops)}, the harness covers {sorted(H.LIBRARY_NAME.values())}: "
        "add the new op's cases to tests/op_harness.py"
    )
    for name, op in ops.items():
        for backend in H.FUSED_BACKENDS:
            assert op.op_name(backend) == f"piumr_kernels::{name}_{backend}"
            assert op.op_name(backend, backward=True) == f"piumr_kernels::{name}_{backend}_backward"


# ----------------------------------------------------------------------------- opcheck


def _signature(args, kwargs):
    """What opcheck would see differently: tensor shapes/dtypes and the other values."""
    return tuple(
        (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else repr(v)
        for v in torch.utils._pytree.tree_leaves((args, kwargs))
    )


class CaptureLibraryCalls(TorchDispatchMode):
    """Records the first call of each piumr_kernels library op per phase (cloned arguments)."""

    def __init__(self):
        super().__init__()
        self.phase = ""
        self.calls: dict[str, list] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "namespace", None) == "piumr_kernels":
            name = func._schema.name.split("::", 1)[1]
            seen = self.calls.setdefault(name, [])
            # One call per phase, and a no_grad call only where its arguments differ
            # (e.g. the cpp ops' need_grad / save_stats flags).
            signature = _signature(args, kwargs)
            if self.phase not in [phase for phase, *_ in seen] and signature not in [s for *_, s in seen]:
                clone = functools.partial(tree_map, lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v)
                seen.append((self.phase, func, clone(args), clone(kwargs), signature))
        return func(*args, **kwargs)


@functools.cache
def captured_calls(case_name: str, backend: str) -> dict[str, list]:
    """{library op name: [(phase, OpOverload, args, kwargs)]} as the public function calls
    them for `case_name` (float32): phase "grad" (forward and backward with gradients) and
    "no_grad" (a forward under torch.no_grad, which some ops call with other arguments)."""
    case = next(c for c in H.CASES if c.name == case_name)
    mode = CaptureLibraryCalls()
    with backends.use_backend(backend), mode:
        mode.phase = "grad"
        H.run_case(case, case.inputs(torch.float32))
        mode.phase = "no_grad"
        with torch.no_grad():
            torch.manual_seed(H.GLOBAL_SEED)
            case.run(*case.inputs(torch.float32, requires_grad=False))
    return mode.calls


OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
# torch.library.wrap_triton returns the kernel itself under TRITON_INTERPRET=1
# (torch/_library/triton.py), so a triton op run on fake tensors launches the interpreter on
# them: nothing that traces a triton op (fake tensors, AOT, torch.compile) can run without a GPU.
INTERPRETER_CANNOT_TRACE = (
    "TRITON_INTERPRET=1: torch.library.wrap_triton returns the raw kernel under the interpreter, so "
    "tracing a triton op (fake tensors, AOT dispatch, torch.compile) would run the interpreter on fake "
    "tensors; runs on a GPU"
)


def _triton_traceable() -> bool:
    return not backends.triton_interpreting()


def _opcheck_params():
    params = []
    for op in H.OPS:
        for backend in H.FUSED_BACKENDS:
            for direction, name in zip(("forward", "backward"), H.library_op_names(op, backend)):
                for util in OPCHECK_UTILS:
                    reason = H.backend_skip_reason(backend, torch.float32)
                    if not reason and backend == "triton" and util in OPCHECK_UTILS[2:] and not _triton_traceable():
                        reason = INTERPRETER_CANNOT_TRACE
                    marks = [pytest.mark.skip(reason=reason)] if reason else []
                    params.append(pytest.param(op, backend, direction, name, util, marks=marks, id=f"{name}-{util}"))
    return params


@pytest.mark.parametrize("op,backend,direction,name,util", _opcheck_params())
def test_opcheck(op, backend, direction, name, util):
    """opcheck on every registered library op with the public function's own arguments,
    from each of the op's `opcheck` cases (e.g. every Sinkhorn tier and domain)."""
    library_op = H.library_op(name)
    assert library_op is not None, f"torch.ops.piumr_kernels.{name} is not registered"
    sources = H.cases(op, opcheck=True)
    assert sources, f"{op}: no opcheck case in tests/op_harness.py"
    checked = 0
    for case in sources:
        if backend == "triton" and not case.triton:
            continue
        calls = captured_calls(case.name, backend)
        assert name in calls, (
            f"{case.name}: the public function never called torch.ops.piumr_kernels.{name} on the {backend} backend "
            f"(forward and backward ran); called: {sorted(calls)}"
        )
        for phase, func, args, kwargs, _ in calls[name]:
            if direction == "forward" and phase == "grad":
                # The forward's float inputs are the differentiable ones: opcheck then also
                # checks the autograd registration and the compiled backward.
                args = tree_map(
                    lambda v: (
                        v.clone().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                    ),
                    args,
                )
            # Backward ops take no gradient themselves (no double backward): with no input
            # requiring grad, test_autograd_registration has nothing to check for them.
            torch.library.opcheck(func, args, kwargs, test_utils=(util,))
            checked += 1
    assert checked, f"{name}: no case reaches the {backend} backend"


# ----------------------------------------------------------------------------- torch.compile


def _compile_params():
    params = H.case_params(H.cases(compile=True), dtypes=(torch.float32,))
    if not _triton_traceable():
        params = [
            pytest.param(*p.values, marks=[pytest.mark.skip(reason=INTERPRETER_CANNOT_TRACE)], id=p.id)
            if p.values[1] == "triton" and not p.marks
            else p
            for p in params
        ]
    return params


@pytest.mark.parametrize("case,backend,dtype", _compile_params())
def test_compile_fullgraph_matches_eager(case, backend, dtype):
    """fullgraph torch.compile (aot_eager) of the public function: no graph break, and the
    same outputs and input gradients as eager."""
    torch._dynamo.reset()
    inputs = case.inputs(dtype)
    compiled_inputs = tuple(v.detach().clone().requires_grad_(v.requires_grad) for v in inputs)
    compiled_case = dataclasses.replace(case, run=torch.compile(case.run, fullgraph=True, backend="aot_eager"))
    with backends.use_backend(backend):
        eager, upstream, eager_grads = H.run_case(case, inputs)
        compiled, _, compiled_grads = H.run_case(compiled_case, compiled_inputs, upstream)
    torch._dynamo.reset()
    for i, (out, ref) in enumerate(zip(compiled, eager)):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"output {i}: {m}")
    for i, (grad, ref) in enumerate(zip(compiled_grads, eager_grads)):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"gradient of input {i}: {m}")


# ----------------------------------------------------------------------------- vs fp64 reference


@pytest.mark.parametrize("case,backend,dtype", H.case_params(H.CASES))
def test_matches_fp64_reference(case, backend, dtype, poisoned_empty):
    """Forward and backward (non-uniform upstream gradients) against the fp64 reference,
    with new float memory NaN-filled: every output element must be written."""
    H.check_against_reference(case, backend, dtype)


@pytest.mark.parametrize(
    "case,backend,dtype", H.case_params([c for c in H.CASES if c.opcheck], backends_=H.FUSED_BACKENDS)
)
def test_output_dtypes_match_reference_backend(case, backend, dtype):
    inputs = case.inputs(dtype, requires_grad=False)
    with backends.use_backend(backend):
        outputs = H.as_tuple(case.run(*inputs))
    with backends.use_backend("reference"):
        expected = H.as_tuple(case.run(*inputs))  # (GIRL's partition may differ: shapes and dtypes only)
    assert [o.dtype for o in outputs] == [e.dtype for e in expected]
    assert [tuple(o.shape) for o in outputs] == [tuple(e.shape) for e in expected]


# ----------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize(
    "case,backend,dtype",
    H.case_params(H.cases(gradcheck=True), backends_=("reference", "cpp", "triton"), dtypes=(torch.float64,)),
)
def test_gradcheck_fp64(case, backend, dtype):
    """Exact fp64 gradients (the triton backend has no float64: skipped with that reason)."""
    inputs = case.inputs(torch.float64)

    def differentiable_outputs(*args):
        outputs = H.as_tuple(case.run(*args))
        return tuple(outputs[i] for i in H.differentiable(outputs))

    # The full Jacobian of larger inputs costs seconds per case; fast mode checks random
    # projections of it instead (as the per-op files did for their larger cases).
    fast = sum(inputs[i].numel() for i in case.grad_inputs) > H.GRADCHECK_FULL_MAX
    with backends.use_backend(backend):
        assert torch.autograd.gradcheck(differentiable_outputs, inputs, fast_mode=fast, **H.GRADCHECK)
