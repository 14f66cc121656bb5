"""svdlora: residual-SVD compression of Hugging Face and PyTorch models under a parameter budget.

The names below are imported on first use, so ``import svdlora`` (and the ``svdlora`` command's
``--help`` and flag errors) does not pay for torch and transformers (several seconds).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

from ._import_hooks import after_import
from .version import __version__ as __version__

_EXPORTS = {
    "CompressionConfig": "config",
    "LowRankLinear": "layers",
    "SvdloraError": "errors",
    "compress": "compress",
    "evaluate": "evaluation",
    "load_compressed": "io",
    "save_compressed": "io",
    "stack_siblings": "siblings",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)  # svdlora.io, svdlora.integrations, ...
    raise AttributeError(f"module 'svdlora' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Importing the submodule svdlora.compress binds it here; svdlora.compress stays the function.
        if not (name in _EXPORTS and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def _register_quantizer() -> None:
    try:
        from .integrations import register

        register()
    except Exception as err:  # noqa: BLE001  runs inside transformers' own import: never break that
        import warnings

        what = f"svdlora could not register its transformers quantizer ({err!r})"
        warnings.warn(f"{what}: from_pretrained of svdlora folders fails; load_compressed works", stacklevel=2)


# AutoModel*.from_pretrained(svdlora folder) works after `import svdlora`: the quantizer is registered
# with transformers as soon as transformers' modeling_utils (which from_pretrained lives in) is imported.
after_import("transformers.modeling_utils", _register_quantizer)
