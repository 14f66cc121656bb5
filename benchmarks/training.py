"""Training-loop plumbing shared by the three benchmark trainers.

One loop (:func:`fit`) with: device choice, a wall-clock budget, AdamW, linear warmup then
cosine decay, gradient clipping, bf16 autocast where the hardware has it, tqdm progress, and
the ``train_log.json`` cache check. Each trainer only supplies its batches and its loss.

The cosine schedule is driven by *progress* = max(step / planned steps, elapsed / budget), so
the learning rate reaches its floor when either the epochs or the time budget run out. On a
shared CPU whose speed varies, a step-based schedule fitted to a budget would either stop with
a high learning rate or finish early; this one always anneals.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from benchmarks.common import DEFAULT_CACHE, machine_info

logger = logging.getLogger(__name__)

LOG_NAME = "train_log.json"


@dataclass
class FitConfig:
    """Optimisation settings for :func:`fit`."""

    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 200
    warmup_frac: float = 0.05  # warmup also ends once 5% of the steps or of the time budget is used
    min_lr_ratio: float = 0.02
    grad_clip: float = 1.0
    time_budget_min: float | None = None
    amp: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    no_decay: tuple[str, ...] = field(default=("bias", "norm", "embeddings"))


def add_common_args(parser: argparse.ArgumentParser, epochs: int, budget_min: float) -> None:
    """Flags every trainer shares."""
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=DEFAULT_CACHE,
        help="where data caches and the trained model folder go (default: %(default)s)",
    )
    parser.add_argument("--epochs", type=int, default=epochs, help="maximum epochs (default: %(default)s)")
    parser.add_argument(
        "--time-budget-min",
        type=float,
        default=budget_min,
        help="stop training after this many minutes of wall time; the learning rate "
        "schedule anneals to fit (default: %(default)s)",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="override the default batch size")
    parser.add_argument("--lr", type=float, default=None, help="override the default peak learning rate")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--no-amp", action="store_true", help="train in float32 even where bf16 autocast works")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: a few hundred examples, seconds; writes to <name>-quick"
    )
    parser.add_argument("--force", action="store_true", help="retrain even if a finished log exists")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="disable tqdm progress bars")


def setup(args: argparse.Namespace) -> torch.device:
    """Seed, thread count, logging; returns CUDA if available else CPU."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def output_dir(args: argparse.Namespace, name: str) -> Path:
    return Path(args.cache_dir) / (f"{name}-quick" if args.quick else name)


def finished_log(folder: Path) -> dict | None:
    """The training log of ``folder`` if a previous run finished there, else None."""
    path = Path(folder) / LOG_NAME
    if not path.is_file():
        return None
    log = json.loads(path.read_text())
    return log if log.get("finished") else None


def write_log(folder: Path, log: dict) -> Path:
    """Write ``train_log.json`` atomically, with the machine description attached."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOG_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": machine_info(), **log}, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def amp_context(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA or on CPUs with native bf16 (AMX / AVX512-BF16); else a no-op."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if enabled and device.type == "cpu" and _cpu_has_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    # Without native bf16, CPU autocast is emulated and slower than float32.
    return "amx_bf16" in flags or "avx512_bf16" in flags


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay: tuple[str, ...]) -> list[dict]:
    """Weight decay on matrices only, not on biases, norms or embeddings."""
    decay, keep = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lname = name.lower()
        (keep if p.ndim < 2 or any(k in lname for k in no_decay) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


class Schedule:
    """Linear warmup, then cosine decay over progress = max(step fraction, time fraction).

    Warmup lasts ``warmup_steps`` or ``warmup_frac`` of the progress, whichever ends first.
    """

    def __init__(self, cfg: FitConfig, total_steps: int):
        self.cfg = cfg
        self.total_steps = max(total_steps, 1)
        self.budget_s = cfg.time_budget_min * 60 if cfg.time_budget_min else None
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def progress(self, step: int) -> float:
        p = step / self.total_steps
        if self.budget_s:
            p = max(p, self.elapsed() / self.budget_s)
        return min(p, 1.0)

    def factor(self, step: int) -> float:
        # Under a tight time budget a fixed warmup could eat most of the run; cap it.
        by_steps = (step + 1) / max(self.cfg.warmup_steps, 1)
        by_progress = self.progress(step) / self.cfg.warmup_frac if self.cfg.warmup_frac else 0.0
        warm = min(1.0, max(by_steps, by_progress))
        cos = 0.5 * (1 + math.cos(math.pi * self.progress(step)))
        return min(warm, self.cfg.min_lr_ratio + (1 - self.cfg.min_lr_ratio) * cos)


def fit(
    model: torch.nn.Module,
    batches: Callable[[int], Iterable],
    loss_fn: Callable[[torch.nn.Module, object], torch.Tensor],
    steps_per_epoch: int,
    cfg: FitConfig,
    device: torch.device,
    desc: str = "train",
    progress: bool = True,
) -> dict:
    """Train ``model`` in place and return a summary for the training log.

    Args:
        batches: ``batches(epoch)`` yields the batches of one epoch (already shuffled).
        loss_fn: ``loss_fn(model, batch)`` returns the scalar loss; it runs under autocast.
        steps_per_epoch: used to plan the schedule and size the progress bar.

    Returns:
        A dict with epochs (completed, fractional), steps, wall time, the stop reason,
        per-epoch mean training loss and the settings used.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}: too little data for one batch")
    model.to(device).train()
    opt = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, cfg.no_decay),
        lr=cfg.lr,
        betas=cfg.betas,
        fused=device.type == "cuda",
    )
    sched = Schedule(cfg, cfg.epochs * steps_per_epoch)
    load_start = os.getloadavg()[0]  # other jobs on a shared CPU slow training; record how busy it was
    step, stop, epoch_losses = 0, "epochs", []
    amp_on = cfg.amp and (device.type == "cuda" or _cpu_has_bf16())
    for epoch in range(cfg.epochs):
        total, count = 0.0, 0
        bar = tqdm(
            batches(epoch),
            total=steps_per_epoch,
            desc=f"{desc} {epoch + 1}/{cfg.epochs}",
            disable=not progress,
            mininterval=5,
        )
        for batch in bar:
            f = sched.factor(step)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * f
            with amp_context(device, cfg.amp):
                loss = loss_fn(model, batch)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            total, count = total + loss.item(), count + 1
            if step % 20 == 0:
                bar.set_postfix(loss=f"{total / count:.3f}", lr=f"{cfg.lr * f:.2e}")
            if sched.budget_s and sched.elapsed() >= sched.budget_s:
                stop = "time budget"
                break
        bar.close()
        epoch_losses.append(round(total / max(count, 1), 4))
        logger.info("epoch %d: train loss %.4f, %d steps, %.0f s", epoch + 1, epoch_losses[-1], step, sched.elapsed())
        if stop != "epochs":
            break
    wall = sched.elapsed()
    model.eval()
    return {
        "epochs_completed": round(step / steps_per_epoch, 3),
        "epochs_planned": cfg.epochs,
        "steps": step,
        "steps_per_epoch": steps_per_epoch,
        "train_wall_s": round(wall, 1),
        "steps_per_s": round(step / wall, 3) if wall else None,
        "stop_reason": stop,
        "epoch_train_loss": epoch_losses,
        "bf16_autocast": amp_on,
        "load_average_1m": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
        "optimizer": {k: v for k, v in asdict(cfg).items() if k != "no_decay"} | {"name": "AdamW"},
    }
