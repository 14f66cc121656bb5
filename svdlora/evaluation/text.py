"""Perplexity of a causal language model with a sliding window, plus tokens per second.

The windows follow the Hugging Face guide "Perplexity of fixed-length models": windows of
``max_length`` tokens start every ``stride`` tokens; in each window only the tokens not scored
by an earlier window are targets (the overlapping context gets label -100), so every token is
scored at most once, with at least ``max_length - stride`` tokens of context. The guide then
weights each window's mean loss by ``valid labels - 1``, which is exact for the first window
but one token short for the later ones (there the label shift drops a -100, not a target); here
the summed NLL and the exact number of scored tokens are accumulated instead, so

    perplexity = exp( Σ_windows Σ_targets −log p(token | context) / number of scored tokens )

The very first token of the text has no context and is never scored; neither is the first token
of each window when ``stride == max_length`` (windows that do not overlap, as in the guide).
"""

from __future__ import annotations

import inspect
import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..choices import DEFAULT_TEXT_COLUMN
from ..errors import SvdloraError
from .measure import TaskRun, model_device, timed
from .options import MAX_LENGTH_CAP, EvalOptions
from .sources import (
    column_values,
    dataset_builder,
    dataset_options,
    is_dataset,
    open_eval_dataset,
    pick_column,
    read_text,
    refuse_dataset_options,
    refuse_image_folder,
    text_values,
)

logger = logging.getLogger(__name__)


# check_scorable's prefix of the text
HEAD_CHARACTERS = 1000


@dataclass(frozen=True)
class Window:
    begin: int  # first token of the window
    end: int  # one past its last token
    targets: int  # tokens at the end of the window that this window scores (trg_len in the guide)

    @property
    def length(self) -> int:
        return self.end - self.begin


def load_text(opts: EvalOptions) -> str:
    """The evaluation text: a plain text file as is, or a dataset column joined by blank lines."""
    data = opts.data
    if not is_dataset(data):
        path = Path(str(data)).expanduser()
        if path.is_file() and dataset_builder(path) is None:
            given = dataset_options(opts, {"--text-column": opts.text_column})
            refuse_dataset_options(data, given, "a plain text file, read whole")
            return read_text(path)
    refuse_image_folder(data, "text-generation", "a text file (.txt, .gz) or a dataset with a text column")
    dataset = open_eval_dataset(opts)
    column = pick_column(dataset, opts.text_column, (DEFAULT_TEXT_COLUMN,), "--text-column")
    # "\n\n".join as in the HF guide: documents stay separated by a blank line.
    text = "\n\n".join(text_values(column_values(dataset, column), column, "--data", column_flag="--text-column"))
    if not text.strip():
        raise SvdloraError(f"--data {str(data)!r}: column {column!r} holds no text")
    return text


def sliding_windows(seq_len: int, max_length: int, stride: int) -> list[Window]:
    """The guide's windows over ``seq_len`` tokens; every token lands in exactly one target span."""
    windows, prev_end = [], 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        windows.append(Window(begin, end, end - prev_end))
        prev_end = end
        if end == seq_len:
            break
    return windows


# the config keys of the longest input, as transformers' causal LMs name it (max_seq_len: MPT)
CONTEXT_KEYS = ("n_positions", "max_position_embeddings", "n_ctx", "seq_length", "max_seq_len")


def context_length(model: nn.Module) -> int | None:
    """The longest input the model's position embeddings allow, when its config says: a vision-language
    model's (Gemma 3, Llava) in its text config, the language model's that reads the text."""
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None)
    config = text_config if text_config is not None else config
    for name in CONTEXT_KEYS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def window_settings(model: nn.Module, opts: EvalOptions) -> tuple[int, int]:
    """``(max_length, stride)``: the options, or the model's context (capped) and half of it."""
    context = context_length(model)
    max_length = opts.max_length
    if max_length is None:
        if context is None:
            raise SvdloraError("the model's config gives no context length: pass --max-length (e.g. 1024)")
        max_length = min(context, MAX_LENGTH_CAP)
    elif context is not None and max_length > context:
        raise SvdloraError(
            f"max_length {max_length} exceeds the model's context of {context} tokens: pass --max-length {context}"
        )
    stride = opts.stride or max(1, max_length // 2)
    if stride > max_length:
        raise SvdloraError(
            f"stride must be <= max_length ({max_length}), got {stride}: pass --stride {max_length // 2}"
        )
    return max_length, stride


def check_baseline_context(model: nn.Module | None, baseline: nn.Module | None, opts: EvalOptions) -> None:
    """The baseline reads the model's windows (the same tokens, for comparable perplexities): a window
    longer than the baseline's context is refused before the model's evaluation, not after it."""
    context = context_length(baseline) if baseline is not None else None
    if model is None or context is None:
        return
    try:
        max_length, _ = window_settings(model, opts)
    except SvdloraError:
        return  # the model's own evaluation says what is wrong with its settings
    if max_length > context:
        raise SvdloraError(
            f"--baseline's context is {context} tokens, shorter than the {max_length}-token windows the model is "
            f"read in: pass --max-length {context} (both models then read windows of {context} tokens)"
        )


def token_ids(tokenizer, text: str) -> torch.Tensor:
    """The text's token ids, 1-D (verbose=False: the whole text is longer than model_max_length on purpose)."""
    return tokenizer(text, return_tensors="pt", verbose=False)["input_ids"][0]


def _refuse_short(tokens: int) -> None:
    if tokens < 2:  # the first token is never scored
        raise SvdloraError(f"the text is {tokens} token(s) long: perplexity needs at least 2 tokens")


def check_scorable(tokenizer, text: str) -> None:
    """A text too short for a perplexity, refused before the evaluation (compress --eval: before compressing).
    Its first HEAD_CHARACTERS decide where they are 2 tokens (no vocabulary entry is that long, so the whole
    text is too): tokenizing all of it is left to the evaluation (wikitext-2's test text: 2.7 s on SmolLM2's)."""
    head = token_ids(tokenizer, text[:HEAD_CHARACTERS]).numel()
    _refuse_short(head if head >= 2 or len(text) <= HEAD_CHARACTERS else token_ids(tokenizer, text).numel())


def _accepts(model: nn.Module, argument: str) -> bool:
    try:
        return argument in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0] if isinstance(output, tuple) else output


def _batches(windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive windows of equal shape (length and targets), at most ``batch_size`` each."""
    batches: list[list[Window]] = []
    for w in windows:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and (last[0].length, last[0].targets) == (w.length, w.targets):
            last.append(w)
        else:
            batches.append([w])
    return batches


def _score(
    model: nn.Module, ids: torch.Tensor, batch: list[Window], device: torch.device, clock: list[float] | None = None
) -> tuple[float, int, int]:
    """Summed NLL of one batch of equal-shape windows, tokens scored, tokens fed."""
    w0 = batch[0]
    inputs = torch.stack([ids[w.begin : w.end] for w in batch]).to(device)
    # Only the logits that predict targets are needed: the last `targets` positions and the one
    # before them (for the first window, all of them). Saves most of the vocab-sized head matmul.
    keep = min(w0.targets + 1, w0.length)
    kwargs = {"logits_to_keep": keep} if _accepts(model, "logits_to_keep") else {}
    if _accepts(model, "use_cache"):
        kwargs["use_cache"] = False
    with timed(device, clock if clock is not None else [0.0]):
        logits = _logits(model(inputs, **kwargs))[:, -keep:, :]
    predicted = logits[:, :-1, :].float()  # float32 loss even for half-precision models
    targets = inputs[:, inputs.shape[1] - keep + 1 :]
    nll = F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), targets.reshape(-1), reduction="sum")
    return nll.item(), targets.numel(), inputs.numel()


@torch.no_grad()
def perplexity(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_length: int,
    stride: int,
    batch_size: int = 1,
    limit: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    meter: AbstractContextManager | None = None,
) -> TaskRun:
    """Sliding-window perplexity of ``input_ids`` (1-D, the whole tokenized text).

    Args:
        model: a causal LM returning logits of shape (batch, length, vocab).
        max_length: tokens per window; stride: tokens between window starts.
        batch_size: windows of equal shape run in one forward pass.
        limit: score only the first ``limit`` windows.
        meter: entered around the evaluation loop (e.g. a ``PeakMemory``).
    Returns:
        A ``TaskRun`` with metrics ``perplexity``, ``nll`` (nats per token), ``tokens`` (scored)
        and ``windows``; throughput counts every token fed to the model.

    Example:
        >>> run = perplexity(model, tokenizer(text, return_tensors="pt").input_ids[0], 1024, 512)
        >>> run.metrics["perplexity"]
    """
    device = torch.device(device)
    ids = input_ids.reshape(-1)
    _refuse_short(ids.numel())
    windows = sliding_windows(ids.numel(), max_length, stride)[:limit]
    batches = _batches(windows, batch_size)
    # The first batch once, untimed and unmetered: first-call costs (thread pools, kernel
    # choice, library code paged in) then count against no model.
    _score(model, ids, batches[0], device)
    nll_sum, scored, fed, clock = 0.0, 0, 0, [0.0]
    with meter or nullcontext():  # peak memory covers the evaluation loop, not data preparation
        bar = tqdm(total=len(windows), desc="perplexity", unit="window", disable=not progress, leave=False)
        for batch in batches:
            batch_nll, batch_scored, batch_fed = _score(model, ids, batch, device, clock)
            nll_sum, scored, fed = nll_sum + batch_nll, scored + batch_scored, fed + batch_fed
            bar.update(len(batch))
        bar.close()
    nll = nll_sum / scored
    metrics = {
        "perplexity": float(torch.tensor(nll, dtype=torch.float64).exp()),
        "nll": nll,
        "tokens": scored,
        "windows": len(windows),
    }
    return TaskRun(metrics=metrics, examples=len(windows), units=fed, unit="tokens/s", model_seconds=clock[0])


def evaluate_text(
    model: nn.Module, tokenizer, text: str, opts: EvalOptions, meter: AbstractContextManager | None = None
) -> TaskRun:
    """Tokenize ``text`` with the model's tokenizer and run ``perplexity`` with the options' settings."""
    if tokenizer is None:
        raise SvdloraError(
            "text-generation needs the model's tokenizer: save it in the model folder or pass processor="
        )
    max_length, stride = window_settings(model, opts)
    ids = token_ids(tokenizer, text)
    logger.info("%d tokens, windows of %d every %d", ids.numel(), max_length, stride)
    run = perplexity(
        model,
        ids,
        max_length,
        stride,
        batch_size=opts.effective_batch_size,
        limit=opts.limit,
        device=model_device(model),
        progress=opts.progress,
        meter=meter,
    )
    run.settings = {"max_length": max_length, "stride": stride}
    return run
