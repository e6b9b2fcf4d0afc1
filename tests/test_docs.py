"""The docs are true to the code: their Python blocks run, their links and images exist."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

import fxclip

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), re.S)


def run_page(page: str) -> dict:
    namespace = {"__name__": f"docs_{page.removesuffix('.md')}"}
    for i, block in enumerate(python_blocks(page)):
        exec(compile(block, f"{DOCS / page} (python block {i + 1})", "exec"), namespace)
    return namespace


def test_custom_rules_tutorial_runs():
    try:
        namespace = run_page("custom_rules.md")
    finally:
        fxclip.unregister_rule(torch.ops.mylib.scaled_linear.default)
    assert namespace["t"].fallbacks == []
    assert namespace["report"].reference == "per-example loop"


def test_api_reference_runs():
    namespace = run_page("api.md")
    assert namespace["graph"].phase_counts()["norms"] > 0


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_relative_links_and_images_exist(page):
    text = (DOCS / page).read_text()
    for target in re.findall(r"\]\(([^)#\s]+)\)", text):
        if "://" not in target:
            assert (DOCS / target).exists(), f"{page} links to missing {target}"


def test_mnist_graph_picture_is_a_png():
    assert (DOCS / "mnist_cnn_graph.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_migration_example_runs():
    namespace = run_page("migration.md")
    assert namespace["optimizer"].steps == 2 * 8 and namespace["engine"].get_epsilon(1e-5) <= 3.0
    assert 0.0 <= float(namespace["accuracy"]) <= 1.0


def test_lora_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    monkeypatch.chdir(tmp_path)  # the Trainer's output_dir
    namespace = run_page("lora.md")
    assert namespace["trainer"].epsilon <= 8.0 and namespace["result"].norms.shape == (8,)
    assert all(not p.requires_grad or "lora_" in name for name, p in namespace["model"].named_parameters())
