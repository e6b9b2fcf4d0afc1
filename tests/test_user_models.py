"""The benchmark's user-written models (fxclip/tools/bench/user_models.py): each one through
transform, exact against the reference at a small batch, and selectable by name in the bench CLI."""

import pytest
import torch

import fxclip
from fxclip.bench import main
from fxclip.tools.bench.runner import run_cells, setup
from fxclip.tools.bench.user_models import USER_MODELS
from fxclip.zoo import PerExampleCrossEntropy
from helpers import check_against_reference

CPU = torch.device("cpu")


@pytest.mark.parametrize("name", sorted(USER_MODELS))
def test_user_model_matches_reference(name):
    model, inputs, targets = setup(name, 3, CPU)  # dropout probabilities 0, as the benchmark runs them
    model.double()
    inputs = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    t = fxclip.transform(model, PerExampleCrossEntropy(), max_grad_norm=1.0)
    result = check_against_reference(t, inputs, targets)
    assert result.norms.shape == (3,) and bool((result.norms > 0).all())


def test_setup_zeroes_every_dropout_including_the_float_attributes():
    for name in ("user_transformer", "user_lstm", "user_mnist_cnn"):
        model, _, _ = setup(name, 2, CPU)
        probabilities = [m.p if isinstance(m, torch.nn.Dropout) else m.dropout for m in model.modules()
                         if isinstance(m, (torch.nn.Dropout, torch.nn.MultiheadAttention, torch.nn.RNNBase))]
        assert probabilities and all(p == 0.0 for p in probabilities), (name, probabilities)


def test_user_models_run_in_the_benchmark_checked():
    cells = run_cells("user_embedding_mean", 6, ["floor", "fxclip"], reps=1, warmup=1, device=CPU, memory=False)
    assert [c.check for c in cells] == ["n/a", "ok"]


@pytest.mark.parametrize("argv", [["--models", "user_nope"], ["--batch-modes", "user_nope"]])
def test_an_unknown_model_names_the_user_models(argv, capsys, tmp_path):
    assert main(argv + ["--out", str(tmp_path)]) == 2
    assert "user_transformer" in capsys.readouterr().err


def test_user_stands_for_every_user_model(tmp_path, capsys):
    from fxclip.tools.bench import _model_names

    assert _model_names(["mlp", "user"]) == ["mlp", *USER_MODELS]
    assert main(["--models", "user_embedding_mean", "--batches", "4", "--methods", "floor", "fxclip", "--reps", "1",
                 "--warmup", "1", "--out", str(tmp_path)]) == 0
    assert "| user_embedding_mean | 4 |" in (tmp_path / "benchmark.md").read_text()
