"""verify=True: a step's norms and clipped sums compared with the torch.func reference."""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree

from .batch import select_examples
from .clipping import FLAT, Clipping, bound_values
from .errors import VerificationError
from .reference import any_per_example_grads, clip_and_sum


def verify_step(
    step, inputs: tuple, targets, dims: tuple[int, ...], max_grad_norm, strategy: str, examples: int = 8, clipping: Clipping = FLAT
) -> None:
    """Compare the norms (per group too, for per_layer `clipping`) and clipped sum of the first few
    examples by `step` (a `captures.GraphStep`, run eagerly) with the torch.func reference (or,
    for ops torch.func cannot run, a loop of one backward per example), clipped the same way."""
    random_ops = [n.target for n in step.exported.graph_module.graph.nodes if _draws_random_numbers(n)]
    if random_ops:
        raise VerificationError(
            f"verify=True needs a deterministic model, and this one draws random numbers ({random_ops[0]}): "
            "a reference cannot reproduce the batch's masks. Verify in eval() mode, or pass verify=False."
        )
    k = min(examples, pytree.tree_leaves(targets)[0].shape[0])
    sub_inputs, sub_targets = select_examples(inputs, targets, dims, 0, k)
    output = step.program(step.bind(sub_inputs, sub_targets).flat_args, max_grad_norm, strategy, clipping=clipping)
    norms, grads, group_norms = output.norms, output.grads, output.group_norms
    ref, _ = any_per_example_grads(step.model, step.loss_fn, sub_inputs, sub_targets, dims)
    ref_norms, _, ref_clipped, ref_group_norms = clip_and_sum(ref, max_grad_norm, clipping)
    tol = 1e-6 if norms.dtype == torch.float64 else 1e-3
    scale = ref_norms.abs().max().clamp(min=1e-12)
    if ((norms - ref_norms).abs() > tol * scale).any():
        raise VerificationError(f"per-example norms differ from the reference: fxclip {norms.tolist()} vs {ref_norms.tolist()}")
    if group_norms is not None and ((group_norms - ref_group_norms).abs() > tol * scale).any():
        raise VerificationError(f"per-group norms differ from the reference: fxclip {group_norms.tolist()} vs {ref_group_norms.tolist()}")
    largest_bound = max(bound_values(max_grad_norm))
    bad = []
    for key, expected in ref_clipped.items():
        got = grads.get(key, torch.zeros_like(expected)).to_dense()  # sparse for nn.Embedding(sparse=True)
        if (got - expected).abs().max() > tol * max(float(expected.abs().max()), largest_bound):
            bad.append(key)
    if bad:
        raise VerificationError(f"clipped gradients differ from the reference for parameters {bad}")


def _draws_random_numbers(node: torch.fx.Node) -> bool:
    """Whether the op samples: a random op, but not a dropout that is the identity (p = 0 or eval
    mode, as Hugging Face models record theirs in eval mode) nor attention without dropout."""
    if not (isinstance(node.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in node.target.tags):
        return False
    names = [a.name for a in node.target._schema.arguments]
    args = {**dict(zip(names, node.args)), **node.kwargs}
    if node.target in (torch.ops.aten.dropout.default, torch.ops.aten.native_dropout.default):
        return bool(args["train"]) and args["p"] != 0
    if node.target is torch.ops.aten.scaled_dot_product_attention.default:
        return args.get("dropout_p", 0.0) != 0
    return True
