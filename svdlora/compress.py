"""The one in-place verb: find targets -> calibrate -> allocate -> factorize -> (heal), swapping in low-rank layers."""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocate import allocate_global, allocate_ranks
from .config import CompressionConfig
from .decompose import relative_error
from .errors import SvdloraError
from .heal import heal
from .layers import LowRankLinear, dense_kind, weight_out_in
from .methods import factorize, weighted_spectrum
from .plan import CalibrationPlan, plan_calibration
from .refit import collect_cross_statistics, refit_factors
from .report import CompressionReport, ModuleReport
from .targets import find_targets

logger = logging.getLogger(__name__)

REPORT_ATTR = "svdlora_report"  # the report rides on the model so save_compressed needs nothing else


def count_parameters(model: nn.Module) -> int:
    """Parameters counted once even when tied (shared storage)."""
    seen, total = set(), 0
    for p in model.parameters():
        key = (p.data_ptr(), p.shape) if p.device.type != "meta" else id(p)
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total


def compress(
    model: nn.Module,
    config: CompressionConfig | None = None,
    *,
    calibration: Any = None,
    processor: Any = None,
    statistics: dict | None = None,
    progress: bool = True,
    **options,
) -> CompressionReport:
    """Replace every targeted Linear/Conv1D of ``model`` (in place) by residual SVD factors.

    The pipeline: find targets -> collect calibration statistics -> allocate ranks ->
    factorize -> (heal). Without calibration data it is the sources' plain truncated SVD.

    Args:
        model: any ``nn.Module``; transformers models get their output head left dense.
        config: a ``CompressionConfig``; or pass its fields as keyword ``options``.
        calibration: data to calibrate on (a text file, image folder, source-sentence file,
            ``datasets`` dataset), ``"self"`` (text the causal LM generates itself), or a list of
            ready model batches; ``None`` for plain SVD.
        processor: the tokenizer / image processor that turns ``calibration`` into batches.
        statistics: ``calibration.collect_statistics`` output for these batches, to reuse it
            across several compressions of the same model (benchmarks, sweeps).
        progress: show progress bars.
    Returns:
        A ``CompressionReport`` (also stored on ``model.svdlora_report``).

    Example:
        >>> report = compress(model, budget=0.5, submatrices=3, calibration="wiki.valid.txt", processor=tok)
        >>> print(report.format())
    """
    if config is None:
        config = CompressionConfig(**options)
    elif options:
        raise SvdloraError(f"pass either a config or keyword options, not both (got {sorted(options)})")
    if getattr(model, REPORT_ATTR, None) is not None:
        raise SvdloraError("this model is already compressed: compress the original model instead")
    start = time.perf_counter()
    params_before = count_parameters(model)
    targets, dense = find_targets(model, config)
    if not targets:
        raise SvdloraError(
            "no Linear/Conv1D layer is targeted: check --include/--exclude "
            f"(layers seen: {', '.join(list(dense)[:5]) or 'none'})"
        )
    _check_finite(model)
    plan = plan_calibration(model, targets, config, calibration, processor, progress, statistics)
    teacher = copy.deepcopy(model) if config.heal_steps and config.heal_loss == "distill" else None
    ranks, allocator_dense, est_loss = allocate(targets, config, plan, progress)
    dense.update(allocator_dense)

    originals = {t.name: t.module for t in targets if t.name in ranks}
    layers = {}
    for name, module in tqdm(originals.items(), desc="factorizing", disable=not progress):
        stages = factorize(weight_out_in(module), ranks[name], plan.weighting(name), **_svd_options(config))
        layers[name] = LowRankLinear.from_stages(module, stages)
        model.set_submodule(name, layers[name])
    if plan.refit:
        _refit(model, originals, layers, ranks, plan, config, progress)
    reports = {}
    for target in targets:
        if target.name not in layers:
            continue
        layer = layers[target.name]
        with torch.no_grad():
            error = relative_error(weight_out_in(target.module), layer.dense_weight())
        reports[target.name] = ModuleReport(
            target.name,
            target.kind,
            (target.out_features, target.in_features),
            bias=layer.bias is not None,
            ranks=layer.ranks,
            stage_dtypes=[str(layer.A.dtype).removeprefix("torch.")] * len(layer.ranks),
            rel_error=error,
            est_loss=est_loss.get(target.name),
        )
    _untie_factorized_head(model, config)
    healed = None
    if config.heal_steps:
        healed = heal(
            model,
            plan.batches,
            config.heal_steps,
            teacher=teacher,
            loss=config.heal_loss,
            seconds=config.heal_seconds,
            lr=config.heal_lr,
            progress=progress,
        )
        del teacher
    report = CompressionReport(
        config=config.to_dict(),
        modules=_module_reports(model, reports, dense),
        model_params_before=params_before,
        model_params_after=count_parameters(model),
        seconds=time.perf_counter() - start,
        calibration=plan.describe(),
        method=plan.method,
        allocation=plan.allocation,
        heal=healed.to_dict() if healed else None,
    )
    setattr(model, REPORT_ATTR, report)
    logger.info("factorized %d layers in %.1f s", len(reports), report.seconds)
    return report


def allocate(targets, config: CompressionConfig, plan: CalibrationPlan, progress: bool):
    """Ranks per target (uniform, or global from the loss-weighted spectra), dense ones, loss estimates."""
    if plan.allocation == "uniform":
        ranks, dense = allocate_ranks(targets, config)
        return ranks, dense, {}
    spectra = {
        t.name: weighted_spectrum(weight_out_in(t.module), plan.weighting(t.name, for_allocation=True))
        for t in tqdm(targets, desc="spectra", disable=not progress)
    }
    return allocate_global(targets, spectra, config.budget, config.submatrices)


def _refit(model, originals, layers, ranks, plan: CalibrationPlan, config: CompressionConfig, progress: bool):
    """Refit every factorized layer to the inputs the compressed model feeds it (see ``refit``)."""
    cross = collect_cross_statistics(model, originals, layers, plan.batches, progress)
    for name, (gram, product) in tqdm(cross.items(), desc="refitting", disable=not progress):
        weighting = plan.weighting(name)
        left = weighting.left if weighting is not None else None
        stages = refit_factors(weight_out_in(originals[name]), ranks[name], gram, product, left, **_svd_options(config))
        if stages is not None:
            layers[name] = LowRankLinear.from_stages(originals[name], stages)
            model.set_submodule(name, layers[name])


def _svd_options(config: CompressionConfig) -> dict:
    return {
        "method": config.svd_method,
        "oversampling": config.oversampling,
        "power_iterations": config.power_iterations,
        "generator_seed": config.seed if config.svd_method == "randomized" else None,
    }


def _untie_factorized_head(model: nn.Module, config: CompressionConfig) -> None:
    config_obj = getattr(model, "config", None)
    if not config.keep_head and getattr(config_obj, "tie_word_embeddings", False):
        # A factorized head is no longer the embedding: stop transformers from re-tying it.
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if isinstance(head, LowRankLinear):
            config_obj.tie_word_embeddings = False


def _module_reports(model: nn.Module, reports: dict, dense: dict) -> list[ModuleReport]:
    modules = []
    for name, module in model.named_modules():  # keep model order in the report
        if name in reports:
            modules.append(reports[name])
        elif name in dense:
            out_f, in_f = weight_out_in(module).shape
            modules.append(
                ModuleReport(
                    name, dense_kind(module), (out_f, in_f), bias=module.bias is not None, dense_reason=dense[name]
                )
            )
    return modules


def _check_finite(model: nn.Module) -> None:
    """Every stored tensor, not only the targets: a NaN bias or an Inf embedding ruins the output too."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and tensor.device.type != "meta" and not torch.isfinite(tensor).all():
            raise SvdloraError(f"tensor {name!r} of the model contains NaN or Inf: fix or replace the checkpoint")
