"""A merged load in a narrower dtype: the dense weight from factors already rounded to it (the loaders
before 4941dd9) against the float32 product rounded once (``load_compressed(..., merge=True, dtype=...)``
now), each as ‖Ŵ − A·B‖ / ‖A·B‖ with A·B in float64 from the stored factors.

  python -m benchmarks.merge_precision FOLDER [--layers model.layers.3.mlp.gate_proj ...] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse

import torch

from svdlora.io import read_report, weight_files
from svdlora.io.reader import FolderTensors
from svdlora.pivoted import pivoted_weight


def _factors(tensors: FolderTensors, line) -> tuple:
    """A stored layer's float factors: (P, C, rows) if pivoted, else (A, B) with its stages stacked."""
    if line.pivoted:
        return tuple(tensors.get(f"{line.name}.pivoted.{k}") for k in ("B", "C", "rows"))
    return tuple(
        torch.cat([tensors.get(f"{line.name}.stage{j}.{side}") for j in range(len(line.ranks))], dim=dim)
        for side, dim in (("A", 1), ("B", 0))
    )


def _product(factors: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A·B with the factors rounded to ``dtype``, the product computed in float64."""
    if len(factors) == 3:
        b, c, rows = factors
        return pivoted_weight(b.to(dtype).double(), c.to(dtype).double(), rows)
    a, b = factors
    return a.to(dtype).double() @ b.to(dtype).double()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--layers", nargs="+", default=None, help="default: the first layer's matrices")
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    report = read_report(args.folder)
    lines = [m for m in report.factorized if args.layers is None or m.name in args.layers]
    lines = lines if args.layers else lines[:7]
    tensors = FolderTensors(weight_files(args.folder), torch.device("cpu"))
    results = {}
    try:
        print(f"| layer | factors rounded to {args.dtype} first | product rounded once |")
        print("| --- | ---: | ---: |")
        for line in lines:
            factors = _factors(tensors, line)
            exact = _product(factors, torch.float32)
            norm = exact.norm()
            before = ((_product(factors, dtype).to(dtype).double() - exact).norm() / norm).item()
            after = ((exact.to(dtype).double() - exact).norm() / norm).item()
            results[line.name] = {"factors_rounded_first": before, "product_rounded_once": after}
            print(f"| {line.name} | {before:.2%} | {after:.2%} |")
    finally:
        tensors.close()
    return results


if __name__ == "__main__":
    main()
