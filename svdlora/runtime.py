"""--runtime auto|factorized|pairs|merged: run each layer in the layout that is fastest.

A factorized layer reads and multiplies R·(m+n) values instead of m·n, but pays a second
matmul call and an (R,)-sized intermediate; a pivoted layer (``svdlora.pivoted``) reads R² values
fewer again but pays two index copies. Which wins depends on the device, the dtype, the number of
tokens per call and the shape. ``auto`` therefore measures, once per distinct (shape, rank, device,
dtype, tokens), every layout the layer can take on a random input of the layer's size (best of
several repeats, interleaved so noise hits all alike) and keeps the fastest: the layer as stored
("factorized"), a pivoted layer as a plain pair ("pairs", ``PivotedLowRankLinear.to_pairs``), or
A·B rebuilt on the device ("merged"). Two kinds are merged without timing, for a cost that timing
the layer alone leaves out: a layer with a full-rank first stage (``full-int8``), which multiplies by a
dense matrix already, and a layer whose ``.weight`` its parent's forward reads (T5's
``self.wo.weight.dtype``, ``nn.MultiheadAttention``'s ``out_proj``: ``read_as_weight``), which
multiplies A·B on every read. The documented fallback ``rule_prefers_factorized`` (R·(m+n) <= 0.8·m·n:
fewer bytes with a margin for the extra call) is what the measurement is compared against in the
tests and benchmarks.

``auto`` times synchronized eager calls, so a layout's second kernel launch counts: right for eager
decoding (``generate()``), where the host's launches bound a GPU's speed at batch 1. ``auto-graphs``
times each layout's calls captured in a CUDA graph and replayed, i.e. kernel time alone, as decoding
runs under ``torch.compile(mode="reduce-overhead")`` or hand-captured CUDA graphs, where the
thinner factor pairs can win what launches lose them in eager mode (an H200's 7B-shaped model, pivoted
at ranks of multiples of 8, under CUDA graphs: ``auto-graphs`` 1.10x dense with its MLP layers as pairs
and attention merged, all pairs 1.09x, eager-timed ``auto`` merged all, 1.00x). Both time one layer at
a time, so neither sees what ``stack_siblings`` adds. On a device without CUDA graphs ``auto-graphs``
is ``auto``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import time
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from .choices import AUTO_RUNTIMES, RUNTIMES
from .errors import SvdloraError, first_line
from .layers import LowRankLinear, factor_layout
from .pivoted import PivotedLowRankLinear

logger = logging.getLogger(__name__)

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


GRAPH_CALLS = 20  # calls captured per CUDA graph: one replay's launch is shared by all of them


def replayed(fn, calls: int = GRAPH_CALLS, warmups: int = 1):
    """``fn``'s kernels ``calls`` times over, captured in one CUDA graph on the current device; returns
    its replay."""
    stream = torch.cuda.Stream()  # on the current device (measure sets the layer's)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up off the capture (cuBLAS workspaces, lazy init)
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # captured on the stream just warmed up: torch.cuda.graph's own default stream is made once, on
    # whichever GPU was current at the first capture, and a second GPU's kernels would escape it
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(calls):
            fn()
    return graph.replay


@cache
def measure(
    out_features: int,
    in_features: int,
    rank: int,
    device: str,
    dtype: torch.dtype,
    tokens: int = 1,
    pivoted: bool = False,
    graphs: bool = False,
) -> dict[str, float]:
    """Seconds per call of a layer of this shape on a (tokens, in) input, per layout: "factorized"
    and "merged", and for a ``pivoted`` layer (P·x, then C·(P·x), two index copies) also "pairs".
    ``graphs`` on a CUDA device: per call of a CUDA graph's replay (kernel time, no launches)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(tokens, in_features, generator=g).to(device, dtype)
    a = factor_layout(torch.randn(out_features, rank, generator=g).to(device, dtype))  # as the layers hold it
    b = torch.randn(rank, in_features, generator=g).to(device, dtype)
    w = a @ b
    c = a[rank:]  # column-major too: a view of A's (rank, out) storage
    order = torch.randperm(out_features, generator=g).to(device)
    rows, rest = order[:rank].sort().values, order[rank:].sort().values
    cuda = device.startswith("cuda")
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)  # the layer's GPU, not the current one

    def pivoted_forward():  # as PivotedLowRankLinear.forward
        z = F.linear(x, b)
        out = z.new_empty(tokens, out_features)
        out.index_copy_(-1, rows, z)
        out.index_copy_(-1, rest, F.linear(z, c))

    def pair_forward():  # as LowRankLinear.forward
        F.linear(F.linear(x, b), a)

    layouts = {"factorized": pivoted_forward if pivoted else pair_forward, "merged": lambda: F.linear(x, w)}
    if pivoted:
        layouts["pairs"] = pair_forward
    calls = 1
    with torch.no_grad(), torch.cuda.device(device) if cuda else contextlib.nullcontext():  # capture on its GPU
        if graphs and cuda:
            try:
                layouts, calls = {name: replayed(f) for name, f in layouts.items()}, GRAPH_CALLS
            except RuntimeError as err:  # a capture the driver or a library refuses: said, not a raw traceback
                raise SvdloraError(
                    f"CUDA-graph capture of a {out_features}x{in_features} rank-{rank} layer failed on {device} "
                    f"({first_line(err)}): load with runtime='auto' (eager timing) instead"
                ) from None
        one = sum(_best_time(lambda f=f: (f(), sync()), 1, 3) for f in layouts.values())
        inner = max(1, min(200, int(2e-3 / max(one / len(layouts), 1e-7))))  # ~2 ms per timing: above timer noise
        times = {name: [] for name in layouts}
        for _ in range(5):  # interleaved
            for name, f in layouts.items():
                times[name].append(_best_time(lambda f=f: (f(), sync()), 1, inner))
    return {name: min(t) / calls for name, t in times.items()}


def choose(layer: LowRankLinear, tokens: int = 1, graphs: bool = False, weight_read: bool = False) -> str:
    """The layout ("factorized", "pairs" or "merged") that measured fastest for this layer on its
    device (``graphs``: replayed from a CUDA graph); ``weight_read``: its model reads its ``.weight``."""
    if layer.full is not None or weight_read:
        # a full-rank first stage (full-int8/-int4) is a dense matmul already (merged drops the pair's two
        # matmuls and holds no more values than that stage); a .weight read multiplies A·B on every call,
        # which timing the pair alone would leave out (merged holds m·n values instead of R·(m+n))
        return "merged"
    device, dtype = str(layer.B.device), layer.B.dtype
    pivoted = isinstance(layer, PivotedLowRankLinear)
    m, n, rank = layer.out_features, layer.in_features, sum(layer.ranks)
    times = measure(m, n, rank, device, dtype, tokens, pivoted, graphs)
    return min(times, key=times.get)


_WEIGHT_READ = re.compile(r"\bself\.(\w+)\.weight\b")


@cache
def _children_read_as_weight(cls: type) -> frozenset[str]:
    """The child modules whose ``.weight`` ``cls.forward`` reads, found in its source; none where
    the source is not available (a class built at runtime, a compiled extension)."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return frozenset()
    return frozenset(_WEIGHT_READ.findall(source))


def read_as_weight(model: nn.Module) -> list[str]:
    """The low-rank layers of ``model`` whose ``.weight`` their parent's forward reads (T5-family
    feed-forwards read ``self.wo.weight.dtype``, ``nn.MultiheadAttention`` passes
    ``self.out_proj.weight`` on): ``LowRankLinear.weight`` computes A·B on every read, which costs
    more than the dense layer. Found statically, so a read in a helper the forward calls is missed."""
    return [
        f"{parent_name}.{child}" if parent_name else child
        for parent_name, parent in model.named_modules()
        for child in sorted(_children_read_as_weight(type(parent)))
        if isinstance(parent._modules.get(child), LowRankLinear)
    ]


def _report_weight_reads(read: list[str], layouts: dict[str, str], runtime: str) -> None:
    """Auto's merges of such layers at info level; a warning where a runtime kept them factorized."""
    merged = [name for name in read if layouts.get(name) == "merged"]
    if runtime in AUTO_RUNTIMES and merged:
        logger.info(
            "runtime %s merged %d layers without timing: the model's forward reads their .weight", runtime, len(merged)
        )
    if runtime in ("factorized", "pairs"):
        warn_weight_reads(
            [name for name in read if layouts.get(name, "merged") != "merged"],
            "load with runtime='auto' or 'merged' (svdlora eval: --runtime auto)",
        )


def warn_weight_reads(kept: list[str], advice: str) -> None:
    """One warning naming the factorized layers ``kept`` whose ``.weight`` their model's forward reads."""
    if kept:
        examples = ", ".join(kept[:2]) + (", ..." if len(kept) > 2 else "")
        logger.warning(
            "%d layers (%s) are read as .weight by the model's forward, which multiplies their factors on every "
            "call: %s",
            len(kept), examples, advice,
        )  # fmt: skip


def _placed_by_accelerate(module: nn.Module) -> bool:
    """Offloaded by accelerate (weights on "meta", brought in by a hook) or carrying a device hook
    itself: a replacement module would lose what the hook does."""
    meta = any(t.device.type == "meta" for t in module.parameters(recurse=False))
    return meta or getattr(module, "_hf_hook", None) is not None


def apply_runtime(model: nn.Module, runtime: str = "auto", tokens: int = 1) -> dict[str, str]:
    """Change the low-rank layers of ``model`` in place as ``runtime`` says; returns {layer: layout}.

    Args:
        runtime: "factorized" (keep all as stored), "pairs" (pivoted layers become plain pairs; the
            others stay), "merged" (rebuild all as dense), "auto" (per layer, the fastest of these on
            the layer's device for ``tokens`` tokens per call; 1 = decoding) or "auto-graphs" (the
            same, timed as CUDA-graph replays: for decoding under CUDA graphs). Layers accelerate
            offloaded or hooked (``device_map``) stay as stored.
    """
    if runtime not in RUNTIMES:
        raise SvdloraError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    layouts, larger, read = {}, [], read_as_weight(model)
    for name, module in list(model.named_modules()):
        if not isinstance(module, LowRankLinear):
            continue
        if _placed_by_accelerate(module):
            layouts[name] = "factorized"  # its hook (or its parent's) moves these weights: left as stored
            continue
        graphs, weight_read = runtime == "auto-graphs", name in read
        layout = choose(module, tokens, graphs, weight_read) if runtime in AUTO_RUNTIMES else runtime
        if layout == "pairs" and not isinstance(module, PivotedLowRankLinear):
            layout = "factorized"  # already a pair
        if layout == "merged":
            model.set_submodule(name, module.to_dense())
        elif layout == "pairs":
            model.set_submodule(name, module.to_pairs())
            m, n = module.out_features, module.in_features
            if sum(module.ranks) * (m + n) > m * n:
                larger.append(name)
        layouts[name] = layout
    if larger:  # a high budget's pivoted rank: R·(m+n) > m·n
        advice = (  # auto chose pairs as the fastest: advising auto again would say nothing
            "timed fastest; runtime='merged' is smaller there"
            if runtime in AUTO_RUNTIMES
            else "runtime='merged' or 'auto' is smaller there"
        )
        logger.warning("%d layers hold more values as pairs than dense (e.g. %s): %s", len(larger), larger[0], advice)
    _report_weight_reads(read, layouts, runtime)
    counts = {k: sum(v == k for v in layouts.values()) for k in ("factorized", "pairs", "merged")}
    logger.info("runtime %s: %s", runtime, ", ".join(f"{n} layers {k}" for k, n in counts.items()))
    return layouts
