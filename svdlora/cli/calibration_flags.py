"""`--calibration` and the flags that shape calibration-aware compression (shared by compress and sweep)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import ALLOCATIONS, HEAL_LOSSES, METHODS, CompressionConfig
from ..errors import SvdloraError
from . import options

if TYPE_CHECKING:
    from torch import nn

AUTO, NONE, SELF = "auto", "none", "self"
DEFAULT = {f.name: f.default for f in fields(CompressionConfig)}  # one source of truth for the defaults


def add_calibration_flags(p: argparse.ArgumentParser, compress: bool = True, stage_dtypes: bool = True) -> None:
    """The calibration flags; ``compress=False`` (extract) keeps the data and method flags only, with
    calibration off by default (the other flags shape compression: allocation, refit, healing);
    ``stage_dtypes``: the command has --stage-dtypes, which makes the budget count bytes."""
    title = (
        "what makes the compressed model still work" if compress else "the inputs the adapter's error is measured on"
    )
    g = p.add_argument_group(f"calibration ({title})")
    default_help = (
        "Default 'auto': 'self' for causal LMs, 'none' for other models"
        if compress
        else "Default 'none' (the fine-tune's data is the best choice; 'self' samples the tuned model)"
    )
    g.add_argument(
        "--calibration",
        type=options.data_name("calibration"),
        default=AUTO if compress else NONE,
        metavar="DATA|self|none",
        help="data to calibrate on, read like `svdlora eval --data`: a text file or dataset (language models), "
        "a source-sentence file (translation models), an image folder (image classifiers); 'self': text the "
        "causal LM generates itself (no data needed); 'none': plain SVD, the sources' method. " + default_help,
    )
    g.add_argument(
        "--calibration-samples",
        type=options.positive_int("calibration-samples"),
        default=None,  # None: not given (refused with --calibration none), the config's default
        help=f"text windows / sentences / images to calibrate on (default {DEFAULT['calibration_samples']}; more is "
        "better, and slower)",
    )
    g.add_argument(
        "--calibration-length",
        type=options.positive_int("calibration-length"),
        default=None,  # None: not given (refused with --calibration none), the config's default
        help=f"tokens per calibration text window (default {DEFAULT['calibration_length']})",
    )
    g.add_argument(
        "--method",
        choices=METHODS if compress else [m for m in METHODS if m != "kfac"],
        default="auto",
        help="'svd': truncated SVD of W (the sources); 'whiten': minimize the layer output error on the "
        "calibration inputs (SVD-LLM); 'fisher': whiten and weight outputs by their loss gradient"
        + ("; 'kfac': whiten inputs and output gradients (Kronecker-factored Fisher). " if compress else ". ")
        + ("Default 'auto': kfac with calibration (fisher where its Grams would exceed 4 GiB), svd without"
           if compress else
           "Default 'auto': whiten with calibration, svd without"),
    )  # fmt: skip
    if not compress:
        return
    g.add_argument(
        "--allocation",
        choices=ALLOCATIONS,
        default="auto",
        help="'uniform': every matrix the same share of its parameters"
        + (" (of its bytes where stage dtypes are set)" if stage_dtypes else "")
        + "; 'global': ranks chosen together from the loss each parameter"
        + (" (byte)" if stage_dtypes else "")
        + " buys (may keep a sensitive matrix dense). "
        "Default 'auto': global with calibration and a budget, else uniform",
    )
    g.add_argument(
        "--refit",
        action="store_true",
        help="also refit each layer to the inputs the compressed model feeds it (experimental: measured worse "
        "than without on SmolLM2 at budget 0.8, see BENCHMARKS.md)",
    )
    g.add_argument(
        "--refit-samples",
        type=options.positive_int("refit-samples"),
        help=f"calibration samples the refit pass reads, spread over all of them (default {DEFAULT['refit_samples']}: "
        "its statistics cost twice the first pass's per sample)",
    )
    g.add_argument(
        "--heal-steps",
        type=options.non_negative_int("heal-steps"),
        default=DEFAULT["heal_steps"],
        help="fine-tune the factors for this many steps on the calibration data after compressing "
        "(default %(default)s)",
    )
    g.add_argument(
        "--heal-seconds",
        type=float,
        default=DEFAULT["heal_seconds"],
        help="stop healing after this many seconds, if --heal-steps have not run out first",
    )
    g.add_argument(
        "--heal-loss",
        choices=HEAL_LOSSES,
        help="'distill': match the dense model's outputs (default); 'lm': the data's own next-token loss",
    )
    g.add_argument("--heal-lr", type=float, help=f"learning rate of healing (default {DEFAULT['heal_lr']})")


# Flags that only shape another one's work: given without it, they would be ignored without a word.
NEEDS = {"refit_samples": ("refit", "--refit"), "heal_loss": ("heal_steps", "--heal-steps N"),
         "heal_lr": ("heal_steps", "--heal-steps N")}  # fmt: skip


def calibration_options(args: argparse.Namespace) -> dict:
    """The ``CompressionConfig`` fields of the calibration flags the command has (those left unset
    keep the config's defaults)."""
    names = ("method", "allocation", "calibration_samples", "calibration_length", "refit", "refit_samples",
             "heal_steps", "heal_seconds", "heal_loss", "heal_lr")  # fmt: skip
    given = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    if getattr(args, "calibration", None) == NONE:  # before the model loads, as every check here
        for name in SIZES:
            if name in given:
                raise SvdloraError(
                    f"{_flag(name)} {given[name]} has no effect with --calibration none (no data is read): "
                    f"pass --calibration DATA (or self), or drop {_flag(name)}"
                )
    for name, (needed, flag) in NEEDS.items():
        if name in given and not given.get(needed):
            raise SvdloraError(f"{_flag(name)} has no effect without {flag}: pass both, or drop it")
    return given


# how much calibration data is read: flags that default to None, so that a given one can be told apart
SIZES = ("calibration_samples", "calibration_length")


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def warn_unread_sizes(args: argparse.Namespace, calibration: Any, model: nn.Module | None = None) -> None:
    """--calibration auto that means none here (a model other than a causal LM, plain SVD with uniform
    allocation, a streamed run) reads no data: say so where a calibration size was given, which it ignores
    (with an explicit --calibration none such a size is refused before the load). A given --calibration-length
    beyond the positions of ``model`` (the loaded one or its meta outline) is cut to them: said too."""
    if calibration is not None and model is not None and getattr(args, "calibration_length", None) is not None:
        from ..calibration_data import warn_if_cut

        warn_if_cut(model, args.calibration_length, calibration)
    if calibration is not None or getattr(args, "calibration", None) != AUTO:
        return
    for name in SIZES:
        if getattr(args, name, None) is not None:
            print(
                f"svdlora {args.command}: warning: {_flag(name)} {getattr(args, name)} has no effect: --calibration "
                f"auto reads no data for this model and settings; pass --calibration DATA to calibrate, or drop "
                f"{_flag(name)}",
                file=sys.stderr,
            )


def calibration_input(data: str) -> str | None:
    """The --calibration value where it names data (a path the output must not hold), None for a keyword."""
    return None if data in (AUTO, NONE, SELF) else data


def check_calibration(data: str) -> None:
    """Cheap checks before the model is loaded: a calibration path must exist and hold something."""
    if calibration_input(data) is not None:
        check_data_path(data, "--calibration")


def check_data_path(data: str, flag: str) -> None:
    """A data path (not a dataset name) must exist and hold something: checked before the model loads."""
    from ..evaluation.sources import check_exists, looks_like_path

    if looks_like_path(data) or Path(data).expanduser().exists():
        path = check_exists(data, flag)
        if path.is_file() and path.stat().st_size == 0:
            raise SvdloraError(f"{flag} {data!r} is an empty file: pass text, sentences or an image folder")
        if path.is_dir() and not any(path.iterdir()):
            raise SvdloraError(f"{flag} {data!r} is an empty folder")


def effective_calibration(data: str, kind: str) -> str:
    """What --calibration means for a model of ``kind`` (``calibration_data.model_kind``): 'auto' is
    'self' for a causal LM and 'none' for other models; anything else is itself."""
    if data != AUTO:
        return data
    return SELF if kind == "causal-lm" else NONE


def streamed_calibration(data: str) -> str | None:
    """What a streamed run calibrates on: None for 'none' and for 'auto' (a streamed run cannot
    generate text with the whole model, so auto streams as plain SVD); else ``data`` ('self' included,
    which streaming refuses)."""
    return None if data in (AUTO, NONE) else data


def processor_before_load(
    data: str,
    source: str,
    config: CompressionConfig | None = None,
    loaded: Any = None,
    meta: nn.Module | None = None,
) -> Any:
    """The processor that reads --calibration DATA, loaded before the model where ``source`` is a local
    folder, so that a folder without one is refused in a second, not after minutes of loading (and so is
    'self', or 'auto' meaning it, for a model that cannot use it: ``calibration_data.check_fits``); None
    for a keyword ('self' needs none) and for a hub id, whose files are fetched with the model. ``loaded``:
    the processor already loaded from ``source`` for a task its model fits (sweep's evaluation one: the same
    tokenizer or image processor), returned after the checks instead of loading the files again; ``meta``:
    the model ``skeleton`` the caller built from ``source`` (``evaluation.loading.local_outline``); None where
    none could be built, which is not tried again: the model's load says what is wrong, if anything."""
    from ..plan import uses_calibration

    if data == NONE or meta is None or not Path(source).expanduser().is_dir():
        return None
    if data == AUTO and config is not None and not uses_calibration(config):
        return None  # as resolve_calibration: none
    from ..calibration_data import check_fits, model_kind
    from ..evaluation.loading import checked_processor

    kind = model_kind(meta)  # which processor
    data = effective_calibration(data, kind)
    if data == NONE:
        return None
    check_fits(kind, data, config.calibration_length if config is not None else DEFAULT["calibration_length"])
    if calibration_input(data) is None:
        return None
    return loaded if loaded is not None else checked_processor(source, _processor_task(kind))


def _processor_task(kind: str) -> str:
    return "image-classification" if kind == "image" else "text-generation"


def resolve_calibration(
    data: str, model: nn.Module, source: str, processor: Any = None, config: CompressionConfig | None = None
) -> tuple[Any, Any]:
    """(calibration for ``compress``, the processor that reads it) for the loaded model; ``processor``
    where ``processor_before_load`` loaded it already. 'auto' is none where ``config`` uses no data
    (``plan.uses_calibration``): the default then generates no text only to warn that it is unused."""
    from ..calibration_data import model_kind
    from ..evaluation.loading import checked_processor
    from ..plan import uses_calibration

    if data == AUTO and config is not None and not uses_calibration(config):
        return None, None
    kind = model_kind(model)
    data = effective_calibration(data, kind)
    if data == NONE:
        return None, None
    if processor is not None:
        return data, processor
    try:
        return data, checked_processor(source, _processor_task(kind))
    except SvdloraError:
        if data != SELF:
            raise
        return data, None  # the model writes token ids from its BOS: a folder without a tokenizer will do
