"""Data sets: built-in ones load offline with the right shapes; user files load or fail clearly."""

import numpy as np
import pytest
import torch

from fxclip.data import load_dataset, load_digits, load_mnist1d, load_tensor_file, make_dataset


def test_digits_are_8x8_images_in_unit_range_with_a_held_out_split():
    data = load_digits()
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    assert len(data.x_train) + len(data.x_test) == 1797
    assert len(data.x_test) == round(0.2 * 1797)
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    assert data.y_train.dtype == torch.long


def test_mnist1d_is_generated_offline_and_leaves_global_rng_alone(monkeypatch):
    requests = pytest.importorskip("requests")
    pytest.importorskip("mnist1d")

    def no_network(*args, **kwargs):
        raise AssertionError("mnist1d tried to download")

    monkeypatch.setattr(requests, "get", no_network)
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    data = load_mnist1d()
    assert np.random.rand() == expected_next
    assert data.input_shape == (40,) and data.num_classes == 10
    assert (len(data.x_train), len(data.x_test)) == (4000, 1000)


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
@pytest.mark.parametrize("with_test_split", [False, True])
def test_user_tensor_file_round_trips(tmp_path, suffix, with_test_split):
    gen = torch.Generator().manual_seed(0)
    arrays = {"x": torch.randn(30, 5, generator=gen), "y": torch.randint(0, 3, (30,), generator=gen)}
    if with_test_split:
        arrays |= {"x_test": torch.randn(6, 5, generator=gen), "y_test": torch.tensor([0, 1, 2, 3, 0, 1])}
    path = tmp_path / f"mine{suffix}"
    if suffix == ".pt":
        torch.save(arrays, path)
    else:
        np.savez(path, **{k: v.numpy() for k, v in arrays.items()})
    data = load_dataset(str(path))
    if with_test_split:
        assert torch.equal(data.x_train, arrays["x"]) and torch.equal(data.y_test, arrays["y_test"])
        assert data.num_classes == 4
    else:
        assert (len(data.x_train), len(data.x_test)) == (24, 6)
        # the split is a permutation of the file's examples
        together = torch.cat([data.x_train, data.x_test])
        assert torch.equal(together[together[:, 0].argsort()], arrays["x"][arrays["x"][:, 0].argsort()])


@pytest.mark.parametrize(
    "x,y,message",
    [
        (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), "is empty"),
        (torch.zeros(4, 3), torch.zeros(5, dtype=torch.long), "one per example"),
        (torch.zeros(4, 3), torch.tensor([0.0, 1.5, 2.0, 1.0]), "integer class ids"),
        (torch.zeros(4, 3), torch.tensor([0, -1, 2, 1]), ">= 0"),
        (torch.zeros(4, 3), torch.tensor([0, 1, 10**9, 1]), "largest class id is 1000000000.*renumber"),
        (torch.zeros(4, 3), torch.tensor([0, 1, 4, 1]), "5 outputs for 4 examples"),
        (torch.zeros(4, 3), torch.tensor([0.0, float("inf"), 2.0, 1.0]), "integer class ids"),
        (torch.tensor([[0.0, float("nan")]] + [[0.0, 0.0]] * 3), torch.zeros(4), "x has 1 NaN or infinite value "),
        (torch.full((4, 3), float("-inf")), torch.zeros(4), "x has 12 NaN or infinite values"),
        (np.full((4, 3), 1e300), torch.zeros(4), "NaN or infinite"),  # too large for float32
        (torch.zeros(4), torch.zeros(4), "x must have shape"),
        (torch.zeros(4, 3, dtype=torch.complex64), torch.zeros(4), "x is complex"),
    ],
)
def test_bad_examples_raise_clear_errors(x, y, message):
    with pytest.raises(ValueError, match=message):
        make_dataset("bad", x, y)


def test_bad_files_raise_clear_errors(tmp_path):
    np.savez(tmp_path / "nan.npz", x=np.array([[0.0], [np.nan]]), y=np.zeros(2))
    with pytest.raises(ValueError, match="nan.npz.*NaN or infinite"):
        load_tensor_file(tmp_path / "nan.npz")
    torch.save({"x": torch.zeros(3, 2)}, tmp_path / "no_y.pt")
    with pytest.raises(ValueError, match=r"lacks \['y'\]"):
        load_tensor_file(tmp_path / "no_y.pt")
    torch.save(torch.zeros(3), tmp_path / "not_dict.pt")
    with pytest.raises(ValueError, match="save a dict"):
        load_tensor_file(tmp_path / "not_dict.pt")
    with pytest.raises(ValueError, match="does not exist"):
        load_tensor_file(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="test inputs have shape"):
        make_dataset("m", torch.zeros(4, 3), torch.zeros(4), torch.zeros(2, 5), torch.zeros(2))


class NotAnArray:
    pass


UNREADABLE_FILES = {  # file name -> how to write it
    "garbage.pt": lambda path: path.write_bytes(b"garbage"),
    "empty.pt": lambda path: path.write_bytes(b""),
    "object.pt": lambda path: torch.save({"x": NotAnArray(), "y": torch.zeros(3)}, path),
    "truncated.pt": lambda path: path.write_bytes(b"PK\x03\x04" + bytes(40)),
    "garbage.npz": lambda path: path.write_bytes(b"garbage"),
    "empty.npz": lambda path: path.write_bytes(b""),
    "object.npz": lambda path: np.savez(path, x=np.array([NotAnArray()], dtype=object), y=np.zeros(1)),
}


@pytest.mark.parametrize("name", UNREADABLE_FILES)
def test_unreadable_files_raise_clear_errors(tmp_path, name):
    UNREADABLE_FILES[name](tmp_path / name)
    with pytest.raises(ValueError, match=f"{name} could not be read as a data set") as error:
        load_tensor_file(tmp_path / name)
    assert "weights_only" not in str(error.value) and "allow_pickle" not in str(error.value)
