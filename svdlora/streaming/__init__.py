"""Streamed compression: a safetensors checkpoint read tensor by tensor, written shard by shard.

The architecture is built on the meta device (no memory) to find the targets and allocate
ranks from shapes alone; the output layout then follows (``writer.file_layout``) before any
tensor is read (``planning``). Each tensor is read with plain file I/O (no memory map), factorized or
copied, and written straight to its offset in the output (``jobs``): the peak is one matrix and
its SVD working set, never a shard or the model. ``pipeline`` runs the whole: checks, plan,
calibration, jobs, and the finished folder.
The same ``decompose.factorize`` and the same writer as in-memory compression give the same
bytes (tested). Under torchrun the matrices are split over the ranks (``distributed``).

With calibration data (a causal LM's text), the checkpoint is calibrated one decoder block at a
time: whitening with uniform allocation in one forward pass (``blockwise``), the methods that need
the loss gradient at every layer (fisher, kfac, global allocation) with a backward pass block by
block (``block_gradients``), their ranks chosen before the output layout is fixed. Under
torchrun each rank runs its share of the windows, the block statistics are summed over the
ranks, and a rank weights and factorizes the matrices it owns: the result equals one process's
up to the order of the float64 sums (plain SVD stays bit for bit).
"""

from .pipeline import check_streamable, compress_checkpoint
from .planning import Plan, meta_model, plan

__all__ = ["Plan", "check_streamable", "compress_checkpoint", "meta_model", "plan"]
