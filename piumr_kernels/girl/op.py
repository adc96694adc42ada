"""Public GIRL loss op (SPEC §3): the partition, argument checks, backend choice.

Every backend sees the same partition `(order, offsets)`: group `g` is the samples
`order[offsets[g]:offsets[g+1]]`, both int64 tensors built on the features' device without
reading anything back to the host (the random partition's sizes come from the shapes, the
explicit one's from sorting the ids), so a training step never waits on the device here.
A group with fewer than 2 members has no partner pairs and is left out: risk 0, not
counted in the mean or the variance.

The fused backends (cpp, triton) share one forward and one backward library op schema
(see `piumr_kernels/fused_op.py`): the forward returns the loss (the mean and the variance
penalty over the group risks, combined inside the op), the group risks `L_g` and the
variance, and when a gradient is coming (`need_grad`) a `saved` tensor for the backward,
which turns the upstream gradient of the loss into the features' gradient; the forward's
inputs are passed to it too. Only the loss is differentiable. What `saved` holds is the
backend's choice: cpp forms `dloss/dz` for every row in group order in the forward and the
backward scales and scatters it; triton saves per-anchor statistics and per-group slopes and
the backward recomputes the tiles from them, writing the gradient once (see the modules).
The reference backend combines the risks in PyTorch (`reference.combine_group_risks`).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import backends
from .._checks import check_flag, check_float_tensor, check_int, check_real, check_same_device
from ..fused_op import FusedOp, accumulation_dtype
from .reference import (
    combine_group_risks,
    girl_group_risks_reference,
    group_sizes,
    position_groups,
    uniform_offsets,
)


def _fake_forward(features, labels, order, offsets, tau, eta, lambda_var, var_grad, detach_weights, need_grad):
    """The cpp op's outputs (the triton op's fake comes from tracing its launcher)."""
    dtype = accumulation_dtype(features.dtype)
    rows = features.shape[0] if need_grad else 0
    return (
        features.new_empty(()),
        features.new_empty((offsets.shape[0] - 1,), dtype=dtype),
        features.new_empty((), dtype=dtype),
        features.new_empty((rows, features.shape[1]), dtype=dtype),
    )


def _fake_backward(grad_loss, saved, features, labels, order, offsets, tau, eta, detach_weights):
    return torch.empty_like(features)


def _setup_context(ctx, inputs, output):
    features, labels, order, offsets, tau, eta, _, _, detach_weights, _ = inputs
    _, group_risks, risk_var, saved = output
    ctx.save_for_backward(saved, features, labels, order, offsets)
    ctx.tau, ctx.eta, ctx.detach_weights = tau, eta, detach_weights
    ctx.mark_non_differentiable(group_risks, risk_var, saved)


def _backward(ctx, backward_op, grad_loss, _grad_risks, _grad_var, _grad_saved):
    if grad_loss is None:
        return (None,) * 10
    saved, features, labels, order, offsets = ctx.saved_tensors
    if saved.shape[0] == 0:
        raise RuntimeError("girl: the forward ran without need_grad, so it saved nothing for the gradient")
    grad_features = backward_op(
        grad_loss.contiguous(), saved, features, labels, order, offsets, ctx.tau, ctx.eta, ctx.detach_weights
    )
    return (grad_features,) + (None,) * 9


def _triton_kernels():
    from . import triton_kernels

    return triton_kernels


def _triton_launchers():
    kernels = _triton_kernels()
    return kernels.girl_forward, kernels.girl_backward


# Accepted parameter ranges (SPEC §3). The loss and its gradient grow like 1 / tau, and an
# emphasis narrower than eta = 1e-3 underflows every weight on the fused backends; both
# bounds are far outside useful settings (tau 0.05-0.5, eta ~0.2).
MIN_TAU = 1e-3
MIN_ETA = 1e-3
MAX_LAMBDA_VAR = 1e6
# Explicit groups size (G,) tensors by num_groups, empty groups included: a bound keeps a
# huge count from allocating terabytes.
MAX_EXPLICIT_GROUPS = 2**20


def check_parameters(tau: object, eta: object, lambda_var: object) -> tuple[float, float, float]:
    """`tau, eta` finite and >= 1e-3, `lambda_var` in [0, 1e6], as floats."""
    tau = check_real("tau", tau, positive=True, minimum=MIN_TAU)
    eta = check_real("eta", eta, positive=True, minimum=MIN_ETA)
    lambda_var = check_real("lambda_var", lambda_var, minimum=0.0, maximum=MAX_LAMBDA_VAR)
    return tau, eta, lambda_var


GIRL = FusedOp("girl", _fake_forward, _fake_backward, _setup_context, _backward, _triton_launchers)
GIRL.register()


def _check_integer_vector(name: str, value: object, length: int) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype == torch.bool or value.dtype.is_floating_point or value.dtype.is_complex:
        raise TypeError(f"{name} must have an integer dtype, got {value.dtype}")
    if value.dim() != 1 or value.shape[0] != length:
        raise ValueError(f"{name} must be 1-D of length {length} (one per feature row), got shape {tuple(value.shape)}")


def random_partition(
    batch: int,
    num_groups: int,
    device: torch.device,
    generator: torch.Generator | None = None,
    offsets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh random split of `0..batch-1` into `num_groups` chunks (tensor_split sizes).

    Returns `(order (B,), offsets (G + 1,))`. The permutation is drawn on the generator's
    device (the features' device without one, so no copy), so one seed gives one partition
    on every backend. The offsets (`reference.uniform_offsets`) are computed on `device`
    unless the caller passes the ones it keeps (the triton backend).
    """
    draw_device = generator.device if generator is not None else device
    order = torch.randperm(batch, generator=generator, device=draw_device).to(device)
    return order, uniform_offsets(batch, num_groups, device) if offsets is None else offsets


def explicit_partition(groups: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups from ids in `[0, num_groups)`: group `g` is the samples with id `g`, in batch
    order. Same outputs as :func:`random_partition`.

    Ids outside the range are not detected here (that needs a host read: `validate=True`);
    they count as the nearest valid id. The offsets come from a search in the sorted ids,
    not `bincount`, whose CUDA kernel reads the largest id back to size its output.
    """
    ids, order = torch.sort(groups.to(torch.int64).clamp(0, num_groups - 1), stable=True)
    boundary = torch.arange(num_groups + 1, device=groups.device)
    return order, torch.searchsorted(ids, boundary)


def group_index_of(order: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`(B,)` group of each sample for a partition given as `(order, offsets)`."""
    return torch.empty_like(order).scatter_(0, order, position_groups(offsets, order.shape[0]))


def _check_group_ids(groups: torch.Tensor, num_groups: int) -> None:
    outside = (groups < 0) | (groups >= num_groups)
    if bool(outside.any()):
        bad = groups[outside][:5].tolist()
        raise ValueError(f"groups: ids must lie in [0, num_groups) = [0, {num_groups}), got {bad}")


def girl_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_groups: int = 4,
    tau: float = 0.07,
    eta: float = 0.2,
    lambda_var: float = 1.0,
    var_grad: bool = True,
    detach_weights: bool = True,
    groups: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    return_details: bool = False,
    *,
    validate: bool | None = None,
):
    """Group-invariant robust learning loss (PIUmr's GIRL), SPEC §3.

    `features` `(B, C)` (`B >= 1`) are the raw pre-classifier features; the op normalizes
    them, `f = z / max(||z||, 1e-12)` (an all-zero row stays finite). `labels` `(B,)` are
    integer class ids.

    Pseudo-groups: a fresh random permutation of the batch per call (drawn with
    `generator` when given) is split into `num_groups` contiguous chunks whose sizes differ
    by at most one (`torch.tensor_split`). A batch too short for that (`2 * num_groups > B`)
    uses fewer groups, `max(1, B // 2)`. `groups` `(B,)` integer ids in `[0, num_groups)`
    (e.g. subject ids numbered per batch) replace that partition: group `g` is the samples
    with id `g`, and `num_groups` is then the number of ids. Out-of-range ids are only
    detected with `validate=True` (or `PIUMR_KERNELS_VALIDATE=1`), a host read; otherwise
    they count as the nearest valid id. With `num_groups=1` this is in-batch weighted SupCon.

    Inside a group, for anchor `i` and each partner `j != i`: cosine `c_ij = f_i . f_j`,
    logit `s_ij = c_ij / tau`, emphasis `r_ij = exp(-0.5 ((c_ij - eta) / eta)^2)`, weight
    `w_ij = (|I_g| - 1) r_ij / sum_{k != i} r_ik` (mean one over the partners), positives
    `P(i)`: partners with the anchor's label, and
    `l_i = -sum_{j in P(i)} w_ij (s_ij - LSE_i) / max(|P(i)|, 1)` with `LSE_i` the
    log-sum-exp of `s_ik` over the partners. An anchor with no positive gives 0 and still
    counts in its group's mean `L_g`. A group with fewer than 2 members has no partners: it
    is left out (its `L_g` is reported as 0 and it is not counted below). Finally, over the
    `G'` groups with at least 2 members,
    `loss = mean L_g + lambda_var * mean (L_g - mean L)^2` (population variance); with no
    such group the loss is 0 and so is its gradient.

    Accepted ranges (else a `ValueError` naming the parameter): `tau` and `eta` finite and
    at least 1e-3 (`MIN_TAU`, `MIN_ETA`; a smaller temperature makes the loss and gradient
    ~1/tau and overflows float32 near 1e-19, a narrower emphasis underflows every weight),
    `0 <= lambda_var <= 1e6`, and with `groups`, `num_groups <= 2**20`. The loss and
    gradient come back in the features' dtype: with float16 features they overflow past
    65504 (tau near 1e-3 with large batches). A row whose squared norm overflows the
    accumulation dtype (float32: entries near 1e19 and beyond) normalizes to zero on every
    backend, as `F.normalize` does.

    Decisions against the paper's literal text (each with its option or reason):
      1. the emphasis is a Gaussian on the cosine, not on `c / tau` (literal form: every
         weight ~1e-26 at tau=0.07, eta=0.2); `eta` is the cosine where hard pairs peak;
      2. self pairs are excluded from the positives and from `LSE_i` (SupCon form);
      3. weights are scaled to mean one over the partners (paper: a softmax over the
         group), so with a flat emphasis (`eta -> inf`) the loss is SupCon in each group;
      4. `detach_weights=True` holds the weights constant in the gradient (importance
         weights, Danskin's theorem for the DRO inner max); `False` differentiates
         through them;
      5. `var_grad=True` lets the variance penalty carry gradient (V-REx); `False` is the
         paper's `Var(stopgrad(L_g))`: added to the loss and reported, but no gradient.

    No host synchronization unless `validate` is on (a CPU `generator` with CUDA features
    copies the drawn permutation to the device). Float32 math for float16/bfloat16/float32
    features (the loss has the features' dtype); float64 on the reference and cpp
    backends. With `return_details=True` the result is `(loss, details)`, `details` a dict
    of detached tensors: `group_risks` `(G,)` (`L_g`, 0 for left-out groups), `risk_var`
    (the variance) and `group_index` `(B,)` (each sample's group).
    """
    check_float_tensor("features", features, dim=2)
    batch = features.shape[0]
    if batch < 1:
        raise ValueError(f"features must have at least one row (B >= 1), got shape {tuple(features.shape)}")
    _check_integer_vector("labels", labels, batch)
    tau, eta, lambda_var = check_parameters(tau, eta, lambda_var)
    num_groups = check_int("num_groups", num_groups, 1)
    var_grad = check_flag("var_grad", var_grad)
    detach_weights = check_flag("detach_weights", detach_weights)
    return_details = check_flag("return_details", return_details)
    if validate is not None:
        validate = check_flag("validate", validate)
    tensors = {"features": features, "labels": labels}
    if groups is not None:
        _check_integer_vector("groups", groups, batch)
        if num_groups > MAX_EXPLICIT_GROUPS:
            raise ValueError(f"num_groups must be <= {MAX_EXPLICIT_GROUPS} with explicit groups, got {num_groups}")
        tensors["groups"] = groups
    check_same_device(tensors)

    backend = backends.resolve_backend(features, cpp_op="girl_cpp")
    if groups is None:
        if 2 * num_groups > batch:
            num_groups = max(1, batch // 2)  # a short batch: fewer groups of >= 2 members
        kept = _triton_kernels().partition_offsets(batch, num_groups, features) if backend == "triton" else None
        order, offsets = random_partition(batch, num_groups, features.device, generator, kept)
    else:
        if backends.validation_enabled(validate):
            _check_group_ids(groups, num_groups)
        order, offsets = explicit_partition(groups, num_groups)

    if backend == "reference":
        group_risks = girl_group_risks_reference(features, labels, order, offsets, tau, eta, detach_weights)
        loss, risk_var = combine_group_risks(group_risks, group_sizes(offsets) >= 2, lambda_var, var_grad)
        loss = loss.to(features.dtype)
    else:
        if backend == "triton" and features.dtype == torch.float64:
            raise TypeError("features: the triton backend supports float16, bfloat16 and float32, got float64")
        need_grad = torch.is_grad_enabled() and features.requires_grad
        loss, group_risks, risk_var, _ = GIRL(
            backend,
            features.contiguous(),
            labels.to(torch.int64).contiguous(),
            order,
            offsets,
            tau,
            eta,
            lambda_var,
            var_grad,
            detach_weights,
            need_grad,
        )
    if not return_details:
        return loss
    details = {
        "group_risks": group_risks.detach(),
        "risk_var": risk_var.detach(),
        "group_index": group_index_of(order, offsets),
    }
    return loss, details


class GIRLLoss(nn.Module):
    """`nn.Module` form of :func:`girl_loss` (same options and SPEC §3 decisions).

    `forward(features, labels, groups=None)` draws fresh pseudo-groups from the global RNG
    on every call unless `groups` is given; with `groups`, `num_groups=` gives the number of
    group ids of that call (default: the module's `num_groups`). `generator=`,
    `return_details=` and `validate=` pass through.
    """

    def __init__(
        self,
        num_groups: int = 4,
        tau: float = 0.07,
        eta: float = 0.2,
        lambda_var: float = 1.0,
        var_grad: bool = True,
        detach_weights: bool = True,
    ) -> None:
        super().__init__()
        self.num_groups = check_int("num_groups", num_groups, 1)
        self.tau, self.eta, self.lambda_var = check_parameters(tau, eta, lambda_var)
        self.var_grad = check_flag("var_grad", var_grad)
        self.detach_weights = check_flag("detach_weights", detach_weights)

    def forward(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        groups: torch.Tensor | None = None,
        *,
        num_groups: int | None = None,
        generator: torch.Generator | None = None,
        return_details: bool = False,
        validate: bool | None = None,
    ):
        return girl_loss(
            features,
            labels,
            self.num_groups if num_groups is None else num_groups,
            self.tau,
            self.eta,
            self.lambda_var,
            self.var_grad,
            self.detach_weights,
            groups=groups,
            generator=generator,
            return_details=return_details,
            validate=validate,
        )

    def extra_repr(self) -> str:
        return (
            f"num_groups={self.num_groups}, tau={self.tau}, eta={self.eta}, lambda_var={self.lambda_var}, "
            f"var_grad={self.var_grad}, detach_weights={self.detach_weights}"
        )
