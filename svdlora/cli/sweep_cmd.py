"""`svdlora sweep MODEL --budgets 0.3,0.5,0.8 --data D [--target ppl<=1.5x] --output DIR`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..choices import TASKS
from ..errors import SvdloraError
from . import options
from .calibration_flags import (
    NONE,
    add_calibration_flags,
    calibration_input,
    calibration_options,
    check_calibration,
    processor_before_load,
    resolve_calibration,
    warn_unread_sizes,
)

EXAMPLES = """examples:
  svdlora sweep ./smollm2 --budgets 0.3,0.5,0.8 --data wiki.test.txt --limit 8 --output out/sweep
  svdlora sweep ./smollm2 --budgets 0.3,0.5,0.8 --data wiki.test.txt --target 'ppl<=1.5x' --output out/sweep
  svdlora sweep ./my-vit --task image-classification --data cifar10/test --target 'acc-drop<=0.02' --output out/s

writes DIR/sweep.md (table), DIR/sweep.json, DIR/sweep.png (quality against parameters, dense line),
and with --target the smallest budget meeting it (bisection) as a compressed folder DIR/model.
--target: 'ppl<=1.5x' / 'acc>=0.98x' (ratio to the dense model) or 'acc-drop<=0.02' / 'bleu-drop<=1'.
"""


def budget_list(text: str) -> list[float]:
    values = [options.budget(part) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"budgets must be a comma-separated list like 0.3,0.5,0.8, got {text!r}")
    return sorted(set(values))


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="compress at several budgets, evaluate each, and find the smallest budget meeting a target",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="dense model: folder or hub id")
    p.add_argument("--budgets", type=budget_list, default=[0.3, 0.5, 0.8], help="default 0.3,0.5,0.8")
    p.add_argument("--data", required=True, help="evaluation data, as for `svdlora eval`")
    p.add_argument("--task", choices=TASKS, help="default: from the model class (causal LM: text-generation)")
    p.add_argument("--references", help="translation: reference file")
    options.add_dataset_flags(p)
    p.add_argument("--target", help="quality target, e.g. 'ppl<=1.5x' or 'acc-drop<=0.02'")
    p.add_argument(
        "--tolerance", type=options.positive_float("tolerance"), default=0.02,
        help="bisection stops within this budget (default 0.02)",
    )  # fmt: skip
    p.add_argument(
        "--submatrices", type=options.positive_int("submatrices"), default=1,
        help="residual SVD stages per matrix at every budget, as for `svdlora compress` (default 1)",
    )  # fmt: skip
    options.add_patterns_flag(p, "--exclude", f"leave these modules dense: {options.MODULE_PATTERNS}")
    options.add_pivot_flag(p, stage_dtypes=False)
    p.add_argument("--limit", type=options.positive_int("limit"), help="only the first N windows / images / sentences")
    p.add_argument("--max-length", type=options.positive_int("max-length"), help="text: tokens per window")
    p.add_argument(
        "--batch-size", type=options.positive_int("batch-size"),
        help="evaluation: windows / images / sentences per forward (default 1 / 32 / 16)",
    )  # fmt: skip
    p.add_argument(
        "--device",
        help="where the evaluation runs: cpu, cuda (default: cuda when available); the SVDs stay on the CPU "
        "(unlike `compress --device`, the SVD device)",
    )
    add_calibration_flags(p, stage_dtypes=False)
    p.add_argument("-o", "--output", required=True, help="folder for the table, JSON, plot (and model)")
    p.add_argument("--overwrite", action="store_true", help="replace existing results / model in the folder")
    options.add_progress_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..bars import quiet_bars

    with quiet_bars(args.progress):  # --no-progress: transformers' bars too (datasets': where read)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from ..card_eval import write_card
    from ..compress import compress
    from ..config import CompressionConfig
    from ..evaluation.loading import check_task, checked_processor, early_processor, infer_task, local_outline
    from ..io.folder import is_compressed_folder
    from ..io.outputs import check_not_input, remove_folder
    from ..io.saving import check_output, save_compressed
    from ..models import default_device, load_pretrained
    from ..plan import UNUSED, check_without_calibration, source_description, uses_calibration
    from ..sweep import SweepInterrupted, SweepStopped, evaluating_measure, parse_target, shared_calibration, sweep
    from ..sweep_outputs import check_sweep_folder, format_table, write_outputs
    from ..targets import check_patterns_before_load

    output = Path(args.output).expanduser()  # written there: checked there
    # every file the run reads, as compress's: --overwrite of an earlier pick (DIR/model) must not delete one
    inputs = [args.model, args.data, args.references, calibration_input(args.calibration)]
    check_not_input(output.resolve(), str(args.output), inputs, "--output")
    check_sweep_folder(output, args.overwrite)
    # DIR/model of the earlier sweep that --overwrite replaces: removed if this sweep picks no budget
    earlier_model = args.overwrite and (output / "sweep.json").is_file() and is_compressed_folder(output / "model")
    if args.target:
        check_output(output / "model", args.overwrite, inputs=inputs)
    check_calibration(args.calibration)
    compress_options = {
        "submatrices": args.submatrices,
        "exclude": args.exclude,
        "pivot": options.pivot_option(args),
        **calibration_options(args),
    }  # the flags' checks, before the slow load
    config = CompressionConfig(**compress_options)  # the settings' checks too (one budget: any)
    if args.calibration == NONE:  # every budget would fail alike: once it was taken as too small a budget
        check_without_calibration(config)
    meta = local_outline(args.model)  # a local folder's meta model, built once for the checks below
    if meta is not None:  # a typo in --exclude: refused here, not taken at every budget for too small a one
        check_patterns_before_load(meta, config, args.model)
    task, processor = early_processor(args.model, args.task, model=meta)  # a local folder's: a refusal in a second
    # 'self' for a model that cannot use it; the tokenizer / image processor checked above, not loaded again
    processor_before_load(args.calibration, args.model, config=config, loaded=processor, meta=meta)
    if task and args.target:
        parse_target(args.target, task)  # a bad target fails before the slow load
    eval_options = {
        "references": args.references,
        **options.dataset_options(args),
        "limit": args.limit,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        # as `svdlora eval`: CUDA when present (an in-memory model is otherwise evaluated where it was loaded, the CPU)
        "device": str(default_device(args.device)),
        "progress": False,
    }
    # the data, read once for every point: refused (another task's setting, unreadable data, a text too short to
    # score) before the load where the task and processor are known (a local folder's), else before compressing
    data_read = (
        _checked_data(task, args.data, eval_options, processor, meta, args.progress) if processor is not None else None
    )
    model = load_pretrained(args.model).eval()
    if meta is None:  # a hub id (or a folder without an outline): its layers are known now
        check_patterns_before_load(model, config, args.model)
    task = task or infer_task(model)
    check_task(model, task, args.model)  # a wrong --task: name the task that fits, not a missing processor
    target = parse_target(args.target, task) if args.target else None
    if processor is None:
        processor = checked_processor(args.model, task)
    data_read = data_read or _checked_data(task, args.data, eval_options, processor, model, args.progress)
    # the evaluation's processor reads the calibration data too (the task fits the model: its tokenizer or
    # image processor, as resolve_calibration would load it)
    calibration, calibration_processor = resolve_calibration(args.calibration, model, args.model, processor, config)
    warn_unread_sizes(args, calibration, model)
    if calibration is None:  # 'auto' is none for models other than causal LMs
        check_without_calibration(config)
    if calibration is not None and not uses_calibration(config):  # said once, not at every budget
        print(f"svdlora sweep: {UNUSED}: --calibration {args.calibration}", file=sys.stderr)
        calibration = None
    source = None  # how the picked model's report names the calibration data (compress sees batches)
    if calibration is not None:
        # Read (or, for 'self', generate) the calibration batches and collect their statistics once on the dense
        # model: every budget, and the picked one, calibrates on them, and the sweep does not repeat the slow part.
        given = {**compress_options, "calibration": calibration, "processor": calibration_processor}
        compress_options, source = shared_calibration(model, given, args.progress)
    measure = evaluating_measure(model, processor, task, args.data, compress_options, eval_options, data_read)
    failure = None
    try:
        record = sweep(measure, args.budgets, task, target=target, tolerance=args.tolerance)
    except SweepStopped as stopped:  # out of memory, a bug: keep what was measured, then say what failed
        record, failure = stopped.record, stopped.error
    except SweepInterrupted as interrupted:  # Ctrl-C: likewise, then exit as an interruption
        record, failure = interrupted.record, interrupted
    record["model"] = args.model
    record["calibration"] = str(calibration) if calibration is not None else None
    print(format_table(record))  # first: a write that fails (a full disk) does not lose the figures measured
    for path in write_outputs(record, output, f"svdlora sweep: {args.model}"):
        print(f"wrote {path}", file=sys.stderr)
    chosen = record.get("target", {}).get("budget")
    if chosen is None and earlier_model:  # it met another sweep's target, not this one's
        remove_folder(output / "model")
        print(f"removed {output / 'model'} (the earlier sweep's pick)", file=sys.stderr)
    if failure is not None:  # the error itself, as main() reports it: one line, its exit status
        kept = len(record["points"])
        at = record["failed"]["budget"]
        if isinstance(failure, KeyboardInterrupt):
            message = f"interrupted at budget {at}; kept the {kept} point(s) measured before"
            print(f"svdlora sweep: {message}", file=sys.stderr)
            return 130
        print(f"svdlora sweep: kept the {kept} point(s) measured before budget {at} failed", file=sys.stderr)
        raise failure
    if target is not None and chosen is None:
        raise SvdloraError(f"no budget up to 1.0 meets {args.target!r}: relax the target")
    if chosen is not None:
        point = next(p for p in record["points"] if p["budget"] == chosen)
        report = compress(model, budget=chosen, progress=False, **compress_options)
        if report.calibration is not None:  # compress saw the batches read above: name what they were read from
            report.calibration = {**report.calibration, **source_description(source)}
        folder = save_compressed(model, output / "model", report=report, source=args.model, overwrite=args.overwrite)
        # the card's usage names the class, as save_compressed's does
        write_card(folder, report, args.model, point["result"], type(model).__name__)
        dense = "" if report.factorized else "; no layer is smaller factorized at this budget: it holds the dense model"
        print(f"wrote {folder} (budget {chosen}, meets {args.target}{dense})", file=sys.stderr)
    return 0


def _checked_data(task: str, data: str, eval_options: dict, processor, model, progress: bool):
    """``data`` as every point reads it, refused where the model's ``processor`` cannot measure on it (``model``:
    its meta model or the model, or None). ``progress``: this one read's bars (a dataset file's), as the flag says;
    the points' evaluations show none."""
    from ..evaluation import check_measurable, read_data

    read = read_data(task, data, {**eval_options, "progress": progress})
    check_measurable(task, read.data, processor, model)
    return read
