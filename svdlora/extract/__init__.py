"""``svdlora extract``: a PEFT LoRA adapter from the difference between a fine-tuned model and its base.

``pipeline`` runs the steps (the pair checked, the changed layers found, ranks allocated, the deltas factorized),
``checks`` refuses a pair it cannot extract from, ``records`` holds what it returns.
"""

from .pipeline import CALIBRATED, METHODS, extract_adapter, resolve_method, svd_of_delta, weighted_delta

# METHODS is where other methods plug in (README); svd_of_delta and weighted_delta are the ones it holds
__all__ = ["CALIBRATED", "METHODS", "extract_adapter", "resolve_method", "svd_of_delta", "weighted_delta"]
