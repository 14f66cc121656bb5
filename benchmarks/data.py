"""Small loaders for the benchmark data sets (CIFAR-10 JPEGs, Multi30k, plain text).

Everything is read from paths given by the caller; ``DEFAULT_DATA`` only points at the
shared data folder next to the repository for convenience.
"""

from __future__ import annotations

import gzip
import logging
import tarfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
# Per-channel statistics of the CIFAR-10 training set (the usual published values).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def extract_cifar10(archive: Path, cache_dir: Path) -> tuple[Path, Path]:
    """Extract ``cifar10-jpg.tar.gz`` once into ``cache_dir/cifar10-jpg``.

    Returns:
        The ``train/`` and ``test/`` folders, each holding one subfolder per class.
    """
    root = Path(cache_dir) / "cifar10-jpg"
    done = root / ".extracted"
    if not done.exists():
        if not Path(archive).is_file():
            raise FileNotFoundError(f"CIFAR-10 archive not found: {archive} (pass --data)")
        logger.info("extracting %s to %s", archive, root)
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
        done.touch()
    return root / "train", root / "test"


def _decode_folder(folder: Path, limit_per_class: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    images, labels = [], []
    for label, name in enumerate(CIFAR10_CLASSES):
        files = sorted((folder / name).glob("*.jpg"))[:limit_per_class]
        for f in files:
            with Image.open(f) as im:
                images.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
            labels.append(label)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels, dtype=torch.int64)


def load_cifar10(
    archive: Path, cache_dir: Path, split: str, limit_per_class: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 ``split`` ("train" or "test") as uint8 images (N, 3, 32, 32) and int64 labels.

    The JPEGs are decoded once and cached as a safetensors file next to the extracted folder.
    ``limit_per_class`` takes the first images of each class (for smoke tests).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    train_dir, test_dir = extract_cifar10(archive, cache_dir)
    suffix = "" if limit_per_class is None else f"-{limit_per_class}"
    cached = Path(cache_dir) / f"cifar10-{split}{suffix}.safetensors"
    if cached.exists():
        t = load_file(cached)
        return t["images"], t["labels"]
    logger.info("decoding CIFAR-10 %s JPEGs (once)", split)
    x, y = _decode_folder(train_dir if split == "train" else test_dir, limit_per_class)
    save_file({"images": x, "labels": y}, str(cached))
    return x, y


def require(paths: dict[str, Path | None]) -> None:
    """Stop, naming the flag to pass, where an input path is not given (None) or does not exist.

    The defaults point at the shared data folder next to the repository (``DEFAULT_DATA``) and at
    ``~/.cache/svdlora``, which a user's machine need not have; without this check a run ends in a
    traceback (or transformers' "Repo id must be in the form ...") that names no flag.
    """
    for flag, path in paths.items():
        if path is None:
            raise SystemExit(f"{flag} is missing; pass it with its location")
        if not Path(path).exists():
            raise SystemExit(f"{flag} {path}: no such file or folder; pass {flag} with its location")


def read_lines(path: Path) -> list[str]:
    """Lines of a text file, gzipped or not, without their line endings."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def read_text(path: Path) -> str:
    """Whole content of a UTF-8 text file."""
    return Path(path).read_text(encoding="utf-8")
