"""Storage: the compressed folder format, and reading and writing it and dense checkpoints.

- ``folder``: what a compressed folder is (its layout) and its checks, no tensor loaded
- ``schema``: the checks of svdlora_config.json's fields
- ``load``: ``load_compressed``, the model rebuilt from a folder
- ``reader``: a folder's tensors read onto their devices, one at a time
- ``saving``: ``save_compressed``, the folder written from a compressed model
- ``writer``: file names, the shard plan and the writer that in-memory and streamed compression share
- ``checkpoint``: a dense checkpoint's headers and tensors, read without loading the model
- ``outputs``: output folders written atomically, never over the user's files

The names below are imported on first use, so importing ``svdlora.io.outputs`` (the CLI does, for
its error messages) does not pay for torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CONFIG_NAME": "writer",
    "DTYPE_NAMES": "writer",
    "MERGE_ADAPTER": "folder",
    "WEIGHTS_NAME": "writer",
    "check_folder": "folder",
    "generation_config": "load",
    "is_compressed_folder": "folder",
    "is_peft_adapter": "folder",
    "load_compressed": "load",
    "read_config": "folder",
    "read_report": "folder",
    "save_compressed": "saving",
    "stored_layers": "folder",
    "stored_stage_dtypes": "folder",
    "tie_as_stored": "load",
    "verify_values": "folder",
    "weight_files": "writer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # not cached here: a test that patches the defining module is seen through the package too
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
