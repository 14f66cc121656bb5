"""Whether `svdlora compress` streams a model that would not fit in memory (``svdlora.memory``).

Before an in-memory run loads anything, the need is sized from the safetensors headers (for a hub
id not in the local cache, the hub's copies, before its weights are downloaded): the model and its
factors, and for a calibrated run an estimate of its statistics (every distinct input's float64
Gram, and kfac's output Grams). Where it would not fit and a streamed run does the same work, the
CLI streams; where it cannot stream, it refuses (the model alone does not fit) or warns.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .. import blockwise, memory
from ..calibration_data import model_kind
from ..config import CompressionConfig
from ..errors import IN_MEMORY_PLAIN, StreamingRefusal, SvdloraError, first_line
from ..heal import state_bytes, trained_factors
from ..hub import cached_checkpoint, local_checkpoint, remote_parameters
from ..plan import auto_method, resolved_allocation
from ..precision import held_fraction
from ..streaming import Plan, check_streamable, meta_model, plan
from ..targets import find_targets
from .calibration_flags import NONE, SELF, effective_calibration, streamed_calibration

if TYPE_CHECKING:
    from torch import nn

STREAM_ADVICE = "pass --stream with --calibration DATA (a text file, calibrated block by block) or --calibration none"


def streams_for_memory(
    args: argparse.Namespace, config: CompressionConfig, meta: nn.Module | None = None
) -> tuple[bool, nn.Module | None]:
    """Whether the run streams, and the meta model its streamed plan takes over: True where the run
    would not fit in memory and a streamed run does the same (said on stderr). Where it cannot: a
    refusal if the model alone does not fit in memory and swap, else a warning. False where it fits,
    its size is not known (.bin weights; a hub id when the hub cannot be reached and it is not in the
    local cache), or with --no-stream. ``meta``: the meta model compress built for its early checks
    (a local folder's ``evaluation.loading.local_outline``, a hub id's for --eval), which the plan takes
    over rather than building another, where built from the folder it plans; where the run streams,
    that model (a hub id's: the one its checks built) is handed back as built, for the streamed run's
    plan to take over in turn; else None (the plan may have swapped its layers: the caller reads it no more)."""
    if args.stream is not None:
        return False, None
    folder = cached_checkpoint(args.model)
    if folder is None:  # a hub id not in the cache: --eval's outline of its config, or the size check's
        folder, meta = _downloaded_unless_refused(args, config, meta)
    model = memory.checkpoint_bytes(folder, args.dtype) if folder is not None else None
    if model is None:
        return False, None
    budget = _budget(args, config, folder)
    planned = _plan(args, config, folder, meta) if args.calibration != NONE else None
    statistics = _statistics_bytes(args, config, planned, model)
    over = memory.shortfall(model, budget, extra=statistics)
    if over is None:
        return False, None
    limit, need, room = over
    what = "the model and its factors"
    if statistics:
        what = f"the model, its factors{', healing' if config.heal_steps else ''} and its calibration statistics"
    sizes = f"{args.model!r} needs {_about(need, limit)} ({what}) and {limit} leaves {memory.size(room)}"
    if planned is None:  # not made for the statistics (--calibration none): made now, once
        planned = _plan(args, config, folder, meta)
    why, advice = _why_not_streamed(args, config, _outline(planned)) or (None, None)
    if why is None:  # planned is a Plan: one that could not be made is a reason not to stream
        print(f"svdlora compress: {sizes}: streaming it instead (as --stream; --no-stream loads it)", file=sys.stderr)
        return True, planned.unswapped()
    _refuse_if_the_model_alone_does_not_fit(args, model, why, advice)
    print(f"svdlora compress: warning: {sizes}, and {why}: it may run out of memory; {advice}", file=sys.stderr)
    return False, None


def _downloaded_unless_refused(
    args, config: CompressionConfig, meta: nn.Module | None = None
) -> tuple[Path | None, nn.Module | None]:
    """A hub id not in the local cache, sized from the hub's safetensors headers first: refused before
    its weights are downloaded where the model alone does not fit in memory and swap and its flags or
    config say the run cannot stream; else downloaded (the files the in-memory load would fetch too)
    for the checks that read them. None where it cannot be sized (no hub, no safetensors there). With
    the folder, the meta model built from its config (unswapped: the plan takes it over): ``meta`` (the
    --eval check's, ``compress_run._hub_outline``), or the one this check built where none was; else None."""
    remote = remote_parameters(args.model, args.trust_remote_code)
    if remote is None:
        return None, None
    side, counts = remote
    model = memory.loaded_bytes(counts, memory.load_dtype(args.dtype, side))
    if model is not None and _model_alone_does_not_fit(model):  # only then is the meta model needed
        outline = _config_outline(args, config, side, meta)
        why = _why_not_streamed(args, config, outline)
        if why is not None:
            _refuse_if_the_model_alone_does_not_fit(args, model, *why)
        meta = None if isinstance(outline, SvdloraError) else outline[0]
    # the same commit as the side files
    return local_checkpoint(args.model, args.trust_remote_code, revision=side.name, local_only=False), meta


def _about(need: int, limit: str) -> str:
    if limit == "ulimit -v":  # the address space: the mapped checkpoint and the libraries count in full
        return f"about {memory.size(need)} of address space (the mapped checkpoint and libraries included)"
    return f"about {memory.size(need)} in memory"


def _budget(args, config: CompressionConfig, folder: Path) -> float | None:
    """The factors' size in memory as a fraction of the model's: the budget, or stage dtypes' dequantized
    factors (``precision.held_fraction``; the checkpoint's dtype unknown: float32); None for a fixed rank
    (factors up to the model's size)."""
    if args.rank is not None:
        return None
    if not config.stage_dtypes:
        return config.budget
    dtype = memory.load_dtype(args.dtype, Path(folder)) or torch.float32
    return held_fraction(config.stage_dtypes, config.submatrices, config.budget, dtype)


def _model_alone_does_not_fit(model: int) -> tuple[str, int, int] | None:
    return memory.shortfall(model, None, factors=False, with_swap=True)


def _refuse_if_the_model_alone_does_not_fit(args, model: int, why: str, advice: str) -> None:
    alone = _model_alone_does_not_fit(model)
    if alone:
        limit, need, room = alone
        raise SvdloraError(
            f"{args.model!r} needs {_about(need, limit)} for the model alone and {limit} leaves "
            f"{memory.size(room)}{' (swap included)' if limit == 'available memory' else ''}, and {why}: {advice}"
        )


def _plan(args, config, folder, meta) -> Plan | SvdloraError:
    """The streamed plan (the meta model, no weights read; ``meta`` where built already), or why there is none."""
    try:
        return plan(folder, config, args.dtype, args.trust_remote_code, model=meta)
    except Exception as err:  # noqa: BLE001  only an estimate: the in-memory run says what is wrong, if anything
        return _as_error(err)


def _outline(planned: Plan | SvdloraError) -> tuple | SvdloraError:
    """(meta model, config, target names) of a plan, what ``blockwise.check`` reads; or why there is none."""
    return planned if isinstance(planned, SvdloraError) else (planned.model, planned.hf_config, planned.target_names)


def _config_outline(args, config, side: Path, meta: nn.Module | None = None) -> tuple | SvdloraError:
    """The same outline from config.json alone (the folder of a hub model's side files, no weights); its
    meta model ``meta`` where that was built from this folder."""
    try:
        hf_config, model = meta_model(side, args.trust_remote_code, built=meta)
        return model, hf_config, [t.name for t in find_targets(model, config)[0]]
    except Exception as err:  # noqa: BLE001  only an estimate, as _plan
        return _as_error(err)


def _as_error(err: Exception) -> SvdloraError:
    return err if isinstance(err, SvdloraError) else SvdloraError(first_line(err))


def _statistics_bytes(args, config: CompressionConfig, planned, model_bytes: int) -> int:
    """What calibrating in memory holds (0 where the run does not calibrate, or its targets are not
    known): ``memory.statistics_bytes`` (every target's Grams, reached by the data or not) and, for
    healing, its optimizer state (``heal.state_bytes`` of the plan's factors, in the dtype they load
    in; its uniform ranks, where a global allocation spends the same budget otherwise) and
    distillation's copy of the model."""
    if not isinstance(planned, Plan):
        return 0
    if effective_calibration(args.calibration, model_kind(planned.model)) == NONE:
        return 0  # plain SVD
    if (config.method, resolved_allocation(config)) == ("svd", "uniform") and not config.heal_steps:
        return 0  # the data is not used (healing collects the Grams all the same)
    method = auto_method(planned.targets) if config.method == "auto" else config.method
    statistics = memory.statistics_bytes(planned.targets, method)
    if not config.heal_steps:
        return statistics
    teacher = model_bytes if config.heal_loss == "distill" else 0  # healing's copy
    return statistics + state_bytes(trained_factors(planned.model)) + teacher


def _why_not_streamed(args, config: CompressionConfig, outline: tuple | SvdloraError) -> tuple[str, str] | None:
    """(why, what to do) where a streamed run cannot do what this in-memory run would; None where it can."""
    calibration = streamed_calibration(args.calibration)
    if calibration == SELF:
        return "--calibration self generates text with the whole model", STREAM_ADVICE
    try:
        check_streamable(config, calibration)
        if isinstance(outline, SvdloraError):
            raise outline
        if calibration is not None:
            blockwise.check(*outline)
    except SvdloraError as err:  # a streamed refusal's 'drop --stream' names a flag this run was not given
        shown = err.reworded(IN_MEMORY_PLAIN) if isinstance(err, StreamingRefusal) else err
        return f"it cannot stream ({shown})", "free memory, or run it on a larger machine"
    if effective_calibration(args.calibration, model_kind(outline[0])) == SELF:  # 'auto' (self returned above)
        return "--calibration auto calibrates a causal LM on text the whole model generates", STREAM_ADVICE
    return None
