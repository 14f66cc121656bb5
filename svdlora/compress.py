"""The one in-place verb: find the targets, allocate ranks, swap in the low-rank layers."""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocate import allocate_ranks
from .chain import quantized_chain
from .config import CompressionConfig
from .decompose import relative_error
from .errors import SvdloraError
from .layers import LowRankLinear, dense_kind, weight_out_in
from .precision import allocate_stages, layer_bytes, stage_formats, target_bytes
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
    progress: bool = True,
    **options,
) -> CompressionReport:
    """Replace every targeted Linear/Conv1D of ``model`` (in place) by residual SVD factors.

    Args:
        model: any ``nn.Module``; transformers models get their output head left dense.
        config: a ``CompressionConfig``; or pass its fields as keyword ``options``.
        progress: show a progress bar.
    Returns:
        A ``CompressionReport`` (also stored on ``model.svdlora_report``).

    Example:
        >>> report = compress(model, budget=0.5, submatrices=3)
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
    _check_finite(targets)
    dtype = weight_out_in(targets[0].module).dtype
    if config.stage_dtypes:  # the budget counts bytes: allocate ranks and formats per stage
        plans, allocator_dense, _ = allocate_stages(targets, config, dtype)
        ranks = {name: r for name, (r, _) in plans.items()}
    else:
        ranks, allocator_dense = allocate_ranks(targets, config)
    dense.update(allocator_dense)

    svd_options = {
        "method": config.svd_method,
        "oversampling": config.oversampling,
        "power_iterations": config.power_iterations,
        "generator_seed": config.seed if config.svd_method == "randomized" else None,
    }
    reports = {}
    for target in tqdm([t for t in targets if t.name in ranks], desc="factorizing", disable=not progress):
        if config.stage_dtypes:
            formats = plans[target.name][1]
            chain = quantized_chain(weight_out_in(target.module), ranks[target.name], formats, None, **svd_options)
            layer = LowRankLinear.from_chain(target.module, chain)
        else:
            formats = stage_formats(None, len(ranks[target.name]), dtype)
            layer = LowRankLinear.from_dense(target.module, ranks[target.name], **svd_options)
        with torch.no_grad():
            error = relative_error(weight_out_in(target.module), layer.dense_weight())
        model.set_submodule(target.name, layer)
        reports[target.name] = ModuleReport(
            target.name,
            target.kind,
            (target.out_features, target.in_features),
            bias=layer.bias is not None,
            ranks=ranks[target.name],
            stage_dtypes=[f.name for f in formats],
            rel_error=error,
            stored_bytes=layer_bytes(ranks[target.name], formats, target.out_features, target.in_features),
            dense_bytes=target_bytes(target, dtype),
        )
    config_obj = getattr(model, "config", None)
    if not config.keep_head and getattr(config_obj, "tie_word_embeddings", False):
        # A factorized head is no longer the embedding: stop transformers from re-tying it.
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if isinstance(head, LowRankLinear):
            config_obj.tie_word_embeddings = False
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
    report = CompressionReport(
        config=config.to_dict(),
        modules=modules,
        model_params_before=params_before,
        model_params_after=count_parameters(model),
        seconds=time.perf_counter() - start,
    )
    setattr(model, REPORT_ATTR, report)
    logger.info("factorized %d layers in %.1f s", len(reports), report.seconds)
    return report


def _check_finite(targets) -> None:
    for t in targets:
        if not torch.isfinite(t.module.weight).all():
            raise SvdloraError(f"weight of {t.name!r} contains NaN or Inf: fix the checkpoint, or --exclude {t.name}")
