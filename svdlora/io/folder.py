"""The on-disk format: one safetensors file, one small JSON config, the base model's own files.

Layout of a compressed folder::

    model.safetensors       factor stages "<module>.stage<j>.A|B", the bias "<module>.bias",
                            and every tensor that was not factorized, under its usual name
    svdlora_config.json     tool/format version, compression settings, per-module ranks and
                            stage dtypes, the base model's id and class, summary figures
    config.json, tokenizer / image-processor files, generation_config.json   (from the base)

The safetensors header metadata holds ``format: pt``, the tool version, the format version,
and ``tied``: a JSON map from each dropped tied tensor name to the name that is stored.
This module says what such a folder is and checks it, headers and shapes, without loading a tensor
(``verify_values`` reads the values); ``svdlora.io.load`` loads it, ``svdlora.io.saving`` writes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import SvdloraError
from ..factoring import all_finite
from ..models import keep_in_fp32, parse_dtype
from ..pivoted import valid_rows
from ..quantize import parse_format
from ..report import CompressionReport
from ..version import READABLE_FORMATS, format_refusal
from .outputs import describe, is_incomplete
from .schema import check_factor_shapes, validate_config
from .writer import CONFIG_NAME, DTYPE_NAMES, weight_files


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
    return checked_folder(path)[0]


@dataclass(frozen=True)
class ShardHeader:
    """One shard's safetensors header as the folder check read it: the loaders take it from there."""

    path: Path
    metadata: dict[str, str]
    shapes: dict[str, list[int]]  # {tensor: shape}
    dtypes: dict[str, str]  # {tensor: safetensors dtype name}


def checked_folder(path: str | Path, files: list[Path] | None = None) -> tuple[dict, list[ShardHeader]]:
    """``check_folder``'s checks, handing back (config, every shard's header) to the loaders (load_compressed,
    the from_pretrained quantizer), which would otherwise read every header again. ``files``: the shards as the
    caller already read them from the folder's index (``weight_files``), which is then not read again."""
    data = read_config(path)
    headers = [_check_header(weights) for weights in (weight_files(path) if files is None else files)]
    check_factor_shapes(CompressionReport.from_dict(data["report"]).factorized, shapes_of(headers), headers[0].path)
    _check_model_dtype(data, {key: dtype for header in headers for key, dtype in header.dtypes.items()}, Path(path))
    return data, headers


def shapes_of(headers: list[ShardHeader]) -> dict[str, list[int]]:
    """{tensor: shape} over every shard."""
    return {key: shape for header in headers for key, shape in header.shapes.items()}


def verify_values(folder) -> tuple[int, int]:
    """Every floating-point tensor of the folder is finite, and every pivoted layer's indices are its pivot rows
    (int64: no NaN shows them corrupted, and both loaders refuse them), read one at a time (``svdlora info
    --verify``): ``check_folder`` reads headers and shapes only, as loading does. Returns (tensors, bytes) read."""
    modules = read_config(folder)["report"]["modules"]
    out_features = {f"{m['name']}.pivoted.rows": m["shape"][0] for m in modules if m.get("pivoted")}
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
                if key in out_features and not valid_rows(tensor, out_features[key]):
                    raise SvdloraError(
                        f"{str(weights)!r}: tensor {key!r} holds no pivot row indices (increasing, below "
                        f"{out_features[key]}): the file is corrupted, re-run `svdlora compress` (or copy the folder "
                        "again)"
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


def _check_header(weights: Path) -> ShardHeader:
    """One shard's header, checked and read once."""
    if not weights.is_file():
        raise SvdloraError(f"{str(weights)!r} is missing: the folder is incomplete, re-run `svdlora compress`")
    shapes, dtypes = {}, {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            metadata = f.metadata() or {}
            for k in f.keys():
                header = f.get_slice(k)
                shapes[k], dtypes[k] = header.get_shape(), header.get_dtype()
    except (SafetensorError, OSError, ValueError) as err:
        raise SvdloraError(f"{str(weights)!r} is corrupted ({err}): re-run `svdlora compress`") from None
    if metadata.get("format") != "pt":
        raise SvdloraError(f"{str(weights)!r} has format {metadata.get('format')!r}, expected 'pt' (PyTorch tensors)")
    if metadata.get("svdlora_format_version") not in map(str, READABLE_FORMATS):
        raise SvdloraError(
            f"{str(weights)!r} was written by svdlora {metadata.get('svdlora_version')!r} in format "
            f"{metadata.get('svdlora_format_version')!r}; {format_refusal(metadata.get('svdlora_format_version'))}"
        )
    return ShardHeader(weights, metadata, shapes, dtypes)


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
