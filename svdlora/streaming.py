"""Streamed compression: a safetensors checkpoint read tensor by tensor, written shard by shard.

The architecture is built on the meta device (no memory) to find the targets and allocate
ranks from shapes alone; the output layout then follows (``writer.file_layout``) before any
tensor is read. Each tensor is read with plain file I/O (no memory map), factorized or
copied, and written straight to its offset in the output: the peak is one matrix and its
SVD working set, never a shard or the model.
The same ``decompose.factorize`` and the same writer as in-memory compression give the same
bytes (tested). Under torchrun the matrices are split over the ranks (``distributed``).

With calibration data (a causal LM's text), the checkpoint is calibrated one decoder block at a
time: whitening with uniform allocation in one forward pass (``blockwise``), the methods that need
the loss gradient at every layer (fisher, kfac, global allocation) with a backward pass block by
block (``block_gradients``), their ranks chosen before the output layout is fixed. Under
torchrun each rank runs its share of the windows, the block statistics are summed over the
ranks, and a rank weights and factorizes the matrices it owns: the result equals one process's
up to the order of the float64 sums (plain SVD stays bit for bit).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights
from tqdm.auto import tqdm

from . import block_gradients, blockwise, distributed
from .allocate import allocate_global, allocate_ranks
from .calibration_data import SELF
from .checkpoint import Checkpoint
from .compress import all_finite, count_parameters, module_report, svd_device, svd_options
from .config import CompressionConfig
from .decompose import factorize, split_rank
from .errors import SvdloraError
from .io import _no_weight_init
from .layers import CONV1D, LowRankLinear, dense_kind, weight_out_in
from .models import check_dense_folder, keep_in_fp32, model_class, parse_dtype
from .outputs import atomic_folder, ensure_space
from .pivoted import PivotedLowRankLinear, pivot_factors
from .plan import CalibrationPlan, auto_method, source_name
from .precision import set_float_storage
from .report import CompressionReport, ModuleReport
from .saving import check_output, write_side_files
from .targets import find_targets
from .writer import (
    DEFAULT_MAX_SHARD_SIZE,
    ShardedWriter,
    TensorSpec,
    file_layout,
    folder_format,
    header_metadata,
)

logger = logging.getLogger(__name__)

SCRATCH = "calibration-scratch"  # inside the temporary output folder: removed with it on failure

# Methods that stream: a plain SVD needs only W. "auto" is plain SVD without calibration data.
STREAMING_METHODS = ("svd", "auto")


def check_streamable(config: CompressionConfig, calibration=None) -> None:
    """Refuse settings that cannot stream (built in memory only, or a method without its data), with
    what to do instead."""
    if getattr(config, "stage_dtypes", None):
        raise SvdloraError(
            "--stage-dtypes cannot stream yet (the quantized stage chain is built in memory): drop --stream "
            "(and run without torchrun), or drop --stage-dtypes"
        )
    if calibration is not None:
        blockwise.resolve(config)  # every method streams block by block; healing, refit, stage dtypes do not
        if calibration == SELF:
            raise SvdloraError(
                "--calibration self cannot stream: generating the calibration text needs the whole model; pass "
                "--calibration DATA (a text file or dataset), or drop --stream"
            )
        return
    if getattr(config, "heal_steps", 0):
        raise SvdloraError("healing cannot stream (it trains the whole model in memory): drop --heal-steps or --stream")
    method = getattr(config, "method", "svd")
    if method not in STREAMING_METHODS or getattr(config, "allocation", "uniform") == "global":
        raise SvdloraError(
            f"method {method!r} or global allocation needs calibration data: pass --calibration DATA "
            "(a causal LM's text: with --stream it calibrates block by block), or use the plain SVD method"
        )


@dataclass
class Plan:
    """Everything known before a tensor is read: the meta model with its low-rank layers, the
    output layout, and the jobs (factorize a matrix, copy a tensor, write a code-built buffer)."""

    checkpoint: Checkpoint
    hf_config: object
    model: torch.nn.Module  # meta skeleton, targets swapped for meta LowRankLinear
    specs: list[TensorSpec]
    tied: dict[str, str]
    jobs: list[tuple[str, str | None, object]]  # (kind, checkpoint key, Target or output key)
    dense: dict[str, str]  # layer -> why it stays dense
    params_before: int
    target_dtype: torch.dtype | None
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    keeps_fp32: Callable[[str], bool] = lambda name: False
    names_of: dict[str, list[str]] = field(default_factory=dict)  # parameter -> every name tied to it
    targets: list = field(default_factory=list)  # every targeted layer (a Target), dense ones included

    def source_key(self, name: str) -> str | None:
        """The checkpoint's key for parameter ``name``, under any name a tied parameter has."""
        prefix = getattr(self.model, "base_model_prefix", "")
        return next(filter(None, (self.checkpoint.resolve(k, prefix) for k in self.names_of.get(name, [name]))), None)

    def out_dtype(self, stored: torch.dtype, name: str) -> torch.dtype:
        """The dtype ``from_pretrained(dtype=target)`` gives parameter ``name``: the model's
        keep-in-float32 modules (T5's ``wo``, MoE routers) stay float32, as in memory."""
        if self.target_dtype is None or not stored.is_floating_point:
            return stored
        return torch.float32 if self.keeps_fp32(name) else self.target_dtype

    def cost(self, job) -> float:
        kind, src, what = job
        if kind == "factorize":
            return distributed.svd_cost(what.out_features, what.in_features)
        return float(self.checkpoint.spec[src].nbytes) if kind == "copy" else 0.0


def plan(
    source: str | Path, config: CompressionConfig, dtype=None, trust_remote_code: bool = False, allocation=None
) -> Plan:
    """Targets, ranks and the output layout of a checkpoint, from its config and headers alone
    (or from ``allocation``, the (ranks, dense) a global allocation chose)."""
    import transformers

    if not Path(source).is_dir():
        raise SvdloraError(f"streaming needs a local folder, got {str(source)!r}: download it first (hf download)")
    check_dense_folder(Path(source), str(source))  # issue 7's checks: no svdlora folder, no truncated file
    ckpt = Checkpoint(source)
    hf_config = transformers.AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    target_dtype = parse_dtype(dtype) or getattr(hf_config, "dtype", None)
    with init_empty_weights(), _no_weight_init():
        model = model_class(hf_config)(hf_config)
    if getattr(hf_config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()  # as from_pretrained does: find_targets and the layout see the tie
    params_before = count_parameters(model)
    targets, dense = find_targets(model, config)
    if not targets:
        raise SvdloraError("no Linear/Conv1D layer is targeted: check --include/--exclude")
    ranks, allocator_dense = allocation or allocate_ranks(targets, config)
    dense.update(allocator_dense)
    prefix = getattr(model, "base_model_prefix", "")
    same: dict[int, list[str]] = {}  # a checkpoint may store a tied parameter under any of its names
    for name, param in model.named_parameters(remove_duplicate=False):
        same.setdefault(id(param), []).append(name)
    names_of = {n: group for group in same.values() for n in group}

    def find(names: list[str]) -> str | None:
        return next(filter(None, (ckpt.resolve(k, prefix) for k in names)), None)

    out = Plan(ckpt, hf_config, model, [], {}, [], dense, params_before, target_dtype)
    out.keeps_fp32, out.names_of, out.targets = keep_in_fp32(model, target_dtype), names_of, targets
    weight_dtype = {}
    for t in targets:
        if t.name not in ranks:
            continue
        key = out.source_key(f"{t.name}.weight")
        if key is None:
            raise SvdloraError(f"{str(source)!r} has no tensor for {t.name}.weight: compress without --stream")
        weight_dtype[t.name] = out.out_dtype(ckpt.spec[key].dtype, f"{t.name}.weight")
        layer = (PivotedLowRankLinear if config.pivot else LowRankLinear)(
            t.in_features, t.out_features, ranks[t.name], bias=t.module.bias is not None,
            base_kind=t.kind, device="meta", dtype=weight_dtype[t.name],
        )  # fmt: skip
        model.set_submodule(t.name, layer)
        out.jobs.append(("factorize", key, t))
    if not config.keep_head and getattr(hf_config, "tie_word_embeddings", False):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if isinstance(head, LowRankLinear):  # as compress() does: a factorized head is no longer tied
            hf_config.tie_word_embeddings = False
    layout, out.tied = file_layout(model)
    buffers = out.buffers = dict(model.named_buffers())
    stage_owner = {  # factor tensors -> their layer: written by the factorize jobs
        key: name
        for name, layer in model.named_modules()
        if isinstance(layer, LowRankLinear)
        for key in _factor_keys(name, layer)
    }
    aliases: dict[str, list[str]] = {}
    for alias, stored in out.tied.items():
        aliases.setdefault(stored, []).append(alias)
    for key, tensor in layout:
        if key in stage_owner:
            kind = tensor.dtype if not tensor.is_floating_point() else weight_dtype[stage_owner[key]]
            out.specs.append(TensorSpec(key, tuple(tensor.shape), kind))  # pivot indices stay int64
        elif (src := find([key, *aliases.get(key, [])])) is not None:
            out.specs.append(TensorSpec(key, ckpt.spec[src].shape, out.out_dtype(ckpt.spec[src].dtype, key)))
            out.jobs.append(("copy", src, key))
        elif key in buffers and buffers[key].device.type != "meta":  # built by the model's code
            out.specs.append(TensorSpec(key, tuple(tensor.shape), tensor.dtype))
            out.jobs.append(("buffer", None, key))
        else:
            raise SvdloraError(f"{str(source)!r} has no tensor {key!r}: compress without --stream")
    return out


def compress_checkpoint(
    source: str | Path,
    output: str | Path,
    config: CompressionConfig | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    progress: bool = True,
    trust_remote_code: bool = False,
    calibration=None,
    processor=None,
    announce: Callable[[bool, bool], None] | None = None,
    **options,
) -> CompressionReport:
    """Compress a local safetensors checkpoint without loading the model into memory.

    Writes the same folder as ``compress`` + ``save_compressed`` (the same weight bytes). Under
    ``torchrun``, each rank factorizes its share of the matrices and writes them; rank 0 writes
    the index and config, recording ``world_size``.

    Args:
        source: a local transformers folder with ``model.safetensors`` or a sharded index.
        output: the folder to create (atomically: it appears only once complete).
        config: a ``CompressionConfig``, or its fields as keyword ``options``.
        dtype: cast floating tensors to this dtype (default: config.json's ``dtype``, else as stored).
        max_shard_size: shard the output as transformers does (default "50GB").
        calibration: calibration data (a text file or dataset) for a causal LM: the checkpoint is
            then calibrated one decoder block at a time, with the method and allocation resolved
            as ``compress()`` resolves them (``blockwise``, ``block_gradients``).
        processor: the tokenizer of ``calibration`` (default: the one in ``source``).
        announce: called once every check has passed, before the slow work, with whether the
            run calibrates and whether that takes a backward pass (the CLI says there which
            method runs, and sets up the process for it); under torchrun on every rank.
    Returns:
        The ``CompressionReport`` (the same on every rank).
    """
    config = config or CompressionConfig(**options)
    check_streamable(config, calibration)
    ctx = distributed.context()
    start = time.perf_counter()
    check_output(output, overwrite, inputs=[source])  # issue 7's output policy, before the slow work
    p = plan(source, config, dtype, trust_remote_code)
    resolved = blockwise.resolve(config) if calibration is not None else None
    if calibration is not None and resolved is None:
        logger.warning("calibration data is not used by method 'svd' with uniform allocation")
        calibration = None
    batches = None
    if calibration is not None:  # read the data before any output exists
        batches = _calibration_batches(p, source, calibration, processor, config, ctx, progress)
    owners = distributed.owners(p, ctx.world_size)  # fixed before a global allocation re-plans
    # every target by its weight's key: one the uniform plan keeps dense (a copy job) may be factorized
    # after the global allocation, and its spectrum is needed before that
    owned = {t.name for t in p.targets if owners.get(p.source_key(f"{t.name}.weight")) == ctx.rank}
    method, allocation = resolved or ("svd", "uniform")
    method = auto_method(p.targets) if method == "auto" else method
    gradients = batches is not None and (method, allocation) != ("whiten", "uniform")  # else one forward pass
    if announce is not None:  # every check passed: the slow work starts (on every rank: each sets itself up)
        announce(batches is not None, gradients)
    calibration_device = svd_device(config.svd_device)  # --device runs the block passes there too
    with atomic_folder(output, overwrite, inputs=[source]) if ctx.is_main else _nothing() as tmp:
        tmp = Path(ctx.broadcast(str(tmp) if tmp else None))
        calibrated, weights, est_loss = None, None, {}
        if batches is not None:
            source_named = source_name(calibration)
            calibrated = CalibrationPlan(method, allocation, batches, source=source_named, gradients=gradients)
        if calibrated is not None and calibrated.gradients:  # the backward runs before any rank is known
            scratch = tmp / SCRATCH / f"rank-{ctx.rank}" if ctx.active else tmp / SCRATCH
            weights = block_gradients.collect(
                p,
                ctx.share(batches),
                method,
                allocation,
                scratch,
                config.seed,
                progress and ctx.is_main,
                calibration_device,
                ctx,
                owned,
            )
            if allocation == "global":
                ranks, dense, est_loss = allocate_global(
                    p.targets, weights.spectra, config.budget, config.submatrices, config.pivot, config.rank_multiple
                )
                p = plan(source, config, dtype, trust_remote_code, allocation=(ranks, dense))
        mine = distributed.jobs_of(p, ctx.rank, owners)
        format_version = folder_format(p.model)  # as save_compressed writes it
        writer = ShardedWriter(tmp, p.specs, header_metadata(p.tied, format_version), max_shard_size)
        if ctx.is_main:
            ensure_space(tmp, writer.total_size, str(output))
            writer.create_files()
        ctx.barrier()  # files laid out before any rank writes into them
        if calibrated is None or weights is not None:
            reports = _run_jobs(mine, p, writer, config, progress and ctx.is_main, weights, est_loss)
        else:
            reports = _run_jobs([j for j in mine if j[0] != "factorize"], p, writer, config, progress)
            reports.update(
                blockwise.calibrate_and_factorize(
                    p,
                    ctx.share(batches),
                    config,
                    lambda what, weight, weighting: write_factors(writer, what, weight, config, weighting),
                    progress and ctx.is_main,
                    calibration_device,
                    ctx,
                    owned,
                )  # fmt: skip
            )
        if weights is not None:
            shutil.rmtree(weights.folder)  # not part of the output
        writer.close()
        ctx.barrier()  # every shard complete before rank 0 finishes the folder
        if ctx.is_main:
            shutil.rmtree(tmp / SCRATCH, ignore_errors=True)  # the ranks' empty scratch parent
        for part in ctx.gather(reports):
            reports.update(part)
        report = CompressionReport(
            config=config.to_dict(),
            modules=_module_reports(p.model, reports, p.dense),
            model_params_before=p.params_before,
            model_params_after=count_parameters(p.model),
            seconds=time.perf_counter() - start,
            bytes_after=writer.bytes_on_disk(),
            method=method,  # as compress() records them
            allocation=allocation,
            calibration=calibrated.describe() if calibrated else None,
        )
        if ctx.is_main:
            writer.write_index()
            write_side_files(
                tmp,
                report,
                source=source,
                config=p.hf_config,
                generation_config=_generation_config(source),
                class_name=type(p.model).__name__,
                dtype=p.specs[0].dtype if p.specs else None,
                world_size=ctx.world_size,
                format_version=format_version,
            )
    ctx.barrier()  # the folder is in place before any rank returns
    logger.info("streamed %d matrices in %.1f s", len(reports), report.seconds)
    return report


def _calibration_batches(p: Plan, source, calibration, processor, config, ctx, progress) -> list[dict]:
    """The tokenized calibration windows, as ``compress()`` reads them (a causal LM's text only)."""
    from .calibration_data import calibration_batches
    from .evaluation.loading import _load_processor

    blockwise.check(p)
    if isinstance(calibration, list):  # model-ready batches, as compress() takes them
        batches = calibration
        if ctx.active and not all("labels" in b for b in batches):  # else labels are drawn per rank
            raise SvdloraError("under torchrun, calibration batches need labels: add them, or run one process")
    else:
        processor = processor if processor is not None else _load_processor(str(source), "text-generation")
        batches = calibration_batches(
            p.model, calibration, processor, config.calibration_samples, config.calibration_length,
            seed=config.seed, progress=progress, device="cpu",
        )  # fmt: skip
    if not batches:
        raise SvdloraError("calibration data is empty: pass a file with text, or batches")
    if len(batches) < ctx.world_size:  # every rank runs at least one window
        raise SvdloraError(
            f"{len(batches)} calibration windows for {ctx.world_size} processes: pass --calibration-samples "
            f"{ctx.world_size} or more, or run fewer processes"
        )
    return batches


def _module_reports(model, reports: dict[str, ModuleReport], dense: dict[str, str]) -> list[ModuleReport]:
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


def _generation_config(source):
    import transformers

    if (Path(source) / "generation_config.json").is_file():
        return transformers.GenerationConfig.from_pretrained(str(source))
    return None


def _factor_keys(name: str, layer: LowRankLinear) -> list[str]:
    if isinstance(layer, PivotedLowRankLinear):
        return [f"{name}.pivoted.{part}" for part in ("B", "C", "rows")]
    return [f"{name}.stage{j}.{part}" for j in range(len(layer.ranks)) for part in "AB"]


def _run_jobs(jobs, p: Plan, writer: ShardedWriter, config: CompressionConfig, progress: bool, weights=None,
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


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
