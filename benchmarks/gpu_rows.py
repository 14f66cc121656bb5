# ruff: noqa: E501  (the argparse lines kept as they ran on the GPU)
"""GPU rows of issue 10, every figure with its anchor measured in the same run (BENCHMARKS.md section 7).

    PYTHONPATH=$PWD python3 benchmarks/gpu_rows.py --work /tmp/g --out OUT [--deadline 400]
    dry run on a CPU: ... --small --device cpu

Run on an H200 on 2026-11-26 against the issue-10 code (commit 2691fda, since merged unchanged in
these paths); its outputs are benchmarks/results/gpu/gpu_rows_run{1,2}.{json,log}.

The committed benchmarks (benchmarks/speed.py, benchmarks/svd_speed.py) hard-code the CPU, so this
script repeats their measurements with a device: models with random weights built from configs
(SmolLM2-135M's, inline in this file, and a Llama-3.2-1B-shaped one), saved in bfloat16.
Sections, in priority order, each skipped when the deadline is near; results are written to
gpu_results.json after every section:
  compress135  whole `svdlora compress` (fresh process) --device cuda at 0.5 and 0.8, and on the CPU at 0.5
  load135      fresh processes: dense from_pretrained(device_map=dev) vs load_compressed factorized / merged,
               time to the end of the first forward (16 tokens), CUDA context made before the clock starts;
               CUDA peak / end memory, peak RSS
  decode135    batch-1 greedy decode tok/s and prefill tok/s, bf16 and fp32, budgets 0.5 and 0.8
  svd          CPU exact vs GPU exact vs GPU randomized (truncated_svd), and factorize(device=...) end to end
  1b           compress on the GPU, load (+ merged peak memory), decode bf16 at 0.5, compress on the CPU
  decode1b     (added after the 2026-11-26 run; list it first to run it first) batch-1 greedy decode of the 1B,
               bf16, budget --variants-budget (0.5), four variants loaded in one process: dense (anchor),
               pivoted (`compress` default, `--pivot`), pairs (`--no-pivot`), merged (pivoted folder,
               runtime="merged"); the two folders are compressed at once (two processes, SVD on the GPU).
               (a) eager: generate() of --new-tokens after a full-length warm-up generate per model, and the
               512-token prefill, --eager-repeats (5) with the variant order rotated each repeat; medians,
               every repeat, ratios to dense. (b) compiled: a StaticCache and torch.compile of the decode
               step (forward + argmax; mode reduce-overhead = CUDA graphs on CUDA, inductor's default on a
               CPU), --compiled-tokens steps timed after an eager prefill, --compiled-repeats rotated; a
               variant whose compile fails is retried with dynamo's plain "cudagraphs" backend (and so are
               the variants after it; dense too, as the anchor of that backend), the error kept in the
               JSON. Recorded: the graph breaks dynamo finds in one PivotedLowRankLinear (0 expected), device,
               versions, layers kept factorized per variant, graph breaks, cudagraph skips, and whether
               each variant's greedy tokens match its eager generate().
               Variants compile in --compile-variants order, each only if --compile-reserve s plus 1.3x
               the longest compile so far are left.
  decode135v   the same for the 135M
  decode7b     the same for a Llama-2-7B-shaped model (6.7 B parameters, 13.5 GB in bf16)
The sections live in benchmarks/gpu_rows_sections/, one module per group; this file is the command line.
Every `svdlora compress` here runs with `--calibration none` (plain SVD: the weights are random) and an
explicit `--pivot` / `--no-pivot` (older sections: --layout, default pivot, the CLI default since the
2026-11-26 run, which wrote factor pairs).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gpu_rows_sections.compressing import compress, section_compress135  # noqa: E402
from benchmarks.gpu_rows_sections.decode import section_decode  # noqa: E402
from benchmarks.gpu_rows_sections.decode_variants import VARIANTS, section_decode_variants  # noqa: E402
from benchmarks.gpu_rows_sections.llama1b import section_1b  # noqa: E402
from benchmarks.gpu_rows_sections.load import section_load  # noqa: E402
from benchmarks.gpu_rows_sections.models import SMOLLM2_135M, build, configs  # noqa: E402
from benchmarks.gpu_rows_sections.state import RESULTS, T0, left, log, save  # noqa: E402
from benchmarks.gpu_rows_sections.svd import section_svd  # noqa: E402

__all__ = ["SMOLLM2_135M", "main"]  # SMOLLM2_135M: benchmarks/gpu_align.py builds its 7B shape from it

HERE = Path(__file__).resolve().parent


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--deadline", type=float, default=400)
    p.add_argument("--small", action="store_true")
    p.add_argument("--load-repeats", type=int, default=3)
    p.add_argument("--load-repeats-1b", type=int, default=2)
    p.add_argument("--decode-repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--prefill-inner", type=int, default=5)
    p.add_argument("--svd-repeats", type=int, default=2)
    p.add_argument("--svd-reserve", type=float, default=150, help="seconds to keep for the 1B section")
    p.add_argument("--no-1b-load", dest="load_1b", action="store_false")
    p.add_argument("--sections", default="compress135,load135,decode135,svd,1b")
    p.add_argument("--layout", choices=["pivot", "pairs"], default="pivot",
                   help="factor layout `compress` writes for the older sections (the CLI default is pivot)")  # fmt: skip
    p.add_argument("--variants-budget", type=float, default=0.5, help="decode1b / decode135v: compression budget")
    p.add_argument("--eager-repeats", type=int, default=5, help="decode1b / decode135v: eager repeats")
    p.add_argument("--compiled-tokens", type=int, default=128, help="decode1b / decode135v: compiled decode steps")
    p.add_argument("--compiled-repeats", type=int, default=7)
    p.add_argument("--compile-variants", default=",".join(VARIANTS),
                   help="decode1b / decode135v: variants to compile, in this order (each skipped when the deadline is near)")  # fmt: skip
    p.add_argument(
        "--compile-mode", default=None, help="default: reduce-overhead (CUDA graphs) on CUDA, default on a CPU"
    )
    p.add_argument("--compile-backend", choices=["auto", "inductor", "cudagraphs"], default="auto",
                   help="auto: inductor, and dynamo's plain cudagraphs backend where inductor fails")  # fmt: skip
    p.add_argument("--compile-reserve", type=float, default=40,
                   help="seconds that must be left to start compiling a variant (plus 1.3x the last compile)")  # fmt: skip
    return p.parse_args()


def environment(args) -> dict:
    """Where and with what the figures were measured: RESULTS["env"]."""
    import accelerate
    import safetensors
    import transformers

    import svdlora

    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "capability": torch.cuda.get_device_capability() if args.device.startswith("cuda") else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        "svdlora_file": svdlora.__file__,
        "svdlora_commit": (HERE / "COMMIT").read_text().strip() if (HERE / "COMMIT").exists() else None,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "small": args.small,
        "argv": sys.argv,
    }


def main():
    args = parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    RESULTS["env"] = environment(args)
    log(RESULTS["env"])
    save(args)
    cfgs = configs(args)
    sections = args.sections.split(",")
    dense135 = None
    for section in sections:
        if left(args) < 20:
            RESULTS[section] = {"skipped": "deadline"}
            continue
        log("==", section, f"{left(args):.0f}s left")
        try:
            if section == "compress135":
                dense135 = build("135m", cfgs["135m"], work, args.device)
                RESULTS[section] = section_compress135(args, work, dense135)
            elif section == "load135warm":
                dense135 = build("135m", cfgs["135m"], work, args.device)
                if not (work / "135m-0.5").exists():
                    RESULTS["compress135_for_load"] = compress(
                        dense135, work / "135m-0.5", 0.5, args.device, 120, pivot=args.layout == "pivot"
                    )
                RESULTS[section] = section_load(args, dense135, work / "135m-0.5", "bfloat16", args.load_repeats, "1")
            elif section == "load135":
                RESULTS[section] = section_load(args, dense135, work / "135m-0.5", "bfloat16", args.load_repeats)
            elif section == "decode135":
                comp = {0.5: work / "135m-0.5", 0.8: work / "135m-0.8"}
                RESULTS[section] = section_decode(args, dense135, comp, ["bfloat16", "float32"], args.decode_repeats,
                                                  args.new_tokens, args.prefill_tokens)  # fmt: skip
            elif section == "svd":
                RESULTS[section] = section_svd(args)
            elif section in ("decode1b", "decode135v", "decode7b"):
                key = {"decode1b": "1b", "decode135v": "135m", "decode7b": "7b"}[section]
                RESULTS[section] = section_decode_variants(args, work, cfgs[key], key, section)
            elif section == "1b":
                RESULTS[section] = section_1b(args, work, cfgs["1b"])
        except Exception as err:  # keep going: later sections are independent
            RESULTS[section] = {**RESULTS.get(section, {}), "error": repr(err), "traceback": traceback.format_exc()}
            log("FAILED", section, repr(err))
        save(args)
    RESULTS["elapsed_s"] = time.time() - T0
    save(args)
    log("done", f"{RESULTS['elapsed_s']:.0f}s")


if __name__ == "__main__":
    main()
