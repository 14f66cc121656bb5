"""Padding in calibration batches: which positions are real tokens, and how a padded batch runs.

The statistics, the refit pass and healing are means over real tokens. A padded batch runs whole
where that is exact (``batched_masks``: right-padded, labelled; each layer input keeps its real
positions, ``mask_for``), else row by row without its padding (``unpadded_rows``); the streamed
passes run the same passes (``calibration_runs``), so their files equal the in-memory ones.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .errors import SvdloraError


class Unbatchable(Exception):
    """A layer input of a padded batch run whole whose real positions no mask tells (``mask_for``)."""


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether ``model``'s batches have a target side (labels, decoder inputs) padded apart from the source."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model``'s token labels are scored on the next token (t predicts t + 1): it generates and is no
    encoder-decoder. Not a token classifier's or masked LM's, nor a plain module's: a label per position."""
    return bool(getattr(model, "can_generate", lambda: False)()) and not is_encoder_decoder(model)


def padding_masks(batch: dict, encoder_decoder: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(source mask, target mask) of ``batch``: 2-D, 1 at real tokens, or None where it has none.

    The source mask is ``attention_mask``; the target mask, for an encoder-decoder, is
    ``decoder_attention_mask`` or else the labels that are not -100 (padding after the target).
    """
    mask = batch.get("attention_mask")
    mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    labels = batch.get("labels")
    target_mask = batch.get("decoder_attention_mask")
    if target_mask is None and encoder_decoder and isinstance(labels, torch.Tensor) and labels.dim() == 2:
        target_mask = (labels != -100).long()
    target_mask = target_mask if isinstance(target_mask, torch.Tensor) and target_mask.dim() == 2 else None
    return mask, target_mask


def unpadded_rows(batch: dict, encoder_decoder: bool = False) -> list[dict]:
    """``batch`` as one batch per row with its padding cut off, or ``[batch]`` where nothing is padded.

    The statistics are means over tokens, and a hook sees a padded position like any other: its
    activations would enter the Gram and its zero gradient would dilute E[g²] (a quarter of the
    tokens of a batch of translations was padding in a test). The padding is read from
    ``attention_mask``, and for an encoder-decoder from ``decoder_attention_mask`` or the -100
    labels after the last target token; the loss is a sum, so each real token gets the same gradient.
    A row whose source or target is padding only is left out; a batch with a tensor that is not one
    per row (``_check_one_per_row``) is refused.
    """
    mask, target_mask = padding_masks(batch, encoder_decoder)
    padded = [m for m in (mask, target_mask) if m is not None and not m.bool().all()]
    if not padded:
        return [batch]
    _check_one_per_row(batch, padded[0].shape[0])
    rows = []
    for i in range(padded[0].shape[0]):
        source = mask[i].bool() if mask is not None else None
        target = _target_positions(batch, target_mask[i]) if target_mask is not None else None
        if source is not None and not source.any() or target is not None and not target.any():
            continue  # a source or a target of padding only: no loss, nothing for one side; the row is left out
        row = {}
        for key, value in batch.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                row[key] = value
            elif encoder_decoder and (key == "labels" or key.startswith("decoder_")) and value.dim() >= 2:
                # decoder inputs without labels or decoder_attention_mask tell no padding: kept whole
                row[key] = value[i : i + 1] if target is None else value[i : i + 1, target]
            elif source is not None and value.dim() >= 2 and value.shape[:2] == mask.shape:
                row[key] = value[i][source][None]
            else:
                row[key] = value[i : i + 1]
        rows.append(row)
    return rows


def _target_positions(batch: dict, real: torch.Tensor) -> torch.Tensor:
    """The positions of one target row (``real``: its row of ``padding_masks``'s target mask) that its row
    keeps: those ``decoder_attention_mask`` marks (its padding before and after the tokens cut off), or,
    where the -100 labels tell the padding, every one up to the last real token (a -100 before it may be a
    real decoder input whose label is ignored; the decoder is causal, so those after it change nothing)."""
    real = real.bool()
    return real if "decoder_attention_mask" in batch else _through_last_token(real[None])[0]


def _check_one_per_row(batch: dict, rows: int) -> None:
    """Refuse a padded ``batch`` that cannot be split by row: a tensor whose first dimension is not its
    ``rows`` (several images to a text, (images, C, H, W): row i's are not the i-th). Run whole, its
    padding would enter the statistics."""
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] != rows:
            raise SvdloraError(
                f"a padded calibration batch runs row by row without its padding, and its {key!r} has "
                f"{value.shape[0]} entries for {rows} rows (several images to a text?), which cannot be split "
                "by row: pass such batches one text each (batch size 1), or without padding"
            )


def batched_masks(batch: dict, encoder_decoder: bool = False) -> list[torch.Tensor] | None:
    """The real positions of a padded ``batch`` that can run whole, exactly as its rows one by one
    (``unpadded_rows``): the source mask, and an encoder-decoder's target up to its last real token;
    None where it must run row by row. A layer input is told by its (batch, length), so a batch whose
    source and target differ but are as long runs row by row, as does one as long as it has rows (a
    model that runs (length, batch), FSMT, would read its mask transposed); so does a left-padded one (padding
    before a real token moves the positions of models that number them from 0, GPT-2, Marian) and one
    without labels (its loss samples at every position, padding included), and one with inputs besides its
    text (a vision-language model's pixel_values: a layer they feed is told from the text by its shape
    alone, Gemma 3's vision tower of 4096 patches from a text of 4096 positions). The labels at padding
    are not counted (``masked_labels``); padding after a token, a key no real query attends to,
    changes nothing before it."""
    mask, target = padding_masks(batch, encoder_decoder)
    masks = [m.bool() for m in (mask, target) if m is not None]
    if not masks or all(m.all() for m in masks):
        return []  # nothing padded
    if any(m.shape[0] == m.shape[1] for m in masks):
        return None  # as many rows as positions: a (length, batch) layer input (FSMT) would pass for (batch, length)
    if "labels" not in batch or is_left_padded(batch) or not all(m.any(-1).all() for m in masks):
        return None  # (a row whose source or target is padding only: its rows leave it out)
    if not all(_is_text_input(key) for key, value in batch.items() if isinstance(value, torch.Tensor)):
        return None  # an image's pixels: a vision tower with as many patches as text positions would take its mask
    if target is not None:  # the decoder runs up to the last real target token (causal)
        masks[-1] = _through_last_token(masks[-1])
    if len(masks) == 2 and masks[0].shape == masks[1].shape and not torch.equal(*masks):
        return None
    return masks


def _is_text_input(key: str) -> bool:
    """Whether a batch's input ``key`` is its text (a source's or an encoder-decoder's target), whose layers'
    (batch, length) are the masks' of ``batched_masks``; not an image's, an audio clip's or one unknown."""
    text = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds", "labels")
    return key in text or key.startswith("decoder_")


def mask_for(x: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor | None:
    """The mask of ``x``'s real positions in a padded batch run whole: the one of the batch's ``masks``
    (``batched_masks``) of its (batch, length), or that mask flattened for rows (batch × length,
    features) (a MoE block's shared expert and router); None in a batch without padding.
    ``Unbatchable`` where no mask fits (a routed expert's tokens, a model that reshapes or pads its
    sequence itself): its padding cannot be told apart."""
    if not masks:
        return None
    for m in masks:
        if x.dim() >= 3 and tuple(x.shape[:2]) == tuple(m.shape):
            return m
        if x.dim() == 2 and x.shape[0] == m.numel():
            return m.reshape(-1)
    raise Unbatchable


def flat_tokens(x: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """``x`` as (tokens, width): every position, or those ``real`` (``mask_for``) marks."""
    return x.reshape(-1, x.shape[-1]) if real is None else x[real.to(x.device)].reshape(-1, x.shape[-1])


def is_left_padded(batch: dict) -> bool:
    """Whether a row of ``batch``'s ``attention_mask`` has padding before a real token (a tokenizer with
    ``padding_side="left"``): models that number positions from 0 rather than from the mask (GPT-2,
    Marian) move the real tokens then, and a causal LM's first real token is predicted from padding. So
    does an encoder-decoder's ``decoder_attention_mask`` (its decoder inputs padded on the left)."""
    return any(m is not None and bool((_through_last_token(m) > m).any()) for m in padding_masks(batch))


def _through_last_token(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` (2-D) set at every position up to each row's last real token: the span a causal decoder
    runs, which differs from ``mask`` where a row has padding before a real token."""
    return mask.flip(-1).cummax(-1).values.flip(-1)


def masked_labels(batch: dict, masks: list[torch.Tensor | None]) -> dict:
    """``batch`` with its labels -100 (ignored by the model's loss) where the last of ``masks`` (1 or True
    at real tokens; ``batched_masks``, ``padding_masks``) of the labels' shape says padding; ``batch`` where
    none has it. The rows one by one have no such labels, and a model would otherwise predict padding like
    a token (a causal LM's labels that are its input ids, padding included)."""
    labels = batch["labels"]
    real = next((m for m in reversed(masks) if m is not None and m.shape == labels.shape), None)  # the target's
    return batch if real is None else {**batch, "labels": labels.masked_fill(real.to(labels.device) == 0, -100)}


def calibration_runs(
    batches: Iterable[dict], encoder_decoder: bool, whole: bool = True
) -> list[tuple[dict, list[torch.Tensor]]]:
    """(batch, its real positions) for each forward pass: a padded batch whole where ``batched_masks``
    allows (and ``whole``), else its rows without padding (``unpadded_rows``). The streamed passes
    (``blockwise``, ``block_gradients``) run the same passes, so their statistics are the in-memory
    ones bit for bit."""
    runs = []
    for batch in batches:
        masks = batched_masks(batch, encoder_decoder) if whole else None
        if masks is None:
            runs.extend((row, []) for row in unpadded_rows(batch, encoder_decoder))
        else:
            runs.append((masked_labels(batch, masks) if masks else batch, masks))
    return runs
