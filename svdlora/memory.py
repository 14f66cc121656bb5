"""How much memory this process may still use, and how much an in-memory compress needs, before
anything is loaded.

An in-memory compress holds the model and then its factors beside it: the peak measured on
SmolLM2-135M (540 MB float32, budget 0.5) was 1,182 MB, the process's 370 MB of libraries plus the
model plus the factors (BENCHMARKS.md, *Scale and speed*). A checkpoint that does not fit would end
in the kernel's OOM kill after a long load, so the CLI streams it instead where that writes the
same files, and otherwise says what to do before loading anything.
"""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path

import psutil
import torch

from .errors import SvdloraError
from .io.checkpoint import DTYPES, is_floating, read_header, weight_files
from .models import parse_dtype
from .plan import output_gram_bytes

_UNLIMITED = 2**60  # cgroup v1 writes "no limit" as about 2**63
# (mount, limit file, usage file, the reclaimable page cache's key in memory.stat): cgroup v2, then v1
CGROUPS = [
    (Path("/sys/fs/cgroup"), "memory.max", "memory.current", "inactive_file"),
    (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
]
PROC_CGROUP = Path("/proc/self/cgroup")
# Address space a model load maps after the check (transformers' model code, its libraries): in a
# one-off measurement, loading SmolLM2-135M grew a process's address space by 440 MB beyond the
# model's 538 MB.
LIBRARIES = 512 << 20


def limits(with_swap: bool = False) -> dict[str, int]:
    """What each known limit leaves this process, in bytes: "available memory" (the system's, with its
    free swap if ``with_swap``), "the memory cgroup" (its limit less its usage, reclaimable page cache
    not counted as used) and "ulimit -v" (the address space left)."""
    system = psutil.virtual_memory().available + (psutil.swap_memory().free if with_swap else 0)
    rooms = {"available memory": system, "the memory cgroup": _cgroup_room(), "ulimit -v": _address_space_room()}
    return {name: max(room, 0) for name, room in rooms.items() if room is not None}


def shortfall(
    model_bytes: int, budget: float | None, factors: bool = True, with_swap: bool = False, extra: int = 0
) -> tuple[str, int, int] | None:
    """(limit, need, room) for the first limit an in-memory compress of a ``model_bytes`` checkpoint
    would pass, else None. The need is the model and, with ``factors``, its factors (at most the
    model's size where a fixed rank, not a budget, sets them) and ``extra`` (calibration statistics);
    under ``ulimit -v`` also the mapped checkpoint file and the libraries a load maps, which count
    there in full."""
    need = model_bytes
    if factors:
        need += int(model_bytes * (budget if budget is not None else 1.0)) + extra
    for limit, room in limits(with_swap).items():
        total = need + (model_bytes + LIBRARIES if limit == "ulimit -v" else 0)
        if total > room:
            return limit, total, room
    return None


def checkpoint_bytes(folder: str | Path, dtype: str | torch.dtype | None = None) -> int | None:
    """Bytes of a local safetensors checkpoint's tensors once loaded: floating ones in ``dtype``, by
    default the dtype of its config.json (what the CLI loads it in), else as stored; None where the
    folder is not one (a hub id, .bin weights)."""
    if not Path(folder).is_dir():
        return None
    counts: dict[str, int] = {}
    try:
        for file in weight_files(Path(folder)):
            for name, shape, _ in read_header(file)[0].values():
                counts[name] = counts.get(name, 0) + math.prod(shape)
    except (SvdloraError, OSError, ValueError, KeyError):
        return None
    return loaded_bytes(counts, load_dtype(dtype, Path(folder)))


def loaded_bytes(counts: dict[str, int], dtype: torch.dtype | None) -> int | None:
    """Bytes of tensors once loaded, from their element counts per safetensors dtype: floating ones
    in ``dtype`` (None: as stored). None where a dtype is not a safetensors one."""
    if not set(counts) <= DTYPES.keys():
        return None
    bits = {
        name: dtype.itemsize * 8 if dtype is not None and is_floating(name) else DTYPES[name].bits for name in counts
    }
    return sum(count * bits[name] // 8 for name, count in counts.items())


def load_dtype(dtype: str | torch.dtype | None, folder: Path) -> torch.dtype | None:
    """The dtype the CLI loads a checkpoint in: ``dtype``, else the one its config.json names, if any."""
    if dtype is not None:
        return parse_dtype(dtype)
    try:
        config = json.loads((folder / "config.json").read_text())
        return parse_dtype(config.get("dtype") or config.get("torch_dtype"))
    except (OSError, ValueError, AttributeError, SvdloraError):
        return None


def statistics_bytes(targets, method: str) -> int:
    """The calibration statistics an in-memory run holds at once: the float64 Gram of every distinct
    input (layers that share an input, such as q/k/v, share its Gram: counted once per parent module
    and width) and, for kfac, each layer's float64 output Gram. A lower bound where the data reaches
    every target; where it reaches only some (a vision-language model calibrated on text: its vision
    tower sees none), the unreached targets' Grams are counted all the same, so it can be more."""
    inputs = {(t.name.rpartition(".")[0], t.in_features) for t in targets}
    return sum(8 * n * n for _, n in inputs) + (output_gram_bytes(targets) if method == "kfac" else 0)


def size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _cgroup_room() -> int | None:
    """The memory cgroup's limit less its usage, the tightest over the process's cgroup and its
    ancestors (cgroup v2, else v1); None where no limit is set or readable."""
    for base, limit_file, usage_file, cache_key in CGROUPS:
        rooms = []
        for folder in _cgroup_folders(base):
            limit, usage = _read_int(folder / limit_file), _read_int(folder / usage_file)
            if limit is None or usage is None or limit >= _UNLIMITED:
                continue
            rooms.append(limit - max(usage - _stat(folder / "memory.stat", cache_key), 0))
        if rooms:
            return min(rooms)
    return None


def _cgroup_folders(base: Path) -> list[Path]:
    """The process's own cgroup folder under ``base`` (from /proc/self/cgroup) and its ancestors."""
    if not base.is_dir():
        return []
    relative = ""
    try:
        for line in PROC_CGROUP.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if (controllers == "" and base.name != "memory") or "memory" in controllers.split(","):
                relative = path.lstrip("/")
                break
    except (OSError, ValueError):
        pass
    folder, folders = base / relative, []
    while True:
        if folder.is_dir():
            folders.append(folder)
        if folder == base or base not in folder.parents:
            break
        folder = folder.parent
    return folders


def _address_space_room() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    return soft - psutil.Process().memory_info().vms


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return _UNLIMITED if text == "max" else int(text) if text.isdigit() else None


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0
