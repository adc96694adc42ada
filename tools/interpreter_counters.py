"""Exact per-launch counters for Triton kernels run by triton's interpreter (TRITON_INTERPRET=1).

`count_launches()` patches the interpreter while its block runs and records, for every
launch of a `@triton.jit` kernel: the grid, the launch options (warps, stages, constexprs),
the dtypes of its tensor arguments, and what its programs did:
- bytes loaded and stored in global memory: active (unmasked) lanes x element size, so
  masked-off lanes and `other` fill values cost nothing, as on a GPU; and the distinct
  bytes among them (each address once per launch), the DRAM traffic when every re-read
  within the launch hits a cache;
- FLOPs: one per lane of every float add, sub, mul, div, rem, exp, exp2, log, log2, sqrt,
  rsqrt, sin, cos and erf, two per lane of an fma, and n - 1 per float `tl.sum` of n values
  into one. Every lane of a block counts, masked or not, because a GPU executes them all;
  compares, min/max, abs, selects, casts and integer (index) arithmetic are not FLOPs and
  are not counted, nor are scans (no kernel here uses one);
- `tl.dot` multiply-accumulates (M*N*K per call), split into those a GPU runs on tensor
  cores (fp16/bf16/fp8 operands, or fp32 with TF32 input precision) and those it runs as
  FP32 FMAs (fp32 with `input_precision="ieee"`).
Counts are of what the interpreter executes, i.e. of the Triton program as written; the
GPU compiler may fuse a mul and an add into one fma (same FLOPs) or keep a value in
registers instead of reloading it (then the loaded bytes over-count; the distinct bytes
do not change).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

_FLOAT_BINARY_OPS = ("create_fadd", "create_fsub", "create_fmul", "create_fdiv", "create_precise_divf", "create_frem")
_FLOAT_UNARY_OPS = (
    "create_exp",
    "create_exp2",
    "create_log",
    "create_log2",
    "create_sqrt",
    "create_precise_sqrt",
    "create_rsqrt",
    "create_sin",
    "create_cos",
    "create_erf",
)
_HALF_OPERANDS = ("fp16", "bf16", "fp8e4nv", "fp8e5", "fp8e4b15")


@dataclass
class Launch:
    kernel: str  # the kernel's name
    function: object  # the Python function under @triton.jit
    num_warps: int
    num_stages: int
    constexprs: dict[str, object]
    pointer_dtypes: dict[str, torch.dtype]  # tensor arguments by parameter name
    grid: tuple[int, int, int] = (1, 1, 1)
    loaded_bytes: int = 0
    stored_bytes: int = 0
    distinct_loaded_bytes: int = 0  # each address once: the HBM reads if every re-read hits a cache
    distinct_stored_bytes: int = 0
    flops: int = 0
    tf32_macs: int = 0  # tensor cores, fp32 operands rounded to TF32
    fp16_macs: int = 0  # tensor cores, 16-bit (or 8-bit) operands
    fma_dot_macs: int = 0  # FP32 FMA pipe (fp32 operands, input_precision="ieee")

    @property
    def programs(self) -> int:
        return math.prod(self.grid)

    @property
    def bytes(self) -> int:
        return self.loaded_bytes + self.stored_bytes

    @property
    def distinct_bytes(self) -> int:
        return self.distinct_loaded_bytes + self.distinct_stored_bytes


class _Footprint:
    """The distinct byte addresses one launch touches, kept per element size."""

    COMPACT_AFTER = 1 << 22  # addresses gathered before de-duplicating (bounds memory)

    def __init__(self):
        self.addresses: dict[int, list[np.ndarray]] = {}
        self.pending = 0

    def add(self, pointers, mask, element_bytes: int) -> int:
        """Records the active lanes' addresses; returns how many lanes were active."""
        active = np.broadcast_to(mask.data, pointers.data.shape)
        addresses = pointers.data[active]
        self.addresses.setdefault(element_bytes, []).append(addresses)
        self.pending += addresses.size
        if self.pending > self.COMPACT_AFTER:
            self._compact()
        return int(addresses.size)

    def _compact(self):
        self.addresses = {size: [np.unique(np.concatenate(parts))] for size, parts in self.addresses.items()}
        self.pending = 0

    def distinct_bytes(self) -> int:
        self._compact()
        return sum(size * parts[0].size for size, parts in self.addresses.items())


@dataclass
class LaunchLog:
    launches: list[Launch] = field(default_factory=list)
    current: Launch | None = None  # the launch whose programs are running, if any

    @property
    def in_launch(self) -> bool:
        return self.current is not None


def _element_bytes(pointers) -> int:
    return max(1, pointers.get_element_ty().primitive_bitwidth // 8)  # int1 is stored as a byte


def _launch_record(kernel, args: tuple, kwargs: dict) -> Launch:
    import inspect

    params = inspect.signature(kernel.fn).parameters
    bound = dict(zip(params, args)) | {name: value for name, value in kwargs.items() if name in params}
    annotations = {name: str(param.annotation) for name, param in params.items()}
    constexprs = {
        name: bound.get(name, param.default) for name, param in params.items() if "constexpr" in annotations[name]
    }
    pointer_dtypes = {name: value.dtype for name, value in bound.items() if isinstance(value, torch.Tensor)}
    return Launch(
        kernel.fn.__name__,
        kernel.fn,
        kwargs.get("num_warps", 4),
        kwargs.get("num_stages", 3),
        constexprs,
        pointer_dtypes,
    )


class _GridOnly(Exception):
    """Stops a launch once its grid is known (`count_launches(run_programs=False)`)."""


@contextlib.contextmanager
def count_launches(run_programs: bool = True) -> Iterator[LaunchLog]:
    """Records every interpreted Triton launch inside the block; yields the log, filled as
    the block runs. With `run_programs=False` each launch records its grid and runs no
    program (its outputs stay unwritten): the launch plan of a shape too large to interpret.
    Needs TRITON_INTERPRET=1 set before triton was imported."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    state = LaunchLog()
    saved_run = interpreter.InterpretedFunction.run
    saved_sum = interpreter.ReduceOps.sum
    saved_call = interpreter.InterpretedFunction.__call__
    patched: dict[str, object] = {}
    footprints: dict[str, _Footprint] = {}
    patched_helpers: set = set()  # @triton.jit helpers called in the current launch

    def patch(name, make):
        original = getattr(builder, name)
        patched[name] = builder.__dict__.get(name)
        setattr(builder, name, make(original))

    def counting_run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return saved_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        launch = _launch_record(self, args, kwargs)
        state.launches.append(launch)
        state.current = launch
        footprints["load"], footprints["store"] = _Footprint(), _Footprint()
        patched_helpers.clear()
        try:
            return saved_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        except _GridOnly:
            return None
        finally:
            launch.distinct_loaded_bytes = footprints["load"].distinct_bytes()
            launch.distinct_stored_bytes = footprints["store"].distinct_bytes()
            state.current = None
            footprints.clear()

    def on_set_grid_dim(original):
        def set_grid_dim(nx, ny, nz):
            state.current.grid = (nx, ny, nz)
            if not run_programs:
                raise _GridOnly
            return original(nx, ny, nz)

        return set_grid_dim

    def on_masked_load(original):
        def masked_load(ptrs, mask, other, *rest):
            size = _element_bytes(ptrs)
            state.current.loaded_bytes += footprints["load"].add(ptrs, mask, size) * size
            return original(ptrs, mask, other, *rest)

        return masked_load

    def on_masked_store(original):
        def masked_store(ptrs, value, mask, *rest):
            size = _element_bytes(ptrs)
            state.current.stored_bytes += footprints["store"].add(ptrs, mask, size) * size
            return original(ptrs, value, mask, *rest)

        return masked_store

    def on_dot(original):
        def dot(a, b, d, input_precision, max_num_imprecise_acc):
            macs = math.prod(a.data.shape[:-1]) * b.data.shape[-1] * a.data.shape[-1]
            operand = getattr(a.dtype, "scalar", a.dtype).name
            ieee = input_precision is not None and "IEEE" in str(input_precision).upper()
            if operand in _HALF_OPERANDS:
                state.current.fp16_macs += macs
            elif operand == "fp32" and not ieee:
                state.current.tf32_macs += macs
            else:
                state.current.fma_dot_macs += macs
            return original(a, b, d, input_precision, max_num_imprecise_acc)

        return dot

    def counting_flops(per_lane):
        def make(original):
            def op(*args):
                result = original(*args)
                if state.current is not None and result.dtype.is_floating():
                    state.current.flops += per_lane * result.data.size
                return result

            return op

        return make

    def device_call(self, *args, **kwargs):
        # The interpreter re-patches the language modules on every @triton.jit helper call (a
        # third of the run time), to the same functions: within a launch, once per helper.
        if state.current is None:
            return saved_call(self, *args, **kwargs)
        if self.fn not in patched_helpers:
            patched_helpers.add(self.fn)
            interpreter._patch_lang(self.fn)
        try:
            return self.rewrite()(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

    def counting_sum(self, input):
        result = saved_sum(self, input)
        if state.current is not None and input.dtype.is_floating():
            state.current.flops += input.handle.data.size - np.size(result.handle.data)
        return result

    interpreter.InterpretedFunction.run = counting_run
    interpreter.ReduceOps.sum = counting_sum
    interpreter.InterpretedFunction.__call__ = device_call
    patch("set_grid_dim", on_set_grid_dim)
    patch("create_masked_load", on_masked_load)
    patch("create_masked_store", on_masked_store)
    patch("create_dot", on_dot)
    patch("create_fma", counting_flops(2))
    for name in _FLOAT_BINARY_OPS + _FLOAT_UNARY_OPS:
        if hasattr(builder, name):
            patch(name, counting_flops(1))
    try:
        yield state
    finally:
        interpreter.InterpretedFunction.run = saved_run
        interpreter.ReduceOps.sum = saved_sum
        interpreter.InterpretedFunction.__call__ = saved_call
        for name, instance_value in patched.items():
            if instance_value is None:
                delattr(builder, name)
            else:
                setattr(builder, name, instance_value)
