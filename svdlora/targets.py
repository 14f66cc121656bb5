"""Module discovery: which layers of a model get factorized, and why the others stay dense."""

from __future__ import annotations

import fnmatch
import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from .config import CompressionConfig
from .decompose import rank_for_budget
from .errors import SvdloraError
from .layers import dense_kind, weight_out_in
from .pivoted import index_values, pivoted_values

logger = logging.getLogger(__name__)

# Top-level children that produce the model's output: factorizing them costs the most
# accuracy for the least gain, so they stay dense unless keep_head=False (--compress-head).
HEAD_NAMES = (
    "lm_head",
    "classifier",
    "classification_head",  # Bart's, T5's, LED's ...ForSequenceClassification: dense + out_proj, as RoBERTa's
    "score",
    "qa_outputs",
    "cls",
    "head",
    "cls_classifier",
    "distillation_classifier",
)
HEAD_REASON = "output head or tied to an embedding (keep_head)"
# Layers holding one weight (a Parameter assigned to two modules) stay dense: factorized apart, the one tensor would
# be stored and budgeted twice, as two different factorizations. Sharing the factors would need the folder to tie them.
SHARED_REASON = "shares its weight: {} holds it too (factorized apart, the one tensor would be stored twice)"
# One module under two names (``self.backbone = self.encoder``, or the layer itself) stays dense too: svdlora replaces a
# layer under one name, and one reached under two is not one it factorizes.
ALIAS_REASON = "reached under two names: {} is this module too (svdlora factorizes a layer that has one name only)"
# the warnings naming every such group
SHARED_WHY = "they share one weight (factorized apart, the one tensor would be stored and budgeted twice)"
ALIAS_WHY = "each is one module reached under two names (svdlora factorizes a layer that has one name only)"


@dataclass
class Target:
    name: str
    module: nn.Module
    kind: str
    out_features: int
    in_features: int
    # the dtype its factors are stored in, which prices the int64 pivot indices (find_targets sets it)
    dtype: torch.dtype = torch.float32

    @property
    def params(self) -> int:
        return self.out_features * self.in_features


def factor_params(target: Target, total_rank: int, pivot: bool = False) -> int:
    """Values the factors of one matrix store: R·(out+in), or in pivoted form R·(out+in−R) and the pivot
    indices (in values of ``target.dtype``): the allocators' unit."""
    if pivot:
        return pivoted_values(target.out_features, target.in_features, total_rank, target.dtype)
    return total_rank * (target.out_features + target.in_features)


def rank_for_share(target: Target, share: float, pivot: bool = False) -> int:
    """The largest total rank whose ``factor_params`` fit in ``share`` of the matrix's values."""
    extra = index_values(target.dtype) if pivot else 0
    return rank_for_budget(target.out_features, target.in_features, share, pivot, extra)


def matches(name: str, pattern: str) -> bool:
    """Glob on the full name (a bare pattern also matches a last-name suffix), or ``re:<regex>``."""
    if pattern.startswith("re:"):
        try:
            return re.fullmatch(pattern[3:], name) is not None
        except re.error as err:
            raise SvdloraError(f"invalid regex pattern {pattern!r}: {err}") from None
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def _storage(weight) -> object:
    # On a meta skeleton (streamed compression) every data_ptr is 0: tied weights are one object there.
    return id(weight) if weight.device.type == "meta" else weight.data_ptr()


def _stored_weight(module: nn.Module) -> torch.Tensor:
    """The tensor a layer keeps as its weight: a parametrized layer's ``module.weight`` is computed anew on each
    access and freed at once, so the next layer's could reuse its address (unrelated layers taken as sharing)."""
    if parametrize.is_parametrized(module, "weight"):
        stored = module.parametrizations.weight  # one original, or several (weight_norm: original0 g, original1 v)
        return stored.original if hasattr(stored, "original") else stored.original0
    stored = module._parameters.get("weight")
    return module.weight if stored is None else stored  # old-style weight_norm: an attribute its hook sets


PATTERN_REASONS = ("not matched by --include", "matched by --exclude")  # the reasons find_targets gives


def _head_names(model: nn.Module) -> set[str]:
    """The Linear/Conv1D layers keep_head leaves dense: the output head, layers tied to an embedding, HEAD_NAMES."""
    heads = _head_modules(model)
    return {
        name
        for name, module in model.named_modules()
        if dense_kind(module) and (id(module) in heads or name.split(".")[0] in HEAD_NAMES)
    }


def _head_modules(model: nn.Module) -> set[int]:
    """ids of modules that are the output head or share their weight with an embedding."""
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if isinstance(out, nn.Module):
        heads.add(id(out))
    embedding_ptrs = {_storage(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for module in model.modules():
        if dense_kind(module) and _storage(_stored_weight(module)) in embedding_ptrs:
            heads.add(id(module))
    return heads


def _weight_sharers(model: nn.Module) -> dict[str, tuple[list[str], bool]]:
    """Each Linear/Conv1D layer whose weight another one holds too -> the other holders' names, and whether
    they are all this one module under other names."""
    holders: dict[object, list[tuple[str, int]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):  # one module under two names: both
        if dense_kind(module):
            holders.setdefault(_storage(_stored_weight(module)), []).append((name, id(module)))
    sharers = {}
    for group in (group for group in holders.values() if len(group) > 1):
        one_module = len({module for _, module in group}) == 1
        for name, _ in group:
            sharers[name] = ([other for other, _ in group if other != name], one_module)
    return sharers


def find_targets(
    model: nn.Module, config: CompressionConfig, dtype_of: Callable[[str], torch.dtype | None] | None = None
) -> tuple[list[Target], dict[str, str]]:
    """The layers to factorize, and for every other Linear/Conv1D the reason it stays dense. ``dtype_of(name)``:
    the dtype a layer's weight is loaded (and its factors stored) in, where the model's is not it (a streamed
    plan's meta weights); None, or a None answer: the weight's dtype."""
    heads = _head_names(model) if config.keep_head else set()
    sharers = _weight_sharers(model)
    targets, dense, names, shared, aliased = [], {}, [], set(), set()
    if dense_kind(model):
        raise SvdloraError("the model is a single Linear/Conv1D layer: wrap it, e.g. nn.Sequential(layer)")
    for name, module in model.named_modules():
        kind = dense_kind(module)
        if kind is None:
            continue
        names.append(name)
        weight = weight_out_in(module)
        out_features, in_features = weight.shape
        if config.include is not None and not any(matches(name, p) for p in config.include):
            dense[name] = PATTERN_REASONS[0]
        elif any(matches(name, p) for p in config.exclude):
            dense[name] = PATTERN_REASONS[1]
        elif name in heads:
            dense[name] = HEAD_REASON
        elif name in sharers:
            others, one_module = sharers[name]
            dense[name] = (ALIAS_REASON if one_module else SHARED_REASON).format(", ".join(others))
            (aliased if one_module else shared).add(tuple(sorted([name, *others])))
        else:
            dtype = (dtype_of(name) if dtype_of else None) or weight.dtype
            target = Target(name, module, kind, out_features, in_features, dtype)
            # the allocators' unit (values): pivoted rank 1 of a 2x2 matrix stores 3 of its 4, and its index
            rank_one = factor_params(target, 1, config.pivot)
            if rank_one < target.params:
                targets.append(target)
            else:
                form, index = ("pivoted ", " (its pivot index included)") if config.pivot else ("", "")
                dense[name] = (
                    f"too small: {form}rank 1 would store {rank_one} values{index}, the dense matrix {target.params}"
                )
    if targets:  # with none, the caller's "nothing is targeted" error names the patterns already
        check_every_pattern_matches(names, config)
    for groups, why in ((shared, SHARED_WHY), (aliased, ALIAS_WHY)):
        if groups:
            logger.warning("kept dense, as %s: %s", why, "; ".join(" and ".join(group) for group in sorted(groups)))
    return targets, dense


def nothing_targeted(dense: dict[str, str]) -> SvdloraError:
    """The error for a model none of whose Linear/Conv1D layers is targeted, counting why they stay dense:
    a layer only the head rule keeps (``--include lm_head``) needs --compress-head, not another pattern."""
    why = Counter(reason.split(":")[0] for reason in dense.values())  # "too small: rank 1 ..." -> "too small"
    summary = ", ".join(f"{count} {reason}" for reason, count in why.items()) or "the model has none"
    if dense:
        summary += f"; layers seen: {', '.join(list(dense)[:5])}"
    hint = "check --include/--exclude"
    if HEAD_REASON in why:
        hint += ", or pass --compress-head (keep_head=False) to factorize the output head"
    return SvdloraError(f"no Linear/Conv1D layer is targeted ({summary}): {hint}")


def check_every_pattern_matches(names: list[str], config: CompressionConfig) -> None:
    """A pattern that matches no layer is a typo: ignored, it would factorize a layer meant to stay dense."""
    for flag, patterns in (("--include", config.include or []), ("--exclude", config.exclude)):
        for pattern in patterns:
            if not any(matches(name, pattern) for name in names):
                raise SvdloraError(
                    f"{flag} {pattern!r} matches none of the {len(names)} Linear/Conv1D layers (e.g. "
                    f"{', '.join(names[:3])}): fix the pattern or drop it"
                )


def compression_targets(
    model: nn.Module, config: CompressionConfig, dtype_of: Callable[[str], torch.dtype | None] | None = None
) -> tuple[list[Target], dict[str, str]]:
    """``find_targets`` for compression (in memory or streamed): refused where nothing is targeted, or where
    --compress-head does nothing (``check_head_targeted``)."""
    targets, dense = find_targets(model, config, dtype_of)
    if not targets:
        raise nothing_targeted(dense)
    check_head_targeted(model, dense, config)
    return targets, dense


def check_head_targeted(model: nn.Module, dense: dict[str, str], config: CompressionConfig) -> None:
    """--compress-head whose every head layer the patterns leave dense does nothing: refused, as a pattern that
    matches nothing is, since one of the two flags is not what the user meant. Compression's only: extract
    advises keep_head=False with the head excluded for a head of another kind than the blocks."""
    head_names = sorted(_head_names(model)) if not config.keep_head else []
    if not head_names or not all(dense.get(name) in PATTERN_REASONS for name in head_names):
        return
    why = "; ".join(f"{name} {dense[name]}" for name in head_names)
    raise SvdloraError(
        f"--compress-head (keep_head=False) does nothing here: the output head stays dense ({why}): "
        "drop --compress-head or the pattern"
    )


def check_patterns_before_load(outline: nn.Module, config: CompressionConfig, source: str) -> None:
    """--include / --exclude on the model ``source`` names, built before its load (its meta outline): a
    pattern that matches no layer is refused in a second, as ``find_targets`` refuses it after the load (and
    a sweep would take that refusal for too small a budget). An svdlora folder (its layers are factors) is
    left to the load."""
    from .io.folder import is_compressed_folder  # io imports the layers this module does: on use

    names = [name for name, module in outline.named_modules() if dense_kind(module)]
    if names and not is_compressed_folder(Path(source).expanduser()):
        check_every_pattern_matches(names, config)


def stacked_matrices(model: nn.Module) -> dict[str, int]:
    """Parameters that hold a stack of matrices outside any Linear/Conv1D (name -> values): the fused
    experts of transformers 5's MoE models (``mlp.experts.gate_up_proj``, (experts, out, in)). None of
    them is targeted, so a budget leaves most of such a model as it was; a Conv1d's 3-d kernel is not one, nor a
    stack of one (ViT's cls_token (1, 1, D) and position_embeddings (1, N, D))."""
    found = {}
    for module_name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.dim() == 3 and param.shape[0] > 1:
                found[f"{module_name}.{name}" if module_name else name] = param.numel()
    return found


def stacked_matrices_note(model: nn.Module, params: int) -> str | None:
    """What a compress run says where ``stacked_matrices`` finds any: their share of the model's ``params``."""
    stacked = stacked_matrices(model)
    if not stacked:
        return None
    total = sum(stacked.values())
    return (
        f"{total:,} parameters ({total / params:.0%} of the model) sit in {len(stacked)} stacked expert tensors "
        f"(e.g. {next(iter(stacked))}), which svdlora does not factorize: it targets Linear/Conv1D layers, and "
        "the budget applies to those alone"
    )
