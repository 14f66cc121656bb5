"""--svd auto|exact|randomized: the rule, the error bound on known spectra, the reported cost."""

import math
import re

import pytest
import torch

from svdlora import compress
from svdlora.decompose import choose_method, factorize, optimal_relative_error, relative_error, truncated_svd
from tests.conftest import tiny_llama


def with_spectrum(out_f: int, in_f: int, sigma: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """U·diag(σ)·Vᵀ with random orthonormal U, V: a matrix whose singular values are known."""
    g = torch.Generator().manual_seed(seed)
    k = sigma.numel()
    u, _ = torch.linalg.qr(torch.randn(out_f, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_f, k, generator=g, dtype=torch.float64))
    return ((u * sigma) @ v.T).float()


def tail(sigma: torch.Tensor, rank: int) -> float:
    return (sigma[rank:].square().sum() / sigma.square().sum()).sqrt().item()


SPECTRA = {
    "flat": lambda n: torch.ones(n, dtype=torch.float64),  # worst case for a sketch
    "power 1/i": lambda n: 1 / torch.arange(1, n + 1, dtype=torch.float64),
    "geometric 0.97": lambda n: 0.97 ** torch.arange(n, dtype=torch.float64),
}


@pytest.mark.parametrize("name", SPECTRA)
def test_randomized_error_within_halko_bound(name):
    """Halko, Martinsson & Tropp (2011), Thm 10.5 + truncation: with a sketch of k + p columns,
    E‖W − Ŵ_k‖_F <= (1 + √(1 + k/(p−1))) · ‖W − W_k‖_F; power iterations only tighten it."""
    m, n, k, p = 300, 200, 30, 8
    sigma = SPECTRA[name](n)
    w = with_spectrum(m, n, sigma)
    best = tail(sigma, k)
    assert optimal_relative_error(w, k) == pytest.approx(best, rel=1e-4)
    bound = (1 + math.sqrt(1 + k / (p - 1))) * best
    for power_iterations in (0, 2):
        a, b = truncated_svd(
            w, k, method="randomized", oversampling=p, power_iterations=power_iterations, generator_seed=0
        )
        err = torch.linalg.matrix_norm(w.double() - a @ b).item() / torch.linalg.matrix_norm(w.double()).item()
        assert best - 1e-6 <= err <= bound, (power_iterations, err, best, bound)
    # With decaying spectra, two power iterations come within 2% of the exact SVD.
    if name != "flat":
        assert err <= 1.02 * best


def test_factorize_reports_the_cost_against_exact():
    sigma = SPECTRA["power 1/i"](600)
    w = with_spectrum(700, 600, sigma, seed=1)
    f = factorize(w, [50, 50], method="randomized", power_iterations=1, generator_seed=0)
    assert f.method == "randomized"
    assert f.exact_error == pytest.approx(tail(sigma, 100), rel=1e-4)
    assert f.rel_error >= f.exact_error - 1e-6
    exact = factorize(w, [50, 50], method="exact")
    assert exact.method == "exact" and exact.exact_error == exact.rel_error
    assert exact.rel_error == pytest.approx(f.exact_error, rel=1e-4)


def test_auto_rule():
    assert choose_method((4096, 4096), 1024) == "randomized"  # budget 0.5 on a square matrix
    assert choose_method((4096, 4096), 2000) == "exact"  # most of the spectrum is kept
    assert choose_method((256, 1024), 20) == "exact"  # small: exact costs milliseconds
    assert choose_method((768, 3072), 307) == "exact"  # 0.4 of min(m, n)
    assert choose_method((576, 1536), 100) == "exact"  # below 1024 columns the sketch saves milliseconds
    assert choose_method((4096, 4096), 1024, "exact") == "exact"


def test_wide_matrix_factorized_through_its_transpose_is_the_same_svd():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 90, generator=g, dtype=torch.float64)
    a, b = truncated_svd(w, 10)
    at, bt = truncated_svd(w.T.contiguous(), 10)
    assert torch.allclose(a @ b, (at @ bt).T, atol=1e-10)
    assert torch.allclose(a.norm(dim=0), b.norm(dim=1), atol=1e-10)  # still balanced


def test_info_table_shows_the_randomized_cost():
    torch.manual_seed(0)
    model = tiny_llama()
    report = compress(model, rank=2, svd_method="randomized", progress=False)
    assert all(m.svd_method == "randomized" and m.svd_cost is not None for m in report.factorized)
    assert all(m.svd_cost >= -1e-6 for m in report.factorized)
    text = report.format()
    assert "randomized SVD" in text and "vs exact" in text


def test_svd_device_falls_back_when_the_solver_fails(monkeypatch, caplog):
    import svdlora.decompose as dec

    w = with_spectrum(60, 40, SPECTRA["power 1/i"](40))
    want = factorize(w, [5, 5], method="exact")
    original, calls = dec.residual_svd, []

    def failing_once(*args, **kwargs):  # what a cuSOLVER convergence failure raises
        calls.append(1)
        if len(calls) == 1:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return original(*args, **kwargs)

    monkeypatch.setattr(dec, "residual_svd", failing_once)
    got = factorize(w, [5, 5], method="exact", device=torch.device("cpu", 0))  # another device than w's
    assert len(calls) == 2 and "failed" in caplog.text
    assert torch.equal(got.a, want.a) and torch.equal(got.b, want.b) and got.a.device == w.device


def test_cuda_device_without_cuda_is_one_clear_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from svdlora.cli import main

    assert main(["compress", "gpt2", "-o", str(tmp_path / "o"), "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_a_malformed_device_is_one_clear_error_before_the_load(tmp_path, capsys):
    """A typo in --device was a raw RuntimeError ('a bug in svdlora') after the model had loaded."""
    from svdlora.cli import main

    assert main(["compress", "gpt2", "-o", str(tmp_path / "o"), "--device", "gpu"]) == 2
    assert "--device must be like 'cpu', 'cuda' or 'cuda:0', got 'gpu'" in capsys.readouterr().err


@pytest.mark.parametrize("name", SPECTRA)
@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])
def test_exact_route_matches_lapack(name, shape):
    """--svd exact takes the Gram matrix's eigenvectors: the same error as LAPACK's SVD, balanced factors."""
    from svdlora.decompose import _gram_svd, _lapack_svd

    m, n = shape
    sigma = SPECTRA[name](min(m, n))
    w = with_spectrum(m, n, sigma, seed=2)  # float32: the route used for large matrices
    k = 60
    a, b = _gram_svd(w, k)
    u, s, vh = _lapack_svd(w, k)
    err = (torch.linalg.matrix_norm(w.double() - (a @ b).double()) / torch.linalg.matrix_norm(w.double())).item()
    lapack = torch.linalg.matrix_norm(w.double() - ((u * s) @ vh).double()) / torch.linalg.matrix_norm(w.double())
    assert err == pytest.approx(lapack.item(), rel=1e-5)
    assert err == pytest.approx(tail(sigma, k), rel=1e-4)
    assert torch.allclose(a.norm(dim=0), b.norm(dim=1), rtol=1e-4)  # √σ on both sides
    assert torch.allclose(a.norm(dim=0).square(), s.float(), rtol=1e-4)  # the singular values, in order


@pytest.mark.parametrize("shape", [(700, 301), (301, 700), (90, 40), (1, 500)])
def test_lower_gram_is_the_gram_below_the_diagonal(shape):
    """The blocked Gram (uneven blocks here) equals W's Gram where the eigensolvers read it."""
    from svdlora.decompose import _lower_gram

    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    side = w if shape[0] <= shape[1] else w.T
    gram = _lower_gram(w)
    full = side.double() @ side.double().T
    assert gram.shape == full.shape
    assert torch.allclose(torch.tril(gram).double(), torch.tril(full), rtol=1e-5, atol=1e-3)
    assert torch.allclose(torch.linalg.eigvalsh(gram).double(), torch.linalg.eigvalsh(full), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("scale", [1e20, 1e-25, 1.0])
def test_exact_route_at_extreme_scales(scale):
    """The Gram squares W: scaled first, entries near 1e19 or 1e-26 neither overflow nor vanish."""
    sigma = SPECTRA["power 1/i"](300)
    w = with_spectrum(400, 300, sigma, seed=5) * scale  # float32, above the float64 size limit
    f = factorize(w, [100], method="exact")
    assert torch.isfinite(f.a).all() and torch.isfinite(f.b).all()
    assert f.rel_error == pytest.approx(tail(sigma, 100), rel=1e-4)


def test_exact_route_outlier_spectrum_matches_lapack():
    """One dominant singular value over a flat tail: the Gram's round-off (ε·σ₁²) would swamp the
    tail's ordering, so the route hands over to LAPACK and the error is LAPACK's."""
    from svdlora.decompose import _gram_svd, _lapack_svd

    sigma = torch.cat([torch.tensor([100.0]), torch.linspace(1, 0.05, 511)]).double()  # λ_k/λ₁ = 2.8e-5
    w = with_spectrum(512, 512, sigma, seed=6)
    assert _gram_svd(w, 256) is None
    a, b = truncated_svd(w, 256)
    u, s, vh = _lapack_svd(w, 256)
    assert relative_error(w, (a, b)) == pytest.approx(relative_error(w, ((u * s), vh)), rel=1e-6)


def test_float64_keeps_lapack_precision():
    g = torch.Generator().manual_seed(7)
    sigma = 0.8 ** torch.arange(200, dtype=torch.float64)
    u, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(300, 200, generator=g, dtype=torch.float64))
    w = (u * sigma) @ v.T  # float64 throughout: the error is known to ~1e-15
    a, b = truncated_svd(w, 40)
    assert relative_error(w, (a, b)) == pytest.approx(tail(sigma, 40), rel=1e-9)


def test_exact_route_hands_tiny_errors_to_lapack():
    """Where almost nothing is left out, float32 Gram round-off would dominate: LAPACK takes over."""
    from svdlora.decompose import _gram_svd

    sigma = 0.5 ** torch.arange(100, dtype=torch.float64)  # σ₁/σ₃₀ = 5e8: beyond float32's Gram
    w = with_spectrum(150, 100, sigma, seed=3)
    assert _gram_svd(w, 30) is None
    a, b = truncated_svd(w, 30)
    err = (torch.linalg.matrix_norm(w.double() - (a @ b).double()) / torch.linalg.matrix_norm(w.double())).item()
    assert err < 1e-6
    assert _gram_svd(w, 2) is not None  # a quarter of the norm left out: the Gram route is safe


@pytest.mark.parametrize("shape", [(300, 200), (500, 200)])  # float64 and float32 work
def test_exact_route_zero_and_rank_deficient_matrices(shape):
    zero = torch.zeros(shape)
    a, b = truncated_svd(zero, 20)
    assert torch.isfinite(a).all() and torch.isfinite(b).all() and not (a @ b).any()
    low = with_spectrum(*shape, torch.tensor([3.0, 2.0, 1.0, 1.0, 0.5], dtype=torch.float64), seed=4)
    for rank in (3, 20):  # less, and more rank than the matrix has
        a, b = truncated_svd(low, rank)
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        best = tail(torch.tensor([3.0, 2.0, 1.0, 1.0, 0.5]), rank)
        err = torch.linalg.matrix_norm(low.double() - (a @ b).double()) / torch.linalg.matrix_norm(low.double())
        assert err.item() == pytest.approx(best, abs=1e-5)


@pytest.mark.parametrize("method", ["exact", "randomized"])
@pytest.mark.parametrize("name", SPECTRA)
@pytest.mark.parametrize("shape", [(120, 300), (300, 120)])
def test_projection_error_equals_the_measured_error(method, name, shape):
    """compress reports ‖W − A·B‖/‖W‖ from the factors' norms (projection_error) where it is
    precise; it must agree with the error measured on A·B, for one stage and for residual stages."""
    from svdlora.decompose import projection_error

    w = with_spectrum(*shape, SPECTRA[name](min(shape)))
    for ranks in ([30], [10, 10, 10]):
        f = factorize(w, ranks, method=method)
        measured = relative_error(w, (f.a, f.b))
        identity = projection_error(w, f.a, f.b)
        assert identity is not None  # errors here are 0.3-0.8: the identity is used
        assert identity == pytest.approx(measured, abs=2e-6)
        assert f.rel_error == pytest.approx(measured, abs=2e-6)


def test_projection_error_hands_small_errors_and_low_precision_to_the_direct_check():
    from svdlora.decompose import projection_error

    sigma = 0.9 ** torch.arange(100, dtype=torch.float64)
    w = with_spectrum(150, 100, sigma)
    f = factorize(w, [60], method="exact")  # error 0.9^60 ≈ 0.002: the sums nearly cancel
    assert projection_error(w, f.a, f.b) is None
    assert f.rel_error == pytest.approx(tail(sigma, 60), rel=1e-3)
    half = factorize(w.bfloat16(), [10], method="exact")  # factors rounded to bf16: not a projection
    assert projection_error(w.bfloat16(), half.a, half.b) is None
    assert half.rel_error == pytest.approx(relative_error(w.bfloat16(), (half.a, half.b)))


@pytest.mark.parametrize("method", ["exact", "randomized"])
@pytest.mark.parametrize("explicit", [False, True])
def test_projection_error_on_float32_matrices(method, explicit):
    """Matrices above _FLOAT64_MAX_ELEMENTS factorize in float32 (the Gram route, or a float32
    sketch), as every LLM matrix does: the identity stays within 1e-5 of the measured error."""
    from svdlora.decompose import _FLOAT64_MAX_ELEMENTS, projection_error, residual_svd

    sigma = 1 / torch.arange(1, 257, dtype=torch.float64).sqrt()
    w = with_spectrum(512, 256, sigma)
    assert w.numel() > _FLOAT64_MAX_ELEMENTS and w.dtype == torch.float32
    stages = residual_svd(w, [20, 20, 20], method=method, explicit=explicit)
    a = torch.cat([sa for sa, _ in stages], dim=1)
    b = torch.cat([sb for _, sb in stages], dim=0)
    assert a.dtype == torch.float32
    identity = projection_error(w, a, b)
    assert identity is not None
    assert identity == pytest.approx(relative_error(w, (a, b)), abs=1e-5)


@pytest.mark.parametrize(
    ("name", "local_rank", "refused"),
    [
        ("cuda", "1", "LOCAL_RANK 1) would take cuda:1, and this machine has 1 CUDA device(s): start one process"),
        ("cuda:1", None, "--device cuda:1: this machine has 1 CUDA device(s)"),
    ],
    ids=["torchrun-rank-without-a-gpu", "index"],
)
def test_a_gpu_this_machine_lacks_is_refused_before_the_load(monkeypatch, name, local_rank, refused):
    """torchrun --nproc_per_node 2 --device cuda on one GPU: rank 1 took cuda:1, which torch refuses only
    once the SVD (or the block pass) runs there, after the reads."""
    from svdlora.errors import SvdloraError
    from svdlora.factoring import svd_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    if local_rank is not None:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    with pytest.raises(SvdloraError, match=re.escape(refused)):
        svd_device(name)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert svd_device("cuda") == "cuda:0" and svd_device("cuda:0") == "cuda:0"


def test_a_randomized_svd_that_does_not_converge_is_taken_exactly(monkeypatch, caplog):
    """torch.svd_lowrank's inner SVD can fail to converge (seen on exactly repeated singular values): the
    matrix is then factorized exactly, with a warning, instead of the whole run failing."""

    def fails(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    weight = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    want = truncated_svd(weight, 5, method="exact")
    monkeypatch.setattr(torch, "svd_lowrank", fails)
    with caplog.at_level("WARNING", logger="svdlora.decompose"):
        got = truncated_svd(weight, 5, method="randomized", generator_seed=0)
    torch.testing.assert_close(got[0] @ got[1], want[0] @ want[1])
    assert "randomized SVD of a (40, 30) matrix failed (linalg.svd: The algorithm failed to converge)" in caplog.text
