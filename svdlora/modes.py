"""A model run in eval mode for one pass (a check, the statistics, healing), then handed back as it came."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(*models: nn.Module | None) -> Iterator[None]:
    """Put ``models`` in eval mode (no dropout, no layer drop, no BatchNorm statistics updated) for the block,
    then give every module back its own mode; None is skipped (an optional teacher). Module by module:
    ``model.train(was_training)`` set every submodule to the model's mode, so a part the caller had put in eval
    mode (a frozen BatchNorm in a model being trained) came back training."""
    modes = training_flags(*models)
    try:
        for model in models:
            if model is not None:
                model.eval()
        yield
    finally:
        restore(modes)


def training_flags(*models: nn.Module | None) -> dict[nn.Module, bool]:
    """Every module's own mode (``restore`` gives them back)."""
    return {m: m.training for model in models if model is not None for m in model.modules()}


def restore(flags: dict[nn.Module, bool]) -> None:
    for module, training in flags.items():
        module.training = training
