"""Saving a compressed model: its folder written whole or not at all (``outputs.atomic_folder``).

``save_compressed`` writes the factor tensors one at a time (``writer.ShardedWriter``), then the
side files; ``write_side_files`` (shared with streaming compression) writes ``svdlora_config.json``
last, so a folder without it is an unfinished run. The layout is described in ``svdlora.io.folder``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from .. import card
from ..choices import DEFAULT_MAX_SHARD_SIZE
from ..compress import BASE_ATTR, MERGED_ATTR, REPORT_ATTR
from ..errors import SvdloraError
from ..integrations.quantization_config import mark_folder
from ..layers import LowRankLinear
from ..models import PREPROCESSOR_FILES, folder_bytes, set_config_dtype
from ..pivoted import PivotedLowRankLinear
from ..precision import set_float_storage
from ..quantize import dtype_name
from ..report import CompressionReport
from ..siblings import StackedSibling, is_stacked
from ..version import __version__
from .outputs import atomic_folder, check_output_folder
from .writer import (
    CONFIG_NAME,
    file_layout,
    folder_format,
    header_metadata,
    write_tensors,
)

logger = logging.getLogger(__name__)


def check_output(output: str | Path, overwrite: bool = False, *, inputs) -> Path:
    """Refuse an output folder that would destroy user files (see svdlora.io.outputs); call early.
    ``inputs`` (required: a command that forgot them could replace its own input with --overwrite)."""
    return check_output_folder(output, overwrite, inputs)


def save_compressed(
    model: nn.Module,
    output: str | Path,
    report: CompressionReport | None = None,
    source: str | Path | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write a compressed model as a self-contained folder (atomically).

    Args:
        model: a model returned through ``compress`` or ``load_compressed`` (or its ``torch.compile`` wrapper).
        output: the folder to create.
        report: the ``CompressionReport`` (default: the one ``compress`` left on the model).
        source: the base model's folder or hub id, to copy tokenizer/processor files from
            (default: ``model.name_or_path`` when set).
        overwrite: replace an existing folder (only after the new one is complete).
        max_shard_size: split the weights into shards of at most this size ("5GB", bytes),
            with a ``model.safetensors.index.json``, as transformers does.
    Returns:
        The output path.
    """
    model = _uncompiled(model)
    report = report or getattr(model, REPORT_ATTR, None)
    if report is None and getattr(model, MERGED_ATTR, None) is not None:
        raise SvdloraError(
            f"this model was loaded merged (dense weights rebuilt) from {getattr(model, MERGED_ATTR)!r}: save it "
            "with save_pretrained, or load the folder again without merging to save it compressed"
        )
    if report is None:
        raise SvdloraError("this model was not compressed: call svdlora.compress(model, ...) first")
    _check_layers_match(model, report)
    _refresh_float_storage(model, report)
    config = getattr(model, "config", None)
    base_model = source if source is not None else getattr(model, BASE_ATTR, None)  # a loaded folder's own base
    source = source if source is not None else getattr(config, "name_or_path", None) or None
    output = Path(output).expanduser()  # as load_compressed and every CLI path
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    format_version = folder_format(model, report)  # after the refresh: it may null errors
    with atomic_folder(output, overwrite, inputs=[source]) as tmp:
        tensors, tied = file_layout(model)
        writer = write_tensors(tmp, tensors, header_metadata(tied, format_version), max_shard_size, str(output))
        report.bytes_after = writer.bytes_on_disk()
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and not getattr(model, "can_generate", lambda: False)():
            generation_config = None
        dtype = layers[0].B.dtype if layers else tensors[0][1].dtype if tensors else None  # the model's, not int8
        if dtype is not None and hasattr(config, "save_pretrained"):  # as save_pretrained: a model cast
            set_config_dtype(config, dtype)  # after loading says what its weights now are
        write_side_files(
            tmp,
            report,
            source=source,
            config=config,
            generation_config=generation_config,
            class_name=type(model).__name__,
            dtype=dtype,
            format_version=format_version,
            base_model=base_model,
        )
    logger.info("saved %s (%d bytes)", output, report.bytes_after)
    return output


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped, else ``model``: the wrapper's state dict prefixes every
    name with ``_orig_mod.``, which would write a folder that no loader finds its tensors in."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def _report_layers(model: nn.Module, report: CompressionReport):
    """(report line, the model's module) of each factorized layer the model has."""
    for line in report.factorized:
        try:
            yield line, model.get_submodule(line.name)
        except AttributeError:
            continue  # schema checks report missing layers with their own message


# what saves a model a runtime changed, at load or in memory (said by save_compressed's refusal and save_pretrained's)
AS_STORED = (
    'to save it compressed, load the folder again as stored (the default runtime="factorized", no stack_siblings) '
    "and save_compressed that, or copy the compressed folder itself; for a dense checkpoint, load it with "
    "merge=True and save_pretrained that"
)
# compressed in memory: no folder to load again, and runtime "factorized" leaves a pair a pair (measured)
IN_MEMORY = (
    "it was compressed in memory, so there is no folder to load again as stored: for a dense checkpoint, "
    'svdlora.runtime.apply_runtime(model, "merged") and save_pretrained that; to save it compressed, '
    "save_compressed it before changing its layers"
)
STACKED_IN_MEMORY = (
    "it was compressed in memory, so there is no folder to load again as stored, and nothing unstacks its "
    "siblings (stack_siblings is for inference): save_compressed it before stacking them"
)


def saves_changed(model: nn.Module) -> str:
    """What saves a model whose layers a runtime changed (``layout_change``): its folder loaded again as stored,
    where it was loaded from one (load_compressed and from_pretrained set ``BASE_ATTR``), else what does in
    memory."""
    if hasattr(model, BASE_ATTR):
        return AS_STORED
    return STACKED_IN_MEMORY if is_stacked(model) else IN_MEMORY


IN_MEMORY_CHANGES = "in memory by svdlora.runtime.apply_runtime or svdlora.stack_siblings"


def layout_change(model: nn.Module, report: CompressionReport) -> str | None:
    """How a factorized layer no longer is stored as its report says (a runtime may have merged it, turned
    a pivoted layer into a pair, stacked it), else None: the folder's report would not fit its tensors."""
    for line, module in _report_layers(model, report):
        pivoted = isinstance(module, PivotedLowRankLinear)
        if not isinstance(module, LowRankLinear) or pivoted != line.pivoted:
            if isinstance(module, StackedSibling):
                now = "a sibling stacked with others"
            else:
                now = "a pair" if isinstance(module, LowRankLinear) else f"a dense {type(module).__name__}"
            return (
                f"{line.name} was compressed {'pivoted' if line.pivoted else 'as a factor pair'} but now runs as "
                f"{now} ({_changed_by(model)})"
            )
    return None


def _changed_by(model: nn.Module) -> str:
    """What may have changed a layer: a model compressed in memory has had no load-time runtime."""
    if hasattr(model, BASE_ATTR):  # loaded: at load, or since
        return (
            'changed at load by runtime="merged", "pairs" or "auto" or stack_siblings=True, or since '
            f"{IN_MEMORY_CHANGES}"
        )
    return f"changed {IN_MEMORY_CHANGES}"


def _check_layers_match(model: nn.Module, report: CompressionReport) -> None:
    """Each factorized layer must still be stored as its report says."""
    change = layout_change(model, report)
    if change is not None:
        raise SvdloraError(f"{change}: {saves_changed(model)}")


def _refresh_float_storage(model: nn.Module, report: CompressionReport) -> None:
    """A folder loaded in another dtype (``dtype=torch.bfloat16``) and saved again stores its float
    factors in that dtype: its report lines must say so, with their bytes. Their errors were measured
    on the factors before the cast and W is not at hand to measure again: they become not measured."""
    for line, module in _report_layers(model, report):
        if not isinstance(module, LowRankLinear) or module.stage_dtypes or module.full is not None:
            continue  # quantized stages keep their stored formats (and bits: their errors still hold)
        dtype = module.B.dtype
        if line.stage_dtypes != [dtype_name(dtype)] * len(line.ranks):
            set_float_storage(line, dtype)
            line.rel_error = line.exact_error = None


def write_side_files(
    tmp: Path,
    report: CompressionReport,
    *,
    source,
    config,
    generation_config,
    class_name: str,
    dtype: torch.dtype | None,
    world_size: int = 1,
    format_version: int = 1,
    base_model: str | None = None,
) -> None:
    """Everything but the weights: config.json (marked for the svdlora quantizer), generation config,
    tokenizer files, the model card, and svdlora_config.json (last). ``base_model``: the name recorded
    as the base (default ``source``, where the tokenizer files are copied from)."""
    local = Path(source).expanduser() if source else None  # '~/model' as typed: the folder the model was read from
    if report.bytes_before is None and local is not None and local.is_dir():
        report.bytes_before = folder_bytes(local)
    if config is not None and hasattr(config, "save_pretrained"):
        config.architectures = [class_name]  # as save_pretrained: a model built from its config has none
        config.save_pretrained(tmp)
        mark_folder(tmp / "config.json", format_version)  # from_pretrained after `import svdlora`
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
    if local is not None:
        copy_preprocessor_files(local, tmp)
    svd_config = {
        "svdlora_version": __version__,
        "format_version": format_version,
        "base_model": {
            "name_or_path": str(base_model or source) if (base_model or source) else None,
            "class": class_name,
            "model_type": getattr(config, "model_type", None),
        },
        "dtype": dtype_name(dtype) if dtype is not None else None,
        "world_size": world_size,
        "report": report.to_dict(),
    }
    base = svd_config["base_model"]["name_or_path"]
    card.write(tmp, card.compressed_card(report, base, class_name=class_name, world_size=world_size))
    # Written last: a folder without it is not an svdlora folder (a killed run looks incomplete).
    (tmp / CONFIG_NAME).write_text(json.dumps(svd_config, indent=2, sort_keys=True) + "\n")


def copy_preprocessor_files(source: str | Path, dest: Path) -> None:
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
