# ruff: noqa: E401, E501, E701, E702, E731, E741, I001, B023, F401  (the two snippets below are kept exactly as they ran)
"""Batch-1 GEMV and single-layer timings on a GPU under CUDA-graph replay, bf16: rank alignment and layouts.

    python3 benchmarks/gpu_gemv.py gemv    # -> benchmarks/results/gpu/gpu_gemv_run5.txt
    python3 benchmarks/gpu_gemv.py layer   # -> benchmarks/results/gpu/gpu_layer_run6.txt

These two snippets ran on an H200 on 2026-11-26 (torch 2.11.0+cu130) as inline scripts through the
device tool (`python3 - <<'E' ... E`, from the repository root); their bodies are committed here
verbatim, wrapped in functions, so that the figures in BENCHMARKS.md come from committed code.
gemv:  F.linear of a (1, 1, in) bf16 input with an (R, 4096) and an (11008, R) matrix at ranks
       around 1492 (budget 0.5 for 4096x11008) vs the dense 11008x4096 weight; 50 calls captured
       in one CUDA graph, replayed, mean microseconds per call.
layer: one dense nn.Linear vs LowRankLinear (pairs) vs PivotedLowRankLinear (pivoted) with random
       factors at an aligned (multiple of 8) and an unaligned rank, same timing method.
"""

# fmt: off
import sys


def gemv():
    import torch, torch.nn.functional as F
    torch.manual_seed(0)
    dev='cuda'; dt=torch.bfloat16
    def t(fn, n=300):
        for _ in range(20): fn()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(50): fn()
        torch.cuda.synchronize()
        s=torch.cuda.Event(True); e=torch.cuda.Event(True)
        s.record()
        for _ in range(n//50): g.replay()
        e.record(); torch.cuda.synchronize()
        return s.elapsed_time(e)/ (n//50*50) * 1000
    x = torch.randn(1, 1, 4096, device=dev, dtype=dt)
    W = torch.randn(11008, 4096, device=dev, dtype=dt)
    print("dense 11008x4096 us", round(t(lambda: F.linear(x, W)),2), "GB/s", round(W.numel()*2/t(lambda: F.linear(x, W))/1e3))
    for R in (1488, 1492, 1496, 1500, 1504, 1536):
        B = torch.randn(R, 4096, device=dev, dtype=dt); A = torch.randn(11008, R, device=dev, dtype=dt)
        z = torch.randn(1, 1, R, device=dev, dtype=dt)
        tb = t(lambda: F.linear(x, B)); ta = t(lambda: F.linear(z, A))
        print(f"R={R} B {tb:.2f}us ({B.numel()*2/tb/1e3:.0f} GB/s) A {ta:.2f}us ({A.numel()*2/ta/1e3:.0f} GB/s) pair {tb+ta:.2f}us")


def layer():
    import torch, torch.nn.functional as F, sys
    sys.path.insert(0, '.')
    from svdlora.pivoted import PivotedLowRankLinear
    from svdlora.layers import LowRankLinear
    torch.manual_seed(0)
    dev='cuda'; dt=torch.bfloat16
    def t(fn, n=500):
        for _ in range(20): fn()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(50): fn()
        torch.cuda.synchronize()
        s=torch.cuda.Event(True); e=torch.cuda.Event(True)
        s.record()
        for _ in range(n//50): g.replay()
        e.record(); torch.cuda.synchronize()
        return s.elapsed_time(e)/ (n//50*50) * 1000
    for (out_f, in_f) in ((11008, 4096), (4096, 11008), (4096, 4096)):
        lin = torch.nn.Linear(in_f, out_f, bias=False, device=dev, dtype=dt)
        x = torch.randn(1, 1, in_f, device=dev, dtype=dt)
        td = t(lambda: lin(x))
        line = f"{out_f}x{in_f} dense {td:.2f}us"
        for R in ((1488, 1492) if out_f != in_f else (1024, 1020)):
            a = torch.randn(out_f, R, device=dev, dtype=dt); b = torch.randn(R, in_f, device=dev, dtype=dt)
            pair = LowRankLinear.from_factors(lin, a, b, [R]) if hasattr(LowRankLinear, 'from_factors') else None
            piv = PivotedLowRankLinear.from_factors(lin, a.float().cpu(), b.float().cpu(), [R]).to(device=dev, dtype=dt)
            with torch.no_grad():
                piv(x)
                tp = t(lambda: pair(x)); tv = t(lambda: piv(x))
            line += f" | R={R} pairs {tp:.2f}us ({td/tp:.2f}x) pivoted {tv:.2f}us ({td/tv:.2f}x)"
        print(line, flush=True)


if __name__ == "__main__":
    {"gemv": gemv, "layer": layer}[sys.argv[1]]()
# fmt: on
