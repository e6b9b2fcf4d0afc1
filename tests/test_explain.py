"""explain tables, the traced step graph (code, DOT, picture) and `fxclip inspect`."""

from __future__ import annotations

import shutil

import pytest
import torch

import fxclip
from fxclip.forms import MEMORY_COST
from fxclip.zoo import PerExampleCrossEntropy
from fxclip.cli import main
from fxclip.explain import short_source
from fxclip.rules import RULES
from fxclip.zoo import ZOO

RULES_BY_NAME = {str(op): rules[-1] for op, rules in RULES.items()}  # the built-in rule: registered first, tried last
# the built-in rule the common ops must get (other zoo ops: the rule registered for them)
EXPECTED_RULE = {
    "aten.linear.default": "linear",
    "aten.conv2d.default": "conv",
    "aten.group_norm.default": "group_norm",
    "aten.embedding.default": "embedding",
    "aten.mul.Tensor": "mul",
}


cross_entropy = PerExampleCrossEntropy()  # zoo classifiers and sequence models alike


def stepped(name: str, batch: int = 4, **options) -> tuple[fxclip.PrivateStep, tuple, torch.Tensor]:
    entry = ZOO[name]
    model = entry.factory()
    inputs, targets = entry.make_batch(batch, torch.Generator().manual_seed(0))
    t = fxclip.transform(model, cross_entropy, 1.0, **options)
    t.step(inputs, targets)
    return t, inputs, targets


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_trainable_parameter_once_with_its_rule_and_strategy(name):
    t, _, _ = stepped(name)
    explanation = t.explain()
    trainable = [k for k, p in t.model.named_parameters() if p.requires_grad]
    assert [row.name for row in explanation.rows] == trainable
    table = str(explanation).split("\n\n")[0].splitlines()[3:]  # below the title and headers
    for row in explanation.rows:
        assert row.uses, f"{row.name} has no use"
        assert sum(line.lstrip("!= ").split()[:1] == [row.name] for line in table) == 1, row.name
        for use in row.uses:
            registered = RULES_BY_NAME[use.op]
            assert use.rule == EXPECTED_RULE.get(use.op, registered.name) == registered.name, (row.name, use.op)
            assert use.source == short_source(registered.source) and use.source.startswith("fxclip/rules/")
            if use.flops:  # auto without a budget: the least flops + MEMORY_COST · memory
                weighed = {s: use.flops[s] + MEMORY_COST * use.memories[s] for s in use.flops}
                assert use.strategy == min(weighed, key=weighed.get), (row.name, use.flops)
                assert set(use.formulas) == {"ghost", "materialize"}
            else:
                assert use.strategy == "materialize"
    assert explanation.fallbacks == []


def test_shared_parameter_stands_out():
    t, _, _ = stepped("tied")
    explanation = t.explain()
    row = explanation.row("embed.weight")
    assert row.shared and {u.op for u in row.uses} == {"aten.embedding.default", "aten.linear.default"}
    assert [r.name for r in explanation.shared] == ["embed.weight"]
    assert "embed.weight is shared by 2 uses" in str(explanation)
    # the shared component's memory is counted once, not once per use
    separate = sum(u.memory for r in explanation.rows if not r.shared for u in r.uses)
    assert explanation.extra_memory_per_example == separate + row.uses[0].memory


def test_recurrent_steps_render_as_one_line():
    t, _, _ = stepped("gru")
    explanation = t.explain()
    row = explanation.row("gru.weight_hh_l0")
    assert len(row.uses) == 32  # one use per time step
    text = str(explanation)
    lines = [line for line in text.splitlines() if "aten.linear.default ×32" in line]
    assert len(lines) == 8 and any("gru.weight_hh_l0 " in line for line in lines)  # hh weights and biases
    assert "gru.weight_hh_l0 is shared by 32 uses (aten.linear.default in gru (GRU) ×32)" in text


@pytest.mark.parametrize("strategy", ["ghost", "materialize"])
def test_forced_strategy_shows(strategy):
    t, _, _ = stepped("mnist_cnn", strategy=strategy)
    explanation = t.explain()
    uses = [use for row in explanation.rows for use in row.uses]
    for use in uses:
        if use.formulas:  # a linear form: the forced strategy
            assert use.strategy == strategy and use.forced
        else:  # a bias's per-example gradient is built: there is no choice to force
            assert use.strategy == "materialize" and not use.forced
    assert sum(bool(use.formulas) for use in uses) == 4  # the two convs' and two linears' weights
    assert f"{strategy} (forced)" in str(explanation)
    assert "strategy=" + strategy in str(explanation)


def test_explain_before_any_step_says_what_to_do_and_dry_run_writes_nothing():
    entry = ZOO["mlp"]
    model = entry.factory()
    inputs, targets = entry.make_batch(6, torch.Generator().manual_seed(0))
    t = fxclip.transform(model, cross_entropy, 1.0)
    with pytest.raises(fxclip.FxclipError, match=r"run t.step\(inputs, targets\) first"):
        t.explain()
    explanation = t.explain(inputs, targets)
    assert explanation.batch_size == 6
    assert all(p.grad is None for p in model.parameters())
    assert "MiB for the batch of 6" in str(explanation)


def test_inspecting_a_batch_leaves_the_last_steps_program_as_it_was():
    t, inputs, targets = stepped("mlp")
    program, plan = t.program, list(t.program.plan)
    t.strategy = "materialize"  # what a dry run records would differ
    assert {u.strategy for r in t.explain(inputs, targets).rows for u in r.uses} == {"materialize"}
    t.graph(inputs, targets)
    assert t.program is program and t.program.plan == plan
    assert {u.strategy for r in t.explain().rows for u in r.uses} == {e.strategy for e in plan} != {"materialize"}


def test_formulas_are_sympy_and_match_their_values():
    t, _, _ = stepped("bow")
    use = t.explain().row("embed.weight").uses[0]
    for strategy, formula in use.formulas.items():
        assert int(formula.subs({s: use.shapes[s.name] for s in formula.free_symbols})) == use.flops[strategy]
    # a one-hot left factor compares tokens instead of taking k_L-wide dot products
    assert "k_L" not in str(use.formulas["ghost"])


# ---- the step graph -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_graph():
    torch.manual_seed(0)
    t, inputs, targets = stepped("mnist_cnn")
    return t, inputs, targets, t.graph(inputs, targets)


def test_step_graph_computes_the_step(mnist_graph):
    t, inputs, targets, graph = mnist_graph
    program = t.program
    args = t.bind(inputs, targets).flat_args
    losses, norms, clip, grads = program(args, t.max_grad_norm, t.strategy)
    g_losses, g_norms, g_clip, g_grads = graph.gm(*args)
    torch.testing.assert_close(g_norms, norms)
    torch.testing.assert_close(g_clip, clip)
    for key, value in grads.items():
        torch.testing.assert_close(g_grads[key], value)


def test_step_graph_phases_and_labels(mnist_graph):
    *_, graph = mnist_graph
    counts = graph.phase_counts()
    assert all(counts[p] > 0 for p in ("forward", "backward", "norms", "book-keeping")), counts
    served = {(graph.phase(n), graph.served(n)) for n in graph.gm.graph.nodes if n.op == "call_function"}
    for module in ("conv1", "conv2", "fc1", "fc2"):
        for phase in ("forward", "norms", "book-keeping"):
            assert (phase, module) in served, (phase, module)
    code = graph.code()
    assert "# ---- norms: conv1" in code and "# ---- book-keeping: fc2" in code
    assert "parameter('conv1.weight')" in code and "targets('')" in code
    assert code.splitlines()[-1].startswith("return")


def test_dot_parses_back(mnist_graph):
    pydot = pytest.importorskip("pydot")
    *_, graph = mnist_graph
    g = graph.to_networkx()
    (parsed,) = pydot.graph_from_dot_data(graph.to_dot())
    nodes = {n.get_name().strip('"') for n in parsed.get_nodes()} | {
        n.get_name().strip('"') for sub in parsed.get_subgraphs() for n in sub.get_nodes()
    }
    assert set(g.nodes) <= nodes
    assert len(parsed.get_edges()) == g.number_of_edges()
    labels = {n.get_name().strip('"'): n.get_label() for n in parsed.get_nodes()}
    conv = [name for name, data in g.nodes(data=True) if data["op"] == "convolution" and data["served"] == "conv1"]
    assert conv and labels[conv[0]] == '"convolution\\nconv1"'
    # views are contracted away, and no edge is lost: the output still depends on every input
    assert not any(d["op"] in ("view", "transpose") for _, d in g.nodes(data=True))


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz's dot is not installed")
def test_render_png_and_svg(mnist_graph, tmp_path):
    *_, graph = mnist_graph
    png = graph.render(tmp_path / "step.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = graph.render(tmp_path / "step.svg")
    assert "<svg" in svg.read_text()
    with pytest.raises(fxclip.FxclipError, match="svg, .png or .pdf"):
        graph.render(tmp_path / "step.jpg")


# ---- fxclip inspect ---------------------------------------------------------------------------


def test_inspect_command(tmp_path, capsys):
    pydot = pytest.importorskip("pydot")
    dot = tmp_path / "g.dot"
    rc = main(["inspect", "fxclip.zoo:MnistCNN", "--input-shape", "1,28,28", "--batch-size", "4",
               "--strategy", "ghost", "--graph", str(dot), "--code"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "conv1.weight" in out and "ghost (forced)" in out and "# ---- norms: conv1" in out
    assert pydot.graph_from_dot_data(dot.read_text())


def test_inspect_zoo_name_and_bad_input(capsys):
    assert main(["inspect", "tied", "--batch-size", "3"]) == 0
    assert "embed.weight is shared" in capsys.readouterr().out
    assert main(["inspect", "fxclip.zoo:MnistCNN"]) == 2
    assert "--input-shape" in capsys.readouterr().err
    assert main(["inspect", "fxclip.zoo:NoSuchModel", "--input-shape", "3"]) == 2
    assert "no attribute 'NoSuchModel'" in capsys.readouterr().err
