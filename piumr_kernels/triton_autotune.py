"""Autotuning of the Triton kernels: `autotune(configs, key=...)`, over `triton.autotune`.

    @autotune(
        [triton.Config({"BLOCK": 256}, num_warps=4), triton.Config({"BLOCK": 512}, num_warps=8)],
        key=["n_pixels", "frames"],
    )
    @triton.jit
    def _kernel(x_ptr, ..., n_pixels, frames, BLOCK: tl.constexpr): ...

    wrap_triton(_kernel)[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, ..., n_pixels, frames)

- On a GPU the first launch per key (the values of the `key` arguments, the kernel's shape
  arguments, and the dtype of every tensor argument) times every config with triton's
  benchmarker and keeps the fastest; later launches with that key find it in a dict (no
  host sync). That first launch synchronizes: run a shape once before capturing it in a CUDA
  graph. Under torch.compile, Inductor tunes the same configs itself.
- Under TRITON_INTERPRET=1 (read when the kernel is decorated) only the first config runs,
  never benchmarked: the first config is the design configuration, the one the test suite
  exercises and `tools/gpu_model.py` counts.
- Whatever the config sets (its constexprs, `num_warps`, `num_stages`) the launcher leaves
  out. A grid that depends on a config's block sizes is a function of the launch's
  meta-parameters; tensors the launcher sizes (workspaces, tickets) must not depend on them.
- Timing runs a kernel many times on the same arguments. A kernel whose result depends on
  what its outputs held before (atomic accumulators) names them in `reset_to_zero`; one that
  updates an input in place names it in `restore_value`. The int32 tickets of
  `launch_state.zeroed_tickets` need neither: every launch leaves them zero.
- Every config is a variant of the static check: `triton_variants.autotuned_variants` declares
  one per config, and under `triton_variants.capture_specializations` a launch launches every
  config (`launching_every_config`), so a config cannot be left out of the check unnoticed.
- `use_config(kernel, config)` runs one given config (tests check each against the reference);
  `autotuned_kernels(module)` lists a module's autotuned kernels.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence

import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner

from .backends import triton_interpreting

# Set while `launching_every_config()` is active.
_every_config = False


def _constexpr_arguments(fn) -> set[str]:
    """The kernel's `tl.constexpr` arguments (read from its signature: an interpreted kernel
    has no `params`)."""
    parameters = inspect.signature(fn.fn).parameters.values()
    return {p.name for p in parameters if p.annotation is tl.constexpr or str(p.annotation).endswith("constexpr")}


class Autotuned(Autotuner):
    """triton's `Autotuner` (what `wrap_triton` and torch.compile accept) with the rules in the
    module docstring. `tuning_configs`: every config a GPU can pick, in every mode."""

    def __init__(self, fn, configs: Sequence[triton.Config], key: Sequence[str], reset_to_zero, restore_value):
        name = fn.__name__
        if not configs:
            raise ValueError(f"autotune({name}): configs must not be empty")
        if len(set(configs)) != len(configs):
            raise ValueError(f"autotune({name}): configs must be distinct, got {[str(c) for c in configs]}")
        for what, names in (("key", key), ("reset_to_zero", reset_to_zero), ("restore_value", restore_value)):
            unknown = [arg for arg in names if arg not in fn.arg_names]
            if unknown:
                raise ValueError(f"autotune({name}): {what} names {unknown}, which are not arguments of the kernel")
        constexprs = _constexpr_arguments(fn)
        for config in configs:
            if set(config.kwargs) - constexprs:
                raise ValueError(
                    f"autotune({name}): a config sets {sorted(set(config.kwargs) - constexprs)}, expected only "
                    f"constexpr arguments of the kernel ({sorted(constexprs)})"
                )
        super().__init__(fn, fn.arg_names, list(configs), list(key), list(reset_to_zero), list(restore_value))
        self.tuning_configs = tuple(configs)
        if triton_interpreting():
            self.configs = [configs[0]]

    def run(self, *args, **kwargs):
        if _every_config:
            for config in self.tuning_configs:
                self.fn.run(*args, **kwargs, **config.all_kwargs())
            return None
        return super().run(*args, **kwargs)


def autotune(
    configs: Sequence[triton.Config],
    key: Sequence[str],
    *,
    reset_to_zero: Sequence[str] = (),
    restore_value: Sequence[str] = (),
):
    """Decorates a `@triton.jit` kernel: on a GPU it launches the fastest of `configs` per
    `key`; under the interpreter always `configs[0]` (see the module docstring)."""

    def decorator(fn) -> Autotuned:
        return Autotuned(fn, configs, key, reset_to_zero, restore_value)

    return decorator


@contextlib.contextmanager
def launching_every_config() -> Iterator[None]:
    """Inside the block, a launch of an autotuned kernel launches each of its configs once, in
    order, without timing (the static check records these launches instead of running them)."""
    global _every_config
    saved, _every_config = _every_config, True
    try:
        yield
    finally:
        _every_config = saved


@contextlib.contextmanager
def use_config(kernel: Autotuned, config: triton.Config) -> Iterator[None]:
    """Inside the block, `kernel` launches `config` (one of its `tuning_configs`), untimed."""
    if config not in kernel.tuning_configs:
        raise ValueError(
            f"use_config: expected one of {kernel.fn.__name__}'s configs {[str(c) for c in kernel.tuning_configs]}, "
            f"got {config}"
        )
    saved, kernel.configs = kernel.configs, [config]
    try:
        yield
    finally:
        kernel.configs = saved


def autotuned_kernels(module) -> list[Autotuned]:
    """The autotuned kernels `module` defines: its attributes, and the values of its dict
    attributes (kernels autotuned per tile size)."""
    found = []
    for value in vars(module).values():
        for candidate in value.values() if isinstance(value, dict) else (value,):
            if isinstance(candidate, Autotuned) and candidate not in found:
                found.append(candidate)
    return found
