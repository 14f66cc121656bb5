"""`svdlora compress` in fresh processes, one at a time or several at once, and the compress135 section."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import peak_rss_mb, timed_run
from benchmarks.gpu_rows_sections.state import left, log


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
    seconds, _, err = timed_run(cmd, timeout=timeout)
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
