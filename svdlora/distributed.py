"""Which process does which matrix: torch.distributed under torchrun / accelerate launch.

The launcher sets RANK / WORLD_SIZE / MASTER_ADDR; the plain CLI detects them and splits
the work. The process group is gloo: the collectives here carry a folder name, the per-module
reports (small Python objects) and, for a calibrated run, one block's statistic sums at a time;
tensors on a GPU go through the CPU, so no GPU backend is needed.
"""

from __future__ import annotations

import heapq
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import SvdloraError, first_line
from .launcher import launched

# How long a process waits for the others at a collective: rank 0's download of a hub checkpoint, or the
# slowest process's share of the matrices, may take hours (torch's default gave up after 30 minutes). A
# process that stops is seen at once (its connections close): the limit only ends a process that hangs.
WAIT = timedelta(hours=24)
# Seconds that replace WAIT (torch and accelerate read no variable for init_process_group's timeout), up to
# ~31 years: torch counts the wait in int64 nanoseconds, and 9.3e9 s (past ~292 years) timed out at once
WAIT_VARIABLE = "SVDLORA_DISTRIBUTED_TIMEOUT"
MAX_WAIT_SECONDS = 1e9


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            with _peers_alive():
                dist.barrier()

    def broadcast(self, obj):
        """``obj`` of rank 0, on every rank."""
        if not self.active:
            return obj
        box = [obj]
        with _peers_alive():
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, on every rank, in rank order."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        with _peers_alive():
            dist.all_gather_object(out, obj)
        return out

    def all_reduce_sum(self, tensors: list[torch.Tensor]) -> None:
        """Each tensor becomes, in place, its sum over the ranks (in the same order on every rank)."""
        if not self.active:
            return
        for tensor in tensors:
            staged = tensor if tensor.device.type == "cpu" else tensor.cpu()
            with _peers_alive():
                dist.all_reduce(staged, op=dist.ReduceOp.SUM)
            if staged is not tensor:
                tensor.copy_(staged)

    def share(self, items: list) -> list:
        """This rank's contiguous share of ``items`` (sizes differ by at most one, rank order)."""
        size, extra = divmod(len(items), self.world_size)
        start = self.rank * size + min(self.rank, extra)
        return items[start : start + size + (self.rank < extra)]


@contextmanager
def _peers_alive():
    """A collective that fails because another process stopped (its own error, a kill) is that
    process's failure, not a bug here: one line that points at it (exit status 2)."""
    try:
        yield
    except RuntimeError as err:  # gloo: "Connection closed by peer"; torch.distributed.DistError
        said = re.sub(r"^\[[^\]]*\]\s*", "", first_line(err)).split(". ")[0]  # gloo's: "[file.cc:553] ..."
        if "Timed out" in said:  # alive, maybe, but silent for the wait
            raise SvdloraError(
                f"the other processes of this run did not answer within {_duration(wait())} ({said}): one of them "
                f"hangs; see their logs ({WAIT_VARIABLE} sets the wait, in seconds)"
            ) from None
        raise peer_stopped(said) from None


def peer_stopped(said: str) -> SvdloraError:
    """This process's error where another one of the run stopped first (``said``: how this one noticed)."""
    return SvdloraError(
        f"another process of this run stopped, so this one stops too ({said}): its error is above or in its "
        "log; fix that and rerun"
    )


def wait() -> timedelta:
    """How long a process waits for the others at a collective: WAIT, or ``SVDLORA_DISTRIBUTED_TIMEOUT`` seconds."""
    given = os.environ.get(WAIT_VARIABLE)
    if given is None:
        return WAIT
    try:
        seconds = float(given)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= MAX_WAIT_SECONDS:  # nan and inf too
        raise SvdloraError(
            f"{WAIT_VARIABLE} must be a wait in seconds in (0, {MAX_WAIT_SECONDS:g}] (e.g. 3600 for 1 h), got "
            f"{given!r}: fix it, or unset it for the default {_duration(WAIT)}"
        )
    return timedelta(seconds=seconds)


def _duration(wait: timedelta) -> str:
    seconds = wait.total_seconds()
    return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds:g} s"


def context() -> Context:
    """The process group of a launcher (joined on first use), or a single-process context."""
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size())
    if not launched():
        return Context()
    dist.init_process_group(backend="gloo", timeout=wait())
    return Context(dist.get_rank(), dist.get_world_size())


def assign(costs: list[float], world_size: int, groups: list | None = None) -> list[int]:
    """The rank of each job: longest job first, to the least loaded rank (deterministic).

    With ``groups`` (e.g. each job's decoder block), every group is spread over the ranks on its
    own, ties going to the rank with the least work so far: a calibrated run waits for every rank
    at each block, so each block's work is what has to be balanced."""
    if world_size == 1:
        return [0] * len(costs)
    members: dict = {}
    for job, group in enumerate(groups if groups is not None else [None] * len(costs)):
        members.setdefault(group, []).append(job)
    owner, total = [0] * len(costs), [0.0] * world_size
    for jobs in members.values():
        loads = [(0.0, total[r], r) for r in range(world_size)]
        heapq.heapify(loads)
        for job in sorted(jobs, key=lambda j: (-costs[j], j)):
            load, _, rank = heapq.heappop(loads)
            owner[job] = rank
            total[rank] += costs[job]
            heapq.heappush(loads, (load + costs[job], total[rank], rank))
    return owner


def owners(plan, world_size: int) -> dict:
    """The rank of each job of a ``streaming.Plan`` (``assign``, balanced decoder block by decoder
    block), keyed by its checkpoint tensor (a buffer's by its name): the same keys after a global
    allocation re-plans, so a rank keeps the matrices it weighted."""
    names = [what.name if kind == "factorize" else what for kind, _, what in plan.jobs]
    blocks = [m.group(1) if (m := re.match(r"(.*?\.\d+)\.", name)) else "" for name in names]
    owner = assign([plan.cost(j) for j in plan.jobs], world_size, blocks)
    return {job_key(j): r for j, r in zip(plan.jobs, owner, strict=True)}


def job_key(job) -> str:
    kind, src, what = job
    return what if kind == "buffer" else src


def jobs_of(plan, rank: int, owner_of: dict) -> list:
    """This rank's jobs (``owners``), in checkpoint file order: sequential reads."""
    file_rank = {f: i for i, f in enumerate(plan.checkpoint.files)}
    return sorted(
        (j for j in plan.jobs if owner_of[job_key(j)] == rank),
        key=lambda j: file_rank.get(plan.checkpoint.file_of.get(j[1]), -1),
    )


def svd_cost(out_features: int, in_features: int) -> float:
    """Relative cost of one factorization: ~m·n·min(m, n) flops for either SVD method."""
    return float(out_features) * in_features * min(out_features, in_features)
