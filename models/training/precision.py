"""Numeric formats of a run on its device: the autocast dtype (`amp`) and the memory layout
(`memory_format`).

`amp`: `auto` is bf16 autocast on GPUs that support it (else fp16 with a GradScaler) and
full precision on CPU (CPU bf16 is available with `amp=bf16`). The loss (CE + GIRL) is
always computed in float32 on float32 logits and features.
`memory_format`: contiguous (default) or channels_last (NDHWC, measured faster on CPU for
both the synthetic job's model and PIUmr-M, not yet measured on a GPU); refused with CPU
bf16 autocast at fewer than 5 frames (`check_memory_format`).
"""

from contextlib import nullcontext

import torch

from models.errors import ConfigError


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `amp` on `device` (None: full precision)."""
    if amp == "none":
        return None
    if amp == "fp16":
        if device.type != "cuda":
            raise ConfigError("amp 'fp16' needs a CUDA device (use 'bf16' on CPU)")
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if device.type == "cuda":  # auto
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def to_channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """The 5-D weights (3D convolutions) in channels_last_3d, in place. Module.to(memory_format=)
    cannot be used: it also converts the 4-D tensors, which channels_last_3d rejects."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.dim() == 5:
            tensor.data = tensor.data.contiguous(memory_format=torch.channels_last_3d)
    return model


def check_memory_format(
    channels_last: bool, amp_dtype: torch.dtype | None, device: torch.device, num_frames: int
) -> None:
    """Refuses the one combination known to train on garbage: under CPU bf16 autocast with
    channels_last_3d, PyTorch 2.13's depthwise 5x1x1 convolution (X3D's stem `conv_xy`) reads
    uninitialized memory in its weight gradient when the clip has 3 or 4 frames (seen as
    gradient norms from 1e3 to 1e25 for the same batch; 1, 2 and 5+ frames were exact)."""
    if channels_last and amp_dtype == torch.bfloat16 and device.type == "cpu" and num_frames < 5:
        raise ConfigError(
            f"memory_format channels_last with bf16 autocast on CPU needs num_frames >= 5, got {num_frames}: "
            "PyTorch's CPU depthwise temporal convolution gives wrong weight gradients there; "
            "use --memory-format contiguous (or --amp none)"
        )
