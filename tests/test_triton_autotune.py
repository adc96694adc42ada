"""piumr_kernels.triton_autotune: the interpreter runs the first config only; on a GPU the first
launch per key times every config (with accumulators reset between timings) and later launches
reuse the choice; every config of every autotuned op kernel is a declared static-check variant.

The GPU path runs here under the interpreter with triton's benchmarker replaced by a stub that
calls each config and reports chosen timings."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil

import pytest
import torch

from piumr_kernels import backends

triton = pytest.importorskip("triton", reason="triton is not installed")
tl = triton.language

from piumr_kernels import triton_autotune  # noqa: E402
from piumr_kernels.triton_variants import autotuned_variants  # noqa: E402

if backends._availability("triton", torch.device("cpu")):
    pytest.skip("these tests launch interpreted kernels on CPU tensors", allow_module_level=True)

CONFIGS = [triton.Config({"BLOCK": 8}, num_warps=2), triton.Config({"BLOCK": 32}, num_warps=4, num_stages=2)]


@triton.jit
def _accumulate_kernel(x_ptr, out_ptr, block_ptr, n, scale, BLOCK: tl.constexpr):
    """out += scale * x (depends on what out held: an accumulator); each program writes its BLOCK."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
    out = tl.load(out_ptr + offsets, mask=inside, other=0.0)
    tl.store(out_ptr + offsets, out + scale * x, mask=inside)
    tl.store(block_ptr + tl.program_id(0), BLOCK)


def _accumulate(kernel, x, out, scale):
    """out += scale * x; returns the BLOCK each program ran (zero where no program ran)."""
    n = x.numel()
    blocks = torch.zeros(n, dtype=torch.int32)
    kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, out, blocks, n, scale)
    return blocks


def _decorate(monkeypatch, interpreting: bool, **options):
    monkeypatch.setattr(triton_autotune, "triton_interpreting", lambda: interpreting)
    return triton_autotune.autotune(CONFIGS, key=["n"], **options)(_accumulate_kernel)


def _random(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def _reference(x: torch.Tensor, start: torch.Tensor, scale: float) -> torch.Tensor:
    return (start.double() + scale * x.double()).float()


def test_interpreter_runs_the_first_config_untimed(monkeypatch):
    kernel = _decorate(monkeypatch, interpreting=True)
    assert kernel.configs == [CONFIGS[0]] and kernel.tuning_configs == tuple(CONFIGS)
    monkeypatch.setattr(type(kernel), "do_bench", property(lambda self: pytest.fail("the interpreter benchmarked")))
    x, start = _random(50, 0), _random(50, 1)
    out = start.clone()
    blocks = _accumulate(kernel, x, out, 0.5)
    torch.testing.assert_close(out, _reference(x, start, 0.5), rtol=1e-6, atol=1e-6)
    assert blocks[blocks != 0].tolist() == [8] * 7


class _StubBenchmarker:
    """Calls each config's launch `reps` times (as triton's do_bench repeats it) and reports
    the timing given per BLOCK."""

    def __init__(self, timings: dict[int, float], reps: int = 3):
        self.timings, self.reps, self.calls = timings, reps, 0

    def __call__(self, kernel_call, quantiles):
        self.calls += 1
        for _ in range(self.reps):
            kernel_call()
        return [self.timings[self.block]] * len(quantiles)


def test_gpu_path_times_every_config_once_per_key_and_keeps_accumulators_right(monkeypatch):
    kernel = _decorate(monkeypatch, interpreting=False, reset_to_zero=["out_ptr"])
    assert kernel.configs == CONFIGS
    bench = _StubBenchmarker({8: 2.0, 32: 1.0})
    kernel.do_bench = bench
    timed_configs = []
    original_bench = type(kernel)._bench

    def record_bench(self, *args, config, **meta):
        bench.block = config.kwargs["BLOCK"]
        timed_configs.append(config)
        return original_bench(self, *args, config=config, **meta)

    monkeypatch.setattr(type(kernel), "_bench", record_bench)

    x = _random(70, 2)
    out = torch.zeros(70)  # the accumulator starts at zero: reset_to_zero keeps it so after timing
    _accumulate(kernel, x, out, 2.0)
    assert timed_configs == CONFIGS and bench.calls == 2 and kernel.best_config == CONFIGS[1]
    torch.testing.assert_close(out, _reference(x, torch.zeros(70), 2.0), rtol=1e-6, atol=1e-6)

    blocks = _accumulate(kernel, x, out, 2.0)  # same key: no timing, the same choice
    assert bench.calls == 2 and blocks[blocks != 0].tolist() == [32] * 3
    torch.testing.assert_close(out, _reference(x, _reference(x, torch.zeros(70), 2.0), 2.0), rtol=1e-6, atol=1e-6)

    bench.timings = {8: 1.0, 32: 3.0}
    out = torch.zeros(9)
    _accumulate(kernel, x[:9], out, -1.0)  # a new key: timed again
    assert bench.calls == 4 and kernel.best_config == CONFIGS[0]
    torch.testing.assert_close(out, _reference(x[:9], torch.zeros(9), -1.0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_use_config_runs_that_config(monkeypatch, index):
    kernel = _decorate(monkeypatch, interpreting=False)
    x, start = _random(40, 3), _random(40, 4)
    out = start.clone()
    with triton_autotune.use_config(kernel, CONFIGS[index]):
        blocks = _accumulate(kernel, x, out, 1.5)
    assert kernel.configs == CONFIGS
    block = CONFIGS[index].kwargs["BLOCK"]
    assert blocks[blocks != 0].tolist() == [block] * triton.cdiv(40, block)
    torch.testing.assert_close(out, _reference(x, start, 1.5), rtol=1e-6, atol=1e-6)


def test_launching_every_config_launches_each_once(monkeypatch):
    kernel = _decorate(monkeypatch, interpreting=True)
    x, start = _random(20, 5), _random(20, 6)
    out = start.clone()
    with triton_autotune.launching_every_config():
        blocks = _accumulate(kernel, x, out, 1.0)
    torch.testing.assert_close(out, _reference(x, _reference(x, start, 1.0), 1.0), rtol=1e-6, atol=1e-6)
    assert blocks[0].item() == 32 and blocks[1:3].tolist() == [8, 8]  # BLOCK 32's program 0 wrote last


def test_bad_arguments_name_what_is_wrong():
    with pytest.raises(ValueError, match="configs must not be empty"):
        triton_autotune.autotune([], key=["n"])(_accumulate_kernel)
    with pytest.raises(ValueError, match="configs must be distinct"):
        triton_autotune.autotune([CONFIGS[0], CONFIGS[0]], key=["n"])(_accumulate_kernel)
    with pytest.raises(ValueError, match=r"key names \['rows'\], which are not arguments"):
        triton_autotune.autotune(CONFIGS, key=["rows"])(_accumulate_kernel)
    with pytest.raises(ValueError, match=r"reset_to_zero names \['acc'\]"):
        triton_autotune.autotune(CONFIGS, key=["n"], reset_to_zero=["acc"])(_accumulate_kernel)
    with pytest.raises(ValueError, match=r"a config sets \['n'\], expected only constexpr arguments"):
        triton_autotune.autotune([triton.Config({"n": 4})], key=["scale"])(_accumulate_kernel)
    kernel = triton_autotune.autotune(CONFIGS, key=["n"])(_accumulate_kernel)
    with pytest.raises(ValueError, match="use_config: expected one of _accumulate_kernel's configs"):
        with triton_autotune.use_config(kernel, triton.Config({"BLOCK": 16})):
            pass


def test_autotuned_variants_one_per_config():
    kernel = triton_autotune.autotune(CONFIGS, key=["n"])(_accumulate_kernel)
    variants = autotuned_variants("demo.accumulate[fp32]", kernel, {"OTHER": 1}, {"x_ptr": "*fp32"})
    assert [v.name for v in variants] == [
        "demo.accumulate[fp32,BLOCK=8,warps=2,stages=3]",
        "demo.accumulate[fp32,BLOCK=32,warps=4,stages=2]",
    ]
    assert [(v.constexprs, v.num_warps, v.num_stages) for v in variants] == [
        ({"OTHER": 1, "BLOCK": 8}, 2, 3),
        ({"OTHER": 1, "BLOCK": 32}, 4, 2),
    ]
    assert all(v.kernel is kernel.fn and v.pointer_types == {"x_ptr": "*fp32"} for v in variants)
    assert autotuned_variants("demo.plain", kernel)[0].name == "demo.plain[BLOCK=8,warps=2,stages=3]"


def _op_kernel_modules():
    import piumr_kernels

    for info in pkgutil.iter_modules(piumr_kernels.__path__, "piumr_kernels."):
        name = info.name + ".triton_kernels"
        if info.ispkg and importlib.util.find_spec(name) is not None:
            yield importlib.import_module(name)


def test_every_config_of_every_autotuned_op_kernel_is_declared():
    """What the static check compiles includes every config a GPU can pick (the check itself
    maps each launched config to its variant: tests/test_triton_static_check.py)."""
    for module in _op_kernel_modules():
        variants = module.aot_variants()
        for kernel in triton_autotune.autotuned_kernels(module):
            for config in kernel.tuning_configs:
                declared = [
                    v
                    for v in variants
                    if v.kernel is kernel.fn
                    and (v.num_warps, v.num_stages) == (config.num_warps, config.num_stages)
                    and config.kwargs.items() <= v.constexprs.items()
                ]
                assert declared, f"{module.__name__}.{kernel.fn.__name__}: config {config} is not declared"
