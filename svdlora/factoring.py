"""What factorizing one matrix needs besides the math (``decompose``): the SVD settings a config gives and
the device they run on, the matrix's report line, and the checks that its values are finite. Shared by the
in-memory run (``compress``) and the streamed one (``streaming.jobs``)."""

from __future__ import annotations

import os

import torch
from torch import nn

from .config import CompressionConfig
from .decompose import choose_method, relative_error
from .errors import SvdloraError
from .pivoted import pivoted_a
from .quantize import dtype_name
from .report import ModuleReport


def svd_options(config: CompressionConfig) -> dict:
    """The keyword arguments of ``decompose.factorize`` for a config."""
    return {
        "method": config.svd_method,
        "reference": config.svd_reference,
        "oversampling": config.oversampling,
        "power_iterations": config.power_iterations,
        "generator_seed": config.seed,
        "device": svd_device(config.svd_device),
    }


def chain_options(config: CompressionConfig) -> dict:
    """``svd_options`` for the stage-list factorizations (``chain.quantized_chain``, the refit's
    ``methods.factorize``): no exact-error reference, the SVD runs where the weight is."""
    options = svd_options(config)
    return {k: options[k] for k in ("method", "oversampling", "power_iterations", "generator_seed")}


def chain_method(config: CompressionConfig, shape: tuple[int, int], ranks: list[int]) -> str | None:
    """The SVD a stage chain's low-rank stages run, for its report line: each stage is its own SVD of the residual
    (``chain.quantized_chain``), so each chooses for its own rank ('auto': ``choose_method``), 'randomized'
    where any of them does, else 'exact'; None where every stage is full-rank (rank 0: no SVD)."""
    methods = {choose_method(shape, min(r, *shape), config.svd_method, config.oversampling) for r in ranks if r}
    if not methods:
        return None
    return "randomized" if "randomized" in methods else "exact"


def rank_factorizes_nothing(rank: int, layers: int) -> SvdloraError:
    """The CLI's refusal of a --rank that leaves every layer dense (it would write a copy of the model)."""
    return SvdloraError(
        f"--rank {rank} factorizes none of the {layers} Linear/Conv1D layers (the factors would not be "
        "smaller than any of them): pass a smaller --rank"
    )


def svd_device(name: str | None) -> str | None:
    """The device the SVD runs on; under torchrun, "cuda" means this process's GPU (LOCAL_RANK)."""
    if name is None:
        return None
    try:
        torch.device(name)
    except RuntimeError:  # torch's message lists every backend it knows; the user needs three
        raise SvdloraError(f"--device must be like 'cpu', 'cuda' or 'cuda:0', got {name!r}") from None
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SvdloraError(f"--device {name}: no CUDA device is available here; drop --device to use the CPU")
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        name = f"cuda:{os.environ['LOCAL_RANK']}"
        if int(os.environ["LOCAL_RANK"]) >= torch.cuda.device_count():  # more processes than GPUs on this node
            raise SvdloraError(
                f"--device cuda: this process (LOCAL_RANK {os.environ['LOCAL_RANK']}) would take {name}, and this "
                f"machine has {torch.cuda.device_count()} CUDA device(s): start one process per GPU "
                "(--nproc_per_node), or pass --device cuda:0 to share one"
            )
    if name.startswith("cuda") and (torch.device(name).index or 0) >= torch.cuda.device_count():
        raise SvdloraError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def module_report(
    name: str, kind: str, out_features: int, in_features: int, bias: bool, f, est_loss: float | None = None
) -> ModuleReport:
    """The report line of one factorized matrix (``f`` a ``decompose.Factorization``)."""
    return ModuleReport(
        name,
        kind,
        (out_features, in_features),
        bias=bias,
        ranks=f.ranks,
        stage_dtypes=[dtype_name(f.a.dtype)] * len(f.ranks),
        rel_error=f.rel_error,
        svd_method=f.method,
        exact_error=f.exact_error,
        est_loss=est_loss,
    )


def measure_pivoted(line: ModuleReport, weight: torch.Tensor, rows, coefficients, pivot) -> None:
    """Set a pivoted line's error to that of what is stored: the pivot rows P and coefficients C.

    They are rounded from float64 to the weight's dtype separately from the pair (A, B) the error was
    measured on: the same matrix in float32 (round-off), but in bfloat16 at rank 100 of 128x256 the
    pair's error was 0.0026 and the stored P, C's 0.0049. Measured there only (an m·n·R product)."""
    if pivot.dtype in (torch.float32, torch.float64):
        return
    with torch.no_grad():
        line.rel_error = relative_error(weight, (pivoted_a(coefficients, rows, weight.shape[0]), pivot))
    if line.svd_method == "exact":  # the exact SVD's factors, as stored: no SVD cost on top
        line.exact_error = line.rel_error


def check_finite(model: nn.Module, role: str = "the model") -> None:
    """Every stored tensor, not only the targets: a NaN bias or an Inf embedding ruins the output too.
    ``role`` names the model in the message ("the tuned model" where extract reads two)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and tensor.device.type != "meta" and not all_finite(tensor):
            raise SvdloraError(f"tensor {name!r} of {role} contains NaN or Inf: fix or replace the checkpoint")


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf: min and max propagate both, read in one pass without a boolean copy of the tensor."""
    if not tensor.numel():
        return True
    try:
        low, high = torch.aminmax(tensor.detach())
    except (NotImplementedError, RuntimeError):  # dtypes without aminmax (float8 variants)
        return bool(torch.isfinite(tensor.detach().float()).all())
    return bool(torch.isfinite(low) & torch.isfinite(high))
