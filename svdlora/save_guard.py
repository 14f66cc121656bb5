"""``save_pretrained`` on a model that holds svdlora factors: refused, naming ``save_compressed`` (or, where a
runtime changed a layer, which ``save_compressed`` refuses too, what saves it).

transformers writes such a model's factor tensors under plain names and a plain config.json; the
folder then reloads with every factorized matrix missing and freshly initialized (a walkthrough
saw logits off by 63). ``save_compressed`` writes what both loaders read back exactly. Once every
low-rank layer is merged (``runtime="merged"``, ``merge=True``), ``save_pretrained`` writes a
correct dense checkpoint and is let through, each tensor that loading it will not tie again written
under every name that shares it (``untied_state_dict``).
"""

from __future__ import annotations

import functools

from torch import nn

from .errors import SvdloraError
from .layers import LowRankLinear


def guard_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` and ``push_to_hub`` refuse while the model holds low-rank layers, and
    write a merged one as loading will read it back. Partials of module-level functions: a deepcopy guards (and
    saves) its copy, and the model still pickles."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained = functools.partial(_save_pretrained, model)
    if hasattr(model, "push_to_hub"):
        model.push_to_hub = functools.partial(_push_to_hub, model)


def _refused(model: nn.Module) -> bool:
    # a peft adapter loaded into the model: transformers saves the adapter's weights only
    return holds_factors(model) and not getattr(model, "_hf_peft_config_loaded", False)


def _push_to_hub(model: nn.Module, *args, **kwargs):
    # push_to_hub creates the hub repository (and its model card) before it calls save_pretrained: refused first
    if _refused(model):
        raise SvdloraError(_refusal(model))
    return type(model).push_to_hub(model, *args, **kwargs)


def holds_factors(model: nn.Module) -> bool:
    """Whether any layer still runs from svdlora factors (as stored, as pairs, or stacked siblings)."""
    from .siblings import StackedProjection, StackedSibling

    return any(isinstance(m, LowRankLinear | StackedProjection | StackedSibling) for m in model.modules())


def _save_pretrained(model: nn.Module, *args, **kwargs):
    if _refused(model):
        raise SvdloraError(_refusal(model))
    # (save_directory, is_main_process, state_dict, ...); None, as the Trainer passes it, is the model's own
    positional = len(args) > 2
    given = args[2] if positional else kwargs.get("state_dict")
    if given is None and not getattr(model, "_hf_peft_config_loaded", False):  # not refused: no factors left
        state = untied_state_dict(model)  # None: transformers takes the model's own
        if positional:
            args = (*args[:2], state, *args[3:])
        else:
            kwargs["state_dict"] = state
    return type(model).save_pretrained(model, *args, **kwargs)


def _refusal(model: nn.Module) -> str:
    """Why save_pretrained refuses, and what saves the model instead: save_compressed, unless a runtime changed a
    layer's layout, which save_compressed refuses too (then what it would say: ``saves_changed``)."""
    from .compress import BASE_ATTR, REPORT_ATTR
    from .io.saving import layout_change, saves_changed  # not at the top: io imports compress, which imports this

    refused = (
        "this model holds svdlora factors, which save_pretrained would write as tensors transformers cannot load back"
    )
    report = getattr(model, REPORT_ATTR, None)
    change = None if report is None else layout_change(model, report)
    if change is None:
        # a dense checkpoint: a loaded folder loads again merged; one compressed here has no folder, it merges in place
        dense = (
            "load it with merge=True"
            if hasattr(model, BASE_ATTR)
            else 'svdlora.runtime.apply_runtime(model, "merged"), then save_pretrained,'
        )
        return f"{refused}: use svdlora.save_compressed(model, folder) (or {dense} for a dense checkpoint)"
    return f"{refused}, and save_compressed cannot write it either: {change}; {saves_changed(model)}"


def untied_state_dict(model: nn.Module) -> dict | None:
    """The state dict with its own copy of each tensor that shares a parameter but that loading the saved
    config will not tie again; None where there is none. save_pretrained writes a shared tensor once; with
    a factorized head the config says tie_word_embeddings=False, which in transformers >= 5 also stops it
    tying an encoder-decoder's embed_tokens to ``shared`` (Marian, BART): they loaded randomly initialized."""
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    if expand is None:  # transformers < 5 ties shared embeddings in the model's own tie_weights
        return None
    tied = expand(all_submodels=True)  # target -> source, under the config as it will be saved
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    copies = [name for names in groups.values() for name in [n for n in names if n not in tied][1:]]
    if not copies:  # the first name is written; loading ties the others
        return None
    state = model.state_dict()
    return state | {name: state[name].detach().clone() for name in copies if name in state}
