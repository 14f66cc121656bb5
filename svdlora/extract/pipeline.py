"""LoRA adapters from fine-tunes: residual SVD of the fine-tuning delta (tuned − base), per matrix.

The pipeline mirrors ``compress``: find the targets (the same discovery and patterns), allocate
the budget over the *delta* of the matrices that changed (the same allocators), factorize each
delta into residual stages (stacked into one LoRA pair per module), and collect what LoRA cannot
express: changed norms, embeddings, heads and other tensors go to ``modules_to_save`` (stored
whole), changed biases of factorized layers to ``lora_bias``; anything else is reported as left
out. Writing the PEFT folder is ``svdlora.integrations.peft_adapter``'s job.

With calibration data the delta is factorized under the input whitening of the *tuned* model's
layer inputs (``method="whiten"``, SVD-LLM's metric; ``"fisher"`` adds the loss-gradient output
weights): the adapter then minimizes ‖(ΔW − BA)·X‖ on real inputs X instead of ‖ΔW − BA‖, i.e.
the error base + adapter makes where the fine-tune is used. Ranks stay uniform (``allocate_ranks``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..allocate import allocate_ranks
from ..config import CompressionConfig, config_or_options
from ..decompose import relative_error, residual_svd
from ..errors import SvdloraError
from ..factoring import check_finite
from ..layers import weight_out_in
from ..methods import factorize
from ..methods.weighting import Weighting
from ..plan import CalibrationPlan, check_statistics_calibrated, plan_calibration
from ..targets import Target, find_targets
from .checks import check_dtypes, check_one_kind, check_pair
from .records import Extraction, LoraModule

logger = logging.getLogger(__name__)


def svd_of_delta(
    delta: torch.Tensor, ranks: list[int], module: str | None = None, **svd_options
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The default method: residual SVD stages of the delta alone (what kohya and mergekit do);
    ``module`` (the layer's name, for methods that look up statistics) is not needed here."""
    return residual_svd(delta, ranks, **svd_options)


def weighted_delta(
    delta: torch.Tensor,
    ranks: list[int],
    module: str | None = None,
    weighting: Weighting | None = None,
    **svd_options,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Residual stages of the delta under the layer's calibration metric ‖D·(ΔW − BA)·S‖_F."""
    return factorize(delta, ranks, weighting, **svd_options)


# name -> (delta (out, in), stage ranks, module=name, **svd options) -> stages [(A_j, B_j)].
# The calibrated methods (CALIBRATED) also get ``weighting=``, the layer's metric from the calibration data.
METHODS: dict[str, Callable[..., list[tuple[torch.Tensor, torch.Tensor]]]] = {
    "svd": svd_of_delta,
    "whiten": weighted_delta,  # input whitening only (SVD-LLM): output error of the delta on real inputs
    "fisher": weighted_delta,  # whitening + each output channel weighted by its loss gradient (FWSVD)
}
CALIBRATED = ("whiten", "fisher")


def extract_adapter(
    base: nn.Module,
    tuned: nn.Module,
    config: CompressionConfig | None = None,
    *,
    method: str | None = None,
    calibration: Any = None,
    processor: Any = None,
    statistics: dict | None = None,
    progress: bool = True,
    **options,
) -> Extraction:
    """Factorize ``tuned − base`` of every targeted matrix into LoRA pairs, within a budget or a rank.

    Args:
        base: the model the fine-tune started from.
        tuned: the fine-tuned model (same architecture); neither model is modified.
        config: a ``CompressionConfig``: ``budget`` is the fraction of the *changed* targeted
            matrices' parameters the LoRA factors may hold, or ``rank`` a fixed rank; also
            ``submatrices``, ``include`` / ``exclude``, ``keep_head``, ``svd_method``. Or pass the
            fields as keyword ``options``.
        method: a key of ``METHODS``: "svd" (plain SVD of the delta, what kohya and mergekit do),
            "whiten" (minimize the delta's output error on the calibration inputs), "fisher" (also
            weight outputs by their loss gradient), or "auto" (whiten with calibration, else svd).
            Default: ``config.method`` ("auto").
        calibration: data the tuned model runs on to collect its layer inputs, as ``compress``
            takes it: a text file or dataset, ``"self"`` (text the tuned model generates), or a
            list of model-ready batches; None: no calibration (plain SVD).
        processor: the tokenizer that reads ``calibration`` (not needed for a list of batches).
        statistics: ``collect_statistics(tuned, ...)`` output for ``calibration``, to reuse it
            across several extractions (e.g. budgets) instead of running the data again.
        progress: show a progress bar.
    Returns:
        An ``Extraction``; write it with ``svdlora.integrations.peft_adapter.save_adapter``.

    Example:
        >>> extraction = extract_adapter(base, tuned, budget=0.1)
        >>> extraction = extract_adapter(base, tuned, budget=0.1, calibration="train.txt", processor=tok)
        >>> save_adapter(extraction, tuned, "out/adapter", base_name="HuggingFaceTB/SmolLM2-135M")
    """
    _check_loaded(base, tuned)
    config = config_or_options(config, options)
    check_statistics_calibrated(statistics, calibration, "method 'auto' is whiten with them, plain SVD without")
    method = resolve_method(method or config.method, calibration, config)
    start = time.perf_counter()
    _check_models(base, tuned)
    changed = _changed_tensors(base, tuned)
    targets, _ = find_targets(tuned, config)
    lora_targets = [t for t in targets if f"{t.name}.weight" in changed]
    ranks, dense = allocate_ranks(lora_targets, config) if lora_targets else ({}, {})
    factorized = [t for t in lora_targets if t.name in ranks]
    check_one_kind([(t.name, t.kind) for t in factorized])  # before the slow part
    plan = _calibration_plan(tuned, lora_targets, config, method, calibration, processor, progress, statistics)
    lora = _factorize_deltas(base, factorized, ranks, changed, method, plan, config, progress)
    to_save, left_out = _stored_whole(changed, lora, targets, dense)
    return Extraction(
        config=config.to_dict(),
        method=method,
        lora=lora,
        modules_to_save=dict(sorted(to_save.items())),
        left_out=left_out,
        unchanged=len(targets) - len(lora_targets),
        delta_params=sum(t.params for t in lora_targets),
        modules_to_save_params=_stored_values(tuned, to_save),
        seconds=time.perf_counter() - start,
        calibration=plan.describe() if plan is not None else None,
    )


def _check_loaded(base: nn.Module, tuned: nn.Module) -> None:
    for role, model in (("base", base), ("tuned", tuned)):
        if not isinstance(model, nn.Module):
            raise SvdloraError(
                f"{role} must be a loaded model (an nn.Module), got {type(model).__name__} {model!r}: load it first, "
                "e.g. AutoModelForCausalLM.from_pretrained(path), or use `svdlora extract --base ... --tuned ...`"
            )


def _check_models(base: nn.Module, tuned: nn.Module) -> None:
    """One model before and after fine-tuning, in one dtype, finite."""
    check_pair(base, tuned)
    check_dtypes(base, tuned)
    for role, model in (("base", base), ("tuned", tuned)):  # a NaN would fail the SVD, or be saved whole
        check_finite(model, f"the {role} model")


def _changed_tensors(base: nn.Module, tuned: nn.Module) -> dict[str, torch.Tensor]:
    """The tuned model's tensors that differ from the base's, by state-dict name."""
    # parameters and persistent buffers, as the checkpoint holds them: a fine-tune moves BatchNorm's
    # running statistics too, and base + adapter computes with them (their module is then saved whole)
    base_state = base.state_dict(keep_vars=True)
    changed = {
        name: tensor
        for name, tensor in tuned.state_dict(keep_vars=True).items()
        if not torch.equal(tensor.detach(), base_state[name].detach())
    }
    if not changed:
        raise SvdloraError("the tuned model equals the base model (no tensor differs): there is nothing to extract")
    return changed


def _calibration_plan(
    tuned: nn.Module,
    lora_targets: list[Target],
    config: CompressionConfig,
    method: str,
    calibration: Any,
    processor: Any,
    progress: bool,
    statistics: dict | None,
) -> CalibrationPlan | None:
    """The metric of a calibrated method over the changed targets; None for plain SVD."""
    if method not in CALIBRATED or not lora_targets:
        return None
    # the tuned model's inputs: where base + adapter runs in place of the fine-tune
    plan_config = replace(config, method=method, allocation="uniform", refit=False, heal_steps=0)
    return plan_calibration(tuned, lora_targets, plan_config, calibration, processor, progress, statistics)


def _factorize_deltas(
    base: nn.Module,
    targets: list[Target],
    ranks: dict[str, list[int]],
    changed: dict[str, torch.Tensor],
    method: str,
    plan: CalibrationPlan | None,
    config: CompressionConfig,
    progress: bool,
) -> list[LoraModule]:
    """One ``LoraModule`` per target: its delta's residual stages at its ranks, stacked."""
    svd_options = {
        "method": config.svd_method,
        "oversampling": config.oversampling,
        "power_iterations": config.power_iterations,
        "generator_seed": config.seed,  # also under "auto", which may pick randomized
    }
    lora = []
    for target in tqdm(targets, desc="factorizing deltas", disable=not progress):
        base_module = base.get_submodule(target.name)
        with torch.no_grad():
            delta = weight_out_in(target.module).detach() - weight_out_in(base_module).detach()
            extra = {}
            weighting = None
            if method in CALIBRATED:
                weighting = plan.weighting(target.name) if plan is not None else None
                extra["weighting"] = weighting
            stages = METHODS[method](delta, ranks[target.name], module=target.name, **extra, **svd_options)
            lora_b = torch.cat([a for a, _ in stages], dim=1).to(delta.dtype)
            lora_a = torch.cat([b for _, b in stages], dim=0).to(delta.dtype)
            weighted_error = None
            if weighting is not None and not weighting.is_identity:
                work = delta.double()
                weighted_error = relative_error(
                    weighting.whiten(work), weighting.whiten(lora_b.double() @ lora_a.double())
                )
            bias = None
            if f"{target.name}.bias" in changed:
                bias = (target.module.bias - base_module.bias).detach()
            lora.append(
                LoraModule(
                    target.name,
                    target.kind,
                    (target.out_features, target.in_features),
                    [a.shape[1] for a, _ in stages],
                    lora_b.contiguous(),
                    lora_a.contiguous(),
                    bias,
                    relative_error(delta, lora_b @ lora_a),
                    weighted_error,
                )
            )
    return lora


def _stored_whole(
    changed: dict[str, torch.Tensor], lora: list[LoraModule], targets: list[Target], dense: dict[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """What LoRA does not carry: modules to save whole and parameters left out (warned), each with why."""
    lora_names, target_names = {m.name for m in lora}, {t.name for t in targets}
    to_save: dict[str, str] = {name: f"delta kept whole: {why}" for name, why in dense.items()}
    left_out: dict[str, str] = {}
    for pname in changed:
        owner, _, leaf = pname.rpartition(".")
        if owner in lora_names or owner in to_save:
            continue
        if not owner:
            left_out[pname] = "a parameter of the model itself, not of a submodule"
        elif any(n.startswith(owner + ".") for n in lora_names):
            left_out[pname] = f"its module {owner!r} contains LoRA layers, so it cannot be stored whole"
        elif owner in target_names:  # LoRA carries a bias (lora_bias) only beside a weight delta
            to_save[owner] = f"its {leaf} changed, its weight did not: no delta for LoRA to carry"
        else:
            to_save[owner] = "changed, not a LoRA target (norm, embedding, head, excluded or small layer)"
    for pname, why in left_out.items():
        logger.warning("LEFT OUT of the adapter: %s changed but %s; base + adapter will differ from tuned", pname, why)
    return to_save, left_out


def _stored_values(tuned: nn.Module, names: dict[str, str]) -> int:
    """The values peft writes for ``modules_to_save``: each module's own copy, whole (its state dict), so a
    weight that tied modules share (GPT-2's wte and head; Marian's shared, encoder, decoder embeddings and head)
    is counted once per module, as the adapter file holds it."""
    return sum(t.numel() for name in names for t in tuned.get_submodule(name).state_dict().values())


def resolve_method(method: str, calibration: Any, config: CompressionConfig) -> str:
    """'auto' -> whiten with calibration data, svd without; calibrated methods need the data."""
    if method == "auto":
        method = "whiten" if calibration is not None else "svd"
    if method not in METHODS:
        raise SvdloraError(f"method must be one of {sorted([*METHODS, 'auto'])}, got {method!r}")
    if method in CALIBRATED and calibration is None:
        raise SvdloraError(
            f"method {method!r} needs calibration data: pass --calibration DATA (e.g. the fine-tuning text), "
            "or 'self' for a causal LM"
        )
    if method not in CALIBRATED and calibration is not None:
        logger.warning("calibration data is not used by method %r", method)
    if config.allocation == "global":
        raise SvdloraError("extract allocates ranks uniformly: allocation 'global' is not supported here")
    if config.heal_steps:
        raise SvdloraError("extract does not heal: drop heal_steps (fine-tune the adapter with peft instead)")
    for name, why in _COMPRESS_ONLY.items():  # the pipeline would ignore them, or (pivot) price ranks wrongly
        if getattr(config, name):
            raise SvdloraError(f"extract does not take {name}={getattr(config, name)!r}: {why}; drop it")
    return method


# CompressionConfig settings of the compressed model's storage or passes, which an adapter has not
_COMPRESS_ONLY = {
    "stage_dtypes": "a peft LoRA adapter stores its factors in the model's dtype",
    "pivot": "a LoRA pair is not pivoted (the ranks would be priced as pivoted factors, above the budget)",
    "refit": "the refit pass is compress's",
}


__all__ = ["CALIBRATED", "METHODS", "extract_adapter", "resolve_method"]
