"""Refit: make each compressed layer reproduce the *dense* layer's output from the inputs the
*compressed* model actually feeds it.

Statistics from the dense model alone fit every layer to inputs it will never see once the
layers before it are compressed; errors then compound with depth. One more calibration pass
runs the dense and the compressed model side by side on the same batch and collects, per layer,
the Gram G̃ = E[x̃ x̃ᵀ] of the compressed model's input x̃ and the cross term C = E[x x̃ᵀ] with
the dense input x. The rank-r Ŵ minimizing E‖W·x − Ŵ·x̃‖² (weighted by D) is then the truncated
SVD of D·W·C·S̃⁻¹ (S̃ = G̃^½), mapped back with D⁻¹ and S̃⁻¹: the same whiten / truncate /
unwhiten path as ``methods.factorize``, applied to the least-squares target W·C·G̃⁻¹.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import SharedInputs, product_dtype
from .methods import Weighting, factorize
from .methods.weighting import INPUT_DAMPING, warn_unusable, whitening
from .modes import eval_mode
from .padding import Unbatchable, calibration_runs, flat_tokens, is_encoder_decoder, mask_for


class _InputTap:
    """Forward hooks that keep every input of each layer in a run, each tensor once (q/k/v share one).

    A tensor is named by the layer that read it first and that layer's call, so a layer called again (DeBERTa's
    query_proj on the position embeddings) keeps both inputs, and a layer that reads only one of them (its
    value_proj) only that one: kept as one input per layer under its first reader, the last call replaced the
    first and value_proj was refitted to position embeddings it never reads."""

    def __init__(self) -> None:
        self.tensors: dict[tuple[str, int], torch.Tensor] = {}  # (first reader, its call) -> real tokens
        self.reads: dict[str, list[tuple[str, int]]] = {}  # layer -> the tensors it read, in call order
        self._shared = SharedInputs()
        self.masks: list[torch.Tensor] = []  # the run's real positions (``padding.batched_masks``)

    def clear(self) -> None:
        self.tensors.clear()
        self.reads.clear()
        self._shared.clear()

    def hook_for(self, name: str):
        def hook(module, inputs, output):
            x = inputs[0].detach()
            reads = self.reads.setdefault(name, [])
            key, new = self._shared.first(x, (name, len(reads)))
            if new:
                real = flat_tokens(x, mask_for(x, self.masks))
                self.tensors[key] = real.to(product_dtype(real))
            reads.append(key)

        return hook

    def inputs_of(self, name: str) -> torch.Tensor:
        """The real tokens of every input layer ``name`` read in the run, in call order."""
        parts = [self.tensors[key] for key in self.reads[name]]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


@contextmanager
def _tapped(modules: dict[str, nn.Module], tap: _InputTap):
    handles = [m.register_forward_hook(tap.hook_for(name)) for name, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _swap(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    for name, module in modules.items():
        model.set_submodule(name, module)


@torch.no_grad()
def collect_cross_statistics(
    model: nn.Module,
    dense: dict[str, nn.Module],
    compressed: dict[str, nn.Module],
    batches: list[dict],
    progress: bool = True,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (G̃, C)}`` (float64 means) for every layer in ``compressed``.

    ``model`` holds the compressed layers; for each batch the dense layers are swapped in for
    one forward pass (no copy of the model is needed), then swapped out again. Padded positions are no
    tokens, as in the first pass's statistics: a right-padded labelled batch runs whole and each input
    keeps its real positions (``padding.batched_masks``), another runs row by row without its
    padding (``padding.unpadded_rows``), its rows' inputs gathered and multiplied once per batch:
    two in×in products per row and layer made the pass several times slower than the batch's one.
    """
    encoder_decoder = is_encoder_decoder(model)
    dense_tap, compressed_tap = _InputTap(), _InputTap()
    grams: dict[tuple, torch.Tensor] = {}  # keyed by what the layers read (``_batch_inputs``)
    cross: dict[tuple, torch.Tensor] = {}
    tokens: dict[tuple, int] = {}
    read: dict[str, tuple] = {}  # layer -> its key
    whole = True  # padded batches run whole until one raises Unbatchable (as in ``collect_statistics``)
    with eval_mode(model):
        try:
            for batch in tqdm(batches, desc="refit statistics", disable=not progress):
                taps = (model, dense, compressed, dense_tap, compressed_tap)
                try:
                    inputs = _batch_inputs(*taps, batch, encoder_decoder, whole, read)
                except Unbatchable:  # a layer input no mask tells (a routed expert): this batch and the rest row by row
                    dense_tap.clear()
                    compressed_tap.clear()
                    whole = False
                    inputs = _batch_inputs(*taps, batch, encoder_decoder, whole, read)
                for key, (xs, x_tildes) in inputs.items():
                    x, x_tilde = torch.cat(xs), torch.cat(x_tildes)
                    gram, product = (x_tilde.T @ x_tilde).double(), (x.T @ x_tilde).double()
                    grams[key] = grams[key] + gram if key in grams else gram
                    cross[key] = cross[key] + product if key in cross else product
                    tokens[key] = tokens.get(key, 0) + x_tilde.shape[0]
        finally:
            _swap(model, compressed)
    means = {key: (grams[key] / max(tokens[key], 1), cross[key] / max(tokens[key], 1)) for key in grams}
    # layers fed the same inputs share one (G̃, C) object, so ``refit_factors`` callers can cache per input
    return {name: means[read[name]] for name in compressed if read.get(name) in means}


def readers(cross: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[int, list[str]]:
    """``{id(G̃): the layers that read it}`` of ``collect_cross_statistics``' result (q/k/v share one G̃), so a
    warning about a G̃ names every layer it concerns."""
    names: dict[int, list[str]] = {}
    for name, (gram, _) in cross.items():
        names.setdefault(id(gram), []).append(name)
    return names


def _batch_inputs(
    model, dense, compressed, dense_tap, compressed_tap, batch: dict, encoder_decoder: bool, whole: bool, read: dict
) -> dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """{key: (dense inputs, compressed inputs)} of ``batch``'s real tokens: its forward passes
    (``calibration_runs``) through the dense layers, then the compressed ones. A key is the tensors a layer
    read in both passes (``_InputTap``), shared by layers that read the same ones; ``read`` gets each layer's."""
    inputs: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for run, masks in calibration_runs([batch], encoder_decoder, whole):
        dense_tap.masks = compressed_tap.masks = masks
        _swap(model, dense)
        with _tapped(dense, dense_tap):
            model(**run)
        _swap(model, compressed)
        with _tapped(compressed, compressed_tap):
            model(**run)
        done = set()
        for name in compressed_tap.reads:
            key = read[name] = (tuple(dense_tap.reads[name]), tuple(compressed_tap.reads[name]))
            if key not in done:  # once per run: its layers read the same tensors
                done.add(key)
                xs, x_tildes = inputs.setdefault(key, ([], []))
                xs.append(dense_tap.inputs_of(name))
                x_tildes.append(compressed_tap.inputs_of(name))
        dense_tap.clear()
        compressed_tap.clear()
    return inputs


def refit_target(
    weight: torch.Tensor,
    gram: torch.Tensor,
    cross: torch.Tensor,
    left: torch.Tensor | None,
    damping: float = INPUT_DAMPING,
    roots: dict | None = None,
    layer: str | Sequence[str] | None = None,
) -> tuple[torch.Tensor, Weighting] | None:
    """The least-squares map W·C·G̃⁻¹ from x̃ to W·x and the metric (D, S̃) to factorize it in;
    None where G̃ or the map is unusable (said once per Gram, naming ``layer``: the layers that read it).
    Any factorization of it in that metric (a plain truncated SVD, or ``chain.quantized_chain`` for
    stored-precision stages) is a refit.

    ``roots``, when given, caches S̃ and S̃⁻¹ per Gram object (q/k/v share one input, so one G̃ and C).
    """
    roots = {} if roots is None else roots
    if id(gram) not in roots:
        roots[id(gram)] = whitening(gram, damping, of="refit inputs", layer=layer)
    right, right_inverse = roots[id(gram)]
    if right is None:
        return None
    # W·C·G̃⁻¹ with the damped G̃ = S̃·S̃ᵀ, so G̃⁻¹ = S̃⁻ᵀ·S̃⁻¹
    target = weight.detach().double() @ cross @ right_inverse.T @ right_inverse
    if not torch.isfinite(target).all():  # weights are checked finite: C is not (the dense model's inputs)
        warn_unusable("refit target", layer, finite=False)
        roots[id(gram)] = None, None  # the layers sharing G̃ share C: skipped without saying it again
        return None
    dtype = product_dtype(weight)  # a float64 model's stays float64
    return target.to(dtype), Weighting(left=left, right=right.to(dtype), right_inverse=right_inverse.to(dtype))


def refit_factors(
    weight: torch.Tensor,
    ranks: list[int],
    gram: torch.Tensor,
    cross: torch.Tensor,
    left: torch.Tensor | None,
    damping: float = INPUT_DAMPING,
    roots: dict | None = None,
    layer: str | Sequence[str] | None = None,
    **svd_options,
) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Stages of the rank-Σranks Ŵ minimizing ‖D·(W·X − Ŵ·X̃)‖; None where G̃ is unusable.

    ``roots``, when given, caches S̃ and S̃⁻¹ per Gram object (q/k/v share one input).
    """
    fit = refit_target(weight, gram, cross, left, damping, roots, layer)
    if fit is None:
        return None
    target, weighting = fit
    stages = factorize(target, ranks, weighting, **svd_options)
    return [(a.to(weight.dtype), b.to(weight.dtype)) for a, b in stages]
