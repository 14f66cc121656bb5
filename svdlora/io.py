"""The on-disk format: one safetensors file, one small JSON config, the base model's own files.

Layout of a compressed folder::

    model.safetensors       factor stages "<module>.stage<j>.A|B", the bias "<module>.bias",
                            and every tensor that was not factorized, under its usual name
    svdlora_config.json     tool/format version, compression settings, per-module ranks and
                            stage dtypes, the base model's id and class, summary figures
    config.json, tokenizer / image-processor files, generation_config.json   (from the base)

The safetensors header metadata holds ``format: pt``, the tool version, the format version,
and ``tied``: a JSON map from each dropped tied tensor name to the name that is stored.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .chain import file_tensors, read_file_tensors
from .compress import REPORT_ATTR
from .errors import SvdloraError
from .layers import LowRankLinear
from .models import PREPROCESSOR_FILES, default_device, folder_bytes, model_class, parse_dtype
from .quantize import parse_format
from .report import CompressionReport
from .version import FORMAT_VERSION, __version__

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "svdlora_config.json"
# 1: float stages only; 2 adds stage dtypes (quantized stages, a full-rank first stage).
READABLE_FORMATS = tuple(range(1, FORMAT_VERSION + 1))


# ---------------------------------------------------------------- writing
def check_output(output: str | Path, overwrite: bool = False) -> Path:
    """Refuse an existing output folder unless ``overwrite``; callers check early, before slow work."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise SvdloraError(f"output folder {str(output)!r} already exists: pass --overwrite or choose another path")
    return output


@contextmanager
def atomic_folder(output: str | Path, overwrite: bool = False):
    """Yield a temporary folder that becomes ``output`` only if the block succeeds."""
    output = check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should be a normal folder
    try:
        yield tmp
        if output.exists():  # overwrite: swap only after the new folder is complete
            trash = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            os.replace(output, trash / "old")
            try:
                os.replace(tmp, output)
            except OSError:
                os.replace(trash / "old", output)  # put the user's folder back
                raise
            finally:
                shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tensors_for_file(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten the model into file tensors: stages split out, tied tensors stored once."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear) and module.stage_dtypes:
            tensors.update(file_tensors(name, module))  # stages in their own dtypes (quantize.py)
        elif isinstance(module, LowRankLinear):
            for j, (a, b) in enumerate(module.stages()):
                tensors[f"{name}.stage{j}.A"] = a
                tensors[f"{name}.stage{j}.B"] = b
    lowrank_keys = {
        f"{n}.{s}" for n, m in model.named_modules() if isinstance(m, LowRankLinear) for s in ("A", "B", "full")
    }
    tensors.update({k: v for k, v in model.state_dict().items() if k not in lowrank_keys})
    stored, tied, seen = {}, {}, {}
    for key, tensor in tensors.items():
        identity = (tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype)
        if tensor.numel() and identity in seen:
            tied[key] = seen[identity]
            continue
        seen[identity] = key
        # clone: stage views share storage, which safetensors refuses
        stored[key] = tensor.detach().to("cpu").clone().contiguous()
    return stored, tied


def save_compressed(
    model: nn.Module,
    output: str | Path,
    report: CompressionReport | None = None,
    source: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a compressed model as a self-contained folder (atomically).

    Args:
        model: a model returned through ``compress``.
        output: the folder to create.
        report: the ``CompressionReport`` (default: the one ``compress`` left on the model).
        source: the base model's folder or hub id, to copy tokenizer/processor files from
            (default: ``model.name_or_path`` when set).
        overwrite: replace an existing folder (only after the new one is complete).
    Returns:
        The output path.
    """
    report = report or getattr(model, REPORT_ATTR, None)
    if report is None:
        raise SvdloraError("this model was not compressed: call svdlora.compress(model, ...) first")
    config = getattr(model, "config", None)
    source = source if source is not None else getattr(config, "name_or_path", None) or None
    output = Path(output)
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    # Folders without stored stage dtypes keep format 1, which older svdlora reads too.
    format_version = FORMAT_VERSION if any(m.stage_dtypes for m in layers) else 1
    with atomic_folder(output, overwrite) as tmp:
        tensors, tied = _tensors_for_file(model)
        metadata = {
            "format": "pt",
            "svdlora_version": __version__,
            "svdlora_format_version": str(format_version),
            "tied": json.dumps(tied, sort_keys=True),
        }
        save_file(tensors, tmp / WEIGHTS_NAME, metadata=metadata)
        report.bytes_after = (tmp / WEIGHTS_NAME).stat().st_size
        if report.bytes_before is None and source and Path(source).is_dir():
            report.bytes_before = folder_bytes(source)
        if config is not None and hasattr(config, "save_pretrained"):
            config.save_pretrained(tmp)
            generation_config = getattr(model, "generation_config", None)
            if generation_config is not None and getattr(model, "can_generate", lambda: False)():
                generation_config.save_pretrained(tmp)
        if source:
            _copy_preprocessor_files(source, tmp)
        first = layers[0].A if layers else next(iter(tensors.values()), None)
        svd_config = {
            "svdlora_version": __version__,
            "format_version": format_version,
            "base_model": {
                "name_or_path": str(source) if source else None,
                "class": type(model).__name__,
                "model_type": getattr(config, "model_type", None),
            },
            "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
            "report": report.to_dict(),
        }
        (tmp / CONFIG_NAME).write_text(json.dumps(svd_config, indent=2, sort_keys=True) + "\n")
    logger.info("saved %s (%d bytes)", output, report.bytes_after)
    return output


def _copy_preprocessor_files(source: str | Path, dest: Path) -> None:
    src = Path(source)
    if src.is_dir():
        for name in PREPROCESSOR_FILES:
            if (src / name).is_file() and not (dest / name).exists():
                shutil.copy2(src / name, dest / name)
        return
    try:  # a hub id: the files are in the local cache after the model was downloaded
        from transformers import AutoProcessor, AutoTokenizer

        for auto in (AutoTokenizer, AutoProcessor):
            try:
                auto.from_pretrained(str(source)).save_pretrained(dest)
                return
            except (OSError, ValueError, KeyError):
                continue
    except ImportError:
        pass
    logger.warning("no tokenizer/processor found for %s: the folder holds weights and config only", source)


# ---------------------------------------------------------------- reading
def is_compressed_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def read_config(path: str | Path) -> dict:
    """The svdlora_config.json of a compressed folder, checked."""
    path = Path(path)
    if not path.exists():
        raise SvdloraError(f"compressed folder {str(path)!r} does not exist")
    if not is_compressed_folder(path):
        raise SvdloraError(
            f"{str(path)!r} is not an svdlora folder (no {CONFIG_NAME}): create one with `svdlora compress`"
        )
    try:
        data = json.loads((path / CONFIG_NAME).read_text())
        data["report"]["modules"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise SvdloraError(f"{path / CONFIG_NAME} is corrupted ({err}): re-run `svdlora compress`") from None
    if data.get("format_version") not in READABLE_FORMATS:
        raise SvdloraError(
            f"{str(path)!r} uses svdlora format {data.get('format_version')!r} (written by svdlora "
            f"{data.get('svdlora_version')}), this is svdlora {__version__} reading formats "
            f"{', '.join(map(str, READABLE_FORMATS))}: install the matching svdlora version "
            "or re-run `svdlora compress`"
        )
    return data


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
            f"{metadata.get('svdlora_format_version')!r}; this svdlora {__version__} reads formats "
            f"{', '.join(map(str, READABLE_FORMATS))}: re-run `svdlora compress`"
        )
    return metadata


def _stored_dtypes(m, model_dtype: str | None) -> list[str] | None:
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
    cls = getattr(transformers, base.get("class") or "", None) or model_class(config)
    with init_empty_weights(), _no_weight_init():  # parameters on meta, buffers (e.g. rotary tables) real
        return cls(config)


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
) -> nn.Module:
    """Rebuild a compressed model, with its factors placed directly on ``device``.

    Args:
        path: a folder written by ``save_compressed`` / ``svdlora compress``.
        device: where the weights go (default: CUDA when available, else CPU).
        dtype: cast floating tensors to this dtype (default: as stored).
        merge: rebuild dense weights A·B on the device instead of keeping low-rank layers.
        model: for plain PyTorch models, an instance of the original architecture (its
            weights are replaced); transformers models are rebuilt from config.json.
    Returns:
        The model in eval mode.
    """
    path = Path(path)
    data = read_config(path)
    weights = path / WEIGHTS_NAME
    metadata = _check_header(weights)
    report = CompressionReport.from_dict(data["report"])
    target_device = default_device(device)
    target_dtype = parse_dtype(dtype)

    if model is None:
        model = _build_skeleton(path, data.get("base_model", {}))
    for m in report.factorized:
        # Factors are allocated on meta; load_state_dict(assign=True) drops the real tensors in.
        stored = _stored_dtypes(m, data.get("dtype"))
        ranks = [r for r in m.ranks if r > 0]  # a full-rank first stage has rank 0 in the report
        layer = LowRankLinear(
            m.shape[1], m.shape[0], ranks, bias=m.bias, base_kind=m.kind, device="meta", stage_dtypes=stored
        )
        try:
            model.set_submodule(m.name, layer, strict=True)
        except AttributeError:
            raise SvdloraError(f"{str(path)!r} names layer {m.name!r}, which the model does not have") from None

    try:
        tensors = load_file(str(weights), device=str(target_device))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise SvdloraError(f"{str(weights)!r} cannot be read ({err}): re-run `svdlora compress`") from None
    compute_dtype = parse_dtype(data.get("dtype")) or torch.float32
    for m in report.factorized:
        if _stored_dtypes(m, data.get("dtype")):
            try:  # dequantized on the target device, in the model's dtype
                a, b, full, stored = read_file_tensors(
                    tensors, m.name, m.ranks, m.stage_dtypes, m.shape, target_dtype or compute_dtype
                )
            except KeyError as err:
                raise SvdloraError(
                    f"{str(weights)!r} lacks factor {err}: the file is corrupted, re-run `svdlora compress`"
                ) from None
            tensors[f"{m.name}.A"], tensors[f"{m.name}.B"] = a, b
            if full is not None:
                tensors[f"{m.name}.full"] = full
            model.get_submodule(m.name).stored = stored
            continue
        try:
            a_parts = [tensors.pop(f"{m.name}.stage{j}.A") for j in range(len(m.ranks))]
            b_parts = [tensors.pop(f"{m.name}.stage{j}.B") for j in range(len(m.ranks))]
        except KeyError as err:
            raise SvdloraError(
                f"{str(weights)!r} lacks factor {err}: the file is corrupted, re-run `svdlora compress`"
            ) from None
        tensors[f"{m.name}.A"] = torch.cat(a_parts, dim=1)
        tensors[f"{m.name}.B"] = torch.cat(b_parts, dim=0)
    if target_dtype is not None:
        tensors = {k: v.to(target_dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    tied = _tied_map(metadata, tensors, weights)

    result = model.load_state_dict(tensors, strict=False, assign=True)
    if result.unexpected_keys:
        raise SvdloraError(f"{str(weights)!r} holds tensors the model does not have: {result.unexpected_keys[:3]}")
    missing = [k for k in result.missing_keys if k not in tied]
    if missing:
        raise SvdloraError(
            f"{str(weights)!r} lacks tensors {missing[:3]}: the file is incomplete or belongs to another "
            "architecture; re-run `svdlora compress`"
        )
    # Re-tie exactly as the file says (one Parameter shared), rather than through transformers'
    # tie_weights(), which would set a `weight` on a factorized head.
    for alias, stored in tied.items():
        parent, _, leaf = alias.rpartition(".")
        setattr(model.get_submodule(parent), leaf, model.get_parameter(stored))
    model.to(target_device)  # buffers built at construction (e.g. rotary tables) stay in their dtype
    if merge:
        for name, module in list(model.named_modules()):
            if isinstance(module, LowRankLinear):
                model.set_submodule(name, module.to_dense())
    else:
        setattr(model, REPORT_ATTR, report)
    return model.eval()
