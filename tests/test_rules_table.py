"""Every rule and option, on the table in cases.py, against the torch.func reference (float64)."""

import pytest
import torch

import fxclip
from fxclip.reference import clipped_sum, naive_per_example_grads
from cases import CASES, FALLBACK_CASES, WritesWithOut
from helpers import check_against_reference, mean_loss, on_device, relative_error, sum_loss, targets_for


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_case_matches_reference(case):
    g = torch.Generator().manual_seed(1)
    model = on_device(case.model().double())
    for loss_fn in (sum_loss, mean_loss):
        t = fxclip.transform(model, loss_fn, max_grad_norm=0.7, batch_dims=case.batch_dims)
        for batch in (1, 5):
            inputs = on_device(case.inputs(batch, g))
            targets = targets_for(model, inputs, case.batch_dims, g)
            for strategy in ("ghost", "materialize"):
                t.strategy = strategy
                check_against_reference(t, inputs, targets, case.batch_dims)
    used_fallback = bool(t.fallbacks)
    assert used_fallback == (case.name in FALLBACK_CASES), t.fallbacks


@pytest.mark.parametrize("case", [c for c in CASES if c.name in {"conv2d_groups", "tied_embedding_output", "linear_leading_dims"}], ids=lambda c: c.name)
def test_float32_within_1e4(case):
    g = torch.Generator().manual_seed(2)
    model = on_device(case.model().float())
    t = fxclip.transform(model, sum_loss, max_grad_norm=0.5)
    inputs = on_device(tuple(x.float() if x.is_floating_point() else x for x in case.inputs(6, g)))
    targets = targets_for(model, inputs, case.batch_dims, g)
    check_against_reference(t, inputs, targets, rtol=1e-4)


@pytest.mark.parametrize("chunk_elements", [1 << 20, 1], ids=["whole", "chunked"])
@pytest.mark.parametrize("case", [c for c in CASES if c.name.startswith("conv")], ids=lambda c: c.name)
def test_conv_per_example_kernel_matches_reference(case, chunk_elements, monkeypatch):
    """The table's convs are small, so their per-example gradients come from patches; with the
    threshold at 0 they come from the conv kernel with examples as groups, which must agree too,
    also when the kernel runs one group at a time."""
    import fxclip.rules.conv

    monkeypatch.setattr(fxclip.rules.conv, "PATCHES_MAX_ENTRIES", 0)
    monkeypatch.setattr(fxclip.rules.conv, "WEIGHT_GRAD_CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(3)
    model = on_device(case.model().double())
    t = fxclip.transform(model, sum_loss, max_grad_norm=0.7, strategy="materialize", batch_dims=case.batch_dims)
    inputs = on_device(case.inputs(5, g))
    check_against_reference(t, inputs, targets_for(model, inputs, case.batch_dims, g), case.batch_dims)


def test_out_writes_match_the_per_example_loop():
    """torch.func cannot vmap out= ops, so this case's reference is one backward per example."""
    g = torch.Generator().manual_seed(4)
    model = WritesWithOut().double()
    x = torch.randn(5, 6, generator=g, dtype=torch.float64)
    y = targets_for(model, (x,), (0,), g)
    result = fxclip.transform(model, sum_loss, max_grad_norm=0.7).step(x, y)
    norms, sums = clipped_sum(naive_per_example_grads(model, sum_loss, (x,), y), 0.7)
    assert relative_error(result.norms, norms) <= 1e-8
    for name, p in model.named_parameters():
        assert relative_error(p.grad, sums[name]) <= 1e-8, name
