"""When is the Gram-matrix exact route safe? Pretrained spectra and an outlier spectrum, one run.

    OMP_NUM_THREADS=1 python -m benchmarks.gram_route --smollm2 ~/.cache/svdlora/SmolLM2-135M \\
        [--json benchmarks/results/gram_route.json]

(1) For each budget, the smallest λ_k/λ₁ (smallest kept over largest eigenvalue of the Gram
    matrix, i.e. (σ_k/σ₁)²) over SmolLM2's 210 matrices at the pivoted rank the budget gives:
    `svdlora.decompose._gram_svd` hands a matrix to LAPACK below ``_GRAM_MIN_RATIO``.
(2) A spectrum with one outlier σ₁ over a linear tail (1 → 0.05), 512×512 and 1024×1024, k = n/2:
    the relative error of the Gram route forced on (ratio check off) against LAPACK's, per λ_k/λ₁.
"""

from __future__ import annotations

import argparse
import json

import torch

import svdlora.decompose as decompose
from svdlora.pivoted import index_values


def with_spectrum(n: int, sigma: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return ((u * sigma) @ v.T).float()


def pretrained(folder: str, budgets: list[float]) -> dict:
    from safetensors.torch import load_file

    stored = [w for k, w in load_file(f"{folder}/model.safetensors").items() if k.endswith("proj.weight")]
    weights = [w.double() for w in stored]
    spectra = [torch.linalg.svdvals(w) for w in weights]
    indices = [index_values(w.dtype) for w in stored]  # the pivot indices, priced as compress prices them
    rows = {}
    for budget in budgets:
        ratios = []
        for w, s, index in zip(weights, spectra, indices, strict=True):
            k = decompose.rank_for_budget(*w.shape, budget, True, index)
            ratios.append((s[k - 1] / s[0]).item() ** 2)
        below = sum(r < decompose._GRAM_MIN_RATIO for r in ratios)
        rows[str(budget)] = {"matrices": len(ratios), "min_ratio": min(ratios), "below_threshold": below}
        print(f"budget {budget}: {len(ratios)} matrices, smallest λ_k/λ₁ {min(ratios):.2e}, {below} below threshold")
    return rows


def outlier() -> list[dict]:
    rows = []
    for top in (30.0, 50.0, 100.0, 300.0, 1000.0):
        for n in (512, 1024):
            sigma = torch.cat([torch.tensor([top]), torch.linspace(1, 0.05, n - 1)]).double()
            w, k = with_spectrum(n, sigma, seed=6), n // 2
            u, s, vh = decompose._lapack_svd(w, k)
            lapack = decompose.relative_error(w, (u * s, vh))
            saved, decompose._GRAM_MIN_RATIO = decompose._GRAM_MIN_RATIO, 0.0
            try:
                gram = decompose.relative_error(w, decompose._gram_svd(w, k))
            finally:
                decompose._GRAM_MIN_RATIO = saved
            ratio = (sigma[k - 1] / sigma[0]).item() ** 2
            route = "gram" if decompose._gram_svd(w, k) is not None else "lapack"
            rows.append({"n": n, "sigma_1": top, "ratio": ratio, "lapack_error": lapack, "gram_error": gram,
                         "excess": gram / lapack - 1, "route_taken": route})  # fmt: skip
            print(f"σ₁ {top:6.0f} n {n:5d}  λ_k/λ₁ {ratio:.1e}  LAPACK {lapack:.6f}  Gram {gram:.6f}  "
                  f"excess {gram / lapack - 1:+.1e}  route taken: {route}")  # fmt: skip
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smollm2", default=None)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.8, 0.9])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    result = {"threshold": decompose._GRAM_MIN_RATIO, "outlier": outlier()}
    if args.smollm2:
        result["smollm2"] = pretrained(args.smollm2, args.budgets)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
