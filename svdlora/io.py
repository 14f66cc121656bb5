"""The on-disk format: one safetensors file, one small JSON config, the base model's own files.

Layout of a compressed folder::

    model.safetensors       factor stages "<module>.stage<j>.A|B", the bias "<module>.bias",
                            and every tensor that was not factorized, under its usual name
    svdlora_config.json     tool/format version, compression settings, per-module ranks and
                            stage dtypes, the base model's id and class, summary figures
    config.json, tokenizer / image-processor files, generation_config.json   (from the base)

The safetensors header metadata holds ``format: pt``, the tool version, the format version,
and ``tied``: a JSON map from each dropped tied tensor name to the name that is stored.
This module checks and loads such folders; ``svdlora.saving`` writes them.
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import PretrainedConfig

from . import siblings
from .compress import BASE_ATTR, MERGED_ATTR, REPORT_ATTR, all_finite
from .errors import SvdloraError, first_line
from .integrations import hf_quantizer
from .layers import LowRankLinear, dense_kind, weight_out_in
from .models import default_device, keep_in_fp32, model_class, parse_dtype, set_config_dtype
from .outputs import describe, is_incomplete
from .pivoted import PivotedLowRankLinear
from .placement import device_for, dispatch, parse_max_memory, resolve_device_map
from .quantize import parse_format
from .reader import read_state
from .report import CompressionReport
from .runtime import AUTO_RUNTIMES, RUNTIMES, apply_runtime
from .save_guard import guard_save_pretrained, holds_factors
from .schema import check_factor_shapes, model_class_named, validate_config
from .version import READABLE_FORMATS, format_refusal
from .writer import (  # noqa: F401  (the file-name constants live in writer; io re-exports them)
    CONFIG_NAME,
    DTYPE_NAMES,
    WEIGHTS_NAME,
    weight_files,
)

logger = logging.getLogger(__name__)


def is_compressed_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CONFIG_NAME).is_file()


# what to do with a PEFT adapter folder where a model is wanted (extract's --base / --tuned, export, info)
MERGE_ADAPTER = (
    "merge it into its base (PeftModel.from_pretrained(base, folder).merge_and_unload()), save_pretrained that"
)


def is_peft_adapter(path: str | Path) -> bool:
    """A PEFT adapter folder (``svdlora extract`` writes one): adapter_config.json and no model config."""
    path = Path(path)
    return (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()


def read_config(path: str | Path) -> dict:
    """The svdlora_config.json of a compressed folder, checked."""
    path = Path(path)
    if not path.exists():
        raise SvdloraError(f"compressed folder {str(path)!r} does not exist")
    if is_incomplete(path):
        raise SvdloraError(
            f"{str(path)!r} is the unfinished temporary folder of an interrupted run: it is removed by the "
            "next run for the same output; pass the finished output folder"
        )
    if not is_compressed_folder(path) and is_peft_adapter(path):
        raise SvdloraError(
            f"{str(path)!r} is a PEFT adapter, not an svdlora folder (no {CONFIG_NAME}; `svdlora extract` records "
            f"its ranks and errors in svdlora_adapter.json): for a dense model {MERGE_ADAPTER}"
        )
    if not is_compressed_folder(path):
        raise SvdloraError(
            f"{str(path)!r} is not an svdlora folder (no {CONFIG_NAME}): create one with `svdlora compress`"
        )
    try:
        data = json.loads((path / CONFIG_NAME).read_text())
        _check_format_version(data, path)  # first: a newer format may lay out the rest otherwise
        data["report"]["modules"]
    except KeyError as err:
        raise SvdloraError(f"{path / CONFIG_NAME} is corrupted (no {err} entry): re-run `svdlora compress`") from None
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as err:
        raise SvdloraError(f"{path / CONFIG_NAME} is corrupted ({err}): re-run `svdlora compress`") from None
    except OSError as err:
        raise SvdloraError(f"{path / CONFIG_NAME} cannot be read ({describe(err)})") from None
    validate_config(data, path / CONFIG_NAME)
    return data


def _check_format_version(data, path: Path) -> None:
    """Refuse a format this svdlora does not read, before any other field is looked up."""
    if not isinstance(data, dict):
        raise TypeError(f"the top level is a {type(data).__name__}, not an object")
    if data.get("format_version") not in READABLE_FORMATS:
        raise SvdloraError(
            f"{str(path)!r} uses svdlora format {data.get('format_version')!r} (written by svdlora "
            f"{data.get('svdlora_version')}), {format_refusal(data.get('format_version'))}"
        )


def check_folder(path: str | Path) -> dict:
    """read_config plus every shard's safetensors header: factor shapes against the ranks, no tensor loaded."""
    return _checked_folder(path)[0]


def _checked_folder(path: str | Path) -> tuple[dict, list[Path], dict[str, str]]:
    """``check_folder``'s checks, handing back (config, shard files, the first shard's header metadata)
    for load_compressed, which would otherwise read every header again."""
    data = read_config(path)
    files = weight_files(path)
    shapes, dtypes, metadata = {}, {}, []
    for weights in files:
        metadata.append(_check_header(weights))
        with safe_open(str(weights), framework="pt") as f:
            for k in f.keys():
                header = f.get_slice(k)
                shapes[k], dtypes[k] = header.get_shape(), header.get_dtype()
    check_factor_shapes(CompressionReport.from_dict(data["report"]).factorized, shapes, files[0])
    _check_model_dtype(data, dtypes, path)
    return data, files, metadata[0]


def verify_values(folder) -> tuple[int, int]:
    """Every floating-point tensor of the folder is finite, read one at a time (``svdlora info --verify``):
    ``check_folder`` reads headers and shapes only, as loading does. Returns (tensors, bytes) read."""
    tensors = nbytes = 0
    for weights in weight_files(folder):
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                if tensor.is_floating_point() and not all_finite(tensor):
                    raise SvdloraError(
                        f"{str(weights)!r}: tensor {key!r} holds NaN or Inf values: the file is corrupted, "
                        "re-run `svdlora compress` (or copy the folder again)"
                    )
                tensors, nbytes = tensors + 1, nbytes + tensor.nbytes
    return tensors, nbytes


def _check_model_dtype(data: dict, dtypes: dict[str, str], path: Path) -> None:
    """The config's ``dtype`` must be one the weights are stored in: an edited config is refused here
    rather than failing in the first forward. Loose on purpose: a model may keep some modules in
    float32 (T5 in float16), and the config records the dtype of the first factorized layer."""
    name = data.get("dtype")
    want = DTYPE_NAMES.get(parse_dtype(name)) if isinstance(name, str) and name else None
    floats = {stored for stored in dtypes.values() if stored in ("F64", "F32", "F16", "BF16")}
    if want is not None and floats and want not in floats:
        raise SvdloraError(
            f"{path / CONFIG_NAME} says dtype {name!r} but the weights are stored as {', '.join(sorted(floats))}: "
            "the config was edited or belongs to another folder; re-run `svdlora compress`"
        )


def read_report(path: str | Path) -> CompressionReport:
    return CompressionReport.from_dict(read_config(path)["report"])


def _check_header(weights: Path) -> dict[str, str]:
    if not weights.is_file():
        raise SvdloraError(f"{str(weights)!r} is missing: the folder is incomplete, re-run `svdlora compress`")
    try:
        with safe_open(str(weights), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise SvdloraError(f"{str(weights)!r} is corrupted ({err}): re-run `svdlora compress`") from None
    if metadata.get("format") != "pt":
        raise SvdloraError(f"{str(weights)!r} has format {metadata.get('format')!r}, expected 'pt' (PyTorch tensors)")
    if metadata.get("svdlora_format_version") not in map(str, READABLE_FORMATS):
        raise SvdloraError(
            f"{str(weights)!r} was written by svdlora {metadata.get('svdlora_version')!r} in format "
            f"{metadata.get('svdlora_format_version')!r}; {format_refusal(metadata.get('svdlora_format_version'))}"
        )
    return metadata


def stored_layers(model: nn.Module, data: dict, report: CompressionReport) -> dict[str, list[str]]:
    """{layer: its stage dtypes} of the layers whose stages are stored in their own dtypes (format 2). A
    layer the model keeps in float32 is plain in float32: T5's wo in a float16 folder, as compression
    found it (``models.keep_in_fp32``)."""
    keeps = keep_in_fp32(model, parse_dtype(data.get("dtype")))
    own = {m.name: "float32" if keeps(f"{m.name}.weight") else data.get("dtype") for m in report.factorized}
    return {m.name: d for m in report.factorized if (d := stored_stage_dtypes(m, own[m.name]))}


def stored_stage_dtypes(m, model_dtype: str | None) -> list[str] | None:
    """A module's stage dtypes when some stage is not simply in the model's dtype (format 2), else None."""
    if any(parse_format(d).quantized or d != model_dtype for d in m.stage_dtypes):
        return list(m.stage_dtypes)
    return None


def _tied_map(metadata: dict[str, str], tensors: dict, weights: Path) -> dict[str, str]:
    """{dropped name: stored name} from the header, checked against the stored tensors."""
    try:
        tied = json.loads(metadata.get("tied", "{}"))
        if not all(isinstance(v, str) and v in tensors for v in tied.values()):
            raise ValueError("a tied name points at no stored tensor")
    except (json.JSONDecodeError, ValueError, AttributeError) as err:
        raise SvdloraError(
            f"{str(weights)!r} has a corrupted 'tied' header ({err}): re-run `svdlora compress`"
        ) from None
    return tied


def tie_as_stored(model: nn.Module, tied: dict[str, str]) -> None:
    """Tie exactly as the file says (one Parameter shared), rather than through transformers'
    tie_weights(), which would set a `weight` on a factorized head."""
    for alias, stored in tied.items():
        parent, _, leaf = alias.rpartition(".")
        setattr(model.get_submodule(parent), leaf, model.get_parameter(stored))


def _build_skeleton(path: Path, base: dict) -> nn.Module:
    """The base architecture with parameters on the meta device (no memory, no init)."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise SvdloraError(
            f"{str(path)!r} has no usable config.json ({err}); for a plain PyTorch model pass "
            "load_compressed(path, model=<an instance of its class>)"
        ) from None
    hf_quantizer.strip_config(config)  # built here, not through transformers' quantizer
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
    generation_config.json, else one derived from config.json (cls(config)'s where the file is missing);
    None for a model that does not generate. The derived one lacks the base model's other end-of-turn
    tokens, sampling defaults, beams and banned words. Loading reads a compressed folder's, streamed
    compression the checkpoint's (which it writes, as save_compressed writes the model's)."""
    from transformers import GenerationConfig
    from transformers.utils import GENERATION_CONFIG_NAME

    if not getattr(model, "can_generate", lambda: False)():
        return None
    if not (path / GENERATION_CONFIG_NAME).is_file():
        return model.generation_config
    try:
        return GenerationConfig.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        logger.warning("%s is not used (%s): generation follows config.json", path / GENERATION_CONFIG_NAME, err)
    # as from_pretrained falls back (transformers.generation.utils), so a streamed run writes what one in memory does
    return GenerationConfig.from_pretrained(str(path), config_file_name="config.json", _from_model_config=True)


def _check_replaced_layer(model: nn.Module, m, path: Path) -> None:
    """The layer a factorized entry replaces must be the Linear/Conv1D of that shape the file was made from."""
    try:
        old = model.get_submodule(m.name)
    except AttributeError:
        raise SvdloraError(f"{str(path)!r} names layer {m.name!r}, which the model does not have") from None
    kind = dense_kind(old)
    shape = tuple(weight_out_in(old).shape) if kind else None
    if kind != m.kind or shape != tuple(m.shape):
        raise SvdloraError(
            f"{str(path)!r}: layer {m.name!r} is a {type(old).__name__}{list(shape) if shape else ''} in the model, "
            f"but svdlora_config.json says {m.kind} {list(m.shape)}: the folder was edited; re-run `svdlora compress`"
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
        device: where the weights go (default: CUDA when available, else CPU).
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
            CUDA graphs (``torch.compile(mode="reduce-overhead")``).
        stack_siblings: low-rank layers that read the same input (q/k/v, gate/up) compute their
            input side in one matmul (``svdlora.siblings``: fewer kernels for batch-1 decoding on a
            GPU); found by one forward pass on the model's ``dummy_inputs``. Inference only.
    Returns:
        The model in eval mode.
    """
    if runtime not in (None, *RUNTIMES):
        raise SvdloraError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if not isinstance(merge, bool):  # merge="no" is truthy: it merged
        raise SvdloraError(f"merge must be True or False, got {merge!r}")
    if merge and runtime not in (None, "merged"):
        raise SvdloraError(f"merge=True and runtime={runtime!r} contradict each other: pass one of them")
    merge = merge or runtime == "merged"
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
    path = Path(path)
    data, files, metadata = _checked_folder(path)  # every shard's header and factor shapes
    weights = files[0]
    report = CompressionReport.from_dict(data["report"])
    target_device = default_device(device)
    target_dtype = parse_dtype(dtype)

    if model is None:
        model = _build_skeleton(path, data.get("base_model", {}))
        # here, not in the skeleton: the early checks' outlines never generate
        if (generation := generation_config(model, path)) is not None:
            model.generation_config = generation
        if stack_siblings:  # refused on the skeleton, before any tensor is read
            siblings.example_inputs(model)
    for m in report.factorized:
        _check_replaced_layer(model, m, path)
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
        raise SvdloraError(
            f"{str(weights)!r} does not fit the model of config.json ({detail}): the folder was edited or "
            "mixed with another; re-run `svdlora compress`"
        ) from None
    if result.unexpected_keys:
        raise SvdloraError(
            f"{str(weights)!r} holds tensors the model does not have: {result.unexpected_keys[:3]} ({CONFIG_NAME} "
            "does not list them as factorized: the folder was edited or mixed with another); re-run `svdlora compress`"
        )
    missing = [k for k in result.missing_keys if k not in tied]
    if missing:
        raise SvdloraError(
            f"{str(weights)!r} lacks tensors {missing[:3]}: the file is incomplete or belongs to another "
            "architecture; re-run `svdlora compress`"
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
    if runtime in (*AUTO_RUNTIMES, "pairs"):
        merged = {name for name, layout in apply_runtime(model, runtime).items() if layout == "merged"}
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
