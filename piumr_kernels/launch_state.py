"""Small device tensors the Triton launchers keep between calls, and when they may not.

- `traced(like)`: whether a launcher's input is fake, meta, wrapped or traced (FakeTensorMode,
  torch.compile, functionalization) or the call is inside a CUDA-graph capture. Such a call
  must build its tables fresh: a cached real tensor must not enter a traced graph, nor a fake
  one be cached, nor a tensor from a graph's private memory pool outlive the graph.
- `zeroed_tickets(like, count)`: `count` int32 counters, all zero, for kernels whose last
  program per item finishes a reduction (`is_last_program`, used by TFAM's reductions,
  DCT's split sums and GIRL's tile statistics). Each such kernel sets every counter it uses
  back to zero before it ends, so one buffer per (device, stream) serves every later launch
  on that stream without a fill; launches on one stream run one after another, so they
  never share a counter at the same time.
- `kept_between_calls(build)`: a table `build(*key, device)` kept per (key, device) for
  later calls, built fresh when `traced` (DCT's filter tables, GIRL's partition boundaries and
  forward program table).

Only the Triton launchers import this module.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_TRACING_MODES = (
    torch._C._TorchDispatchModeKey.FAKE,
    torch._C._TorchDispatchModeKey.PROXY,
    torch._C._TorchDispatchModeKey.FUNCTIONAL,
)


def traced(like: torch.Tensor) -> bool:
    return (
        type(like) not in (torch.Tensor, torch.nn.Parameter)
        or like.is_meta
        or torch.compiler.is_compiling()
        or any(torch._C._get_dispatch_mode(mode) is not None for mode in _TRACING_MODES)
        or (like.is_cuda and torch.cuda.is_current_stream_capturing())
    )


def kept_between_calls(build):
    """`build(*key, device)` as `get(*key, like)`: built on `like`'s device once per (key,
    device) and returned again by later calls (the kernels only read it), built fresh for a
    traced call. Bounded: 64 entries; `get.cache_clear()`, `get.cache_info()` as lru_cache."""
    cached = functools.lru_cache(maxsize=64)(build)

    def get(*args):
        *key, like = args
        return (build if traced(like) else cached)(*key, like.device)

    get.cache_clear, get.cache_info = cached.cache_clear, cached.cache_info
    return get


# (device, stream) -> the largest ticket buffer handed out there.
_tickets: dict[tuple, torch.Tensor] = {}
# Grown in steps, so a few batch sizes allocate once.
_TICKET_STEP = 1024


def zeroed_tickets(like: torch.Tensor, count: int) -> torch.Tensor:
    """At least `count` int32 zeros on `like`'s device, for one launch on the current stream."""
    if traced(like):
        return torch.zeros((count,), dtype=torch.int32, device=like.device)
    stream = torch.cuda.current_stream(like.device).cuda_stream if like.is_cuda else None
    key = (like.device, stream)
    tickets = _tickets.get(key)
    if tickets is None or tickets.numel() < count:
        tickets = _tickets[key] = torch.zeros(
            (-(-count // _TICKET_STEP) * _TICKET_STEP,), dtype=torch.int32, device=like.device
        )
    return tickets


@triton.jit
def is_last_program(tickets_ptr, item, n_programs):
    """True in the last of the item's `n_programs` programs to get here; that program then
    reads the others' partials and must store 0 to `tickets_ptr + item` when done. The
    barrier orders every thread's stores of this program before the release of the ticket;
    the finishing program's loads of partials come after its acquire and must bypass L1
    (`cache_modifier=".cg"`)."""
    tl.debug_barrier()
    return tl.atomic_add(tickets_ptr + item, 1, sem="acq_rel") == n_programs - 1
