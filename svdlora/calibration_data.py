"""Calibration data -> model batches, read the way `svdlora eval --data` reads data.

What a model gets depends on its kind:

- causal LM: text (a file, or a dataset's text column) cut into windows of
  ``calibration_length`` tokens, spread evenly over the text, labels = the tokens;
- encoder-decoder (e.g. Marian): source sentences (one per line, or a dataset column); the
  targets are the model's own greedy translations, so no references are needed;
- image classifier: an image folder (``<class>/<image>``) or a dataset with an image column;
- text encoder (e.g. BERT): text windows without labels.

``SELF`` (``--calibration self``) is the data-free path for causal LMs: text sampled from the
model itself, starting at its BOS token.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .bars import quiet_bars
from .errors import SvdloraError
from .evaluation.images import image_folder
from .evaluation.sources import (
    check_exists,
    column_values,
    dataset_builder,
    is_dataset,
    is_saved_dataset,
    open_dataset,
    pick_column,
    read_lines,
    read_text,
    text_values,
)
from .evaluation.translation import check_pad_token
from .padding import is_causal_lm

logger = logging.getLogger(__name__)

SELF = "self"
FLAG = "--calibration"
IMAGE_BATCH = 16
SENTENCE_BATCH = 8
SELF_LENGTH = 256  # tokens per self-generated sample: long enough for real context, short enough to be quick


AUDIO_INPUTS = ("input_features", "input_values")  # Whisper's / Speech2Text's log-mels, Wav2Vec2's waveform


def model_kind(model: nn.Module) -> str:
    """'causal-lm', 'seq2seq', 'image', 'audio' or 'encoder'."""
    config = getattr(model, "config", None)
    inputs = getattr(model, "main_input_name", "input_ids")
    if inputs == "pixel_values":
        return "image"
    if inputs in AUDIO_INPUTS:  # before seq2seq: Whisper is an encoder-decoder that reads no text
        return "audio"
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if is_causal_lm(model) and getattr(model, "get_output_embeddings", lambda: None)() is not None:
        return "causal-lm"
    return "encoder"


def kind_article(kind: str) -> str:
    """'an image', 'an audio', 'an encoder', 'a seq2seq', 'a causal-lm': a ``model_kind`` in a sentence."""
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def check_fits(kind: str, data: Any, length: int) -> None:
    """The refusals that need only the model's ``model_kind`` (the CLI checks them on the meta model, before
    the load): windows too short for a causal LM, 'self' for a model that does not generate text."""
    if kind == "causal-lm" and length < 2:  # one token predicts nothing: no loss, no gradient statistics
        raise SvdloraError(
            f"--calibration-length {length} is too short: a causal LM's windows need 2 or more tokens, "
            "each scored on the next"
        )
    if data == SELF and kind != "causal-lm":
        raise SvdloraError(
            f"{FLAG} self generates text, which needs a causal language model; this is {kind_article(kind)} model: "
            f"pass {FLAG} DATA (text, sentences or an image folder) or {FLAG} none"
        )
    if kind == "audio":
        raise SvdloraError(
            f"{FLAG} reads text, sentences or images, and this is an audio model: pass {FLAG} none, or in Python "
            "calibration=[batches of its own inputs]"
        )


def calibration_batches(
    model: nn.Module,
    data: Any,
    processor: Any,
    samples: int,
    length: int,
    seed: int = 0,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> list[dict]:
    """Model-ready batches on ``device`` (default: the model's) from ``data`` (a path, dataset, or ``SELF``).

    Raises:
        SvdloraError: data missing, empty, or of the wrong kind for the model (before any slow work).
    """
    check_data(data)
    kind = model_kind(model)
    device = device or next(model.parameters()).device
    check_fits(kind, data, length)
    with quiet_bars(progress, datasets=True):  # datasets' "Generating train split" of a dataset file too
        if data == SELF:
            batches = generate_text(
                model, processor, samples, min(SELF_LENGTH, length, _max_positions(model)), seed, progress
            )
        elif kind == "image":
            batches = _image_batches(data, processor, samples)
        elif kind == "seq2seq":
            batches = _seq2seq_batches(model, data, processor, samples, length, progress)
        else:
            batches = _text_windows(model, data, processor, samples, length, labels=kind == "causal-lm")
    return [{k: v.to(device) for k, v in batch.items()} for batch in batches]


def check_data(data: Any) -> None:
    """Data the readers below can take; anything else reached them as a path and was refused for the tokenizer
    (calibration=123: "calibration needs the model's tokenizer") or its str() read as a dataset name."""
    if not isinstance(data, str | os.PathLike) and not is_dataset(data):
        raise SvdloraError(
            "calibration must be a text or sentence file, an image folder, a dataset (a folder, a hub name or a "
            f"datasets.Dataset), 'self', or a list of model batches; got {type(data).__name__} {data!r}"[:300]
        )


def warn_if_cut(model: nn.Module, length: int, data: Any = None) -> None:
    """A window length the user gave beyond what the windows can hold reads shorter windows: said once, naming both
    (the caller asks only for a given length: the default 512 is more than tiny test models' 64). The model's
    positions bound every text window; self-generated text (``data`` SELF) also ``SELF_LENGTH``."""
    positions = _max_positions(model)
    limit = min(SELF_LENGTH, positions) if data == SELF else positions
    if length > limit and model_kind(model) in ("causal-lm", "encoder"):  # the kinds that read text windows
        bound = f"the model's {positions} positions" if limit == positions else f"self-generated text's {limit} tokens"
        logger.warning("--calibration-length %d is more than %s: the windows are %d tokens", length, bound, limit)


def _max_positions(model: nn.Module) -> int:
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(limit) if limit else 1 << 30


def _need(processor: Any, what: str) -> Any:
    if processor is None:
        raise SvdloraError(
            f"calibration needs the model's {what}: save it into the model folder, or pass processor=... "
            "to svdlora.compress"
        )
    # a name or path (processor="gpt2") failed deep inside: "'str' object is not callable"
    if not callable(processor):
        raise SvdloraError(
            f"processor= takes the model's {what} itself, loaded (e.g. transformers.AutoTokenizer.from_pretrained"
            f"(name) or AutoImageProcessor.from_pretrained(name)), got {type(processor).__name__} {processor!r}"[:300]
        )
    return processor


def _read_calibration_text(data: Any) -> str:
    if not is_dataset(data):
        path = Path(str(data)).expanduser()
        if path.is_dir() and not is_saved_dataset(path):
            raise SvdloraError(f"{FLAG} {str(data)!r} is a folder: this model calibrates on a text file or dataset")
        if path.is_file() and dataset_builder(path) is None:
            return read_text(path, FLAG)
    dataset = open_dataset(data, None, None, FLAG)
    column = pick_column(dataset, None, ("text", "sentence", "source"), None)  # no flag picks a column
    text = "\n\n".join(text_values(column_values(dataset, column), column, FLAG))
    if not text.strip():
        raise SvdloraError(f"{FLAG} {str(data)!r}: column {column!r} holds no text")
    return text


def _text_windows(model, data, tokenizer, samples: int, length: int, labels: bool) -> list[dict]:
    tokenizer = _need(tokenizer, "tokenizer")
    text = _read_calibration_text(data)
    length = min(length, _max_positions(model))
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if ids.numel() < 2:
        raise SvdloraError(f"{FLAG} {str(data)!r} holds fewer than 2 tokens: pass more text")
    count = max(1, min(samples, ids.numel() // length))
    length = min(length, ids.numel())
    # windows spread evenly over the whole text, so a small sample still covers its variety
    starts = torch.linspace(0, ids.numel() - length, count).long().tolist()
    batches = []
    for start in starts:
        window = ids[start : start + length][None]
        batch = {"input_ids": window}
        if labels:
            batch["labels"] = window
        batches.append(batch)
    _warn_if_fewer(count, samples, f"text for {count} windows of {length} tokens")
    return batches


def _warn_if_fewer(found: int, samples: int, what: str) -> None:
    """Data with fewer samples than asked calibrates on what it has, said once (``what``: what it has)."""
    if found < samples:
        logger.warning("%s has %s (asked for %d)", FLAG, what, samples)


def _image_batches(data, image_processor, samples: int) -> list[dict]:
    image_processor = _need(image_processor, "image processor")
    if not is_dataset(data):
        path = check_exists(data, FLAG)
        if path.is_file() and dataset_builder(path) is None:
            raise SvdloraError(
                f"{FLAG} {str(data)!r} is a file: an image model calibrates on a folder with one subfolder per "
                "class (or any subfolders of images), or a dataset with an image column"
            )
    if not is_dataset(data) and Path(str(data)).expanduser().is_dir() and not is_saved_dataset(Path(str(data))):
        images = image_folder(Path(str(data)).expanduser(), samples)
        fetch = images.images
        total = len(images)
    else:
        dataset = open_dataset(data, None, None, FLAG)
        column = pick_column(dataset, None, ("image", "img", "pixel_values"), None)
        dataset = dataset.select(range(min(samples, len(dataset))))
        total = len(dataset)

        def fetch(start, end):
            return [im.convert("RGB") for im in dataset[start:end][column]]

    _warn_if_fewer(total, samples, f"{total} images")
    batches = []
    for start in range(0, total, IMAGE_BATCH):
        try:
            pixels = image_processor(fetch(start, start + IMAGE_BATCH), return_tensors="pt")["pixel_values"]
        except OSError as err:
            raise SvdloraError(f"{FLAG} {str(data)!r}: an image cannot be read ({err})") from None
        batches.append({"pixel_values": pixels})
    return batches


def _seq2seq_batches(model, data, tokenizer, samples: int, length: int, progress: bool) -> list[dict]:
    tokenizer = _need(tokenizer, "tokenizer")
    check_pad_token(tokenizer, model, FLAG)  # batches of sentences are padded (the text path's windows are not)
    if is_dataset(data) or dataset_builder(str(data)) is not None:
        dataset = open_dataset(data, None, None, FLAG)
        column = pick_column(dataset, None, ("source", "src", "text", "sentence"), None)
        sentences = text_values(column_values(dataset, column), column, FLAG)
    else:
        sentences = read_lines(data, FLAG)
    sentences = [s for s in sentences if s.strip()][:samples]
    _warn_if_fewer(len(sentences), samples, f"{len(sentences)} source sentences")
    device = next(model.parameters()).device
    batches = []
    for start in tqdm(range(0, len(sentences), SENTENCE_BATCH), desc="translating calibration", disable=not progress):
        enc = tokenizer(
            sentences[start : start + SENTENCE_BATCH],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=length,
        )
        with torch.no_grad():  # the model's own translations stand in for references
            out = model.generate(**{k: v.to(device) for k, v in enc.items()}, num_beams=1, max_new_tokens=64)
        labels = out[:, 1:].cpu().clone()  # drop the decoder start token
        labels[labels == tokenizer.pad_token_id] = -100
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return batches


def generate_text(model, tokenizer, samples: int, length: int, seed: int = 0, progress: bool = True) -> list[dict]:
    """Text the model writes itself from its BOS token (plain sampling, temperature 1).

    The samples follow the model's own distribution, so their activations cover what the model
    does when used, with no data at all; batches of 16 with a KV cache keep it quick.
    """
    config = model.config
    vocab = model.get_input_embeddings().num_embeddings
    generation = getattr(model, "generation_config", None)
    candidates = [getattr(generation, "bos_token_id", None), getattr(config, "bos_token_id", None)]
    if tokenizer is not None:
        candidates += [tokenizer.bos_token_id, tokenizer.eos_token_id]
    valid = [c for c in candidates if isinstance(c, int) and 0 <= c < vocab]
    # no usable BOS (e.g. a config's default id beyond a small vocabulary): start from random tokens
    bos = valid[0] if valid else None
    device = next(model.parameters()).device
    pad = getattr(config, "pad_token_id", None)
    pad = pad if isinstance(pad, int) and 0 <= pad < vocab else (bos or 0)
    batches = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        bar = tqdm(total=samples * (length - 1), desc="generating calibration text", unit="token", disable=not progress)
        for start in range(0, samples, 16):
            count = min(16, samples - start)
            if bos is None:
                prompt = torch.randint(vocab, (count, 1), device=device)
            else:
                prompt = torch.full((count, 1), bos, dtype=torch.long, device=device)
            with torch.no_grad():
                out = model.generate(
                    input_ids=prompt,
                    attention_mask=torch.ones_like(prompt),
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=length - 1,
                    min_new_tokens=length - 1,  # full-length windows: no padding, every token counts
                    pad_token_id=pad,
                    streamer=_TokenProgress(bar, count),
                )
            for row in out.cpu():
                batches.append({"input_ids": row[None], "labels": row[None]})
        bar.close()
    return batches


class _TokenProgress:
    """A ``generate`` streamer that moves a progress bar by the batch's rows at every new token (the
    first call is the prompt): minutes of generation on a CPU are not spent behind a bar at 0/1."""

    def __init__(self, bar, rows: int) -> None:
        self.bar, self.rows, self.prompt_seen = bar, rows, False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.bar.update(self.rows)
        self.prompt_seen = True

    def end(self) -> None:
        pass
