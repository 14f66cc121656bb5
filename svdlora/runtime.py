"""--runtime auto|factorized|merged: run a layer factorized only where that is faster.

A factorized layer reads and multiplies R·(m+n) values instead of m·n, but pays a second
matmul call and an (R,)-sized intermediate; whether it wins depends on the device, the dtype,
the number of tokens per call and the shape. ``auto`` therefore measures, once per distinct
(shape, rank, device, dtype, tokens), both layouts on a random input of the layer's size
(best of several repeats, the two interleaved so noise hits both alike) and keeps the faster;
the layers are then merged (A·B rebuilt on the device) where merged won. The documented
fallback ``rule_prefers_factorized`` (R·(m+n) <= 0.8·m·n: fewer bytes with a margin for the
extra call) is what the measurement is compared against in the tests and benchmarks.
"""

from __future__ import annotations

import logging
import time
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SvdloraError
from .layers import LowRankLinear, factor_layout
from .pivoted import PivotedLowRankLinear

logger = logging.getLogger(__name__)

RUNTIMES = ("factorized", "merged", "auto")
RULE_MARGIN = 0.8


def rule_prefers_factorized(out_features: int, in_features: int, rank: int) -> bool:
    """The rule from shapes alone: factorized when it moves at most 0.8x the dense values."""
    return rank * (out_features + in_features) <= RULE_MARGIN * out_features * in_features


def _best_time(fn, repeats: int, inner: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, time.perf_counter() - start)
    return best / inner


@cache
def measure(
    out_features: int,
    in_features: int,
    rank: int,
    device: str,
    dtype: torch.dtype,
    tokens: int = 1,
    pivoted: bool = False,
) -> tuple[float, float]:
    """(factorized, merged) seconds per call of a layer of this shape on a (tokens, in) input;
    ``pivoted``: the factorized layer is in pivoted form (``svdlora.pivoted``: P·x, then C·(P·x), a gather)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(tokens, in_features, generator=g).to(device, dtype)
    a = factor_layout(torch.randn(out_features, rank, generator=g).to(device, dtype))  # as the layers hold it
    b = torch.randn(rank, in_features, generator=g).to(device, dtype)
    w = a @ b
    c = a[rank:]  # column-major too: a view of A's (rank, out) storage
    order = torch.randperm(out_features, generator=g).to(device)
    rows, rest = order[:rank].sort().values, order[rank:].sort().values
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def factorized():
        if pivoted:  # as PivotedLowRankLinear.forward
            z = F.linear(x, b)
            out = z.new_empty(tokens, out_features)
            out.index_copy_(-1, rows, z)
            out.index_copy_(-1, rest, F.linear(z, c))
        else:
            F.linear(F.linear(x, b), a)

    def merged():
        F.linear(x, w)

    with torch.no_grad():
        one = _best_time(lambda: (factorized(), sync()), 1, 3) + _best_time(lambda: (merged(), sync()), 1, 3)
        inner = max(1, min(200, int(2e-3 / max(one / 2, 1e-7))))  # ~2 ms per timing: above timer noise
        times = {"factorized": [], "merged": []}
        for _ in range(5):  # interleaved
            times["factorized"].append(_best_time(lambda: (factorized(), sync()), 1, inner))
            times["merged"].append(_best_time(lambda: (merged(), sync()), 1, inner))
    return min(times["factorized"]), min(times["merged"])


def choose(layer: LowRankLinear, tokens: int = 1) -> str:
    """'factorized' or 'merged', whichever measured faster for this layer on its device."""
    device, dtype = str(layer.B.device), layer.B.dtype
    pivoted = isinstance(layer, PivotedLowRankLinear)
    fac, mer = measure(layer.out_features, layer.in_features, sum(layer.ranks), device, dtype, tokens, pivoted)
    return "factorized" if fac <= mer else "merged"


def apply_runtime(model: nn.Module, runtime: str = "auto", tokens: int = 1) -> dict[str, str]:
    """Merge the low-rank layers of ``model`` in place as ``runtime`` says; returns {layer: layout}.

    Args:
        runtime: "factorized" (keep all), "merged" (rebuild all as dense), or "auto" (per layer,
            the faster one on the layer's device for ``tokens`` tokens per call; 1 = decoding).
    """
    if runtime not in RUNTIMES:
        raise SvdloraError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    layouts = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, LowRankLinear):
            continue
        layout = runtime if runtime != "auto" else choose(module, tokens)
        if layout == "merged":
            model.set_submodule(name, module.to_dense())
        layouts[name] = layout
    merged = sum(v == "merged" for v in layouts.values())
    logger.info("runtime %s: %d layers factorized, %d merged", runtime, len(layouts) - merged, merged)
    return layouts
