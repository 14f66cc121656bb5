"""Measure a (compressed) model against its original: quality, speed, size and memory, side by side.

``evaluate`` returns one dict, the same for every task, which ``svdlora eval --json`` writes::

    {
      "schema_version": 1,
      "svdlora_version": "0.1.0",
      "task": "text-generation" | "image-classification" | "translation",
      "data": {"source": str, "config": str | null, "split": str | null, "examples": int},  # config: --data-config
      "settings": {                       # null where the task does not use it
        "batch_size": int, "limit": int | null,
        "max_length": int | null, "stride": int | null,          # text-generation
        "num_beams": int | null, "max_new_tokens": int | null,   # translation
        "runtime": str | null             # --runtime, for svdlora folders (model and baseline); null: as stored
      },
      "model":    MODEL,
      "baseline": MODEL | null,
      "ratios":   {key: model / baseline | null} | null   # every MODEL figure and numeric metric
    }

    MODEL = {
      "name": str, "compressed": bool, "device": "cpu" | "cuda:0" | ..., "dtype": "float32" | ...,
      "parameters": int,                 # unique parameters (tied ones once; factors for compressed)
      "bytes_on_disk": int | null,       # weight files of the folder; null for in-memory models
      "model_memory_bytes": int,         # resident parameters and buffers
      "peak_memory_bytes": int,          # see peak_memory_method and svdlora.evaluation.measure
      "peak_memory_method": str,
      "load_time_s": float | null,       # loading (and rebuilding) the model; null if in memory
      "wall_time_s": float,              # the whole evaluation after loading: data prep included
      "model_time_s": float,             # the part spent in forward / generate calls
      "examples": int,                   # windows / images / sentences evaluated
      "throughput": float,               # units per second of model_time_s
      "throughput_unit": "tokens/s" | "images/s" | "sentences/s",
      "metrics": METRICS
    }

    METRICS, by task:
      text-generation:      {"perplexity", "nll" (nats/token), "tokens" (scored), "windows"}
      image-classification: {"accuracy" (0..1), "correct", "total"}
      translation:          {"bleu", "chrf", "sentences", "bleu_signature", "chrf_signature"}

Ratios are ``model / baseline`` (so perplexity 1.05 means 5% worse, parameters 0.5 half the
size); a ratio is null when either side is null or the baseline's figure is 0.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..bars import quiet_bars
from ..errors import SvdloraError
from ..quantize import dtype_name
from ..version import __version__
from .images import evaluate_images, load_images
from .loading import (
    Candidate,
    early_processor,
    infer_task,
    local_folder,
    outline,
    preflight,
    prepare,
    same_vocabulary,
)
from .measure import PeakMemory, TaskRun, count_parameters, model_device, model_dtype, model_memory_bytes
from .options import IMAGES, TASKS, TEXT, TRANSLATION, EvalOptions, build_options
from .report import format_table, ratios
from .sources import is_dataset
from .text import check_baseline_context, check_scorable, evaluate_text, load_text
from .translation import check_pad_token, evaluate_translation, fitted_max_new_tokens, load_pairs

logger = logging.getLogger(__name__)

__all__ = [
    "DATA_KEYS",
    "METRIC_KEYS",
    "MODEL_KEYS",
    "RESULT_KEYS",
    "SETTINGS_KEYS",
    "TASKS",
    "EvalOptions",
    "evaluate",
    "format_table",
]

SCHEMA_VERSION = 1
RESULT_KEYS = ("schema_version", "svdlora_version", "task", "data", "settings", "model", "baseline", "ratios")
DATA_KEYS = ("source", "config", "split", "examples")
SETTINGS_KEYS = ("batch_size", "limit", "max_length", "stride", "num_beams", "max_new_tokens", "runtime")
MODEL_KEYS = (
    "name", "compressed", "device", "dtype", "parameters", "bytes_on_disk", "model_memory_bytes",
    "peak_memory_bytes", "peak_memory_method", "load_time_s", "wall_time_s", "model_time_s",
    "examples", "throughput", "throughput_unit", "metrics",
)  # fmt: skip
METRIC_KEYS = {
    TEXT: ("perplexity", "nll", "tokens", "windows"),
    IMAGES: ("accuracy", "correct", "total"),
    TRANSLATION: ("bleu", "chrf", "sentences", "bleu_signature", "chrf_signature"),
}

_LOADERS = {TEXT: load_text, IMAGES: load_images, TRANSLATION: load_pairs}
_RUNNERS = {TEXT: evaluate_text, IMAGES: evaluate_images, TRANSLATION: evaluate_translation}


def evaluate(
    model_or_path: Any,
    task: str | None = None,
    data: Any = None,
    baseline: Any = None,
    *,
    processor: Any = None,
    data_read: DataRead | None = None,
    **options: Any,
) -> dict:
    """Evaluate a model (and optionally its baseline) on one task; the dict of ``--json``.

    Args:
        model_or_path: an svdlora folder, a dense model folder or hub id, an ``nn.Module``,
            or ``(nn.Module, tokenizer_or_image_processor)``.
        task: "text-generation" (perplexity), "image-classification" (top-1 accuracy) or
            "translation" (BLEU / chrF); None: the one the model fits (a causal LM: text-generation,
            an image classifier: image-classification, an encoder-decoder that generates: translation).
        data: a text file, an image folder, a source-sentence file, or a ``datasets`` dataset
            (hub name, ``save_to_disk`` folder, .json/.csv/.parquet file, or a Dataset object).
        baseline: the original model, in any form ``model_or_path`` takes; measured in the same
            run, with the same data and settings, and compared figure by figure.
        processor: tokenizer or image processor for in-memory models that do not carry one.
        data_read: ``data`` as ``read_data`` read it with these options, where the caller read it already
            (compress --eval, for its checks before compressing; sweep, for its points): not read again.
        **options: any field of ``EvalOptions`` (references, split, limit, batch_size, device,
            dtype, max_length, stride, num_beams, max_new_tokens, the column names, progress).
    Returns:
        The result dict described in this module's docstring.

    Example:
        >>> result = evaluate("out/gpt2-svd", task="text-generation", data="wiki.test.txt",
        ...                   baseline="gpt2", limit=16)
        >>> result["ratios"]["perplexity"]
    """
    # progress=False: transformers' bars too ("Loading weights", a hub id's downloads), and datasets'
    with quiet_bars(options.get("progress", True), datasets=True):
        return _evaluate(model_or_path, task, data, baseline, processor, data_read, options)


def _evaluate(
    model_or_path: Any,
    task: str | None,
    data: Any,
    baseline: Any,
    processor: Any,
    data_read: DataRead | None,
    options: dict,
) -> dict:
    if data is None:
        raise SvdloraError("data is required: a text file, an image folder, a source-sentence file or a dataset")
    # the model's skeleton, built once where the task, the context check or the early processor read it; tried
    # once: without a task a failure is the error (infer_task's), with one a None is kept and left to the load
    model_outline = functools.cache(lambda: outline(model_or_path, required=task is None))
    opts = build_options(task or infer_task(model_or_path, model_outline()), data, options)
    if data_read is None:
        loaded = load_data(opts)  # data problems surface before any model is loaded
    else:
        loaded, opts.split = data_read.data, data_read.split
    base_outline = base_processor = None  # the baseline's, checked by preflight: not loaded again
    if baseline is not None:
        # a broken baseline fails now, not after the model ran
        base_outline, base_processor = preflight(baseline, opts, "--baseline")
        if opts.task == TEXT:
            check_baseline_context(model_outline(), base_outline, opts)
    if opts.task == TRANSLATION and opts.max_new_tokens is None:  # one fitted value, both models generate alike
        opts.max_new_tokens = fitted_max_new_tokens(model_outline(), base_outline)
    # a local folder's processor, read from its meta model and files: a wrong task, no tokenizer files or data
    # too short to score are refused in a second, not after the model's load
    model_processor = processor
    if processor is None and local_folder(model_or_path):
        model_processor = early_processor(str(model_or_path), opts.task, model=model_outline())[1]
    # a translator's meta model (built above with its processor) names the pad id a tokenizer may lack
    named = opts.task == TRANSLATION and model_processor is not None
    check_measurable(opts.task, loaded, model_processor, model_outline() if named else None)
    check_measurable(opts.task, loaded, base_processor, base_outline)
    entries: dict[str, dict | None] = {"model": None, "baseline": None}
    first_run: TaskRun | None = None
    for role, spec in (("model", model_or_path), ("baseline", baseline)):
        if spec is None:
            if role == "model":
                raise SvdloraError("MODEL is required: pass a folder, a hub id or an nn.Module")
            continue
        own_processor = (
            model_processor if role == "model" else processor if isinstance(spec, nn.Module) else base_processor
        )
        candidate = prepare(spec, opts, own_processor, flag="MODEL" if role == "model" else "--baseline")
        if role == "model":
            model_processor = candidate.processor
        elif not same_vocabulary(model_processor, candidate.processor):
            logger.warning(
                "the baseline %s has another tokenizer than the model: each is scored on its own tokens, so "
                "the ratios compare different things; pass the model it was compressed from",
                candidate.name,
            )
        try:
            logger.info("evaluating %s %s", role, candidate.name)
            entries[role], run = _measure(candidate, loaded, opts)
        finally:
            candidate.release()
        if first_run is None:
            first_run = run
            if opts.task == TEXT:  # the baseline must see exactly the same windows
                opts.max_length, opts.stride = run.settings["max_length"], run.settings["stride"]
    model, base = entries["model"], entries["baseline"]
    return {
        "schema_version": SCHEMA_VERSION,
        "svdlora_version": __version__,
        "task": opts.task,
        "data": {
            "source": _data_name(opts.data),
            "config": opts.data_config,  # a dataset's configuration: other data under the same name
            "split": opts.split,
            "examples": model["examples"],
        },
        "settings": {
            "batch_size": opts.effective_batch_size,
            "limit": opts.limit,
            "max_length": first_run.settings.get("max_length"),
            "stride": first_run.settings.get("stride"),
            "num_beams": first_run.settings.get("num_beams"),
            "max_new_tokens": first_run.settings.get("max_new_tokens"),
            "runtime": opts.runtime if model["compressed"] or (base or {}).get("compressed") else None,
        },
        "model": model,
        "baseline": base,
        "ratios": ratios(model, base) if base else None,
    }


def load_data(opts: EvalOptions) -> Any:
    """The data of ``opts`` as its task reads it (text, image list or dataset, sentence pairs), its first
    ``limit`` examples: an error for data the task cannot read. A dataset's split read is set on ``opts``."""
    return _LOADERS[opts.task](opts)


def check_measurable(task: str, loaded: Any, processor: Any, model: nn.Module | None = None) -> None:
    """Data read for ``task`` that the model's ``processor`` cannot measure on, refused before the model is loaded
    (or compressed): a text too short to score, sentences a tokenizer without a pad token cannot batch (``model``,
    its meta model, names the pad id). ``processor`` None (not known before the load): left to the run."""
    if task == TEXT and processor is not None:
        check_scorable(processor, loaded)
    if task == TRANSLATION:
        check_pad_token(processor, model, "translation")


@dataclass(frozen=True)
class DataRead:
    """Evaluation data read once for several ``evaluate`` calls (compress --eval's checks and evaluation,
    sweep's points): what the task reads, and the dataset split it read (the result names it)."""

    data: Any
    split: str | None


def read_data(task: str, data: Any, options: dict) -> DataRead:
    """``data`` read as ``evaluate(task=task, data=data, **options)`` reads it."""
    opts = build_options(task, data, options)
    with quiet_bars(opts.progress, datasets=True):  # datasets' "Generating train split" of a dataset file
        return DataRead(load_data(opts), opts.split)


def _measure(candidate: Candidate, loaded: Any, opts: EvalOptions) -> tuple[dict, TaskRun]:
    model = candidate.model
    device = model_device(model)
    peak = PeakMemory(device, model)
    start = time.perf_counter()
    run = _RUNNERS[opts.task](model, candidate.processor, loaded, opts, peak)
    wall = time.perf_counter() - start
    entry = {
        "name": candidate.name,
        "compressed": candidate.compressed,
        "device": str(device),
        "dtype": dtype_name(model_dtype(model)),
        "parameters": count_parameters(model),
        "bytes_on_disk": candidate.bytes_on_disk,
        "model_memory_bytes": model_memory_bytes(model),
        "peak_memory_bytes": peak.bytes,
        "peak_memory_method": peak.method,
        "load_time_s": candidate.load_seconds,
        "wall_time_s": wall,
        "model_time_s": run.model_seconds,
        "examples": run.examples,
        "throughput": run.units / run.model_seconds if run.model_seconds > 0 else 0.0,
        "throughput_unit": run.unit,
        "metrics": run.metrics,
    }
    return entry, run


def _data_name(data: Any) -> str:
    if is_dataset(data):
        return f"<in-memory {type(data).__name__} of {len(data)} rows>"
    return str(data) if isinstance(data, str | Path) else repr(data)
