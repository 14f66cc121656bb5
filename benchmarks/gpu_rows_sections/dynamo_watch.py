"""What dynamo and inductor did while compiling: graph breaks, graphs made, CUDA graphs skipped and why."""

from __future__ import annotations

import logging

import torch


def pivot_graph_breaks(model) -> dict:
    """Graph breaks dynamo reports for one PivotedLowRankLinear (trace only, no code generation): 0 expected."""
    from svdlora.pivoted import PivotedLowRankLinear

    layer = next((m for m in model.modules() if isinstance(m, PivotedLowRankLinear)), None)
    if layer is None:
        return {"skipped": "no pivoted layer"}
    x = torch.randn(1, 1, layer.in_features, device=layer.B.device, dtype=layer.B.dtype)
    with torch.no_grad():
        exp = torch._dynamo.explain(layer)(x)
    torch._dynamo.reset()
    return {"graph_count": exp.graph_count, "graph_break_count": exp.graph_break_count,
            "reasons": [str(r.reason).splitlines()[0][:200] for r in exp.break_reasons]}  # fmt: skip


CUDAGRAPH_MESSAGES: list[str] = []


class _Keep(logging.Handler):
    def emit(self, record):
        CUDAGRAPH_MESSAGES.append(record.getMessage()[:300])


def watch_cudagraph_skips():
    """Keep inductor's "skipping cudagraphs due to ..." warnings (an artifact logger, silent by default)."""
    for name in ("torch._inductor.cudagraph_utils.__cudagraphs", "torch._inductor.cudagraph_trees.__cudagraphs"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        if not any(isinstance(h, _Keep) for h in logger.handlers):
            logger.addHandler(_Keep(level=logging.WARNING))


def dynamo_counts() -> dict:
    from torch._dynamo.utils import counters

    return {
        "unique_graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
    }
