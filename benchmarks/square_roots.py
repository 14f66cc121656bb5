"""Seconds per square root of a damped Gram matrix: float64 eigendecomposition (the symmetric root,
the whitening's fallback) against Cholesky (what ``methods.weighting.whitening`` takes).

    OMP_NUM_THREADS=1 python -m benchmarks.square_roots [--sizes 576 1536] [--repeats 3]
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
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    rows = {}
    for n in args.sizes:
        x = torch.randn(4 * n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        gram = x.T @ x / (4 * n) + 0.01 * torch.eye(n, dtype=torch.float64)
        eigh = _best(lambda g=gram: torch.linalg.eigh(g), args.repeats)
        cholesky = _best(lambda g=gram: torch.linalg.cholesky(g), args.repeats)
        rows[n] = {"eigh_s": eigh, "cholesky_s": cholesky}
        print(f"{n}x{n} float64: eigh {eigh * 1e3:.1f} ms, cholesky {cholesky * 1e3:.1f} ms ({eigh / cholesky:.0f}x)")
    print(f"torch threads: {torch.get_num_threads()}")
    return rows


if __name__ == "__main__":
    main()
