# ruff: noqa: E501, B023, F821  (kept as it ran on the GPU; the lambdas are called at once, inside their loop)
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
Every `svdlora compress` here runs with `--calibration none` (plain SVD: the weights are random) and an
explicit `--pivot` / `--no-pivot` (older sections: --layout, default pivot, the CLI default since the
2026-11-26 run, which wrote factor pairs).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import peak_rss_mb, timed_run  # noqa: E402
from benchmarks.decoding import CompiledDecoder, sync  # noqa: E402

HERE = Path(__file__).resolve().parent
T0 = time.time()
RESULTS: dict = {}

# SmolLM2-135M's config.json (HuggingFaceTB/SmolLM2-135M), inline so that the script needs no hub access
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 576,
    "initializer_range": 0.02,
    "intermediate_size": 1536,
    "max_position_embeddings": 8192,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 9,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
    "pad_token_id": 2,
    "pretraining_tp": 1,
    "rms_norm_eps": 9.999999747378752e-06,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    "tie_word_embeddings": True,
    "unk_token_id": 0,
    "use_cache": True,
    "vocab_size": 49152,
}

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


def left(args) -> float:
    return args.deadline - (time.time() - T0)


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def save(args):
    Path(args.out, "gpu_results.json").write_text(json.dumps(RESULTS, indent=2, default=str))


def run(cmd, timeout):
    return timed_run(cmd, timeout=timeout)


def configs(args) -> dict:
    base = {**SMOLLM2_135M, "dtype": "bfloat16"}
    big = {
        **base,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
    }
    llama7b = {  # Llama-2-7B's shape: large enough matrices that batch-1 decode reads weights, not launches
        **base,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": 128,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    }
    if args.small:  # dry run: same architecture, tiny sizes
        base.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, vocab_size=512)  # fmt: skip
        big.update(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=24, vocab_size=640)  # fmt: skip
        llama7b.update(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, head_dim=32, vocab_size=640)  # fmt: skip
    return {"135m": base, "1b": big, "7b": llama7b}


def build(name, cfg, work: Path, dev) -> Path:
    import transformers

    folder = work / f"{name}-dense"
    if folder.exists():
        return folder
    config = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures",)})
    torch.manual_seed(0)
    with torch.device(dev):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    del model
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
    log(f"built {name}: {n / 1e6:.1f} M parameters -> {folder}")
    RESULTS.setdefault("models", {})[name] = {"parameters": n, "config": cfg, "bytes_on_disk": sum(
        f.stat().st_size for f in folder.glob("*.safetensors"))}  # fmt: skip
    return folder


def compress_cmd(dense: Path, out: Path, budget, svd_device, pivot: bool) -> list[str]:
    """`svdlora compress` with plain SVD (random weights: calibration means nothing) and an explicit layout."""
    cmd = [sys.executable, "-m", "svdlora", "compress", str(dense), "-o", str(out), "--budget", str(budget),
           "--calibration", "none", "--pivot" if pivot else "--no-pivot", "--no-progress"]  # fmt: skip
    if svd_device:
        cmd += ["--device", svd_device]
    return cmd


def compress_row(cmd, seconds, err) -> dict:
    return {"cmd": " ".join(cmd[1:]), "wall_s": seconds, "peak_rss_mb": peak_rss_mb(err),
            "svd_fallbacks_logged": err.count("failed (")}  # fmt: skip


def compress(dense: Path, out: Path, budget, svd_device, timeout, pivot: bool = True) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = compress_cmd(dense, out, budget, svd_device, pivot)
    seconds, _, err = run(cmd, timeout)
    return {**compress_row(cmd, seconds, err), "layout": "pivoted" if pivot else "pairs"}


def compress_parallel(jobs: dict, timeout) -> dict:
    """Several `svdlora compress` processes at once ({name: (cmd, out)}); a folder whose marker file
    holds the same command (an earlier call on a warm machine) is reused."""
    rows, procs = {}, {}
    for name, (cmd, out) in jobs.items():
        marker = out.with_name(out.name + ".done")
        if marker.exists() and marker.read_text() == " ".join(cmd[1:]) and (out / "config.json").exists():
            rows[name] = {"cmd": " ".join(cmd[1:]), "reused": str(out)}
            continue
        shutil.rmtree(out, ignore_errors=True)
        marker.unlink(missing_ok=True)
        log_file = out.with_name(out.name + ".stderr")
        with open(log_file, "w") as fh:  # a file, not a pipe: a full pipe would stall a process not read yet
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=fh, text=True)
        procs[name] = (proc, time.perf_counter(), cmd, out, log_file)
    for name, (proc, start, cmd, out, log_file) in procs.items():
        try:
            proc.wait(timeout=max(5, timeout - (time.perf_counter() - start)))
        except subprocess.TimeoutExpired:
            for other, *_ in procs.values():
                other.kill()
            raise
        err = log_file.read_text()
        if proc.returncode:
            raise RuntimeError(f"{cmd[:5]} exit {proc.returncode}: {err[-1500:]}")
        rows[name] = {
            **compress_row(cmd, time.perf_counter() - start, err),
            "parallel_with": sorted(set(procs) - {name}),
        }
        out.with_name(out.name + ".done").write_text(" ".join(cmd[1:]))
    return rows


def section_compress135(args, work, dense):
    rows = {}
    order = [("gpu", 0.5, args.device), ("cpu", 0.5, None), ("gpu", 0.8, args.device)]
    for where, budget, svd_dev in order:
        out = work / f"135m-{budget}" if where == "gpu" else work / "135m-cpu-0.5"
        rows[f"{where} budget {budget}"] = r = compress(
            dense, out, budget, svd_dev, timeout=max(20, left(args) - 60), pivot=args.layout == "pivot"
        )
        log("compress 135m", where, budget, f"{r['wall_s']:.1f}s", r["peak_rss_mb"], "MB")
    rows["ratio gpu/cpu at 0.5"] = rows["gpu budget 0.5"]["wall_s"] / rows["cpu budget 0.5"]["wall_s"]
    shutil.rmtree(work / "135m-cpu-0.5", ignore_errors=True)
    return rows


def section_load(args, dense, compressed, dtype, repeats, prewarm="0"):
    kinds = ["dense", "factorized", "merged"]
    rows = {k: [] for k in kinds}
    for _ in range(repeats):
        for kind in kinds:
            _, out, _ = run([sys.executable, "-c", LOAD_CHILD, kind, str(dense), str(compressed), args.device, dtype, prewarm],
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


def section_decode(args, dense, compressed: dict, dtypes, repeats, new_tokens, prefill_tokens):
    import transformers

    from svdlora import load_compressed
    from svdlora.layers import LowRankLinear

    dev = args.device
    res = {}
    prompt = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 89]], device=dev) % 500
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        dense_model = transformers.AutoModelForCausalLM.from_pretrained(dense, dtype=dtype, device_map=dev).eval()
        vocab = dense_model.config.vocab_size
        long_prompt = torch.randint(1, vocab, (1, prefill_tokens), generator=torch.Generator().manual_seed(0)).to(dev)
        for budget, folder in compressed.items():
            models = {
                "dense": dense_model,
                "factorized": load_compressed(folder, device=dev, dtype=dtype, runtime="factorized"),
                "merged": load_compressed(folder, device=dev, dtype=dtype, runtime="merged"),
                "auto": load_compressed(folder, device=dev, dtype=dtype, runtime="auto"),
            }
            kept = sum(isinstance(m, LowRankLinear) for m in models["auto"].modules())
            total = sum(isinstance(m, LowRankLinear) for m in models["factorized"].modules())
            rates = {k: [] for k in models}
            prefill = {k: [] for k in models}
            with torch.no_grad():
                for model in models.values():  # warm-up: kernels, cuBLAS handles, caches
                    model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
                    model(long_prompt)
                for _ in range(repeats):
                    for name, model in models.items():
                        sync(dev)
                        start = time.perf_counter()
                        for _ in range(args.prefill_inner):
                            model(long_prompt)
                        sync(dev)
                        prefill[name].append(prefill_tokens * args.prefill_inner / (time.perf_counter() - start))
                        start = time.perf_counter()
                        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                       pad_token_id=0)  # fmt: skip
                        sync(dev)
                        rates[name].append(new_tokens / (time.perf_counter() - start))
            d, dp = statistics.median(rates["dense"]), statistics.median(prefill["dense"])
            rows = {
                k: {
                    "decode_tok_s": statistics.median(v),
                    "decode_ratio_to_dense": statistics.median(v) / d,
                    "prefill_tok_s": statistics.median(prefill[k]),
                    "prefill_ratio_to_dense": statistics.median(prefill[k]) / dp,
                    "decode_all": v,
                    "prefill_all": prefill[k],
                }
                for k, v in rates.items()
            }
            rows["auto"]["layers_kept_factorized"] = f"{kept}/{total}"
            res[f"{dtype_name} budget {budget}"] = rows
            log(f"decode {dtype_name} {budget}: " + ", ".join(
                f"{k} {r['decode_tok_s']:.0f} tok/s x{r['decode_ratio_to_dense']:.2f} prefill x{r['prefill_ratio_to_dense']:.2f}"
                for k, r in rows.items()) + f"; auto kept {kept}/{total}")  # fmt: skip
            for k in ("factorized", "merged", "auto"):
                del models[k]
            del models
            if dev.startswith("cuda"):
                torch.cuda.empty_cache()
        del dense_model
    res["settings"] = {"new_tokens": new_tokens, "prefill_tokens": prefill_tokens, "prefill_inner": args.prefill_inner,
                       "repeats": repeats, "prompt_tokens": prompt.shape[1]}  # fmt: skip
    return res


def section_svd(args):
    from svdlora.decompose import _lapack_svd, choose_method, factorize, rank_for_budget, relative_error, truncated_svd

    dev = args.device
    shapes = [(768, 3072), (2048, 8192), (4096, 4096)] if not args.small else [(48, 192), (128, 512), (256, 256)]
    warnings = []

    class Catch(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    logging.getLogger("svdlora").addHandler(Catch(level=logging.WARNING))

    def timed(fn, where):
        sync(where)
        start = time.perf_counter()
        out = fn()
        sync(where)
        return time.perf_counter() - start, out

    truncated_svd(torch.randn(300, 200, device=dev), 50, method="exact")  # solver warm-up
    truncated_svd(torch.randn(300, 200, device=dev), 20, method="randomized", generator_seed=0)
    rows = []
    for m, n in shapes:
        if left(args) < args.svd_reserve:
            rows.append({"shape": [m, n], "skipped": "deadline"})
            continue
        torch.manual_seed(0)
        w = torch.randn(m, n)
        k = rank_for_budget(m, n, 0.5)
        wg = w.to(dev)
        t_cpu, (a, b) = timed(lambda: truncated_svd(w, k, method="exact"), "cpu")
        err_cpu = relative_error(w, (a, b))
        t_ex = []
        for _ in range(args.svd_repeats):
            t, (a, b) = timed(lambda: truncated_svd(wg, k, method="exact"), dev)
            t_ex.append(t)
        err_ex = relative_error(wg, (a, b))
        t_lap = []  # the exact route before the Gram eigensolver: the device's SVD (cuSOLVER), truncated
        for _ in range(args.svd_repeats):
            t, (u, s, vh) = timed(lambda: _lapack_svd(wg, k), dev)
            t_lap.append(t)
        err_lap = relative_error(wg, (u * s, vh))
        t_rd = []
        for _ in range(args.svd_repeats):
            t, (a, b) = timed(lambda: truncated_svd(wg, k, method="randomized", generator_seed=0), dev)
            t_rd.append(t)
        err_rd = relative_error(wg, (a, b))
        # end to end as `compress` runs it: CPU weight in, factors back on the CPU, errors computed
        t_fac_cpu, f_cpu = timed(lambda: factorize(w, [k], method="exact"), "cpu")
        t_fac_gpu, f_gpu = timed(lambda: factorize(w, [k], method="exact", device=dev), dev)
        t_fac_auto, f_auto = timed(lambda: factorize(w, [k], method="auto", device=dev), dev)
        ex, rd = min(t_ex), min(t_rd)
        row = {
            "shape": [m, n],
            "rank": k,
            "auto_picks": choose_method((m, n), k),
            "seconds": {
                "cpu_exact": t_cpu,
                "gpu_exact_min": ex,
                "gpu_exact_all": t_ex,
                "gpu_svd_min": min(t_lap),
                "gpu_svd_all": t_lap,
                "gpu_randomized_min": rd,
                "gpu_randomized_all": t_rd,
                "factorize_cpu_exact": t_fac_cpu,
                "factorize_gpu_exact": t_fac_gpu,
                "factorize_gpu_auto": t_fac_auto,
            },  # fmt: skip
            "rel_error": {
                "cpu_exact": err_cpu,
                "gpu_exact": err_ex,
                "gpu_svd": err_lap,
                "gpu_randomized": err_rd,
                "factorize_cpu_exact": f_cpu.rel_error,
                "factorize_gpu_exact": f_gpu.rel_error,
                "factorize_gpu_auto": f_auto.rel_error,
                "factorize_gpu_auto_method": f_auto.method,
            },  # fmt: skip
            "speedup_gpu_exact_vs_cpu_exact": t_cpu / ex,
            "speedup_gpu_exact_vs_gpu_svd": min(t_lap) / ex,
            "speedup_gpu_randomized_vs_cpu_exact": t_cpu / rd,
            "speedup_gpu_randomized_vs_gpu_exact": ex / rd,
            "error_increase_randomized": err_rd / err_ex - 1,
            "speedup_factorize_gpu_exact_vs_cpu": t_fac_cpu / t_fac_gpu,
            "speedup_factorize_gpu_auto_vs_cpu_exact": t_fac_cpu / t_fac_auto,
        }
        rows.append(row)
        log(f"svd {m}x{n} r{k}: cpu {t_cpu:.3f}s gpu exact {ex:.3f}s (x{t_cpu / ex:.1f}; gpu svd {min(t_lap):.3f}s) gpu rand {rd:.3f}s "
            f"(x{ex / rd:.1f} vs gpu exact, err {err_rd / err_ex - 1:+.1%}); factorize cpu {t_fac_cpu:.2f}s "
            f"gpu {t_fac_gpu:.2f}s auto {t_fac_auto:.2f}s")  # fmt: skip
        del wg
    return {"rows": rows, "svdlora_warnings": warnings, "cpu_threads": torch.get_num_threads(),
            "linalg_library": torch.backends.cuda.preferred_linalg_library().name if dev.startswith("cuda") else None}  # fmt: skip


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


VARIANTS = ("dense", "pivoted", "pairs", "merged")


def rotated(names, r):
    """The variant order of repeat r: rotated by one each repeat, so no variant always runs first."""
    names = list(names)
    return names[r % len(names) :] + names[: r % len(names)]


def stats(values, anchor=None) -> dict:
    med = statistics.median(values)
    row = {"median": med, "min": min(values), "max": max(values), "all": values}
    if anchor:
        row["ratio_to_dense"] = med / anchor
    return row


def layer_counts(model) -> dict:
    from torch import nn

    from svdlora.layers import LowRankLinear
    from svdlora.pivoted import PivotedLowRankLinear

    mods = list(model.modules())
    return {
        "factorized_layers": sum(isinstance(m, LowRankLinear) for m in mods),
        "pivoted_layers": sum(isinstance(m, PivotedLowRankLinear) for m in mods),
        "dense_linear_layers": sum(isinstance(m, nn.Linear) for m in mods),
        "parameters": sum(p.numel() for p in model.parameters()),
        "weight_bytes": sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]),
    }


def pivot_graph_breaks(model) -> dict:
    """Graph breaks dynamo reports for one PivotedLowRankLinear (trace only, no code generation): 0 expected."""
    from svdlora.pivoted import PivotedLowRankLinear

    layer = next((m for m in model.modules() if isinstance(m, PivotedLowRankLinear)), None)
    if layer is None:
        return {"skipped": "no pivoted layer"}
    x = torch.randn(1, 1, layer.in_features, device=layer.B.device, dtype=layer.B.dtype)
    with torch.no_grad():
        exp = torch._dynamo.explain(layer)(x)
    torch._dynamo.reset()
    return {"graph_count": exp.graph_count, "graph_break_count": exp.graph_break_count,
            "reasons": [str(r.reason).splitlines()[0][:200] for r in exp.break_reasons]}  # fmt: skip


CUDAGRAPH_MESSAGES: list[str] = []


class _Keep(logging.Handler):
    def emit(self, record):
        CUDAGRAPH_MESSAGES.append(record.getMessage()[:300])


def watch_cudagraph_skips():
    """Keep inductor's "skipping cudagraphs due to ..." warnings (an artifact logger, silent by default)."""
    for name in ("torch._inductor.cudagraph_utils.__cudagraphs", "torch._inductor.cudagraph_trees.__cudagraphs"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        if not any(isinstance(h, _Keep) for h in logger.handlers):
            logger.addHandler(_Keep(level=logging.WARNING))


def dynamo_counts() -> dict:
    from torch._dynamo.utils import counters

    return {
        "unique_graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
    }


def section_decode_variants(args, work, cfg, key, section):
    """Batch-1 greedy decode of dense / pivoted / pairs / merged at one budget, eager and compiled."""
    import transformers

    from svdlora import load_compressed

    res = RESULTS.setdefault(section, {})
    dev, dtype = args.device, torch.bfloat16
    budget = args.variants_budget
    res["settings"] = {"model": key, "dtype": "bfloat16", "budget": budget, "device": dev,
                       "device_name": RESULTS["env"]["device"], "torch": torch.__version__,
                       "transformers": transformers.__version__, "eager_repeats": args.eager_repeats,
                       "new_tokens_eager": args.new_tokens, "compiled_tokens": args.compiled_tokens,
                       "compiled_repeats": args.compiled_repeats, "prefill_tokens": args.prefill_tokens,
                       "prefill_inner": args.prefill_inner}  # fmt: skip
    dense = build(key, cfg, work, dev)
    folders = {"pivoted": work / f"{key}-{budget}-pivot", "pairs": work / f"{key}-{budget}-pairs"}
    svd_dev = dev if dev.startswith("cuda") else None
    jobs = {
        name: (compress_cmd(dense, out, budget, svd_dev, pivot=name == "pivoted"), out) for name, out in folders.items()
    }
    res["compress"] = compress_parallel(jobs, timeout=max(30, left(args) - 90))
    log(f"compress {key}: " + ", ".join(f"{k} {v['wall_s']:.1f}s" if "wall_s" in v else f"{k} reused"
                                        for k, v in res["compress"].items()))  # fmt: skip
    save(args)

    sync(dev)
    models = {"dense": transformers.AutoModelForCausalLM.from_pretrained(dense, dtype=dtype, device_map=dev).eval(),
              "pivoted": load_compressed(folders["pivoted"], device=dev, dtype=dtype, runtime="factorized"),
              "pairs": load_compressed(folders["pairs"], device=dev, dtype=dtype, runtime="factorized"),
              "merged": load_compressed(folders["pivoted"], device=dev, dtype=dtype, runtime="merged")}  # fmt: skip
    res["layers"] = {k: layer_counts(m) for k, m in models.items()}
    res["layers"]["merged"]["merged_from"] = "pivoted folder"
    if dev.startswith("cuda"):
        res["cuda_allocated_all_loaded"] = torch.cuda.memory_allocated()
    log(f"loaded {key}: " + ", ".join(f"{k} {v['factorized_layers']} factorized ({v['pivoted_layers']} pivoted), "
                                      f"{v['weight_bytes'] / 1e6:.0f} MB" for k, v in res["layers"].items()))  # fmt: skip

    vocab = models["dense"].config.vocab_size
    prompt = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 89]], device=dev) % min(500, vocab)
    long_prompt = torch.randint(1, vocab, (1, args.prefill_tokens), generator=torch.Generator().manual_seed(0)).to(dev)
    n = args.new_tokens

    def generate(model):
        return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    # (1) eager: transformers' generate (dynamic cache), warm-up = one full-length generate + one prefill per model
    eager_tokens = {}
    with torch.no_grad():
        for name, model in models.items():
            eager_tokens[name] = generate(model)[0, prompt.shape[1] :].tolist()
            model(long_prompt)
    sync(dev)
    rates, prefill = {k: [] for k in models}, {k: [] for k in models}
    for r in range(args.eager_repeats):
        if r >= 3 and left(args) < args.compile_reserve:
            res["eager_stopped"] = f"after {r} repeats: {left(args):.0f}s left"
            break
        for name in rotated(models, r):
            model = models[name]
            with torch.no_grad():
                sync(dev)
                start = time.perf_counter()
                for _ in range(args.prefill_inner):
                    model(long_prompt)
                sync(dev)
                prefill[name].append(args.prefill_tokens * args.prefill_inner / (time.perf_counter() - start))
                start = time.perf_counter()
                generate(model)
                sync(dev)
                rates[name].append(n / (time.perf_counter() - start))
    res["eager"] = {"what": f"generate() {n} new tokens after an {prompt.shape[1]}-token prompt, default dynamic cache, "
                            "tok/s = new tokens / wall (prefill of the prompt included); variant order rotated each repeat",
                    "order_of_repeat_0": list(models)}  # fmt: skip
    for name in models:
        res["eager"][name] = {"decode_tok_s": stats(rates[name], statistics.median(rates["dense"])),
                              "prefill_tok_s": stats(prefill[name], statistics.median(prefill["dense"])),
                              "greedy_tokens_match_dense": sum(a == b for a, b in zip(eager_tokens[name], eager_tokens["dense"], strict=True)) / n}  # fmt: skip
    log("eager " + ", ".join(f"{k} {v['decode_tok_s']['median']:.1f} tok/s x{v['decode_tok_s']['ratio_to_dense']:.2f} "
                             f"(prefill x{v['prefill_tok_s']['ratio_to_dense']:.2f})" for k, v in res["eager"].items()
                             if isinstance(v, dict) and "decode_tok_s" in v))  # fmt: skip
    save(args)

    # (2) compiled: static cache + torch.compile of the decode step (CUDA graphs on a GPU)
    cuda = dev.startswith("cuda")
    mode = args.compile_mode or ("reduce-overhead" if cuda else "default")
    # auto: inductor, else dynamo's "cudagraphs" backend (no code generation; on a CPU it runs the graph as is)
    backends = ["inductor", "cudagraphs"] if args.compile_backend == "auto" else [args.compile_backend]
    comp = res["compiled"] = {"what": f"StaticCache + torch.compile(step, mode={mode!r}) of forward+argmax, "
                                      f"{args.compiled_tokens} decode steps timed after an eager prefill of the "
                                      f"{prompt.shape[1]}-token prompt; tok/s = steps / their wall; order rotated",
                              "mode": mode, "backends_tried": backends}  # fmt: skip
    for attr in ("recompile_limit", "cache_size_limit"):  # one entry per model on the shared step code
        if hasattr(torch._dynamo.config, attr):
            setattr(torch._dynamo.config, attr, 64)
    try:
        comp["pivoted_one_layer_trace"] = pivot_graph_breaks(models["pivoted"])
    except Exception as err:
        comp["pivoted_one_layer_trace"] = {"error": repr(err)[:500]}
    watch_cudagraph_skips()
    first_message = len(CUDAGRAPH_MESSAGES)
    decoders, last_compile = {}, 0.0
    max_len = prompt.shape[1] + args.compiled_tokens + 1

    def try_compile(name, tries):
        """Compile variant ``name`` ("dense@cudagraphs": with that backend) with the first backend that works."""
        nonlocal last_compile
        row = comp.setdefault(name, {})
        base = name.split("@")[0]
        if base not in models:
            row["error"] = f"unknown variant {name!r}"
            return
        need = args.compile_reserve + 1.3 * last_compile
        if left(args) < need:
            row["skipped"] = f"deadline: {left(args):.0f}s left, {need:.0f}s wanted"
            log(f"compiled {name}: skipped, {left(args):.0f}s left")
            return
        for backend in tries:
            before = dynamo_counts()
            start = time.perf_counter()
            try:
                decoder = CompiledDecoder(models[base], max_len, mode, backend)
                first, tokens = decoder.decode(prompt, args.compiled_tokens, dev, keep=True)  # compiles
                second, _ = decoder.decode(prompt, args.compiled_tokens, dev)  # CUDA graph recorded / warmed
                third, _ = decoder.decode(prompt, args.compiled_tokens, dev)
            except Exception as err:
                row.setdefault("errors", {})[backend] = {"error": repr(err)[:1500], "after_s": time.perf_counter() - start,
                                                         "traceback_tail": traceback.format_exc()[-3000:]}  # fmt: skip
                log(f"compiled {name} ({backend}) FAILED after {time.perf_counter() - start:.0f}s: {repr(err)[:300]}")
                if backend == "inductor" and len(backends) > 1:  # most likely the toolchain: not again for the others
                    backends.remove("inductor")
                    comp["inductor_dropped_after"] = name
                continue  # no torch._dynamo.reset(): it would drop the variants already compiled
            seconds = time.perf_counter() - start
            last_compile = max(last_compile, seconds)  # merged reuses dense's graph: no guide for the next one
            after = dynamo_counts()
            k = min(n, args.compiled_tokens + 1)  # tokens[0] is the prefill's, as generate's first
            row.update({"backend": backend, "compile_and_warmup_s": seconds,
                        "warmup_runs_s": [first, second, third],
                        "new_graphs": after["unique_graphs"] - before["unique_graphs"],
                        "graph_breaks": after["graph_breaks"] - before["graph_breaks"],
                        "cudagraph_skips": after["cudagraph_skips"] - before["cudagraph_skips"],
                        # a graph reused from an earlier variant (merged: dense's) was judged when it was made
                        "cuda_graphs": (cuda and after["cudagraph_skips"] == before["cudagraph_skips"])
                        if after["unique_graphs"] > before["unique_graphs"] else "as the variant whose graph it reuses",
                        "greedy_tokens_match_eager": sum(a == b for a, b in zip(tokens[:k], eager_tokens[base][:k], strict=True)) / k})  # fmt: skip
            decoders[name] = decoder
            log(
                f"compiled {name} ({backend}): {seconds:.1f}s compile+warm-up, graphs {row['new_graphs']}, "
                f"breaks {row['graph_breaks']}, cudagraph skips {row['cudagraph_skips']}, "
                f"tokens match eager {row['greedy_tokens_match_eager']:.2f}"
            )
            break
        save(args)

    for name in [v for v in args.compile_variants.split(",") if v]:
        try_compile(name, list(backends))
    # ratios compare one backend: where a variant fell back to another one, dense is compiled with it too
    anchors = {comp[k]["backend"] for k in decoders if k.split("@")[0] == "dense"}
    for backend in sorted({comp[k]["backend"] for k in decoders} - anchors):
        try_compile(f"dense@{backend}", [backend])
    if decoders:
        times = {k: [] for k in decoders}
        for r in range(args.compiled_repeats):
            if r >= 3 and left(args) < 15:
                comp["stopped"] = f"after {r} repeats: {left(args):.0f}s left"
                break
            for name in rotated(decoders, r):
                seconds, _ = decoders[name].decode(prompt, args.compiled_tokens, dev)
                times[name].append(args.compiled_tokens / seconds)
        anchor = {comp[k]["backend"]: statistics.median(v) for k, v in times.items() if k.split("@")[0] == "dense"}
        for name, values in times.items():
            comp[name]["decode_tok_s"] = stats(values, anchor.get(comp[name]["backend"]))
            comp[name]["ms_per_token"] = 1000 / statistics.median(values)
        comp["order_of_repeat_0"] = list(decoders)
        log("compiled " + ", ".join(f"{k} {comp[k]['decode_tok_s']['median']:.0f} tok/s"
                                    + (f" x{comp[k]['decode_tok_s']['ratio_to_dense']:.2f}" if "ratio_to_dense" in comp[k]["decode_tok_s"] else "")
                                    for k in decoders))  # fmt: skip
    comp["cudagraph_messages"] = sorted(set(CUDAGRAPH_MESSAGES[first_message:]))
    del decoders, models
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
    return res


def main():
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
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    import accelerate
    import safetensors
    import transformers

    import svdlora

    RESULTS["env"] = {
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
