"""GIRL loss (SPEC §3): every backend against the float64 reference, the semantic limits,
the pseudo-group partition and the argument errors.

Tolerances (against the float64 reference on the same, already rounded, inputs):
- float64 (reference, cpp): 1e-9 relative;
- float32: loss and group risks 1e-4 relative, gradients 1e-4 of the largest gradient entry;
- float16 / bfloat16 features (float32 math, gradient rounded to the input dtype): loss
  2e-3 / 1e-2 relative, gradients 2e-3 / 1e-2 of the largest entry;
- the triton backend's fp32 products run exact ("ieee", tests/conftest.py) except in
  test_triton_fp32_precision, which holds exact mode to 1e-5 and the TF32 default to 1e-3
  (loss) and 5e-3 of the largest gradient entry.
The Triton cases run in the interpreter on CPU (tests/conftest.py), so their shapes stay small.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import piumr_kernels
from piumr_kernels import GIRLLoss, girl_loss, use_backend
from piumr_kernels.girl import girl_loss_reference
from piumr_kernels.girl.op import GIRL, explicit_partition, group_index_of, random_partition

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

TOL = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1e-2, 1e-2),
}


def make_inputs(batch, width, num_classes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    features = (torch.randn(batch, width, generator=gen, dtype=torch.float64) * 3).to(dtype).to(DEVICE)
    labels = torch.randint(0, num_classes, (batch,), generator=gen).to(DEVICE)
    return features, labels


def fp64_reference(features, labels, group_index, num_groups, **options):
    """Loss, group risks and feature gradient of the float64 reference for a fixed partition."""
    z = features.detach().double().requires_grad_()
    order, offsets = explicit_partition(group_index, num_groups)
    loss, risks, risk_var = girl_loss_reference(z, labels, order, offsets, **options)
    loss.backward()
    return loss.detach(), risks.detach(), risk_var.detach(), z.grad


def assert_close_scaled(actual, expected, tol, what):
    """|actual - expected| <= tol * max|expected| (+ a tiny floor), elementwise."""
    actual = actual.double()
    scale = expected.abs().max().item() + 1e-12
    err = (actual - expected).abs().max().item()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:g} * {scale:.3e}"


def check_against_reference(features, labels, num_groups=None, groups=None, seed=5, grad_scale=1.7, **options):
    """Runs the active backend and compares loss, details and gradients with float64."""
    z = features.detach().clone().requires_grad_()
    kwargs = dict(options)
    if groups is None:
        kwargs.update(num_groups=num_groups, generator=torch.Generator().manual_seed(seed))
    else:
        kwargs.update(groups=groups, num_groups=num_groups)
    loss, details = girl_loss(z, labels, return_details=True, **kwargs)
    (loss * grad_scale).backward()
    ref_loss, ref_risks, ref_var, ref_grad = fp64_reference(
        features, labels, details["group_index"], details["group_risks"].shape[0], **options
    )
    loss_tol, grad_tol = TOL[features.dtype]
    assert loss.dtype == features.dtype and z.grad.dtype == features.dtype
    torch.testing.assert_close(loss.double(), ref_loss, rtol=loss_tol, atol=loss_tol * 1e-2)
    torch.testing.assert_close(details["group_risks"].double(), ref_risks, rtol=loss_tol, atol=loss_tol * 1e-2)
    torch.testing.assert_close(details["risk_var"].double(), ref_var, rtol=loss_tol, atol=loss_tol * 1e-2)
    assert_close_scaled(z.grad, ref_grad * grad_scale, grad_tol, "feature gradient")
    return details


# Explicit groups with empty (2, 5) and single-member (3) groups next to full ones.
NONUNIFORM_GROUPS = [0, 1, 4, 0, 1, 1, 3, 4, 0, 4, 1, 0, 4, 1, 0, 1, 4, 0, 4, 1, 0, 1, 4, 0, 1, 4]


@pytest.mark.parametrize("partition", ["random", "explicit"])
def test_fused_op_forward_and_backward(backend, poisoned_empty, partition):
    """The fused op itself (one schema on cpp and triton): loss, group risks and variance,
    and with a non-unit upstream gradient on the loss the feature gradient, against the fp64
    reference for each weight and variance option; left-out groups have risk 0 and their
    members a zero gradient; without need_grad, the same loss and nothing saved."""
    if backend == "reference":
        pytest.skip("the reference has no library op")
    features, labels = make_inputs(26, 12, num_classes=3)
    if partition == "random":
        order, offsets = random_partition(26, 3, features.device, torch.Generator().manual_seed(1))
    else:
        order, offsets = explicit_partition(torch.tensor(NONUNIFORM_GROUPS, device=DEVICE), 6)
    for detach, var_grad, lambda_var in ((True, True, 0.7), (False, False, 2.5)):
        options = dict(lambda_var=lambda_var, var_grad=var_grad, detach_weights=detach)
        z = features.clone().requires_grad_()
        loss, risks, risk_var, _ = GIRL(
            backend, z, labels, order, offsets, 0.07, 0.2, lambda_var, var_grad, detach, True
        )
        assert loss.dtype == risks.dtype == risk_var.dtype == torch.float32 and loss.shape == risk_var.shape == ()
        (loss * -1.7).backward()
        ref = features.double().requires_grad_()
        ref_loss, ref_risks, ref_var = girl_loss_reference(ref, labels, order, offsets, **options)
        (ref_loss * -1.7).backward()
        for name, value, expected in (
            ("loss", loss, ref_loss),
            ("risks", risks, ref_risks),
            ("var", risk_var, ref_var),
        ):
            error = (value.double() - expected.detach()).abs().max().item()
            assert error <= 1e-6 + 1e-4 * expected.detach().abs().max().item(), f"{name} ({options}): error {error:.3e}"
        assert_close_scaled(z.grad, ref.grad, 1e-4, f"gradient ({options})")
        if partition == "explicit":
            assert risks[[2, 3, 5]].tolist() == [0.0, 0.0, 0.0]
            assert torch.count_nonzero(z.grad[order[offsets[3] : offsets[4]]]) == 0  # the single member
        no_grad_loss, _, _, saved = GIRL(
            backend, features, labels, order, offsets, 0.07, 0.2, lambda_var, var_grad, detach, False
        )
        assert saved.shape[0] == 0
        torch.testing.assert_close(no_grad_loss, loss.detach())


def test_cpp_forward_without_gradient_and_wide_labels():
    """need_grad=False (no_grad / inference) gives the same loss; a backward then errors
    clearly. Labels beyond the int32 range are renumbered, not truncated."""
    if piumr_kernels.backends._availability("cpp", torch.device("cpu")):
        pytest.skip("cpp backend unavailable")
    features, labels = make_inputs(20, 8, num_classes=3)
    features, labels = features.cpu(), labels.cpu()
    wide = labels * (2**40) + 7  # 0, 2^40 + 7, 2^41 + 7: truncation to 32 bits would merge them
    kwargs = dict(num_groups=2, detach_weights=False)
    with use_backend("cpp"):
        with torch.no_grad():
            no_grad = girl_loss(features, wide, generator=torch.Generator().manual_seed(3), **kwargs)
        z = features.clone().requires_grad_()
        loss = girl_loss(z, wide, generator=torch.Generator().manual_seed(3), **kwargs)
        loss.backward()
        with use_backend("reference"):
            z_ref = features.clone().requires_grad_()
            ref = girl_loss(z_ref, labels, generator=torch.Generator().manual_seed(3), **kwargs)
            ref.backward()
    torch.testing.assert_close(no_grad, loss.detach())
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    assert_close_scaled(z.grad, z_ref.grad.double(), 1e-4, "gradient with wide labels")
    order, offsets = torch.arange(20), torch.tensor([0, 10, 20])
    z = features.clone().requires_grad_()
    loss, *_ = GIRL("cpp", z, labels, order, offsets, 0.07, 0.2, 1.0, True, True, False)
    with pytest.raises(RuntimeError, match="without need_grad"):
        loss.backward()


def test_opcheck_cpp():
    """torch.library.opcheck: schema, fake kernel, autograd registration of the cpp op."""
    if piumr_kernels.backends._availability("cpp", torch.device("cpu")):
        pytest.skip("cpp backend unavailable")
    features, labels = make_inputs(10, 6, num_classes=2)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    offsets = torch.tensor([0, 4, 4, 5, 10])  # an empty and a single-member group
    for detach in (True, False):
        for need_grad in (True, False):
            torch.library.opcheck(
                torch.ops.piumr_kernels.girl_cpp,
                (
                    features.cpu().requires_grad_(need_grad),
                    labels.cpu(),
                    order,
                    offsets,
                    0.1,
                    0.3,
                    0.5,
                    not detach,
                    detach,
                    need_grad,
                ),
            )


def test_anchors_without_positives(backend):
    features, labels = make_inputs(18, 10, num_classes=3)
    labels = labels.clone()
    labels[:6] = torch.arange(100, 106, device=DEVICE)  # six anchors whose label nobody shares
    check_against_reference(features, labels, 2, detach_weights=False)
    # No positive anywhere: every l_i is 0, so the loss and its gradient are exactly 0.
    z = features.clone().requires_grad_()
    loss = girl_loss(z, torch.arange(18, device=DEVICE), num_groups=3)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(z.grad) == 0


def test_explicit_groups(backend):
    features, labels = make_inputs(21, 12, num_classes=3)
    ids = torch.tensor([1, 0, 1, 0, 2, 2, 1, 0, 0, 1, 2, 1, 0, 1, 0, 2, 1, 0, 1, 1, 0], device=DEVICE)
    details = check_against_reference(features, labels, 3, groups=ids, detach_weights=False, var_grad=True)
    # Group g is the samples with id g.
    assert torch.equal(details["group_index"], ids)
    assert details["group_risks"].shape == (3,)


@pytest.mark.parametrize("var_grad", [True, False])
def test_groups_of_zero_and_one_member_are_left_out(backend, poisoned_empty, var_grad):
    """Groups 2 and 5 are empty, group 3 has one member: their risks are 0, they do not count
    in the mean or the variance, and the single member gets no gradient."""
    features, labels = make_inputs(26, 10, num_classes=3, seed=2)
    ids = torch.tensor(NONUNIFORM_GROUPS, device=DEVICE)
    z = features.clone().requires_grad_()
    loss, details = girl_loss(
        z, labels, 6, groups=ids, detach_weights=False, var_grad=var_grad, lambda_var=1.5, return_details=True
    )
    loss.backward()
    risks = details["group_risks"]
    assert risks[[2, 3, 5]].tolist() == [0.0, 0.0, 0.0] and bool((risks[[0, 1, 4]] != 0).all())
    counted = risks[[0, 1, 4]].double()
    mean, var = counted.mean(), counted.var(unbiased=False)
    torch.testing.assert_close(details["risk_var"].double(), var, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss.double(), mean + 1.5 * var, rtol=1e-5, atol=1e-7)
    assert torch.count_nonzero(z.grad[ids == 3]) == 0
    check_against_reference(features, labels, 6, groups=ids, detach_weights=False, var_grad=var_grad, lambda_var=1.5)


@pytest.mark.parametrize("batch,num_groups,sizes", [(7, 4, [3, 2, 2]), (3, 4, [3]), (1, 4, [1])])
def test_short_batch_uses_fewer_groups(backend, batch, num_groups, sizes):
    """2 * num_groups > B: max(1, B // 2) random groups instead (B = 1: one left-out group,
    loss 0 with a zero gradient)."""
    features, labels = make_inputs(batch, 6, num_classes=2, seed=batch)
    labels = torch.zeros_like(labels)  # every pair positive, so every counted group has a risk
    details = check_against_reference(features, labels, num_groups, detach_weights=False)
    assert torch.bincount(details["group_index"], minlength=len(sizes)).tolist() == sizes


def test_every_group_left_out_gives_zero_loss(backend, poisoned_empty):
    features, labels = make_inputs(5, 6, num_classes=2)
    for ids, num_groups in ((torch.arange(5), 5), (torch.tensor([0, 2, 4, 6, 7]), 9)):
        z = features.clone().requires_grad_()
        loss, details = girl_loss(z, labels, num_groups, groups=ids.to(DEVICE), return_details=True)
        loss.backward()
        assert loss.item() == 0.0 and details["risk_var"].item() == 0.0
        assert torch.count_nonzero(details["group_risks"]) == 0 and details["group_risks"].shape == (num_groups,)
        assert torch.count_nonzero(z.grad) == 0


def test_validate_rejects_group_ids_out_of_range():
    features, labels = make_inputs(6, 4, num_classes=2)
    for bad in ([0, 0, 1, 1, 3, 3], [0, 0, 1, 1, -1, -1]):
        groups = torch.tensor(bad, device=DEVICE)
        with pytest.raises(ValueError, match=r"groups: ids must lie in \[0, num_groups\) = \[0, 3\)"):
            girl_loss(features, labels, 3, groups=groups, validate=True)
        # Unvalidated, an id outside the range counts as the nearest valid one.
        unchecked = girl_loss(features, labels, 3, groups=groups, validate=False)
        clamped = girl_loss(features, labels, 3, groups=groups.clamp(0, 2))
        torch.testing.assert_close(unchecked, clamped)


def test_large_group_takes_streaming_path(backend, monkeypatch):
    if backend == "triton":
        from piumr_kernels.girl import triton_kernels

        # Small stand-ins for the GPU block sizes so the interpreter streams over several
        # partner blocks and feature chunks at a small shape.
        monkeypatch.setattr(triton_kernels, "MAX_TILE", 16)
        monkeypatch.setattr(triton_kernels, "PRODUCT_BLOCK_K", (16, 16))
        batch, width = 45, 40
        assert triton_kernels.tile_plan(batch, 1) == (16, 16)
    else:
        batch, width = 300, 12  # cpp: 256 x 256 tiles, so a diagonal, an off-diagonal and a ragged tile
    features, labels = make_inputs(batch, width, num_classes=5, seed=3)
    for detach_weights in (True, False):
        check_against_reference(features, labels, 1, detach_weights=detach_weights, var_grad=True)


@pytest.mark.parametrize("sizes", [[60, 4, 6], [5, 70, 1, 14], [1, 63]])
def test_triton_forward_band_reaches_larger_groups(sizes, monkeypatch):
    """The forward's band of column tiles covers the random partition's groups; explicit
    groups larger than that are reached by a program taking every span-th column tile after
    its first (its rows' partials merged across them). 16-wide tiles (a program target the
    band never reaches) make the group of 60 or 70 span more tiles than the band."""
    if reason := piumr_kernels.backends._availability("triton", torch.device(DEVICE)):
        pytest.skip(reason)
    from piumr_kernels.girl import triton_kernels
    from piumr_kernels.launch_state import zeroed_tickets

    monkeypatch.setattr(triton_kernels, "TARGET_PROGRAMS", 10_000)
    batch, num_groups = sum(sizes), len(sizes)
    block_m, block_n = triton_kernels.tile_plan(batch, num_groups)
    assert (block_m, block_n) == (16, 16)
    span = triton_kernels.tile_span(batch, num_groups, block_n)
    assert max(sizes) > span * block_n - block_n  # some tile's partners lie beyond its band
    ids = torch.repeat_interleave(torch.arange(num_groups), torch.tensor(sizes))
    ids = ids[torch.randperm(batch, generator=torch.Generator().manual_seed(1))].to(DEVICE)
    features, labels = make_inputs(batch, 20, num_classes=3, seed=len(sizes))
    with use_backend("triton"):
        for detach_weights in (True, False):
            check_against_reference(features, labels, num_groups, groups=ids, detach_weights=detach_weights)
    # Every ticket is back at zero for the next launch.
    assert not zeroed_tickets(features, triton_kernels.triton.cdiv(batch, block_n) + 1).any()


# (B, G, threads): groups above the cpp tile side (256) are streamed over tiles I <= J,
# split into one chunk per thread. Three row blocks with a 3-row remainder (515 = 2 * 256
# + 3), two streamed groups of 300, a 256-sample group (one tile, kept whole) next to a
# 257-sample one (streamed, a 1-row remainder), and whole groups of 130 and 129 (4-row
# Gram blocks with a 2- and a 1-row remainder).
@pytest.mark.parametrize("batch,num_groups,threads", [(515, 1, 1), (515, 1, 2), (600, 2, 2), (513, 2, 2), (259, 2, 1)])
def test_cpp_streaming_tiles(batch, num_groups, threads):
    if piumr_kernels.backends._availability("cpp", torch.device("cpu")):
        pytest.skip("cpp backend unavailable")
    features, labels = make_inputs(batch, 10, num_classes=7, seed=4)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with use_backend("cpp"):
            for detach_weights, var_grad in ((True, True), (False, False)):
                check_against_reference(
                    features.cpu(),
                    labels.cpu(),
                    num_groups,
                    detach_weights=detach_weights,
                    var_grad=var_grad,
                    tau=0.1,
                    eta=0.3,
                    lambda_var=2.0,
                )
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_group_sizes_every_gram_block_remainder(isa, dtype, monkeypatch):
    """The cpp cosines of a whole group come in 4 x 4 blocks of rows (the last block repeats
    the last row): groups of 2, 3, 5, 6, 7 and 8 members cover every remainder, and a width
    of 37 a ragged vector tail, on each instruction set."""
    if piumr_kernels.backends._availability("cpp", torch.device("cpu")):
        pytest.skip("cpp backend unavailable")
    monkeypatch.setenv("PIUMR_KERNELS_CPU_ISA", isa)
    sizes = [2, 3, 5, 6, 7, 8]
    ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    ids = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(2))]
    features, labels = make_inputs(len(ids), 37, num_classes=2, dtype=dtype, seed=8)
    with use_backend("cpp"):
        details = check_against_reference(
            features.cpu(),
            labels.cpu(),
            len(sizes),
            groups=ids,
            detach_weights=False,
            var_grad=True,
            tau=0.1,
            eta=0.3,
            lambda_var=1.5,
        )
    assert torch.bincount(details["group_index"]).tolist() == sizes


# (B, C, G): the cpp gradient products H F take 4-row blocks of H against blocks of 64
# float (32 double) columns of F, then a plain loop over the remaining columns. Groups of
# 13 (a 1-row remainder) at widths 100 (full blocks and a tail) and 128 (no tail), and a
# streamed group of 300 at width 70, whose off-diagonal 256 x 44 tile also runs the
# transposed product.
@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,width,num_groups", [(26, 100, 2), (26, 128, 2), (300, 70, 1)])
def test_cpp_gradient_products_every_block_remainder(isa, dtype, batch, width, num_groups, monkeypatch):
    if piumr_kernels.backends._availability("cpp", torch.device("cpu")):
        pytest.skip("cpp backend unavailable")
    monkeypatch.setenv("PIUMR_KERNELS_CPU_ISA", isa)
    features, labels = make_inputs(batch, width, num_classes=4, dtype=dtype, seed=12)
    with use_backend("cpp"):
        check_against_reference(
            features.cpu(),
            labels.cpu(),
            num_groups,
            detach_weights=False,
            var_grad=True,
            tau=0.1,
            eta=0.3,
            lambda_var=1.5,
        )


def test_zero_feature_rows_stay_finite(backend):
    features, labels = make_inputs(16, 8, num_classes=2)
    features[[0, 5, 9]] = 0.0
    check_against_reference(features, labels, 2, detach_weights=False)


@pytest.mark.parametrize("backend_name", ["reference", "cpp"])
@pytest.mark.parametrize("detach_weights,var_grad,lambda_var", [(False, True, 1.5), (False, False, 0.0)])
def test_gradcheck_float64(backend_name, detach_weights, var_grad, lambda_var):
    """Exact gradients where the options make the gradient the true derivative of the loss
    (detached weights or a detached variance are, by design, not differentiated)."""
    if not piumr_kernels.info()["backends"][backend_name]["available"]:
        pytest.skip(f"{backend_name} backend unavailable")
    features, labels = make_inputs(9, 5, num_classes=2, dtype=torch.float64)
    # Group 2 is empty and group 3 has one member (both left out).
    for ids, num_groups in (([0, 1, 0, 1, 1, 0, 0, 1, 1], 2), ([0, 1, 0, 1, 1, 0, 3, 1, 0], 4)):
        groups = torch.tensor(ids, device=DEVICE)

        def loss_fn(z, num_groups=num_groups, groups=groups):
            return girl_loss(
                z,
                labels,
                num_groups,
                tau=0.5,
                eta=0.4,
                lambda_var=lambda_var,
                var_grad=var_grad,
                detach_weights=detach_weights,
                groups=groups,
            )

        with use_backend(backend_name):
            assert torch.autograd.gradcheck(loss_fn, (features.clone().requires_grad_(),))


def test_flat_emphasis_single_group_is_supcon(backend):
    """eta -> inf, G = 1: every weight is 1 and the loss is SupCon over the batch."""
    features, labels = make_inputs(20, 6, num_classes=3, seed=11)
    labels[0] = 50  # an anchor without positives: contributes 0, still counts
    tau = 0.2
    loss = girl_loss(features, labels, num_groups=1, tau=tau, eta=1e6)

    f = torch.nn.functional.normalize(features.double(), dim=1)
    total = 0.0
    for i in range(20):
        others = [j for j in range(20) if j != i]
        logits = torch.stack([f[i] @ f[j] / tau for j in others])
        log_prob = logits - torch.logsumexp(logits, dim=0)
        positives = [k for k, j in enumerate(others) if labels[j] == labels[i]]
        if positives:
            total += -log_prob[positives].mean()
    supcon = total / 20
    torch.testing.assert_close(loss.double(), torch.as_tensor(supcon, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_var_grad_false_gradient_is_mean_risk_gradient(backend):
    features, labels = make_inputs(24, 8, num_classes=3)
    grads, losses, details = [], [], []
    for lambda_var in (3.0, 0.0):
        z = features.clone().requires_grad_()
        loss, d = girl_loss(
            z,
            labels,
            num_groups=4,
            lambda_var=lambda_var,
            var_grad=False,
            generator=torch.Generator().manual_seed(2),
            return_details=True,
        )
        loss.backward()
        grads.append(z.grad)
        losses.append(loss.detach())
        details.append(d)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    # ...while the penalty is still in the loss value.
    assert details[0]["risk_var"] > 0
    torch.testing.assert_close(losses[0], losses[1] + 3.0 * details[0]["risk_var"], rtol=1e-5, atol=1e-6)


def test_same_seed_same_groups_on_every_backend():
    features, labels = make_inputs(23, 8, num_classes=3)
    seen = {}
    for name in piumr_kernels.backends.BACKENDS:
        if piumr_kernels.backends._availability(name, torch.device(DEVICE)):
            continue
        with use_backend(name):
            _, details = girl_loss(
                features, labels, num_groups=4, generator=torch.Generator().manual_seed(9), return_details=True
            )
        seen[name] = details["group_index"]
    assert len(seen) >= 2
    first = next(iter(seen.values()))
    assert all(torch.equal(first, index) for index in seen.values())
    # tensor_split sizes: 23 = 6 + 6 + 6 + 5, and a fresh permutation per call without a generator.
    assert torch.bincount(first).tolist() == [6, 6, 6, 5]
    _, other = girl_loss(
        features, labels, num_groups=4, generator=torch.Generator().manual_seed(10), return_details=True
    )
    assert not torch.equal(first, other["group_index"])


def test_partitions_sort_samples_by_group():
    order, offsets = random_partition(11, 3, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert offsets.tolist() == [0, 4, 8, 11] and sorted(order.tolist()) == list(range(11))
    group_index = group_index_of(order, offsets)
    assert torch.equal(group_index[order], torch.tensor([0] * 4 + [1] * 4 + [2] * 3))
    order, offsets = explicit_partition(torch.tensor([3, 1, 3, 1, 1]), 5)
    assert offsets.tolist() == [0, 0, 3, 3, 5, 5] and order.tolist() == [1, 3, 4, 0, 2]
    assert group_index_of(order, offsets).tolist() == [3, 1, 3, 1, 1]


def test_triton_keeps_the_random_partition_offsets_but_never_fake_ones():
    """The triton backend builds the random partition's boundaries once per (B, G, device)
    (tensor_split sizes, as the other backends); a fake input builds its own, caching nothing."""
    if backends_reason := piumr_kernels.backends._availability("triton", torch.device(DEVICE)):
        pytest.skip(backends_reason)
    from torch._subclasses.fake_tensor import FakeTensorMode

    from piumr_kernels.girl import triton_kernels

    triton_kernels.partition_offsets.cache_clear()
    with FakeTensorMode():
        fake = triton_kernels.partition_offsets(23, 4, torch.empty(1, device="meta"))
    assert triton_kernels.partition_offsets.cache_info().currsize == 0 and fake.device.type == "meta"
    features, labels = make_inputs(23, 4, num_classes=3)
    with use_backend("triton"):
        _, details = girl_loss(features, labels, 4, generator=torch.Generator().manual_seed(3), return_details=True)
    offsets = triton_kernels.partition_offsets(23, 4, features)
    assert triton_kernels.partition_offsets(23, 4, features) is offsets
    assert offsets.tolist() == [0, 6, 12, 18, 23] == [0, *torch.bincount(details["group_index"]).cumsum(0).tolist()]
    _, expected = random_partition(23, 4, features.device)
    assert torch.equal(offsets, expected)


def test_module_matches_function():
    features, labels = make_inputs(16, 8, num_classes=2)
    module = GIRLLoss(num_groups=2, tau=0.1, eta=0.3, lambda_var=0.5, var_grad=False, detach_weights=False)
    expected = girl_loss(features, labels, 2, 0.1, 0.3, 0.5, False, False, generator=torch.Generator().manual_seed(4))
    got = module(features, labels, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(got, expected)
    assert "num_groups=2" in repr(module)


BAD_INPUTS = [
    (dict(features=torch.randn(4, 3, 2)), ValueError, "features must be 2-D"),
    (dict(features=torch.randint(0, 3, (8, 4))), TypeError, "features must have a floating dtype"),
    (dict(labels=torch.zeros(8)), TypeError, "labels must have an integer dtype"),
    (dict(labels=torch.zeros(8, dtype=torch.bool)), TypeError, "labels must have an integer dtype"),
    (dict(labels=torch.zeros(7, dtype=torch.long)), ValueError, "labels must be 1-D of length 8"),
    (dict(labels=torch.zeros(8, 1, dtype=torch.long)), ValueError, "labels must be 1-D of length 8"),
    (dict(num_groups=0), ValueError, "num_groups must be >= 1"),
    (dict(features=torch.randn(0, 4), labels=torch.zeros(0, dtype=torch.long)), ValueError, "at least one row"),
    (dict(num_groups=2.0), TypeError, "num_groups must be an int"),
    (dict(tau=0.0), ValueError, "tau must be > 0"),
    (dict(tau=-1.0), ValueError, "tau must be > 0"),
    (dict(eta=0.0), ValueError, "eta must be > 0"),
    (dict(lambda_var=-1.0), ValueError, "lambda_var must be >= 0"),
    (
        dict(groups=torch.tensor([0, 0, 1, 1, 2, 2, 2, 4]), validate=True),
        ValueError,
        r"groups: ids must lie in .*\[0, 4\)",
    ),
    (dict(groups=torch.zeros(7, dtype=torch.long)), ValueError, "groups must be 1-D of length 8"),
    (dict(groups=torch.zeros(8)), TypeError, "groups must have an integer dtype"),
    (dict(labels=torch.zeros(8, dtype=torch.long, device="meta")), ValueError, "same device"),
]


@pytest.mark.parametrize("override,error,message", BAD_INPUTS)
def test_bad_input_errors(override, error, message):
    arguments = dict(features=torch.randn(8, 4), labels=torch.zeros(8, dtype=torch.long))
    arguments.update(override)
    with pytest.raises(error, match=message):
        girl_loss(**arguments)


@pytest.fixture
def interpreter_rounds_tf32(monkeypatch):
    """Triton's interpreter multiplies fp32 dot operands exactly whatever the precision; round
    them to TF32 (10-bit mantissa, to nearest) as tensor cores do, so the TF32 tolerance is
    checked on CPU too. On a GPU the hardware rounds."""
    if torch.cuda.is_available():
        return
    import numpy as np
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def tf32(handle):
        bits = handle.data.view(np.int32)
        return interpreter.TensorHandle(((bits + 0x1000) & ~0x1FFF).view(np.float32), handle.dtype.scalar)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.data.dtype == np.float32 and "IEEE" not in str(input_precision).upper():
            a, b = tf32(a), tf32(b)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


# fp32 products: exact ("ieee") within 1e-5 of fp64; TF32 (the default) loss within 1e-3
# relative and gradients within 5e-3 of the largest entry (piumr_kernels/girl/precision.py).
@pytest.mark.parametrize("precision, loss_tol, grad_tol", [("ieee", 1e-5, 1e-5), ("tf32", 1e-3, 5e-3)])
def test_triton_fp32_precision(interpreter_rounds_tf32, precision, loss_tol, grad_tol):
    if backends_reason := piumr_kernels.backends._availability("triton", torch.device(DEVICE)):
        pytest.skip(backends_reason)
    from piumr_kernels.girl import set_triton_fp32_precision, triton_fp32_precision

    features, labels = make_inputs(40, 72, num_classes=3, seed=8)
    saved = triton_fp32_precision()
    set_triton_fp32_precision(precision)
    try:
        z = features.clone().requires_grad_()
        with use_backend("triton"):
            loss, details = girl_loss(
                z, labels, 2, detach_weights=False, return_details=True, generator=torch.Generator().manual_seed(2)
            )
        (loss * 1.3).backward()
    finally:
        set_triton_fp32_precision(saved)
    ref_loss, ref_risks, _, ref_grad = fp64_reference(features, labels, details["group_index"], 2, detach_weights=False)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=loss_tol, atol=0.0)
    torch.testing.assert_close(details["group_risks"].double(), ref_risks, rtol=loss_tol, atol=0.0)
    assert_close_scaled(z.grad, ref_grad * 1.3, grad_tol, f"gradient ({precision})")


def test_triton_fp32_precision_rejects_unknown_modes():
    from piumr_kernels.girl import set_triton_fp32_precision

    with pytest.raises(ValueError, match="precision must be one of"):
        set_triton_fp32_precision("fp16")


def test_triton_refuses_float64():
    if backends_reason := piumr_kernels.backends._availability("triton", torch.device(DEVICE)):
        pytest.skip(backends_reason)
    features, labels = make_inputs(8, 4, num_classes=2, dtype=torch.float64)
    with use_backend("triton"), pytest.raises(TypeError, match="float64"):
        girl_loss(features, labels, num_groups=2)


@pytest.mark.parametrize("backend_name", ["reference", "cpp"])
def test_torch_compile_fullgraph(backend_name):
    if piumr_kernels.backends._availability(backend_name, torch.device("cpu")):
        pytest.skip(f"{backend_name} backend unavailable")
    torch._dynamo.reset()
    features, labels = make_inputs(20, 8, num_classes=3)
    features = features.cpu()
    labels = labels.cpu()

    def step(z, y):
        loss, details = girl_loss(z, y, num_groups=3, detach_weights=False, return_details=True)
        return loss, details["group_index"]

    compiled = torch.compile(step, fullgraph=True)
    z = features.clone().requires_grad_()
    with use_backend(backend_name):
        loss, group_index = compiled(z, labels)
        loss.backward()
    ref_loss, _, _, ref_grad = fp64_reference(features, labels, group_index, 3, detach_weights=False)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-6)
    assert_close_scaled(z.grad, ref_grad, 1e-4, "compiled gradient")


def test_triton_wide_gradient_slices_match_fp64(monkeypatch):
    """The gradient's slices of 256 features (picked where the grid fills the GPU anyway; here
    forced by a program target of 1), the last one partial, against the fp64 reference."""
    if backends_reason := piumr_kernels.backends._availability("triton", torch.device(DEVICE)):
        pytest.skip(backends_reason)
    from piumr_kernels.girl import triton_kernels

    monkeypatch.setattr(triton_kernels, "TARGET_PROGRAMS", 1)
    assert triton_kernels.gradient_plan(24, 300)[2] == 256
    features, labels = make_inputs(24, 300, num_classes=3, seed=11)
    with use_backend("triton"):
        check_against_reference(features, labels, 2, detach_weights=False, tau=0.1, eta=0.3)


def test_aot_variants_cover_every_launch_choice():
    """tools/triton_static_check.py compiles aot_variants(); every tile plan the launchers can
    pick must be listed there with every autotuned config (the forward and both gradient
    variants, every dtype and fp32 product precision)."""
    triton_kernels = pytest.importorskip("piumr_kernels.girl.triton_kernels")
    names = {variant.name for variant in triton_kernels.aot_variants()}
    plans = {triton_kernels.tile_plan(batch, groups) for batch in range(1, 20000, 37) for groups in (1, 2, 8, 64, 500)}
    assert plans == set(triton_kernels.FORWARD_PLANS)
    gradient_plans = {
        triton_kernels.gradient_plan(batch, width) for batch in range(1, 20000, 37) for width in range(1, 5000, 97)
    }
    assert {plan[2] for plan in gradient_plans} == set(triton_kernels.GRAD_SLICES) and len(gradient_plans) == 3

    def configs(kernel):
        return [
            f"NUM_STAGES={c.kwargs['NUM_STAGES']},warps={c.num_warps},stages={c.num_stages}]"
            for c in kernel.tuning_configs
        ]

    for dtype in ("fp32", "fp16", "bf16"):
        for precision in ("tf32", "ieee"):
            for block_m, block_n in plans:
                for config in configs(triton_kernels._forward_kernels[block_m, block_n]):
                    assert f"girl.forward[{dtype},{precision},BLOCK_M={block_m},BLOCK_N={block_n},{config}" in names
            for block_m, block_n, slice_width in gradient_plans:
                plan = f"{dtype},{precision},BLOCK_M={block_m},BLOCK_N={block_n},SLICE={slice_width}"
                for detach in (True, False):
                    for config in configs(triton_kernels._gradient_kernels[slice_width]):
                        assert f"girl.gradient[{plan},DETACH_WEIGHTS={detach},{config}" in names


@pytest.mark.parametrize("index", [1])
def test_triton_every_autotuned_config_matches_fp64(index, monkeypatch):
    """Config `index` of every autotuned GIRL kernel (what a GPU may pick; the rest of the
    suite runs the first), forward and backward, at shapes that reach every tile plan (the
    32- and 64-wide forward tiles at a program target of 1) and every gradient slice."""
    if backends_reason := piumr_kernels.backends._availability("triton", torch.device(DEVICE)):
        pytest.skip(backends_reason)
    from piumr_kernels import triton_autotune
    from piumr_kernels.girl import triton_kernels

    kernels = triton_autotune.autotuned_kernels(triton_kernels)
    assert len(kernels) == len(triton_kernels.FORWARD_PLANS) + len(triton_kernels.GRAD_SLICES)
    assert max(len(kernel.tuning_configs) for kernel in kernels) == 2  # every index is tested
    cases = [(20, 24, 1, 132), (30, 24, 1, 1), (24, 300, 2, 132), (70, 40, 1, 1)]  # (B, C, G, target)
    plans, slices = set(), set()
    with contextlib.ExitStack() as stack:
        for kernel in kernels:
            configs = kernel.tuning_configs
            stack.enter_context(triton_autotune.use_config(kernel, configs[min(index, len(configs) - 1)]))
        stack.enter_context(use_backend("triton"))
        for batch, width, num_groups, target in cases:
            monkeypatch.setattr(triton_kernels, "TARGET_PROGRAMS", target)
            plans.add(triton_kernels.tile_plan(batch, num_groups))
            slices.add(triton_kernels.gradient_plan(batch, width)[2])
            features, labels = make_inputs(batch, width, num_classes=3, seed=batch)
            check_against_reference(features, labels, num_groups, detach_weights=False, tau=0.1, eta=0.3)
    assert plans == set(triton_kernels.FORWARD_PLANS) and slices == set(triton_kernels.GRAD_SLICES)


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_cpp_cpu_isa_variants(isa, monkeypatch):
    """The vectorized cpp kernels are compiled per instruction set; the narrower variants
    (picked here with PIUMR_KERNELS_CPU_ISA) must agree too: whole and streamed groups."""
    if piumr_kernels.backends._availability("cpp", torch.device("cpu")):
        pytest.skip("cpp backend unavailable")
    monkeypatch.setenv("PIUMR_KERNELS_CPU_ISA", isa)
    with use_backend("cpp"):
        for batch, num_groups in ((40, 4), (300, 1)):
            features, labels = make_inputs(batch, 10, num_classes=5, seed=6)
            check_against_reference(
                features.cpu(), labels.cpu(), num_groups, detach_weights=False, var_grad=True, tau=0.1, eta=0.3
            )
