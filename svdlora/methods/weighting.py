"""The metric a factorization minimizes: ‖D·(W − Ŵ)·S‖_F.

S is a square root of the input Gram E[x xᵀ] (SVD-LLM's truncation-aware whitening: the
truncated SVD of W·S is then optimal for the layer's output error on the calibration inputs)
and D = diag(√E[g²]) weights each output channel by what it is worth to the loss (FWSVD's
Fisher weighting), or, for method "kfac", a square root D (DᵀD = E[g gᵀ]) of the output factor
of the Kronecker-factored Fisher E[x xᵀ] ⊗ E[g gᵀ] (K-FAC), which also sees how output
channels' errors combine. The best rank-k Ŵ under this metric is [D·W·S]_k mapped back with
D⁻¹ and S⁻¹, so every method here is: whiten, truncated SVD, unwhiten. Any square roots give
the same Ŵ (‖D·X·S‖ depends on DᵀD and S·Sᵀ only): the Cholesky factors are used, 12–15× cheaper
than the symmetric roots of an eigendecomposition (``benchmarks/square_roots.py``; same perplexity,
BENCHMARKS.md). A Cholesky factor is triangular, so S⁻¹ need not be formed: mapping back solves
B·S = B' (k·n² flops per layer, against n³ for the inverse).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..calibration import LayerStats

logger = logging.getLogger(__name__)

# Damping as in GPTQ (1% of the mean diagonal): keeps S invertible when the calibration data
# does not span the input space (few tokens, dead features), and stops the factors from
# over-fitting directions the calibration data barely saw.
INPUT_DAMPING = 0.01
OUTPUT_DAMPING = 0.01


@dataclass
class Weighting:
    """Left (per output channel) and right (input whitening) weights of one matrix."""

    left: torch.Tensor | None = None  # (out,) D's diagonal, or the full (out, out) D (method "kfac")
    right: torch.Tensor | None = None  # (in, in) S, S·Sᵀ = the damped input Gram
    right_inverse: torch.Tensor | None = None  # (in, in) S⁻¹ where kept (refit); else B·S = B' is solved

    @classmethod
    def identity(cls) -> Weighting:
        return cls()

    @property
    def is_identity(self) -> bool:
        return self.left is None and self.right is None

    @classmethod
    def from_stats(
        cls,
        stats: LayerStats | None,
        use_gradients: bool = True,
        full_output: bool = False,
        input_damping: float = INPUT_DAMPING,
        output_damping: float = OUTPUT_DAMPING,
    ) -> Weighting:
        """The weighting from one layer's calibration statistics; identity where they are unusable.

        A zero, non-finite or otherwise degenerate Gram falls back to no input whitening (plain SVD
        on that side) with a warning, rather than failing or producing NaN.
        """
        if stats is None:
            return cls.identity()
        right, right_inverse = whitening(stats.gram, input_damping, inverse=False)
        left = output_weights(stats, output_damping, full=full_output) if use_gradients else None
        return cls(left, right, right_inverse)

    def whiten(self, weight: torch.Tensor) -> torch.Tensor:
        """D·W·S in the dtype of ``weight``."""
        out = weight
        if self.right is not None:
            out = out @ self.right.to(out)
        if self.left is not None:
            left = self.left.to(out)
            out = left @ out if left.dim() == 2 else left[:, None] * out
        return out

    def unwhiten(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors of the whitened matrix -> factors of W: (D⁻¹·A', B'·S⁻¹)."""
        if self.left is not None:
            if self.left.dim() == 2:  # D is invertible (damped): solve, no inverse kept
                a = _solve(self.left, a.double(), left=True).to(a.dtype)
            else:
                a = a / self.left.to(a)[:, None]
        if self.right_inverse is not None:
            b = b @ self.right_inverse.to(b)
        elif self.right is not None:
            b = _solve(self.right, b, left=False)
        return a, b


def _solve(matrix: torch.Tensor, rhs: torch.Tensor, left: bool) -> torch.Tensor:
    """X with matrix·X = rhs (``left``) or X·matrix = rhs, in rhs's dtype: by substitution where
    matrix is triangular (a Cholesky factor S, or D = Sᵀ: k·n² flops), else by LU (the
    eigendecomposition fallback's symmetric root)."""
    matrix = matrix.to(rhs)
    for upper in (False, True):
        if torch.equal(matrix, matrix.triu() if upper else matrix.tril()):
            return torch.linalg.solve_triangular(matrix, rhs, upper=upper, left=left)
    return torch.linalg.solve(matrix, rhs, left=left)


# What a Gram ``whitening`` is given (or ``output_weights``' diagonal) is made of, why it may be all zero, and
# what a layer gets where it is unusable.
_GRAM_OF = {
    "inputs": ("calibration inputs", "", "no input whitening (plain SVD on that side)"),
    "output gradients": (
        "output gradients",
        " (the loss does not reach it)",
        "no output weighting by the loss (plain SVD on that side)",
    ),
    # the refit's G̃: where it is unusable the refit of its layers is skipped (``compress._refit``)
    "refit inputs": ("refit's calibration inputs", "", "not refitted (the first-pass factors are kept)"),
    # its target W·C·G̃⁻¹ (finite weights and G̃: the dense model's inputs in C are not), skipped the same way
    "refit target": ("refit target values", "", "not refitted (the first-pass factors are kept)"),
}


def warn_unusable(of: str, layer: str | Sequence[str] | None, finite: bool) -> None:
    """Say that the statistics ``of`` (a key of ``_GRAM_OF``) of ``layer`` are all zero or not finite, and what
    the layer gets instead."""
    what, why_zero, fallback = _GRAM_OF[of]
    where = _layers_named(layer)
    if finite:
        logger.warning("the %s of %s are all zero%s: %s", what, where, why_zero, fallback)
    else:
        logger.warning("the %s of %s have NaN/Inf: %s", what, where, fallback)


def warn_unreached(layers: Sequence[str]) -> None:
    """Say once which ``layers`` the loss never reached: gradients were collected, none at their outputs (a bare
    BertModel's pooler), so they get no output weighting."""
    fallback = _GRAM_OF["output gradients"][2]
    logger.warning("the loss never reaches %s (no output gradients): %s", _layers_named(layers), fallback)


def whitening(
    gram: torch.Tensor,
    damping: float,
    inverse: bool = True,
    of: str = "inputs",
    layer: str | Sequence[str] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """S with S·Sᵀ = the damped Gram (its lower Cholesky factor, float64) and S⁻¹ (None without
    ``inverse``: ``Weighting.unwhiten`` solves with S instead).

    A Gram that is indefinite beyond the damping (round-off on a singular Gram can be) falls back to
    the symmetric root of an eigendecomposition, whose negative eigenvalues are clipped first: it
    never fails. A zero or non-finite one gives None, with a warning that says which Gram (``of``: a
    key of ``_GRAM_OF``; K-FAC whitens the output gradients' too) of which ``layer`` (or layers: q/k/v
    read one input, whose Gram is whitened once for all of them).
    """
    gram = gram.double()
    if not torch.isfinite(gram).all():
        warn_unusable(of, layer, finite=False)
        return None, None
    scale = gram.diagonal().mean().item()
    if scale <= 0:
        warn_unusable(of, layer, finite=True)
        return None, None
    damped = (gram + gram.T).mul_(0.5)  # symmetric
    damped.diagonal().add_(damping * scale)  # in place: no (n, n) identity and sum
    root, info = torch.linalg.cholesky_ex(damped)
    del damped
    if info.item() == 0:
        if not inverse:
            return root, None
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        return root, torch.linalg.solve_triangular(root, eye, upper=False)
    eigenvalues, vectors = on_cpu_if_it_fails(torch.linalg.eigh, (gram + gram.T).mul_(0.5))
    eigenvalues = eigenvalues.clamp_min(0) + damping * scale
    roots = eigenvalues.sqrt()
    right = (vectors * roots) @ vectors.T
    return right, (vectors / roots) @ vectors.T if inverse else None


def _layers_named(layer: str | Sequence[str] | None) -> str:
    """'layer NAME', 'layers NAME, NAME' or 'a layer', as a warning names them."""
    names = [layer] if isinstance(layer, str) else list(layer or ())
    if not names:
        return "a layer"
    return f"layer{'s' * (len(names) > 1)} {', '.join(names)}"


def output_weights(
    stats: LayerStats, damping: float, full: bool = False, layer: str | None = None
) -> torch.Tensor | None:
    """D of one layer (named ``layer`` in a warning): diag √E[g²], or with ``full`` a square root
    (DᵀD = E[g gᵀ]) where it was collected. None without gradient statistics, and, with a warning, where they
    are all zero (the loss does not reach the layer: an attention block whose o_proj is zero) or not finite."""
    said = False  # the Gram's warning covers its diagonal: said once
    if full and stats.out_grad_gram is not None:
        gram = stats.out_grad_gram
        root = whitening(gram, damping, inverse=False, of="output gradients", layer=layer)[0]  # never inverted
        if root is not None:
            return root.T  # S·Sᵀ = G, so D = Sᵀ
        said = True
    if stats.out_grad_sq is None:
        return None
    grad_sq = stats.out_grad_sq.double()
    finite = bool(torch.isfinite(grad_sq).all())
    mean = grad_sq.mean().item()
    if not finite or mean <= 0:
        if not said:
            warn_unusable("output gradients", layer, finite)
        return None
    return (grad_sq + damping * mean).sqrt()


def on_cpu_if_it_fails(solver, matrix: torch.Tensor):
    """``solver(matrix)``, redone on the CPU where a GPU solver fails (cuSOLVER does not always
    converge; ``decompose.factorize`` does the same for the SVD); results on the matrix's device."""
    try:
        return solver(matrix)
    except (torch.linalg.LinAlgError, RuntimeError) as err:
        if matrix.device.type == "cpu":
            raise
        logger.warning("%s on %s failed (%s): redone on the CPU", solver.__name__, matrix.device, err)
        result = solver(matrix.cpu())
        if isinstance(result, torch.Tensor):
            return result.to(matrix.device)
        return tuple(t.to(matrix.device) for t in result)  # eigh's (values, vectors)
