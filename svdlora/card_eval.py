"""`compress --eval DATA`: measure the compressed model and put the figures into its card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from . import card
from .errors import SvdloraError
from .evaluation import evaluate, load_data
from .evaluation.images import label_ids
from .evaluation.loading import checked_processor, early_processor, fitting_task
from .evaluation.options import DEFAULT_MAX_NEW_TOKENS, IMAGES, MAX_LENGTH_CAP, TEXT, TRANSLATION, build_options
from .evaluation.text import context_length
from .evaluation.translation import decoder_positions
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


def check_before_load(
    source: str, data: str, references: str | None = None, model: nn.Module | None = None, limit: int | None = None
) -> tuple[str | None, Any]:
    """compress --eval's checks of a local folder or, given its ``model``, a hub id, on its model built on the
    meta device (``model``, where the caller built it already): a model no task fits, a folder without
    tokenizer / image processor files, the task's options (a translator's source-text file without
    --references, --references for another task) and data the task cannot read (an image folder for a causal
    LM) are refused before the load, not once the model is compressed and written. A hub id without
    ``model``, or a config only the load can read: none. Returns ``early_processor``'s (task, processor), the
    processor for ``evaluate_into_card`` to take rather than load again."""
    return early_processor(
        source, find_task=lambda meta: check_options(meta, source, data, references, limit), model=model
    )


def check_options(model: nn.Module, source: str, data: str, references: str | None, limit: int | None = None) -> str:
    """The task --eval measures ``model`` on (a real or meta model), refusing options it cannot take, data it
    cannot read and images of classes its config does not name: the data is read here, and again by the
    evaluation (a text file, an image list, or a dataset's handle)."""
    task = eval_task(model, source)
    loaded = load_data(build_options(task, data, {"references": references, "limit": limit}))
    if task == IMAGES:
        label_ids(loaded.labels, model, data)
    return task


def fitted_options(model: nn.Module, task: str) -> dict:
    """The evaluation options compress --eval sets from ``model``, having no flag for them, where the defaults
    were refused once the folder was written: a translator with fewer decoder positions than the default
    longest sentence generates up to its positions (as text windows take the model's context; sweep, which
    has no --max-new-tokens either, takes this one), and a causal LM whose config gives no context length
    (a state-space model: no position limit) takes windows of the cap on long contexts."""
    if task == TEXT and context_length(model) is None:
        return {"max_length": MAX_LENGTH_CAP}
    if task == TRANSLATION and (positions := decoder_positions(model)) is not None:
        return {"max_new_tokens": min(positions, DEFAULT_MAX_NEW_TOKENS)}
    return {}


def evaluate_into_card(
    model: nn.Module,
    folder: Path,
    report: CompressionReport,
    source: str,
    data: str,
    limit: int | None,
    references: str | None = None,
    processor: Any = None,
) -> dict:
    """Evaluate the in-memory compressed model (task from its class) and rewrite the folder's card;
    ``processor``: the source's tokenizer / image processor already loaded (None: loaded here)."""
    task = eval_task(model, source)
    if processor is None:
        processor = checked_processor(source, task)
    result = evaluate(
        (model, processor), task=task, data=data, references=references, limit=limit, progress=False,
        **fitted_options(model, task),
    )  # fmt: skip
    # the in-memory model is named by its config's path, which compress leaves as the base model's:
    # the figures are the folder's, which holds exactly this model
    result["model"]["name"] = str(folder)
    card.write(folder, card.compressed_card(report, source, eval_result=result, class_name=type(model).__name__))
    return result
