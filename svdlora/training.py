"""Training under a rank constraint, the alternative to truncating a trained model.

``compress`` factorizes weights after training. Here the weights are rank-``k`` products
while training runs: either from scratch (random factors) or from an SVD start (fine-tuning a
compressed model), optionally with the symmetric parameterization ``W = AᵀA`` and the double
soft orthogonality (DSO) regularizer studied in "Neural Network Compression via Low-Rank
Factorization" (NN-SVD, github.com/jaketae/nn-svd).

Example:
    >>> model = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    >>> rank_constrained(model, rank=8)
    ['0', '2']
    >>> loss = task_loss + 1e-4 * dso_penalty(model)
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import CompressionConfig
from .errors import SvdloraError
from .layers import LINEAR, LowRankLinear, make_dense, weight_out_in
from .siblings import check_unstacked
from .swap import untie_factorized_head
from .targets import find_targets

logger = logging.getLogger(__name__)

__all__ = ["FactorizedLinear", "SymmetricLinear", "dso_penalty", "rank_constrained"]


class FactorizedLinear(LowRankLinear):
    """A trainable ``y = x (A B)ᵀ + b`` with A (out, rank), B (rank, in): rank(AB) <= rank.

    The same module as :class:`svdlora.layers.LowRankLinear` (its forward, and its factors ``A``, ``B`` in
    the state dict), plus a random initialisation for training from scratch.
    ``FactorizedLinear.from_dense(linear, [rank])`` starts from the truncated SVD instead. ``save_compressed``
    writes only what ``svdlora.compress`` made (its folder records the compression); save a model trained
    with these layers by its state dict, and load it into the same model after the same ``rank_constrained``.

    Args:
        in_features, out_features: shape of the map.
        rank: the rank bound (an int), or a list of residual-stage ranks as in LowRankLinear.
        bias: learn an additive bias.
        **kwargs: ``base_kind``, ``device``, ``dtype``, passed to LowRankLinear.

    Example:
        >>> layer = FactorizedLinear(784, 64, rank=8)
        >>> torch.linalg.matrix_rank(layer.dense_weight()).item() <= 8
        True
    """

    inference_layout = False  # contiguous factors for optimizers and code that flattens them

    def __init__(self, in_features: int, out_features: int, rank: int | list[int], bias: bool = True, **kwargs) -> None:
        if isinstance(rank, int):
            _check_rank(rank)
        ranks = [rank] if isinstance(rank, int) else list(rank)
        super().__init__(in_features, out_features, ranks, bias=bias, **kwargs)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # As the NN-SVD code, which chains nn.Linear(in, k) (B) and nn.Linear(k, out) (A, bias):
        # every tensor U(±1/√fan_in) of the nn.Linear it belongs to.
        rank = self.A.shape[1]
        with torch.no_grad():
            nn.init.uniform_(self.B, -1 / math.sqrt(self.in_features), 1 / math.sqrt(self.in_features))
            nn.init.uniform_(self.A, -1 / math.sqrt(rank), 1 / math.sqrt(rank))
            if self.bias is not None:
                nn.init.uniform_(self.bias, -1 / math.sqrt(rank), 1 / math.sqrt(rank))


class SymmetricLinear(nn.Module):
    """A trainable ``y = x (AᵀA) + b`` with one factor A (rank, features).

    The weight is symmetric positive semi-definite with rank <= ``rank`` and costs
    ``rank·features`` values, half of a plain factorization. Only square maps can be
    symmetric.

    Args:
        features: input and output size.
        rank: the rank bound.
        bias: learn an additive bias.

    Example:
        >>> w = SymmetricLinear(64, rank=8).dense_weight()
        >>> torch.allclose(w, w.T)
        True
    """

    def __init__(
        self,
        features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_rank(rank)
        self.in_features = self.out_features = features
        self.rank = rank
        self.A = nn.Parameter(torch.empty(rank, features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # As in the NN-SVD code, whose shared factor is the weight of an nn.Linear(rank, features).
        with torch.no_grad():
            nn.init.uniform_(self.A, -1 / math.sqrt(self.rank), 1 / math.sqrt(self.rank))
            if self.bias is not None:
                nn.init.uniform_(self.bias, -1 / math.sqrt(self.rank), 1 / math.sqrt(self.rank))

    @classmethod
    def from_dense(cls, module: nn.Module, rank: int) -> SymmetricLinear:
        """The rank-``rank`` PSD matrix nearest (Frobenius) to a square layer's weight (a Linear or Conv1D).

        That is the top of the eigendecomposition of the symmetric part (W + Wᵀ)/2 with
        negative eigenvalues dropped: ``A = diag(√λ) Vᵀ``.
        """
        weight = weight_out_in(module).detach()
        if weight.shape[0] != weight.shape[1]:
            raise SvdloraError(
                f"a symmetric layer needs a square weight, got {tuple(weight.shape)}: "
                "use FactorizedLinear for this layer"
            )
        layer = cls(weight.shape[0], rank, bias=module.bias is not None, device=weight.device, dtype=weight.dtype)
        work = weight.double()
        eigenvalues, eigenvectors = torch.linalg.eigh((work + work.T) / 2)  # ascending order
        top = eigenvalues.flip(0)[:rank].clamp(min=0)
        vectors = eigenvectors.flip(1)[:, :rank]
        with torch.no_grad():
            layer.A.zero_()
            layer.A[: top.numel()].copy_(top.sqrt()[:, None] * vectors.T)
            if module.bias is not None:
                layer.bias.copy_(module.bias)
        return layer

    def dense_weight(self) -> torch.Tensor:
        """The (features, features) weight AᵀA."""
        return self.A.T @ self.A

    def to_dense(self) -> nn.Linear:
        """A plain nn.Linear holding AᵀA."""
        with torch.no_grad():
            bias = None if self.bias is None else self.bias.detach().clone()
            return make_dense(LINEAR, self.dense_weight().detach(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x·(AᵀA)ᵀ = (x·Aᵀ)·A: two thin matmuls, the dense weight is never formed.
        return F.linear(F.linear(x, self.A), self.A.T, self.bias)

    def extra_repr(self) -> str:
        return f"features={self.in_features}, rank={self.rank}, bias={self.bias is not None}"


def rank_constrained(
    model: nn.Module,
    rank: int,
    *,
    symmetric: bool = False,
    from_weights: bool = False,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    keep_head: bool = True,
) -> list[str]:
    """Replace (in place) every targeted Linear/Conv1D by a rank-``rank`` trainable layer.

    The layers are those :func:`svdlora.compress` targets (``targets.find_targets``): every
    ``nn.Linear`` and GPT-2 ``Conv1D``, but the output head and any layer tied to an embedding,
    which stay dense unless ``keep_head=False`` (a tied head replaced alone would no longer be the
    embedding's transpose). A layer is replaced only when its factors are smaller than its dense
    weight, the rule compress applies with a fixed rank (``rank·(in+out) < in·out``); the others
    stay dense and are logged. With ``symmetric=True``, square layers become
    :class:`SymmetricLinear` and non-square ones :class:`FactorizedLinear`, as in the NN-SVD
    code (``W = AᵀA`` cannot map between spaces of different sizes).

    Args:
        model: any module; only its Linear/Conv1D layers are touched.
        rank: the rank bound, >= 1.
        symmetric: use ``W = AᵀA`` on square layers.
        from_weights: start from the current weights (truncated SVD, or the nearest PSD matrix
            for symmetric layers) instead of a random initialisation.
        include, exclude: module-name patterns (glob, or ``re:<regex>``), as in ``compress``.
        keep_head: leave the output head (and layers tied to an embedding) dense, as ``compress``.

    Returns:
        The names of the replaced layers, in model order.
    """
    _check_rank(rank)
    config = CompressionConfig(include=include, exclude=exclude, keep_head=keep_head)
    replaced = []
    for target in find_targets(model, config)[0]:
        name, module, out_features, in_features = target.name, target.module, target.out_features, target.in_features
        if rank * (in_features + out_features) >= in_features * out_features:
            logger.info(
                "%s (%dx%d) stays dense: rank-%d factors would not be smaller", name, out_features, in_features, rank
            )
            continue
        factory = {"device": module.weight.device, "dtype": module.weight.dtype}
        if symmetric and in_features == out_features:
            layer = (
                SymmetricLinear.from_dense(module, rank)
                if from_weights
                else SymmetricLinear(in_features, rank, module.bias is not None, **factory)
            )
        elif from_weights:
            layer = FactorizedLinear.from_dense(module, [rank])
        else:
            layer = FactorizedLinear(
                in_features, out_features, rank, module.bias is not None, base_kind=target.kind, **factory
            )
        model.set_submodule(name, layer)
        replaced.append(name)
    untie_factorized_head(model, config)  # keep_head=False: else transformers' tie_weights() fails on its factors
    return replaced


def dso_penalty(model: nn.Module) -> torch.Tensor:
    """Double soft orthogonality of every factor: Σ_F ‖FᵀF − I‖_F² + ‖FFᵀ − I‖_F².

    DSO is defined by Bansal, Chen and Wang, "Can We Gain More from Orthogonality
    Regularizations in Training Deep CNNs?" (NeurIPS 2018), and NN-SVD applies it to
    both factors of each low-rank layer (its ``compute_orthonormal_penalty``); the shared
    factor of a symmetric layer is used twice in AᵀA and so counts twice, as there. Factors
    are those of :class:`LowRankLinear` (including :class:`FactorizedLinear`) and
    :class:`SymmetricLinear` layers; dense layers are not penalized. Multiply by the
    strength λ (the paper's α) yourself. A model whose sibling layers are stacked
    (``stack_siblings=True``) is refused: their factors are not ``LowRankLinear`` layers.

    For a k×n factor both Gram matrices share their nonzero spectrum, so the sum equals
    ``2‖G − I‖_F² + |n − k|`` with G the smaller Gram matrix. It is 0 exactly for square
    orthogonal factors; a non-square factor cannot do better than |n − k| (orthonormal rows
    or columns).

    Returns:
        A scalar tensor (0 if the model has no factor), differentiable in the factors.
    """
    check_unstacked(model, "train")
    total = None
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            # a layer whose only stage is a full-rank quantized one has empty factors: no factor, no
            # term (its formula would add the constant in + out)
            terms = [_dso(f) for f in (module.A, module.B) if f.numel()]
        elif isinstance(module, SymmetricLinear):
            terms = [2 * _dso(module.A)]
        else:
            continue
        for term in terms:
            total = term if total is None else total + term
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros((), device=None if param is None else param.device)
    return total


def _dso(factor: torch.Tensor) -> torch.Tensor:
    k, n = factor.shape
    gram = factor @ factor.T if k <= n else factor.T @ factor
    eye = torch.eye(gram.shape[0], device=factor.device, dtype=factor.dtype)
    return 2 * (gram - eye).square().sum() + abs(n - k)


def _check_rank(rank: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise SvdloraError(f"rank must be an integer >= 1, got {rank!r}")
