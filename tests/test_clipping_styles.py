"""Clipping styles (transform(..., clipping=...)): flat, per_layer (one bound per parameter or per
group of them) and automatic, each checked against the torch.func reference clipped the same way,
for its privacy bound (removing one example moves the clipped sum by at most the style's
sensitivity), compiled, in physical batches, on the whole-model fallback and with verify=True."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import relative_error

import fxclip
from fxclip.clipping import Clipping
from fxclip.reference import any_per_example_grads, clip_and_sum
from fxclip.zoo import ZOO


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def batch_of(name: str, size: int, seed: int = 0, outlier: bool = True):
    """A float64 zoo model and a batch whose example 2 (for float inputs) has a huge gradient."""
    entry = ZOO[name]
    torch.manual_seed(seed)
    model = entry.factory().double()
    (x,), y = entry.make_batch(size, torch.Generator().manual_seed(seed + 1))
    if x.is_floating_point():
        x = x.double()
        if outlier:
            x[2] *= 1e3
    return model, x, y


def trainable(model):
    return [k for k, p in model.named_parameters() if p.requires_grad]


def reference(model, x, y, bound, clipping: Clipping):
    """(norms, factors, {name: clipped sum}, group norms) from torch.func's per-example gradients."""
    return clip_and_sum(any_per_example_grads(model, ce, (x,), y)[0], bound, clipping)


def step_sum(model, t, x, y):
    for p in model.parameters():
        p.grad = None
    result = t.step(x, y)
    return result, {k: p.grad.clone() for k, p in model.named_parameters()}


def assert_matches_reference(model, t, x, y, bound, clipping: Clipping, rtol=1e-9):
    result, grads = step_sum(model, t, x, y)
    norms, factors, sums, group_norms = reference(model, x, y, bound, clipping)
    assert relative_error(result.norms, norms) <= rtol
    assert relative_error(result.clip_factors, factors) <= rtol
    if group_norms is not None:
        assert result.group_norms.shape == group_norms.shape
        assert relative_error(result.group_norms, group_norms) <= rtol
    scale = max(float(g.abs().max()) for g in sums.values())
    for key, expected in sums.items():
        assert relative_error(grads[key], expected, scale) <= rtol, key
    return result


def per_layer_bounds(model):
    """A different bound per trainable parameter, some of which clip."""
    return [0.05 * (j + 1) for j in range(len(trainable(model)))]


STYLES = ["flat", "per_layer", "automatic"]


@pytest.mark.parametrize("name", ["mlp", "small_cnn", "tied", "lstm"])
@pytest.mark.parametrize("style", STYLES)
def test_each_style_matches_the_reference(name, style):
    model, x, y = batch_of(name, 6)
    if style == "per_layer":
        bounds = per_layer_bounds(model)
        clipping = Clipping("per_layer", tuple((k,) for k in trainable(model)))
        t = fxclip.transform(model, ce, max_grad_norm=bounds, clipping="per_layer")
        result = assert_matches_reference(model, t, x, y, tuple(bounds), clipping)
        assert result.clip_factors.shape == (6, len(bounds)) and result.groups == clipping.groups
        assert (result.clip_factors < 1).any()
    else:
        t = fxclip.transform(model, ce, max_grad_norm=0.5, clipping=style)
        result = assert_matches_reference(model, t, x, y, 0.5, Clipping(style))
        assert result.group_norms is None and result.groups is None
        if style == "automatic":  # every example is scaled, none to 1
            torch.testing.assert_close(result.clip_factors, 0.5 / (result.norms + 0.01))


def test_per_layer_groups_by_module_and_tuple_share_one_bound():
    model, x, y = batch_of("small_cnn", 5)
    names = trainable(model)
    modules = sorted({k.rsplit(".", 1)[0] for k in names})
    first, rest = modules[0], modules[1:]
    bounds = {first: 0.1, tuple(rest): 0.3}
    t = fxclip.transform(model, ce, max_grad_norm=bounds, clipping="per_layer")
    groups = (tuple(k for k in names if k.startswith(first + ".")), tuple(k for m in rest for k in names if k.startswith(m + ".")))
    result = assert_matches_reference(model, t, x, y, (0.1, 0.3), Clipping("per_layer", groups))
    assert result.groups == groups
    assert t.sensitivity == pytest.approx(math.sqrt(0.1**2 + 0.3**2))


class WeightNormed(torch.nn.Module):
    """A weight-normalized layer: its two parameters reach the op through one chain (a "general"
    component), so per_layer with them in two groups needs each parameter's own norm."""

    def __init__(self):
        super().__init__()
        self.l1 = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(5, 7))
        self.l2 = torch.nn.Linear(7, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def test_per_layer_splits_a_product_of_parameters_into_their_groups():
    torch.manual_seed(0)
    model = WeightNormed().double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    x[1] *= 100
    names = trainable(model)
    bounds = [0.02, 0.5, 0.1, 0.3, 0.2]
    assert len(names) == len(bounds)
    t = fxclip.transform(model, ce, max_grad_norm=bounds, clipping="per_layer")
    assert_matches_reference(model, t, x, y, tuple(bounds), Clipping("per_layer", tuple((k,) for k in names)))
    assert any(e.component.kind == "general" for e in t.program.plan)


def sensitivity_of(style, model):
    if style == "per_layer":
        return per_layer_bounds(model), math.sqrt(sum(b * b for b in per_layer_bounds(model)))
    return 0.8, 0.8


@pytest.mark.parametrize("name", ["mlp", "small_cnn", "bow", "tied"])
@pytest.mark.parametrize("style", STYLES)
def test_removing_one_example_moves_the_sum_by_at_most_the_sensitivity(name, style):
    model, x, y = batch_of(name, 6, seed=3)
    bound, sens = sensitivity_of(style, model)
    t = fxclip.transform(model, ce, max_grad_norm=bound, clipping=style)
    assert t.sensitivity == pytest.approx(sens)
    full, grads = step_sum(model, t, x, y)
    assert (full.clip_factors < 1).any(), "the batch should need clipping for this test to mean anything"
    flat = torch.cat([g.flatten() for g in grads.values()])
    moved = []
    for i in range(6):
        keep = [j for j in range(6) if j != i]
        _, without = step_sum(model, t, x[keep], y[keep])
        moved.append(float((flat - torch.cat([g.flatten() for g in without.values()])).norm()))
    assert max(moved) <= sens * (1 + 1e-6), (style, moved, sens)
    if style != "automatic" and x.is_floating_point():  # the outlier is clipped: it moves the sum by about the bound
        assert moved[2] > 0.5 * sens


@pytest.mark.compile
@pytest.mark.parametrize("style, mode", [("per_layer", True), ("automatic", True), pytest.param("per_layer", "buckets", marks=pytest.mark.slow)])
def test_compiled_styles_match_eager_and_a_new_bound_does_not_recompile(style, mode):
    torch.manual_seed(0)
    eager_model = ZOO["mlp"].factory()
    compiled_model = ZOO["mlp"].factory()
    compiled_model.load_state_dict(eager_model.state_dict())
    n = len(trainable(eager_model))
    first = [0.05 * (j + 1) for j in range(n)] if style == "per_layer" else 0.5
    second = [0.3] * n if style == "per_layer" else 0.05
    eager = fxclip.transform(eager_model, ce, first, clipping=style)
    compiled = fxclip.transform(compiled_model, ce, first, clipping=style, compile=mode)
    gen = torch.Generator().manual_seed(1)
    for size, bound in ((9, first), (17, second), (12, second)):  # buckets pad 17 to 18
        eager.max_grad_norm = compiled.max_grad_norm = bound
        (x,), y = ZOO["mlp"].make_batch(size, gen)
        for m in (eager_model, compiled_model):
            m.zero_grad(set_to_none=True)
        want, got = eager.step(x, y), compiled.step(x, y)
        for field in ("norms", "clip_factors", "group_norms"):
            if getattr(want, field) is not None:
                torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=1e-4, atol=1e-5)
        for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5)
    (capture,) = compiled.captures
    # buckets: one compile per padded size (9, 18, 12: padding rows get bound 0 in every group), none per bound
    assert capture.step.compiled.compiles == (1 if mode is True else 3)


@pytest.mark.parametrize("style", STYLES)
def test_physical_batches_give_the_same_step(style):
    model, x, y = batch_of("small_cnn", 7)
    bound = per_layer_bounds(model) if style == "per_layer" else 0.5
    whole = fxclip.transform(model, ce, bound, clipping=style)
    chunked = fxclip.transform(model, ce, bound, clipping=style, max_physical_batch_size=3)
    want, want_grads = step_sum(model, whole, x, y)
    got, got_grads = step_sum(model, chunked, x, y)
    torch.testing.assert_close(got.clip_factors, want.clip_factors, rtol=1e-10, atol=1e-12)
    if style == "per_layer":
        torch.testing.assert_close(got.group_norms, want.group_norms, rtol=1e-10, atol=1e-12)
    for key in want_grads:
        torch.testing.assert_close(got_grads[key], want_grads[key], rtol=1e-10, atol=1e-12)


class Branching(torch.nn.Module):
    """Python control flow on a value: torch.export cannot capture it (the whole-model fallback)."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = torch.nn.Linear(5, 6), torch.nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        return self.l2(h if float(h.sum()) > -1e9 else -h)


@pytest.mark.parametrize("style", STYLES)
def test_the_whole_model_fallback_clips_in_each_style(style):
    torch.manual_seed(0)
    model = Branching().double()
    x, y = torch.randn(5, 5, dtype=torch.float64), torch.randint(0, 3, (5,))
    x[0] *= 50
    names = trainable(model)
    bound = [0.1, 0.2, 0.3, 0.4] if style == "per_layer" else 0.3
    t = fxclip.transform(model, ce, bound, clipping=style)
    clipping = Clipping(style, tuple((k,) for k in names) if style == "per_layer" else ())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxclip.FallbackWarning)
        assert_matches_reference(model, t, x, y, tuple(bound) if style == "per_layer" else bound, clipping)
    assert t.fallbacks and "whole model" in t.fallbacks[0]


@pytest.mark.parametrize("style", STYLES)
def test_verify_checks_each_style(style, monkeypatch):
    model, x, y = batch_of("mlp", 6)
    bound = per_layer_bounds(model) if style == "per_layer" else 0.5
    t = fxclip.transform(model, ce, bound, clipping=style, verify=True)
    t.step(x, y)  # passes: the step and the reference clip alike
    # a reference that clips the flat way must disagree with a per_layer or automatic step
    from fxclip import verify

    def flat(grads, bound, clipping):  # the flat style's norms, factors and sums; the style's group norms
        return (*clip_and_sum(grads, max(bound) if isinstance(bound, tuple) else bound)[:3], clip_and_sum(grads, bound, clipping)[3])

    monkeypatch.setattr(verify, "clip_and_sum", flat)
    t = fxclip.transform(model, ce, bound, clipping=style, verify=True)
    if style == "flat":
        t.step(x, y)
    else:
        with pytest.raises(fxclip.VerificationError):
            t.step(x, y)


def test_per_layer_follows_freezing_and_a_dict_names_parameters():
    model, x, y = batch_of("mlp", 5)
    names = trainable(model)
    t = fxclip.transform(model, ce, {k: 0.1 for k in names}, clipping="per_layer")
    t.step(x, y)
    frozen = names[0]
    model.get_parameter(frozen).requires_grad_(False)
    with pytest.raises(fxclip.FxclipError, match=f"{frozen!r}, which is frozen"):
        t.step(x, y)
    t.max_grad_norm = {k: 0.1 for k in names[1:]}
    result = t.step(x, y)
    assert result.group_norms.shape == (5, len(names) - 1)


def test_step_hooks_see_every_result_until_removed():
    model, x, y = batch_of("mlp", 4)
    t = fxclip.transform(model, ce, 1.0)
    seen = []
    handle = t.register_step_hook(seen.append)
    r = t.step(x, y)
    handle.remove()
    t.step(x, y)
    assert seen == [r]


# ---- bad input: a clear error naming it, nothing stepped ----------------------------------------


BAD = [
    (lambda names: [0.1] * (len(names) - 1), "has 5 per-layer bounds but the model has 6 trainable"),
    (lambda names: [0.1] * (len(names) - 1) + [0.0], r"max_grad_norm\[5\] must be a finite number > 0, got 0.0"),
    (lambda names: [float("nan")] + [0.1] * (len(names) - 1), r"max_grad_norm\[0\] must be a finite number > 0, got nan"),
    (lambda names: {**{k: 0.1 for k in names}, "nope.weight": 0.1}, "'nope.weight', which is not a trainable parameter or a module"),
    (lambda names: {k: 0.1 for k in names[1:]}, "no bound for the trainable parameter"),
    (lambda names: {**{k: 0.1 for k in names}, (names[0], "x"): 0.2}, "names {0!r} in two groups"),
    (lambda names: {names[0].split(".")[0]: 0.1, **{k: 0.1 for k in names}}, "is in two groups"),
    (lambda names: {k: -1 for k in names}, r"max_grad_norm\[.*\] must be a finite number > 0"),
    (lambda names: 1.0, 'clipping="per_layer" takes max_grad_norm as a list'),
]


@pytest.mark.parametrize("make, message", BAD)
def test_bad_per_layer_bounds_are_refused_by_name_before_any_step(make, message):
    model, _, _ = batch_of("mlp", 4)
    names = trainable(model)
    message = message.replace("{0!r}", repr(names[0]))
    with pytest.raises(fxclip.FxclipError, match=message):
        fxclip.transform(model, ce, make(names), clipping="per_layer")
    t = fxclip.transform(model, ce, [0.1] * len(names), clipping="per_layer")
    with pytest.raises(fxclip.FxclipError, match=message):
        t.max_grad_norm = make(names)
    assert all(p.grad is None for p in model.parameters())
    assert t.max_grad_norm == tuple([0.1] * len(names))


def test_bad_style_and_gamma_are_refused():
    model, _, _ = batch_of("mlp", 3)
    with pytest.raises(fxclip.FxclipError, match="clipping must be one of"):
        fxclip.transform(model, ce, 1.0, clipping="layerwise")
    with pytest.raises(fxclip.FxclipError, match="automatic_gamma must be a finite number > 0"):
        fxclip.transform(model, ce, 1.0, clipping="automatic", automatic_gamma=0)
    with pytest.raises(fxclip.FxclipError, match='pass clipping="per_layer"'):
        fxclip.transform(model, ce, [1.0, 2.0])


# ---- adaptive clipping (Andrew et al. 2021) -------------------------------------------------------


def test_the_adaptive_gradient_noise_keeps_the_stated_privacy():
    """Theorem 1: the gradient at sigma_grad and the centred count (sensitivity 1/2) at sigma_b are
    together one Gaussian mechanism at the stated sigma; dp_accounting composes them to its epsilon."""
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    from fxclip.accounting import adaptive_clipping_noise_multiplier

    sigma, sigma_b = 1.1, 3.0
    sigma_grad = adaptive_clipping_noise_multiplier(sigma, sigma_b)
    assert sigma_grad == pytest.approx((sigma**-2 - (2 * sigma_b) ** -2) ** -0.5) and sigma_grad > sigma

    def epsilon(event):
        acc = rdp_privacy_accountant.RdpAccountant()
        acc.compose(event, 100)
        return acc.get_epsilon(1e-5)

    both = dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(sigma_grad), dp_accounting.GaussianDpEvent(2 * sigma_b)])
    assert epsilon(both) == pytest.approx(epsilon(dp_accounting.GaussianDpEvent(sigma)), rel=1e-9)
    assert epsilon(dp_accounting.GaussianDpEvent(sigma_grad)) < epsilon(dp_accounting.GaussianDpEvent(sigma))
    with pytest.raises(ValueError, match="count_noise_std 0.5 must exceed noise_multiplier / 2 = 0.55"):
        adaptive_clipping_noise_multiplier(sigma, 0.5)
    assert adaptive_clipping_noise_multiplier(0.0, 1.0) == 0.0


def adaptive_setup(batch: int, bound: float = 1.0, sigma: float = 0.0, count_noise_std: float | None = None, **kwargs):
    from fxclip.optim import AdaptiveClipping, PrivateOptimizer

    model, x, y = batch_of("mlp", batch, outlier=False)
    t = fxclip.transform(model, ce, bound)
    adaptive = AdaptiveClipping(t, target_quantile=0.5, expected_batch_size=batch, count_noise_std=count_noise_std, **kwargs)
    opt = PrivateOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=sigma, expected_batch_size=batch,
        adaptive_clipping=adaptive, generator=torch.Generator().manual_seed(0),
    )
    return model, x, y, t, adaptive, opt


def test_the_bound_moves_geometrically_from_the_noised_unclipped_fraction():
    _, x, y, t, _, opt = adaptive_setup(16, bound=1.0, count_noise_std=1e-9, learning_rate=0.3)
    for _ in range(3):
        before = t.max_grad_norm
        opt.zero_grad()
        result = t.step(x[:10], y[:10])  # accumulated over two physical batches
        result2 = t.step(x[10:], y[10:])
        unclipped = float((torch.cat([result.norms, result2.norms]) <= before).double().mean())
        opt.step()
        assert t.max_grad_norm == pytest.approx(before * math.exp(-0.3 * (unclipped - 0.5)), rel=1e-6)
        assert opt.max_grad_norm == t.max_grad_norm


def test_the_bound_converges_to_the_target_quantile_of_the_norms():
    _, x, y, t, _, opt = adaptive_setup(64, bound=50.0)  # the paper's sigma_b = 64 / 20
    for _ in range(80):
        opt.zero_grad()
        t.step(x, y)
        opt.step()
    norms = t.step(x, y).norms  # the model did not move (lr 0): the same norms every step
    assert 0.3 <= float((norms <= t.max_grad_norm).double().mean()) <= 0.7, (t.max_grad_norm, norms.median())


def test_adaptive_noise_uses_the_current_bound_and_the_raised_multiplier():
    _, _, _, t, _, opt = adaptive_setup(40, bound=0.7, sigma=1.0)  # sigma_b = 40 / 20
    assert opt.noise_multiplier == 1.0 and opt.gradient_noise_multiplier == pytest.approx((1 - 4.0**-2) ** -0.5)
    assert opt.noise_std == pytest.approx(opt.gradient_noise_multiplier * 0.7)
    t.max_grad_norm = 0.2
    assert opt.noise_std == pytest.approx(opt.gradient_noise_multiplier * 0.2)


def test_adaptive_clipping_refuses_what_it_cannot_adapt():
    from fxclip.optim import AdaptiveClipping, PrivateOptimizer

    model, _, _ = batch_of("mlp", 3)
    for style, bound in (("per_layer", [1.0] * 6), ("automatic", 1.0)):
        with pytest.raises(ValueError, match=f'this transform clips "{style}"'):
            AdaptiveClipping(fxclip.transform(model, ce, bound, clipping=style), target_quantile=0.5, expected_batch_size=8)
    t = fxclip.transform(model, ce, 1.0)
    with pytest.raises(ValueError, match="target_quantile must be a finite number >= 0 and <= 1"):
        AdaptiveClipping(t, target_quantile=1.5, expected_batch_size=8)
    adaptive = AdaptiveClipping(t, target_quantile=0.5, expected_batch_size=8)
    with pytest.raises(ValueError, match="leave max_grad_norm out"):
        PrivateOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                         expected_batch_size=8, adaptive_clipping=adaptive)
    with pytest.raises(ValueError, match="must exceed noise_multiplier / 2"):
        PrivateOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, expected_batch_size=8,
                         adaptive_clipping=AdaptiveClipping(t, target_quantile=0.5, expected_batch_size=8, count_noise_std=0.4))


# ---- data parallel: two gloo processes against one process on the union batch ----------------------


def _ddp_worker(rank: int, port: int, out_path: str) -> None:
    import torch.distributed as dist

    from fxclip.distributed import DistributedPrivateOptimizer
    from fxclip.optim import AdaptiveClipping

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        dist.barrier()
        out = _ddp_run(rank, lambda **kw: DistributedPrivateOptimizer(**kw), AdaptiveClipping)
        if rank == 0:
            torch.save(out, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _ddp_run(rank, make_optimizer, adaptive_cls) -> dict:
    """per_layer grads (sigma 0) and the adaptive bounds over 3 steps, on this rank's half of the batch
    (all of it in one process: rank None)."""
    model, x, y = batch_of("mlp", 12)
    mine = torch.arange(12) if rank is None else torch.arange(rank, 12, 2)
    bounds = per_layer_bounds(model)
    t = fxclip.transform(model, ce, bounds, clipping="per_layer")
    opt = make_optimizer(optimizer=torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0,
                         max_grad_norm=t.sensitivity, expected_batch_size=12)
    opt.zero_grad()
    t.step(x[mine], y[mine])
    opt.add_noise_and_average()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    flat = fxclip.transform(model, ce, 1.0)
    adaptive = adaptive_cls(flat, target_quantile=0.5, expected_batch_size=12, count_noise_std=1e-9)
    opt = make_optimizer(optimizer=torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0,
                         expected_batch_size=12, adaptive_clipping=adaptive)
    bounds_seen = []
    for _ in range(3):
        opt.zero_grad()
        flat.step(x[mine], y[mine])
        opt.step()
        bounds_seen.append(flat.max_grad_norm)
    return {"grads": grads, "bounds": torch.tensor(bounds_seen, dtype=torch.float64)}


def test_data_parallel_per_layer_and_adaptive_equal_one_process():
    import socket
    import tempfile

    import torch.multiprocessing as mp

    from fxclip.optim import AdaptiveClipping, PrivateOptimizer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/out.pt"
        mp.start_processes(_ddp_worker, args=(port, path), nprocs=2, start_method="spawn")
        two = torch.load(path)
    one = _ddp_run(None, lambda **kw: PrivateOptimizer(**kw), AdaptiveClipping)
    torch.testing.assert_close(two["grads"], one["grads"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(two["bounds"], one["bounds"], rtol=1e-6, atol=0)
    assert len(set(one["bounds"].tolist())) == 3  # the bound moved every step


# ---- fxclip train --clipping / --target-quantile -------------------------------------------------


@pytest.mark.parametrize(
    "style, quantile",
    [pytest.param("per_layer", None, marks=pytest.mark.slow), pytest.param("automatic", None, marks=pytest.mark.slow), ("flat", 0.5)],
)
def test_private_training_runs_each_style_to_its_epsilon(style, quantile):
    from fxclip.data import load_digits
    from fxclip.train import TrainConfig, build_model, summary_lines, train_private

    digits = load_digits()
    config = TrainConfig(epochs=2, compile=False, epsilon=4.0, clipping=style, target_quantile=quantile)
    torch.manual_seed(0)
    history, plan = train_private(build_model("mlp", digits), digits, config, progress=False)
    assert 3.9 < history.epochs[-1].epsilon <= 4.0
    assert history.final_accuracy > 0.3  # chance is 0.1
    speed = {"batch_size": 128, "fxclip_seconds": 1.0, "nonprivate_seconds": 1.0, "naive_seconds": 1.0, "fxclip_eager_seconds": 1.0}
    privacy_line = summary_lines(config, digits, plan, history, history, speed)[1]
    if quantile:
        assert history.final_max_grad_norm != 1.0
        assert f"adapted to quantile 0.5: {history.final_max_grad_norm:.3g} at the end" in privacy_line
    else:  # per_layer: K bounds of 1/sqrt(K), sensitivity 1
        assert history.final_max_grad_norm == pytest.approx(1.0) and f"clip 1 {style}" in privacy_line


def test_fxclip_train_takes_the_clipping_options():
    from fxclip.cli import build_parser

    args = build_parser().parse_args(["train", "--clipping", "flat", "--target-quantile", "0.7"])
    assert (args.clipping, args.target_quantile) == ("flat", 0.7)
    assert build_parser().parse_args(["train"]).target_quantile is None


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"clipping": "layer"}, "unknown clipping style 'layer'"),
        ({"clipping": "per_layer", "target_quantile": 0.5}, "use --clipping flat, not per_layer"),
        ({"target_quantile": 2.0}, "target_quantile must be a finite number >= 0 and <= 1"),
    ],
)
def test_fxclip_train_refuses_bad_clipping_settings(changes, message):
    from fxclip.train import TrainConfig

    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes).validate()


@pytest.mark.parametrize("style", ["per_layer", "automatic"])
def test_explain_and_graph_run_the_step_in_its_style(style):
    model, x, y = batch_of("mlp", 4)
    bound = per_layer_bounds(model) if style == "per_layer" else 0.5
    t = fxclip.transform(model, ce, bound, clipping=style)
    assert [r.name for r in t.explain(x, y).rows] == trainable(model)
    graph = t.graph(x, y)
    assert graph.phase_counts()["book-keeping"] > 0
    out = graph.gm(*t.bind(x, y).flat_args)
    result = t.step(x, y)
    torch.testing.assert_close(out[2], result.clip_factors)  # the traced step clips as the step does
