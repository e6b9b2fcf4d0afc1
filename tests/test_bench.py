"""The benchmark: methods checked against torch.func (a wrong one is flagged), outputs written,
bad options rejected. Small models and batches, eager methods only (compilation is covered by
test_compile.py)."""

import json

import pytest
import torch

from fxclip.bench import main
from fxclip.tools.bench.methods import METHODS, Method, naive
from fxclip.tools.bench.runner import run_cells
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


@pytest.mark.parametrize("method", ["opacus_hooks", "opacus_ghost"])
def test_opacus_runs_on_a_model_that_comes_in_eval_mode(method):
    """Opacus records activations only in training mode; the Hugging Face models come in eval
    mode, and ghost clipping failed on them with "No activations detected"."""
    pytest.importorskip("opacus")
    from fxclip.reference import clipped_sum, per_example_grads

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).eval()
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    loss = lambda out, t: torch.nn.functional.cross_entropy(out, t, reduction="none")  # noqa: E731
    want = clipped_sum(per_example_grads(model, loss, (x,), y), 0.5)[1]
    built = METHODS[method](model, loss, 0.5, (x,), y)
    built.step()
    for k, g in built.grads().items():
        torch.testing.assert_close(g, want[k], rtol=1e-4, atol=1e-6)


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


def test_gpu_check_report_has_the_schema_of_issue_21(tmp_path):
    """benchmark.json of the GPU check: gpu, torch, commit and rows of {model, batch, dtype, method,
    ms, vs_floor, speedup_over_naive, peak_mb, correct}, ratios to the same model's floor and naive."""
    from fxclip.tools.bench.gpu import ROW_KEYS, _row, append_rows, report

    append_rows(tmp_path, [
        _row("mlp", 128, "float32", "floor", 0.002, 2**20, "n/a", 1.0),
        _row("mlp", 128, "float32", "naive", 0.2, None, "ok", 1.0),
        _row("mlp", 128, "float32", "fxclip_compiled", 0.0025, 3 * 2**20, "ok", 30.0),
        _row("mlp", 128, "float32", "opacus_ghost", None, None, "n/a", skipped="ValueError: no"),
    ])
    append_rows(tmp_path, [_row("hf_gpt2", 32, "bfloat16", "fxclip", 0.1, None, "WRONG (max error 1)", 5.0)])
    result = report(tmp_path, {"gpu": "NVIDIA H200", "torch": "2.11.0+cu130", "commit": "abc"})
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert saved == result and {"gpu", "torch", "commit", "rows"} <= set(saved)
    assert all(set(r) == set(ROW_KEYS) for r in saved["rows"])
    rows = {(r["model"], r["method"]): r for r in saved["rows"]}
    compiled = rows[("mlp", "fxclip_compiled")]
    assert compiled["ms"] == pytest.approx(2.5) and compiled["vs_floor"] == pytest.approx(1.25)
    assert compiled["speedup_over_naive"] == pytest.approx(80) and compiled["peak_mb"] == pytest.approx(3)
    assert compiled["correct"] is True and rows[("hf_gpt2", "fxclip")]["correct"] is False
    assert rows[("mlp", "floor")]["correct"] is None and rows[("mlp", "opacus_ghost")]["ms"] is None
    table = (tmp_path / "benchmark.md").read_text()
    assert "| mlp | 128 | float32 | fxclip_compiled | 2.50 | 1.25 | 80.0 | 3.0 | ok |" in table
    assert "opacus_ghost: ValueError: no" in table and "NVIDIA H200" in table
