"""What every section shares: one clock for the deadline and the log, one results dict written after each step."""

from __future__ import annotations

import json
import time
from pathlib import Path

T0 = time.time()
RESULTS: dict = {}


def left(args) -> float:
    return args.deadline - (time.time() - T0)


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def save(args):
    Path(args.out, "gpu_results.json").write_text(json.dumps(RESULTS, indent=2, default=str))
