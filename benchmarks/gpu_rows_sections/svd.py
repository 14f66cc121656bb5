# ruff: noqa: E501, B023, F821  (kept as it ran on the GPU; the lambdas are called at once, inside their loop, before its `del wg`)
"""svd: truncated SVD on the CPU vs the device (exact, the device's own SVD, randomized), and factorize end to end."""

from __future__ import annotations

import logging
import time

import torch

from benchmarks.decoding import sync
from benchmarks.gpu_rows_sections.state import left, log


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
