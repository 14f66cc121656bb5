"""Loading a compressed folder (``svdlora.io.folder`` says what one is): the base architecture built
on the meta device, its factorized layers swapped for low-rank ones, the tensors read onto their
devices (``svdlora.io.reader``) and assigned, ties restored as the file records them."""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import PretrainedConfig

from .. import siblings
from ..compress import BASE_ATTR, MERGED_ATTR, REPORT_ATTR
from ..errors import SvdloraError, first_line, require_bool
from ..integrations.quantization_config import strip_config
from ..layers import LowRankLinear, dense_kind, weight_out_in
from ..models import (
    default_device,
    keep_in_fp32,
    model_class,
    parse_dtype,
    read_hf_config,
    set_config_dtype,
)
from ..pivoted import PivotedLowRankLinear
from ..placement import device_for, dispatch, parse_max_memory, resolve_device_map
from ..report import CompressionReport
from ..runtime import RUNTIMES, apply_runtime
from ..save_guard import guard_save_pretrained, holds_factors
from .folder import _tied_map, checked_folder, stored_layers
from .reader import read_state
from .schema import model_class_named
from .writer import CONFIG_NAME

logger = logging.getLogger(__name__)


def tie_as_stored(model: nn.Module, tied: dict[str, str]) -> None:
    """Tie exactly as the file says (one Parameter shared), rather than through transformers'
    tie_weights(), which would set a `weight` on a factorized head."""
    for alias, stored in tied.items():
        parent, _, leaf = alias.rpartition(".")
        setattr(model.get_submodule(parent), leaf, model.get_parameter(stored))


def plain_model_class(path: Path, base: dict) -> str | None:
    """The class of the plain PyTorch model a folder holds (no config.json, and no transformers model_type in its
    ``base_model`` record), else None: no config rebuilds it, only an instance passed as ``model=``."""
    if (path / "config.json").is_file() or base.get("model_type"):
        return None
    return base.get("class") or "its class"


def _build_skeleton(path: Path, base: dict) -> nn.Module:
    """The base architecture with parameters on the meta device (no memory, no init)."""
    if cls := plain_model_class(path, base):  # transformers' refusal would ask its config.json for a model_type
        raise SvdloraError(
            f"{str(path)!r} holds a plain PyTorch model ({cls}, no config.json): pass load_compressed(path, "
            f"model=<a {cls}>), an instance for its weights"
        )
    config = read_hf_config(
        path,
        lambda why: (
            f"{str(path)!r} has no usable config.json ({why}); for a plain PyTorch model pass "
            "load_compressed(path, model=<an instance of its class>)"
        ),
    )
    strip_config(config)  # built here, not through transformers' quantizer
    cls = model_class_named(base.get("class"), path / CONFIG_NAME) or model_class(config)
    if cls.config_class is not None and not isinstance(config, cls.config_class):
        raise SvdloraError(
            f"{str(path)!r}: base_model.class {cls.__name__} does not take the {type(config).__name__} of "
            "config.json: the folder was edited or mixed with another; re-run `svdlora compress`"
        )
    try:
        with init_empty_weights(), _no_weight_init():  # parameters on meta, buffers (e.g. rotary tables) real
            model = cls(config)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, RuntimeError) as err:
        raise SvdloraError(
            f"{str(path)!r}: config.json does not build a {cls.__name__} ({first_line(err)}): "
            "the folder was edited or corrupted; re-run `svdlora compress`"
        ) from None
    return model


def generation_config(model: nn.Module, path: Path):
    """The GenerationConfig generate() follows, as from_pretrained reads it: the folder's
    generation_config.json, else (missing or unreadable) one derived from config.json, with the generation
    settings older checkpoints keep there; None for a model that does not generate. The derived one lacks
    the base model's other end-of-turn tokens, sampling defaults, beams and banned words. Loading reads a
    compressed folder's, streamed compression the checkpoint's (which it writes, as save_compressed writes
    the model's)."""
    from transformers import GenerationConfig
    from transformers.utils import GENERATION_CONFIG_NAME

    if not getattr(model, "can_generate", lambda: False)():
        return None
    if (path / GENERATION_CONFIG_NAME).is_file():
        try:
            return GenerationConfig.from_pretrained(str(path))
        except (OSError, ValueError) as err:
            logger.warning("%s is not used (%s): generation follows config.json", path / GENERATION_CONFIG_NAME, err)
    # as from_pretrained falls back (transformers.generation.utils), so a streamed run writes what one in memory does
    return GenerationConfig.from_pretrained(str(path), config_file_name="config.json", _from_model_config=True)


def _check_replaced_layer(model: nn.Module, m, path: Path, fix: str) -> None:
    """The layer a factorized entry replaces must exist, and be the layer the file was made from; ``fix``: what
    to do where it is not (``_mismatch_fix``)."""
    try:
        old = model.get_submodule(m.name)
    except AttributeError:
        raise SvdloraError(f"{str(path)!r} names layer {m.name!r}, which the model does not have: {fix}") from None
    check_layer_fits(old, m, path, m.name, fix)


def check_layer_fits(
    old: nn.Module, m, path: Path, name: str, fix: str = "the folder was edited; re-run `svdlora compress`"
) -> None:
    """``old`` (the model's layer ``name``) must be the Linear/Conv1D of the shape report entry ``m`` was made
    from: both loaders ask it, so an edited or mixed config.json fails in one line, not in the forward."""
    kind = dense_kind(old)
    shape = tuple(weight_out_in(old).shape) if kind else None
    if kind != m.kind or shape != tuple(m.shape):
        raise SvdloraError(
            f"{str(path)!r}: layer {name!r} is a {type(old).__name__}{list(shape) if shape else ''} in the model, "
            f"but svdlora_config.json says {m.kind} {list(m.shape)}: {fix}"
        )


def _mismatch_fix(given: nn.Module | None, base: dict, folder_fault: str) -> str:
    """What to do when the folder and the model differ: a ``model=`` instance (a plain PyTorch model's) is more
    likely built otherwise than the compressed one was than the folder edited (``folder_fault``)."""
    if given is None:
        return f"{folder_fault}; re-run `svdlora compress`"
    return (
        f"model= must be built as the compressed model was (a {base.get('class') or 'model'} of the same layers and "
        f"sizes; this one is a {type(given).__name__}), or {folder_fault}"
    )


def _no_weight_init():
    """transformers >= 5 skips its (pointless, on meta) weight init here: half the load time."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        return nullcontext()
    return no_init_weights()


def load_compressed(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    merge: bool = False,
    model: nn.Module | None = None,
    device_map: str | dict | torch.device | int | None = None,
    max_memory: dict | None = None,
    runtime: str | None = None,
    stack_siblings: bool = False,
) -> nn.Module:
    """Rebuild a compressed model, with its factors placed directly on ``device``.

    Args:
        path: a folder written by ``save_compressed`` / ``svdlora compress``.
        device: where the weights go (default: CUDA when available, else CPU); not with ``device_map``.
        dtype: cast floating tensors to this dtype (default: as stored).
        merge: rebuild dense weights A·B on the device instead of keeping low-rank layers.
        model: for plain PyTorch models, an instance of the original architecture (its
            weights are replaced); transformers models are rebuilt from config.json.
        device_map: instead of ``device``, spread the layers over devices as accelerate does:
            "auto" / "balanced" / "sequential" (planned with the factors' sizes, or the dense
            sizes when merging), a dict {module name: device}, or one device (``"cpu"``, ``"cuda:1"``, a
            GPU index: ``{"": device}``, as transformers takes it); ``max_memory`` caps each device
            (``{0: "20GiB", "cpu": 60 * 10**9}``: bytes, or sizes as ``max_shard_size`` reads them).
        runtime: "factorized" (default: as stored), "pairs" (pivoted layers as plain pairs: no index
            copies, R² values more), "merged" (same as ``merge=True``), or "auto": per layer, the
            layout that measured fastest on its device for one token per call (``svdlora.runtime``;
            eager decoding); "auto-graphs": the same timed as CUDA-graph replays, for decoding under
            CUDA graphs (``torch.compile(mode="reduce-overhead")``). Both merge, untimed, the layers
            whose ``.weight`` the model's forward reads (T5's ``wo``), which "factorized" (the
            default) and "pairs" warn of.
        stack_siblings: low-rank layers that read the same input (q/k/v, gate/up) compute their
            input side in one matmul (``svdlora.siblings``: fewer kernels for batch-1 decoding on a
            GPU); found by one forward pass on the model's ``dummy_inputs``. Inference only.
    Returns:
        The model in eval mode.
    """
    if runtime not in (None, *RUNTIMES):
        raise SvdloraError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    require_bool("merge", merge)
    require_bool("stack_siblings", stack_siblings)
    if merge and runtime not in (None, "merged"):
        raise SvdloraError(f"merge=True and runtime={runtime!r} contradict each other: pass one of them")
    merge = merge or runtime == "merged"
    if device is not None and device_map is not None:  # device_map placed every tensor: device went unused
        raise SvdloraError(
            f"device={str(device)!r} and device_map both say where the weights go: pass one of them (device_map "
            "places every tensor; device was left unused)"
        )
    max_memory = parse_max_memory(max_memory, device_map)
    if stack_siblings and merge:
        raise SvdloraError("stack_siblings=True stacks low-rank layers and a merged load leaves none: pass one of them")
    if stack_siblings and model is not None:
        siblings.example_inputs(model)  # a model without dummy inputs is refused before the load
    if model is not None and holds_factors(model):  # else its low-rank layers were refused as 'the folder was edited'
        raise SvdloraError(
            f"model= is a {type(model).__name__} that already holds svdlora low-rank layers (it was compressed "
            f"or loaded before): pass a freshly built {type(model).__name__} with its original dense layers"
        )
    path = Path(path).expanduser()  # '~/svd' as the CLI reads it (only folders come here, never hub ids)
    data, headers = checked_folder(path)  # every shard's header and factor shapes
    files, metadata = [header.path for header in headers], headers[0].metadata
    weights = files[0]
    report = CompressionReport.from_dict(data["report"])
    target_device = default_device(device)
    target_dtype = parse_dtype(dtype)

    given = model  # a plain PyTorch model's instance, which a mismatch is then most likely due to
    fix = partial(_mismatch_fix, given, data.get("base_model") or {})
    if model is None:
        model = _build_skeleton(path, data.get("base_model", {}))
        # here, not in the skeleton: the early checks' outlines never generate
        if (generation := generation_config(model, path)) is not None:
            model.generation_config = generation
        if stack_siblings:  # refused on the skeleton, before any tensor is read
            siblings.example_inputs(model)
    for m in report.factorized:
        _check_replaced_layer(model, m, path, fix("the folder was edited"))
    stored_dtypes = stored_layers(model, data, report)
    for m in report.factorized if not merge else []:  # merged: the dense skeleton layers get A·B
        # Factors are allocated on meta; load_state_dict(assign=True) drops the real tensors in.
        ranks = [r for r in m.ranks if r > 0]  # a full-rank first stage has rank 0 in the report
        if m.pivoted:
            layer = PivotedLowRankLinear(m.shape[1], m.shape[0], ranks, bias=m.bias, base_kind=m.kind, device="meta")
            model.set_submodule(m.name, layer, strict=True)
            continue
        layer = LowRankLinear(
            m.shape[1], m.shape[0], ranks, bias=m.bias, base_kind=m.kind, device="meta",
            stage_dtypes=stored_dtypes.get(m.name),
        )  # fmt: skip
        model.set_submodule(m.name, layer, strict=True)

    plan = place = None
    if device_map is not None:
        try:  # tied as the file says, so that accelerate plans a tied pair onto one device
            tie_as_stored(model, json.loads(metadata.get("tied", "{}")))
        except (ValueError, AttributeError, TypeError):
            pass  # a corrupted map: _tied_map below says so
        plan = resolve_device_map(model, device_map, max_memory, target_dtype)
        place = partial(device_for, plan)
    # quantized stages are dequantized on the device, in the model's dtype (or the one asked for)
    compute_dtype = target_dtype or parse_dtype(data.get("dtype")) or torch.float32
    stored_parts: dict[str, list] = {}
    keeps_fp32 = keep_in_fp32(model, compute_dtype)  # as from_pretrained(dtype=...) keeps them (T5's wo)
    tensors = read_state(
        files, report, target_device, target_dtype, merge, place,
        stored_dtypes=stored_dtypes, compute_dtype=compute_dtype, stored_parts=stored_parts, keeps_fp32=keeps_fp32,
    )  # fmt: skip
    tied = _tied_map(metadata, tensors, weights)

    try:
        result = model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as err:  # size mismatches, integer tensors for float parameters
        detail = " ".join(str(err).split("\n\t")[1:2]).strip() or first_line(err)
        of = "the model" if given is not None else "the model of config.json"
        raise SvdloraError(
            f"{str(weights)!r} does not fit {of} ({detail}): {fix('the folder was edited or mixed with another')}"
        ) from None
    if result.unexpected_keys:
        raise SvdloraError(
            f"{str(weights)!r} holds tensors the model does not have: {result.unexpected_keys[:3]} ({CONFIG_NAME} "
            f"does not list them as factorized): {fix('the folder was edited or mixed with another')}"
        )
    missing = [k for k in result.missing_keys if k not in tied]
    if missing:
        raise SvdloraError(
            f"{str(weights)!r} lacks tensors {missing[:3]}: "
            f"{fix('the file is incomplete or belongs to another architecture')}"
        )
    tie_as_stored(model, tied)
    if target_dtype is not None and isinstance(getattr(model, "config", None), PretrainedConfig):
        set_config_dtype(model.config, target_dtype)  # as from_pretrained(dtype=...) records it
    if plan is None:
        model.to(target_device)  # buffers built at construction (e.g. rotary tables) stay in their dtype
    else:
        model = dispatch(model, plan)
    guard_save_pretrained(model)  # merged: a dense save that keeps what loading will not tie again
    if merge:
        setattr(model, MERGED_ATTR, str(path))
    else:
        setattr(model, REPORT_ATTR, report)
        setattr(model, BASE_ATTR, (data.get("base_model") or {}).get("name_or_path"))
        for name, parts in stored_parts.items():  # re-saving writes the same stored bits
            model.get_submodule(name).stored = parts
        # "factorized" (the default) changes nothing: it warns of layers read as .weight
        merged = {name for name, layout in apply_runtime(model, runtime or "factorized").items() if layout == "merged"}
        if merged and _merges_narrower(target_dtype, parse_dtype(data.get("dtype")), stored_dtypes, compute_dtype):
            with torch.no_grad():
                for key, weight in read_state(
                    files, report, target_device, target_dtype, True, place,
                    stored_dtypes=stored_dtypes, compute_dtype=compute_dtype, only=merged, keeps_fp32=keeps_fp32,
                ).items():  # fmt: skip
                    model.get_parameter(key).copy_(weight)
    if stack_siblings:
        siblings.stack_siblings(model)
    return model.eval()


def _merges_narrower(target_dtype, folder_dtype, stored_dtypes, compute_dtype) -> bool:
    """Whether the factors in memory are narrower than those merge=True multiplies (cast to a
    narrower dtype, or quantized stages dequantized below float32): the layers runtime="auto"
    merges are then rebuilt from the stored factors, as merge=True builds them (A·B rounded once)."""
    narrower = lambda dtype, than: dtype is not None and torch.promote_types(dtype, than) != dtype  # noqa: E731
    if stored_dtypes and narrower(compute_dtype, torch.float32):
        return True
    return narrower(target_dtype, folder_dtype or torch.float64)  # an unknown stored dtype: read again
