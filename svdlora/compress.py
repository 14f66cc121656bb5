"""The one in-place verb: find targets -> calibrate -> allocate -> factorize -> (heal), swapping in low-rank layers."""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocate import allocate_comparable, allocate_ranks
from .chain import Stage, quantized_chain
from .config import CompressionConfig, config_or_options
from .decompose import factorize, relative_error
from .errors import BudgetError, SvdloraError
from .factoring import chain_method, chain_options, check_finite, measure_pivoted, module_report, svd_options
from .heal import heal
from .layers import LowRankLinear, dense_kind, weight_out_in
from .methods import spectrum_units, weighted_spectrum
from .pivoted import PivotedLowRankLinear
from .plan import CalibrationPlan, plan_calibration
from .precision import allocate_stages, layer_bytes, set_float_storage, target_bytes
from .refit import collect_cross_statistics, readers, refit_factors, refit_target
from .report import CompressionReport, ModuleReport
from .save_guard import guard_save_pretrained
from .swap import restored_on_error, untie_factorized_head, warn_untied_head
from .targets import Target, compression_targets, stacked_matrices_note

logger = logging.getLogger(__name__)

REPORT_ATTR = "svdlora_report"  # the report rides on the model so save_compressed needs nothing else
MERGED_ATTR = "svdlora_merged_from"  # a folder loaded merged (dense): save_compressed says so
BASE_ATTR = "svdlora_base_model"  # a loaded folder's base model, kept as the base when it is saved again


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
            across several compressions of the same model (benchmarks, sweeps: ``calibration_plan``,
            whose ``plan.stats`` also keep the weightings computed from them); given with ``calibration`` only.
        progress: show progress bars.
    Returns:
        A ``CompressionReport`` (also stored on ``model.svdlora_report``).

    Example:
        >>> report = compress(model, budget=0.5, submatrices=3, calibration="wiki.valid.txt", processor=tok)
        >>> print(report.format())
    """
    config = config_or_options(config, options)
    start = time.perf_counter()
    params_before = count_parameters(model)
    targets, dense = _dense_targets(model, config)
    if note := stacked_matrices_note(model, params_before):
        logger.warning(note)
    plan = plan_calibration(model, targets, config, calibration, processor, progress, statistics)
    dtype = weight_out_in(targets[0].module).dtype
    if config.stage_dtypes and config.svd_device is not None:
        logger.warning(
            "--device %s is not used with --stage-dtypes: each stage factorizes the residual of the stages before "
            "it as stored, where the weights are (the CPU)", config.svd_device,
        )  # fmt: skip
    if config.stage_dtypes:  # the budget counts bytes: ranks and storage formats per stage (issue 9)
        plans, allocator_dense, est_loss = allocate_stages(
            targets, config, dtype, lambda n: plan.weighting(n, for_allocation=True), plan.allocation, progress
        )
        ranks = {name: r for name, (r, _) in plans.items()}
    else:
        ranks, allocator_dense, est_loss = allocate(targets, config, plan, progress)
    dense.update(allocator_dense)
    if config.heal_steps and not any(sum(r) for r in ranks.values()):
        raise _nothing_to_heal(config, ranks)
    # the dense model as the healing's target, copied once the run is known to heal (the model is still dense)
    teacher = copy.deepcopy(model) if config.heal_steps and config.heal_loss == "distill" else None

    originals = {t.name: t.module for t in targets if t.name in ranks}
    with restored_on_error(model, originals):  # a failure after the first swap undoes the swaps
        layers, reports = {}, {}
        for target in tqdm([t for t in targets if t.name in ranks], desc="factorizing", disable=not progress):
            weighting = plan.weighting(target.name)
            shape = (target.out_features, target.in_features)
            if config.stage_dtypes:
                # Each stage factorizes the residual of the stages before it as stored (quantized), in
                # the calibration metric when there is one.
                formats = plans[target.name][1]
                weight = weight_out_in(target.module)
                chain = quantized_chain(weight, ranks[target.name], formats, weighting, **chain_options(config))
                layer = LowRankLinear.from_chain(target.module, chain)
                with torch.no_grad():
                    error = relative_error(weight, layer.dense_weight())
                line = ModuleReport(
                    target.name, target.kind, shape, bias=layer.bias is not None, ranks=ranks[target.name],
                    stage_dtypes=[f.name for f in formats], rel_error=error, est_loss=est_loss.get(target.name),
                    svd_method=chain_method(config, shape, ranks[target.name]),
                )  # fmt: skip
                line.stored_bytes = layer_bytes(ranks[target.name], formats, *shape)
                line.dense_bytes = target_bytes(target, dtype)
            else:
                f = factorize(
                    weight_out_in(target.module), ranks[target.name], weighting=weighting, **svd_options(config)
                )
                layer = _layer_class(config).from_factors(target.module, f.a, f.b, f.ranks)
                line = module_report(
                    target.name, target.kind, *shape, layer.bias is not None, f, est_loss=est_loss.get(target.name)
                )
                line.pivoted = config.pivot
                if config.pivot:
                    measure_pivoted(line, weight_out_in(target.module), layer.rows, layer.C, layer.B)
                set_float_storage(line, f.a.dtype)
            layers[target.name] = layer
            model.set_submodule(target.name, layer)
            reports[target.name] = line
        if plan.refit and config.stage_dtypes and not config.refit_stages:
            # Measured on SmolLM2 (4.5 bits/w, full-int4 + int8): the refit through the quantized chain
            # gives 31.70 against 29.67 without it, so it is opt-in (refit_stages); the report says no refit ran.
            logger.info("the refit pass is skipped with --stage-dtypes (refit_stages=True runs it)")
            plan.refit = False
        if plan.refit:
            formats = {name: plans[name][1] for name in layers} if config.stage_dtypes else None
            for name in _refit(model, originals, layers, ranks, formats, plan, config, progress):
                line = reports[name]
                with torch.no_grad():
                    line.rel_error = relative_error(weight_out_in(originals[name]), layers[name].dense_weight())
                line.exact_error = None  # the exact-SVD reference was of the factors before the refit
        if untie_factorized_head(model, config):
            warn_untied_head(model)
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
                restore_on_divergence=False,  # a failure here restores the dense layers (restored_on_error)
            )
            del teacher
            _measure_healed(model, originals, reports)  # heal left stage-dtype layers as they will be stored
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
    guard_save_pretrained(model)  # as a loaded folder's: save_pretrained would write factors nothing loads back
    logger.info("factorized %d layers in %.1f s", len(reports), report.seconds)
    return report


def calibration_plan(
    model: nn.Module,
    config: CompressionConfig | None = None,
    *,
    calibration: Any = None,
    processor: Any = None,
    progress: bool = True,
    **options,
) -> CalibrationPlan:
    """The calibration ``compress`` would run on ``model`` with these settings: ``plan.batches`` (the data read,
    for 'self' generated), ``plan.stats`` and ``plan.source`` (None: no data, or none the settings read). Neither
    depends on the budget: pass ``calibration=plan.batches, statistics=plan.stats`` to several compressions of
    copies of the dense model (a sweep's budgets) to read and collect them, and compute the layers' weightings
    from them (``plan.Statistics``), once.

    Example:
        >>> plan = calibration_plan(model, calibration="wiki.valid.txt", processor=tok, method="kfac")
        >>> for budget in (0.5, 0.8):
        ...     dense = copy.deepcopy(model)
        ...     compress(dense, budget=budget, method="kfac", calibration=plan.batches, statistics=plan.stats)
    """
    config = config_or_options(config, options)
    targets, _ = _dense_targets(model, config)
    return plan_calibration(model, targets, config, calibration, processor, progress)


def _dense_targets(model: nn.Module, config: CompressionConfig) -> tuple[list[Target], dict[str, str]]:
    """The layers ``config`` targets in ``model``, which must be dense (never compressed) and finite."""
    if getattr(model, REPORT_ATTR, None) is not None:
        raise SvdloraError("this model is already compressed: compress the original model instead")
    targets, dense = compression_targets(model, config)
    check_finite(model)
    return targets, dense


def _nothing_to_heal(config: CompressionConfig, ranks: dict[str, list[int]]) -> BudgetError:
    """Healing asked for where the budget left no low-rank factor: said before the factorization, not by
    ``heal`` after it (whose 'compress the model first' is for a model never compressed)."""
    if ranks:  # every plan is a full-… first stage alone: the budget paid for no repair stage
        why, fix = f"buys only the {config.stage_dtypes[0]} first stage of each matrix", "raise {flag}"
    else:
        why, fix = "keeps every targeted matrix dense (exact)", "lower {flag}"
    return BudgetError(
        f"healing has nothing to train: budget {config.budget} {why}, no low-rank factor: {fix}, or drop --heal-steps"
    )


def _measure_healed(model: nn.Module, originals: dict, reports: dict) -> None:
    """Healing trained the factors: each line's error is measured again (quantized stages were
    quantized again, so on what the folder will hold), and the exact-SVD reference, which was of the
    factors before healing, is dropped (as after the refit)."""
    for name, line in reports.items():
        weight = weight_out_in(originals[name])
        with torch.no_grad():
            line.rel_error = relative_error(weight, model.get_submodule(name).dense_weight())
        line.exact_error = None


def allocate(targets, config: CompressionConfig, plan: CalibrationPlan, progress: bool):
    """Ranks per target (uniform, or global from the loss-weighted spectra), dense ones, loss estimates."""
    if plan.allocation == "uniform":
        ranks, dense = allocate_ranks(targets, config)
        return ranks, dense, {}
    spectra, units = {}, {}
    for t in tqdm(targets, desc="spectra", disable=not progress):
        weighting = plan.weighting(t.name, for_allocation=True)
        spectra[t.name] = weighted_spectrum(weight_out_in(t.module), weighting)
        units[t.name] = spectrum_units(weighting)
    return allocate_comparable(targets, spectra, units, config)


def _refit(model, originals, layers, ranks, formats, plan: CalibrationPlan, config: CompressionConfig, progress: bool):
    """Refit every factorized layer to the inputs the compressed model feeds it (see ``refit``);
    returns the names of the layers refitted. With stage ``formats`` the refit target goes through
    the quantized chain, so each stage again repairs the residual of the stages before it as stored."""
    refitted = []
    step = max(1, -(-len(plan.batches) // config.refit_samples))  # ceil: at most refit_samples, spread evenly
    cross = collect_cross_statistics(model, originals, layers, plan.batches[::step], progress)
    roots: dict = {}  # S̃ per shared input: q/k/v (and gate/up) whiten once
    shared = readers(cross)  # a G̃ unusable is said once, naming all its layers
    for name, (gram, product) in tqdm(cross.items(), desc="refitting", disable=not progress):
        weighting = plan.weighting(name)
        left = weighting.left if weighting is not None else None
        weight = weight_out_in(originals[name])
        if formats is not None:
            fit = refit_target(weight, gram, product, left, roots=roots, layer=shared[id(gram)])
            if fit is None:
                continue
            target, metric = fit
            # A full first stage stays the quantized weight (refitting it first and rounding the
            # refit target was measured worse); the low-rank stages repair the refit target.
            layer, fmt = layers[name], formats[name][0]
            base = Stage(fmt, layer.stored[0], full=layer.full.detach()) if fmt.full else None
            chain = quantized_chain(target, ranks[name], formats[name], metric, base=base, **chain_options(config))
            layers[name] = LowRankLinear.from_chain(originals[name], chain)
        else:
            stages = refit_factors(
                weight, ranks[name], gram, product, left, roots=roots, layer=shared[id(gram)], **chain_options(config)
            )
            if stages is None:
                continue
            layers[name] = _layer_class(config).from_stages(originals[name], stages)
        model.set_submodule(name, layers[name])
        refitted.append(name)
    return refitted


def _layer_class(config: CompressionConfig) -> type[LowRankLinear]:
    return PivotedLowRankLinear if config.pivot else LowRankLinear


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
