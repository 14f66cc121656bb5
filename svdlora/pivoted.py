"""Pivoted factors: a rank-R matrix stored in R·(out + in − R) values (and R int64 indices) instead of R·(out + in).

A rank-R matrix Ŵ = A·B (out × in) has R linearly independent rows; every other row is a linear
combination of them. Storing those R *pivot rows* P = Ŵ[I] (R × in) and the coefficients
C = A[rest]·A[I]⁻¹ ((out − R) × R) represents Ŵ exactly (Ŵ[rest] = C·P) with R² values fewer
than the pair (A, B): the idea of PIFA (Zhao et al., "Pivoting Factorization", ICML 2025).
At budget 0.5 on a square matrix that is about 17% more rank for the same parameters, and
budget 1.0 reaches full rank. The forward pass is two smaller matmuls: z = P·x gives the pivot
outputs, C·z the others, and one gather puts them back in order.

The pivots are chosen by LU with partial pivoting on A (float64; on an orthonormal basis of
A's columns where A is rank deficient), which keeps |C| moderate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from .layers import LowRankLinear, factor_layout

# LU pivots of A below this share of the largest mean A is (numerically) rank deficient.
_MIN_PIVOT = 1e-9


# The pivot indices are stored as int64, whatever the factors' dtype.
INDEX_BYTES = 8


def pivoted_params(out_features: int, in_features: int, rank: int) -> int:
    """Float values of a rank-``rank`` matrix in pivoted form: P and C (the pivot indices not counted)."""
    return rank * (out_features + in_features - rank)


def index_values(dtype: torch.dtype) -> int:
    """Values of ``dtype`` (a float of 1 to 8 bytes) one int64 pivot index takes: 4 in bfloat16, 2 in float32."""
    return INDEX_BYTES // dtype.itemsize


def pivoted_values(out_features: int, in_features: int, rank: int, dtype: torch.dtype) -> int:
    """What a rank-``rank`` pivoted matrix stored in ``dtype`` costs the budget, in values of ``dtype``:
    P and C, and the R pivot indices at ``index_values`` each (a budget that left them out was exceeded:
    a tiny bfloat16 Llama at budget 0.999 stored 106% of its dense bytes)."""
    return pivoted_params(out_features, in_features, rank) + rank * index_values(dtype)


def pivoted_bytes(out_features: int, in_features: int, rank: int, dtype: torch.dtype) -> int:
    """Stored bytes: pivot rows and coefficients in ``dtype``, and the int64 pivot indices."""
    return pivoted_values(out_features, in_features, rank, dtype) * dtype.itemsize


def pivot_factors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pivot rows index I, coefficients C, pivot rows P) with A·B = P on rows I and C·P on the others.

    I is sorted; the other rows are the complement of I in increasing order. The pivots are those
    of LU with partial pivoting on A, which are the pivots of any basis Q·R = A of its columns
    (row operations commute with R), and C = A[rest]·A[I]⁻¹ = Q[rest]·Q[I]⁻¹ = L₂·L₁⁻¹ with that
    LU's unit lower factor. Where A is rank deficient (a zero singular value, an all-zero weight)
    they are taken on an orthonormal Q instead, which still has R independent rows to pivot on;
    the QR is only taken then.
    """
    work = a.detach().double()
    b = b.detach().double()
    factors, swaps, _ = torch.linalg.lu_factor_ex(work)
    pivots = factors.diagonal().abs()
    if pivots.numel() and not pivots.min() > _MIN_PIVOT * pivots.max():
        work, triangle = torch.linalg.qr(work)
        b = triangle @ b  # A·B = Q·(R·B)
        factors, swaps = torch.linalg.lu_factor(work)
    out_features, rank = work.shape
    order = list(range(out_features))
    for i, p in enumerate((swaps - 1).tolist()):  # LAPACK row swaps, applied in turn
        order[i], order[p] = order[p], order[i]
    # A[order] = L·U with L unit lower trapezoidal, so C = A[rest]·A[I]⁻¹ = L₂·L₁⁻¹: one triangular
    # solve on the LU already taken (its first R rows hold L₁ below the diagonal, which is all the
    # solve reads; the rows below are L₂), in the LU's row order, then both orders sorted.
    coefficients = torch.linalg.solve_triangular(
        factors[:rank], factors[rank:], upper=False, left=False, unitriangular=True
    )
    perm = torch.tensor(order, dtype=torch.long, device=a.device)
    rows, columns = perm[:rank].sort()
    rest, others = perm[rank:].sort()
    coefficients = coefficients[others][:, columns]
    pivot = work[rows] @ b
    return rows, coefficients.to(a.dtype), pivot.to(a.dtype)


def pivoted_a(coefficients: torch.Tensor, rows: torch.Tensor, out_features: int) -> torch.Tensor:
    """The pair's A (out, R) of pivoted factors: the identity on the pivot rows, C on the others."""
    total = rows.numel()
    a = coefficients.new_zeros(out_features, total)
    a[rows, torch.arange(total, device=a.device)] = 1
    a[_complement(rows, out_features)] = coefficients
    return a


def pivoted_weight(pivot: torch.Tensor, coefficients: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The (out, in) matrix of pivoted factors: the pivot rows P on rows I, C·P on the others."""
    out_features = pivot.shape[0] + coefficients.shape[0]
    weight = pivot.new_empty(out_features, pivot.shape[1])
    weight[rows] = pivot
    weight[_complement(rows, out_features)] = coefficients @ pivot
    return weight


def pivoted_outputs(z, coefficients, rows, rest, bias, out_features: int) -> torch.Tensor:
    """A pivoted layer's outputs from its pivot outputs z: z on rows I, C·z on the others."""
    # two index copies into the output: faster on a CPU than concatenating and gathering the columns
    out = z.new_empty(*z.shape[:-1], out_features)
    out.index_copy_(-1, rows, z)
    out.index_copy_(-1, rest, F.linear(z, coefficients))
    # in out's dtype, as F.linear adds it: under autocast a float32 bias would promote the outputs
    return out if bias is None else out + bias.to(out.dtype)


# a leaf of torch.fx.symbolic_trace: its output shape unpacks z.shape, which a Proxy cannot
# (z.new_empty(z.shape[:-1] + (out,)) traces but costs the eager forward ~1 us a call)
torch.fx.wrap("pivoted_outputs")


def version_stamp(t: torch.Tensor) -> int | None:
    """A tensor's version counter (bumped by every in-place write), or None where it has none
    (an inference tensor: made under ``inference_mode``, a folder loaded there, say)."""
    return None if t.is_inference() else t._version


def valid_rows(rows: torch.Tensor, out_features: int) -> bool:
    """Whether ``rows`` can be pivot indices: strictly increasing, within [0, out_features)."""
    if rows.device.type == "meta" or rows.dtype != torch.long or rows.dim() != 1 or rows.numel() > out_features:
        return False
    if not rows.numel():
        return True
    return int(rows[0]) >= 0 and int(rows[-1]) < out_features and bool((rows[1:] > rows[:-1]).all())


def values_hidden(rows: torch.Tensor) -> bool:
    """Whether the pivot indices are traced rather than held, outside torch.compile: a fake or proxy
    tensor mode (FakeTensorMode, make_fx) or fake indices, whose values ``valid_rows`` cannot read
    (a data-dependent error), or torch.jit.trace, whose check traces again and would find the cache
    the first trace filled (another graph). Nothing traced fills the eager cache. Checked on a miss only."""
    modes = (torch._C._TorchDispatchModeKey.FAKE, torch._C._TorchDispatchModeKey.PROXY)
    fake = any(torch._C._get_dispatch_mode(mode) is not None for mode in modes) or is_fake(rows)
    return fake or torch.jit.is_tracing()


def _complement(rows: torch.Tensor, size: int) -> torch.Tensor:
    """The indices in [0, size) not in ``rows``, increasing. Of a static shape (size − len(rows)), not
    found by nonzero(): torch.compile traces it, and it runs on the meta device."""
    mask = rows.new_ones(size, dtype=torch.int8).index_fill(0, rows, 0)  # as ``rows``: fake ones stay fake
    return torch.argsort(mask, stable=True)[rows.numel() :]


class PivotedLowRankLinear(LowRankLinear):
    """``y = gather(cat(P·x, C·P·x)) + bias``: a ``LowRankLinear`` stored in pivoted form.

    ``B`` holds the pivot rows P (R, in), ``C`` the coefficients (out − R, R) and the buffer
    ``rows`` the pivot row indices I (R,). ``A`` (out, R: identity on rows I, C elsewhere) is
    built on demand for code that wants the pair (export, merging); the forward pass never
    builds it. ``ranks`` keeps the stage split of the factorization the pivots were taken from.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        ranks: list[int],
        bias: bool = True,
        base_kind: str = "linear",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        nn.Module.__init__(self)
        total = sum(ranks)
        if not ranks or min(ranks) < 1 or total > min(in_features, out_features):
            raise ValueError(f"ranks must be positive ints summing to at most min(in, out), got {ranks}")
        self.in_features, self.out_features = in_features, out_features
        self.ranks = list(ranks)
        self.base_kind = base_kind
        self.stage_dtypes = None
        self.stored = None
        self.full = None
        self.B = nn.Parameter(torch.empty(total, in_features, device=device, dtype=dtype))
        self.C = nn.Parameter(torch.empty(out_features - total, total, device=device, dtype=dtype))
        self.register_buffer("rows", torch.zeros(total, dtype=torch.long, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self._gather_key = self._gather_rows = None
        self._gather = None

    @classmethod
    def from_factors(cls, module: nn.Module, a: torch.Tensor, b: torch.Tensor, ranks: list[int]):
        """The pivoted layer replacing ``module`` whose product equals ``a``·``b`` (up to round-off)."""
        layer = cls.shaped_for(module, ranks)
        rows, coefficients, pivot = pivot_factors(a, b)
        with torch.no_grad():
            layer.rows.copy_(rows)
            layer.C.copy_(coefficients)
            layer.B.copy_(pivot)
            if module.bias is not None:
                layer.bias.copy_(module.bias)
        return layer

    @property
    def A(self) -> torch.Tensor:  # noqa: N802 (the pair's name everywhere else)
        return pivoted_a(self.C, self.rows, self.out_features)

    def factor_parameters(self) -> list[nn.Parameter]:
        return [self.C, self.B]

    def to_pairs(self) -> LowRankLinear:
        """The same product as a plain pair (A, B): A is the identity on the pivot rows and C on the
        others, B the pivot rows (shared, not copied). R² values more than pivoted, but the forward is
        two matmuls without the index copies, which is faster where those dominate (small layers on a
        CPU, batch-1 GEMVs on a GPU; ``runtime="auto"`` measures it)."""
        pair = LowRankLinear(
            self.in_features, self.out_features, [sum(self.ranks)], bias=False,
            base_kind=self.base_kind, device="meta", dtype=self.B.dtype,
        )  # fmt: skip
        with torch.inference_mode(False):  # a normal tensor even when converted under inference_mode
            pair.A = nn.Parameter(factor_layout(self.A.detach()), requires_grad=self.C.requires_grad)
        pair.B, pair.bias = self.B, self.bias
        return pair.train(self.training)

    def stages(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.A, self.B)]  # the stages were summed into one pivoted pair

    def dense_weight(self) -> torch.Tensor:
        # a skeleton transformers initializes has no factors yet; traced indices have no values to check (under
        # torch.compile reading them broke the graph: T5's forward reads self.wo.weight.dtype)
        tracing = torch.compiler.is_compiling() or values_hidden(self.rows)
        if not tracing and not valid_rows(self.rows, self.out_features):
            return self.B.new_zeros(self.out_features, self.in_features)
        return pivoted_weight(self.B, self.C, self.rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, rest = self._traced_indices() if torch.compiler.is_compiling() else self._indices()
        return pivoted_outputs(F.linear(x, self.B), self.C, rows, rest, self.bias, self.out_features)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        # a load copies into ``rows`` in place: the same tensor, so the compiled path's identity
        # check would keep the old indices; forget them
        super()._load_from_state_dict(*args, **kwargs)
        self._gather_key = self._gather_rows = self._gather = None

    def _traced_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``_indices`` under torch.compile, which cannot trace the cache's key (a data pointer).

        The cache an eager call left (a prefill, say) while ``rows`` is still the tensor it was made
        from (dynamo guards that identity); else the complement sorted inside the graph, correct but
        several kernels per layer (with it, the H200's 1B-shaped pivoted model decoded at 0.40x dense
        under CUDA graphs; BENCHMARKS.md section 7).
        """
        if self._gather is not None and self._gather_rows is self.rows:
            return self._gather
        return self._indices_in_graph()

    def _indices_in_graph(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(pivot rows, other rows) computed by the graph a trace records, from ``rows`` as it holds them."""
        return self.rows, _complement(self.rows, self.out_features)

    def _indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(pivot rows, other rows), cached until the ``rows`` buffer changes; a trace outside
        torch.compile that finds no cache computes them in its graph (``values_hidden``)."""
        try:
            key = (self.rows.data_ptr(), version_stamp(self.rows), self.rows.device)
        except RuntimeError:  # a tensor without storage: make_fx(tracing_mode="fake") passed it as the buffer
            return self._indices_in_graph()
        if key != self._gather_key:
            if values_hidden(self.rows):
                return self._indices_in_graph()
            # rows not loaded yet (transformers initializes a skeleton through ``weight``): any order will do
            rows = self.rows if valid_rows(self.rows, self.out_features) else torch.arange(sum(self.ranks))
            # normal tensors even when first called under inference_mode: index_copy_ saves its index
            # for backward, and training the model later would fail on a cached inference tensor
            with torch.inference_mode(False):
                rows = rows.to(self.rows.device)
                self._gather = (rows, _complement(rows, self.out_features))
            self._gather_key, self._gather_rows = key, self.rows
        return self._gather

    def extra_repr(self) -> str:
        return super().extra_repr() + ", pivoted=True"
