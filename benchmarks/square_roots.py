"""The weighting's linear algebra, best-of-N seconds on this machine (``methods.weighting``):
- a square root of a damped Gram matrix: float64 eigendecomposition (the symmetric root, the
  whitening's fallback) against Cholesky (what ``whitening`` takes);
- mapping A back through K-FAC's D = Sᵀ (upper triangular): a general LU solve against the
  triangularity check plus a triangular solve (what ``Weighting.unwhiten`` does), at rank n/4;
- the singular values of a wide float32 matrix (``weighted_spectrum``) against those of its transpose.

  OMP_NUM_THREADS=1 python -m benchmarks.square_roots [--sizes 576 1536] [--wide 576x1536 192x576] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch


def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[576, 1536], help="Gram sizes (SmolLM2: 576, 1536)")
    p.add_argument("--wide", nargs="*", default=["576x1536", "192x576"], help="wide shapes, out x in")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    rows = {}
    for n in args.sizes:
        x = torch.randn(4 * n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        gram = x.T @ x / (4 * n) + 0.01 * torch.eye(n, dtype=torch.float64)
        eigh = _best(lambda g=gram: torch.linalg.eigh(g), args.repeats)
        cholesky = _best(lambda g=gram: torch.linalg.cholesky(g), args.repeats)
        d = torch.linalg.cholesky(gram).T.contiguous()
        a = torch.randn(n, max(n // 4, 1), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        lu = _best(lambda d=d, a=a: torch.linalg.solve(d, a), args.repeats)
        triangular = _best(
            lambda d=d, a=a: torch.equal(d, d.triu()) and torch.linalg.solve_triangular(d, a, upper=True), args.repeats
        )
        rows[n] = {"eigh_s": eigh, "cholesky_s": cholesky, "lu_solve_s": lu, "triangular_solve_s": triangular}
        print(f"{n}x{n} float64: eigh {eigh * 1e3:.1f} ms, cholesky {cholesky * 1e3:.1f} ms ({eigh / cholesky:.0f}x)")
        print(f"  D⁻¹·A at rank {a.shape[1]}: LU {lu * 1e3:.1f} ms, check + triangular {triangular * 1e3:.1f} ms")
    for shape in args.wide:
        m, n = map(int, shape.split("x"))
        w = torch.randn(m, n, generator=torch.Generator().manual_seed(2))
        wide = _best(lambda w=w: torch.linalg.svdvals(w), args.repeats)
        tall = _best(lambda w=w: torch.linalg.svdvals(w.T), args.repeats)
        rows[shape] = {"svdvals_wide_s": wide, "svdvals_transposed_s": tall}
        print(f"{shape} float32 singular values: as is {wide * 1e3:.1f} ms, transposed {tall * 1e3:.1f} ms")
    print(f"torch threads: {torch.get_num_threads()}")
    return rows


if __name__ == "__main__":
    main()
