"""What `svdlora compress` does once its flags are parsed (``compress_cmd``): in memory or streamed."""

from __future__ import annotations

import argparse
import resource
import sys
import time
from contextlib import contextmanager

from torch import nn

from .. import blockwise, distributed, hub
from ..allocate import RANK_NOT_SMALLER
from ..bars import quiet_bars
from ..compress import compress
from ..config import CompressionConfig
from ..errors import IN_MEMORY, IN_MEMORY_FORCED, IN_MEMORY_LAUNCHED, StreamingRefusal, SvdloraError
from ..evaluation.loading import local_outline, outline
from ..factoring import rank_factorizes_nothing, svd_device
from ..io.saving import check_output, save_compressed
from ..io.writer import parse_size
from ..models import load_pretrained
from ..plan import check_without_calibration
from ..streaming import check_streamable, compress_checkpoint, meta_model
from ..targets import check_patterns_before_load
from . import options
from .calibration_flags import (
    AUTO,
    NONE,
    SELF,
    calibration_input,
    calibration_options,
    check_calibration,
    check_data_path,
    processor_before_load,
    resolve_calibration,
    streamed_calibration,
    warn_unread_sizes,
)
from .memory_choice import streams_for_memory


def run(args: argparse.Namespace) -> int:
    # a hub id's checks, memory check and load read one snapshot; --no-progress: transformers' bars too
    with hub.one_download_each(), quiet_bars(args.progress):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    # Joined first: a process that stops on a check below (its GPU, its disk) is then seen at once by the others,
    # which would otherwise wait to join, deaf to SIGTERM. A launched run streams, --stream or not.
    distributed.context()
    streams = args.stream or distributed.launched()  # the memory check below may add a reason
    if args.stream is False and distributed.launched():  # each process would compress the whole model, one output
        raise SvdloraError(
            "--no-stream cannot be used under torchrun / accelerate launch, whose processes split the matrices of a "
            f"streamed run: drop --no-stream, or compress in memory: {IN_MEMORY_LAUNCHED}"
        )
    # Check everything cheap before the (possibly slow) model load.
    if args.rank is not None and args.budget is not None:
        raise SvdloraError("--rank and --budget exclude each other: a fixed rank ignores the budget; pass one")
    config = CompressionConfig(
        budget=0.5 if args.budget is None else args.budget,
        submatrices=args.submatrices,
        rank=args.rank,
        include=args.include,
        exclude=args.exclude,
        keep_head=args.keep_head,
        svd_method=args.svd_method,
        svd_reference=args.svd_reference,
        svd_device=args.svd_device,
        stage_dtypes=args.stage_dtypes,
        pivot=options.pivot_option(args),
        rank_multiple=args.rank_multiple,
        **calibration_options(args),
    )
    check_calibration(args.calibration)
    if config.refit and config.stage_dtypes:  # compress skips it there (refit_stages, an API option, runs it)
        raise SvdloraError(
            "--refit has no effect with --stage-dtypes (the refit through the quantized stages measured worse: "
            "refit_stages=True in the Python API runs it): drop one of them"
        )
    if args.calibration == NONE:  # in memory refused only after the load (streamed: check_streamable)
        check_without_calibration(config, streamed=streams)
    if args.eval_limit is not None and not args.eval:
        raise SvdloraError("--eval-limit has no effect without --eval DATA: pass both, or drop it")
    if args.references is not None and not args.eval:
        raise SvdloraError("--references has no effect without --eval DATA: pass both, or drop it")
    given = options.given_dataset_flags(args)
    if given and not args.eval:
        raise SvdloraError(f"{', '.join(given)} read the --eval dataset: pass --eval DATA, or drop them")
    # a local folder's meta model, built once for the checks below; not where none needs it (plain SVD, no
    # patterns, no --eval: the speed benchmark's command), as it takes ~0.1 s on SmolLM2
    checks = args.eval or config.include or config.exclude or args.calibration != NONE
    meta = local_outline(args.model, args.trust_remote_code) if checks else None
    if meta is not None:
        check_patterns_before_load(meta, config, args.model)
    checked_eval = None  # what the --eval checks read: the data, the tokenizer / image processor (the calibration's)
    if args.eval:
        check_data_path(args.eval, "--eval")
        if args.references is not None:
            check_data_path(args.references, "--references")
        from ..card_eval import check_before_compressing
        from ..evaluation.loading import local_folder

        # the task, tokenizer and the task's options before the load; a hub id's too, on its config and tokenizer
        # (fetched, or read from the cache): a streamed run loads no model before it writes the folder. A local
        # folder's was tried above: one that could not be built is not tried again
        if not local_folder(args.model):
            meta = _hub_outline(args.model, args.trust_remote_code)
        checked_eval = check_before_compressing(args.model, args.eval, eval_options(args), meta)
    eval_processor = checked_eval.processor if checked_eval is not None else None
    # before the slow model load; the data too: --overwrite must not delete a file the run reads
    inputs = [args.model, calibration_input(args.calibration), args.eval, args.references]
    output = check_output(args.output, args.overwrite, inputs=inputs)
    parse_size(args.max_shard_size)
    svd_device(args.svd_device)
    processor = processor_before_load(args.calibration, args.model, config, loaded=eval_processor, meta=meta)
    if not streams:  # a memory estimate's plan takes the meta model over, and hands it (a hub id's: its own) back
        streams, meta = streams_for_memory(args, config, meta)
    if streams:
        return _run_streamed(args, config, output, processor, checked_eval, meta)
    start = time.perf_counter()
    model = load_pretrained(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    load_seconds = time.perf_counter() - start
    if args.eval and checked_eval is None:  # a config only the load reads: before compressing and writing
        from ..card_eval import check_before_compressing

        checked_eval = check_before_compressing(args.model, args.eval, eval_options(args), model)
        eval_processor = checked_eval.processor
    if processor is None:  # a keyword ('self' reads the same tokenizer): --eval's, where it was loaded
        processor = eval_processor
    calibration, processor = resolve_calibration(args.calibration, model, args.model, processor, config)
    warn_unread_sizes(args, calibration, model)
    report = compress(model, config, calibration=calibration, processor=processor, progress=args.progress)
    if not report.factorized and args.rank is not None:  # the API reports it; the CLI must not write a copy
        tried = [m for m in report.modules if (m.dense_reason or "").endswith(RANK_NOT_SMALLER)]  # the targets
        raise rank_factorizes_nothing(args.rank, len(tried))
    save_compressed(
        model, output, report=report, source=args.model, overwrite=args.overwrite, max_shard_size=args.max_shard_size
    )
    print(report.format())
    if args.eval:
        from ..card_eval import evaluate_into_card
        from ..evaluation import format_table

        result = evaluate_into_card(
            model, output, report, args.model, args.eval, eval_options(args), checked=checked_eval
        )  # fmt: skip
        print("\n" + format_table(result))  # the figures, not only in the card
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(
        f"\nwrote {output}  (load {load_seconds:.1f} s, total {time.perf_counter() - start:.1f} s, "
        f"peak RSS {peak_mb:,.0f} MB)",
        file=sys.stderr,
    )
    return 0


def _hub_outline(name: str, trust_remote_code: bool) -> nn.Module | None:
    """A hub id's meta model for the --eval checks, built from its snapshot folder: the folder its plan reads,
    streamed or the memory check's, which then takes this model over rather than building another. From the
    weights' folder where the snapshot holds them, else from its config.json alone (a hub id not in the cache,
    sized before its weights are downloaded); from the id where neither the hub nor the cache serves the
    snapshot; None where it cannot be built (the load says why)."""
    side = hub.side_folder(name, trust_remote_code)
    if side is None or hub.holds_weights(side):
        return outline(name if side is None else str(side), trust_remote_code)
    try:
        return meta_model(side, trust_remote_code)[1]
    except Exception:  # noqa: BLE001  only an early check, as outline's: the load says what is wrong, if anything
        return None


def _run_streamed(
    args: argparse.Namespace, config: CompressionConfig, output, processor, checked_eval, meta: nn.Module | None
) -> int:
    start = time.perf_counter()
    how = "--stream" if args.stream else "a distributed run"
    ctx = distributed.context()
    calibration = streamed_calibration(args.calibration)
    if calibration == SELF:
        raise SvdloraError(
            f"--calibration self cannot be used with {how}: generating the calibration text needs the whole model "
            "in memory; pass --calibration DATA (a text file: calibrated block by block), or --calibration none"
        )

    def announce(calibrating: bool, gradients: bool) -> None:  # after every check: a refusal stays one line
        if calibrating and not gradients:
            # freed hidden states leave RSS (blockwise.pin_mmap_threshold); with gradients the pin
            # saved 7% of the peak for 26% more time (BENCHMARKS.md), so only whitening pins
            blockwise.pin_mmap_threshold()
        if not calibrating and args.calibration == AUTO and ctx.is_main:
            print(
                f"svdlora compress: {how} compresses with plain SVD (causal LMs calibrate on self-generated text "
                "by default, which needs the whole model in memory; --calibration DATA calibrates block by block)",
                file=sys.stderr,
            )
        if ctx.is_main:  # sizes the run does not read as given: the meta outline's positions
            warn_unread_sizes(args, calibration if calibrating else None, meta)

    with _in_memory_advice(args.stream, distributed.launched()):  # a refusal's advice, for how this run streams
        check_streamable(config, calibration)
        report = compress_checkpoint(
            args.model,
            output,
            config,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            progress=args.progress,
            trust_remote_code=args.trust_remote_code,
            calibration=calibration,
            processor=processor,
            announce=announce,
            meta=meta,
        )
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    if ctx.is_main:
        print(report.format())
    if args.eval and ctx.is_main:  # the compressed folder, loaded back: the model was never in memory
        from ..card_eval import evaluate_into_card
        from ..evaluation import format_table
        from ..io.load import load_compressed

        result = evaluate_into_card(
            load_compressed(output), output, report, args.model, args.eval, eval_options(args), checked=checked_eval,
            world_size=ctx.world_size,
        )  # fmt: skip
        print("\n" + format_table(result))  # the figures, not only in the card
    print(
        f"\n{f'[rank {ctx.rank}/{ctx.world_size}] ' if ctx.world_size > 1 else ''}wrote {output}  "
        f"(streamed, total {time.perf_counter() - start:.1f} s, "
        f"peak RSS {peak_mb:,.0f} MB)",
        file=sys.stderr,
    )
    return 0


@contextmanager
def _in_memory_advice(stream_flag: bool | None, launched: bool):
    """A streamed refusal's way to compress in memory is worded for --stream; a launcher's run streams with or
    without the flag, and compresses in memory only as one process started without the launcher; a run that
    streams, without the flag, because the model would not fit (``streams_for_memory``) is loaded by --no-stream."""
    try:
        yield
    except StreamingRefusal as err:
        if launched:
            raise err.reworded(f"{IN_MEMORY} and {IN_MEMORY_LAUNCHED}" if stream_flag else IN_MEMORY_LAUNCHED) from None
        if not stream_flag:
            raise err.reworded(IN_MEMORY_FORCED) from None
        raise


def eval_options(args: argparse.Namespace) -> dict:
    """--eval's options as ``evaluate`` takes them: --references, --eval-limit and the dataset flags."""
    return {"references": args.references, "limit": args.eval_limit, **options.dataset_options(args)}
