"""The Triton kernel variants each op can launch, and the binaries triton's JIT builds for them.

Every op's `triton_kernels.py` exposes two views of one list of covered shapes (`AOT_SHAPES`,
in its benchmark's shape format):
- `aot_variants() -> list[KernelVariant]`: the configurations its launch plan picks at
  those shapes (kernel, dtype, constexprs, warps), named for reports and tests;
- `aot_launches(shapes=AOT_SHAPES)`: calls its launchers at those shapes (every dtype and
  mode) on CPU tensors.
`tools/triton_static_check.py` runs `aot_launches()` under `capture_specializations`, maps
every launch to its variant (a launch of an unlisted variant, or a variant never launched,
is an error) and compiles each distinct specialization for sm_80 and sm_90.

An autotuned kernel (`triton_autotune.autotune`) declares its variants with
`autotuned_variants`, one per config; under `capture_specializations` each of its launches
launches every config, so every config a GPU can pick is checked.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class KernelVariant:
    name: str  # e.g. "sinkhorn.forward.one_matrix[bf16,linear,...,warps=16]"
    kernel: object  # the @triton.jit function
    constexprs: dict[str, object] = field(default_factory=dict)  # the launcher's constexpr arguments
    num_warps: int = 4
    num_stages: int = 3
    pointer_types: dict[str, str] = field(default_factory=dict)  # dtype-dependent pointers, e.g. {"K_ptr": "*bf16"}

    def matches(self, launch: Specialization) -> bool:
        return (
            launch.kernel is self.kernel
            and launch.num_warps == self.num_warps
            and launch.num_stages == self.num_stages
            and all(launch.signature[name] == ty for name, ty in self.pointer_types.items())
            and launch.launcher_constexprs == self.constexprs
        )


def autotuned_variants(
    name: str, kernel, constexprs: dict[str, object] | None = None, pointer_types: dict[str, str] | None = None
) -> list[KernelVariant]:
    """One variant per config an autotuned `kernel` can pick (`kernel.tuning_configs`): the
    launcher's `constexprs` plus the config's, its warps and stages. `name` (e.g.
    `"dct.forward.reduce[fp32,split]"`) gets the config appended inside its brackets."""
    variants = []
    for config in kernel.tuning_configs:
        tuned = ",".join([f"{arg}={value}" for arg, value in config.kwargs.items()])
        tuned += f"{',' if tuned else ''}warps={config.num_warps},stages={config.num_stages}"
        full_name = f"{name[:-1]},{tuned}]" if name.endswith("]") else f"{name}[{tuned}]"
        variants.append(
            KernelVariant(
                full_name,
                kernel.fn,
                {**(constexprs or {}), **config.kwargs},
                config.num_warps,
                config.num_stages,
                dict(pointer_types or {}),
            )
        )
    return variants


@dataclass(frozen=True)
class Specialization:
    """One binary of triton's JIT: exactly what `JITFunction.run` hands to `triton.compile`
    for a launch (argument types, constexprs including ints equal to 1, `tt.divisibility`
    attributes of 16-byte aligned pointers and multiple-of-16 ints, parsed options)."""

    kernel: object
    key: str  # the JIT's own cache key: one binary per key
    signature: dict[str, str]
    constexprs: dict[tuple, object]
    attrs: dict[tuple, list]
    data: str  # triton's serialized specialization, what `JITFunction.preload` compiles

    @property
    def options(self) -> dict:
        import json

        return json.loads(self.data)["options"]

    @property
    def num_warps(self) -> int:
        return self.options["num_warps"]

    @property
    def num_stages(self) -> int:
        return self.options["num_stages"]

    @property
    def launcher_constexprs(self) -> dict[str, object]:
        """The arguments the kernel declares `tl.constexpr` (not the JIT's ints equal to 1)."""
        return {param.name: self.constexprs[(param.num,)] for param in self.kernel.params if param.is_constexpr}

    @property
    def tag(self) -> str:
        """What the JIT specialized beyond the launcher's choices, e.g. `n_iters=1 n_rows%16`:
        ints equal to 1, ints divisible by 16, 64-bit ints and pointers not 16-byte aligned."""
        parts = []
        for param in self.kernel.params:
            if param.is_constexpr:
                continue
            path, ty = (param.num,), self.signature[param.name]
            divisible = ["tt.divisibility", 16] in self.attrs.get(path, [])
            if ty == "constexpr":
                parts.append(f"{param.name}={self.constexprs[path]}")
            elif ty.startswith("*"):
                parts += [] if divisible else [f"{param.name}:unaligned"]
            elif ty[0] in "iu":
                parts += ([f"{param.name}%16"] if divisible else []) + ([f"{param.name}:{ty}"] if ty != "i32" else [])
        return " ".join(parts)

    def compile(self, arch: int):
        """The JIT's own compile of this specialization (`JITFunction.preload`) for sm_`arch`,
        which must be the arch it was captured for; returns triton's CompiledKernel."""
        with _stand_in_gpu(arch):
            return self.kernel.preload(self.data)


class _StandInDriver:
    """The part of a triton GPU driver `JITFunction.run` consults before compiling: a
    current device (one per arch, so each has its own JIT caches) and its target."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return self.target.arch

    def get_current_stream(self, device: int) -> int:
        return 0


@contextlib.contextmanager
def _stand_in_gpu(arch: int) -> Iterator[None]:
    from triton.runtime.driver import driver

    saved = driver._active  # None while no real driver was created (always, without a GPU)
    driver.set_active(_StandInDriver(arch))
    try:
        yield
    finally:
        driver._active = saved


@contextlib.contextmanager
def capture_specializations(arch: int) -> Iterator[list[Specialization]]:
    """Every launch of a `@triton.jit` kernel inside the block goes through triton's real
    `JITFunction.run` as on an sm_`arch` GPU: triton's binder specializes the real arguments,
    then `knobs.runtime.jit_cache_hook` records what would be compiled and stops the launch
    (nothing is compiled or run, so CPU tensors do). Yields the list of records, filled as
    the block runs. An autotuned kernel launches every config it can pick
    (`triton_autotune.launching_every_config`). Needs real JIT kernels: TRITON_INTERPRET must
    be unset at import."""
    from triton import knobs

    from .triton_autotune import launching_every_config

    captured: list[Specialization] = []

    def record(*, key, fn, compile, **_) -> bool:
        captured.append(
            Specialization(
                kernel=fn.jit_function,
                key=str(key),
                signature=compile["signature"],
                constexprs=dict(compile["constants"]),
                attrs=dict(compile["configs"][0]),
                data=compile["specialization_data"],
            )
        )
        return True  # "handled": the JIT skips compiling and launching

    saved_hook = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = record
    try:
        with _stand_in_gpu(arch), launching_every_config():
            yield captured
    finally:
        knobs.runtime.jit_cache_hook = saved_hook


def unique(specializations: list[Specialization]) -> list[Specialization]:
    """One per binary (kernel and JIT cache key), in launch order."""
    seen: dict[tuple, Specialization] = {}
    for spec in specializations:
        seen.setdefault((spec.kernel, spec.key), spec)
    return list(seen.values())
