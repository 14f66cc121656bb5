"""Swapping low-rank layers into a model and back: the dense layers restored when a run fails or a plan is
handed on, and the (transformers) head tie turned off where the head was factorized."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .config import CompressionConfig
from .layers import LowRankLinear

logger = logging.getLogger(__name__)


@contextmanager
def restored_on_error(model: nn.Module, originals: dict[str, nn.Module]) -> Iterator[None]:
    """Put the dense ``originals`` (and the head's tie) back if anything fails once layers are swapped:
    healing refused after the factorization, Ctrl-C, ... must not leave a half-compressed model, which
    carries no report and would be compressed again on a retry."""
    hf_config = getattr(model, "config", None)
    tied = getattr(hf_config, "tie_word_embeddings", None)
    try:
        yield
    except BaseException:
        restore_dense(model, originals, hf_config, tied)
        raise


def restore_dense(model: nn.Module, originals: dict[str, nn.Module], hf_config, tied: bool | None) -> None:
    """Put the dense ``originals`` back in place of their low-rank layers, and the config's head tie as it was
    (``tied``; None: left as it is), which ``untie_factorized_head`` turned off."""
    for name, module in originals.items():
        model.set_submodule(name, module)
    if tied is not None:
        hf_config.tie_word_embeddings = tied


def untie_factorized_head(model: nn.Module, config: CompressionConfig, hf_config=None) -> bool:
    """Turn the (transformers) config's ``tie_word_embeddings`` off where the head was factorized, so that
    transformers does not re-tie it; whether it did (``warn_untied_head`` says what that costs, once per run)."""
    hf_config = hf_config if hf_config is not None else getattr(model, "config", None)
    if config.keep_head or not getattr(hf_config, "tie_word_embeddings", False):
        return False
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, LowRankLinear):
        return False
    hf_config.tie_word_embeddings = False
    return True


def warn_untied_head(model: nn.Module) -> None:
    """A tied head was stored once, as the embedding: its factors are stored beside it and the model grows
    (said where the run compresses, not where a plan is only estimated: the report counts the share as saved)."""
    head = model.get_output_embeddings()
    logger.warning(
        "--compress-head: the output head shared its weights with the input embedding, which stays dense; its "
        "factors (%s parameters) are stored beside it, so the model grows by them: decoding reads fewer bytes "
        "per token, the folder does not get smaller",
        f"{sum(p.numel() for p in head.parameters() if p is not head.bias):,}",
    )
