"""`compress --eval DATA`: measure the compressed model and put the figures into its card."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from . import card
from .errors import SvdloraError
from .evaluation import evaluate
from .evaluation.loading import checked_processor, fitting_task, outline
from .report import CompressionReport


def eval_task(model: nn.Module, source: str) -> str:
    """The task --eval measures ``model`` on: the one its class fits (compress has no --task to name it)."""
    task = fitting_task(model)
    if task is None:
        raise SvdloraError(
            f"--eval measures a causal LM, an image classifier or a translator, and {source!r} is a "
            f"{type(model).__name__}: drop --eval"
        )
    return task


def check_before_load(source: str) -> None:
    """compress --eval's checks of a local folder, on its model built on the meta device: a model no task fits
    and a folder without tokenizer / image processor files are refused before the load, not once the model is
    compressed and written. A hub id (its files come with the model), or a config only the load can read: none."""
    model = outline(source) if Path(source).expanduser().is_dir() else None
    if model is not None:
        checked_processor(source, eval_task(model, source))


def evaluate_into_card(
    model: nn.Module, folder: Path, report: CompressionReport, source: str, data: str, limit: int | None
) -> dict:
    """Evaluate the in-memory compressed model (task from its class) and rewrite the folder's card."""
    task = eval_task(model, source)
    result = evaluate((model, checked_processor(source, task)), task=task, data=data, limit=limit, progress=False)
    # the in-memory model is named by its config's path, which compress leaves as the base model's:
    # the figures are the folder's, which holds exactly this model
    result["model"]["name"] = str(folder)
    card.write(folder, card.compressed_card(report, source, eval_result=result, class_name=type(model).__name__))
    return result
