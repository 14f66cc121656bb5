# ruff: noqa: E501  (the child's code and the log lines kept as they ran on the GPU)
"""load135 / load135warm: time to the first forward's end in fresh processes, dense vs factorized vs merged."""

from __future__ import annotations

import json
import statistics
import sys

from benchmarks.common import timed_run
from benchmarks.gpu_rows_sections.state import left, log

LOAD_CHILD = r"""
import json, resource, sys, time, torch, transformers
from svdlora import load_compressed
kind, dense, compressed, dev, dtype, prewarm = sys.argv[1:7]
dtype = getattr(torch, dtype)
if prewarm == "1":  # constant costs out of the clock: the Llama modeling import, cuBLAS init, first kernels
    import transformers.models.llama.modeling_llama
    x = torch.randn(16, 64, device=dev, dtype=dtype)
    torch.nn.functional.linear(x, torch.randn(32, 64, device=dev, dtype=dtype)) @ torch.randn(32, 8, device=dev, dtype=dtype)
transformers.utils.logging.disable_progress_bar()
cuda = dev.startswith("cuda")
sync = torch.cuda.synchronize if cuda else (lambda: None)
if cuda:
    torch.zeros(1, device=dev); sync(); torch.cuda.reset_peak_memory_stats()
start = time.perf_counter()
if kind == "dense":
    model = transformers.AutoModelForCausalLM.from_pretrained(dense, dtype=dtype, device_map=dev).eval()
else:
    model = load_compressed(compressed, device=dev, dtype=dtype, runtime=kind)
sync()
loaded = time.perf_counter() - start
end_alloc = torch.cuda.memory_allocated() if cuda else None
load_peak = torch.cuda.max_memory_allocated() if cuda else None
with torch.no_grad():
    model(torch.arange(1, 17, device=dev)[None])
sync()
total = time.perf_counter() - start
print(json.dumps({"load_s": loaded, "total_s": total, "cuda_peak_during_load": load_peak,
    "cuda_allocated_after_load": end_alloc, "cuda_peak_incl_forward": torch.cuda.max_memory_allocated() if cuda else None,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def section_load(args, dense, compressed, dtype, repeats, prewarm="0"):
    kinds = ["dense", "factorized", "merged"]
    rows = {k: [] for k in kinds}
    for _ in range(repeats):
        for kind in kinds:
            _, out, _ = timed_run([sys.executable, "-c", LOAD_CHILD, kind, str(dense), str(compressed), args.device, dtype, prewarm],
                                  timeout=max(30, left(args) - 30))  # fmt: skip
            rows[kind].append(json.loads(out.strip().splitlines()[-1]))
    anchor = statistics.median(r["total_s"] for r in rows["dense"])
    dense_peak = rows["dense"][0]["cuda_peak_during_load"]
    res = {"dtype": dtype, "device": args.device, "prewarm": prewarm, "repeats": repeats}
    for kind, runs in rows.items():
        med = statistics.median(r["total_s"] for r in runs)
        peak = runs[0]["cuda_peak_during_load"]
        res[kind] = {
            "total_s_median": med,
            "load_s_median": statistics.median(r["load_s"] for r in runs),
            "ratio_to_dense": med / anchor,
            "cuda_peak_during_load": peak,
            "cuda_allocated_after_load": runs[0]["cuda_allocated_after_load"],
            "peak_over_final": peak / runs[0]["cuda_allocated_after_load"] if peak else None,
            "peak_ratio_to_dense_peak": peak / dense_peak if peak else None,
            "peak_rss_mb_median": statistics.median(r["peak_rss_mb"] for r in runs),
            "runs": runs,
        }
        log(
            f"load {kind}: {med:.2f}s x{med / anchor:.2f}  cuda peak {peak} final {runs[0]['cuda_allocated_after_load']}"
        )
    return res
