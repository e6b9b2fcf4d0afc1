"""The whole-model fallback: a model torch.export cannot capture still gets exact clipped
per-example gradients (torch.func, or one backward per example), with a FallbackWarning."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxclip
from fxclip.reference import clipped_sum, naive_per_example_grads


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


class BranchPerExample(nn.Module):
    """Python control flow on each example's values: export cannot trace it, vmap cannot run it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return torch.stack([self.a(xi) if xi.sum() > 0 else self.b(xi).tanh() for xi in x])


class PackedLSTM(nn.Module):
    """Variable-length sequences through pack_padded_sequence (export fails on the packing)."""

    def __init__(self):
        super().__init__()
        self.lstm, self.head = nn.LSTM(4, 5, batch_first=True), nn.Linear(5, 3)

    def forward(self, x, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        return self.head(self.lstm(packed)[1][0][-1])


def assert_matches_the_loop(model, result, x, y, max_grad_norm):
    """The step's norms and clipped sums (in p.grad) are the per-example loop's."""
    ref_norms, ref_sum = clipped_sum(naive_per_example_grads(model, ce, (x,), y), max_grad_norm)
    torch.testing.assert_close(result.norms, ref_norms)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_sum[name])


def test_uncapturable_model_gets_exact_clipped_gradients_and_a_warning():
    torch.manual_seed(0)
    model = BranchPerExample().double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    t = fxclip.transform(model, ce, max_grad_norm=0.5)
    with pytest.warns(fxclip.FallbackWarning, match="(?s)torch.export could not capture.*whole-model fallback"):
        result = t.step(x, y)
    assert_matches_the_loop(model, result, x, y, 0.5)
    torch.testing.assert_close(result.losses, ce(model(x), y).detach())
    assert (result.norms * result.clip_factors <= 0.5 + 1e-9).all()  # the privacy bound
    assert t.fallbacks and t.fallbacks[0].startswith("the whole model (torch.export could not capture")
    with pytest.raises(fxclip.FxclipError, match="whole-model fallback"):
        t.explain()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per capture, not per step
        t.step(x, y)


class BagsByOffsets(nn.Module):
    """One bag per example, given as flat tokens and offsets computed from the batch size."""

    def __init__(self):
        super().__init__()
        self.bag, self.head = nn.EmbeddingBag(10, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.bag(x.flatten(), torch.arange(x.shape[0]) * x.shape[1]))


@pytest.mark.parametrize("options", [{}, {"max_physical_batch_size": 2, "compile": True}], ids=["eager", "chunks_compiled"])
def test_op_no_rule_covers_takes_the_fallback(options):
    # the embedding_bag rule covers bags of one row of a 2-D input each; other offsets are found
    # when the rule first runs (inside the step program, or its trace under compile), after
    # capture succeeded
    torch.manual_seed(0)
    model = BagsByOffsets().double()
    x, y = torch.randint(0, 10, (5, 3)), torch.randint(0, 3, (5,))
    t = fxclip.transform(model, ce, max_grad_norm=0.3, **options)
    with pytest.warns(fxclip.FallbackWarning, match="(?s)offsets other than.*whole-model fallback"):
        result = t.step(x, y)
    assert_matches_the_loop(model, result, x, y, 0.3)
    assert t.fallbacks[0].startswith("the whole model (")


class SharedLayerBranch(nn.Module):
    """One layer under two attributes, and Python control flow on a value: the fallback's
    torch.func call must leave both registered as the optimizer's parameters."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 3)
        self.b = self.a

    def forward(self, x):
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        return self.head(h if float(x.sum()) > -1e9 else -h)


def test_fallback_keeps_a_layer_registered_twice_a_parameter():
    torch.manual_seed(0)
    model = SharedLayerBranch().double()
    registered = list(model.parameters())
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    t = fxclip.transform(model, ce, max_grad_norm=0.5)
    with pytest.warns(fxclip.FallbackWarning):
        result = t.step(x, y)
    assert list(model.parameters()) == registered and all(isinstance(p, nn.Parameter) for p in registered)
    assert_matches_the_loop(model, result, x, y, 0.5)


def test_packed_sequences_with_physical_batches():
    torch.manual_seed(0)
    model = PackedLSTM().double()
    x, lengths = torch.randn(5, 4, 4, dtype=torch.float64), torch.tensor([4, 2, 3, 1, 4])
    y = torch.randint(0, 3, (5,))
    t = fxclip.transform(model, ce, max_grad_norm=1.0, max_physical_batch_size=2)
    with pytest.warns(fxclip.FallbackWarning):
        result = t.step((x, lengths), y)
    ref_norms, ref_sum = clipped_sum(naive_per_example_grads(model, ce, (x, lengths), y), 1.0)
    torch.testing.assert_close(result.norms, ref_norms)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_sum[name])


def test_fallback_still_refuses_a_reduced_loss_and_writes_nothing():
    model = BranchPerExample()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = {k: (p.detach().clone(), p.grad.clone()) for k, p in model.named_parameters()}
    t = fxclip.transform(model, lambda out, y: F.cross_entropy(out, y), max_grad_norm=1.0)
    with pytest.warns(fxclip.FallbackWarning), pytest.raises(fxclip.CaptureError, match="one loss per example"):
        t.step(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    for k, p in model.named_parameters():
        assert torch.equal(p.detach(), before[k][0]) and torch.equal(p.grad, before[k][1])


def test_warning_can_be_made_an_error():
    t = fxclip.transform(BranchPerExample(), ce, max_grad_norm=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxclip.FallbackWarning)
        with pytest.raises(fxclip.FallbackWarning):
            t.step(torch.randn(3, 4), torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("targets", [None, "dict"])
def test_fallback_with_no_targets_or_a_dict_of_them(targets):
    torch.manual_seed(0)
    model = BranchPerExample().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    if targets is None:
        loss_fn = lambda out, y: (out**2).sum(1)  # noqa: E731
    else:
        targets = {"y": torch.randn(5, 3, dtype=torch.float64)}
        loss_fn = lambda out, y: ((out - y["y"]) ** 2).sum(1)  # noqa: E731
    with pytest.warns(fxclip.FallbackWarning):
        result = fxclip.transform(model, loss_fn, max_grad_norm=1.0).step(x, targets)
    ref_norms, ref_sum = clipped_sum(naive_per_example_grads(model, loss_fn, (x,), targets), 1.0)
    torch.testing.assert_close(result.norms, ref_norms)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_sum[name])


def test_model_that_runs_only_on_full_batches_gets_both_reasons_and_writes_nothing():
    class FixedBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x.view(3, 4))  # the batch size written into the code

    model = FixedBatch()
    t = fxclip.transform(model, ce, max_grad_norm=1.0)
    # too small a batch for halves: nothing can decide that its examples are independent
    with pytest.warns(fxclip.FallbackWarning), pytest.raises(fxclip.ExampleMixingError, match="(?s)fail on every part of the batch.*one example at a time because"):
        t.step(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    assert all(p.grad is None for p in model.parameters())


class ReverseGradient(torch.autograd.Function):
    """Identity forward, negated backward: the gradient is not the derivative of the forward."""

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return -grad


class CustomBackward(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how, self.a, self.b = how, nn.Linear(4, 3), nn.Linear(3, 3)
        if how == "module hook":
            self.b.register_full_backward_hook(lambda module, grad_in, grad_out: (3.0 * grad_in[0],))

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.how == "tensor hook" and h.requires_grad:
            h.register_hook(lambda grad: 3.0 * grad)
        if self.how == "autograd.Function":
            h = ReverseGradient.apply(h)
        return self.b(h)


@pytest.mark.parametrize(
    "how, reason",
    [("tensor hook", "Tensor.register_hook"), ("module hook", "backward hook"), ("autograd.Function", "ReverseGradient")],
)
def test_a_backward_the_forward_does_not_show_takes_the_fallback(how, reason):
    # export records the forward only: the graph path would differentiate it and skip the hook
    torch.manual_seed(0)
    model = CustomBackward(how).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.warns(fxclip.FallbackWarning, match=reason):
        result = fxclip.transform(model, ce, max_grad_norm=0.5).step(x, y)
    assert_matches_the_loop(model, result, x, y, 0.5)



class TwoViews(nn.Module):
    """Both views of each example through one encoder as one batch of 2B, split back: no mixing,
    but the graph's batch axes cannot follow a batch concatenated with itself."""

    def __init__(self):
        super().__init__()
        self.enc, self.head = nn.Linear(4, 5), nn.Linear(10, 3)

    def forward(self, x):
        z = self.enc(torch.cat([x, x.flip(-1)]))
        return self.head(torch.cat([z[: x.shape[0]], z[x.shape[0] :]], -1))


class Prototypes(nn.Module):
    """torch.cdist picks its algorithm by size: export guards the batch to at most 25."""

    def __init__(self):
        super().__init__()
        self.enc, self.prototypes = nn.Linear(4, 5), nn.Parameter(torch.randn(3, 5))

    def forward(self, x):
        return -torch.cdist(self.enc(x), self.prototypes)


@pytest.mark.parametrize(
    "make, reason",
    [(TwoViews, "cannot tell where the batch is"), (lambda: BoundedBatch(lambda b: torch._check(b != 4)), "Constraints violated")],
    ids=["batch_concatenated_with_itself", "guard_not_a_bound"],
)
def test_a_model_the_graph_path_cannot_follow_falls_back_saying_why(make, reason):
    torch.manual_seed(0)
    model = make().double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.warns(fxclip.FallbackWarning, match=reason):
        result = fxclip.transform(model, ce, max_grad_norm=0.5).step(x, y)
    assert_matches_the_loop(model, result, x, y, 0.5)


class BoundedBatch(nn.Module):
    """A kernel that bounds the batch (cuDNN's batch norm checks B <= 65535 on a GPU)."""

    def __init__(self, bound):
        super().__init__()
        self.lin, self.bound = nn.Linear(4, 3), bound

    def forward(self, x):
        self.bound(x.shape[0])
        return self.lin(x)


def test_a_bound_on_the_batch_keeps_the_graph_path():
    model = BoundedBatch(lambda b: torch._check(b <= 65535)).double()
    t = fxclip.transform(model, ce, max_grad_norm=1.0)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxclip.FallbackWarning)
        result = t.step(x, y)
    ref_norms, ref_sum = clipped_sum(naive_per_example_grads(model, ce, (x,), y), 1.0)
    torch.testing.assert_close(result.norms, ref_norms)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_sum[name])


@pytest.mark.parametrize("batch", [6, 60])
def test_a_batch_over_the_graphs_bound_runs_in_chunks_it_holds(batch):
    torch.manual_seed(0)
    model = Prototypes().double()
    x, y = torch.randn(batch, 4, dtype=torch.float64), torch.randint(0, 3, (batch,))
    t = fxclip.transform(model, ce, max_grad_norm=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxclip.FallbackWarning)
        result = t.step(x, y)
    (capture,) = t.captures
    assert capture.step.batch_limit == 25
    assert_matches_the_loop(model, result, x, y, 0.5)
