"""Private training: accumulation, exactness without noise, the `fxclip train` job and its errors."""

import copy
import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxclip
from fxclip.cli import build_parser, main
from fxclip.data import load_digits
from fxclip.optim import PrivateOptimizer
from fxclip.sampling import PoissonBatchSampler
from fxclip.train import (
    PrivacyPlan,
    TrainConfig,
    build_model,
    naive_clipped_grad_sum,
    per_example_cross_entropy,
    train_private,
)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_gradient_accumulation_equals_one_big_batch(digits):
    torch.manual_seed(0)
    model = build_model("small_cnn", digits)
    x, y = digits.x_train[:50], digits.y_train[:50]
    fxclip.transform(model, per_example_cross_entropy, max_grad_norm=0.5).step(x, y)
    whole = _grads(model)
    model.zero_grad(set_to_none=True)
    t = fxclip.transform(model, per_example_cross_entropy, max_grad_norm=0.5, max_physical_batch_size=7)
    losses = t.step(x, y).losses  # 8 physical batches, the last of 1
    assert losses.shape == (50,)
    for a, b in zip(whole, _grads(model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_naive_baseline_computes_the_same_clipped_sum(digits):
    torch.manual_seed(0)
    model = build_model("mlp", digits)
    x, y = digits.x_train[:16], digits.y_train[:16]
    fxclip.transform(model, per_example_cross_entropy, max_grad_norm=0.1).step(x, y)
    fast = _grads(model)
    model.zero_grad(set_to_none=True)
    naive_clipped_grad_sum(model, x, y, max_grad_norm=0.1)
    for a, b in zip(fast, _grads(model)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_no_noise_and_huge_clip_bound_equals_nonprivate_training_step_for_step(digits, optimizer):
    torch.manual_seed(0)
    private_model = build_model("mlp", digits).double()  # float64: Adam amplifies rounding in tiny grads
    plain_model = copy.deepcopy(private_model)
    config = TrainConfig(optimizer=optimizer, lr=0.05, max_grad_norm=1e6)
    n = 200
    x, y = digits.x_train[:n].double(), digits.y_train[:n]
    t = fxclip.transform(private_model, per_example_cross_entropy, max_grad_norm=config.max_grad_norm, max_physical_batch_size=64)
    private_opt = PrivateOptimizer(
        config.make_optimizer(private_model), noise_multiplier=0.0, max_grad_norm=1e6, expected_batch_size=n
    )
    plain_opt = config.make_optimizer(plain_model)
    for indices in PoissonBatchSampler(n, 1.0, 5):  # q = 1: every batch is all n examples
        private_opt.zero_grad()
        t.step(x[indices], y[indices])
        private_opt.step()
        plain_opt.zero_grad()
        per_example_cross_entropy(plain_model(x[indices]), y[indices]).mean().backward()
        plain_opt.step()
        for p, q in zip(private_model.parameters(), plain_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    start = build_model("mlp", digits).double()
    assert not torch.allclose(next(private_model.parameters()), next(start.parameters()))


def test_privacy_plan_uses_true_sampling_rate_and_steps(digits):
    config = TrainConfig(epsilon=2.0, delta=1e-5, epochs=3, batch_size=100, compile=False)
    plan = PrivacyPlan.for_target(config, len(digits.x_train))
    assert plan.sampling_rate == pytest.approx(100 / len(digits.x_train))
    assert plan.steps == 3 * round(len(digits.x_train) / 100)
    assert 0.98 * 2.0 < plan.epsilon_after(plan.steps) <= 2.0


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(lr=math.inf), "lr must be a finite number > 0"),
        (dict(lr=math.nan), "lr must be a finite number > 0"),
        (dict(momentum=-1.0), "momentum must be a finite number >= 0"),
        (dict(max_grad_norm="1.0"), "max_grad_norm must be a finite number > 0"),
        (dict(epochs=True), "epochs must be an integer >= 1"),
        (dict(batch_size=2.0), "batch_size must be an integer >= 1"),
    ],
)
def test_bad_settings_raise_clear_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes).validate()


def test_delta_not_well_below_one_over_n_warns():
    config = TrainConfig(epochs=1, batch_size=100, delta=1e-3)
    with pytest.warns(UserWarning, match=r"delta=0.001 is not well below 1/N = 0.001 \(N = 1000"):
        PrivacyPlan.for_target(config, 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PrivacyPlan.for_target(config, 999)  # delta < 1/N: no warning


def test_private_run_reaches_target_epsilon_and_learns(digits):
    config = TrainConfig(model="mlp", optimizer="adam", lr=1e-2, epochs=3, batch_size=128, epsilon=8.0, compile=False)
    torch.manual_seed(0)
    history, plan = train_private(build_model("mlp", digits), digits, config, progress=False)
    assert [r.epoch for r in history.epochs] == [1, 2, 3]
    assert history.epochs[-1].steps == plan.steps
    epsilons = [r.epsilon for r in history.epochs]
    assert epsilons == sorted(epsilons) and 0.98 * 8.0 < epsilons[-1] <= 8.0
    assert history.final_accuracy > 0.5  # chance is 0.1


class WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x):
        return self.net(x)


def test_batchnorm_model_is_refused_before_training(digits):
    model = WithBatchNorm()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="BatchNorm1d"):
        train_private(model, digits, TrainConfig(epochs=1, compile=False), progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no parameter or statistic changed


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--epsilon", "0"], "epsilon must be"),
        (["--epsilon", "-2"], "epsilon must be"),
        (["--delta", "0"], "delta must be"),
        (["--delta", "1.5"], "delta must be"),
        (["--batch-size", "5000"], "exceeds the 1438 training examples"),
        (["--model", "small_cnn", "--dataset", "mnist1d"], "takes images"),
        (["--device", "tpu"], "device 'tpu' is not usable here"),
        (["--data", "{tmp}/corrupt.pt"], "corrupt.pt could not be read as a data set"),
        (["--data", "{tmp}/huge_label.npz"], "largest class id is 1000000000, so a model would need 1000000001 outputs"),
        (["--out", "{tmp}/a_file"], "a_file is a file"),
        (["--out", "{tmp}/a_file/run"], "a_file is a file"),
    ],
)
def test_cli_rejects_bad_input_before_training(tmp_path, capsys, flags, message):
    (tmp_path / "corrupt.pt").write_bytes(b"garbage")
    np.savez(tmp_path / "huge_label.npz", x=np.zeros((20, 4), np.float32), y=np.array([0, 1] * 9 + [1, 10**9]))
    (tmp_path / "a_file").write_text("")
    argv = ["train", "--no-progress", "--epochs", "1", "--out", str(tmp_path / "run")]
    assert main(argv + [flag.format(tmp=tmp_path) for flag in flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fxclip train: error: ") and message in err and "weights_only" not in err
    assert not (tmp_path / "run").exists()


def test_cli_rejects_empty_data_file(tmp_path, capsys):
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 4), np.float32), y=np.zeros(0, np.int64))
    assert main(["train", "--no-progress", "--data", str(tmp_path / "empty.npz"), "--out", str(tmp_path / "r")]) == 2
    assert "is empty" in capsys.readouterr().err


def test_cli_trains_on_user_file_and_writes_metrics_and_plot(tmp_path, capsys):
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 6, generator=gen) * 3
    y = torch.randint(0, 3, (300,), generator=gen)
    torch.save({"x": centers[y] + torch.randn(300, 6, generator=gen), "y": y}, tmp_path / "blobs.pt")
    out = tmp_path / "run"
    argv = ["train", "--no-progress", "--data", str(tmp_path / "blobs.pt"), "--model", "mlp", "--epochs", "4",
            "--batch-size", "32", "--physical-batch-size", "16", "--optimizer", "adam", "--lr", "0.01",
            "--epsilon", "4", "--delta", "1e-4", "--no-compile", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "private" in printed and "non-private" in printed and "faster than the naive method" in printed
    assert "the non-private step (eager; --compile is faster)" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["data"] == "blobs.pt"
    assert 3.9 < metrics["privacy"]["epsilon_spent"] <= 4.0
    assert len(metrics["private"]["epochs"]) == 4 and len(metrics["nonprivate"]["epochs"]) == 4
    assert metrics["nonprivate"]["final_test_accuracy"] > 0.9
    speed = metrics["step_speed"]
    assert min(speed["nonprivate_seconds"], speed["fxclip_seconds"], speed["naive_seconds"]) > 0
    assert (out / "accuracy_vs_epsilon.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_python_dash_m_fxclip_lists_the_train_command():
    result = subprocess.run([sys.executable, "-m", "fxclip", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "train" in result.stdout
    args = build_parser().parse_args(["train", "--clip", "0.5"])
    assert args.max_grad_norm == 0.5 and args.compile and args.model == TrainConfig().model
    assert not build_parser().parse_args(["train", "--no-compile"]).compile


@pytest.mark.slow
def test_default_main_job_reaches_good_accuracy(tmp_path, capsys):
    metrics_path = tmp_path / "run" / "metrics.json"
    assert main(["train", "--no-progress", "--out", str(tmp_path / "run")]) == 0
    assert "the non-private step (compiled; eager " in capsys.readouterr().out
    metrics = json.loads(metrics_path.read_text())
    assert metrics["privacy"]["epsilon_spent"] <= TrainConfig().epsilon
    assert metrics["private"]["final_test_accuracy"] > 0.85


@pytest.mark.slow
@pytest.mark.compile
def test_compiled_step_does_not_recompile_for_poisson_batch_sizes(digits):
    torch.manual_seed(0)
    model = build_model("mlp", digits)
    t = fxclip.transform(model, per_example_cross_entropy, max_grad_norm=1.0, compile=True)
    sizes = set()
    for indices in PoissonBatchSampler(len(digits.x_train), 0.01, 12, generator=torch.Generator().manual_seed(0)):
        t.step(digits.x_train[indices], digits.y_train[indices])
        sizes.add(len(indices))
    assert len(sizes) >= 5  # the batch size really varied
    (capture,) = t.captures
    assert capture.step.compiled.compiles == 1
