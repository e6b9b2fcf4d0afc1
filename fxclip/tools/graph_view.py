"""The private step as one graph you can read and draw.

`step_graph(t, inputs, targets)` traces one whole step of a `PrivateStep` (the forward, the one
backward to the outputs of the parameter-using ops, the norms, and the book-keeping contractions)
with `make_fx` into a single graph of aten ops. Every node carries the phase it belongs to (the
emit pass tags them, see `passes.emit.phase`) and what it serves: forward nodes their module path
(kept from the captured graph's `nn_module_stack`), norm and book-keeping nodes the module paths of
the parameters they compute for. `StepGraph.code()` prints it as code; `StepGraph.to_dot()` gives
graphviz DOT text (always), `StepGraph.render(path)` an SVG or PNG (needs graphviz's `dot`).
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import torch
import torch.fx.traceback as fx_traceback
import torch.utils._pytree as pytree
from torch.fx import GraphModule, Node
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.node import map_arg

from fxclip.errors import FxclipError
from fxclip.passes.emit import PHASES, phase
from fxclip.passes.program import run
from fxclip.provenance import module_of

# fill colours by phase (inputs and outputs are white)
COLOURS = {
    "forward": "#9ecae1",
    "backward": "#d9d9d9",
    "norms": "#fc9272",
    "book-keeping": "#a1d99b",
}
# ops that only reinterpret or alias memory: hidden in the picture (their inputs connect through)
VIEW_OPS = {
    "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "unsqueeze", "squeeze",
    "detach", "alias", "clone", "contiguous", "_to_copy", "slice", "select", "lift_fresh_copy", "getitem",
}


class _ForwardKeepingModulePaths(torch.fx.Interpreter):
    """Runs the captured forward node by node, so a tracer under `preserve_node_meta` copies each
    node's module stack onto what it records; tags it all as the forward phase."""

    def call_function(self, target, args, kwargs):
        with phase("forward"):
            return super().call_function(target, args, kwargs)


def op_name(node: Node) -> str:
    """'convolution' for aten.convolution.default, the Python name for other callables."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    return getattr(target, "__name__", str(target))


def _modules_of_params(params: str) -> str:
    """'conv1.weight,conv1.bias' -> 'conv1' (module paths of the parameters, '<root>' for the model)."""
    paths = [p.rpartition(".")[0] or "<root>" for p in params.split(",") if p]
    return ", ".join(dict.fromkeys(paths))


@dataclass
class StepGraph:
    """One private step as an aten graph: outputs (losses, norms, clip factors, {param: clipped
    gradient sum}); `phase(node)` and `served(node)` say what each node is for."""

    gm: GraphModule
    inputs: list[tuple[str, str]]  # per placeholder: (kind, name), e.g. ("parameter", "fc1.weight")

    def phase(self, node: Node) -> str:
        """"input", "output", or one of PHASES; a node created outside any tagged region (a zero
        initializer) takes the phase of the next tagged node (after the last one: of its input)."""
        if node.op == "placeholder":
            return "input"
        if node.op == "output":
            return "output"
        nxt = node
        while nxt.op != "output":
            tag = (nxt.meta.get("custom") or {}).get("fxclip_phase")
            if tag in PHASES:
                return tag
            nxt = nxt.next
        return self.phase(node.all_input_nodes[0]) if node.all_input_nodes else PHASES[-1]

    def served(self, node: Node) -> str:
        """The module path a node works for: its module in the forward, its parameters' modules in
        the norms and book-keeping; '' when unknown (the backward, fxclip's own glue)."""
        if node.op == "placeholder":
            return self.inputs[self._placeholders.index(node)][1]
        if self.phase(node) == "forward":
            return module_of(node)[0]
        return _modules_of_params((node.meta.get("custom") or {}).get("fxclip_params", ""))

    @property
    def _placeholders(self) -> list[Node]:
        return [n for n in self.gm.graph.nodes if n.op == "placeholder"]

    def phase_counts(self) -> dict[str, int]:
        """Number of op nodes in each phase."""
        counts = dict.fromkeys(PHASES, 0)
        for n in self.gm.graph.nodes:
            if n.op == "call_function":
                counts[self.phase(n)] += 1
        return counts

    # ---- code --------------------------------------------------------------------------------

    def code(self) -> str:
        """The step as straight-line code, one aten op per line with its result's shape, under a
        comment for each change of phase and module, in execution order."""
        lines, section = [], None
        for node in self.gm.graph.nodes:
            key = (self.phase(node), self.served(node) if node.op != "placeholder" else "")
            if key != section and node.op != "output":
                section = key
                lines.append(f"# ---- {key[0]}" + (f": {key[1]}" if key[1] else ""))
            name = lambda n: n.name
            if node.op == "placeholder":
                kind, what = self.inputs[self._placeholders.index(node)]
                lines.append(f"{node.name} = {kind}({what!r}){_shape(node)}")
            elif node.op == "output":
                lines.append(f"return {map_arg(node.args[0], name)}")
            else:
                args = ", ".join(
                    [repr(map_arg(a, name)) if not isinstance(a, Node) else a.name for a in node.args]
                    + [f"{k}={map_arg(v, name)!r}" for k, v in node.kwargs.items()]
                )
                lines.append(f"{node.name} = {op_name(node)}({args}){_shape(node)}")
        return "\n".join(lines)

    # ---- picture -----------------------------------------------------------------------------

    def to_networkx(self, hide_views: bool = True) -> nx.DiGraph:
        """The graph as networkx (node attributes: label, phase, served); view-like ops are
        contracted away when `hide_views` (their inputs connect straight to their users)."""
        g = nx.DiGraph()
        placeholders = self._placeholders
        for node in self.gm.graph.nodes:
            op = op_name(node) if node.op == "call_function" else node.op
            if node.op == "placeholder":
                op = self.inputs[placeholders.index(node)][0]
            g.add_node(node.name, op=op, phase=self.phase(node), served=self.served(node))
            g.add_edges_from((i.name, node.name) for i in node.all_input_nodes)
        if hide_views:
            for name in [n for n, d in g.nodes(data=True) if d["op"] in VIEW_OPS]:
                g.add_edges_from((p, s) for p in g.predecessors(name) for s in g.successors(name))
                g.remove_node(name)
        return g

    def to_dot(self, hide_views: bool = True, title: str = "fxclip private step") -> str:
        """Graphviz DOT text: nodes filled by phase (legend included), labelled with the op and the
        module path it serves."""
        g = self.to_networkx(hide_views)
        out = [
            "digraph step {",
            f"  label={_quote(title)}; labelloc=t; fontname=Helvetica; rankdir=TB; nodesep=0.15; ranksep=0.3;",
            '  node [shape=box, style="rounded,filled", fontname=Helvetica, fontsize=10, fillcolor=white];',
            "  edge [arrowsize=0.5, color=\"#777777\"];",
        ]
        for name, data in g.nodes(data=True):
            label = data["op"] + (f"\\n{data['served']}" if data["served"] else "")
            colour = COLOURS.get(data["phase"], "white")
            out.append(f"  {_quote(name)} [label={_quote(label, escaped=True)}, fillcolor={_quote(colour)}];")
        out += [f"  {_quote(a)} -> {_quote(b)};" for a, b in g.edges]
        out.append("  subgraph cluster_legend {")
        out.append('    label="phases"; fontsize=10;')
        for ph in PHASES:
            out.append(f"    {_quote('legend_' + ph)} [label={_quote(ph)}, fillcolor={_quote(COLOURS[ph])}];")
        out.append("  }")
        out.append("}")
        return "\n".join(out) + "\n"

    def render(self, path, hide_views: bool = True, title: str = "fxclip private step") -> Path:
        """Draw the graph to `path` (.svg, .png or .pdf) with graphviz's `dot`."""
        path = Path(path)
        fmt = path.suffix.lstrip(".")
        if fmt not in ("svg", "png", "pdf"):
            raise FxclipError(f"render() writes .svg, .png or .pdf files, not {path.name!r}")
        dot = shutil.which("dot")
        if dot is None:
            raise FxclipError(
                "graphviz's `dot` program is not installed, so the graph cannot be drawn; install "
                "graphviz (e.g. apt-get install graphviz), or write to_dot() to a .dot file and render it elsewhere"
            )
        subprocess.run([dot, f"-T{fmt}", "-o", str(path)], input=self.to_dot(hide_views, title), text=True, check=True)
        return path


def _shape(node: Node) -> str:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return f"  # {str(val.dtype).removeprefix('torch.')}{list(val.shape)}"
    return ""


def _quote(text: str, escaped: bool = False) -> str:
    """A DOT double-quoted string; `escaped` keeps '\\n' line breaks already in `text`."""
    text = text.replace('"', '\\"') if escaped else text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def step_graph(step, inputs, targets) -> StepGraph:
    """Trace one step of `step` (a `PrivateStep`) on this batch into a `StepGraph`. Pure: no
    gradients are written and the step's own plan is left as it was."""
    bound = step.bind(inputs, targets)
    forward = bound.program.forward
    plan = dataclasses.replace(bound.program.step_plan, forward=lambda *a: _ForwardKeepingModulePaths(forward).run(*a))

    clipping, bound_arg = step.clip_settings

    def one_step(*flat_args):
        output, _ = run(plan, list(flat_args), bound_arg, step.strategy, clipping=clipping)
        return tuple(output)

    with fx_traceback.preserve_node_meta():
        gm = make_fx(one_step)(*bound.flat_args)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return StepGraph(gm, _input_names(bound.placeholders, inputs))


def _input_names(placeholders, inputs) -> list[tuple[str, str]]:
    """(kind, name) per graph input: parameters and buffers by FQN, then inputs[i] and targets."""
    kinds = {"param": "parameter", "buffer": "buffer", "constant": "constant"}
    n_inputs = len(pytree.tree_leaves(inputs if isinstance(inputs, tuple) else (inputs,)))
    names, user = [], 0
    for kind, key in placeholders:
        if kind in kinds:
            names.append((kinds[kind], key))
        else:
            names.append(("input", f"inputs[{user}]") if user < n_inputs else ("targets", ""))
            user += 1
    return names
