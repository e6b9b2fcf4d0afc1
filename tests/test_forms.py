"""The forms in isolation: ghost and materialize agree with an explicit per-example gradient."""

import pathlib
import re

import pytest
import sympy
import torch

from fxclip.forms import (
    MEMORY_COST,
    Dense,
    Form,
    LinearForm,
    OneHot,
    PerExampleGrad,
    choose_strategy,
    cost_formulas,
    cost_values,
    ghost_norm_sq,
    linear_forms_norm_sq,
)


def explicit(left, right):
    """Σ_t left_tᵀ right_t by one-hot expansion: independent of fxclip's gram/outer_sum code."""
    def dense(f):
        if isinstance(f, Dense):
            return f.values
        return torch.nn.functional.one_hot(f.index, f.k).double() * f.weight.unsqueeze(-1)

    return torch.einsum("bgtl,bgtr->bglr", dense(left), dense(right))


def factor(kind, b, g, t, k, gen):
    if kind == "dense":
        return Dense(torch.randn(b, g, t, k, generator=gen, dtype=torch.float64))
    index = torch.randint(0, k, (b, g, t), generator=gen)
    return OneHot(index, k, (torch.rand(b, g, t, generator=gen) > 0.2).double())


@pytest.mark.parametrize("left_kind", ["dense", "onehot"])
@pytest.mark.parametrize("right_kind", ["dense", "onehot"])
@pytest.mark.parametrize("uses", [1, 3])
def test_norms_and_clipped_sums(left_kind, right_kind, uses):
    gen = torch.Generator().manual_seed(0)
    b, g = 4, 2
    forms = [
        LinearForm(factor(left_kind, b, g, t, 5, gen), factor(right_kind, b, g, t, 3, gen), torch.Size([g * 5, 3]))
        for t in (6, 1, 4)[:uses]
    ]
    total = sum(explicit(f.left, f.right) for f in forms)
    expected = total.pow(2).flatten(1).sum(1)
    for strategy in ("ghost", "materialize"):
        torch.testing.assert_close(linear_forms_norm_sq(forms, strategy), expected, rtol=1e-12, atol=1e-12)
    c = torch.rand(b, generator=gen, dtype=torch.float64)
    for f in forms:  # materialized above; a fresh copy takes the contraction path
        expected_sum = torch.einsum("b,bglr->glr", c, explicit(f.left, f.right)).reshape(f.shape)
        for form in (f, LinearForm(f.left, f.right, f.shape)):
            torch.testing.assert_close(form.clipped_sum(c), expected_sum, rtol=1e-12, atol=1e-12)


def test_mixed_kinds_of_one_parameter():
    """A tied weight: an embedding (one-hot rows) and an output layer (dense) share W."""
    gen = torch.Generator().manual_seed(1)
    emb = LinearForm(factor("onehot", 3, 1, 5, 7, gen), factor("dense", 3, 1, 5, 4, gen), torch.Size([7, 4]))
    out = LinearForm(factor("dense", 3, 1, 2, 7, gen), factor("dense", 3, 1, 2, 4, gen), torch.Size([7, 4]))
    expected = (explicit(emb.left, emb.right) + explicit(out.left, out.right)).pow(2).flatten(1).sum(1)
    torch.testing.assert_close(ghost_norm_sq([emb, out]), expected, rtol=1e-12, atol=1e-12)


def test_cost_model_prefers_materialize_for_long_sequences():
    gen = torch.Generator().manual_seed(2)
    long = LinearForm(factor("dense", 1, 1, 1024, 8, gen), factor("dense", 1, 1, 1024, 8, gen), torch.Size([8, 8]))
    short = LinearForm(factor("dense", 1, 1, 2, 64, gen), factor("dense", 1, 1, 2, 64, gen), torch.Size([64, 64]))
    assert choose_strategy([long], "auto") == "materialize"
    assert choose_strategy([short], "auto") == "ghost"
    assert choose_strategy([short], "materialize") == "materialize"
    costs = cost_values([long])
    assert costs["memory"]["ghost"] == 2 * 1024**2 and costs["shapes"]["T"] == 1024
    assert choose_strategy([long], "auto", memory_budget=10) == "materialize"  # nothing fits: least memory
    assert str(cost_formulas([long])["materialize"]) == "G*T*k_L*k_R + G*k_L*k_R"


def test_one_hot_forms_materialize_only_the_nonzero_rows():
    """An embedding's per-example gradient has at most T nonzero rows: materializing it costs T·k
    work (plus the sort's per-position cost) and memory, not V·k, so "auto" takes it over T² Gram
    products for long sequences, and the Gram products for short ones."""
    from fxclip.forms.costs import ONE_HOT_ROWS_PER_POSITION

    gen = torch.Generator().manual_seed(3)

    def embedding(positions):
        return LinearForm(
            factor("onehot", 1, 1, positions, 50000, gen), factor("dense", 1, 1, positions, 64, gen), torch.Size([50000, 64])
        )

    costs = cost_values([embedding(512)])
    assert costs["flops"]["materialize"] == 512 * (64 + ONE_HOT_ROWS_PER_POSITION) and costs["memory"]["materialize"] == 512 * 64
    for positions, strategy in ((512, "materialize"), (64, "materialize"), (32, "ghost"), (8, "ghost")):
        assert choose_strategy([embedding(positions)], "auto") == strategy, positions
        assert choose_strategy([embedding(positions).transposed()], "auto") == strategy, positions


def _float32(f):
    return Dense(f.values.float()) if isinstance(f, Dense) else OneHot(f.index, f.k, f.weight.float())


@pytest.mark.parametrize("left_kind", ["dense", "onehot"])
@pytest.mark.parametrize("uses", [1, 2])
def test_ghost_norms_that_overflow_are_nan_and_exact_when_safe(left_kind, uses):
    """float32 factors near 1e20 and 1e-20 (inputs near 1e20, a loss scaled down to match): the
    large factor's Gram products overflow, while ‖G_i‖ is about 1. The plain ghost norm is then NaN
    or infinite (never a wrong finite number); `safe` is exact, also for example 1, whose gradient
    is exactly zero (inf · 0 in the plain Gram product of dense factors)."""
    gen = torch.Generator().manual_seed(4)
    forms = []
    for t in (5, 3)[:uses]:
        large = factor(left_kind, 4, 2, t, 6, gen)
        small = factor("dense", 4, 2, t, 3, gen).values * 1e-20
        small[1] = 0
        if isinstance(large, Dense):
            large = Dense(large.values * 1e20)
        else:
            large = OneHot(large.index, large.k, large.weight * 1e20)
        forms.append(LinearForm(large, Dense(small), torch.Size([12, 3])))
    expected = sum(explicit(f.left, f.right) for f in forms).pow(2).flatten(1).sum(1)
    assert expected[1] == 0 and 1e-2 < float(expected.max()) < 1e3
    forms32 = [LinearForm(_float32(f.left), _float32(f.right), f.shape) for f in forms]
    plain = ghost_norm_sq(forms32)
    assert not torch.isfinite(plain[[0, 2, 3]]).any()
    assert plain[1].isnan() or plain[1] == 0  # zero one-hot weights: exact zeros, no overflow
    safe = ghost_norm_sq(forms32, safe=True)
    assert safe.dtype == torch.float64 and safe[1] == 0
    torch.testing.assert_close(safe, expected, rtol=1e-5, atol=0)


def test_ghost_norms_that_cancel_below_zero_are_nan():
    """Two positions whose gradients nearly cancel, under large inputs: the float32 sum of the Gram
    products loses every digit and may come out negative; those examples are NaN (the step then
    computes them safely), none is negative."""
    gen = torch.Generator().manual_seed(5)
    a = (1000 + 1e-3 * torch.randn(64, 1, 1, 8, generator=gen)).expand(64, 1, 2, 8)
    g = torch.randn(64, 1, 1, 4, generator=gen)
    g = torch.cat([g, -g + 1e-6 * torch.randn(64, 1, 1, 4, generator=gen)], 2)
    form = LinearForm(Dense(g), Dense(a), torch.Size([4, 8]))
    plain = ghost_norm_sq([form])
    assert plain.isnan().any() and not (plain < 0).any()
    assert (ghost_norm_sq([form], safe=True) >= 0).all()


def test_safe_materialized_norms_do_not_overflow():
    from fxclip.forms import materialized_norm_sq

    grads = torch.tensor([[3e20, 4e20], [0.0, 0.0], [1e-30, 0.0]])
    assert torch.isinf(materialized_norm_sq(grads)[0])
    expected = torch.tensor([25e40, 0.0, 1e-60], dtype=torch.float64)
    torch.testing.assert_close(materialized_norm_sq(grads, safe=True), expected, rtol=1e-6, atol=0)


def test_every_form_is_a_form_and_transposes():
    """emit takes a transposed use's form through `transposed()`, whichever form a rule returned."""
    gen = torch.Generator().manual_seed(6)
    linear = LinearForm(factor("dense", 2, 1, 3, 4, gen), factor("dense", 2, 1, 3, 5, gen), torch.Size([4, 5]))
    grads = PerExampleGrad(linear.materialize())
    for form in (linear, grads):
        assert isinstance(form, Form)
        torch.testing.assert_close(form.transposed().materialize(), form.materialize().transpose(-1, -2))
    assert grads.costs() is None and set(linear.costs()["flops"]) == {"ghost", "materialize"}


def test_docs_quote_the_cost_formulas():
    """docs/rules.md's table of costs is `costs`' own statement, not a copy that drifts."""
    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "rules.md").read_text()
    gen = torch.Generator().manual_seed(7)
    rows = {"dense, dense": "dense", "one-hot, dense (an embedding)": "onehot"}
    for label, left_kind in rows.items():
        ghost, materialize = re.search(rf"\| {re.escape(label)} \| `(.+?)` \| `(.+?)` \|", text).groups()
        form = LinearForm(factor(left_kind, 1, 1, 2, 3, gen), factor("dense", 1, 1, 2, 3, gen), torch.Size([3, 3]))
        for quoted, formula in ((ghost, cost_formulas([form])["ghost"]), (materialize, cost_formulas([form])["materialize"])):
            parsed = sympy.sympify(quoted.replace("·", "*").replace("²", "**2"), locals={s.name: s for s in formula.free_symbols})
            assert sympy.simplify(parsed - formula) == 0, (label, quoted, formula)
    assert f"`MEMORY_COST` ({MEMORY_COST})" in text
