"""Public GIRL loss op (SPEC §3): pseudo-groups, argument checks, backend dispatch,
torch.library registration.

Every backend sees the same partition: the permutation (or the explicit `groups`) is
turned into `(order, sizes)` here, in Python, before dispatch (group `g` is the next
`sizes[g]` samples of `order`; the sizes are Python ints, static under torch.compile).
Group `g` is described to the fused backends by `offsets` (`G + 1` boundaries into
`order`); they never form a `B x B` matrix.

- triton: works on the samples sorted by group; its forward op returns the group risks
  `L_g` and six numbers per sample that its backward needs (see `STATS`), and the mean and
  variance penalty over the `G` risks are combined in PyTorch.
- cpp: one op for the whole loss, to keep the per-call overhead of small batches low. It
  reads the features through `order` (no gathered copy, no scatter in autograd), combines
  the risks itself and, when a gradient is needed, computes `dL_g/dz` for every row in the
  forward while each group's cosines are at hand; its backward only scales and scatters
  those rows (see csrc/girl.cpp). Its loss, risks and variance are all differentiable.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from .. import backends
from .._registration import library_op, register_fakes, register_triton_ops
from .._checks import check_float_tensor, check_int, check_real, check_same_device
from .reference import combine_group_risks, compute_dtype, girl_loss_reference

CPP_FORWARD = "piumr_kernels::girl_cpp"
CPP_BACKWARD = "piumr_kernels::girl_cpp_backward"
TRITON_FORWARD = "piumr_kernels::girl_triton"
TRITON_BACKWARD = "piumr_kernels::girl_triton_backward"

# Per-sample statistics saved by the triton forward, a (6, B) tensor with rows in this order:
# 1 / max(||z_i||, 1e-12), LSE_i of the logits, log sum_k r_ik, sum_{j in P(i)} w_ij,
# l_i, |P(i)|.
STATS = ("inv_norm", "logit_lse", "emphasis_lse", "positive_weight", "anchor_loss", "num_positive")


def _fake_triton_forward(features, labels, offsets, tau, eta, detach_weights):
    dtype = compute_dtype(features.dtype)
    return (
        features.new_empty((offsets.shape[0] - 1,), dtype=dtype),
        features.new_empty((len(STATS), features.shape[0]), dtype=dtype),
    )


def _register_triton_autograd() -> None:
    backward_op = library_op(TRITON_BACKWARD)

    def setup_context(ctx, inputs, output):
        features, labels, offsets, tau, eta, detach_weights = inputs
        _, stats = output
        ctx.save_for_backward(features, labels, offsets, stats)
        ctx.params = (tau, eta, detach_weights)
        ctx.mark_non_differentiable(stats)

    def backward(ctx, grad_risks, _grad_stats):
        features, labels, offsets, stats = ctx.saved_tensors
        grad_features = backward_op(grad_risks.contiguous(), features, labels, offsets, stats, *ctx.params)
        return grad_features, None, None, None, None, None

    torch.library.register_autograd(TRITON_FORWARD, backward, setup_context=setup_context)


def _fake_cpp_forward(features, labels, order, offsets, tau, eta, lambda_var, var_grad, detach_weights, need_grad):
    """(loss, group_risks, risk_var, direction): `direction` is `dL_g/dz` in group order,
    `(B, C)` with `need_grad` and `(0, C)` without."""
    dtype = compute_dtype(features.dtype)
    rows = features.shape[0] if need_grad else 0
    return (
        features.new_empty(()),
        features.new_empty((offsets.shape[0] - 1,), dtype=dtype),
        features.new_empty((), dtype=dtype),
        features.new_empty((rows, features.shape[1]), dtype=dtype),
    )


def _fake_cpp_backward(grad_loss, grad_risks, grad_risk_var, group_risks, direction, order, offsets, lambda_var,
                       var_grad, dtype):
    return direction.new_empty(direction.shape, dtype=dtype)


if backends.cpp_op_built("girl_cpp"):
    # Its autograd formula is registered in C++ (csrc/girl.cpp), for the per-call overhead.
    register_fakes({CPP_FORWARD: _fake_cpp_forward, CPP_BACKWARD: _fake_cpp_backward})
if backends.backend_available("triton"):
    from . import triton_kernels

    register_triton_ops({TRITON_FORWARD: triton_kernels.girl_forward, TRITON_BACKWARD: triton_kernels.girl_backward})
    _register_triton_autograd()


def _check_integer_vector(name: str, value: object, length: int) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype == torch.bool or value.dtype.is_floating_point or value.dtype.is_complex:
        raise TypeError(f"{name} must have an integer dtype, got {value.dtype}")
    if value.dim() != 1 or value.shape[0] != length:
        raise ValueError(f"{name} must be 1-D of length {length} (one per feature row), got shape {tuple(value.shape)}")


def random_partition(
    batch: int, num_groups: int, device: torch.device, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, list[int]]:
    """A fresh random split of `0..batch-1` into `num_groups` chunks (tensor_split sizes).

    Returns `(order (B,), sizes)`: the samples of group `g` are the next `sizes[g]` entries
    of `order`. The permutation is drawn on the generator's device (the features' device
    without one), so one seed gives one partition on every backend.
    """
    draw_device = generator.device if generator is not None else device
    order = torch.randperm(batch, generator=generator, device=draw_device).to(device)
    base, extra = divmod(batch, num_groups)
    return order, [base + 1] * extra + [base] * (num_groups - extra)


def explicit_partition(groups: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Groups from ids (any integers): group `g` is the `g`-th smallest id. Same outputs as
    :func:`random_partition`; every group must have at least two members."""
    ids, group_of_sample = torch.unique(groups, return_inverse=True)
    counts = torch.bincount(group_of_sample, minlength=ids.shape[0])
    small = counts < 2
    if bool(small.any()):
        bad = ids[small][:5].tolist()
        raise ValueError(
            f"groups: every group needs at least 2 members (a sample's partners are the other "
            f"members of its group), but group id(s) {bad} have only one"
        )
    return torch.argsort(group_of_sample, stable=True), counts.tolist()


def group_index_of(order: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """`(B,)` group of each sample for a partition given as `(order, sizes)`."""
    group_of_position = torch.repeat_interleave(
        torch.arange(len(sizes), device=order.device), torch.tensor(sizes, device=order.device),
        output_size=order.shape[0],
    )
    return torch.empty_like(order).scatter_(0, order, group_of_position)


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
):
    """Group-invariant robust learning loss (PIUmr's GIRL), SPEC §3.

    `features` `(B, C)` are the raw pre-classifier features; the op normalizes them,
    `f = z / max(||z||, 1e-12)` (an all-zero row stays finite). `labels` `(B,)` are integer
    class ids.

    Pseudo-groups: a fresh random permutation of the batch per call (drawn with
    `generator` when given) is split into `num_groups` contiguous chunks whose sizes differ
    by at most one (`torch.tensor_split`); `groups` `(B,)` integer ids (e.g. subject ids)
    replace that partition, and `num_groups` is then ignored. Every group needs at least
    two members. With `num_groups=1` this is in-batch weighted SupCon.

    Inside a group, for anchor `i` and each partner `j != i`: cosine `c_ij = f_i . f_j`,
    logit `s_ij = c_ij / tau`, emphasis `r_ij = exp(-0.5 ((c_ij - eta) / eta)^2)`, weight
    `w_ij = (|I_g| - 1) r_ij / sum_{k != i} r_ik` (mean one over the partners), positives
    `P(i)`: partners with the anchor's label, and
    `l_i = -sum_{j in P(i)} w_ij (s_ij - LSE_i) / max(|P(i)|, 1)` with `LSE_i` the
    log-sum-exp of `s_ik` over the partners. An anchor with no positive gives 0 and still
    counts in its group's mean `L_g`. Finally
    `loss = mean_g L_g + lambda_var * mean_g (L_g - mean L)^2` (population variance,
    `lambda_var >= 0`; `tau > 0` and `eta > 0`).

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

    Float32 math for float16/bfloat16/float32 features (the loss has the features' dtype);
    float64 on the reference and cpp backends. With `return_details=True` the result is
    `(loss, details)`, `details` a dict of detached tensors: `group_risks` `(G,)` (`L_g`),
    `risk_var` (the variance) and `group_index` `(B,)` (each sample's group).
    """
    check_float_tensor("features", features, dim=2)
    batch = features.shape[0]
    _check_integer_vector("labels", labels, batch)
    tau = check_real("tau", tau, positive=True)
    eta = check_real("eta", eta, positive=True)
    lambda_var = check_real("lambda_var", lambda_var, minimum=0.0)
    num_groups = check_int("num_groups", num_groups, 1)
    tensors = {"features": features, "labels": labels}
    if groups is not None:
        _check_integer_vector("groups", groups, batch)
        tensors["groups"] = groups
    check_same_device(tensors)
    if groups is None and 2 * num_groups > batch:
        raise ValueError(
            f"num_groups must allow at least 2 members per group (num_groups <= B // 2 = "
            f"{batch // 2}), got num_groups={num_groups} for a batch of {batch}"
        )

    if groups is None:
        order, sizes = random_partition(batch, num_groups, features.device, generator)
    else:
        order, sizes = explicit_partition(groups)

    backend = backends.resolve_backend(features, cpp_op="girl_cpp")
    group_starts = list(itertools.accumulate([0] + sizes))  # fused ops: group g is order[starts[g]:starts[g+1]]
    if backend == "reference":
        loss, group_risks, risk_var = girl_loss_reference(
            features, labels, order, sizes, tau, eta, lambda_var, var_grad, detach_weights
        )
    elif backend == "cpp":
        offsets = torch.tensor(group_starts)
        need_grad = torch.is_grad_enabled() and features.requires_grad
        loss, group_risks, risk_var, _ = torch.ops.piumr_kernels.girl_cpp(
            features.contiguous(), labels.to(torch.int64).contiguous(), order, offsets, tau, eta, lambda_var,
            bool(var_grad), bool(detach_weights), need_grad,
        )
    else:
        if features.dtype == torch.float64:
            raise TypeError("features: the triton backend supports float16, bfloat16 and float32, got float64")
        offsets = torch.tensor(group_starts, device=features.device)
        sorted_features = features.index_select(0, order).contiguous()
        sorted_labels = labels.index_select(0, order).to(torch.int64).contiguous()
        group_risks, _ = torch.ops.piumr_kernels.girl_triton(
            sorted_features, sorted_labels, offsets, tau, eta, bool(detach_weights)
        )
        loss, risk_var = combine_group_risks(group_risks, lambda_var, bool(var_grad))
        loss = loss.to(features.dtype)
    if not return_details:
        return loss
    details = {
        "group_risks": group_risks.detach(),
        "risk_var": risk_var.detach(),
        "group_index": group_index_of(order, sizes),
    }
    return loss, details


class GIRLLoss(nn.Module):
    """`nn.Module` form of :func:`girl_loss` (same options and SPEC §3 decisions).

    `forward(features, labels, groups=None)` draws fresh pseudo-groups from the global RNG
    on every call unless `groups` is given; `generator=` and `return_details=` pass through.
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
        self.tau = check_real("tau", tau, positive=True)
        self.eta = check_real("eta", eta, positive=True)
        self.lambda_var = check_real("lambda_var", lambda_var, minimum=0.0)
        self.var_grad = bool(var_grad)
        self.detach_weights = bool(detach_weights)

    def forward(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        groups: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        return_details: bool = False,
    ):
        return girl_loss(
            features, labels, self.num_groups, self.tau, self.eta, self.lambda_var, self.var_grad,
            self.detach_weights, groups=groups, generator=generator, return_details=return_details,
        )

    def extra_repr(self) -> str:
        return (
            f"num_groups={self.num_groups}, tau={self.tau}, eta={self.eta}, lambda_var={self.lambda_var}, "
            f"var_grad={self.var_grad}, detach_weights={self.detach_weights}"
        )
