"""Import step: MNIST when it is on this machine, else scikit-learn's handwritten digits.

The machines this demo runs on have no internet, so nothing is downloaded:
real MNIST is used when an `mnist.npz` is found (the `mnist_path` parameter,
or Keras's cache at ~/.keras/datasets/mnist.npz); otherwise the UCI digits that
scikit-learn ships (1,797 8x8 images) are upscaled to MNIST's 28x28 layout.
The step says which one it used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _find_mnist(mnist_path: str) -> Path | None:
    for candidate in (mnist_path, "~/.keras/datasets/mnist.npz"):
        if candidate and Path(candidate).expanduser().is_file():
            return Path(candidate).expanduser()
    return None


def _digits_as_mnist(test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 8x8 pixels of 0..16 -> 24x24 by repeating each pixel 3x3, padded to 28x28, 0..255.
    images = np.kron(digits.images, np.ones((3, 3)))
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    images = np.round(images * (255 / 16)).astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(images))
    n_test = int(len(images) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    labels = digits.target.astype(np.uint8)
    return {
        "x_train": images[train],
        "y_train": labels[train],
        "x_test": images[test],
        "y_test": labels[test],
    }


def load_mnist(dataset: Path, mnist_path: str, seed: int) -> None:
    """Write the raw images and labels (uint8, 28x28) to `dataset`."""
    found = _find_mnist(mnist_path)
    if found is not None:
        with np.load(found) as data:
            arrays = {key: data[key] for key in ("x_train", "y_train", "x_test", "y_test")}
        print(f"importer: using MNIST from {found}")
    else:
        arrays = _digits_as_mnist(test_fraction=0.2, seed=seed)
        print(
            "importer: no mnist.npz on this machine (no network here); using scikit-learn's"
            " handwritten digits (UCI, 1,797 images) upscaled to 28x28 instead"
        )
    print(f"importer: {len(arrays['x_train'])} training and {len(arrays['x_test'])} test images")
    np.savez_compressed(dataset, **arrays)
