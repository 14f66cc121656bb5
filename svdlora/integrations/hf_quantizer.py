"""Plain ``from_pretrained`` for svdlora folders, through transformers' quantizer registry.

A folder written by ``save_compressed`` carries, in its ``config.json``::

    "quantization_config": {"quant_method": "svdlora", "format_version": 1, "merge": false, ...},
    "transformers_weights": "svdlora--import-svdlora-before-from_pretrained.safetensors"

With svdlora imported, transformers finds the registered ``SvdloraHfQuantizer`` for
``quant_method: svdlora``; the quantizer points ``transformers_weights`` back at ``model.safetensors``,
swaps every factorized layer of the (meta) skeleton for a ``LowRankLinear`` whose ranks it reads
from the safetensors header, lets transformers load every ordinary tensor (with its ``dtype``,
``device_map``, tying), and then fills the stacked factors from the stage tensors, exactly as
``load_compressed`` does, so both give the same logits.

Without svdlora, transformers only *warns* about an unknown ``quant_method`` and would load a
model whose factorized layers are randomly initialized. The ``transformers_weights`` entry (a
documented config field naming the weight file) prevents that: transformers then looks for a
file that does not exist and fails with ``No such file or directory: .../svdlora--import-svdlora-
before-from_pretrained.safetensors``, an error that names the fix.

Options: ``from_pretrained(folder, quantization_config=SvdloraQuantizationConfig(merge=True))``
merges A·B into plain dense layers (and drops the quantization config, as a dequantized model);
``model.dequantize()`` merges a model loaded factorized the same way.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from torch import nn
from transformers.quantizers import auto as hf_auto
from transformers.quantizers.base import HfQuantizer

from ..layers import LowRankLinear, dense_kind, factor_layout, weight_out_in
from ..models import keep_in_fp32
from ..pivoted import PivotedLowRankLinear, valid_rows
from ..report import CompressionReport
from ..runtime import read_as_weight, warn_weight_reads
from ..version import READABLE_FORMATS, format_refusal
from .folder_layout import (
    PIVOT_KEY,
    STAGE_KEY,
    check_hub_snapshot,
    factor_layouts,
    model_name,
    stores_factors,
    tied_names,
    untie_factorized,
)
from .quantization_config import GUARD_WEIGHTS_NAME, INDEX_NAME, QUANT_METHOD, SvdloraQuantizationConfig

if TYPE_CHECKING:
    from ..io.folder import ShardHeader

logger = logging.getLogger(__name__)


def _weights_folder(config) -> str | None:
    """The folder from_pretrained reads the weights (and a sharded folder's index) from: its argument joined with
    its ``subfolder=``. Neither reaches the quantizer before transformers reads the index (the config's
    name_or_path is the argument alone, or the folder a passed config came from), so they are read off
    from_pretrained's frame; name_or_path where there is none."""
    from transformers.modeling_utils import PreTrainedModel  # loaded by now: this runs inside from_pretrained

    code = inspect.unwrap(PreTrainedModel.from_pretrained.__func__).__code__  # 4.x wraps it (restore_default_dtype)
    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not code:
        frame = frame.f_back
    if frame is None:
        return getattr(config, "name_or_path", None)
    folder, subfolder = frame.f_locals.get("pretrained_model_name_or_path"), frame.f_locals.get("subfolder")
    return os.path.join(folder, subfolder or "") if folder is not None else None


class SvdloraHfQuantizer(HfQuantizer):
    """Loads svdlora folders inside ``PreTrainedModel.from_pretrained`` (it never compresses)."""

    requires_calibration = False

    def __init__(self, quantization_config: SvdloraQuantizationConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._checkpoint_files: list[str] = []
        self._indexed: tuple[Path, list[Path]] | None = None  # (folder, its shards) as _check_index read the index
        self._factor_files: list[Path] = []  # the shards holding factors, read after transformers' load
        self._factorized: dict[str, str] = {}  # model module name -> file module name
        self._tied: dict[str, str] = {}  # model parameter name -> the one it is stored as (header's "tied")
        self._report, self._base = None, None  # svdlora_config.json's, read once by the folder check
        self._dtype: torch.dtype | None = None  # the dtype transformers loads in (preprocess_model)

    def validate_environment(self, *args, device_map=None, **kwargs) -> None:
        if not self.pre_quantized:
            raise ValueError(
                "svdlora cannot compress inside from_pretrained: load the dense model, then call "
                "svdlora.compress(model, budget=...) and svdlora.save_compressed(model, folder)"
            )
        found = self.quantization_config.format_version
        if found not in READABLE_FORMATS:
            raise ValueError(
                f"this svdlora folder uses format {found!r} (written by svdlora "
                f"{self.quantization_config.svdlora_version}); {format_refusal(found)}"
            )
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("svdlora folders cannot be offloaded to disk: give device_map CPU or GPU devices only")

    def _unguard(self, config):
        # Undo the guard that makes loading without svdlora fail (see the module docstring): from a hook
        # that sees the model config before transformers resolves the weight file. Which hook that is
        # depends on the release (update_tp_plan up to transformers 5.17, update_attn_implementation
        # after), so each of them does it; it is idempotent.
        if getattr(config, "transformers_weights", None) == GUARD_WEIGHTS_NAME:
            config.transformers_weights = self.quantization_config.weights
            self._check_index(_weights_folder(config))
        return config

    def _check_index(self, folder: str | None) -> None:
        # transformers reads a sharded folder's index next, before _process_model_before_weight_loading's checks,
        # and says of a corrupted one only 'JSONDecodeError: Expecting ...': a local one is read first, as
        # load_compressed reads it (a hub snapshot's is left to transformers)
        if self.quantization_config.weights == INDEX_NAME and folder and Path(folder).is_dir():
            from ..io.writer import weight_files  # io imports this module

            self._indexed = (Path(folder).resolve(), weight_files(folder))  # the folder check reads it no more

    def _check_folder(self, model: nn.Module, folder: Path) -> list[ShardHeader]:
        """The same strict checks as load_compressed (issue 7): config fields, every shard's header and factor
        shapes, before transformers reads a tensor. Returns the headers, read once for all the quantizer does."""
        from ..io.folder import checked_folder, stored_layers  # io imports this module

        check_hub_snapshot(folder)
        indexed = self._indexed[1] if self._indexed and self._indexed[0] == folder.resolve() else None
        data, headers = checked_folder(folder, files=indexed)
        # Stages stored in their own dtypes (quantized, a full-rank first stage) are not wired into the
        # quantizer: refuse rather than load something else. Asked of the layers as load_compressed
        # asks, not of the format number: formats above 2 carry stage dtypes too.
        self._report = CompressionReport.from_dict(data["report"])
        self._base = (data.get("base_model") or {}).get("name_or_path")
        if stored_layers(model, data, self._report):
            raise ValueError(
                "this svdlora folder stores its stages in their own dtypes (--stage-dtypes), which "
                "plain from_pretrained does not load yet: use svdlora.load_compressed(folder)"
            )
        return headers

    def _hook(self, name: str, config):
        parent = getattr(super(), name, None)  # a release may lack the hook
        return self._unguard(parent(config) if parent is not None else config)

    def update_attn_implementation(self, config):
        return self._hook("update_attn_implementation", config)

    def update_tp_plan(self, config):
        return self._hook("update_tp_plan", config)

    def update_ep_plan(self, config):
        return self._hook("update_ep_plan", config)

    def preprocess_model(self, model: nn.Module, dtype=None, **kwargs):
        # the factors are not among the tensors transformers loads, so its keep-in-float32 plan (T5's wo
        # under float16) does not reach them: _process_model_after_weight_loading applies it
        self._dtype = dtype
        return super().preprocess_model(model, dtype=dtype, **kwargs)

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files=None, **kwargs):
        from ..io.folder import shapes_of  # io imports this module
        from ..io.load import check_layer_fits

        self._checkpoint_files = list(checkpoint_files or [])
        headers = self._check_folder(model, Path(self._checkpoint_files[0]).parent) if self._checkpoint_files else []
        self._factor_files = [header.path for header in headers if stores_factors(header.shapes)]
        layouts = factor_layouts(shapes_of(headers))
        if not layouts:
            raise ValueError(f"{self._checkpoint_files} holds no svdlora factors: is this an svdlora folder?")
        prefix = getattr(model, "base_model_prefix", "")
        # The folder's own class must have every factorized module; another class (AutoModel on a
        # *ForCausalLM folder, another head) lacks the folder's head, whose factors transformers'
        # rule for a dense checkpoint's unused tensors leaves unread.
        own_class = type(model).__name__ in (getattr(model.config, "architectures", None) or [])
        missing = set()
        entries = {m.name: m for m in self._report.factorized}
        for file_name, (ranks, pivoted) in layouts.items():
            name = model_name(model, file_name, prefix, strict=own_class)
            if name is None:
                logger.info("svdlora: %s has no %r: its factors are not loaded", type(model).__name__, file_name)
                continue
            module = model.get_submodule(name)
            kind = dense_kind(module)
            if kind is None:
                raise ValueError(f"the folder factorizes {file_name!r}, which is a {type(module).__name__} here")
            if file_name in entries:  # config.json's layer, as load_compressed asks (an edited config.json)
                check_layer_fits(module, entries[file_name], headers[0].path.parent, name)
            out_features, in_features = weight_out_in(module).shape
            cls = PivotedLowRankLinear if pivoted else LowRankLinear
            layer = cls(in_features, out_features, ranks, bias=module.bias is not None, base_kind=kind, device="meta")
            model.set_submodule(name, layer)
            self._factorized[name] = file_name
            missing |= {re.escape(f"{name}.{side}") for side in (("B", "C", "rows") if pivoted else "AB")}
        # Tied as the file says: a factorized head sets tie_word_embeddings=False, which in
        # transformers 5 also drops other ties (Marian's encoder/decoder embed_tokens -> shared).
        self._tied = tied_names(model, headers[0].metadata, prefix)  # headers[0]: there are factors, so headers
        untie_factorized(model, set(self._factorized))
        missing |= {re.escape(alias) for alias in self._tied}
        # The factor tensors are read after loading; keep them out of transformers' load report.
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | {
            r"\.stage\d+\.[AB]$",
            r"\.pivoted\.(B|C|rows)$",
        }
        model._keys_to_ignore_on_load_missing = set(model._keys_to_ignore_on_load_missing or ()) | {
            rf"(^|\.){m}$" for m in missing
        }
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs):
        wanted = {file_name: name for name, file_name in self._factorized.items()}
        parts: dict[str, dict[str, dict[int, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
        for path in self._factor_files:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    match = STAGE_KEY.match(key) or PIVOT_KEY.match(key)
                    if match and match["module"] in wanted:
                        stage = int(match["stage"]) if "stage" in match.groupdict() else 0
                        parts[match["module"]][match["side"]][stage] = f.get_tensor(key)
        from ..io.load import tie_as_stored  # io imports this module

        tie_as_stored(model, self._tied)
        merge = self.quantization_config.merge
        placed: dict[str, torch.dtype | None] = {}  # each layer's dtype as transformers placed it (None: meta)
        keeps_fp32 = keep_in_fp32(model, self._dtype)
        for file_name, name in wanted.items():
            layer = model.get_submodule(name)
            # Where transformers put this layer (device_map) and in which dtype (dtype= / config).
            like = layer.bias if layer.bias is not None else layer.B
            kept = torch.float32 if keeps_fp32(f"{name}.weight") else like.dtype
            placed[name] = None if like.device.type == "meta" else kept
            pivoted = isinstance(layer, PivotedLowRankLinear)
            for side, dim in (("B", 0), ("C", 0)) if pivoted else (("A", 1), ("B", 0)):
                stages = parts[file_name][side]
                tensor = torch.cat([stages[j] for j in sorted(stages)], dim=dim)
                if like.device.type == "meta":  # not materialized by transformers: keep the stored dtype, on CPU
                    tensor = tensor.to("cpu")
                else:  # merging: multiplied in the wider dtype, the product rounded once (svdlora.io.reader._widened)
                    dtype = torch.promote_types(tensor.dtype, placed[name]) if merge else placed[name]
                    tensor = tensor.to(device=like.device, dtype=dtype)
                tensor = factor_layout(tensor) if side in ("A", "C") else tensor
                setattr(layer, side, nn.Parameter(tensor, requires_grad=layer.B.requires_grad))
            if pivoted:  # the pivot indices: an integer buffer, on the layer's device
                rows = parts[file_name]["rows"][0]
                if not valid_rows(rows, layer.out_features):
                    raise ValueError(f"{file_name}.pivoted.rows are not increasing row indices: the file is corrupted")
                layer.rows = rows.to("cpu" if like.device.type == "meta" else like.device)
        if merge:
            self._merge(model, placed)
            self.remove_quantization_config(model)
        else:
            if self._report is not None:
                from ..compress import BASE_ATTR, REPORT_ATTR

                setattr(model, REPORT_ATTR, self._report)
                setattr(model, BASE_ATTR, self._base)
            warn_weight_reads(
                read_as_weight(model),
                "load with from_pretrained(..., quantization_config=SvdloraQuantizationConfig(merge=True)) or "
                "svdlora.load_compressed(folder, runtime='auto')",
            )
        from ..save_guard import guard_save_pretrained

        # factorized: transformers' own refusal does not say what to use instead; merged: a dense save
        # that keeps what loading will not tie again
        guard_save_pretrained(model)
        return model

    def _dequantize(self, model: nn.Module, dtype=None) -> nn.Module:
        """``model.dequantize()``: the layers merged as ``merge=True`` merges them at load, each in the dtype it was
        loaded in (``dtype``, the config's by default, is not applied: T5's ``wo`` kept in float32 stays so);
        transformers then drops the quantization config."""
        self._merge(model, dict.fromkeys(self._factorized))
        return model

    def _merge(self, model: nn.Module, dtypes: dict[str, torch.dtype | None]) -> None:
        """Each factorized layer replaced by the dense layer holding A·B, cast to ``dtypes[name]`` (None: as is);
        the model is then a merged one, as ``load_compressed(merge=True)`` gives (save_compressed says so)."""
        from ..compress import BASE_ATTR, MERGED_ATTR, REPORT_ATTR

        for name, dtype in dtypes.items():
            dense = model.get_submodule(name).to_dense()
            model.set_submodule(name, dense if dtype is None else dense.to(dtype))
        for attr in (REPORT_ATTR, BASE_ATTR):  # set where the model was loaded factorized: it no longer is
            if hasattr(model, attr):
                delattr(model, attr)
        setattr(model, MERGED_ATTR, str(Path(self._checkpoint_files[0]).parent) if self._checkpoint_files else "")

    def is_serializable(self, **kwargs) -> bool:
        return False  # save with svdlora.save_compressed; save_pretrained would lose the stage layout

    @property
    def is_trainable(self) -> bool:
        return True  # the factors are ordinary parameters

    @property
    def is_compileable(self) -> bool:
        # the layers are F.linear calls (and index copies) that torch.compile traces in one graph; False, the
        # base class's answer, kept generate() from compiling a static-cache decode (CUDA graphs on a GPU)
        return True


def register() -> None:
    """Register the config and quantizer with transformers (idempotent)."""
    if QUANT_METHOD not in hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        hf_auto.register_quantization_config(QUANT_METHOD)(SvdloraQuantizationConfig)
    if QUANT_METHOD not in hf_auto.AUTO_QUANTIZER_MAPPING:
        hf_auto.register_quantizer(QUANT_METHOD)(SvdloraHfQuantizer)
    # transformers copies a passed config's loading attributes (here: merge) over the folder's
    # only for the config types in this tuple; it is read at call time, so extending it suffices.
    if SvdloraQuantizationConfig not in hf_auto.LOADING_ATTRIBUTES_CONFIG_TYPES:
        hf_auto.LOADING_ATTRIBUTES_CONFIG_TYPES = (*hf_auto.LOADING_ATTRIBUTES_CONFIG_TYPES, SvdloraQuantizationConfig)
