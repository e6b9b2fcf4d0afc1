"""fxclip.PrivacyEngine: an unchanged PyTorch loop made private (fxclip/integrations/engine.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fxclip
from fxclip.dp.accounting import epsilon_spent, noise_multiplier_for_epsilon
from fxclip.integrations.engine import PerExampleLoss
from fxclip.reference import any_per_example_grads, clipped_sum
from helpers import assert_unchanged, relative_error, snapshot


def data(n=60, features=6, classes=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.utils.data.TensorDataset(torch.randn(n, features, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g))


def mlp(features=6, classes=3, dtype=torch.float64):
    return nn.Sequential(nn.Linear(features, 16), nn.Tanh(), nn.Linear(16, classes)).to(dtype)


def make_private(model=None, criterion=None, batch_size=10, noise=0.0, clip=0.5, lr=0.3, **options):
    model = model or mlp()
    loader = torch.utils.data.DataLoader(data(), batch_size=batch_size)
    engine = fxclip.PrivacyEngine()
    private = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), data_loader=loader,
                                  criterion=criterion or nn.CrossEntropyLoss(), noise_multiplier=noise, max_grad_norm=clip, **options)
    return engine, model, private


def per_example_ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


@pytest.mark.parametrize("criterion, reduce", [(nn.CrossEntropyLoss(), torch.mean), (nn.CrossEntropyLoss(reduction="sum"), torch.sum),
                                               (F.cross_entropy, torch.mean)], ids=["mean", "sum", "function"])
def test_each_step_is_the_dp_sgd_step_on_the_batch_the_loader_gave(criterion, reduce):
    """Noise 0: p <- p - lr * (Σ_i clip_i g_i) / expected batch size, on the drawn batch; the
    loss is the criterion's value on that batch."""
    _engine, model, (module, optimizer, criterion, loader) = make_private(criterion=criterion)
    lr, clip, expected = 0.3, 0.5, 10
    sizes = []
    for x, y in loader:
        before = {k: p.detach().clone() for k, p in model.named_parameters()}
        grads, _ = any_per_example_grads(model, per_example_ce, (x,), y)
        _, sums = clipped_sum(grads, clip)
        with torch.no_grad():
            expected_loss = reduce(per_example_ce(model(x), y)) if len(y) else torch.tensor(0.0)
        optimizer.zero_grad()
        loss = criterion(module(x), y)
        loss.backward()
        optimizer.step()
        sizes.append(len(y))
        assert loss.item() == pytest.approx(float(expected_loss), rel=1e-12)
        for k, p in model.named_parameters():
            assert relative_error(p.detach(), before[k] - lr * sums[k] / expected) <= 1e-12, k
    assert len(sizes) == 6 and len(set(sizes)) > 1  # the loader's number of batches, Poisson sizes
    assert optimizer.steps == 6


def test_one_forward_and_one_backward_per_batch():
    """The loop runs the ops fxclip's step runs, no more, and one forward: counted at the
    dispatcher, every matrix product, and the forward's (addmm: a Linear with bias) apart."""

    class CountMatmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.products = self.forward_products = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.products += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm)
            self.forward_products += func.overloadpacket is torch.ops.aten.addmm
            return func(*args, **(kwargs or {}))

    _, model, (module, optimizer, criterion, _) = make_private()
    x, y = data()[:10]
    t = fxclip.transform(mlp(), per_example_ce, max_grad_norm=0.5)
    t.step(x, y)  # captured, as the engine's step was at make_private
    with CountMatmuls() as in_loop:
        optimizer.zero_grad()
        criterion(module(x), y).backward()
    with CountMatmuls() as in_step:
        t.step(x, y)
    with CountMatmuls() as plain:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
    assert in_loop.products == in_step.products > 0
    assert in_loop.forward_products == plain.forward_products == 2  # two Linear layers, run once


def test_the_module_evaluates_normally_and_its_training_output_is_only_for_the_criterion():
    _, model, (module, _optimizer, criterion, _) = make_private()
    x, y = data()[:10]
    with torch.no_grad():
        assert torch.equal(module(x), model(x))
        assert criterion(module(x), y) == F.cross_entropy(model(x), y)
    module.eval()
    with torch.no_grad():
        assert torch.equal(module(x), model(x))
    with pytest.raises(fxclip.FxclipError, match="would not be private"):  # eval() with gradients on: not a private loss
        criterion(module(x), y)
    module.train()
    with pytest.raises(fxclip.FxclipError, match=r"asked for \.argmax.*torch.no_grad\(\)"):
        module(x).argmax(1)
    with pytest.raises(fxclip.FxclipError, match="passed to"):
        torch.softmax(module(x), 1)
    criterion(module(x), y)
    assert criterion.last_result.norms.shape == (10,)


def test_a_scaled_loss_is_refused_and_leaves_grad_as_it_was():
    _, model, (module, _optimizer, criterion, _) = make_private()
    x, y = data()[:10]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = snapshot(model)
    with pytest.raises(fxclip.FxclipError, match="scaled"):
        (criterion(module(x), y) / 2).backward()
    assert_unchanged(model, before)


def test_backward_accumulates_into_grad_and_the_criterion_alone_writes_nothing():
    _, model, (module, optimizer, criterion, _) = make_private()
    x, y = data()[:10]
    optimizer.zero_grad()
    loss = criterion(module(x), y)
    assert all(p.grad is None for p in model.parameters())  # the clipped sums wait for backward
    loss.backward()
    first = [p.grad.clone() for p in model.parameters()]
    criterion(module(x), y).backward()
    assert all(torch.allclose(p.grad, 2 * g, rtol=1e-12) for p, g in zip(model.parameters(), first))


def test_epsilon_is_the_accountants_for_the_steps_taken():
    engine, _model, (module, optimizer, criterion, loader) = make_private(noise=1.1)
    assert engine.get_epsilon(1e-5) == 0.0
    for x, y in loader:
        optimizer.zero_grad()
        criterion(module(x), y).backward()
        optimizer.step()
    assert engine.get_epsilon(1e-5) == epsilon_spent(1.1, 10 / 60, 6, 1e-5)


def test_make_private_with_epsilon_meets_the_target():
    model = mlp()
    loader = torch.utils.data.DataLoader(data(), batch_size=10)
    engine = fxclip.PrivacyEngine()
    module, optimizer, criterion, loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader, criterion=nn.CrossEntropyLoss(),
        target_epsilon=3.0, target_delta=1e-5, epochs=2, max_grad_norm=1.0)
    assert optimizer.noise_multiplier == noise_multiplier_for_epsilon(3.0, 10 / 60, 12, 1e-5)
    for _ in range(2):
        for x, y in loader:
            optimizer.zero_grad()
            criterion(module(x), y).backward()
            optimizer.step()
    assert optimizer.steps == 12 and 2.9 < engine.get_epsilon(1e-5) <= 3.0


def test_noise_has_the_dp_sgd_scale():
    """One step on zero clipped sums moves each coordinate by lr * N(0, (sigma C)^2) / expected batch."""
    model = nn.Linear(200, 100, bias=False).double()
    nn.init.zeros_(model.weight)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(40, 200, dtype=torch.float64), torch.zeros(40, 100, dtype=torch.float64)),
                                         batch_size=8)
    module, optimizer, criterion, loader = fxclip.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), data_loader=loader, criterion=nn.MSELoss(),
        noise_multiplier=2.0, max_grad_norm=3.0, noise_generator=torch.Generator().manual_seed(0))
    x, y = next(iter(loader))
    optimizer.zero_grad()
    criterion(module(x), y).backward()  # zero inputs and targets: every gradient is 0
    optimizer.step()
    assert float(model.weight.detach().std()) == pytest.approx(2.0 * 3.0 / 8, rel=0.03)


def test_the_loader_is_poisson_and_empty_batches_step():
    model = mlp()
    loader = torch.utils.data.DataLoader(data(n=40), batch_size=1)
    engine = fxclip.PrivacyEngine()
    module, optimizer, criterion, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader, criterion=nn.CrossEntropyLoss(),
        noise_multiplier=1.0, max_grad_norm=1.0)
    sizes = []
    for x, y in loader:
        optimizer.zero_grad()
        loss = criterion(module(x), y)
        loss.backward()
        optimizer.step()
        sizes.append(len(y))
        if len(y) == 0:
            assert x.shape == (0, 6) and loss.item() == 0.0
    assert len(sizes) == 40 and 0 in sizes and max(sizes) > 1  # q = 1/40: P(no empty batch in 40) ~ 0.02^... tiny
    assert optimizer.steps == 40


def test_sequence_losses_are_per_example_means_over_counted_targets():
    out, y = torch.randn(4, 5, 7, dtype=torch.float64), torch.randint(0, 5, (4, 7))
    y[0, :3] = -100
    per = PerExampleLoss(nn.CrossEntropyLoss())(out, y)
    tokens = F.cross_entropy(out, y, reduction="none")
    assert torch.allclose(per[0], tokens[0, 3:].mean()) and torch.allclose(per[1:], tokens[1:].mean(1))
    mse = PerExampleLoss(nn.MSELoss())(out, out + 1)
    assert mse.shape == (4,) and torch.allclose(mse.mean(), F.mse_loss(out, out + 1))


def test_transform_options_pass_through():
    _, _, (_module, _optimizer, criterion, _) = make_private(max_physical_batch_size=3, strategy="materialize")
    assert criterion.step.options.max_physical_batch_size == 3 and criterion.step.strategy == "materialize"


def test_an_lr_scheduler_takes_the_private_optimizer():
    _, _, (module, optimizer, criterion, loader) = make_private()
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    for x, y in loader:
        optimizer.zero_grad()
        criterion(module(x), y).backward()
        optimizer.step()
        schedule.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.3 * 0.5**6)


class MaskedMean(nn.Module):
    """A custom mean over a subset of the elements: no reduction fxclip can undo."""

    def forward(self, out, y):
        return F.cross_entropy(out, y, reduction="none")[y > 0].mean()


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(data())


@pytest.mark.parametrize("change, message", [
    ({"criterion": MaskedMean()}, "MaskedMean has no `reduction`"),
    ({"criterion": lambda out, y: F.cross_entropy(out, y)}, "has no `reduction`"),
    ({"criterion": nn.CrossEntropyLoss(weight=torch.ones(3, dtype=torch.float64))}, "class weights"),
    ({"criterion": nn.CrossEntropyLoss(reduction="none")}, "reduction 'none'"),
    ({"data_loader": torch.utils.data.DataLoader(Stream(), batch_size=10)}, "cannot be resampled"),
    ({"data_loader": torch.utils.data.DataLoader(data(), batch_sampler=[[0, 1]])}, "no batch_size"),
    ({"optimizer": torch.optim.SGD(mlp().parameters(), lr=0.1)}, "are not the module's"),
    ({"module": nn.Sequential(nn.Linear(6, 3), nn.BatchNorm1d(3)).double()}, "BatchNorm"),
    ({"noise_multiplier": -1}, "noise_multiplier must be"),
    ({"max_grad_norm": 0}, "max_grad_norm must be"),
], ids=["custom_mean", "no_reduction_function", "class_weights", "reduction_none", "iterable", "batch_sampler", "foreign_optimizer",
        "batch_norm", "negative_noise", "zero_clip"])
def test_bad_input_is_refused_at_make_private_and_changes_nothing(change, message):
    model = change.get("module") or mlp()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = snapshot(model)
    arguments = {"module": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
                     "data_loader": torch.utils.data.DataLoader(data(), batch_size=10), "criterion": nn.CrossEntropyLoss(),
                     "noise_multiplier": 1.0, "max_grad_norm": 1.0} | change
    engine = fxclip.PrivacyEngine()
    with pytest.raises(fxclip.FxclipError, match=message):
        engine.make_private(**arguments)
    assert_unchanged(model, before)
    assert engine.optimizer is None and engine.get_epsilon(1e-5) == 0.0


def test_a_criterion_that_ignores_reduction_none_is_refused_at_make_private():
    class AlwaysMean(nn.modules.loss._Loss):
        def forward(self, out, y):
            return F.cross_entropy(out, y)

    with pytest.raises(fxclip.FxclipError, match="still returned one number"):
        make_private(criterion=AlwaysMean())


@pytest.mark.slow
@pytest.mark.compile
def test_compiled_loop_matches_eager():
    results = []
    for compile in (False, True):
        torch.manual_seed(3)
        _, model, (module, optimizer, criterion, loader) = make_private(compile=compile)
        for x, y in loader:
            optimizer.zero_grad()
            criterion(module(x), y).backward()
            optimizer.step()
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*results))
