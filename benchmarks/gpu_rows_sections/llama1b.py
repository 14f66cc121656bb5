"""1b: compress on the device, load, decode bf16 at 0.5, compress on the CPU, for a Llama-3.2-1B-shaped model."""

from __future__ import annotations

import subprocess

from benchmarks.gpu_rows_sections.compressing import compress
from benchmarks.gpu_rows_sections.decode import section_decode
from benchmarks.gpu_rows_sections.load import section_load
from benchmarks.gpu_rows_sections.models import build
from benchmarks.gpu_rows_sections.state import RESULTS, left, log, save


def section_1b(args, work, cfg):
    res = RESULTS.setdefault("1b", {})
    dense = build("1b", cfg, work, args.device)
    out = work / "1b-0.5"
    res["compress_gpu"] = compress(
        dense, out, 0.5, args.device, timeout=max(30, left(args) - 60), pivot=args.layout == "pivot"
    )
    log(f"compress 1b gpu {res['compress_gpu']['wall_s']:.1f}s")
    save(args)
    if left(args) > 60 and args.load_1b:
        res["load"] = section_load(args, dense, out, "bfloat16", args.load_repeats_1b)
        save(args)
    if left(args) > 45:
        res["decode"] = section_decode(args, dense, {0.5: out}, ["bfloat16"], 2, args.new_tokens, args.prefill_tokens)
        save(args)
    room = left(args) - 15
    if room > 30:
        try:
            res["compress_cpu"] = compress(
                dense, work / "1b-cpu", 0.5, None, timeout=room, pivot=args.layout == "pivot"
            )
            res["compress_ratio_gpu_to_cpu"] = res["compress_gpu"]["wall_s"] / res["compress_cpu"]["wall_s"]
        except subprocess.TimeoutExpired:
            res["compress_cpu"] = {"did_not_finish_within_s": room}
        log("compress 1b cpu", res["compress_cpu"])
    else:
        res["compress_cpu"] = {"skipped": f"only {left(args):.0f}s left"}
    return res
