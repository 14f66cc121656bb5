"""Gradient statistics block by block: Fisher / K-FAC weights and global allocation for a
checkpoint that is never in memory whole.

In memory, one backward pass from the loss gives every layer the gradient at its output. Block
by block, the same chain rule runs as three passes over the decoder blocks, each block read from
the checkpoint and dropped again:

1. forward: each block's input hidden states go to a scratch folder on disk (from the first block
   that holds a target: the backward stops there), and its outputs become the next block's inputs;
2. head: the model runs with its blocks skipped (the last one returns the final hidden states),
   so the norm, head and loss are the model's own code; autograd gives the loss gradient there;
3. backward, last block first: the block runs again on its stored inputs under the same hooks
   as in-memory calibration (input Grams, output gradients), and autograd through that block
   alone, fed the gradient at its output, gives each layer's output gradient and the gradient
   at the block's input, which the block before it is fed. The block's weightings go to the
   scratch folder; for global allocation its weighted spectra (one vector per matrix) stay.

Each block's backward is the same arithmetic as its part of the whole model's backward, so the
statistics, and the factors, equal in-memory compression's bit for bit (tested). Memory holds
one block, the windows' hidden states and gradients (samples × length × hidden, each), and one
block's statistics; disk holds every block's inputs until its backward and every block's
weightings until the factorization.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import blockwise
from .calibration import MAX_OUTPUT_GRAM, _Accumulator, _hooks, calibration_loss
from .distributed import Context
from .errors import SvdloraError
from .layers import weight_out_in
from .methods import Weighting, spectrum_units, weighted_spectrum
from .methods.weighting import warn_unreached
from .padding import is_causal_lm, mask_for
from .plan import CalibrationPlan, factor_dtype, unweighted_by_the_loss

logger = logging.getLogger(__name__)


@dataclass
class BlockStatistics:
    """What the passes leave: each matrix's weighting (on disk, one file per block) and, for
    global allocation, its loss-weighted spectrum."""

    folder: Path
    block_of: dict[str, int] = field(default_factory=dict)  # layer -> index of its block
    spectra: dict[str, torch.Tensor] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)  # what each spectrum measures (``spectrum_units``)
    _loaded: tuple[int, dict] | None = None

    def weighting(self, name: str) -> Weighting | None:
        """The metric layer ``name`` is factorized under (one block's file in memory at a time)."""
        i = self.block_of[name]
        if self._loaded is None or self._loaded[0] != i:
            self._loaded = (i, torch.load(self.folder / f"weighting-{i}.pt", weights_only=True))
        parts = self._loaded[1][name]
        return None if parts is None else Weighting(*parts)


def collect(
    plan,
    batches: list[dict],
    method: str,
    allocation: str,
    folder: Path,
    seed: int,
    progress: bool,
    device=None,
    ctx=None,
    owned=None,
    whole: bool = True,
):
    """Run the three passes over the checkpoint of ``plan`` (a ``streaming.Plan``) for every
    target in ``plan.targets``; scratch files live in ``folder`` (created here). ``device`` (e.g.
    "cuda") runs the blocks and the statistics there; what is stored and returned is on the CPU.

    Under torchrun (``ctx``, a ``distributed.Context``) each rank passes its own windows and its
    own scratch ``folder``: the passes run on that rank's windows, each block's statistic sums
    are added over the ranks, and a rank stores the weightings of the layers named in ``owned``
    (those it will factorize); every rank returns every spectrum. ``whole``: a padded batch runs in
    one pass where it can (``blockwise.run_batches``)."""
    ctx = ctx if ctx is not None else Context()
    model = blockwise.meta_model(plan, device)
    batches, masks = blockwise.run_batches(batches, device, whole)
    blocks_name, blocks = blockwise.find_blocks(model, [t.name for t in plan.targets])
    outside = (f"{blocks_name}.",)
    filled = blockwise._materialize(plan, model, "", exclude=outside, device=device)
    inputs = blockwise._capture_inputs(model, blocks[0], batches)
    blockwise._release(filled)
    folder.mkdir(parents=True)
    prefixes = [f"{blocks_name}.{i}." for i in range(len(blocks))]
    # the backward stops at the first block with a target: none below it needs statistics, nor its input's gradient,
    # so the inputs of the blocks below it are not stored
    first = next((i for i, prefix in enumerate(prefixes) if any(t.name.startswith(prefix) for t in plan.targets)), 0)
    _check_space(folder, inputs, plan.targets, method, prefixes[first:], ctx)
    for i, block in enumerate(tqdm(blocks, desc="calibration: forward, block by block", disable=not progress)):
        if i >= first:
            torch.save([entry.hidden.cpu() for entry in inputs], folder / f"hidden-{i}.pt")
        filled = blockwise._materialize(plan, block, prefixes[i], device=device)
        mine = [model.get_submodule(t.name) for t in plan.targets if t.name.startswith(prefixes[i])]
        with _padding_told(mine if any(masks) else []) as batch_masks, torch.no_grad():
            for entry, real in zip(inputs, masks, strict=True):
                batch_masks[:] = real
                entry.run(block)
        blockwise._release(filled)

    filled = blockwise._materialize(plan, model, "", exclude=outside, device=device)
    try:
        grads = _head_gradients(model, blocks, inputs, batches, seed)
    finally:
        blockwise._release(filled)
    for entry in inputs:  # the last block's outputs: each block's inputs come from disk from here
        entry.hidden = None

    result, unreached = BlockStatistics(folder), set()
    for i in tqdm(
        range(len(blocks) - 1, first - 1, -1), desc="calibration: backward, block by block", disable=not progress
    ):
        prefix = prefixes[i]
        filled = blockwise._materialize(plan, blocks[i], prefix, device=device)
        mine = [t for t in plan.targets if t.name.startswith(prefix)]
        targets = [dataclasses.replace(t, module=model.get_submodule(t.name)) for t in mine]
        stats = _block_backward(
            blocks[i], targets, inputs, masks, grads, folder / f"hidden-{i}.pt", i > first, method == "kfac", ctx
        )
        (folder / f"hidden-{i}.pt").unlink()
        weighted = CalibrationPlan(method, allocation, stats=stats, dtype=factor_dtype(targets), gradients=True)
        unreached.update(unweighted_by_the_loss(weighted, targets))  # the same on every rank: summed statistics
        targets = [t for t in targets if owned is None or t.name in owned]  # the others are other ranks'
        if allocation == "global":
            for t in targets:
                weighting = weighted.weighting(t.name, for_allocation=True)
                result.spectra[t.name] = weighted_spectrum(weight_out_in(t.module), weighting).cpu()
                result.units[t.name] = spectrum_units(weighting)
        saved, moved = {}, {}
        for t in targets:
            w = blockwise.on_cpu(weighted.weighting(t.name), moved)  # shared matrices saved once
            saved[t.name] = None if w is None else (w.left, w.right, w.right_inverse)
            result.block_of[t.name] = i
        torch.save(saved, folder / f"weighting-{i}.pt")
        del weighted, stats, targets
        blockwise._release(filled)
    if unreached and ctx.is_main:  # once for the model, as in memory
        warn_unreached([t.name for t in plan.targets if t.name in unreached])
    if ctx.active:  # the global allocation reads every matrix's spectrum (and its units)
        result.spectra = _gathered(ctx, result.spectra, plan.targets)
        result.units = _gathered(ctx, result.units, plan.targets)
    return result


def _gathered(ctx: Context, mine: dict, targets) -> dict:
    """Every rank's entries of ``mine``, in the order of ``targets``."""
    every = {}
    for part in ctx.gather(mine):
        every.update(part)
    return {t.name: every[t.name] for t in targets if t.name in every}


@contextmanager
def _padding_told(layers):
    """Raise ``padding.Unbatchable`` in the forward pass, at the first input of ``layers`` whose real
    positions no mask of the batch (the list yielded, set per batch) tells: the backward pass's
    statistics would raise it only after the head and every later block, and the run starts again
    row by row (``streaming.pipeline``) after fewer block reads. It only raises: the decision, and the
    bytes, stay those of the whole model's statistics."""
    current: list[torch.Tensor] = []

    def check(module, args, output):
        mask_for(args[0], current)  # a Linear's output has its input's (batch, length): inputs suffice

    handles = [layer.register_forward_hook(check) for layer in layers]
    try:
        yield current
    finally:
        for handle in handles:
            handle.remove()


def _block_backward(
    block, targets, inputs, masks: list, grads: list, hidden_file: Path, upstream: bool, output_gram: bool, ctx: Context
):
    """One block's statistics (summed over the ranks of ``ctx``); ``grads`` (the gradient at its
    output, per window) becomes the gradient at its input when ``upstream`` (a block before it needs it)."""
    hidden = torch.load(hidden_file, mmap=True, weights_only=True)
    accumulator = _Accumulator(targets, gradients=True, output_gram=output_gram)
    with _hooks(targets, accumulator), torch.enable_grad():
        for w, entry in enumerate(inputs):
            accumulator.new_batch(masks[w])
            x = hidden[w].to(grads[w].device).detach().requires_grad_()  # the layers' outputs need a graph
            out = entry.call(block, x)
            outs = [o for _, o, _ in accumulator.outputs]
            got = torch.autograd.grad(out, [*outs, x] if upstream else outs, grad_outputs=grads[w], allow_unused=True)
            accumulator.add_gradients(got[: len(outs)])
            if upstream:
                grads[w] = got[-1]
    accumulator.new_batch()
    accumulator.sum_over_ranks(ctx)
    stats = accumulator.result()
    for t in targets:
        if t.name not in stats:
            raise blockwise.never_ran(t.name)
    return stats


def _head_gradients(model, blocks, inputs, batches: list[dict], seed: int) -> list[torch.Tensor]:
    """The loss gradient at the last block's output, per window, through the model's own head."""
    generator = torch.Generator().manual_seed(seed)  # as collect_statistics draws it, window by window
    causal, grads = is_causal_lm(model), []
    for entry, batch in zip(inputs, batches, strict=True):
        final = entry.hidden.detach().requires_grad_()
        with _blocks_skipped(blocks, final, entry.tuple_output):
            outputs = model(**batch)
        loss = calibration_loss(outputs, batch, generator, causal)
        grads.append(torch.autograd.grad(loss, final)[0])
        del outputs, loss
    return grads


@contextmanager
def _blocks_skipped(blocks, final: torch.Tensor, as_tuple: bool):
    """Every block passes its hidden states through, the last returns ``final`` (on meta weights
    nothing of theirs runs)."""

    def passing(last: bool):
        def forward(*args, **kwargs):
            hidden = final if last else (args[0] if args else kwargs["hidden_states"])
            return (hidden,) if as_tuple else hidden

        return forward

    for i, block in enumerate(blocks):
        block.forward = passing(i == len(blocks) - 1)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def scratch_bytes(inputs, targets, method: str, blocks: list[str]) -> tuple[int, int]:
    """The bytes of the stored inputs of ``blocks`` (each block's name prefix), and a lower
    bound on those of the weightings that replace them block by block: layers that share an input
    (q/k/v) share its float32 S (triangular: no S⁻¹ is stored), so each input width is counted once per block; kfac adds
    each layer's (out, out) factor D. (A layer whose Gram is unusable stores less: it falls back.)"""
    hidden = len(blocks) * sum(entry.hidden.nbytes for entry in inputs)
    if method == "svd":  # no weighting is stored, only the spectra in memory
        return hidden, 0
    weightings = 0
    for prefix in blocks:
        weightings += sum(4 * n * n for n in {t.in_features for t in targets if t.name.startswith(prefix)})
    if method == "kfac":
        weightings += sum(4 * t.out_features**2 for t in targets if t.out_features <= MAX_OUTPUT_GRAM)
    return hidden, weightings


def _check_space(folder: Path, inputs, targets, method: str, blocks: list[str], ctx: Context) -> None:
    """Refuse before the forward pass a disk that cannot hold the scratch files (``scratch_bytes``).
    Under torchrun (``ctx``) the ranks' hidden states share the disk, and every rank refuses if one
    does, before any writes (a rank left alone would wait for the others at the first block)."""
    hidden, weightings = scratch_bytes(inputs, targets, method, blocks)
    hidden *= ctx.world_size  # each rank stores its own windows' inputs, about as many bytes as this one
    free = shutil.disk_usage(folder).free
    logger.info(
        "block-by-block gradients: %.1f MiB of hidden states, then at least %.1f MiB of weightings in %s",
        hidden / 2**20, weightings / 2**20, folder,
    )  # fmt: skip
    refusal = None
    if free < max(hidden, weightings):
        refusal = (
            f"calibrating block by block with gradients stores every block's inputs ({hidden / 2**20:,.0f} MiB), "
            f"then each block's weightings (at least {weightings / 2**20:,.0f} MiB) beside the output, whose disk has "
            f"{free / 2**20:,.0f} MiB free: free space, pass fewer --calibration-samples, or use --method whiten "
            "--allocation uniform (no backward pass, nothing stored)"
        )
    if ctx.active:
        refusal = next((r for r in ctx.gather(refusal) if r is not None), None)
    if refusal is not None:
        raise SvdloraError(refusal)
