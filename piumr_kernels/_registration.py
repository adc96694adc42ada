"""torch.library plumbing shared by the ops' fused backends.

A cpp op is defined in C++ (csrc/) and gets its fake (shape) implementation here; a Triton
op is a Python launcher wrapped with `triton_op`, whose fake comes from tracing it. Each op
module then registers its own autograd formula on the forward op.
"""

from __future__ import annotations

from typing import Callable

import torch


def library_op(qualified_name: str):
    """`"piumr_kernels::name"` -> the callable `torch.ops.piumr_kernels.name`."""
    namespace, name = qualified_name.split("::")
    return getattr(getattr(torch.ops, namespace), name)


def register_fakes(fakes: dict[str, Callable]) -> None:
    for name, fake in fakes.items():
        torch.library.register_fake(name)(fake)


def register_triton_ops(launchers: dict[str, Callable]) -> None:
    for name, launcher in launchers.items():
        torch.library.triton_op(name, launcher, mutates_args=())
