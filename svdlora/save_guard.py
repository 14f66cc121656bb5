"""``save_pretrained`` on a model that holds svdlora factors: refused, naming ``save_compressed``.

transformers writes such a model's factor tensors under plain names and a plain config.json; the
folder then reloads with every factorized matrix missing and freshly initialized (a walkthrough
saw logits off by 63). ``save_compressed`` writes what both loaders read back exactly. Once every
low-rank layer is merged (``runtime="merged"``, ``merge=True``), ``save_pretrained`` writes a
correct dense checkpoint and is let through.
"""

from __future__ import annotations

import types

from torch import nn

from .errors import SvdloraError
from .layers import LowRankLinear


def guard_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` (and ``push_to_hub``, which calls it) refuse while the model
    holds low-rank layers. Bound to the model, so a deepcopy guards (and saves) the copy."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained = types.MethodType(_save_pretrained, model)


def _save_pretrained(self: nn.Module, *args, **kwargs):
    if any(isinstance(m, LowRankLinear) for m in self.modules()):
        raise SvdloraError(
            "this model holds svdlora factors, which save_pretrained would write as tensors transformers "
            "cannot load back: use svdlora.save_compressed(model, folder) (or load it with merge=True for "
            "a dense checkpoint)"
        )
    return type(self).save_pretrained(self, *args, **kwargs)
