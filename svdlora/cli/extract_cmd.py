"""`svdlora extract --base BASE --tuned TUNED --budget B --output DIR`: a PEFT LoRA adapter from a fine-tune."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import CompressionConfig
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

if TYPE_CHECKING:
    from torch import nn

EXAMPLES = """examples:
  svdlora extract --base HuggingFaceTB/SmolLM2-135M --tuned ./my-finetune --budget 0.1 --output out/adapter
  svdlora extract --base ./base --tuned ./tuned --rank 16 --submatrices 2 --output out/adapter-r16
  svdlora extract --base ./base --tuned ./tuned --budget 0.1 --calibration train.txt --output out/adapter-cal

The adapter loads with peft:  PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), DIR)
--budget is the fraction of the changed matrices' parameters the LoRA factors may hold.
Without --calibration the delta gets a plain SVD (what kohya and mergekit do). With --calibration DATA
(best: text like the fine-tuning data) the tuned model runs on it and each delta is factorized to
minimize its output error on those layer inputs (--method whiten, the default then; or fisher).
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "extract",
        help="factorize a fine-tune's delta (tuned - base) into a PEFT LoRA adapter",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--base", required=True, help="the model the fine-tune started from (folder or hub id)")
    p.add_argument("--tuned", required=True, help="the fine-tuned model (folder or hub id)")
    p.add_argument("-o", "--output", required=True, help="adapter folder to write (must not exist unless --overwrite)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--budget", type=options.budget, help="LoRA params as a fraction of the changed matrices' params")
    size.add_argument("--rank", type=options.positive_int("rank"), help="fixed LoRA rank per matrix")
    p.add_argument(
        "--submatrices", type=options.positive_int("submatrices"), default=1, help="residual SVD stages (default 1)"
    )
    options.add_patterns_flag(p, "--include", f"only these modules get LoRA: {options.MODULE_PATTERNS}")
    options.add_patterns_flag(p, "--exclude", "no LoRA for these, stored whole (patterns as in --include)")
    options.add_compress_head_flag(
        p, "also give the output head (and layers tied to embeddings) LoRA: a changed head is saved whole otherwise"
    )
    p.add_argument(
        "--svd", "--svd-method", dest="svd_method", choices=("exact", "randomized"), default="exact",
        help="how each delta is factorized: exact SVD (default) or randomized (faster on large matrices, "
        "slightly larger error); --svd-method is the older spelling, as in compress",
    )  # fmt: skip
    p.add_argument(
        "--dtype", type=options.dtype_name, default=None, help="load both models in this dtype (default: as stored)"
    )
    options.add_overwrite_flag(p)
    p.add_argument("--trust-remote-code", action="store_true", help="allow the models' own code from the hub")
    add_calibration_flags(p, compress=False)
    options.add_progress_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..bars import quiet_bars

    with quiet_bars(args.progress):  # --no-progress: transformers' bars too (datasets': where read)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from ..extract import CALIBRATED, resolve_method
    from ..integrations.peft_adapter import require_peft, write_adapter
    from ..io.saving import check_output
    from ..models import load_pretrained

    config = CompressionConfig(
        budget=args.budget if args.budget is not None else 1.0,
        rank=args.rank,
        submatrices=args.submatrices,
        include=args.include,
        exclude=args.exclude,
        keep_head=args.keep_head,
        svd_method=args.svd_method,
        **calibration_options(args),
    )
    inputs = [args.base, args.tuned, calibration_input(args.calibration)]
    output = check_output(args.output, args.overwrite, inputs=inputs)  # before the slow loads
    check_calibration(args.calibration)
    method = resolve_method(config.method, None if args.calibration == NONE else args.calibration, config)  # early
    # data the method leaves unread (said just above): not loaded nor passed on, so not said again
    data = args.calibration if method in CALIBRATED else NONE
    tuned_meta = _check_inputs(args, config, data)  # both models' paths and the patterns, before the slow loads

    require_peft()  # before the slow loads
    # the tuned model reads the data (its meta model, built by the check above, not built again)
    processor = processor_before_load(data, args.tuned, config, meta=tuned_meta)
    base = load_pretrained(args.base, dtype=args.dtype, trust_remote_code=args.trust_remote_code).eval()
    tuned = load_pretrained(args.tuned, dtype=args.dtype, trust_remote_code=args.trust_remote_code).eval()
    calibration, processor = resolve_calibration(data, tuned, args.tuned, processor, config)
    warn_unread_sizes(args, calibration, tuned)
    extraction = write_adapter(
        base, tuned, output, config, calibration=calibration, processor=processor, base_name=args.base,
        tuned_name=args.tuned, overwrite=args.overwrite, progress=args.progress,
    )  # fmt: skip
    print(extraction.format())
    for name, why in extraction.left_out.items():
        print(f"WARNING: left out of the adapter: {name} ({why})", file=sys.stderr)
    print(f"\nwrote {output}", file=sys.stderr)
    return 0


def _check_inputs(args: argparse.Namespace, config: CompressionConfig, data: str) -> nn.Module | None:
    """What can be checked without loading a model: --base and --tuned as ``load_pretrained`` checks a
    name first (``models.check_model_path``: the same local-path-or-hub-id rule), saying what extract
    needs for the folders it cannot take; then the two models compared on the meta device, and the
    --include / --exclude patterns matched on the tuned one's layers (their regexes are checked by
    CompressionConfig). ``data``: the calibration the method
    reads (NONE where it reads none). Returns the tuned model's meta model where it was built."""
    from ..io.folder import MERGE_ADAPTER, is_compressed_folder, is_peft_adapter
    from ..models import check_model_path

    for flag, name in (("--base", args.base), ("--tuned", args.tuned)):
        path = Path(name).expanduser()
        if is_compressed_folder(path):
            raise SvdloraError(
                f"{flag} {name!r} is compressed by svdlora: extract compares two dense models; pass the folder or "
                "hub id it was compressed from"
            )
        if is_peft_adapter(path):
            raise SvdloraError(f"{flag} {name!r} is a PEFT adapter, not a model: {MERGE_ADAPTER} and pass its folder")
        try:
            check_model_path(name)
        except SvdloraError as err:
            raise SvdloraError(f"{flag} {name!r}: {err}") from None
    if args.trust_remote_code:  # the pair is not compared before the load (its own code would run for both);
        # the calibration's checks and the patterns read the tuned one all the same, as compress builds its
        # model's: where the method reads the data (--calibration DATA --method svd leaves it unread) or
        # patterns are given
        from ..evaluation.loading import local_outline
        from ..targets import check_patterns_before_load

        needed = data != NONE or config.include or config.exclude
        tuned = local_outline(args.tuned, True) if needed else None
        if tuned is not None:
            check_patterns_before_load(tuned, config, args.tuned)
        return tuned if data != NONE else None
    return _check_pair_on_meta(args, config)


def _check_pair_on_meta(args: argparse.Namespace, config: CompressionConfig) -> nn.Module | None:
    """Both models built on the meta device from their configs (no weights read) and compared as the
    loaded ones are (``extract.checks.check_pair``): a hub id that cannot be fetched, or a pair of different
    architectures, vocabularies or shapes, is refused before the slow loads. A model whose meta build
    fails for another reason is left to the real load to judge. Returns the tuned one (None where not built)."""
    from ..evaluation.loading import skeleton
    from ..extract.checks import check_pair
    from ..targets import check_patterns_before_load

    models = []
    for flag, name in (("--base", args.base), ("--tuned", args.tuned)):
        try:
            models.append(skeleton(name, args.trust_remote_code))
        except SvdloraError as err:  # the config cannot be read: the load would fail the same way
            raise SvdloraError(f"{flag} {name!r}: {err}") from None
        except Exception:  # noqa: BLE001  only an early check: the load says what is wrong, if anything
            return None
    check_pair(*models)
    check_patterns_before_load(models[1], config, args.tuned)  # a typo, refused after the loads otherwise
    stored = [getattr(m.config, "dtype", None) for m in models]  # the dtype each loads in without --dtype
    if args.dtype is None and None not in stored and stored[0] != stored[1]:
        raise SvdloraError(
            f"--base {args.base!r} is stored in {stored[0]} and --tuned {args.tuned!r} in {stored[1]}: the delta "
            "would carry the rounding between them; pass --dtype, the one the fine-tune ran in"
        )
    return models[1]
