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
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from . import card
from .compress import REPORT_ATTR
from .errors import SvdloraError, first_line
from .integrations import hf_quantizer
from .layers import LowRankLinear, dense_kind, weight_out_in
from .models import PREPROCESSOR_FILES, default_device, folder_bytes, model_class, parse_dtype
from .outputs import atomic_folder, check_output_folder, describe, ensure_space, is_incomplete
from .report import CompressionReport
from .schema import check_factor_shapes, model_class_named, validate_config
from .version import FORMAT_VERSION, __version__

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "svdlora_config.json"


# ---------------------------------------------------------------- writing
def check_output(output: str | Path, overwrite: bool = False, inputs=()) -> Path:
    """Refuse an output folder that would destroy user files (see svdlora.outputs); call early."""
    return check_output_folder(output, overwrite, inputs)


def _tensors_for_file(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten the model into file tensors: stages split out, tied tensors stored once."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            for j, (a, b) in enumerate(module.stages()):
                tensors[f"{name}.stage{j}.A"] = a
                tensors[f"{name}.stage{j}.B"] = b
    lowrank_keys = {f"{n}.{s}" for n, m in model.named_modules() if isinstance(m, LowRankLinear) for s in "AB"}
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
    with atomic_folder(output, overwrite, inputs=[source]) as tmp:
        tensors, tied = _tensors_for_file(model)
        metadata = {
            "format": "pt",
            "svdlora_version": __version__,
            "svdlora_format_version": str(FORMAT_VERSION),
            "tied": json.dumps(tied, sort_keys=True),
        }
        ensure_space(tmp, sum(t.numel() * t.element_size() for t in tensors.values()), str(output))
        save_file(tensors, tmp / WEIGHTS_NAME, metadata=metadata)
        report.bytes_after = (tmp / WEIGHTS_NAME).stat().st_size
        if report.bytes_before is None and source and Path(source).is_dir():
            report.bytes_before = folder_bytes(source)
        if config is not None and hasattr(config, "save_pretrained"):
            config.save_pretrained(tmp)
            hf_quantizer.mark_folder(tmp / "config.json")  # plain from_pretrained after `import svdlora`
            generation_config = getattr(model, "generation_config", None)
            if generation_config is not None and getattr(model, "can_generate", lambda: False)():
                generation_config.save_pretrained(tmp)
        if source:
            _copy_preprocessor_files(source, tmp)
        first = next(iter(tensors.values()), None)
        svd_config = {
            "svdlora_version": __version__,
            "format_version": FORMAT_VERSION,
            "base_model": {
                "name_or_path": str(source) if source else None,
                "class": type(model).__name__,
                "model_type": getattr(config, "model_type", None),
            },
            "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
            "report": report.to_dict(),
        }
        (tmp / CONFIG_NAME).write_text(json.dumps(svd_config, indent=2, sort_keys=True) + "\n")
        card.write(tmp, card.compressed_card(report, svd_config["base_model"]["name_or_path"]))
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
    if is_incomplete(path):
        raise SvdloraError(
            f"{str(path)!r} is the unfinished temporary folder of an interrupted run: it is removed by the "
            "next run for the same output; pass the finished output folder"
        )
    if not is_compressed_folder(path):
        raise SvdloraError(
            f"{str(path)!r} is not an svdlora folder (no {CONFIG_NAME}): create one with `svdlora compress`"
        )
    try:
        data = json.loads((path / CONFIG_NAME).read_text())
        data["report"]["modules"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise SvdloraError(f"{path / CONFIG_NAME} is corrupted ({err}): re-run `svdlora compress`") from None
    except OSError as err:
        raise SvdloraError(f"{path / CONFIG_NAME} cannot be read ({describe(err)})") from None
    if data.get("format_version") != FORMAT_VERSION:
        raise SvdloraError(
            f"{str(path)!r} uses svdlora format {data.get('format_version')!r} (written by svdlora "
            f"{data.get('svdlora_version')}), this is svdlora {__version__} reading format {FORMAT_VERSION}: "
            "install the matching svdlora version or re-run `svdlora compress`"
        )
    validate_config(data, path / CONFIG_NAME)
    return data


def check_folder(path: str | Path) -> dict:
    """read_config plus the safetensors header: factor shapes against the ranks, no tensor loaded."""
    data = read_config(path)
    weights = Path(path) / WEIGHTS_NAME
    _check_header(weights)
    with safe_open(str(weights), framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    check_factor_shapes(CompressionReport.from_dict(data["report"]).factorized, shapes, weights)
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
    if metadata.get("svdlora_format_version") != str(FORMAT_VERSION):
        raise SvdloraError(
            f"{str(weights)!r} was written by svdlora {metadata.get('svdlora_version')!r} in format "
            f"{metadata.get('svdlora_format_version')!r}; this svdlora {__version__} reads format "
            f"{FORMAT_VERSION}: re-run `svdlora compress`"
        )
    return metadata


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
    hf_quantizer.strip_config(config)  # built here, not through transformers' quantizer
    cls = model_class_named(base.get("class"), path / CONFIG_NAME) or model_class(config)
    if cls.config_class is not None and not isinstance(config, cls.config_class):
        raise SvdloraError(
            f"{str(path)!r}: base_model.class {cls.__name__} does not take the {type(config).__name__} of "
            "config.json: the folder was edited or mixed with another; re-run `svdlora compress`"
        )
    try:
        with init_empty_weights(), _no_weight_init():  # parameters on meta, buffers (e.g. rotary tables) real
            return cls(config)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, RuntimeError) as err:
        raise SvdloraError(
            f"{str(path)!r}: config.json does not build a {cls.__name__} ({first_line(err)}): "
            "the folder was edited or corrupted; re-run `svdlora compress`"
        ) from None


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
    data = check_folder(path)
    weights = path / WEIGHTS_NAME
    metadata = _check_header(weights)
    report = CompressionReport.from_dict(data["report"])
    target_device = default_device(device)
    target_dtype = parse_dtype(dtype)

    if model is None:
        model = _build_skeleton(path, data.get("base_model", {}))
    for m in report.factorized:
        _check_replaced_layer(model, m, path)
        # Factors are allocated on meta; load_state_dict(assign=True) drops the real tensors in.
        layer = LowRankLinear(m.shape[1], m.shape[0], m.ranks, bias=m.bias, base_kind=m.kind, device="meta")
        model.set_submodule(m.name, layer, strict=True)

    try:
        tensors = load_file(str(weights), device=str(target_device))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise SvdloraError(f"{str(weights)!r} cannot be read ({err}): re-run `svdlora compress`") from None
    for m in report.factorized:
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

    try:
        result = model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as err:  # size mismatches, integer tensors for float parameters
        detail = " ".join(str(err).split("\n\t")[1:2]).strip() or first_line(err)
        raise SvdloraError(
            f"{str(weights)!r} does not fit the model of config.json ({detail}): the folder was edited or "
            "mixed with another; re-run `svdlora compress`"
        ) from None
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
