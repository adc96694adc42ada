#!/usr/bin/env python
"""Ahead-of-time check of every Triton kernel variant, without a GPU.

Finds `aot_variants()` in every `piumr_kernels/<op>/triton_kernels.py`, compiles each
variant for sm_80 and sm_90 (`triton.compile` on an `ASTSource` for a `GPUTarget`), reads
the resources of the resulting cubin with the `cuobjdump` shipped in the Triton wheel and
prints a markdown table: registers, shared memory and stack/local bytes per kernel and
architecture. Exits non-zero on any import or compile error and on any spill (non-zero
STACK or LOCAL: Triton inlines everything, so stack space is spilled registers).

    python tools/triton_static_check.py [--jobs 2] [--filter sinkhorn] [--arch 80 90]

The check compiles what a GPU run compiles, with Triton's defaults: the interpreter
replaces `@triton.jit` functions with Python ones that cannot be compiled, and the test
suite's `TRITON_DEFAULT_FP_FUSION=0` changes the code ptxas sees, so both variables are
removed from this process's environment before Triton is imported.
"""

from __future__ import annotations

import os

for _test_only_setting in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION"):
    os.environ.pop(_test_only_setting, None)

import argparse  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import multiprocessing  # noqa: E402
import pkgutil  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import piumr_kernels  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
RESOURCE_FIELDS = ("REG", "SHARED", "STACK", "LOCAL")
DEFAULT_ARCHS = (80, 90)

# Filled before the worker processes fork, which then index into it (compiled kernels and
# the @triton.jit functions do not pickle).
_VARIANTS: list = []


@dataclass
class Result:
    name: str
    arch: int
    resources: dict | None = None     # REG, SHARED (static), STACK, LOCAL from cuobjdump
    dynamic_shared: int = 0           # bytes Triton asks for at launch
    error: str | None = None

    @property
    def spills(self) -> bool:
        return bool(self.resources) and (self.resources["STACK"] > 0 or self.resources["LOCAL"] > 0)


def discover_variants() -> tuple[list, list[str]]:
    """`aot_variants()` of every `piumr_kernels.<op>.triton_kernels`; import errors are reported."""
    variants, errors = [], []
    for module_info in pkgutil.iter_modules(piumr_kernels.__path__, piumr_kernels.__name__ + "."):
        if not module_info.ispkg:
            continue
        module_name = module_info.name + ".triton_kernels"
        if importlib.util.find_spec(module_name) is None:
            continue
        try:
            module = importlib.import_module(module_name)
            op_variants = module.aot_variants()
        except Exception as error:  # report and fail, do not hide a broken op
            errors.append(f"{module_name}: {type(error).__name__}: {error}")
            continue
        for variant in op_variants:
            if not isinstance(variant.kernel, triton.runtime.jit.JITFunction):
                errors.append(f"{variant.name}: kernel is {type(variant.kernel).__name__}, not a "
                              "@triton.jit function (is TRITON_INTERPRET set for this process?)")
                continue
            variants.append(variant)
    return variants, errors


def read_resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        listing = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", file.name],
                                 capture_output=True, text=True, check=True).stdout
    function_line = next(line for line in listing.splitlines() if "REG:" in line)
    return {field: int(re.search(rf"\b{field}:(\d+)", function_line).group(1)) for field in RESOURCE_FIELDS}


def compile_one(job: tuple[int, int]) -> Result:
    index, arch = job
    variant = _VARIANTS[index]
    try:
        source = ASTSource(fn=variant.kernel, signature=variant.signature, constexprs=variant.constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": variant.num_warps, "num_stages": variant.num_stages})
        return Result(variant.name, arch, read_resources(compiled.asm["cubin"]), compiled.metadata.shared)
    except Exception as error:
        message = " ".join(str(error).split())
        return Result(variant.name, arch, error=f"{type(error).__name__}: {message[:300]}")


def markdown_table(results: list[Result]) -> str:
    lines = ["| kernel | arch | regs | shared static (B) | shared dynamic (B) | stack/local (B) | status |",
             "|---|---|---|---|---|---|---|"]
    for result in results:
        if result.error:
            lines.append(f"| {result.name} | sm_{result.arch} | - | - | - | - | COMPILE ERROR: {result.error} |")
            continue
        res = result.resources
        status = "SPILL" if result.spills else "ok"
        lines.append(f"| {result.name} | sm_{result.arch} | {res['REG']} | {res['SHARED']} | "
                     f"{result.dynamic_shared} | {res['STACK']}/{res['LOCAL']} | {status} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--filter", default="", help="only variants whose name contains this")
    parser.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS), help="compute capabilities")
    args = parser.parse_args(argv)
    if not CUOBJDUMP.exists():
        print(f"cuobjdump not found at {CUOBJDUMP} (it ships with the triton wheel)", file=sys.stderr)
        return 2

    started = time.perf_counter()
    variants, errors = discover_variants()
    _VARIANTS[:] = [variant for variant in variants if args.filter in variant.name]
    jobs = [(index, arch) for index in range(len(_VARIANTS)) for arch in args.arch]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(compile_one, jobs))
    else:
        results = [compile_one(job) for job in jobs]

    print(markdown_table(results))
    failures = errors + [f"{r.name} sm_{r.arch}: {r.error}" for r in results if r.error]
    failures += [f"{r.name} sm_{r.arch}: spills (STACK {r.resources['STACK']}, LOCAL {r.resources['LOCAL']})"
                 for r in results if r.spills]
    print(f"\n{len(_VARIANTS)} variants x {len(args.arch)} archs compiled in "
          f"{time.perf_counter() - started:.0f} s; {len(failures)} problem(s)")
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    return 1 if failures or not jobs else 0


if __name__ == "__main__":
    sys.exit(main())
