"""Sharpness-aware minimization (Foret et al., ICLR 2021) around any torch optimizer.

Non-adaptive SAM as HDF trains (SPEC §8): at the weights `w` with gradient `g`, the ascent
step is `e = rho g / (||g||_2 + 1e-16)` (`||g||` over every parameter that has a gradient);
the step's gradient is taken at `w + e`, the weights go back to `w`, and the base optimizer
steps with that gradient. One step is two forward/backward passes:

    loss_fn(model(batch)).backward()     # g at w
    sam.ascent_step()                    # w <- w + e; gradients cleared
    loss_fn(model(batch)).backward()     # the gradient at w + e
    sam.restore()                        # w <- w (exactly: a saved copy, not w + e - e)
    sam.step()                           # or scaler.unscale_(sam) ... scaler.step(sam)

- GradScaler (fp16): the ascent direction is scale-invariant, so `ascent_step` reads the
  scaled gradients as they are; `scaler.unscale_(sam)`, clipping and `scaler.step(sam)`
  then apply to the second gradient as without SAM. A non-finite first gradient (an fp16
  overflow) gives no perturbation, and `restore` makes the second gradient non-finite
  (multiplied by NaN), so the scaler skips the step and lowers its scale, and a loop
  without a scaler sees a non-finite norm: one rule for both passes, and no host sync.
- DDP: each backward all-reduces as usual. The first is deliberately not run under
  `no_sync`: the ascent direction must be the global gradient, the same on every rank,
  so the ranks' weights stay identical.
- `param_groups`, `state_dict`, `load_state_dict` and `zero_grad` are the base optimizer's
  (SAM keeps no state across steps); give an LR scheduler `sam.base_optimizer`.
"""

from __future__ import annotations

import math
import numbers

import torch


class SAM:
    """Wraps `base_optimizer` (e.g. AdamW) with the SAM step; `rho` is the ascent radius."""

    def __init__(self, base_optimizer: torch.optim.Optimizer, rho: float = 0.05) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}")
        self.base_optimizer = base_optimizer
        if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not (math.isfinite(rho) and rho > 0):
            raise ValueError(f"rho must be a finite number > 0, got {rho!r}")
        self.rho = float(rho)
        self._saved = None  # (params, their values at w, whether the ascent gradient was finite)

    @property
    def param_groups(self) -> list[dict]:
        return self.base_optimizer.param_groups

    @property
    def state(self):
        return self.base_optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.base_optimizer.load_state_dict(state_dict)

    @torch.no_grad()
    def ascent_step(self) -> None:
        """Move to `w + e` along the current gradients and clear them."""
        if self._saved is not None:
            raise RuntimeError("SAM.ascent_step: the weights are already perturbed; call restore() first")
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            raise RuntimeError("SAM.ascent_step: no parameter has a gradient; call backward() first")
        grads = [p.grad for p in params]
        norm = torch.nn.utils.get_total_norm(grads)
        finite = torch.isfinite(norm)
        scale = torch.where(finite, self.rho / (norm + 1e-16), torch.zeros_like(norm))
        saved = [p.detach().clone() for p in params]
        torch._foreach_add_(params, torch._foreach_mul(grads, scale))
        self._saved = (params, saved, finite)
        self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def restore(self) -> None:
        """Back to `w`, keeping the gradient taken at `w + e` (made non-finite when the ascent
        gradient was, see the module docstring)."""
        if self._saved is None:
            raise RuntimeError("SAM.restore: the weights are not perturbed; call ascent_step() first")
        params, saved, finite = self._saved
        self._saved = None
        torch._foreach_copy_(params, saved)
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            marker = torch.where(
                finite,
                torch.ones_like(finite, dtype=grads[0].dtype),
                torch.full_like(finite, float("nan"), dtype=grads[0].dtype),
            )
            torch._foreach_mul_(grads, marker)

    def step(self, closure=None):
        """The base optimizer's step at the restored weights."""
        if self._saved is not None:
            raise RuntimeError("SAM.step: the weights are still perturbed; call restore() before stepping")
        return self.base_optimizer.step(closure)

    def __repr__(self) -> str:
        return f"SAM(rho={self.rho}, base_optimizer={self.base_optimizer!r})"
