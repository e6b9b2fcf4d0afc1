"""Random whole models (tests/model_gen.py) against the per-example loop, in float64.

Each seed composes a model from the catalogue of blocks, picks the clipping bound between the
examples' gradient norms (so some examples are clipped and some are not), runs one fxclip step
and compares the norms, the losses and every clipped sum with one backward per example; frozen
parameters must get no gradient. Some seeds also force each strategy, a few run compiled.

A parameter use no rule covers takes the per-op fallback, and a model fxclip cannot capture the
whole-model fallback: both are exact, so they pass the comparison, and a regression that sends
a common block there would go unseen. So each fallback is traced to the block that takes it and
must be of a kind listed below.
"""

import re
import warnings

import pytest
import torch

import fxclip
from fxclip.captures import GraphStep
from fxclip.reference import clip_and_sum, naive_per_example_grads
from helpers import relative_error
from model_gen import ALL_DRAWS, COSTLY, RandomCase, generate

# the kinds whose ops have no rule: nn.PReLU (aten._prelu_kernel) and nn.Bilinear
# (aten._trilinear) take the per-op fallback, by torch.func on that op alone
OP_FALLBACK_KINDS = {"prelu", "bilinear"}
# no kind may send a whole model to the whole-model fallback
WHOLE_MODEL_FALLBACK_KINDS: set[str] = set()

# the first seeds that together draw everything the generator can (ALL_DRAWS: every builder,
# stem and head; test_default_seeds_draw_everything keeps it so), filled up with the next ones
DEFAULT_SEEDS = [*range(24), 29, 33, 34, 35, 36, 52]
SLOW_SEEDS = [s for s in range(350) if s not in DEFAULT_SEEDS]
STRATEGY_SEEDS = range(0, 350, 5)  # these also force "ghost" and "materialize"

def clip_bound(norms: torch.Tensor) -> float:
    """A bound between the two middle norms: about half the examples are clipped."""
    ordered = norms.sort().values
    k = (len(ordered) - 1) // 2
    return float((ordered[k] * ordered[k + 1]).sqrt())


def check(case: RandomCase, strategies=("auto",), compile=False, rtol=1e-8) -> fxclip.PrivateStep:
    """One step per strategy against the per-example loop; returns the transform."""
    model = case.model
    ref, ref_losses = naive_per_example_grads(model, case.loss_fn, case.inputs, case.targets, case.batch_dims, with_losses=True)
    bound = clip_bound(clip_and_sum(ref, 1.0)[0])
    ref_norms, ref_clip, ref_sums, _ = clip_and_sum(ref, bound)
    assert (ref_clip < 1).any() and (ref_clip == 1).any(), ref_norms
    scale = max(float(g.abs().max()) for g in ref_sums.values())
    t = fxclip.transform(model, case.loss_fn, bound, batch_dims=case.batch_dims, compile=compile)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", fxclip.FallbackWarning)
        for strategy in strategies:
            model.zero_grad(set_to_none=True)
            t.strategy = strategy
            result = t.step(case.inputs, case.targets)
            assert relative_error(result.losses, ref_losses) <= rtol, (strategy, result.losses, ref_losses)
            assert relative_error(result.norms, ref_norms) <= rtol, (strategy, result.norms, ref_norms)
            for name, p in model.named_parameters():
                if p.requires_grad:
                    assert relative_error(p.grad, ref_sums[name], scale) <= rtol, (strategy, name)
                else:
                    assert p.grad is None, name
    _check_fallbacks(case, t, [w for w in caught if issubclass(w.category, fxclip.FallbackWarning)])
    if compile:  # a compile that fails warns and runs eagerly: the comparison alone would pass
        assert all(c.step.compiled is not None for c in t.captures), "the step did not run compiled"
    return t


def _check_fallbacks(case: RandomCase, t: fxclip.PrivateStep, whole_model: list) -> None:
    for w in whole_model:
        found = re.search(r"module '([^']+)'", str(w.message))
        kind = case.kind_of(found.group(1)) if found else "?"
        assert kind in WHOLE_MODEL_FALLBACK_KINDS, f"whole-model fallback in a {kind} block: {w.message}"
    for capture in t.captures:
        for use in capture.step.fallback_uses if isinstance(capture.step, GraphStep) else ():
            kinds = {case.kind_of(name) for name in use.params}
            assert kinds <= OP_FALLBACK_KINDS, f"per-op fallback for {use.params} ({kinds}) at {use.node.target}"


def _run(seed: int, compile=False, **options):
    case = generate(seed, **options)
    strategies = ("auto", "ghost", "materialize") if seed in STRATEGY_SEEDS else ("auto",)
    try:
        check(case, strategies, compile=compile)
    except Exception as e:
        e.add_note(case.describe())
        raise


@pytest.mark.parametrize("seed", DEFAULT_SEEDS)
def test_random_model(seed):
    _run(seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SLOW_SEEDS)
def test_random_model_slow(seed):
    _run(seed)


def test_default_seeds_draw_everything():
    drawn = set().union(*(generate(s).drawn for s in DEFAULT_SEEDS))
    assert drawn == ALL_DRAWS, f"no default seed draws {sorted(ALL_DRAWS - drawn)}"


# a model for each of four stems (picked to draw convs, a tied head, attention, gates); the
# recurrent and attention layers cost the most to compile and are covered eagerly. Each compile
# takes 15-35 s on 2 cores, so the default suite compiles one (as test_compile.py does) and the
# others run with -m slow
COMPILED = [
    (1000, "tokens"),
    pytest.param(1021, "image", marks=pytest.mark.slow),
    pytest.param(1001, "sequence", marks=pytest.mark.slow),
    pytest.param(1066, "features", marks=pytest.mark.slow),
]


@pytest.mark.compile
@pytest.mark.parametrize("seed, stem", COMPILED)
def test_random_model_compiled(seed, stem):
    _run(seed, compile=True, max_blocks=4, exclude=COSTLY, stems=(stem,))
