"""Shared plumbing for the benchmark scripts: cache folder, result files, machine description."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import time
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import torch

DEFAULT_CACHE = Path(os.environ.get("SVDLORA_BENCH_CACHE", ".cache/benchmarks"))
DEFAULT_RESULTS = Path("benchmarks/results")


def smollm2_folder() -> Path:
    """Where scripts/fetch_smollm2.sh puts SmolLM2-135M: under $SVDLORA_HOME, default ~/.cache/svdlora."""
    return Path(os.environ.get("SVDLORA_HOME", Path.home() / ".cache" / "svdlora")) / "SmolLM2-135M"


def machine_info() -> dict:
    """What the figures were measured on; stored next to every result."""
    info = {
        "date": date.today().isoformat(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    return info


def timed_run(argv: list[str], env: dict | None = None, timeout: float | None = None) -> tuple[float, str, str]:
    """Run a command (a CLI process, usually); (wall seconds, stdout, stderr). A failure raises with
    the end of its stderr."""
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env or dict(os.environ), timeout=timeout)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(map(str, argv[:6]))} ... exit {done.returncode}:\n{done.stderr[-3000:]}")
    return seconds, done.stdout, done.stderr


def peak_rss_mb(stderr: str) -> float | None:
    """The "peak RSS N MB" the CLI (and the I/O-floor scripts) print, the process's ru_maxrss; the
    largest where several processes print one (torchrun)."""
    found = re.findall(r"peak RSS ([\d,]+) MB", stderr)
    return max(float(f.replace(",", "")) for f in found) if found else None


def write_results(name: str, data: dict, results_dir: Path = DEFAULT_RESULTS) -> Path:
    """Write ``<results_dir>/<name>.json`` with the machine description attached."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    payload = {"benchmark": name, "machine": machine_info(), **data}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


@contextmanager
def stopwatch():
    """``with stopwatch() as t: ...`` then ``t()`` gives the elapsed seconds."""
    start = time.perf_counter()
    end = None

    def elapsed() -> float:
        return (end or time.perf_counter()) - start

    try:
        yield elapsed
    finally:
        end = time.perf_counter()


def targeted_bits_per_weight(report) -> float:
    """Bits per weight of the matrices the budget covers, as stored (scales included): every factorized
    matrix, and those the allocator kept dense (in float32); an excluded head or embedding is not counted."""
    reasons = ("budget", "allocation")  # the allocators' reasons, as opposed to exclusion and the head
    allocated = [m for m in report.modules if m.factorized or any(r in (m.dense_reason or "") for r in reasons)]
    stored = sum(m.stored_bytes if m.factorized else 4 * m.params_before for m in allocated)
    return 8 * stored / sum(m.params_before for m in allocated)
