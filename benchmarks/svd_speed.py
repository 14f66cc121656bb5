"""Randomized vs exact SVD at the ranks a budget gives: speed-up and error increase, one run.

    OMP_NUM_THREADS=1 python -m benchmarks.svd_speed [--budget 0.5] [--json out.json]
        [--smollm2 ~/.cache/svdlora/SmolLM2-135M]

Each shape is timed with (a) LAPACK on the matrix as given (svdlora's first exact route),
(b) LAPACK truncated, wide matrices through their transpose (its second), (c) `--svd exact`
(today: eigenvectors of the smaller Gram matrix, LAPACK where float32 round-off could matter), (d) `--svd
randomized` (oversampling 8, 2 power iterations), (e) the exact-error reference that
randomized runs add by default. Errors are relative Frobenius errors of the truncated factors. Random
Gaussian weights have a flat spectrum, the hard case for a sketch; `--smollm2` adds the
real weight shapes of SmolLM2-135M (its first layer) for a pretrained spectrum.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from svdlora.decompose import (
    _lapack_svd,
    choose_method,
    optimal_relative_error,
    rank_for_budget,
    relative_error,
    truncated_svd,
)

SHAPES = [(768, 3072), (3072, 768), (2048, 8192), (4096, 4096)]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def measure(name: str, w: torch.Tensor, budget: float) -> dict:
    m, n = w.shape
    k = rank_for_budget(m, n, budget)
    t_lapack, _ = timed(lambda: torch.linalg.svd(w, full_matrices=False))
    t_transposed, (u, sv, vh) = timed(lambda: _lapack_svd(w, k))
    err_lapack = relative_error(w, (u * sv) @ vh)
    t_exact, (a, b) = timed(lambda: truncated_svd(w, k, method="exact"))
    err_exact = relative_error(w, a @ b)
    t_rand, (a, b) = timed(lambda: truncated_svd(w, k, method="randomized", generator_seed=0))
    err_rand = relative_error(w, a @ b)
    t_ref, ref = timed(lambda: optimal_relative_error(w, k))
    return {
        "matrix": name,
        "shape": [m, n],
        "rank": k,
        "auto_picks": choose_method((m, n), k),
        "seconds": {
            "lapack_as_given": t_lapack,
            "lapack_transposed": t_transposed,
            "exact": t_exact,
            "randomized": t_rand,
            "reference": t_ref,
        },
        "rel_error": {"lapack": err_lapack, "exact": err_exact, "randomized": err_rand, "reference": ref},
        "speedup_exact_over_lapack": t_transposed / t_exact,
        "speedup_randomized": t_exact / t_rand,
        "speedup_randomized_with_reference": t_exact / (t_rand + t_ref),
        "error_increase": err_rand / err_exact - 1,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--json", default=None)
    p.add_argument("--smollm2", default=None, help="a SmolLM2 folder: also time its first layer's matrices")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = [measure(f"gaussian {m}x{n}", torch.randn(m, n), args.budget) for m, n in SHAPES]
    if args.smollm2:
        from safetensors import safe_open

        with safe_open(f"{args.smollm2}/model.safetensors", "pt") as f:
            for key in f.keys():
                if key.startswith("model.layers.0.") and key.endswith("proj.weight"):
                    rows.append(measure(key, f.get_tensor(key).float(), args.budget))
    print(f"budget {args.budget}, torch threads {torch.get_num_threads()}")
    print(
        f"{'matrix':<42} {'rank':>5} {'LAPACK':>7} {'LAPACKᵀ':>7} {'exact':>7} {'rand':>7} {'ref':>6} "
        f"{'speedup':>7} {'+ref':>5} {'err LAPACK':>10} {'err exact':>9} {'err rand':>8} {'increase':>8}  auto"
    )
    for r in rows:
        s, e = r["seconds"], r["rel_error"]
        print(
            f"{r['matrix']:<42} {r['rank']:>5} {s['lapack_as_given']:7.3f} {s['lapack_transposed']:7.3f} "
            f"{s['exact']:7.3f} {s['randomized']:7.3f} {s['reference']:6.3f} {r['speedup_randomized']:6.1f}x "
            f"{r['speedup_randomized_with_reference']:4.1f}x {e['lapack']:10.6f} {e['exact']:9.6f} "
            f"{e['randomized']:8.4f} {r['error_increase']:+8.1%}  {r['auto_picks']}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"budget": args.budget, "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
