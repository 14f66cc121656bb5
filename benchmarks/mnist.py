"""MNIST in its original IDX format, read with nothing but gzip and numpy.

The four files (``train-images-idx3-ubyte.gz`` and friends) are read from a folder the caller
names; ``DEFAULT_MNIST`` only points at the shared data folder next to the repository.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

DEFAULT_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# IDX magic numbers: 0x0803 = unsigned bytes, 3 dimensions; 0x0801 = unsigned bytes, 1 dimension.
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path} is not an IDX file of the expected kind (magic {found}, want {magic})")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {data.size} values")
    return data.reshape(shape)


def load_mnist(root: Path, split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One MNIST split as float images in [0, 1], flattened to (N, 784), and int64 labels.

    No mean/std normalization: both reproduced sources feed ``ToTensor()`` output, i.e. [0, 1].

    Args:
        root: folder holding the four ``*-idx?-ubyte.gz`` files.
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        limit: keep only the first ``limit`` images (smoke tests).

    Returns:
        ``(images, labels)`` with shapes (N, 784) float32 and (N,) int64.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    image_file, label_file = (root / name for name in _FILES[split])
    for f in (image_file, label_file):
        if not f.is_file():
            raise FileNotFoundError(f"MNIST file not found: {f} (pass --data <folder with the IDX files>)")
    images = _read_idx(image_file, _IMAGES_MAGIC)[:limit]
    labels = _read_idx(label_file, _LABELS_MAGIC)[:limit]
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)
    return x, torch.from_numpy(labels.astype(np.int64))


def available(root: Path) -> bool:
    """Whether ``root`` holds all four MNIST files (tests skip when it does not)."""
    return all((Path(root) / name).is_file() for pair in _FILES.values() for name in pair)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2000) -> float:
    """Top-1 accuracy of ``model`` on (x, y), in eval mode (dropout off)."""
    was_training = model.training
    model.eval()
    correct = sum(
        (model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
        for i in range(0, len(x), batch_size)
    )
    model.train(was_training)
    return correct / len(x)
