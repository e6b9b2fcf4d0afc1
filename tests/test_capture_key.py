"""A capture fixes everything but the batch size: a step whose model or batch differs in what a
capture fixed (fxclip.capture_key) captures again and matches the torch.func reference."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxclip
from fxclip import captures

from helpers import check_against_reference


class Tagger(nn.Module):
    """Tokens' features plus a positional bias sliced to the length, averaged over the length,
    and a scale attribute."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 8, 4))
        self.mix, self.act, self.head = nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)
        self.scale = 1.0

    def forward(self, x):
        h = self.mix(x + self.pos[:, : x.shape[1]])
        return self.scale * self.head(self.act(h)).mean(1)


def weighted(out, y):
    return y["w"] * ((out - y["target"]) ** 2).sum(1)


def _batch(length=4, w=1.0, keys=("target", "w")):
    x = torch.randn(5, length, 4, dtype=torch.float64)
    y = {"target": torch.randn(5, 3, dtype=torch.float64), "w": w}
    return (x,), {k: y[k] for k in keys}


def _freeze_head(m):
    m.head.weight.requires_grad_(False)


def _swap_activation(m):
    m.act = nn.Tanh()


def _set_scale(m):
    m.scale = 2.5


def _add_a_layer(m):
    m.head = nn.Sequential(nn.Linear(5, 3), nn.Tanh()).double()


CHANGES = {
    "sequence length": (None, _batch(length=6)),
    "a Python number in the targets": (None, _batch(w=3.0)),
    "the targets' keys in another order": (None, _batch(keys=("w", "target"))),
    "a parameter frozen": (_freeze_head, _batch()),
    "a module swapped": (_swap_activation, _batch()),
    "a module attribute": (_set_scale, _batch()),
    "a layer added": (_add_a_layer, _batch()),
}


@pytest.mark.parametrize("change", CHANGES)
def test_a_change_between_steps_captures_again(change):
    edit, (x, y) = CHANGES[change]
    torch.manual_seed(0)
    model = Tagger().double()
    t = fxclip.transform(model, weighted, max_grad_norm=0.5)
    check_against_reference(t, *_batch())
    if edit:
        edit(model)
    check_against_reference(t, x, y)
    assert len(t.captures) == 2


def test_a_submodule_switched_to_batch_statistics_is_refused_at_the_next_step():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).eval()
    model[0].train(), model[2].train()
    t = fxclip.transform(model, lambda out, y: out.sum(1), max_grad_norm=1.0)
    t.step(torch.randn(4, 4), None)
    model[1].train()  # model.training is unchanged
    with pytest.raises(fxclip.ExampleMixingError, match="BatchNorm1d"):
        t.step(torch.randn(4, 4), None)


def test_frequent_captures_warn_with_what_changed(monkeypatch):
    monkeypatch.setattr(captures, "RECAPTURE_WARNING", 2)
    model = Tagger().double()
    t = fxclip.transform(model, weighted, max_grad_norm=0.5)
    for step in range(2):
        model.scale = float(step)
        t.step(*_batch())
    model.scale = 7.0
    with pytest.warns(UserWarning, match=r"captured this model 2 times: module '<root>' changed: attributes .*7\.0"):
        t.step(*_batch())


def test_a_first_step_that_fails_on_the_batch_leaves_no_capture_behind():
    # a wrong feature size fails in plain PyTorch too: reported as such, and not kept as a fallback
    model = nn.Linear(4, 3)
    t = fxclip.transform(model, lambda out, y: F.cross_entropy(out, y, reduction="none"), max_grad_norm=1.0)
    with pytest.raises(fxclip.FxclipError, match="fail on this batch run as plain PyTorch"):
        t.step(torch.randn(5, 5), torch.zeros(5, dtype=torch.long))
    assert model.weight.grad is None
    t.step(torch.randn(5, 4), torch.zeros(5, dtype=torch.long))
    assert t.fallbacks == [] and len(t.captures) == 1
