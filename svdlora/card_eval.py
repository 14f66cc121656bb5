"""`compress --eval DATA`: measure the compressed model and put the figures into its card."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from . import card
from .evaluation import evaluate
from .evaluation.loading import checked_processor, infer_task
from .report import CompressionReport


def evaluate_into_card(
    model: nn.Module, folder: Path, report: CompressionReport, source: str, data: str, limit: int | None
) -> dict:
    """Evaluate the in-memory compressed model (task from its class) and rewrite the folder's card."""
    task = infer_task(model)
    result = evaluate((model, checked_processor(source, task)), task=task, data=data, limit=limit, progress=False)
    # the in-memory model is named by its config's path, which compress leaves as the base model's:
    # the figures are the folder's, which holds exactly this model
    result["model"]["name"] = str(folder)
    card.write(folder, card.compressed_card(report, source, eval_result=result, class_name=type(model).__name__))
    return result
