"""The compiled step's graph as it is traced for CUDA, on a machine without a GPU.

A CPU-only torch makes fake tensors on device "cuda" (FakeTensorMode), and their fake kernels are
the ones a CUDA trace runs, but autograd cannot run over them without a CUDA runtime (the engine
asks the accelerator for streams: torch 2.13+cpu has none; 2.11+cu130 without a GPU fails on its
primary context). So the step is traced in two stages:

1. `CompiledStep.trace` with the device-dependent graph passes for CUDA (row gathers stay
   fused), on CPU fake tensors: forward, autograd's backward and the rules into aten ops;
2. that graph re-traced (make_fx under the Python dispatcher, as `trace` does) on fake CUDA
   tensors with the same symbolic batch: every op runs its CUDA fake kernel, and a guard that
   fixes the batch raises `BatchSpecializedError` as it does in a real CUDA trace.

What stage 2 cannot see: a C++ composite op that picks its kernels by device while stage 1
decomposes it on the CPU (scaled_dot_product_attention's CUDA backends); the GPU run covers those.
"""

from __future__ import annotations

import copy

import torch
from torch._dispatch.python import enable_python_dispatcher
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import GraphModule
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
from torch.fx.node import map_aggregate

import fxclip
from fxclip.passes.compile import CompiledStep, _check_batch_symbolic

CUDA = torch.device("cuda", 0)


def _concrete(sizes) -> list[int]:
    return [int(s.node.hint) if isinstance(s, torch.SymInt) else int(s) for s in sizes]


def _on_cuda(mode: FakeTensorMode, fake: torch.Tensor) -> torch.Tensor:
    """A fake CUDA tensor like `fake`, its symbolic sizes (the batch) symbolic again in `mode`."""
    dynamic = [DimDynamic.DYNAMIC if isinstance(s, torch.SymInt) else DimDynamic.STATIC for s in fake.shape]
    example = torch.empty_strided(_concrete(fake.shape), _concrete(fake.stride()), dtype=fake.dtype)
    symbolic = mode.from_tensor(example, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dynamic))
    with mode:
        return torch.empty_strided(symbolic.shape, symbolic.stride(), dtype=fake.dtype, device=CUDA)


def retrace_on_cuda(gm: GraphModule, fakes: list) -> GraphModule:
    """Stage 2: `gm` (traced on CPU fakes) run op by op on fake CUDA tensors with a symbolic batch;
    the devices the graph names (a constant made on the CPU) become CUDA, as a CUDA capture
    records them. Raises BatchSpecializedError if some op fixed the batch."""
    shape_env = ShapeEnv(duck_shape=False)
    mode = FakeTensorMode(shape_env=shape_env)
    inputs = [_on_cuda(mode, f) if isinstance(f, torch.Tensor) else f for f in fakes]
    for node in gm.graph.nodes:
        to_cuda = lambda a: CUDA if isinstance(a, torch.device) and a.type == "cpu" else a  # noqa: E731
        node.args, node.kwargs = map_aggregate(node.args, to_cuda), map_aggregate(node.kwargs, to_cuda)
    gm.recompile()
    with mode, enable_python_dispatcher(), torch.no_grad():
        traced = make_fx(gm, tracing_mode="fake")(*inputs)
    _check_batch_symbolic(shape_env, inputs[0].shape[0])
    return traced


def cuda_step_graph(private: fxclip.PrivateStep, inputs, targets) -> tuple[GraphModule, GraphModule]:
    """The compiled step of `private` (which has run a step on this batch) as traced for CUDA:
    (the step graph inductor would get, stage 2's graph of CUDA fake tensors). Raises
    BatchSpecializedError if either stage fixed the batch."""
    bound = private.bind(inputs, targets)
    gm, fakes = CompiledStep(bound, 1.0, strategy=private.strategy).trace(bound.flat_args, device=CUDA)
    # stage 2 decomposes some ops further (constant_pad_nd): it runs on a copy
    return gm, retrace_on_cuda(copy.deepcopy(gm), fakes)


def tensor_devices(gm: GraphModule) -> set[str]:
    return {v.device.type for n in gm.graph.nodes if isinstance(v := n.meta.get("val"), torch.Tensor)}


def targets(gm: GraphModule) -> set:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}
