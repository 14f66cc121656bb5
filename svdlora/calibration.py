"""Calibration statistics: what each targeted layer sees (its input Gram XᵀX) and what its
output is worth (the mean squared gradient of the loss per output channel), in one pass.

Both are running means over tokens, so memory is bounded by the layers, not the data:
an (in, in) float64 Gram per distinct layer input (q/k/v, or gate/up, share one) and an
(out,) vector per layer. Together they define the error a factorization should minimize,

    E[ΔL] ≈ ½ Σ_o E[g_o²] · (δW · E[x xᵀ] · δWᵀ)_oo  =  ½ ‖D · δW · S‖_F²,

with D = diag(√E[g²]) and S·Sᵀ = E[x xᵀ] (a diagonal Gauss-Newton approximation): the
whitened spectra of different layers are then in the same unit (loss), which is what lets
the global allocator compare them.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import SvdloraError, first_line
from .modes import eval_mode
from .padding import Unbatchable, calibration_runs, flat_tokens, is_causal_lm, is_encoder_decoder, mask_for
from .targets import Target

logger = logging.getLogger(__name__)

# Output-gradient Grams (method "kfac") only up to this many outputs: a (vocab, vocab) Gram of an
# LM head would not fit in memory; wider layers keep the diagonal E[g²].
MAX_OUTPUT_GRAM = 8192


def product_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a statistic's products are taken in: float32 (fast; the sums are float64), float64 for a float64
    model's tensors, whose statistics would otherwise be ~1e-7 off (its factors ~5e-6 off the float64 ones)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@dataclass
class LayerStats:
    """Running means over the calibration tokens of one layer."""

    gram: torch.Tensor  # (in, in) float64: E[x xᵀ] of the layer input
    tokens: int
    out_grad_sq: torch.Tensor | None = None  # (out,) float64: E[g²] of the loss gradient at the output
    out_grad_gram: torch.Tensor | None = None  # (out, out) float64: E[g gᵀ], only for method "kfac"

    @property
    def has_gradients(self) -> bool:
        return self.out_grad_sq is not None


class SharedInputs:
    """Which layer first read each input tensor of a batch: layers fed one tensor (q/k/v) share it.

    A tensor is known by its address, shape and dtype, and held until ``clear``: freed, its memory
    could come back within the batch as a later layer's input of the same shape and pass for the
    same tensor (in a half-precision model the kept float32 copies do not hold it).
    """

    def __init__(self) -> None:
        self._first: dict[tuple, tuple[Hashable, torch.Tensor]] = {}

    def first(self, x: torch.Tensor, key: Hashable) -> tuple[Hashable, bool]:
        """(the key recorded for ``x``: ``key`` if ``x`` is new in this batch, and whether it was)."""
        identity = (x.data_ptr(), tuple(x.shape), x.dtype)
        new = identity not in self._first
        if new:
            self._first[identity] = (key, x)
        return self._first[identity][0], new

    def clear(self) -> None:
        self._first.clear()


class _Accumulator:
    """Sums of x xᵀ (shared by layers fed the same tensors) and of g² per layer.

    An input tensor's x xᵀ is added, at the end of its batch, to the sum kept for the set of layers that read
    it (q/k/v: one); a layer's Gram is the sum of the sums whose sets hold it. Keyed by the layer that read it
    first, a tensor another layer read too went into that layer's Gram whatever else it read: DeBERTa-v2's
    value_proj took in the position embeddings its query_proj and key_proj project.
    """

    def __init__(self, targets: list[Target], gradients: bool, output_gram: bool = False) -> None:
        self.targets = {t.module: t for t in targets}
        self.gradients = gradients
        self.output_gram = output_gram
        self.grad_grams: dict[str, torch.Tensor] = {}
        self.gram_sums: dict[tuple[str, ...], torch.Tensor] = {}  # keyed by the sorted names of their readers
        self.tokens: dict[tuple[str, ...], int] = {}
        self.grad_sums: dict[str, torch.Tensor] = {}
        self.grad_tokens: dict[str, int] = {}
        self._inputs = SharedInputs()  # each input tensor's index in ``_pending`` in this batch
        self._pending: list[tuple[torch.Tensor, torch.Tensor | None, set[str]]] = []  # (x, real positions, readers)
        # (layer, output, its real positions or None) of this batch, for ``add_gradients``
        self.outputs: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []
        self.masks: list[torch.Tensor] = []  # a padded batch's real positions (``batched_masks``)
        # Work buffers reused per (shape, dtype): a float32 product added into a float64 sum
        # directly casts element by element (about twice the time of a copy and an add), and a
        # fresh tensor per product and batch costs page faults; the sums are the same, bit for bit.
        self._buffers: dict[tuple, torch.Tensor] = {}

    def _buffer(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (tuple(shape), dtype, device)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(shape, dtype=dtype, device=device)
        return self._buffers[key]

    def _rows(self, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A reused (tokens, width) buffer: the first rows of one kept per width, grown as needed, so
        batches of many different lengths (rows of padded batches) do not keep a buffer per length."""
        key = ("rows", like.shape[1], dtype, like.device)
        if key not in self._buffers or self._buffers[key].shape[0] < like.shape[0]:
            self._buffers.pop(key, None)  # freed before the larger one is allocated
            self._buffers[key] = torch.empty(like.shape, dtype=dtype, device=like.device)
        return self._buffers[key][: like.shape[0]]

    def _gram(self, flat: torch.Tensor) -> torch.Tensor:
        """flatᵀ·flat in its ``product_dtype``, into a reused buffer (read it before the next call)."""
        flat = flat.to(product_dtype(flat))
        return torch.mm(flat.T, flat, out=self._buffer((flat.shape[1],) * 2, flat.dtype, flat.device))

    def _add(self, sums: dict, key: str, product: torch.Tensor) -> None:
        """sums[key] += product, in float64 (no drift over many batches)."""
        if key not in sums:
            sums[key] = product.to(torch.float64, copy=True)  # a float64 product is a reused buffer
            return
        if product.dtype != torch.float64:
            product = self._buffer(product.shape, torch.float64, product.device).copy_(product)
        sums[key] += product

    def new_batch(self, masks: list[torch.Tensor] | None = None) -> None:
        """Add the batch before (its readers are known once it ran) and start one with ``masks``."""
        self._add_inputs()
        self._inputs.clear()
        self.outputs.clear()
        self.masks = masks or []

    def _add_inputs(self) -> None:
        for x, real, readers in self._pending:
            flat = flat_tokens(x, real)
            key = tuple(sorted(readers))
            self._add(self.gram_sums, key, self._gram(flat))  # products per batch in ``product_dtype``
            self.tokens[key] = self.tokens.get(key, 0) + flat.shape[0]
        self._pending.clear()

    def hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        name = self.targets[module].name
        x = inputs[0].detach()
        index, new = self._inputs.first(x, len(self._pending))
        if new:  # its positions now: a layer input no mask tells raises Unbatchable in the forward pass
            self._pending.append((x, mask_for(x, self.masks), set()))
        self._pending[index][2].add(name)
        if self.gradients and output.requires_grad:
            self.outputs.append((name, output, mask_for(output, self.masks)))

    def add_gradients(self, grads: Iterable[torch.Tensor | None]) -> None:
        for (name, _, real), grad in zip(self.outputs, grads, strict=True):
            if grad is None:
                continue
            single = flat_tokens(grad.detach(), real)
            wide = self._rows(single, torch.float64).copy_(single)
            square = wide.square_().sum(0)
            self.grad_sums[name] = self.grad_sums[name] + square if name in self.grad_sums else square
            self.grad_tokens[name] = self.grad_tokens.get(name, 0) + single.shape[0]
            if self.output_gram and single.shape[1] <= MAX_OUTPUT_GRAM:
                self._add(self.grad_grams, name, self._gram(single))  # as for XᵀX

    def sum_over_ranks(self, ctx) -> None:
        """Add the other processes' sums and token counts to this one's (``distributed.Context``;
        each rank ran its own windows), before ``result``. float64 sums added in another order than
        one process adds its windows: equal to it up to round-off, not bit for bit."""
        self._add_inputs()
        if not ctx.active:
            return
        keys = (sorted(self.gram_sums), sorted(self.grad_grams), sorted(self.grad_sums))
        every = ctx.gather((keys, self.tokens, self.grad_tokens))
        if any(theirs != keys for theirs, _, _ in every):
            raise SvdloraError("the processes' calibration windows reached different layers: run in one process")
        for sums, names in zip((self.gram_sums, self.grad_grams, self.grad_sums), keys, strict=True):
            ctx.all_reduce_sum([sums[k] for k in names])
        for k in self.tokens:
            self.tokens[k] = sum(tokens[k] for _, tokens, _ in every)
        for k in self.grad_tokens:
            self.grad_tokens[k] = sum(grad_tokens[k] for _, _, grad_tokens in every)

    def result(self) -> dict[str, LayerStats]:
        """The means, once: the sums become them in place (a new (n, n) float64 tensor per layer
        cost page faults worth seconds on a large model)."""
        self._add_inputs()
        self._buffers.clear()
        keys = sorted(self.gram_sums)
        read = {t.name: tuple(k for k in keys if t.name in k) for t in self.targets.values()}
        means = {}  # one per distinct set of sums, shared by its layers; sets of several first (they read sums)
        for sums in sorted({sums for sums in read.values() if sums}, key=len, reverse=True):
            total = self.gram_sums[sums[0]] if len(sums) == 1 else sum(self.gram_sums[k] for k in sums)
            tokens = sum(self.tokens[k] for k in sums)
            means[sums] = (total.div_(max(tokens, 1)), tokens)
        stats = {}
        for target in self.targets.values():
            if not read[target.name]:
                continue  # never called on the calibration data
            gram, tokens = means[read[target.name]]
            grad, grad_gram = self.grad_sums.get(target.name), self.grad_grams.get(target.name)
            grad_tokens = max(self.grad_tokens.get(target.name, 0), 1)
            stats[target.name] = LayerStats(
                gram=gram,
                tokens=tokens,
                out_grad_sq=None if grad is None else grad / grad_tokens,
                out_grad_gram=None if grad_gram is None else grad_gram.div_(grad_tokens),
            )
        self.gram_sums, self.grad_grams = {}, {}  # consumed
        return stats


def calibration_loss(outputs, batch: dict, generator: torch.Generator, causal: bool) -> torch.Tensor:
    """A loss whose gradient statistics approximate the Fisher information of the model's output.

    With labels in the batch (causal LM text, ``causal``: ``padding.is_causal_lm``, scored on the next token;
    seq2seq targets, a token classifier's tags, as they stand) it is the summed token loss; for a
    classifier (logits (batch, classes)), the cross-entropy against labels sampled from the model's own
    prediction (an unbiased Fisher estimate: class labels in the batch are not read); for a bare
    encoder, a random projection of its hidden states (whose squared gradient estimates the
    Gauss-Newton matrix of ‖δh‖²).
    """
    logits = getattr(outputs, "logits", None)
    labels = batch.get("labels")
    if logits is not None and labels is not None and logits.dim() > 2:  # per token (a classifier's: sampled)
        if causal:  # token t predicts t+1
            flat_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
            flat_labels = labels[:, 1:].reshape(-1)
        else:  # a label per position: a decoder's targets, a token classifier's or masked LM's
            flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        return F.cross_entropy(flat_logits.float(), flat_labels, ignore_index=-100, reduction="sum")
    if logits is not None:
        flat = logits.reshape(-1, logits.shape[-1]).float()
        with torch.no_grad():
            # sampled on the CPU, where the generator is (the same draws wherever the model runs)
            sampled = torch.multinomial(flat.softmax(-1).cpu(), 1, generator=generator).squeeze(-1).to(flat.device)
        return F.cross_entropy(flat, sampled, reduction="sum")
    hidden = getattr(outputs, "last_hidden_state", None)
    if hidden is None and isinstance(outputs, torch.Tensor):
        hidden = outputs
    if hidden is None:
        raise SvdloraError("the model returns neither logits nor hidden states: calibration needs one of them")
    direction = torch.randn(hidden.shape, generator=generator, dtype=torch.float32).to(hidden.device)
    return (hidden.float() * direction).sum()


def labelled_forward(model: nn.Module, batch: dict):
    """``model(**batch)``. A ValueError where the batch holds labels is the model's own loss refusing them (a
    sequence classifier given one per token: "Expected input batch_size (2) to match target batch_size (16)"):
    a user error, said as one at the first batch rather than as a traceback."""
    try:
        return model(**batch)
    except ValueError as err:
        if "labels" not in batch:
            raise
        why = first_line(err).rstrip(".")
        raise SvdloraError(
            f"{type(model).__name__} refused the batches' labels ({why}): give labels that fit its head "
            "(one per row for a sequence classifier, one per token for a token classifier or a causal LM), or none "
            "(a sequence classifier's calibration and distillation healing do not read them)"
        ) from err


@contextmanager
def _hooks(targets: list[Target], accumulator: _Accumulator):
    handles = [t.module.register_forward_hook(accumulator.hook) for t in targets]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _params_require_grad(model: nn.Module):
    """Outputs need requires_grad for their gradient; weight gradients themselves are never computed."""
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def collect_statistics(
    model: nn.Module,
    targets: list[Target],
    batches: Iterable[dict],
    gradients: bool = True,
    progress: bool = True,
    seed: int = 0,
    output_gram: bool = False,
) -> dict[str, LayerStats]:
    """Run the calibration batches through ``model`` and return each target's ``LayerStats``.

    Args:
        model: the dense model (left unchanged; put it in eval mode first).
        targets: the layers to observe (from ``svdlora.targets.find_targets``).
        batches: model keyword inputs, e.g. ``{"input_ids": ..., "labels": ...}``, already on the
            model's device.
        gradients: also collect E[g²] at each layer output (one backward pass per batch, no
            weight gradients); needed for the global allocator's loss-weighted spectra.
        output_gram: also collect the full E[g gᵀ] per layer (outputs up to ``MAX_OUTPUT_GRAM``),
            the output side of the Kronecker-factored Fisher (method "kfac").
    Returns:
        ``{layer name: LayerStats}`` for every target the data reached.
    """
    batches, encoder_decoder = list(batches), is_encoder_decoder(model)
    runs = calibration_runs(batches, encoder_decoder)
    if not runs:
        raise SvdloraError("calibration data is empty: pass a file with text, images or sentences")
    try:
        stats = _collect(model, targets, runs, gradients, progress, seed, output_gram)
    except Unbatchable:  # a layer whose padding no mask tells (a routed expert): every sentence alone
        logger.info("a layer input has no padding mask of its shape: the calibration runs sentence by sentence")
        runs = calibration_runs(batches, encoder_decoder, whole=False)
        stats = _collect(model, targets, runs, gradients, progress, seed, output_gram)
    missing = [t.name for t in targets if t.name not in stats]
    if missing:
        logger.warning("%d targeted layers never ran on the calibration data (e.g. %s)", len(missing), missing[0])
    return stats


def _collect(
    model: nn.Module,
    targets: list[Target],
    batches: list[tuple[dict, list[torch.Tensor]]],
    gradients: bool,
    progress: bool,
    seed: int,
    output_gram: bool,
) -> dict[str, LayerStats]:
    """``collect_statistics`` of ``batches`` (``calibration_runs``)."""
    accumulator = _Accumulator(targets, gradients, output_gram=gradients and output_gram)
    generator, causal = torch.Generator().manual_seed(seed), is_causal_lm(model)
    grad_context = _params_require_grad(model) if gradients else torch.no_grad()
    try:
        with eval_mode(model), _hooks(targets, accumulator), grad_context:
            for batch, masks in tqdm(batches, desc="calibrating", disable=not progress):
                accumulator.new_batch(masks)
                outputs = labelled_forward(model, batch)
                if gradients:
                    outs = [out for _, out, _ in accumulator.outputs]
                    if outs:
                        loss = calibration_loss(outputs, batch, generator, causal)
                        accumulator.add_gradients(torch.autograd.grad(loss, outs, allow_unused=True))
                del outputs
    finally:
        accumulator.new_batch()
    return accumulator.result()
