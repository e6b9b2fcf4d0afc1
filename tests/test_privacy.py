"""The privacy property itself: removing any one example moves the clipped sum by at most C."""

import warnings

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


# Models whose examples may reach each other through an index or an op fxclip does not know. Each is
# refused with ExampleMixingError (nothing written), or runs and then moves the clipped sum by at
# most C when an example is removed and 2C when one is replaced, measured. `partner` pairs examples.
class Indexed(torch.nn.Module):
    def __init__(self, mix):
        super().__init__()
        self.l1, self.l2, self.mix = torch.nn.Linear(5, 6), torch.nn.Linear(6, 3), mix

    def forward(self, x, index):
        return self.l2(self.mix(torch.tanh(self.l1(x)), index))


class Branching(Indexed):
    """Python control flow on a value: torch.export cannot capture it (the whole-model fallback)."""

    def forward(self, x, index):
        h = torch.tanh(self.l1(x))
        return self.l2(self.mix(h, index) if float(h.sum()) > -1e9 else h)


def partner_of(x):
    return torch.arange(x.shape[0]).view(-1, 2).flip(1).flatten()  # 1, 0, 3, 2, ...


ce_on_first = lambda o, y: F.cross_entropy(o, y[:, 0], reduction="none")  # noqa: E731
MIXING = {
    # (model class, what the model does with the index, loss_fn, refused)
    "partner_input": (Indexed, lambda h, i: h + 3.0 * h[i[:, 1]], ce_on_first, True),
    "partner_in_loss": (Indexed, lambda h, i: h, lambda o, y: ((o - o[y[:, 1]]) ** 2).sum(1), True),
    "index_select_input": (Indexed, lambda h, i: h.index_select(0, i[:, 1]), ce_on_first, True),
    "gather_input": (Indexed, lambda h, i: h + h.gather(0, i[:, 1:].expand(-1, h.shape[1])), ce_on_first, True),
    "scatter_input": (Indexed, lambda h, i: h + torch.zeros_like(h).index_add(0, i[:, 1], h), ce_on_first, True),
    "index_put_input": (Indexed, lambda h, i: h.index_put((i[:, 1],), 2 * h), ce_on_first, True),
    "renorm_over_batch": (Indexed, lambda h, i: torch.renorm(h, 2, 1, 0.5), ce_on_first, True),
    "partner_whole_model": (Branching, lambda h, i: h + 3.0 * h[i[:, 1]], ce_on_first, True),
    # within each example: they train, and the bound holds
    "own_row_and_column": (Indexed, lambda h, i: h + h[torch.arange(h.shape[0]), i[:, 0] % 6, None], ce_on_first, False),
    "gather_within_example": (Indexed, lambda h, i: h + h.gather(1, i[:, :1] % 6), ce_on_first, False),
    "whole_model_within_example": (Branching, lambda h, i: h * h[torch.arange(h.shape[0]), i[:, 0] % 6, None], ce_on_first, False),
}


def mixing_batch(n, g):
    x = torch.randn(n, 5, generator=g, dtype=torch.float64) * 30  # large: every example clips
    index = torch.stack([torch.randint(0, 3, (n,), generator=g), partner_of(x)], 1)
    return x, index


@pytest.mark.parametrize("name", list(MIXING))
def test_examples_reaching_each_other_are_refused_or_bounded(name):
    cls, mix, loss_fn, refused = MIXING[name]
    torch.manual_seed(0)
    model = cls(mix).double()
    g = torch.Generator().manual_seed(5)
    x, index = mixing_batch(8, g)
    # the index is an input (the model reads it) and the targets (the loss reads it)
    t = fxclip.transform(model, loss_fn, max_grad_norm=C)
    if refused:
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        with pytest.raises(fxclip.ExampleMixingError):
            t.step((x, index), index)
        assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxclip.FallbackWarning)
        full = clipped_sum(model, t, (x, index), index)
        assert (t.step((x, index), index).norms > C).all()
        for i in range(8):
            keep = [j for j in range(8) if j != i]
            without = clipped_sum(model, t, (x[keep], index[keep]), index[keep])
            assert (full - without).norm() <= C * (1 + 1e-6), i
            x2, index2 = x.clone(), index.clone()
            x2[i], index2[i, 0] = torch.randn(5, generator=g, dtype=torch.float64) * 30, (index[i, 0] + 1) % 3
            replaced = clipped_sum(model, t, (x2, index2), index2)
            assert (full - replaced).norm() <= 2 * C * (1 + 1e-6), i
