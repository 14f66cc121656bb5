"""``save_pretrained`` on a model that holds svdlora factors: refused, naming ``save_compressed``.

transformers writes such a model's factor tensors under plain names and a plain config.json; the
folder then reloads with every factorized matrix missing and freshly initialized (a walkthrough
saw logits off by 63). ``save_compressed`` writes what both loaders read back exactly. Once every
low-rank layer is merged (``runtime="merged"``, ``merge=True``), ``save_pretrained`` writes a
correct dense checkpoint and is let through.
"""

from __future__ import annotations

import functools

from torch import nn

from .errors import SvdloraError
from .layers import LowRankLinear


def guard_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` (and ``push_to_hub``, which calls it) refuse while the model
    holds low-rank layers. A partial of a module-level function: a deepcopy guards (and saves) its
    copy, and the model still pickles."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained = functools.partial(_save_pretrained, model)


def holds_factors(model: nn.Module) -> bool:
    """Whether any layer still runs from svdlora factors (as stored, as pairs, or stacked siblings)."""
    from .siblings import StackedProjection, StackedSibling

    return any(isinstance(m, LowRankLinear | StackedProjection | StackedSibling) for m in model.modules())


def _save_pretrained(model: nn.Module, *args, **kwargs):
    # a peft adapter loaded into the model: transformers saves the adapter's weights only
    if holds_factors(model) and not getattr(model, "_hf_peft_config_loaded", False):
        raise SvdloraError(
            "this model holds svdlora factors, which save_pretrained would write as tensors transformers "
            "cannot load back: use svdlora.save_compressed(model, folder) (or load it with merge=True for "
            "a dense checkpoint)"
        )
    return type(model).save_pretrained(model, *args, **kwargs)
