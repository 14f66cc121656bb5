"""What fusing would buy at batch-1 decode on a GPU: one decoder block's linear layers, 7B shape, bf16.

    PYTHONPATH=$PWD python3 benchmarks/gpu_fused.py --out OUT          # on the GPU (CUDA-graph replay)
    dry run on a CPU: ... --device cpu --small  (TRITON_INTERPRET=1 with triton installed runs the kernel too)

Not yet run on a GPU (written 2026-11-26 after the device time was spent): an experiment to decide
what to build next, not a product path. The H200 rows so far (BENCHMARKS.md section 7) show
factor pairs at rank 1024 of 4096x4096 reading half the bytes of the dense GEMV in the same ~10 us
(two kernels at the batch-1 latency floor), so whole-model decode peaks at 1.14x dense. Variants,
each the seven projections of one Llama-2-7B block (q, k, v, o: 4096x4096 at rank 1024; gate, up:
11008x4096 and down: 4096x11008 at rank 1488, i.e. budget 0.5 rounded to multiples of 8):
  dense       seven GEMVs (the anchor)
  pairs       fourteen: F.linear(F.linear(x, B), A) per projection, as LowRankLinear runs
  siblings    q/k/v's B stacked into one (3072, 4096) GEMV and gate/up's into one (2976, 4096): they
              read the same input; the A factors separate
  siblings+bmm  the same, with q/k/v's and gate/up's A factors batched into one bmm each
  triton      one kernel per projection (Bx and A(Bx) in one launch: each program computes a slice
              of Bx and adds its share of A(Bx) into a float32 output with atomics), plus the
              zeroing and the cast to bf16
Timing: each variant's calls captured 20 times in one CUDA graph, replayed, events; microseconds per
block and the ratio to dense. Each variant's outputs are checked against the unfused pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU machines have no triton; the GPU's torch ships it
    triton = None

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from svdlora.runtime import replayed  # noqa: E402

if triton is not None:

    @triton.jit
    def _lowrank_gemv(x_ptr, b_ptr, at_ptr, y_ptr, n, m, rank, BJ: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):
        """y += Aᵀ[J]ᵀ·(B[J]·x) for this program's block J of BJ ranks; At is A transposed, (R, m) row-major."""
        j = tl.program_id(0) * BJ + tl.arange(0, BJ)
        jmask = j < rank
        t = tl.zeros([BJ], dtype=tl.float32)
        for k0 in range(0, n, BK):
            k = k0 + tl.arange(0, BK)
            kmask = k < n
            xk = tl.load(x_ptr + k, mask=kmask, other=0.0).to(tl.float32)
            bk = tl.load(b_ptr + j[:, None] * n + k[None, :], mask=jmask[:, None] & kmask[None, :], other=0.0)
            t += tl.sum(bk.to(tl.float32) * xk[None, :], axis=1)
        for i0 in range(0, m, BN):
            i = i0 + tl.arange(0, BN)
            imask = i < m
            a = tl.load(at_ptr + j[:, None] * m + i[None, :], mask=jmask[:, None] & imask[None, :], other=0.0)
            tl.atomic_add(y_ptr + i, tl.sum(a.to(tl.float32) * t[:, None], axis=0), mask=imask)


def triton_lowrank(x: torch.Tensor, b: torch.Tensor, at: torch.Tensor, acc: torch.Tensor, bj: int = 8) -> torch.Tensor:
    """A·(B·x) for one token x (in,), with At = Aᵀ contiguous; ``acc`` a float32 (out,) work buffer."""
    rank, n = b.shape
    m = at.shape[1]
    acc.zero_()
    _lowrank_gemv[(triton.cdiv(rank, bj),)](x, b, at, acc, n, m, rank, BJ=bj, BK=256, BN=256)
    return acc.to(x.dtype)


def block(small: bool, dev: str, dtype: torch.dtype, gen: torch.Generator) -> dict:
    """Random dense weights and budget-0.5 factors (multiples of 8) of one decoder block."""
    h, f, r_att, r_mlp = (128, 344, 32, 48) if small else (4096, 11008, 1024, 1488)
    shapes = {"q": (h, h, r_att), "k": (h, h, r_att), "v": (h, h, r_att), "o": (h, h, r_att),
              "gate": (f, h, r_mlp), "up": (f, h, r_mlp), "down": (h, f, r_mlp)}  # fmt: skip
    layers = {}
    for name, (out_f, in_f, rank) in shapes.items():
        a = torch.randn(out_f, rank, generator=gen).mul_(rank**-0.5).to(dev, dtype)
        b = torch.randn(rank, in_f, generator=gen).mul_(in_f**-0.5).to(dev, dtype)
        layers[name] = {"w": (a.float() @ b.float()).to(dtype), "a": a, "b": b, "at": a.t().contiguous()}
    return layers


def variants(layers: dict, x: torch.Tensor, y: torch.Tensor) -> dict:
    """name -> a function computing the block's seven outputs (x feeds q/k/v/gate/up, y feeds o/down)."""
    inputs = {"q": x, "k": x, "v": x, "gate": x, "up": x, "o": x, "down": y}
    qkv_b = torch.cat([layers[n]["b"] for n in "qkv"])
    gu_b = torch.cat([layers[n]["b"] for n in ("gate", "up")])
    qkv_a = torch.stack([layers[n]["a"] for n in "qkv"])
    gu_a = torch.stack([layers[n]["a"] for n in ("gate", "up")])
    r_att, r_mlp = layers["q"]["a"].shape[1], layers["gate"]["a"].shape[1]

    def dense():
        return [F.linear(inputs[n], layers[n]["w"]) for n in layers]

    def pairs():
        return [F.linear(F.linear(inputs[n], layers[n]["b"]), layers[n]["a"]) for n in layers]

    def pair(n):
        return F.linear(F.linear(inputs[n], layers[n]["b"]), layers[n]["a"])

    def siblings():
        tq, tk, tv = F.linear(x, qkv_b).split(r_att, -1)
        tg, tu = F.linear(x, gu_b).split(r_mlp, -1)
        q, k, v = (F.linear(t, layers[n]["a"]) for t, n in zip((tq, tk, tv), "qkv", strict=True))
        g, u = (F.linear(t, layers[n]["a"]) for t, n in zip((tg, tu), ("gate", "up"), strict=True))
        return [q, k, v, pair("o"), g, u, pair("down")]

    def siblings_bmm():
        q, k, v = torch.bmm(qkv_a, F.linear(x, qkv_b).view(3, r_att, 1)).view(3, 1, 1, -1)
        g, u = torch.bmm(gu_a, F.linear(x, gu_b).view(2, r_mlp, 1)).view(2, 1, 1, -1)
        return [q, k, v, pair("o"), g, u, pair("down")]

    found = {"dense": dense, "pairs": pairs, "siblings": siblings, "siblings+bmm": siblings_bmm}
    if triton is not None and (x.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        # compiled Triton needs CUDA tensors: a CPU dry run on a GPU machine (torch ships triton) leaves it out
        buffers = {n: torch.empty(layers[n]["a"].shape[0], device=x.device, dtype=torch.float32) for n in layers}

        def fused():
            return [triton_lowrank(inputs[n].view(-1), layers[n]["b"], layers[n]["at"], buffers[n]) for n in layers]

        found["triton"] = fused
    return found


def timed(fn, dev: str, calls: int = 20, replays: int = 25) -> float:
    """Microseconds per call: CUDA-graph replay on a GPU, a plain loop elsewhere."""
    for _ in range(3):
        fn()
    if not dev.startswith("cuda"):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls * 1e6
    replay = replayed(fn, calls, warmups=3)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (calls * replays) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    dev, dtype = args.device, torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    gen = torch.Generator().manual_seed(0)
    layers = block(args.small, dev, dtype, gen)
    hidden, inter = layers["q"]["w"].shape[1], layers["gate"]["w"].shape[0]
    x = torch.randn(1, 1, hidden, generator=gen).to(dev, dtype)
    y = torch.randn(1, 1, inter, generator=gen).to(dev, dtype)
    found = variants(layers, x, y)
    result = {"device": torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu", "torch": torch.__version__,
              "triton": getattr(triton, "__version__", None), "dtype": str(dtype), "small": args.small,
              "interpret": os.environ.get("TRITON_INTERPRET"), "variants": {}}  # fmt: skip
    with torch.no_grad():
        want = [t.float() for t in found["pairs"]()]
        for name, fn in found.items():
            got = fn()
            scale = max(t.abs().max().item() for t in want)
            error = max((g.float().reshape(w.shape) - w).abs().max().item() for g, w in zip(got, want, strict=True))
            result["variants"][name] = {"max_abs_diff_vs_pairs": error / scale, "us": []}
        for _ in range(args.repeats):  # interleaved
            for name, fn in found.items():
                result["variants"][name]["us"].append(timed(fn, dev))
    dense = min(result["variants"]["dense"]["us"])
    for name, row in result["variants"].items():
        row["best_us"] = min(row["us"])
        row["ratio_to_dense"] = dense / row["best_us"]
        print(f"{name:14s} {row['best_us']:8.2f} us/block  x{row['ratio_to_dense']:.2f}  "
              f"diff vs pairs {row['max_abs_diff_vs_pairs']:.1e}", flush=True)  # fmt: skip
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "gpu_fused.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
