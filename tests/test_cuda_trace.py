"""The compiled step as it is traced for CUDA keeps the batch symbolic: every zoo model and small
Hugging Face GPT-2, BERT and ViT models, on a machine without a GPU (tests/fake_cuda.py says how;
tracing only, no inductor)."""

import pytest
import torch

import fxclip
from fxclip.tools.bench.hf import HF_TINY
from fxclip.zoo import ZOO, PerExampleCrossEntropy
from fake_cuda import cuda_step_graph, targets, tensor_devices

LOSS = PerExampleCrossEntropy()
aten, ops = torch.ops.aten, torch.ops.fxclip

# zoo models with a large conv, whose per-example gradients come from fxclip::conv_weight_grad,
# and with a padded conv small enough to be unfolded into patches or with few input channels (an
# RGB stem: per kernel offset), whose pad is an op of the step
CONV_KERNEL = {"mnist_cnn", "resnet_gn", "depthwise"}
PADDED_PATCHES = {"small_cnn", "resnet_gn", "depthwise"}
UNROLLED = {"lstm", "gru"}  # written out per time step: cut to 8 steps


def _private(model, loss_fn, inputs, targets_):
    private = fxclip.transform(model, loss_fn, 1.0)
    private.step(inputs, targets_)
    return private


def _check(graphs):
    """The ops of the step graph traced for CUDA, after checking that all its tensors are."""
    step_graph, on_cuda = graphs
    assert tensor_devices(on_cuda) == {"cuda"}
    assert ops.gather_rows.default not in targets(step_graph)
    return targets(step_graph)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_step_traced_for_cuda_keeps_the_batch_symbolic(name):
    """Also the CUDA side of each CPU-only branch of the step: embeddings stay aten.embedding
    (fxclip::gather_rows on a CPU), pads stay aten.constant_pad_nd, and the conv weight-gradient
    op (which chunks its kernel only on a CPU) is traced as the one op it is."""
    torch.manual_seed(0)
    model = ZOO[name].factory()
    inputs, y = ZOO[name].make_batch(6, torch.Generator().manual_seed(0))
    if name in UNROLLED:  # the same ops as at full length, in a quarter of the time
        inputs, y = (inputs[0][:, :8],), (y[:, :8] if y.dim() == 2 else y)
    # raises if the batch got fixed
    ops_used = _check(cuda_step_graph(_private(model, LOSS, inputs, y), inputs, y))
    modules = list(model.modules())
    embeds = any(isinstance(m, torch.nn.Embedding) for m in modules)
    assert (aten.embedding.default in ops_used) == embeds
    assert (aten.constant_pad_nd.default in ops_used) == (name in PADDED_PATCHES)
    assert (ops.conv_weight_grad.default in ops_used) == (name in CONV_KERNEL)


def test_ghost_gram_products_traced_for_cuda_keep_the_batch_symbolic():
    """The ghost norm's Gram products (batched matmuls of [B·G, T, k] factors) fixed the batch in
    a CUDA trace with torch 2.11 before the trace ran under the Python dispatcher."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    inputs, y = (torch.randn(5, 7, 8),), torch.randint(0, 4, (5, 7))
    private = fxclip.transform(model, LOSS, 1.0, strategy="ghost")
    private.step(inputs, y)
    # the weights' norms by Gram products; the biases' per-example gradients are built (bias_form)
    assert {e.use.params[0]: e.strategy for e in private.program.plan} == {
        "0.weight": "ghost", "0.bias": "materialize", "2.weight": "ghost", "2.bias": "materialize"
    }
    assert aten.bmm.default in _check(cuda_step_graph(private, inputs, y))


def test_a_cpu_trace_unfuses_the_row_gathers_the_cuda_trace_keeps():
    """The counterpart the CUDA test relies on: the same model traced for the CPU gathers rows by
    fxclip::gather_rows, so the CUDA graph's aten.embedding is the CUDA branch, not an accident."""
    from fxclip.passes.compile import CompiledStep

    torch.manual_seed(0)
    inputs, y = ZOO["bow"].make_batch(6, torch.Generator().manual_seed(0))
    private = _private(ZOO["bow"].factory(), LOSS, inputs, y)
    bound = private.bind(inputs, y)
    graph, _ = CompiledStep(bound, 1.0).trace(bound.flat_args)
    assert ops.gather_rows.default in targets(graph) and aten.embedding.default not in targets(graph)


@pytest.mark.parametrize("name", ["hf_gpt2", "hf_bert", "hf_vit"])
def test_hugging_face_step_traced_for_cuda_keeps_the_batch_symbolic(name):
    pytest.importorskip("transformers")
    entry = HF_TINY[name]
    torch.manual_seed(0)
    inputs, y = entry.make_batch(6, torch.Generator().manual_seed(0))
    private = _private(entry.factory(), entry.loss_fn, inputs, y)
    assert not private.fallbacks
    _check(cuda_step_graph(private, inputs, y))
