"""The streamed pipeline: checks, plan, calibration, this process's jobs, and the finished folder."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .. import block_gradients, blockwise, distributed
from ..allocate import allocate_comparable
from ..bars import quiet_bars
from ..calibration_data import SELF
from ..choices import DEFAULT_MAX_SHARD_SIZE
from ..compress import count_parameters
from ..config import CompressionConfig
from ..errors import StreamingRefusal, SvdloraError
from ..factoring import rank_factorizes_nothing, svd_device
from ..hub import local_checkpoint
from ..io.load import generation_config
from ..io.outputs import TMP_TAG, atomic_folder, ensure_space
from ..io.saving import check_output, write_side_files
from ..io.writer import ShardedWriter, folder_format, header_metadata, parse_size
from ..padding import Unbatchable
from ..plan import (
    UNUSED,
    CalibrationPlan,
    auto_method,
    check_calibration,
    check_without_calibration,
    read_calibration,
    warn_unrun_refit,
)
from ..report import CompressionReport
from ..swap import warn_untied_head
from ..targets import stacked_matrices_note
from .jobs import module_reports, run_jobs, write_factors
from .planning import Plan, plan

logger = logging.getLogger(__name__)

SCRATCH = "calibration-scratch"  # inside the temporary output folder: removed with it on failure


def check_streamable(config: CompressionConfig, calibration=None) -> None:
    """Refuse settings that cannot stream (built in memory only, or a method without its data), with
    what to do instead."""
    if getattr(config, "stage_dtypes", None):
        raise StreamingRefusal(
            "--stage-dtypes cannot stream yet (the quantized stage chain is built in memory): {in_memory}, or "
            "drop --stage-dtypes"
        )
    if calibration is not None:
        blockwise.resolve(config)  # every method streams block by block; healing, refit, stage dtypes do not
        if calibration == SELF:
            raise StreamingRefusal(
                "--calibration self cannot stream: generating the calibration text needs the whole model; pass "
                "--calibration DATA (a text file or dataset), or {in_memory}"
            )
        return
    if getattr(config, "heal_steps", 0):
        raise StreamingRefusal(
            "healing cannot stream (it trains the whole model in memory): {in_memory}, or drop --heal-steps"
        )
    check_without_calibration(config, streamed=True)  # as in memory: a method, allocation or --refit needing data


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
    meta: torch.nn.Module | None = None,
    **options,
) -> CompressionReport:
    """Compress a local safetensors checkpoint without loading the model into memory.

    Writes the same folder as ``compress`` + ``save_compressed`` (the same weight bytes). Under
    ``torchrun``, each rank factorizes its share of the matrices and writes them; rank 0 writes
    the index and config, recording ``world_size``.

    Args:
        source: a local transformers folder with ``model.safetensors`` or a sharded index, or a hub id
            (its config, safetensors and tokenizer files are downloaded first, or read from the cache).
        output: the folder to create (atomically: it appears only once complete).
        config: a ``CompressionConfig``, or its fields as keyword ``options``.
        dtype: cast floating tensors to this dtype (default: config.json's ``dtype``, else as stored).
        max_shard_size: shard the output as transformers does (default "50GB").
        calibration: calibration data (a text file, a dataset, or a list of model batches as
            ``compress()`` takes them) for a causal LM: the checkpoint is
            then calibrated one decoder block at a time, with the method and allocation resolved
            as ``compress()`` resolves them (``blockwise``, ``block_gradients``).
        processor: the tokenizer of ``calibration`` (default: the one in ``source``).
        progress: show progress bars (under torchrun, on rank 0 only).
        announce: called once every check has passed, before the slow work, with whether the
            run calibrates and whether that takes a backward pass (the CLI says there which
            method runs, and sets up the process for it); under torchrun on every rank.
        meta: ``source``'s model already built on the meta device (``evaluation.loading.local_outline``, or the
            CLI's memory check's plan), which the plan takes over (its targets swapped) rather than building
            another, where it was built from the folder read (``planning.meta_model``).
    Returns:
        The ``CompressionReport`` (the same on every rank).
    """
    config = config or CompressionConfig(**options)
    check_streamable(config, calibration)
    ctx = distributed.context()
    if ctx.is_main:  # said once per run
        warn_unrun_refit(config)
    progress = progress and ctx.is_main  # one bar per run, not one per process: rank 0's
    start = time.perf_counter()
    check_output(output, overwrite, inputs=[source])  # issue 7's output policy, before the slow work
    parse_size(max_shard_size)  # a bad size refused now, not after the calibration's passes
    with quiet_bars(progress):  # huggingface_hub's download bars too
        folder = _local_folder(source, trust_remote_code, ctx)  # a hub id's snapshot
    p = plan(folder, config, dtype, trust_remote_code, model=meta)
    if ctx.is_main and (note := stacked_matrices_note(p.model, p.params_before)):
        logger.warning(note)
    if config.rank is not None and not any(kind == "factorize" for kind, _, _ in p.jobs):  # as the in-memory CLI
        raise rank_factorizes_nothing(config.rank, len(p.targets))
    resolved = blockwise.resolve(config) if calibration is not None else None
    if calibration is not None and resolved is None:
        if ctx.is_main:  # said once per run, as the plan's other warnings
            logger.warning(UNUSED)
        calibration = None
    batches, source_named = None, None
    if calibration is not None:  # read the data before any output exists
        batches, source_named = _calibration_batches(p, folder, calibration, processor, config, ctx, progress)
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
    with atomic_folder(output, overwrite, inputs=[source]) if ctx.is_main else _rank_0s_folder() as tmp:
        tmp = Path(ctx.broadcast(str(tmp) if tmp else None))
        calibrated, weights, est_loss = None, None, {}
        if batches is not None:
            calibrated = CalibrationPlan(method, allocation, batches, source=source_named, gradients=gradients)
        if calibrated is not None and calibrated.gradients:  # the backward runs before any rank is known
            scratch = tmp / SCRATCH / f"rank-{ctx.rank}" if ctx.active else tmp / SCRATCH
            weights = _whole_or_by_row(
                ctx,
                lambda whole: block_gradients.collect(
                    p, ctx.share(batches), method, allocation, scratch, config.seed, progress,
                    calibration_device, ctx, owned, whole=whole,
                ),
                lambda: shutil.rmtree(scratch, ignore_errors=True),
            )  # fmt: skip
            if allocation == "global":
                ranks, dense, est_loss = allocate_comparable(p.targets, weights.spectra, weights.units, config)
                p = plan(folder, config, dtype, trust_remote_code, allocation=(ranks, dense), model=p.unswapped())
        mine = distributed.jobs_of(p, ctx.rank, owners)
        if p.untied_head and ctx.is_main:  # the plan the run writes (not a memory estimate's, nor a re-planned one's)
            warn_untied_head(p.model)
        format_version = folder_format(p.model)  # as save_compressed writes it
        writer = ShardedWriter(tmp, p.specs, header_metadata(p.tied, format_version), max_shard_size)
        if ctx.is_main:
            ensure_space(tmp, writer.total_size, str(output))
            writer.create_files()
        ctx.barrier()  # files laid out before any rank writes into them
        if calibrated is None or weights is not None:
            reports = run_jobs(mine, p, writer, config, progress, weights, est_loss)
        else:
            reports = run_jobs([j for j in mine if j[0] != "factorize"], p, writer, config, progress)
            reports.update(
                _whole_or_by_row(
                    ctx,
                    lambda whole: blockwise.calibrate_and_factorize(
                        p, ctx.share(batches), config,
                        lambda what, weight, weighting: write_factors(writer, what, weight, config, weighting),
                        progress, calibration_device, ctx, owned, whole=whole,
                    ),
                )
            )  # fmt: skip
        if weights is not None:
            shutil.rmtree(weights.folder)  # not part of the output
        writer.close()
        unwritten = writer.unwritten(set().union(*ctx.gather(writer.written)))
        if unwritten:  # on every rank: the folder is not finished with a slot left zero
            raise RuntimeError(f"{len(unwritten)} planned tensors were never written ({unwritten[0]}, ...): a bug")
        ctx.barrier()  # every shard complete before rank 0 finishes the folder
        if ctx.is_main:
            shutil.rmtree(tmp / SCRATCH, ignore_errors=True)  # the ranks' empty scratch parent
        for part in ctx.gather(reports):
            reports.update(part)
        report = CompressionReport(
            config=config.to_dict(),
            modules=module_reports(p.model, reports, p.dense),
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
                source=folder,
                base_model=str(source),  # the folder, or the hub id
                config=p.hf_config,
                generation_config=generation_config(p.model, folder),
                class_name=type(p.model).__name__,
                dtype=p.specs[0].dtype if p.specs else None,
                world_size=ctx.world_size,
                format_version=format_version,
            )
    ctx.barrier()  # the folder is in place before any rank returns
    logger.info("streamed %d matrices in %.1f s", len(reports), report.seconds)
    return report


def _local_folder(source, trust_remote_code: bool, ctx) -> Path:
    """The checkpoint's folder: a hub id is resolved (downloaded) by rank 0, and the other ranks take
    the same commit (from the shared cache, or on another node its own download of that commit)."""
    answer = None
    if ctx.is_main:
        try:
            answer = ("folder", str(local_checkpoint(source, trust_remote_code)))
        except SvdloraError as err:  # sent whole: a StreamingRefusal stays one (reworded by the CLI)
            answer = ("refused", err)
    kind, value = ctx.broadcast(answer)
    if kind == "refused":
        raise value
    folder = Path(value)
    if ctx.is_main or folder.is_dir():
        return folder
    return local_checkpoint(source, trust_remote_code, revision=folder.name)


def _calibration_batches(p: Plan, source, calibration, processor, config, ctx, progress) -> tuple[list[dict], str]:
    """The tokenized calibration windows, as ``compress()`` reads them (a causal LM's text only), and how
    the report names them."""
    from ..evaluation.loading import checked_processor

    blockwise.check(p.model, p.hf_config, p.target_names)
    check_calibration(calibration)  # before the tokenizer: a folder without one would be blamed for no data
    if processor is None and not isinstance(calibration, list):  # a list holds model-ready batches
        processor = checked_processor(str(source), "text-generation")
    batches, source_named = read_calibration(p.model, calibration, processor, config, progress, device="cpu")
    # read windows have labels; given batches without them would have their labels drawn per rank
    if isinstance(calibration, list) and ctx.active and not all("labels" in b for b in batches):
        raise SvdloraError("under torchrun, calibration batches need labels: add them, or run one process")
    if not batches:
        raise SvdloraError("calibration data is empty: pass a file with text, or batches")
    if len(batches) < ctx.world_size:  # every rank runs at least one window
        if isinstance(calibration, list):
            more = f"pass {ctx.world_size} or more batches"
        elif len(batches) >= config.calibration_samples:
            more = f"pass --calibration-samples {ctx.world_size} or more"
        else:  # more samples cannot help where the data itself ran out of windows
            more = (
                f"the data holds no more windows of {config.calibration_length} tokens: pass more data or a "
                "shorter --calibration-length"
            )
        raise SvdloraError(
            f"{len(batches)} calibration windows for {ctx.world_size} processes: {more}, or run fewer processes"
        )
    return batches, source_named


class _rank_0s_folder:
    """Another rank's side of rank 0's temporary folder (``atomic_folder``), which it writes into. Rank 0's
    cleanup removes the folder when rank 0 stops: a write here then fails on a missing file, rank 0's failure,
    not this disk's ('free space or fix permissions')."""

    def __enter__(self):
        return None

    def __exit__(self, kind, err, traceback):
        if isinstance(err, FileNotFoundError) and TMP_TAG in str(err.filename):
            raise distributed.peer_stopped(f"{err.strerror}: {err.filename}") from None
        return False


def _whole_or_by_row(ctx, run, restart=lambda: None):
    """``run(whole)``: padded batches in one pass each, as in-memory calibration runs them; where a layer's
    padding cannot be told in one pass (``padding.Unbatchable``: a routed expert) all of it again, row
    by row, as in memory (what the first try wrote is written again: the writer's slots are fixed). Under
    torchrun row by row from the start: a rank's windows alone cannot tell the others to start again."""
    if ctx.active:
        return run(False)
    try:
        return run(True)
    except Unbatchable:
        restart()
        return run(False)
