"""Data sets for `fxclip train`: ones that ship inside a package, and a user's own tensors.

- "digits": scikit-learn's `load_digits` (1797 8x8 grey images of digits, in the package).
- "mnist1d": the MNIST-1D data set (5000 signals of length 40), generated offline by `mnist1d`.
- a `.pt` or `.npz` file holding `x` and `y` (and optionally `x_test` and `y_test`).
"""

from __future__ import annotations

import pickle
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BUILTIN_DATASETS = ("digits", "mnist1d")


@dataclass
class Dataset:
    """Train and test tensors; x is float32 with the batch on axis 0, y holds int64 class ids."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one example's input."""
        return tuple(self.x_train.shape[1:])


def _as_tensor(value, what: str, source: str) -> torch.Tensor:
    try:
        return torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} in {source} is not an array or tensor ({type(value).__name__}).") from err


def _checked_examples(x, y, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x as float32 and y as int64, after checking they are a non-empty, matching set of examples
    with finite, real features (bad values would only fail mid-training, after privacy was spent)."""
    x, y = _as_tensor(x, "x", source), _as_tensor(y, "y", source)
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(f"{source} is empty (x has no examples); private training needs at least one example.")
    if x.ndim == 1:
        raise ValueError(
            f"{source}: x must have shape [N, features...], one row per example, got 1-D x of shape "
            f"{tuple(x.shape)}; if each example is one number, reshape it to [N, 1]."
        )
    if x.is_complex():
        raise ValueError(f"{source}: x is complex ({x.dtype}); pass real features, e.g. real and imaginary parts side by side.")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"{source}: y must be a 1-D tensor of class ids, one per example of x; "
            f"got x of shape {tuple(x.shape)} and y of shape {tuple(y.shape)}."
        )
    if y.is_complex() or (y.is_floating_point() and not (torch.isfinite(y).all() and torch.equal(y, y.round()))):
        raise ValueError(f"{source}: y must hold integer class ids, got non-integer values.")
    y = y.long()
    if (y < 0).any():
        raise ValueError(f"{source}: class ids in y must be >= 0, found {int(y.min())}.")
    x = x.float()
    not_finite = int((~torch.isfinite(x)).sum())
    if not_finite:
        raise ValueError(
            f"{source}: x has {not_finite} NaN or infinite value{'s' * (not_finite > 1)} (as float32); "
            "remove or replace them before training."
        )
    return x, y


def make_dataset(
    name: str,
    x: torch.Tensor,
    y: torch.Tensor,
    x_test: torch.Tensor | None = None,
    y_test: torch.Tensor | None = None,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """Check x and y and build a Dataset; without a test split, a random `test_fraction` is held out.

    Raises ValueError naming the problem: an empty data set, x and y of different lengths, 1-D,
    complex or non-finite x, labels that are not non-negative integers, more classes (largest
    label + 1) than examples, test inputs shaped unlike train inputs.
    """
    x, y = _checked_examples(x, y, f"data set {name!r}")
    if (x_test is None) != (y_test is None):
        raise ValueError(f"data set {name!r}: give both x_test and y_test, or neither.")
    if x_test is None:
        if x.shape[0] < 2:
            raise ValueError(f"data set {name!r} has 1 example; need at least 2 to hold out a test split.")
        order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
        n_test = min(max(1, round(test_fraction * x.shape[0])), x.shape[0] - 1)
        test, train = order[:n_test], order[n_test:]
        x, y, x_test, y_test = x[train], y[train], x[test], y[test]
    else:
        x_test, y_test = _checked_examples(x_test, y_test, f"test split of data set {name!r}")
        if x_test.shape[1:] != x.shape[1:]:
            raise ValueError(
                f"data set {name!r}: test inputs have shape {tuple(x_test.shape[1:])} per example, "
                f"train inputs {tuple(x.shape[1:])}; they must match."
            )
    num_classes = int(max(y.max(), y_test.max())) + 1
    examples = x.shape[0] + x_test.shape[0]
    if num_classes > examples:  # most classes would have no example: ids that are not 0..C-1
        raise ValueError(
            f"data set {name!r}: the largest class id is {num_classes - 1}, so a model would need "
            f"{num_classes} outputs for {examples} examples. Class ids must number the classes 0, 1, "
            "..., C-1; renumber them, e.g. y = np.unique(y, return_inverse=True)[1]."
        )
    return Dataset(name, x, y, x_test, y_test, num_classes)


def load_digits(seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits as [N, 1, 8, 8] images scaled to [0, 1]; 20% held out for test."""
    from sklearn.datasets import load_digits as sklearn_load_digits

    digits = sklearn_load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return make_dataset("digits", x, torch.tensor(digits.target), seed=seed)


def load_mnist1d(seed: int = 0) -> Dataset:
    """MNIST-1D generated offline (4000 train and 1000 test signals of length 40, 10 classes).

    `mnist1d.data.make_dataset` reseeds Python's and NumPy's global generators; their states are
    restored afterwards. The data itself is the package's fixed seed-42 version, as published.
    """
    from mnist1d.data import get_dataset_args
    from mnist1d.data import make_dataset as mnist1d_make_dataset

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = mnist1d_make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return make_dataset("mnist1d", data["x"], data["y"], data["x_test"], data["y_test"], seed=seed)


def _read_arrays(path: Path):
    """What a .pt file holds (tensors and containers only), or an .npz file's arrays (no pickles)."""
    if path.suffix == ".pt":
        return torch.load(path, map_location="cpu", weights_only=True)
    with np.load(path, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def load_tensor_file(path: str | Path, seed: int = 0) -> Dataset:
    """A user's data from a `.pt` (torch.save of a dict) or `.npz` file with keys x, y[, x_test, y_test]."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist.")
    if path.suffix not in (".pt", ".npz"):
        raise ValueError(f"data file {path} must end in .pt or .npz, got {path.suffix!r}.")
    try:
        content = _read_arrays(path)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, OSError, zipfile.BadZipFile) as err:
        # Not torch's or NumPy's message: they advise loading with pickles allowed, which runs the file's code.
        raise ValueError(
            f"{path} could not be read as a data set ({type(err).__name__}); it must be a torch.save'd dict or a "
            "NumPy .npz holding only tensors or arrays: 'x', 'y' and optionally 'x_test', 'y_test'."
        ) from err
    if not isinstance(content, dict):
        raise ValueError(
            f"{path} holds a {type(content).__name__}; save a dict instead: torch.save({{'x': x, 'y': y}}, path)."
        )
    missing = {"x", "y"} - set(content)
    if missing:
        raise ValueError(f"{path} lacks {sorted(missing)}; it must hold arrays named 'x' and 'y' (found {sorted(content)}).")
    return make_dataset(path.name, content["x"], content["y"], content.get("x_test"), content.get("y_test"), seed=seed)


def load_dataset(name_or_path: str, seed: int = 0) -> Dataset:
    """A built-in data set by name ("digits", "mnist1d"), or a `.pt`/`.npz` file by path."""
    if name_or_path == "digits":
        return load_digits(seed)
    if name_or_path == "mnist1d":
        return load_mnist1d(seed)
    if name_or_path.endswith((".pt", ".npz")):
        return load_tensor_file(name_or_path, seed)
    raise ValueError(f"unknown data set {name_or_path!r}; choose one of {BUILTIN_DATASETS} or a .pt/.npz file path.")
