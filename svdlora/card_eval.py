"""`compress --eval DATA`: measure the compressed model and put the figures into its card."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from . import card
from .errors import SvdloraError
from .evaluation import DataRead, check_measurable, evaluate, read_data
from .evaluation.images import label_ids
from .evaluation.loading import checked_processor, fitting_task
from .evaluation.options import IMAGES, MAX_LENGTH_CAP, TEXT
from .evaluation.text import context_length
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


@dataclass(frozen=True)
class CheckedEval:
    """What compress --eval's checks before compressing read, for the evaluation to take rather than read again."""

    processor: Any  # the source's tokenizer / image processor
    data: DataRead  # the data as its task reads it: a text, images by position, sentence pairs


def check_before_compressing(
    source: str, data: str, eval_options: dict, model: nn.Module | None = None
) -> CheckedEval | None:
    """compress --eval's checks on ``model``: a local folder's or, where it could be built, a hub id's, on the
    meta device (before the load), or the loaded model (a config only the load reads). A model no task fits, a
    folder without tokenizer / image processor files, the task's options (a translator's source-text file
    without --references, --references for another task), data the task cannot read (an image folder for a
    causal LM), images of classes its config does not name and a text too short to score are refused before
    the model is compressed and written. ``eval_options``: --references, --eval-limit (``limit``) and the
    dataset flags, as ``evaluate`` takes them. ``model`` None (none could be built): no check, None."""
    if model is None:
        return None
    task = eval_task(model, source)
    read = read_data(task, data, eval_options)
    if task == IMAGES:
        label_ids(read.data.labels, model, data, read.data.class_ids)
    processor = checked_processor(source, task)
    check_measurable(task, read.data, processor, model)
    return CheckedEval(processor, read)


def fitted_options(model: nn.Module, task: str) -> dict:
    """The evaluation options compress --eval sets from ``model``, having no flag for them, where the defaults
    were refused once the folder was written: a causal LM whose config gives no context length (a state-space
    model: no position limit) takes windows of the cap on long contexts. (A translator's longest sentence is
    fitted to its decoder positions by ``evaluate`` itself, as for svdlora eval.)"""
    if task == TEXT and context_length(model) is None:
        return {"max_length": MAX_LENGTH_CAP}
    return {}


def evaluate_into_card(
    model: nn.Module,
    folder: Path,
    report: CompressionReport,
    source: str,
    data: str,
    eval_options: dict,
    checked: CheckedEval | None = None,
    world_size: int = 1,
) -> dict:
    """Evaluate the in-memory compressed model (task from its class) and rewrite the folder's card;
    ``checked``: the processor and data ``check_before_compressing`` read (None: read here); ``world_size``:
    the processes of the run that wrote the folder (a distributed run's card keeps its launcher)."""
    task = eval_task(model, source)
    processor = checked.processor if checked is not None else checked_processor(source, task)
    result = evaluate(
        (model, processor), task=task, data=data, progress=False, data_read=checked.data if checked else None,
        **eval_options, **fitted_options(model, task),
    )  # fmt: skip
    write_card(folder, report, source, result, type(model).__name__, world_size)
    return result


def write_card(
    folder: Path, report: CompressionReport, source: str, result: dict, class_name: str, world_size: int = 1
) -> None:
    """The folder's card with ``result``, the figures of the in-memory model saved there (compress --eval, sweep)."""
    # the in-memory model is named by its config's path, which compress leaves as the base model's:
    # the figures are the folder's, which holds exactly this model
    result["model"]["name"] = str(folder)
    card.write(
        folder, card.compressed_card(report, source, eval_result=result, class_name=class_name, world_size=world_size)
    )
