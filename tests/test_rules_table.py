"""Every rule and option, on the table in cases.py, against the torch.func reference (float64)."""

import pytest
import torch

import fxclip
from fxclip.reference import clipped_sum, naive_per_example_grads
from cases import CASES, WritesWithOut
from helpers import check_against_reference, mean_loss, on_device, relative_error, sum_loss, targets_for


LOSSES = {"sum": sum_loss, "mean": mean_loss}
# tracing a vmap over examples (the per-op fallback's, or a general component's chain of two
# overlapping slices of one weight) fixes the batch size: these steps keep running the program
UNTRACEABLE = {"overlapping_slices", "fallback_bilinear", "fallback_bilinear_seq_first"}
COMBINATIONS = [
    pytest.param(case, loss, batch, strategy, id=f"{case.name}-{loss}-B{batch}-{strategy}")
    for case in CASES for loss in LOSSES for batch in (1, 5) for strategy in ("ghost", "materialize")
]


@pytest.fixture(scope="module")
def captured():
    """`captured(case, loss)`: the case's step under that loss, made once for both batch sizes and
    both strategies (a capture takes most of a combination's time); only one case's are kept."""
    steps: dict = {}

    def get(case, loss):
        if steps.get("case") is not case:
            steps.clear()
            steps["case"] = case
        if loss not in steps:
            torch.manual_seed(0)
            model = on_device(case.model().double())
            steps[loss] = fxclip.transform(model, LOSSES[loss], max_grad_norm=0.7, batch_dims=case.batch_dims)
        return steps[loss]

    return get


def routes(t: fxclip.PrivateStep) -> set[str]:
    """The rule each parameter use took in the last step ("fallback": the per-op fallback)."""
    return {"fallback" if e.strategy == "fallback" else e.use.rule.name for e in t.program.plan}


@pytest.mark.parametrize("case, loss, batch, strategy", COMBINATIONS)
def test_case(case, loss, batch, strategy, captured):
    """Norms and clipped sums match the reference, and every use took the route the table expects."""
    t = captured(case, loss)
    t.strategy = strategy
    g = torch.Generator().manual_seed(batch)
    inputs = on_device(case.inputs(batch, g))
    check_against_reference(t, inputs, targets_for(t.model, inputs, case.batch_dims, g), case.batch_dims)
    expected = case.expect.split()
    decomposed = {label.removeprefix("decomposed:") for label in expected if label.startswith("decomposed:")}
    assert routes(t) == set(expected) - {f"decomposed:{op}" for op in decomposed}
    left = {str(n.target) for n in t.program.forward.graph.nodes} & {f"aten.{op}.default" for op in decomposed}
    assert not left, f"not written out: {left}"
    if case.name not in UNTRACEABLE:  # the step graph, not the program, ran its later steps
        assert not any(c.step.compile_failed for c in t.captures)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in {"conv2d_groups", "tied_embedding_output", "linear_leading_dims"}], ids=lambda c: c.name)
def test_float32_within_1e4(case):
    g = torch.Generator().manual_seed(2)
    model = on_device(case.model().float())
    t = fxclip.transform(model, sum_loss, max_grad_norm=0.5)
    inputs = on_device(tuple(x.float() if x.is_floating_point() else x for x in case.inputs(6, g)))
    targets = targets_for(model, inputs, case.batch_dims, g)
    check_against_reference(t, inputs, targets, rtol=1e-4)


@pytest.mark.parametrize("offsets_max_in_channels, chunk_elements", [(0, 1 << 20), (0, 1), (64, 1 << 20)],
                         ids=["kernel", "kernel_chunked", "per_offset"])
@pytest.mark.parametrize("case", [c for c in CASES if {"conv", "conv_transpose"} & set(c.expect.split())], ids=lambda c: c.name)
def test_conv_per_example_kernel_matches_reference(case, offsets_max_in_channels, chunk_elements, monkeypatch):
    """The table's convs are small, so their per-example gradients come from patches; with the
    threshold at 0 they come from the conv kernel with examples as groups (also when the kernel
    runs one group at a time) or from one product per kernel offset, which must agree too."""
    import fxclip.rules.conv

    monkeypatch.setattr(fxclip.rules.conv, "PATCHES_MAX_ENTRIES", 0)
    monkeypatch.setattr(fxclip.rules.conv, "OFFSETS_MAX_IN_CHANNELS", offsets_max_in_channels)
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
