"""The privacy property itself: removing any one example moves the clipped sum by at most C."""

import pytest
import torch
import torch.nn.functional as F

import fxclip
from fxclip.zoo import ZOO

C = 0.8


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def clipped_sum(model, t, inputs, targets):
    for p in model.parameters():
        p.grad = None
    t.step(inputs, targets)
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("name", ["mlp", "small_cnn", "depthwise", "bow", "tied"])
def test_removing_one_example_moves_the_sum_by_at_most_c(name):
    entry = ZOO[name]
    model = entry.factory().double()
    g = torch.Generator().manual_seed(3)
    (x,), y = entry.make_batch(6, g)
    if x.is_floating_point():
        x = x.double()
        x[2] *= 1e3  # an outlier whose unclipped gradient is huge
    t = fxclip.transform(model, ce, max_grad_norm=C)
    full = clipped_sum(model, t, (x,), y)
    res = t.step((x,), y)
    assert (res.norms > C).any(), "the batch should need clipping for this test to mean anything"
    for i in range(6):
        keep = [j for j in range(6) if j != i]
        without = clipped_sum(model, t, (x[keep],), y[keep])
        assert (full - without).norm() <= C * (1 + 1e-5), i


def test_outlier_contributes_exactly_c():
    entry = ZOO["mlp"]
    model = entry.factory().double()
    g = torch.Generator().manual_seed(4)
    (x,), y = entry.make_batch(4, g)
    x = x.double()
    x[0] *= 1e3
    t = fxclip.transform(model, ce, max_grad_norm=C)
    full = clipped_sum(model, t, (x,), y)
    alone = clipped_sum(model, t, (x[:1],), y[:1])
    rest = clipped_sum(model, t, (x[1:],), y[1:])
    torch.testing.assert_close(full, alone + rest, rtol=1e-10, atol=1e-12)
    assert abs(alone.norm() - C) <= 1e-5 * C
