"""The ``quantization_config`` of an svdlora folder: the entries ``save_compressed`` adds to its ``config.json``
so that plain ``from_pretrained`` reaches svdlora's quantizer (``hf_quantizer``), and the guard that makes it fail
without svdlora rather than load random layers."""

from __future__ import annotations

import json
from pathlib import Path

from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import require_bool
from ..io.writer import INDEX_NAME, WEIGHTS_NAME
from ..version import FORMAT_VERSION, __version__

QUANT_METHOD = "svdlora"
# A file that never exists: transformers without svdlora fails on it instead of loading random layers.
GUARD_WEIGHTS_NAME = "svdlora--import-svdlora-before-from_pretrained.safetensors"


class SvdloraQuantizationConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of an svdlora folder, and the loading options of ``from_pretrained``.

    Args:
        merge: rebuild dense layers holding A·B instead of keeping the low-rank layers.
        format_version: the svdlora folder format (checked on load).
        svdlora_version: the svdlora release that wrote the folder (informational).

    Example:
        >>> AutoModelForCausalLM.from_pretrained(folder, quantization_config=SvdloraQuantizationConfig(merge=True))
    """

    def __init__(
        self,
        merge: bool = False,
        format_version: int = FORMAT_VERSION,
        svdlora_version: str | None = None,
        weights: str = WEIGHTS_NAME,
        **kwargs,
    ):
        self.quant_method = QUANT_METHOD
        require_bool("merge", merge)  # bool("no") merged, as load_compressed(merge="no") did
        self.merge = merge
        # the real weight file (the index of a sharded folder) that the guard stands in for
        self.weights = weights if weights in (WEIGHTS_NAME, INDEX_NAME) else WEIGHTS_NAME
        self.format_version = format_version
        self.svdlora_version = svdlora_version or __version__

    def get_loading_attributes(self) -> dict:
        """What a config passed to ``from_pretrained`` may override in the folder's config."""
        return {"merge": self.merge}


def folder_config_entries(weights: str = WEIGHTS_NAME, format_version: int = FORMAT_VERSION) -> dict:
    """The entries ``save_compressed`` adds to the folder's ``config.json``."""
    return {
        "quantization_config": SvdloraQuantizationConfig(weights=weights, format_version=format_version).to_dict(),
        "transformers_weights": GUARD_WEIGHTS_NAME,
    }


def mark_folder(config_json: Path, format_version: int = 1) -> None:
    """Add the quantization config (and the guard) to a written ``config.json``."""
    data = json.loads(config_json.read_text())
    sharded = (config_json.parent / INDEX_NAME).is_file()  # the index is written before config.json
    data.update(folder_config_entries(INDEX_NAME if sharded else WEIGHTS_NAME, format_version))
    config_json.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def strip_config(config) -> None:
    """Drop the entries of ``folder_config_entries`` from a loaded config: a model rebuilt by
    ``load_compressed`` is not loaded through the quantizer, and a dense export must not claim to be svdlora."""
    for key in folder_config_entries():
        if hasattr(config, key):
            delattr(config, key)
