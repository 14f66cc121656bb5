"""Sibling layers share one input-side matmul: ``load_compressed(..., stack_siblings=True)``.

Low-rank layers that read the same input (q/k/v of an attention, gate/up of a gated MLP) each
start with z = x·Bᵀ. Stacking their B factors into one matrix computes every sibling's z in one
matmul: fewer, larger kernels, which is what batch-1 decoding on a GPU is bound by (on one
Llama-2-7B block under CUDA graphs, the projections took 95 µs stacked against 113 µs as pairs and
126 µs dense; ``benchmarks/gpu_fused.py``). Each sibling then applies its own output side to its
slice of the product.

The model's code still calls each sibling on its own, so the first call computes the stacked
product and keeps it for the others. It is used only by a call with the *same* input tensor, once
per sibling, and in eager mode only while neither that input nor the stacked weight has been
written in place since (their version counters); anything else computes afresh, so a wrong
grouping costs time, never correctness. Under ``torch.compile`` and for ``inference_mode`` tensors
(no version counters) the identity alone decides: an in-place write to the input between two
siblings' calls is not seen there (transformers' models do not make one). The product is dropped
once every sibling has read it (or by ``reset()``). Which layers are siblings is found by one
forward pass on a small input, in eval mode, recording which layers of one parent module receive
the same tensor object. Inference only: not for concurrent forward passes of one model from
several threads; ``save_compressed``, ``heal`` and ``training.dso_penalty`` refuse a stacked model.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SvdloraError, first_line
from .layers import LowRankLinear, as_stored_by
from .modes import eval_mode
from .pivoted import PivotedLowRankLinear, pivoted_outputs, pivoted_weight, version_stamp

logger = logging.getLogger(__name__)


class _Kept:
    """The product a group's last input gave, until every sibling has read it. A plain object:
    nn.Module's __setattr__ would cost more per call than the matmul stacking saves."""

    def __init__(self, siblings: int) -> None:
        self.siblings = siblings
        self.clear()

    def clear(self) -> None:
        self.input = self.product = self.stamps = None
        self.unread = [False] * self.siblings


class StackedProjection(nn.Module):
    """The B factors of sibling layers stacked into ``weight``, and the product its last input gave."""

    def __init__(self, factors: list[torch.Tensor]) -> None:
        super().__init__()
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor even under inference_mode
            weight = torch.cat([f.detach() for f in factors])
        self.weight = nn.Parameter(weight, requires_grad=factors[0].requires_grad)
        self.bounds = list(itertools.pairwise(itertools.accumulate([0] + [f.shape[0] for f in factors])))
        self.kept = _Kept(len(self.bounds))

    def reset(self) -> None:
        """Drop the kept product (and the input it holds)."""
        self.kept.clear()

    def __getstate__(self) -> dict:  # copies and pickles carry no kept activations
        return {**self.__dict__, "kept": _Kept(len(self.bounds))}

    def take(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Sibling ``index``'s z = x·Bᵀ: from the kept product when it is of this very input, unchanged,
        and that sibling has not read it yet; else from a new product of all siblings."""
        kept, weight = self.kept, self._parameters["weight"]
        # dynamo guards its own
        stamps = None if torch.compiler.is_compiling() else (version_stamp(x), version_stamp(weight))
        if kept.input is not x or not kept.unread[index] or stamps != kept.stamps:
            kept.input, kept.product, kept.stamps = x, F.linear(x, weight), stamps
            kept.unread = [True] * len(self.bounds)
        start, stop = self.bounds[index]
        z = kept.product.narrow(-1, start, stop - start)
        kept.unread[index] = False
        if not any(kept.unread):  # every sibling has it: hold no activations between calls
            kept.clear()
        return z


class StackedSibling(nn.Module):
    """A low-rank layer whose input side is computed with its siblings' (``StackedProjection``).

    It holds the layer's output side: A (a pair) or C with the pivot rows and the others (a pivoted
    layer), and the bias. It is not a ``LowRankLinear`` (it has no B of its own), so code that walks
    the low-rank layers (runtimes, healing) does not mistake it for one. The first sibling of a
    group holds the ``StackedProjection`` as a submodule (so ``.to()`` and ``state_dict`` see it
    once); the others refer to it.
    """

    def __init__(self, layer: LowRankLinear, stacked: StackedProjection, index: int, owner: bool) -> None:
        super().__init__()
        self.index = index
        self.in_features, self.out_features, self.base_kind = layer.in_features, layer.out_features, layer.base_kind
        self.pivoted = isinstance(layer, PivotedLowRankLinear)
        if self.pivoted:
            rows, rest = layer._indices()
            self.C = layer.C
            self.register_buffer("rows", rows)
            self.register_buffer("rest", rest)
        else:
            self.A = layer.A
        self.bias = layer.bias
        if owner:
            self.stacked = stacked
        self.__dict__["projection"] = stacked  # not registered: the owner sibling registers it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.projection.take(x, self.index)
        if self.pivoted:
            return pivoted_outputs(z, self.C, self.rows, self.rest, self.bias, self.out_features)
        return F.linear(z, self.A, self.bias)

    def dense_weight(self) -> torch.Tensor:
        start, stop = self.projection.bounds[self.index]
        b = self.projection.weight[start:stop]
        return pivoted_weight(b, self.C, self.rows) if self.pivoted else self.A @ b

    @property
    def weight(self) -> torch.Tensor:
        """A·B as the replaced layer held it (``LowRankLinear.weight``); computed on every access."""
        return as_stored_by(self.base_kind, self.dense_weight())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, pivoted={self.pivoted}, "
            f"sibling {self.index} of {len(self.projection.bounds)}"
        )


def is_stacked(model: nn.Module) -> bool:
    return any(isinstance(m, StackedSibling) for m in model.modules())


def check_unstacked(model: nn.Module, verb: str) -> None:
    """Refuse a stacked model for code that walks the low-rank layers to train them (``heal``,
    ``dso_penalty``): a stacked sibling is not one, so it would be left out without a word."""
    if is_stacked(model):
        raise SvdloraError(
            "this model's sibling layers are stacked (stack_siblings=True), which is for inference: "
            f"{verb} a model loaded without stack_siblings"
        )


def _stackable(module: nn.Module) -> bool:
    if not isinstance(module, LowRankLinear) or module.full is not None or "B" not in module._parameters:
        return False
    on_meta = any(t.device.type == "meta" for t in module.parameters(recurse=False))
    return not on_meta and getattr(module, "_hf_hook", None) is None  # accelerate places these itself


def example_inputs(model: nn.Module) -> dict:
    """The model's ``dummy_inputs`` on its device, or a refusal that says what to pass instead."""
    dummy = getattr(model, "dummy_inputs", None)
    # transformers gives every model input_ids as dummy_inputs, vision models (pixel_values) included
    main_input = getattr(model, "main_input_name", None)
    if not isinstance(dummy, dict) or (isinstance(main_input, str) and main_input not in dummy):
        raise SvdloraError(
            f"{type(model).__name__} has no dummy_inputs to find which layers read the same input: load it "
            "without stack_siblings, then call svdlora.stack_siblings(model, inputs=...) with a small batch "
            "its forward takes"
        )
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    # a skeleton on the meta device (load_compressed asks before reading weights) builds them there
    # (Marian's: device=self.device): they hold no data to move, and only their presence is asked then
    return {k: v.to(device) if torch.is_tensor(v) and not v.is_meta else v for k, v in dummy.items()}


def find_siblings(model: nn.Module, inputs=None) -> list[list[str]]:
    """Groups of stackable low-rank layers of one parent module that receive the same input tensor in
    one forward pass, in eval mode (``inputs``: a dict or other mapping of keyword arguments, such as a
    tokenizer's output, a tuple of positional ones, or one tensor; default the model's ``dummy_inputs``).
    A layer called more than once, on different inputs, is in none."""
    inputs = example_inputs(model) if inputs is None else inputs
    calls: dict[str, list[int]] = {}
    kept = []  # the inputs stay alive while tracing, so no id is reused

    def record(name):
        def hook(module, args):
            if args and torch.is_tensor(args[0]):
                kept.append(args[0])
                calls.setdefault(name, []).append(id(args[0]))

        return hook

    layers = {name: m for name, m in model.named_modules() if _stackable(m)}
    handles = [m.register_forward_pre_hook(record(name)) for name, m in layers.items()]
    try:
        with eval_mode(model), torch.no_grad():  # no dropout, no layer drop: every layer runs
            if isinstance(inputs, Mapping):  # a tokenizer's BatchEncoding too (not a dict)
                model(**inputs)
            elif isinstance(inputs, tuple | list):
                model(*inputs)
            else:
                model(inputs)
    except SvdloraError:
        raise
    except Exception as err:  # noqa: BLE001 (any model's forward: reported with the way out)
        raise SvdloraError(
            f"the forward pass that finds sibling layers failed ({first_line(err)}): call "
            "svdlora.stack_siblings(model, inputs=...) with a small batch its forward takes"
        ) from None
    finally:
        for h in handles:
            h.remove()
    groups: dict[tuple, list[str]] = {}
    for name, ids in calls.items():
        if len(set(ids)) == 1:
            m = layers[name]
            key = (name.rpartition(".")[0], ids[0], m.in_features, m.B.dtype, m.B.device)
            groups.setdefault(key, []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def stack_siblings(model: nn.Module, inputs=None) -> list[list[str]]:
    """Replace, in place, each group of sibling low-rank layers (``find_siblings``) by
    ``StackedSibling`` layers sharing one input-side matmul; returns the groups."""
    groups = find_siblings(model, inputs)
    for names in groups:
        layers = [model.get_submodule(n) for n in names]
        stacked = StackedProjection([layer.B for layer in layers]).train(layers[0].training)
        for index, (name, layer) in enumerate(zip(names, layers, strict=True)):
            sibling = StackedSibling(layer, stacked, index, owner=index == 0).train(layer.training)
            model.set_submodule(name, sibling, strict=True)
    logger.info("stacked %d layers in %d sibling groups", sum(map(len, groups)), len(groups))
    return groups
