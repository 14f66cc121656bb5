"""Top-1 accuracy of an image classifier, plus images per second.

Images go through the model's own image processor (resize, rescale, normalize as it was
trained). Class names in the data are matched to the model's ``config.id2label`` by name,
ignoring case and treating ``_``, ``-`` and spaces alike, so a folder ``test/automobile``
matches label ``Automobile``; integer labels of a dataset are taken as model label ids.
"""

from __future__ import annotations

import logging
import re
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import SvdloraError, first_line
from .measure import TaskRun, model_device, model_dtype, timed
from .options import EvalOptions
from .sources import (
    IMAGE_SUFFIXES,
    check_exists,
    column_values,
    dataset_builder,
    dataset_options,
    is_dataset,
    is_image_folder,
    is_saved_dataset,
    open_eval_dataset,
    pick_column,
    refuse_dataset_options,
    refuse_model_folder,
)

logger = logging.getLogger(__name__)


@dataclass
class ImageData:
    """Images fetched lazily by position, with their labels (class names or model label ids)."""

    labels: list[str | int]
    paths: list[Path] | None = None  # an image folder
    dataset: Any = None  # or a datasets.Dataset with an image column
    column: str | None = None
    class_ids: list[int] | None = None  # a ClassLabel column's ids, beside its names in labels

    def __len__(self) -> int:
        return len(self.labels)

    def images(self, start: int, end: int) -> list:
        from PIL import Image

        if self.paths is not None:
            out = []
            for path in self.paths[start:end]:
                try:
                    with Image.open(path) as im:
                        out.append(im.convert("RGB"))
                except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                    raise SvdloraError(
                        f"image {str(path)!r} cannot be read ({type(err).__name__}: {first_line(err)}): "
                        "remove or replace it"
                    ) from None
            return out
        rows = column_values(self.dataset[start:end], self.column)  # 'sample.img': a dict column's key
        return [im.convert("RGB") if isinstance(im, Image.Image) else im for im in rows]


def load_images(opts: EvalOptions) -> ImageData:
    """An image folder (``<data>/<class>/<image>``) or a dataset with image and label columns."""
    data = opts.data
    if not is_dataset(data):
        path = Path(str(data)).expanduser()
        if path.is_dir() and not is_saved_dataset(path):
            refuse_model_folder(data)
            given = dataset_options(opts, {"--image-column": opts.image_column, "--label-column": opts.label_column})
            if all(value is None for value in given.values()):
                return image_folder(path, opts.limit)
            # dataset options: a folder of class subfolders would ignore them; any other folder (a hub
            # dataset's copy, data/<split>/*.parquet) is read as a dataset, with them
            if is_image_folder(path):
                refuse_dataset_options(data, given, "an image folder (one subfolder per class)")
        if path.is_file() and dataset_builder(path) is None:
            raise SvdloraError(
                f"--data {str(data)!r} is a file: image-classification reads a folder with one subfolder "
                "per class, or a dataset with image and label columns"
            )
    dataset = open_eval_dataset(opts)
    image_column = pick_column(dataset, opts.image_column, ("image", "img"), "--image-column")
    label_column = pick_column(dataset, opts.label_column, ("label", "labels", "fine_label"), "--label-column")
    if opts.limit:
        dataset = dataset.select(range(min(opts.limit, len(dataset))))
    labels = column_values(dataset, label_column)
    names = getattr(dataset.features.get(label_column), "names", None)  # a ClassLabel knows its names
    if names:
        # -1 marks an unlabeled example (the test splits of ImageNet, GLUE...): names[-1] would
        # silently make it the last class, and the accuracy a count of that class
        bad = sorted({i for i in labels if not (isinstance(i, int) and 0 <= i < len(names))}, key=str)
        if bad:
            raise SvdloraError(
                f"--data: label column {label_column!r} holds ids {bad[:5]}, which are not among its "
                f"{len(names)} class names (-1: unlabeled, as in many test splits): pick a labeled split (--split)"
            )
        return ImageData([names[i] for i in labels], dataset=dataset, column=image_column, class_ids=labels)
    return ImageData(labels=labels, dataset=dataset, column=image_column)


def image_folder(root: Path, limit: int | None = None) -> ImageData:
    """Files of ``root/<class>/``, sorted, interleaved across classes so ``limit`` stays balanced."""
    root = check_exists(root)
    per_class = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            per_class[folder.name] = files
    if not per_class:
        raise SvdloraError(
            f"--data {str(root)!r} has no class subfolders with images: expected {root}/<class name>/<image>.jpg"
        )
    paths, labels = [], []
    longest = max(len(f) for f in per_class.values())
    for i in range(longest):  # round robin: the first N images cover every class
        for name, files in per_class.items():
            if i < len(files):
                paths.append(files[i])
                labels.append(name)
    if limit:
        paths, labels = paths[:limit], labels[:limit]
    logger.info("%d images in %d classes under %s", len(paths), len(per_class), root)
    return ImageData(labels=labels, paths=paths)


def _normalize(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", str(name)).strip().lower()


def label_ids(
    labels: list[str | int], model: nn.Module, data_name: str = "", class_ids: list[int] | None = None
) -> torch.Tensor:
    """Model label ids of ``labels``, or an error listing the classes the model does not know. A name the model
    gives several labels (ImageNet's two "crane"s) is the one of them that ``class_ids`` (a ClassLabel's) gives."""
    config = getattr(model, "config", None)
    id2label = {int(k): v for k, v in (getattr(config, "id2label", None) or {}).items()}
    num_labels = len(id2label)
    if all(isinstance(label, int) for label in labels):
        bad = sorted({label for label in labels if not 0 <= label < num_labels})
        if bad:
            raise SvdloraError(
                f"--data {data_name!r} has label ids {bad[:5]} but the model has {num_labels} labels: "
                "pass a dataset whose label ids are the model's"
            )
        return torch.tensor(labels, dtype=torch.long)
    by_name: dict[str, list[int]] = {}
    for k in sorted(id2label):
        by_name.setdefault(_normalize(id2label[k]), []).append(k)
    unknown = sorted({str(label) for label in labels if _normalize(label) not in by_name})
    if unknown:
        shown = [id2label[i] for i in sorted(id2label)][:20]
        hint = (
            " (its config has only the default names LABEL_0, LABEL_1, ...: set id2label in config.json)"
            if all(re.fullmatch(r"LABEL_\d+", str(v)) for v in id2label.values())
            else ""
        )
        raise SvdloraError(
            f"classes {unknown[:10]} of --data {data_name!r} are not labels of the model, whose labels are "
            f"{shown}{hint}: name the class folders (or the dataset's label names) after the model's labels"
        )
    own = class_ids or [None] * len(labels)
    return torch.tensor(
        [_one_label(label, by_name[_normalize(label)], i, data_name) for label, i in zip(labels, own, strict=True)],
        dtype=torch.long,
    )


def _one_label(label: str, candidates: list[int], class_id: int | None, data_name: str) -> int:
    """The model's label id named ``label``: the only one, or among several the data's own id."""
    if len(candidates) == 1:
        return candidates[0]
    if class_id in candidates:
        return class_id
    raise SvdloraError(
        f"the class {str(label)!r} of --data {data_name!r} is ambiguous: {str(label)!r} names the model's labels "
        f"{candidates}; a dataset whose label column is a ClassLabel with the model's ids says which"
    )


@torch.no_grad()
def evaluate_images(
    model: nn.Module, processor, data: ImageData, opts: EvalOptions, meter: AbstractContextManager | None = None
) -> TaskRun:
    """Top-1 accuracy over ``data``, ``batch_size`` images per forward pass."""
    if processor is None:
        raise SvdloraError(
            "image-classification needs the model's image processor: save preprocessor_config.json in the "
            "model folder or pass processor="
        )
    device, dtype = model_device(model), model_dtype(model)
    targets = label_ids(data.labels, model, str(opts.data), data.class_ids)
    batch_size = opts.effective_batch_size
    correct, clock = 0, [0.0]
    # The first batch once, untimed and unmetered: first-call costs (thread pools, kernel choice,
    # library code paged in) then count against no model.
    warm = processor(images=data.images(0, min(batch_size, len(data))), return_tensors="pt")["pixel_values"]
    model(pixel_values=warm.to(device=device, dtype=dtype))
    with meter or nullcontext():  # peak memory covers the evaluation loop, not data preparation
        bar = tqdm(total=len(data), desc="accuracy", unit="img", disable=not opts.progress, leave=False)
        for start in range(0, len(data), batch_size):
            end = min(start + batch_size, len(data))
            pixels = processor(images=data.images(start, end), return_tensors="pt")["pixel_values"]
            pixels = pixels.to(device=device, dtype=dtype)
            with timed(device, clock):
                output = model(pixel_values=pixels)
            logits = output.logits if hasattr(output, "logits") else output
            correct += int((logits.argmax(-1).cpu() == targets[start:end]).sum())
            bar.update(end - start)
        bar.close()
    total = len(data)
    metrics = {"accuracy": correct / total, "correct": correct, "total": total}
    return TaskRun(metrics=metrics, examples=total, units=total, unit="images/s", model_seconds=clock[0])
