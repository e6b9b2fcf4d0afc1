"""decompose: fused recurrent ops, and composite ops no rule covers, become the
parameter-using primitives they are made of.

torch.export keeps `aten.lstm`, `aten.gru`, `aten.rnn_tanh`, `aten.rnn_relu` (nn.LSTM, nn.GRU,
nn.RNN) as one node with every weight inside a list operand, and the cells (nn.LSTMCell, ...) as
one node per call. A rule at that level would only see the gradient at the layer's outputs, not at
each step's gates. This pass writes each op out the way ATen's CPU kernel computes it:

  the input projection (GRU: hoisted over all steps)  linear(x[T, B, I], W_ih, b_ih) -> [T, B, G·H]
                     (LSTM, RNN: at every step)      linear(x_t[B, I], W_ih, b_ih)
  the recurrent projection at every step              linear(h_{t-1}[B, H], W_hh, b_hh)
  the gate nonlinearities, elementwise                (and LSTM's projection linear(h, W_hr))

so the linear rule gives each use's form, and W_hh, b_hh (and W_hr; W_ih, b_ih when projected per
step) become parameters used T times whole: the emit pass takes the exact norm of their sum over
steps (the shared-parameter case), never a sum of per-step norms. No rule and no norm code knows about recurrent layers.
"""

from __future__ import annotations

import operator
from typing import Callable, Sequence

import torch
import torch.utils._pytree as pytree
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_arg

from ..errors import NotCovered
from ..provenance import where
from ..rules.registry import RULES
from .context import Context
from .inline import SOURCE_META, inline_trace, replace_node

aten = torch.ops.aten



class _Writer:
    """Writes aten calls into `graph` before `anchor`; each new node gets meta["val"] from running
    the op on fake tensors (symbolic batch included) and the anchor's source metadata."""

    def __init__(self, graph: Graph, anchor: Node, fake_mode):
        self.graph, self.anchor, self.fake_mode = graph, anchor, fake_mode

    def __call__(self, op, *args) -> Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(op, args)
        node.meta.update({k: self.anchor.meta[k] for k in SOURCE_META if k in self.anchor.meta})
        if op is operator.getitem:
            node.meta["val"] = args[0].meta["val"][args[1]]
        else:
            # under the Python dispatcher composite ops keep sizes symbolic (torch 2.11's C++
            # aten.unbind reads them as ints, which fixed the batch size)
            with self.fake_mode, enable_python_dispatcher():
                node.meta["val"] = op(*map_arg(args, lambda n: n.meta["val"]))
        return node

    def split(self, x: Node, parts: int) -> list[Node]:
        """`parts` equal slices of x along dim 1 (the gates of a [B, parts·H] projection)."""
        pieces = self(aten.split.Tensor, x, x.meta["val"].shape[1] // parts, 1)
        return [self(operator.getitem, pieces, j) for j in range(parts)]


# ---- one step of each cell, from the input already projected by W_ih ---------------------------
# Each follows ATen's CPU cell (aten/src/ATen/native/RNN.cpp) op for op, so values are the same.


def _lstm_step(w: _Writer, x_proj: Node, state: tuple, w_hh, b_hh, w_hr) -> tuple:
    h, c = state
    gates = w(aten.add.Tensor, w(aten.linear.default, h, w_hh, b_hh), x_proj)
    i, f, g, o = w.split(gates, 4)
    i, f, g, o = w(aten.sigmoid.default, i), w(aten.sigmoid.default, f), w(aten.tanh.default, g), w(aten.sigmoid.default, o)
    c = w(aten.add.Tensor, w(aten.mul.Tensor, f, c), w(aten.mul.Tensor, i, g))
    h = w(aten.mul.Tensor, o, w(aten.tanh.default, c))
    if w_hr is not None:
        h = w(aten.linear.default, h, w_hr, None)
    return h, c


def _gru_step(w: _Writer, x_proj: Node, state: tuple, w_hh, b_hh, w_hr) -> tuple:
    (h,) = state
    xr, xz, xn = w.split(x_proj, 3)
    hr, hz, hn = w.split(w(aten.linear.default, h, w_hh, b_hh), 3)
    r = w(aten.sigmoid.default, w(aten.add.Tensor, hr, xr))
    z = w(aten.sigmoid.default, w(aten.add.Tensor, hz, xz))
    n = w(aten.tanh.default, w(aten.add.Tensor, xn, w(aten.mul.Tensor, hn, r)))
    return (w(aten.add.Tensor, w(aten.mul.Tensor, w(aten.sub.Tensor, h, n), z), n),)


def _simple_step(nonlinearity) -> Callable:
    def step(w: _Writer, x_proj: Node, state: tuple, w_hh, b_hh, w_hr) -> tuple:
        (h,) = state
        return (w(nonlinearity, w(aten.add.Tensor, w(aten.linear.default, h, w_hh, b_hh), x_proj)),)

    return step


# Cells that add the two projections whole: projecting the input per step (not hoisted) gives both
# linear ops of a step the same output gradient, the one at their sum, so W_ih's and W_hh's
# uses share their left factors, and the compiled step computes each Gram product once.
PROJECTION_SUMMED = {"lstm", "rnn_tanh", "rnn_relu"}

STEPS = {"lstm": _lstm_step, "gru": _gru_step, "rnn_tanh": _simple_step(aten.tanh.default), "rnn_relu": _simple_step(aten.relu.default)}

LAYERS = {aten.lstm.input: "lstm", aten.gru.input: "gru", aten.rnn_tanh.input: "rnn_tanh", aten.rnn_relu.input: "rnn_relu"}
CELLS = {
    aten.lstm_cell.default: "lstm", aten.gru_cell.default: "gru",
    aten.rnn_tanh_cell.default: "rnn_tanh", aten.rnn_relu_cell.default: "rnn_relu",
}


# ---- whole layers -------------------------------------------------------------------------------


def _one_direction(w: _Writer, kind: str, x: Node, state: tuple, weights: Sequence, reverse: bool):
    """One layer in one direction over time-major x [T, B, I]: (outputs [T, B, H_out], final state)."""
    w_ih, w_hh, b_ih, b_hh, w_hr = weights
    steps = x.meta["val"].shape[0]
    if not isinstance(steps, int):
        raise NotCovered(
            f"{where(w.anchor)}: the sequence length is symbolic; fxclip unrolls recurrent layers and "
            "needs a fixed length per capture (pad the sequences to one length)"
        )
    if kind in PROJECTION_SUMMED:
        x_steps = w(aten.unbind.int, x, 0)
        projected = [w(aten.linear.default, w(operator.getitem, x_steps, t), w_ih, b_ih) for t in range(steps)]
    else:
        per_step = w(aten.unbind.int, w(aten.linear.default, x, w_ih, b_ih), 0)  # hoisted: [T, B, G·H]
        projected = [w(operator.getitem, per_step, t) for t in range(steps)]
    outputs: list = [None] * steps
    for t in reversed(range(steps)) if reverse else range(steps):
        state = STEPS[kind](w, projected[t], state, w_hh, b_hh, w_hr)
        outputs[t] = state[0]
    return w(aten.stack.default, outputs, 0), state


def _layer_weights(params: list, has_biases: bool, has_projections: bool) -> list[tuple]:
    """The flat weight list of a fused op, per (layer, direction): (W_ih, W_hh, b_ih, b_hh, W_hr)."""
    size = 2 + 2 * has_biases + has_projections
    groups = [params[i : i + size] for i in range(0, len(params), size)]
    out = []
    for g in groups:
        w_ih, w_hh, *rest = g
        b_ih, b_hh = (rest[0], rest[1]) if has_biases else (None, None)
        out.append((w_ih, w_hh, b_ih, b_hh, rest[-1] if has_projections else None))
    return out


def _decompose_layer(w: _Writer, kind: str, node: Node) -> list[Node]:
    """aten.<kind>.input -> its outputs (output, h_n[, c_n]) as new nodes."""
    x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first = node.args
    hidden = list(hx) if kind == "lstm" else [hx]  # [h_0] or [h_0, c_0], each [layers·dirs, B, H]
    has_projections = kind == "lstm" and hidden[0].meta["val"].shape[2] != hidden[1].meta["val"].shape[2]
    weights = _layer_weights(list(params), has_biases, has_projections)
    directions = 2 if bidirectional else 1
    layer_input = w(aten.transpose.int, x, 0, 1) if batch_first else x
    finals: list[tuple] = []
    for layer in range(num_layers):
        outputs = []
        for d in range(directions):
            k = layer * directions + d
            state = tuple(w(aten.select.int, h, 0, k) for h in hidden)
            out, state = _one_direction(w, kind, layer_input, state, weights[k], reverse=d == 1)
            outputs.append(out)
            finals.append(state)
        layer_input = outputs[0] if directions == 1 else w(aten.cat.default, outputs, 2)
        if dropout and train and layer < num_layers - 1:
            layer_input = w(aten.dropout.default, layer_input, dropout, True)
    output = w(aten.transpose.int, layer_input, 0, 1) if batch_first else layer_input
    return [output] + [w(aten.stack.default, [s[j] for s in finals], 0) for j in range(len(hidden))]


def _decompose_cell(w: _Writer, kind: str, node: Node) -> list[Node]:
    """aten.<kind>_cell -> its new state (h', or h', c' for the LSTM) as new nodes."""
    x, hx, w_ih, w_hh, b_ih, b_hh = (list(node.args) + [None] * 6)[:6]
    state = tuple(hx) if kind == "lstm" else (hx,)
    return list(STEPS[kind](w, w(aten.linear.default, x, w_ih, b_ih), state, w_hh, b_hh, None))


# ---- composite ops without a rule ----------------------------------------------------------------


def _parameter_values(graph: Graph, ctx: Context) -> set[Node]:
    """Nodes computed from trainable parameters (and constants) only."""
    params = dict(ctx.model.named_parameters())
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    values = {n for n, (kind, key) in zip(placeholders, ctx.placeholders) if kind == "param" and params[key].requires_grad}
    constant = {n for n, (kind, _) in zip(placeholders, ctx.placeholders) if kind in ("buffer", "constant")}
    for node in graph.nodes:
        if node.op == "call_function" and node.all_input_nodes:
            if all(n in values or n in constant for n in node.all_input_nodes) and any(n in values for n in node.all_input_nodes):
                values.add(node)
    return values


def _is_composite_without_rule(node: Node, parameter_values: set[Node]) -> bool:
    """An op fxclip would otherwise hand to the fallback although ATen writes it as other ops: it
    reads a parameter value and a batched one, has no rule, and has a CompositeImplicitAutograd kernel."""
    op = node.target
    if node.op != "call_function" or not isinstance(op, torch._ops.OpOverload) or op in RULES:
        return False
    if not torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), torch._C.DispatchKey.CompositeImplicitAutograd):
        return False
    inputs = node.all_input_nodes
    return any(n in parameter_values for n in inputs) and not all(n in parameter_values for n in inputs)


def _weight_norm_unfused(v: torch.Tensor, g: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """aten._weight_norm as ATen computes it without the fused kernel."""
    return v * (g / torch.norm_except_dim(v, 2, dim))


# Ops whose fused kernel's derivative has no vmap batching rule (`_weight_norm_interface_backward`):
# the per-example vjp through a parameter's chain (emit) would loop over the examples, one small
# backward each, and the loop fixes the batch size when the step is traced for compilation (the
# step then compiled once per bucket); and the fused recurrent cells of a GPU, whose biases no
# rule covers. They are written out as the unfused computation.
def _gru_cell_unfused(input_gates, hidden_gates, hx, input_bias=None, hidden_bias=None):
    """aten._thnn_fused_gru_cell (what nn.GRUCell runs on a GPU, after its two matrix products)
    as elementwise ops: (h', the [B, 5H] workspace, which only the fused backward reads)."""
    input_gates = input_gates if input_bias is None else input_gates + input_bias
    hidden_gates = hidden_gates if hidden_bias is None else hidden_gates + hidden_bias
    i_r, i_z, i_n = input_gates.chunk(3, 1)
    h_r, h_z, h_n = hidden_gates.chunk(3, 1)
    reset, update = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    new = torch.tanh(i_n + reset * h_n)
    return new + update * (hx - new), torch.cat([reset, update, h_n, hx - new, new], 1)


def _lstm_cell_unfused(input_gates, hidden_gates, cx, input_bias=None, hidden_bias=None):
    """aten._thnn_fused_lstm_cell (nn.LSTMCell on a GPU) as elementwise ops: (h', c', workspace)."""
    gates = input_gates + hidden_gates
    gates = gates if input_bias is None else gates + input_bias
    gates = gates if hidden_bias is None else gates + hidden_bias
    i, f, g, o = gates.chunk(4, 1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    cy = f * cx + i * g
    return o * torch.tanh(cy), cy, torch.cat([i, f, g, o], 1)


def _gru_cell_meta(input_gates, hidden_gates, hx, input_bias=None, hidden_bias=None):
    return hx.new_empty(hx.shape), hx.new_empty(hx.shape[0], 5 * hx.shape[1])


# torch.export records the fused cell of nn.GRUCell on a GPU; torch has no fake kernel for it
if not torch._C._dispatch_has_kernel_for_dispatch_key("aten::_thnn_fused_gru_cell", "Meta"):
    _ATEN_META = torch.library.Library("aten", "IMPL")
    _ATEN_META.impl("_thnn_fused_gru_cell", _gru_cell_meta, "Meta")

UNFUSED: dict[Callable, Callable] = {
    aten._weight_norm.default: _weight_norm_unfused,
    aten._thnn_fused_gru_cell.default: _gru_cell_unfused,
    aten._thnn_fused_lstm_cell.default: _lstm_cell_unfused,
}


def _inline(gm: GraphModule, node: Node, fake_mode, fn: Callable) -> None:
    """Replace `node` by the ops fn(*its arguments) runs (left alone when it cannot be traced)."""
    flat, spec = pytree.tree_flatten((node.args, node.kwargs))
    positions = [i for i, a in enumerate(flat) if isinstance(a, Node)]

    def run(*tensors):
        leaves = list(flat)
        for i, t in zip(positions, tensors):
            leaves[i] = t
        args, kwargs = pytree.tree_unflatten(leaves, spec)
        return fn(*args, **kwargs)

    try:
        inline_trace(gm, node, run, [flat[i] for i in positions], fake_mode)
    except Exception:  # a kernel tracing cannot run: the op stays whole, for the per-op fallback
        pass


def _reshaped_outputs(node: Node, outputs: list, multi_output: bool) -> list[Node]:
    """The replacements whose shape differs from what the graph recorded for the op's output:
    torch 2.11's fake kernel of aten.lstm with an explicit initial state gives h_n and c_n a
    leading dim too many ([1, 1, B, H]), so the recorded shapes of their users are wrong too."""
    if not multi_output:
        pairs = [(node, outputs[0])]
    else:
        pairs = [(user, outputs[user.args[1]]) for user in node.users if user.target is operator.getitem]
    return [new for old, new in pairs
            if isinstance(old.meta.get("val"), torch.Tensor) and old.meta["val"].shape != new.meta["val"].shape]


def _refresh_meta_after(graph: Graph, changed: set[Node], fake_mode) -> None:
    """meta["val"] of every op that reads a node in `changed`, and of theirs, computed again."""
    for node in graph.nodes:
        if node.op == "call_function" and any(n in changed for n in node.all_input_nodes):
            with fake_mode:
                node.meta["val"] = node.target(
                    *map_arg(node.args, lambda n: n.meta["val"]), **map_arg(node.kwargs, lambda n: n.meta["val"])
                )
            changed.add(node)


def decompose(gm: GraphModule, ctx: Context) -> GraphModule:
    """Guarantees: no fused recurrent op (aten.lstm/gru/rnn_tanh/rnn_relu and their cells) is left;
    each is replaced by linear, elementwise, unbind/stack/cat/select ops computing the same values
    as ATen's CPU kernel (its cell arithmetic, step by step). Every op that reads a parameter and a
    batched value, has no rule and has a CompositeImplicitAutograd kernel is replaced by the ops
    that kernel runs, and every `UNFUSED` op by its unfused computation. Every new node has
    meta["val"] and the replaced op's source metadata."""
    graph = gm.graph
    fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes if n.op == "placeholder"])
    reshaped: set[Node] = set()
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        kind = LAYERS.get(node.target) or CELLS.get(node.target)
        if kind is None:
            continue
        w = _Writer(graph, node, fake_mode)
        outputs = _decompose_layer(w, kind, node) if node.target in LAYERS else _decompose_cell(w, kind, node)
        multi = node.target in LAYERS or kind == "lstm"
        reshaped.update(_reshaped_outputs(node, outputs, multi))
        replace_node(graph, node, outputs, multi_output=multi)
    _refresh_meta_after(graph, reshaped, fake_mode)
    parameter_values = _parameter_values(graph, ctx)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in UNFUSED:
            _inline(gm, node, fake_mode, UNFUSED[node.target])
        elif _is_composite_without_rule(node, parameter_values):
            _inline(gm, node, fake_mode, node.target)
    graph.eliminate_dead_code()
    gm.recompile()
    return gm
