"""The package's layers, read from its import statements (module level and inside functions alike).

- `fxclip.rules` imports nothing of `fxclip.passes`;
- the compiler core (passes, rules and the root modules but the front doors, the zoo and the shims)
  imports no tool (`fxclip.tools`), nothing of DP-SGD (`fxclip.dp`), and not the front doors
  (`fxclip` itself, which loads api, `fxclip.cli`, `fxclip.testing`) or the zoo; passes and rules
  not `fxclip.api` either. One sanctioned exception: `PrivateStep.explain()`/`.graph()` import
  `tools.explain`/`tools.graph_view` when called;
- `fxclip.dp` imports of the compiler only `checks` and `errors`, except `dp.train`, the
  `fxclip train` job: it also calls the public API (`fxclip.api.transform`) on zoo models and clips its
  naive baseline with `fxclip.clipping`;
- `fxclip.integrations` (drop-in use: `fxclip.PrivacyEngine`, the Hugging Face Trainer) sits on top:
  of the compiler it imports only the public API (`fxclip.api`) and the shared `checks` and
  `errors`, any of DP-SGD, and no tool; nothing but the front door (`fxclip.PrivacyEngine`, loaded
  when first used) imports it;
- nothing in fxclip imports a shim (the documented re-export paths are for users);
- no import cycle among modules, nor among units (a subpackage, or a module of the root or of tools);
- README.md's Layout section names every module.
"""

import ast
import importlib
import pathlib
import subprocess
import sys

import networkx as nx
import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "fxclip"
SHIMS = {"fxclip.optim": "fxclip.dp.optim", "fxclip.sampling": "fxclip.dp.sampling", "fxclip.accounting": "fxclip.dp.accounting",
         "fxclip.data": "fxclip.dp.data", "fxclip.distributed": "fxclip.dp.distributed", "fxclip.train": "fxclip.dp.train",
         "fxclip.explain": "fxclip.tools.explain", "fxclip.graph_view": "fxclip.tools.graph_view",
         "fxclip.memory": "fxclip.tools.memory_cmd", "fxclip.bench": "fxclip.tools.bench", "fxclip.bench.__main__": "fxclip.tools.bench"}
FRONT = {"fxclip", "fxclip.__main__", "fxclip.cli", "fxclip.testing"}
SANCTIONED = {("fxclip.api", "fxclip.tools"), ("fxclip.api", "fxclip.tools.explain"), ("fxclip.api", "fxclip.tools.graph_view")}
DP_MAY_USE = {"fxclip.checks", "fxclip.errors"}
TRAIN_MAY_USE = DP_MAY_USE | {"fxclip.api", "fxclip.zoo", "fxclip.clipping"}
INTEGRATIONS_MAY_USE = DP_MAY_USE | {"fxclip.api"}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(name: str):
    """(module, line) for every fxclip module that `name` imports, by name or as a package it loads."""
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module
            if node.level:  # relative: the package `level - 1` up from this module's, then the module
                up = package.split(".")[: len(package.split(".")) + 1 - node.level]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in (t for t in targets if t.split(".")[0] == "fxclip"):
            while target not in MODULES:
                target = target.rpartition(".")[0]
            yield target, node.lineno
            parent = target.rpartition(".")[0]  # importing a.b.c runs a.b's __init__ (the root's is not counted)
            while "." in parent and not (name + ".").startswith(parent + "."):
                yield parent, node.lineno
                parent = parent.rpartition(".")[0]


GRAPH = nx.DiGraph()
for _name in MODULES:
    GRAPH.add_node(_name)
    for _target, _line in imported(_name):
        GRAPH.add_edge(_name, _target, line=_line)


def under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(sources, forbidden) -> list[str]:
    return [f"{a} imports {b} ({MODULES[a].relative_to(PACKAGE.parent)}:{GRAPH.edges[a, b]['line']})"
            for a, b in GRAPH.edges if sources(a) and forbidden(a, b) and (a, b) not in SANCTIONED]


def core(name: str) -> bool:
    return not (name in FRONT or name in SHIMS or under(name, "fxclip.tools", "fxclip.dp", "fxclip.zoo", "fxclip.integrations"))


def test_rules_do_not_import_passes():
    found = violations(lambda a: under(a, "fxclip.rules"), lambda a, b: under(b, "fxclip.passes"))
    assert not found, "\n".join(found)


def test_the_compiler_imports_no_tool_no_dp_and_no_front_door():
    found = violations(core, lambda a, b: not core(b) and b not in SHIMS)
    found += violations(lambda a: under(a, "fxclip.passes", "fxclip.rules"), lambda a, b: b == "fxclip.api")
    assert not found, "\n".join(found)


def test_dp_imports_of_the_compiler_only_the_shared_checks():
    def forbidden(a, b):
        return not under(b, "fxclip.dp") and b not in (TRAIN_MAY_USE if a == "fxclip.dp.train" else DP_MAY_USE)

    found = violations(lambda a: under(a, "fxclip.dp"), forbidden)
    assert not found, "\n".join(found)


def test_integrations_use_the_public_api_and_dp_and_only_the_front_door_uses_them():
    found = violations(lambda a: under(a, "fxclip.integrations"),
                       lambda a, b: not under(b, "fxclip.integrations", "fxclip.dp") and b not in INTEGRATIONS_MAY_USE)
    found += violations(lambda a: a not in FRONT and not under(a, "fxclip.integrations"), lambda a, b: under(b, "fxclip.integrations"))
    assert not found, "\n".join(found)


def test_nothing_in_fxclip_imports_a_shim():
    found = violations(lambda a: a not in SHIMS, lambda a, b: b in SHIMS)
    assert not found, "\n".join(found)


def unit(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:3] if parts[1:2] == ["tools"] else parts[:2])


def test_no_import_cycle_among_modules_or_units():
    cycles = [" -> ".join(c + c[:1]) for c in nx.simple_cycles(GRAPH)]
    units = nx.DiGraph((unit(a), unit(b)) for a, b in GRAPH.edges if unit(a) != unit(b))
    cycles += [" -> ".join(c + c[:1]) for c in nx.simple_cycles(units)]
    assert not cycles, "\n".join(cycles[:10])


@pytest.mark.parametrize("shim", [s for s in SHIMS if not s.endswith("__main__")])
def test_documented_paths_reexport_the_moved_modules(shim):
    old, new = importlib.import_module(shim), importlib.import_module(SHIMS[shim])
    submodule = new.__name__ + "."  # a package's submodules become its attributes when some test imports them
    public = [n for n, v in vars(new).items() if not n.startswith("_") and not getattr(v, "__name__", "").startswith(submodule)]
    assert public and all(getattr(old, n) is getattr(new, n) for n in public)


@pytest.mark.parametrize("module", ["fxclip.bench", "fxclip.memory", "fxclip.tools.bench.gpu"])
def test_python_dash_m_entry_points_run(module):
    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr


def test_the_readme_layout_names_every_module():
    layout = (PACKAGE.parent / "README.md").read_text().split("## Layout")[1]
    named = {word for quoted in layout.split("`")[1::2] for word in quoted.replace("/", " ").replace(".", " ").split()}
    missing = [name for name, path in MODULES.items() if path.stem not in named | {"__init__", "__main__"}]
    assert not missing, f"README.md's Layout section does not name {missing}"
