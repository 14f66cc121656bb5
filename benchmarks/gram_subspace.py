"""Could a subspace iteration on the Gram matrix replace its full eigendecomposition? One run.

    OMP_NUM_THREADS=1 python -m benchmarks.gram_subspace --smollm2 ~/.cache/svdlora/SmolLM2-135M \
        [--layer 5] [--json out.json]

`--svd exact` takes the top eigenvectors of the smaller Gram matrix G of each weight W (576×576 for
most of SmolLM2-135M's matrices): the 210 full eigendecompositions are the largest item of the compress
step (issue 10's compress-time row). Here the top-k eigenvectors come instead from q steps of subspace
iteration on G (k + p random starting vectors, a QR after each product with G, a Rayleigh–Ritz step at
the end), k being the pivoted rank a 0.5 budget gives. Timed against `torch.linalg.eigh(G)`; the
error is ‖W − QQᵀW‖/‖W‖ with Q the k vectors found, against the same with the exact eigenvectors.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors import safe_open

MATRICES = ["mlp.down_proj", "mlp.gate_proj", "self_attn.q_proj", "self_attn.o_proj"]


def best_ms(fn, repeats: int):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3, out


def subspace(gram: torch.Tensor, k: int, p: int, q: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(gram @ torch.randn(gram.shape[0], k + p, generator=g))[0]
    for _ in range(q - 1):
        basis = torch.linalg.qr(gram @ basis)[0]
    _, vectors = torch.linalg.eigh(basis.T @ gram @ basis)
    return basis @ vectors[:, -k:]


def pivoted_rank(m: int, n: int, budget: float) -> int:
    """The largest R with R·(m + n − R) ≤ budget·m·n (pivoted factors' size)."""
    return max(r for r in range(1, min(m, n) + 1) if r * (m + n - r) <= budget * m * n)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smollm2", required=True, help="the SmolLM2-135M folder (scripts/fetch_smollm2.sh)")
    p.add_argument("--layer", type=int, default=5)
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args(argv)
    rows = []
    with safe_open(str(Path(args.smollm2).expanduser() / "model.safetensors"), "pt") as f:
        for name in MATRICES:
            weight = f.get_tensor(f"model.layers.{args.layer}.{name}.weight").float()
            weight = weight if weight.shape[0] <= weight.shape[1] else weight.T.contiguous()
            gram, k = weight @ weight.T, pivoted_rank(*weight.shape, args.budget)

            def error(basis, weight=weight):
                return ((weight - basis @ (basis.T @ weight)).norm() / weight.norm()).item()

            ms, (_, vectors) = best_ms(lambda gram=gram: torch.linalg.eigh(gram), args.repeats)
            exact = error(vectors[:, -k:])
            row = {"matrix": name, "gram": gram.shape[0], "rank": k, "eigh_ms": ms, "eigh_error": exact, "subspace": []}
            for q in (1, 2, 3, 4):
                for over in (10, 30):
                    ms_q, basis = best_ms(
                        lambda q=q, over=over, gram=gram, k=k: subspace(gram, k, over, q), args.repeats
                    )
                    err = error(basis)
                    row["subspace"].append({"q": q, "p": over, "ms": ms_q, "error": err, "excess": err / exact - 1})
                    print(
                        f"{name:17} G {gram.shape[0]} k {k}: eigh {ms:5.1f} ms err {exact:.5f} | q {q} p {over:2}: "
                        f"{ms_q:5.1f} ms ({ms_q / ms:.2f}x) err {err:.5f} (+{(err / exact - 1) * 100:.2f}%)",
                        flush=True,
                    )
            rows.append(row)
    result = {
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rows": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
