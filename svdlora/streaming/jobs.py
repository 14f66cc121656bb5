"""The per-tensor work of a streamed run: read one tensor, factorize or copy it, write it in place."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..config import CompressionConfig
from ..decompose import factorize, split_rank
from ..errors import SvdloraError
from ..factoring import all_finite, measure_pivoted, module_report, svd_options
from ..io.writer import ShardedWriter
from ..layers import CONV1D, dense_kind, weight_out_in
from ..pivoted import pivot_factors
from ..precision import set_float_storage
from ..report import ModuleReport
from .planning import Plan


def run_jobs(jobs, p: Plan, writer: ShardedWriter, config: CompressionConfig, progress: bool, weights=None,
              est_loss=None) -> dict:  # fmt: skip
    """Read, factorize or copy, and write this process's jobs; returns their report lines.

    ``weights`` (``block_gradients.BlockStatistics``) gives each matrix its calibration metric,
    ``est_loss`` the loss a global allocation estimates for it."""
    reports = {}
    for kind, src, what in tqdm(jobs, desc="streaming", disable=not progress):
        if kind == "buffer":
            writer.write(what, p.buffers[what])
            continue
        tensor = p.checkpoint.read(src)
        if kind == "copy":
            if tensor.is_floating_point() and not all_finite(tensor):  # as in-memory compress checks every tensor
                raise SvdloraError(f"tensor {src!r} of the checkpoint contains NaN or Inf: fix or replace it")
            writer.write(what, tensor.to(p.out_dtype(tensor.dtype, what)))
            continue
        weight = tensor.to(p.out_dtype(tensor.dtype, f"{what.name}.weight"))
        del tensor
        weighting = weights.weighting(what.name) if weights is not None else None
        reports[what.name] = write_factors(writer, what, weight, config, weighting, (est_loss or {}).get(what.name))
        del weight
    return reports


def write_factors(
    writer: ShardedWriter, what, weight: torch.Tensor, config: CompressionConfig, weighting=None, est_loss=None
):
    """Factorize one target's weight (as stored: Conv1D's is (in, out)), write its factor tensors as
    ``compress()`` + ``save_compressed`` store them, and return its report line."""
    if not all_finite(weight):
        raise SvdloraError(f"weight of {what.name!r} contains NaN or Inf: fix the checkpoint, or --exclude {what.name}")
    w = weight.T if what.kind == CONV1D else weight  # (out, in), as weight_out_in gives
    ranks = ranks_of(writer, what.name, config.submatrices)
    f = factorize(w, ranks, weighting=weighting, **svd_options(config))
    bias = what.module.bias is not None
    line = module_report(what.name, what.kind, what.out_features, what.in_features, bias, f, est_loss=est_loss)
    line.pivoted = config.pivot
    set_float_storage(line, weight.dtype)  # the bytes compress() reports (issue 9)
    if config.pivot:  # as compress() stores it: pivot rows, coefficients and the pivot indices
        rows, coefficients, pivot = pivot_factors(f.a, f.b)
        measure_pivoted(line, w, rows, coefficients, pivot)
        for part, tensor in (("B", pivot), ("C", coefficients), ("rows", rows)):
            writer.write(f"{what.name}.pivoted.{part}", tensor)
    else:
        bounds = [0]
        for r in f.ranks:
            bounds.append(bounds[-1] + r)
        for j in range(len(f.ranks)):
            writer.write(f"{what.name}.stage{j}.A", f.a[:, bounds[j] : bounds[j + 1]])
            writer.write(f"{what.name}.stage{j}.B", f.b[bounds[j] : bounds[j + 1]])
    return line


def ranks_of(writer: ShardedWriter, name: str, submatrices: int = 1) -> list[int]:
    """The stage ranks laid out for ``name`` (from the planned A shapes; a pivoted layer's total rank
    split over the stages as the allocator splits it)."""
    if f"{name}.pivoted.B" in writer.where:
        return split_rank(writer.where[f"{name}.pivoted.B"][2].shape[0], submatrices)
    ranks, j = [], 0
    while f"{name}.stage{j}.A" in writer.where:
        ranks.append(writer.where[f"{name}.stage{j}.A"][2].shape[1])
        j += 1
    return ranks


def module_reports(model, reports: dict[str, ModuleReport], dense: dict[str, str]) -> list[ModuleReport]:
    """Factorized and dense layers in model order, as ``compress()`` reports them."""
    modules = []
    for name, module in model.named_modules():
        if name in reports:
            modules.append(reports[name])
        elif name in dense:
            out_f, in_f = weight_out_in(module).shape
            kind, bias = dense_kind(module), module.bias is not None
            modules.append(ModuleReport(name, kind, (out_f, in_f), bias=bias, dense_reason=dense[name]))
    return modules
