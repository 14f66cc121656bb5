"""The module that replaces a dense ``nn.Linear`` / GPT-2 ``Conv1D`` by its SVD factors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .decompose import residual_svd

LINEAR, CONV1D = "linear", "conv1d"


def factor_layout(tensor: torch.Tensor, values: bool = True) -> torch.Tensor:
    """A factor whose rows are short ((out, R): A, or the pivoted C), stored column by column on a CPU.

    F.linear then reads it as one (R, out) block, which batch-1 decoding on a CPU streams faster
    than R-long rows (benchmarks/speed.py --parts layouts times both). The values and the shape
    are unchanged. Applied to the layers compression builds and to folders loaded on a CPU
    (``load_compressed``, ``from_pretrained``), so both compute alike; not to ``FactorizedLinear``
    built for training from scratch. Such a state dict is not contiguous: save it with
    ``save_compressed`` (or ``.contiguous()`` each tensor). ``.to()`` keeps a layer's layout.
    ``values=False``: an uninitialised tensor in that layout, for a layer about to be filled.
    """
    if tensor.device.type != "cpu" or tensor.dim() != 2 or tensor.stride(0) == 1:
        return tensor
    if not values:
        return torch.empty_strided(tensor.shape, (1, tensor.shape[0]), dtype=tensor.dtype, device=tensor.device)
    return tensor.t().contiguous().t()


def dense_kind(module: nn.Module) -> str | None:
    """'linear' or 'conv1d' for a layer svdlora can factorize, else None."""
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, Conv1D):
        return CONV1D
    return None


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), whatever the layer's storage.

    This is the only place that knows GPT-2's ``Conv1D`` stores its weight transposed,
    as (in, out), and computes ``x @ W + b``.
    """
    kind = dense_kind(module)
    if kind == CONV1D:
        return module.weight.T
    if kind == LINEAR:
        return module.weight
    raise TypeError(f"{type(module).__name__} is not a Linear or Conv1D layer")


def as_stored_by(kind: str, weight: torch.Tensor) -> torch.Tensor:
    """A (out, in) weight as a layer of ``kind`` holds it: transposed for a Conv1D; ``weight_out_in``'s inverse."""
    return weight.T if kind == CONV1D else weight


def make_dense(kind: str, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """Rebuild a layer of ``kind`` from a (out, in) weight; the inverse of ``weight_out_in``."""
    out_features, in_features = weight.shape
    if kind == CONV1D:
        with torch.device("meta"):  # skip Conv1D's random init: the weight is replaced below
            layer = Conv1D(out_features, in_features)
        layer.weight = nn.Parameter(weight.T.contiguous())
        if bias is None:  # Conv1D always has a bias; a bias-less source means zeros
            bias = torch.zeros(out_features, device=weight.device, dtype=weight.dtype)
        layer.bias = nn.Parameter(bias)
        return layer
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.contiguous())
    if bias is not None:
        layer.bias = nn.Parameter(bias)
    return layer


class LowRankLinear(nn.Module):
    """``y = (x·Bᵀ)·Aᵀ + bias`` with every residual stage stacked into one (A, B) pair.

    Stage j owns columns ``ranks[:j]..ranks[:j+1]`` of A and the same rows of B, so
    Σ_j A_j B_j = A·B and inference runs two matmuls however many stages there are.

    Example:
        >>> layer = LowRankLinear.from_dense(nn.Linear(64, 32), ranks=[4, 4])
        >>> layer(torch.randn(2, 64)).shape
        torch.Size([2, 32])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        ranks: list[int],
        bias: bool = True,
        base_kind: str = LINEAR,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        stage_dtypes: list[str] | None = None,
    ) -> None:
        super().__init__()
        # A full-rank first stage (stage_dtypes[0] = "full-…", see quantize.py) is held dequantized
        # in ``full``; the low-rank stages (``ranks``) may then be none at all (plain quantization).
        has_full = bool(stage_dtypes) and stage_dtypes[0].startswith("full-")
        if (not ranks and not has_full) or (ranks and min(ranks) < 1):
            raise ValueError(f"ranks must be a non-empty list of positive ints, got {ranks}")
        self.in_features, self.out_features = in_features, out_features
        self.ranks = list(ranks)
        self.base_kind = base_kind
        self.stage_dtypes = list(stage_dtypes) if stage_dtypes else None  # None: every stage in A's dtype
        self.stored = None  # stages as written to disk (chain.Stage.parts), set by compression / loading
        total = sum(ranks)
        self.A = nn.Parameter(torch.empty(out_features, total, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(total, in_features, device=device, dtype=dtype))
        self.full = (
            nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype)) if has_full else None
        )
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_dense(cls, module: nn.Module, ranks: list[int], **svd_options) -> LowRankLinear:
        """Factorize a Linear/Conv1D into residual SVD stages of the given ranks."""
        return cls.from_stages(module, residual_svd(weight_out_in(module), ranks, **svd_options))

    @classmethod
    def from_stages(cls, module: nn.Module, stages: list[tuple[torch.Tensor, torch.Tensor]]) -> LowRankLinear:
        """A layer holding the given (A_j, B_j) stages and ``module``'s bias, in ``module``'s dtype."""
        a = torch.cat([a for a, _ in stages], dim=1)
        b = torch.cat([b for _, b in stages], dim=0)
        return cls.from_factors(module, a, b, [sa.shape[1] for sa, _ in stages])

    # Layers that replace a trained module are laid out for inference (``factor_layout``);
    # a subclass for training from scratch keeps contiguous factors.
    inference_layout = True

    @classmethod
    def shaped_for(cls, module: nn.Module, ranks: list[int], **options) -> LowRankLinear:
        """An empty layer of this class to replace ``module``: its shape, bias, kind, device and dtype."""
        weight = weight_out_in(module)
        layer = cls(
            weight.shape[1], weight.shape[0], list(ranks), bias=module.bias is not None,
            base_kind=dense_kind(module), device=weight.device, dtype=weight.dtype, **options,
        )  # fmt: skip
        if cls.inference_layout:
            for name in ("A", "C"):  # the short-row factor of the pairs / of pivoted layers
                factor = layer._parameters.get(name)
                if factor is not None:
                    setattr(layer, name, nn.Parameter(factor_layout(factor.detach(), values=False)))
        return layer

    @classmethod
    def from_factors(cls, module: nn.Module, a: torch.Tensor, b: torch.Tensor, ranks: list[int]) -> LowRankLinear:
        """The layer replacing ``module`` with stacked factors ``a`` (out, Σr) and ``b`` (Σr, in)."""
        layer = cls.shaped_for(module, ranks)
        with torch.no_grad():
            layer.A.copy_(a)
            layer.B.copy_(b)
            if module.bias is not None:
                layer.bias.copy_(module.bias)
        return layer

    @classmethod
    def from_chain(cls, module: nn.Module, stages: list) -> LowRankLinear:
        """A layer holding ``chain.quantized_chain`` stages, dequantized, and their stored form."""
        low = [s for s in stages if s.full is None]
        layer = cls.shaped_for(module, [s.rank for s in low], stage_dtypes=[s.fmt.name for s in stages])
        with torch.no_grad():
            if low:
                layer.A.copy_(torch.cat([s.a for s in low], dim=1))
                layer.B.copy_(torch.cat([s.b for s in low], dim=0))
            if layer.full is not None:
                layer.full.copy_(stages[0].full)
            if module.bias is not None:
                layer.bias.copy_(module.bias)
        layer.stored = [{k: {n: t.cpu() for n, t in v.items()} for k, v in s.parts.items()} for s in stages]
        return layer

    def factor_parameters(self) -> list[nn.Parameter]:
        """What healing trains: the factors (a full-rank first stage stays as stored)."""
        return [self.A, self.B]

    def stages(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The (A_j, B_j) pairs as views of the stacked factors."""
        a_parts = torch.split(self.A, self.ranks, dim=1)
        b_parts = torch.split(self.B, self.ranks, dim=0)
        return list(zip(a_parts, b_parts, strict=True))

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) weight the factors stand for."""
        return self.A @ self.B if self.full is None else self.full + self.A @ self.B

    @property
    def weight(self) -> torch.Tensor:
        """A·B laid out as the replaced layer held its weight (``nn.Linear``'s (out, in), GPT-2
        ``Conv1D``'s (in, out)), for code that reads ``layer.weight`` directly (``nn.MultiheadAttention
        .out_proj``, T5's dtype check, a Conv1D's ``x @ weight + bias``). It is computed on every
        access: such callers get correct results but not the low-rank speed-up."""
        return as_stored_by(self.base_kind, self.dense_weight())

    def to_dense(self) -> nn.Module:
        """A plain layer of the original kind (Linear or Conv1D) holding A·B, frozen where this layer
        is (a model prepared for adapter training stays so) and in its train/eval mode; normal tensors
        even when converted under inference_mode (as ``to_pairs``), so the model can train later."""
        with torch.inference_mode(False), torch.no_grad():  # no_grad inside: inference_mode(False) enables grad
            bias = None if self.bias is None else self.bias.detach().clone()
            dense = make_dense(self.base_kind, self.dense_weight().detach(), bias)
        factors = [p for name, p in self.named_parameters(recurse=False) if name != "bias"]
        dense.weight.requires_grad_(any(p.requires_grad for p in factors))  # per parameter, as ``to_pairs``
        if self.bias is not None:
            dense.bias.requires_grad_(self.bias.requires_grad)
        return dense.train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.full is not None:
            out = F.linear(x, self.full, self.bias)
            return out + F.linear(F.linear(x, self.B), self.A) if self.ranks else out
        return F.linear(F.linear(x, self.B), self.A, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"ranks={self.ranks}, bias={self.bias is not None}, base_kind={self.base_kind}"
            + (f", stage_dtypes={self.stage_dtypes}" if self.stage_dtypes else "")
        )
