"""Settings of one evaluation run: one dataclass, checked on construction."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ..choices import DEFAULT_TEXT_COLUMN, IMAGES, RUNTIMES, TASKS, TEXT, TRANSLATION
from ..errors import SvdloraError
from ..models import default_device, parse_dtype
from .sources import dataset_builder

# One window of max_length tokens is already a large matmul; images and sentences are small.
DEFAULT_BATCH_SIZE = {TEXT: 1, IMAGES: 32, TRANSLATION: 16}
# Loaded models run in float32 by default: the SVD error is then not mixed with rounding
# error, and scores compare with float32 reference numbers. In-memory models keep theirs.
DEFAULT_DTYPE = torch.float32
# The HF perplexity guide uses GPT-2's full context (1024) and stride 512; longer contexts are
# capped so a model with an 8k context does not turn a quick check into minutes per window.
MAX_LENGTH_CAP = 1024
# translation: the longest generated sentence, where --max-new-tokens is not given (evaluate takes the models'
# decoder positions where they are fewer: translation.fitted_max_new_tokens)
DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_NUM_BEAMS = 4  # what Marian / OPUS-MT models ship with


# The options one task reads and the others ignore.
TASK_OPTIONS = {
    TEXT: ("text_column", "max_length", "stride"),
    IMAGES: ("image_column", "label_column"),
    TRANSLATION: ("references", "source_column", "target_column", "num_beams", "max_new_tokens"),
}


@dataclass
class EvalOptions:
    """Everything ``evaluate`` and ``svdlora eval`` take besides the models.

    Example:
        >>> EvalOptions(task="text-generation", data="wiki.test.txt", limit=8)
    """

    task: str = field(metadata={"help": f"One of {', '.join(TASKS)}."})
    data: Any = field(
        metadata={
            "help": "Text file, image folder, source-sentence file, a `datasets` dataset "
            "(hub name, load_from_disk folder, .json/.csv/.parquet file) or a datasets.Dataset."
        }
    )
    references: str | Path | None = field(
        default=None, metadata={"help": "translation: reference file, one sentence per line."}
    )
    split: str | None = field(default=None, metadata={"help": "Dataset split (default: test when present)."})
    data_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    text_column: str | None = field(  # None: not given (read: the "text" column), as translation's settings
        default=None,
        metadata={"help": f"text-generation: column joined with blank lines (default: {DEFAULT_TEXT_COLUMN})."},
    )
    image_column: str | None = field(default=None, metadata={"help": "Image column (default: image or img)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (default: label or labels)."})
    source_column: str | None = field(
        default=None, metadata={"help": "translation: source column; 'translation.de' reads a dict column."}
    )
    target_column: str | None = field(default=None, metadata={"help": "translation: reference column."})
    max_length: int | None = field(
        default=None, metadata={"help": f"Window length (default: the model's context, at most {MAX_LENGTH_CAP})."}
    )
    stride: int | None = field(default=None, metadata={"help": "Window step (default: max_length // 2)."})
    # None: not given (another task's run refuses any value given, its default included), translation's default
    num_beams: int | None = field(
        default=None, metadata={"help": f"translation: beam width (default {DEFAULT_NUM_BEAMS})."}
    )
    max_new_tokens: int | None = field(
        default=None,
        metadata={
            "help": f"translation: longest generated sentence (default {DEFAULT_MAX_NEW_TOKENS}, at most the "
            "models' decoder positions)."
        },
    )
    batch_size: int | None = field(
        default=None, metadata={"help": "Windows / images / sentences per forward (default per task)."}
    )
    device: str | None = field(
        default=None,
        metadata={"help": "cpu, cuda, cuda:1 (default: cuda when present; in-memory models stay where they are)."},
    )
    dtype: str | torch.dtype | None = field(
        default=None,
        metadata={
            "help": "float32, bfloat16, float16 (default float32 for loaded models; in-memory ones keep theirs)."
        },
    )
    runtime: str | None = field(
        default=None,
        metadata={
            "help": "svdlora folders: factorized (default: as stored), pairs (pivoted layers as plain pairs), "
            "merged, or auto (per layer the fastest layout on the device, measured for one token per call)."
        },
    )
    limit: int | None = field(default=None, metadata={"help": "Evaluate the first N windows / images / sentences."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise SvdloraError(f"task must be one of {', '.join(TASKS)}; got {self.task!r}")
        if self.data is None or (isinstance(self.data, str) and not self.data.strip()):
            raise SvdloraError(f"data must name a file, folder or dataset, got {self.data!r}")
        for name in ("max_length", "stride", "batch_size", "limit", "num_beams", "max_new_tokens"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                flag = "--" + name.replace("_", "-")
                raise SvdloraError(f"{name} must be an integer >= 1, got {value!r}: pass e.g. {flag} 8")
        if self.stride is not None and self.max_length is not None and self.stride > self.max_length:
            raise SvdloraError(
                f"stride must be <= max_length, got stride {self.stride} > max_length {self.max_length}: "
                "windows would skip tokens; pass e.g. --stride "
                f"{self.max_length // 2 or 1}"
            )
        if self.task == TEXT and self.max_length == 1:
            raise SvdloraError(
                "max_length must be >= 2 for text: a one-token window predicts nothing; pass e.g. --max-length 512"
            )
        if self.task == TRANSLATION and self.references is None and _is_plain_file(self.data):
            raise SvdloraError(
                f"translation from the text file {str(self.data)!r} needs --references FILE "
                "(one reference sentence per line, as many lines as the source)"
            )
        self._refuse_other_tasks_options()
        if self.task == TRANSLATION:
            self.num_beams = self.num_beams or DEFAULT_NUM_BEAMS  # max_new_tokens: None is fitted to the models
        if self.runtime not in (None, *RUNTIMES):
            raise SvdloraError(f"runtime must be one of {RUNTIMES}, got {self.runtime!r}")
        self.dtype = parse_dtype(self.dtype)
        if self.device is not None:
            self.device = str(default_device(self.device))

    def _refuse_other_tasks_options(self) -> None:
        """An option only another task reads, set away from its default: refused, not silently ignored."""
        defaults = {f.name: f.default for f in fields(self)}
        for task, names in TASK_OPTIONS.items():
            for name in names:
                if task != self.task and getattr(self, name) != defaults[name]:
                    flag = "--" + name.replace("_", "-")
                    raise SvdloraError(
                        f"{name} is only used by --task {task}, got it with --task {self.task}: drop {flag}"
                    )

    @property
    def effective_batch_size(self) -> int:
        return self.batch_size or DEFAULT_BATCH_SIZE[self.task]

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def _is_plain_file(data: Any) -> bool:
    if not isinstance(data, str | Path):
        return False
    path = Path(data)
    return path.is_file() and dataset_builder(path) is None


def build_options(task: str, data: Any, options: dict) -> EvalOptions:
    """``EvalOptions`` from keyword options, naming any unknown one."""
    unknown = sorted(set(options) - set(EvalOptions.names()))
    if unknown:
        raise SvdloraError(f"unknown evaluate() option(s) {unknown}; valid: {', '.join(EvalOptions.names()[2:])}")
    return EvalOptions(task=task, data=data, **options)
