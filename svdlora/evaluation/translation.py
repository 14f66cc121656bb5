"""BLEU and chrF of an encoder-decoder translation model, plus sentences per second.

Generation is deterministic beam search: ``num_beams`` (default 4, what Marian/OPUS-MT models
ship with), ``max_new_tokens`` (default 128, at most the models' decoder positions), ``length_penalty``
1.0, ``early_stopping`` on, no sampling; any other setting (forced EOS, bad words, ...) comes from the
model's own ``generation_config``. Sentences are batched longest first (less padding), padded on the
right, and scored in their original order with sacrebleu's default BLEU (13a tokenization, exp smoothing) and chrF2, on
detokenized text as the model's tokenizer decodes it, against every reference of a sentence (a
dataset's list column holds several); the signatures are reported with the scores so the numbers
can be compared with published ones.
"""

from __future__ import annotations

import copy
import logging
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import SvdloraError
from .measure import TaskRun, model_device, timed
from .options import DEFAULT_MAX_NEW_TOKENS, EvalOptions
from .sources import (
    column_values,
    dataset_builder,
    dataset_options,
    is_dataset,
    open_eval_dataset,
    pick_column,
    read_lines,
    refuse_dataset_options,
    refuse_image_folder,
    text_values,
)

logger = logging.getLogger(__name__)


# a sentence's references: one, or several (a dataset's list column; sacrebleu's multi-reference scores)
References = list[str | list[str]]


def load_pairs(opts: EvalOptions) -> tuple[list[str], References]:
    """Parallel source and reference sentences, the first ``limit`` of them."""
    data = opts.data
    refuse_image_folder(
        data, "translation", "a source-sentence file with --references, or a dataset with source and target columns"
    )
    plain = False
    if not is_dataset(data):
        path = Path(str(data)).expanduser()
        plain = path.is_file() and dataset_builder(path) is None
    if plain or (opts.references is not None and not is_dataset(data)):
        if opts.references is None:
            raise SvdloraError(f"translation from {str(data)!r} needs --references FILE (one sentence per line)")
        given = dataset_options(opts, {"--source-column": opts.source_column, "--target-column": opts.target_column})
        refuse_dataset_options(data, given, "a plain sentence file")
        sources = read_lines(data, "--data")
        references = read_lines(opts.references, "--references")
        if len(sources) != len(references):
            raise SvdloraError(
                f"--data {str(data)!r} has {len(sources)} lines but --references {str(opts.references)!r} has "
                f"{len(references)}: they must be parallel, one sentence per line"
            )
    else:
        if opts.references is not None:
            raise SvdloraError("--references goes with a plain source file; with a dataset pass --target-column")
        dataset = open_eval_dataset(opts)
        if opts.limit:
            dataset = dataset.select(range(min(opts.limit, len(dataset))))
        src = pick_column(dataset, opts.source_column, ("source", "src"), "--source-column")
        tgt = pick_column(dataset, opts.target_column, ("target", "tgt", "reference"), "--target-column")
        sources = text_values(column_values(dataset, src), src, "--data", parallel=True, column_flag="--source-column")
        references = text_values(
            column_values(dataset, tgt), tgt, "--data", parallel=True, several=True, column_flag="--target-column"
        )
    return sources[: opts.limit], references[: opts.limit]


def generation_settings(opts: EvalOptions) -> dict:
    """The generation arguments both models get."""
    return {
        "num_beams": opts.num_beams,
        "max_new_tokens": opts.max_new_tokens,
        "do_sample": False,
        "length_penalty": 1.0,
        "early_stopping": opts.num_beams > 1,
    }


def decoder_positions(model: nn.Module) -> int | None:
    """The decoder's learned / sinusoidal positions, where its config gives them: no generation goes past them."""
    positions = getattr(model.config, "max_position_embeddings", None)
    return positions if isinstance(positions, int) else None


def check_pad_token(tokenizer, model: nn.Module | None, who: str) -> None:
    """Source sentences are batched padded (evaluation and calibration alike): a tokenizer without a pad token
    refused in one line (``who`` names the step), not with the tokenizer's own ValueError. ``model`` (None: not
    known) tells which id its padding takes."""
    if tokenizer is None or tokenizer.pad_token is not None:
        return
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    raise SvdloraError(
        f"{who}: the tokenizer has no pad token, which batching the source sentences needs: set one "
        f"(tokenizer.pad_token = ...{f', the model pads with id {pad}' if isinstance(pad, int) else ''}) "
        "and pass it as processor=, or save a tokenizer with one into the model folder"
    )


def fitted_max_new_tokens(*models: nn.Module | None) -> int:
    """--max-new-tokens not given: the default, at most the decoder positions of each model (None: not known
    before its load), so a translator with fewer positions generates up to them, the baseline alike."""
    positions = [p for m in models if m is not None and (p := decoder_positions(m)) is not None]
    return min([DEFAULT_MAX_NEW_TOKENS, *positions])


def _input_limit(model: nn.Module, tokenizer) -> int | None:
    limits = [getattr(tokenizer, "model_max_length", None), decoder_positions(model)]
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
    return min(limits) if limits else None


def _model_inputs(tokenizer, sources: list[str], max_input: int | None, device: torch.device) -> dict:
    """One batch's encoder inputs, padded on the right whatever the tokenizer's padding side: left padding
    shifts a sentence's absolute positions (Marian's, BART's) by its batch's longest, so its translation
    depended on the batch it fell in."""
    encoding = tokenizer(
        sources,
        return_tensors="pt",
        padding=True,
        padding_side="right",
        truncation=max_input is not None,
        max_length=max_input,
    )
    return {k: v.to(device) for k, v in encoding.items() if k in ("input_ids", "attention_mask")}


@torch.no_grad()
def translate(
    model: nn.Module, tokenizer, sources: list[str], opts: EvalOptions, meter: AbstractContextManager | None = None
) -> tuple[list[str], float]:
    """Hypotheses for ``sources`` in their order, and the seconds spent in ``generate``."""
    positions = decoder_positions(model)
    if positions is not None and opts.max_new_tokens > positions:
        raise SvdloraError(
            f"--max-new-tokens {opts.max_new_tokens} reaches past the model's {positions} decoder positions: "
            f"pass --max-new-tokens {positions} or less"
        )
    device = model_device(model)
    generation_config = copy.deepcopy(model.generation_config)
    generation_config.update(**generation_settings(opts))
    generation_config.max_length = None  # max_new_tokens decides; avoids the "both set" warning
    max_input = _input_limit(model, tokenizer)
    order = sorted(range(len(sources)), key=lambda i: -len(sources[i]))
    hypotheses: list[str] = [""] * len(sources)
    batch_size = opts.effective_batch_size
    clock = [0.0]
    # The first batch once with 2 new tokens, untimed and unmetered: first-call costs (thread
    # pools, kernel choice, library code paged in) then count against no model.
    warm_config = copy.deepcopy(generation_config)
    warm_config.max_new_tokens = 2
    warm = _model_inputs(tokenizer, [sources[i] for i in order[:batch_size]], max_input, device)
    model.generate(**warm, generation_config=warm_config)
    with meter or nullcontext():  # peak memory covers the evaluation loop, not data preparation
        bar = tqdm(total=len(sources), desc="translate", unit="sent", disable=not opts.progress, leave=False)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            inputs = _model_inputs(tokenizer, [sources[i] for i in idx], max_input, device)
            with timed(device, clock):
                out = model.generate(**inputs, generation_config=generation_config)
            for i, text in zip(idx, tokenizer.batch_decode(out, skip_special_tokens=True), strict=True):
                hypotheses[i] = text.strip()
            bar.update(len(idx))
        bar.close()
    return hypotheses, clock[0]


def reference_streams(references: References) -> list[list[str | None]]:
    """sacrebleu's reference streams: stream k holds each sentence's k-th reference, None where it has fewer."""
    per_sentence = [[r] if isinstance(r, str) else r for r in references]
    depth = max(len(r) for r in per_sentence)
    return [[r[k] if k < len(r) else None for r in per_sentence] for k in range(depth)]


def score(hypotheses: list[str], references: References) -> dict:
    """Corpus BLEU and chrF with sacrebleu's defaults, with their signatures."""
    from sacrebleu.metrics import BLEU, CHRF

    bleu, chrf, streams = BLEU(), CHRF(), reference_streams(references)
    return {
        "bleu": bleu.corpus_score(hypotheses, streams).score,
        "chrf": chrf.corpus_score(hypotheses, streams).score,
        "sentences": len(hypotheses),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


def evaluate_translation(
    model: nn.Module,
    tokenizer,
    pairs: tuple[list[str], References],
    opts: EvalOptions,
    meter: AbstractContextManager | None = None,
) -> TaskRun:
    """Translate the sources and score them against the references."""
    if tokenizer is None:
        raise SvdloraError("translation needs the model's tokenizer: save it in the model folder or pass processor=")
    check_pad_token(tokenizer, model, "translation")  # a hub id's: known only now
    sources, references = pairs
    hypotheses, seconds = translate(model, tokenizer, sources, opts, meter)
    metrics = score(hypotheses, references)
    return TaskRun(
        metrics=metrics,
        examples=len(sources),
        units=len(sources),
        unit="sentences/s",
        model_seconds=seconds,
        settings=generation_settings(opts),
    )
