"""Timing, peak memory, parameter and byte counts of one evaluation.

Peak memory, as reported in ``peak_memory_bytes``:

* CUDA: the model's parameter and buffer bytes plus how far ``torch.cuda.max_memory_allocated``
  rose above ``memory_allocated`` at the start of the evaluation (the peak reset with the model
  already on the device): the weights plus the largest activations / beam caches / logits held
  at once (tensors only, not the caching allocator's reserve or the CUDA context). Not the raw
  peak: that also counts whatever else lives on the device, such as the other model of an
  ``evaluate`` call passed in memory, which stays there while its partner is measured.
* CPU (Linux): the model's resident parameter and buffer bytes plus how far the process's
  resident set rose above its level at the start of the evaluation. The high-water mark is
  reset through ``/proc/self/clear_refs`` and read from ``VmHWM`` in ``/proc/self/status``, so
  it catches short spikes a sampling thread would miss. Freed memory is handed back to the OS
  first (``gc`` + glibc ``malloc_trim``) so a second model in the same run is not measured
  against memory the first one left behind.
* CPU elsewhere: the same, with ``resource.getrusage().ru_maxrss`` (a lifetime high-water
  mark that cannot be reset), so the rise is a lower bound once an earlier peak was higher.
"""

from __future__ import annotations

import ctypes
import gc
import re
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..compress import count_parameters

__all__ = [
    "PeakMemory",
    "TaskRun",
    "count_parameters",
    "disk_bytes",
    "model_device",
    "model_dtype",
    "model_memory_bytes",
    "sync",
    "timed",
]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class TaskRun:
    """What one task evaluator measured for one model."""

    metrics: dict  # the task's figures (see the schema in svdlora.evaluation)
    examples: int  # windows / images / sentences evaluated
    units: int  # what throughput counts: tokens fed / images / sentences
    unit: str  # "tokens/s", "images/s" or "sentences/s"
    model_seconds: float  # time inside forward / generate calls, device work included
    settings: dict = field(default_factory=dict)  # resolved task settings (e.g. max_length)


def model_device(model: nn.Module) -> torch.device:
    """Where the model's first tensor lives (CPU for a model without any)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 when it has none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def sync(device: torch.device) -> None:
    """Wait for queued kernels so wall-clock timings cover the work, not just its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(device: torch.device, clock: list[float]):
    """Add the seconds the block took (device work included) to ``clock[0]``."""
    sync(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        sync(device)
        clock[0] += time.perf_counter() - start


def model_memory_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights).
    A tensor subclass without a storage of its own (a quantization library's packed weight) counts
    the plain tensors it holds."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        for part in _plain_tensors(tensor):
            if part.device.type == "meta":
                continue
            key = (part.untyped_storage().data_ptr(), part.device)
            if key not in seen:
                seen.add(key)
                total += part.untyped_storage().nbytes()
    return total


def _plain_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    try:
        tensor.untyped_storage().data_ptr()
        return [tensor]
    except (RuntimeError, NotImplementedError):  # a wrapper subclass: its inner tensors hold the bytes
        inner = getattr(tensor, "__tensor_flatten__", None)
        names = inner()[0] if inner else [k for k, v in vars(tensor).items() if isinstance(v, torch.Tensor)]
        return [p for name in names for p in _plain_tensors(getattr(tensor, name))]


def disk_bytes(name_or_path: str | Path) -> int | None:
    """Bytes of the weight files of a local model folder (compressed or dense); None otherwise."""
    from ..models import folder_bytes

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return folder_bytes(path)
    try:  # a hub id already in the local cache
        from huggingface_hub import snapshot_download

        return folder_bytes(snapshot_download(str(name_or_path), local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure just means "size unknown"
        return None


def _read_status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _release_freed_memory() -> None:
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


class PeakMemory:
    """``with PeakMemory(device, model) as peak: ...`` then ``peak.bytes`` and ``peak.method``."""

    def __init__(self, device: torch.device, model: nn.Module) -> None:
        self.device = device
        self.model_bytes = model_memory_bytes(model)
        self.bytes = 0
        self.method = ""

    def __enter__(self) -> PeakMemory:
        _release_freed_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start_bytes = torch.cuda.memory_allocated(self.device)
            self.method = "cuda model bytes + max_memory_allocated rise"
            return self
        self._proc = False
        try:
            _CLEAR_REFS.write_text("5")  # "5" resets VmHWM to the current RSS
            self._start_kib = _read_status_kib("VmRSS")
            self._proc = self._start_kib is not None
        except OSError:
            pass
        if self._proc:
            self.method = "cpu model bytes + rss high-water rise (/proc VmHWM)"
        else:
            self._start_kib = _maxrss_kib()
            self.method = "cpu model bytes + ru_maxrss rise (lower bound)"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            rise = max(0, torch.cuda.max_memory_allocated(self.device) - self._start_bytes)
            self.bytes = self.model_bytes + int(rise)
            return
        end_kib = _read_status_kib("VmHWM") if self._proc else _maxrss_kib()
        rise = max(0, (end_kib or 0) - (self._start_kib or 0)) * 1024
        self.bytes = self.model_bytes + rise


def _maxrss_kib() -> int:
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value // 1024 if sys.platform == "darwin" else value  # macOS reports bytes
