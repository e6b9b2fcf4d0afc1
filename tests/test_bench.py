"""The benchmark: methods checked against torch.func (a wrong one is flagged), outputs written,
bad options rejected. Small models and batches, eager methods only (compilation is covered by
test_compile.py)."""

import json

import pytest
import torch

from fxclip.bench import main
from fxclip.bench.methods import METHODS, Method, naive
from fxclip.bench.runner import run_cells
from fxclip.cli import build_parser

CPU = torch.device("cpu")


def _half_naive(model, loss_fn, max_grad_norm, inputs, targets) -> Method:
    """A fast wrong method: the naive clipped sum scaled by 0.5."""
    inner = naive(model, loss_fn, max_grad_norm, inputs, targets)
    return Method(inner.step, lambda: {k: 0.5 * g for k, g in inner.grads().items()})


def test_cells_check_every_method_and_flag_a_wrong_one():
    builders = {**METHODS, "half": _half_naive}
    cells = run_cells("mlp", 6, ["floor", "fxclip", "naive", "vmap", "half"], reps=2, warmup=1, device=CPU,
                      memory=False, builders=builders)
    by = {c.method: c for c in cells}
    assert by["floor"].check == "n/a"
    for name in ("fxclip", "naive", "vmap"):
        assert by[name].check == "ok", (name, by[name].check)
        assert by[name].seconds > 0 and len(by[name].times) == 2
    assert by["half"].check.startswith("WRONG")


def test_opacus_cells_are_checked_or_skipped_with_a_reason():
    pytest.importorskip("opacus")
    cells = run_cells("small_cnn", 4, ["opacus_hooks", "opacus_ghost"], reps=1, warmup=1, device=CPU, memory=False)
    for c in cells:
        assert (c.skipped is None and c.check == "ok") or (c.skipped and c.seconds is None), c


def test_quick_run_writes_table_json_and_chart(tmp_path, capsys):
    assert main(["--quick", "--methods", "floor", "fxclip", "naive", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "benchmark.md").read_text()
    for model in ("mlp", "tied"):
        assert f"| {model} | 8 |" in table and f"| {model} | 16 |" in table
    data = json.loads((tmp_path / "benchmark.json").read_text())
    assert {c["method"] for c in data["cells"]} == {"floor", "fxclip", "naive"}
    assert all(c["check"] == "ok" for c in data["cells"] if c["method"] != "floor")
    fx = [r for r in data["ratios"] if r["method"] == "fxclip"]
    assert all(r["vs_floor"] > 0 and r["speedup_over_naive"] > 0 for r in fx)
    assert (tmp_path / "benchmark.png").read_bytes()[:4] == b"\x89PNG"
    assert "Machine:" in table and "Command:" in table


def test_memory_is_measured_in_a_subprocess():
    cells = run_cells("mlp", 8, ["floor"], reps=1, warmup=1, device=CPU, memory=True)
    assert cells[0].peak_bytes is not None and cells[0].peak_bytes >= 0


@pytest.mark.parametrize("argv", [["--models", "nope"], ["--methods", "nope"], ["--batches", "1"]])
def test_bad_options_exit_2_with_a_message(argv, capsys, tmp_path):
    assert main(argv + ["--out", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err


def test_bench_is_a_cli_subcommand():
    args = build_parser().parse_args(["bench", "--quick", "--reps", "2"])
    assert args.quick and args.reps == 2 and callable(args.run)
