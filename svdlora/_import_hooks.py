"""Run a function once a module has been imported, without importing it (a post-import hook)."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable


def after_import(module: str, callback: Callable[[], None]) -> None:
    """Call ``callback()`` now if ``module`` is imported, else right after its import finishes."""
    if module in sys.modules:
        callback()
    elif not any(isinstance(f, _AfterImport) and f.module == module for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(module, callback))


class _AfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, module: str, callback: Callable[[], None]) -> None:
        self.module, self.callback = module, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.module:
            return None
        sys.meta_path.remove(self)  # once: the other finders locate the module itself
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module = spec.loader.exec_module

        def run_then_call(mod) -> None:
            run_module(mod)
            self.callback()

        spec.loader.exec_module = run_then_call  # this spec's own loader object
        return spec
