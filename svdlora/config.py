"""What to compress and how: one dataclass, checked on construction."""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import asdict, dataclass, field

from .errors import SvdloraError, require_bool

SVD_METHODS = ("auto", "exact", "randomized")
# auto: kfac (or fisher, see plan.auto_method) with calibration data, else svd
METHODS = ("auto", "svd", "whiten", "fisher", "kfac")
ALLOCATIONS = ("auto", "uniform", "global")  # auto: global when gradient statistics exist
HEAL_LOSSES = ("distill", "lm")


@dataclass
class CompressionConfig:
    """Settings of one compression run.

    Example:
        >>> CompressionConfig(budget=0.5, submatrices=3, exclude=["*.attn.*"])
    """

    budget: float = field(
        default=0.5,
        metadata={
            "help": "Factors hold at most this fraction of the targeted matrices' parameters, in (0, 1] (pivoted "
            "factors with their int64 pivot indices, counted in values of the factors' dtype)."
        },
    )
    submatrices: int = field(
        default=1,
        metadata={"help": "Number n of residual SVD stages: W ≈ Σ_j A_j B_j."},
    )
    rank: int | None = field(
        default=None,
        metadata={"help": "Fixed total rank per matrix (split over the stages); overrides the budget."},
    )
    include: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module-name patterns to target (glob, or 're:<regex>'; a string is one pattern); default: "
            "every Linear/Conv1D."
        },
    )
    exclude: list[str] | str = field(
        default_factory=list,
        metadata={"help": "Module-name patterns to leave dense, on top of the default exclusions (a string is one)."},
    )
    keep_head: bool = field(
        default=True,
        metadata={"help": "Leave the output head (and any layer tied to an embedding) dense."},
    )
    svd_method: str = field(
        # exact by default: reproducible factors, the same as every earlier release; auto is opt-in
        default="exact",
        metadata={
            "help": "'exact' (the default: eigenvectors of the smaller Gram matrix, LAPACK's SVD where float32 "
            "round-off could matter), 'randomized' (torch.svd_lowrank), or 'auto': "
            "randomized where the kept rank is a small part of the matrix (svdlora.decompose.choose_method)."
        },
    )
    oversampling: int = field(
        default=8,
        metadata={"help": "Extra columns for the randomized SVD sketch."},
    )
    power_iterations: int = field(
        default=2,
        metadata={"help": "Subspace iterations of the randomized SVD."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the randomized SVD and of calibration sampling."})
    method: str = field(
        default="auto",
        metadata={
            "help": "'svd' (plain truncated SVD of W, the sources' method), 'whiten' (minimize the layer's "
            "output error on calibration inputs, SVD-LLM), 'fisher' (whiten, and weight each output by its "
            "loss gradient), 'kfac' (whiten inputs and output gradients: the Kronecker-factored Fisher; an "
            "(out, out) Gram per layer more), or 'auto' (with calibration data kfac, or fisher where kfac's "
            "Grams would exceed 4 GiB; else svd)."
        },
    )
    allocation: str = field(
        default="auto",
        metadata={
            "help": "'uniform' (every matrix the same fraction of its parameters), 'global' (all ranks chosen "
            "together from the loss each parameter buys; needs calibration), or 'auto' (global when possible)."
        },
    )
    calibration_samples: int = field(
        default=64, metadata={"help": "Calibration examples (text windows, images or sentences) to use."}
    )
    calibration_length: int = field(default=512, metadata={"help": "Tokens per calibration text window."})
    refit: bool = field(
        default=False,
        metadata={
            "help": "With calibration: refit each factorized layer to reproduce the dense layer's output from "
            "the inputs the compressed model feeds it (one more pass, no gradients). Off by default: on "
            "SmolLM2 at budget 0.8 it measured worse than without (BENCHMARKS.md, Quality)."
        },
    )
    refit_stages: bool = field(
        default=False,
        metadata={
            "help": "With --stage-dtypes: run the refit through the quantized chain too (off: it measured worse "
            "on SmolLM2, 31.70 vs 29.67 perplexity at 4.5 bits/w)."
        },
    )
    refit_samples: int = field(
        default=16,
        metadata={
            "help": "Calibration samples the refit pass uses (spread over all of them): its statistics cost two "
            "Gram products per layer input, so it reads fewer samples than the first pass."
        },
    )
    heal_steps: int = field(
        default=0, metadata={"help": "Fine-tuning steps of the factors after compression (0: no healing)."}
    )
    heal_seconds: float | None = field(default=None, metadata={"help": "Stop healing after this many seconds."})
    heal_loss: str = field(
        default="distill",
        metadata={"help": "'distill' (KL to the dense model's outputs) or 'lm' (the data's own next-token loss)."},
    )
    heal_lr: float = field(default=1e-4, metadata={"help": "Learning rate of healing (Adam)."})
    svd_device: str | None = field(
        default=None,
        metadata={"help": "Run the SVD on this device ('cuda', 'cuda:1'); default where the weight is."},
    )
    svd_reference: bool = field(
        default=True,
        metadata={"help": "For randomized factors, also compute the exact SVD's error (the accuracy cost)."},
    )
    pivot: bool = field(
        # off in the API, so code that trains or exports the pairs (A, B) keeps them; on in the CLI
        default=False,
        metadata={
            "help": "Store each factorized matrix in pivoted form (PIFA): its R pivot rows and the coefficients of "
            "the other rows, R·(out + in − R) values and R int64 indices (counted in the budget) instead of "
            "R·(out + in), so the same budget buys more rank (svdlora.pivoted). Float stages only (not with "
            "stage_dtypes). `svdlora compress` turns it on."
        },
    )
    rank_multiple: int = field(
        default=1,
        metadata={
            "help": "Round each matrix's total rank down to a multiple of this where it is at least that large "
            "(budget modes). 8 suits GPU inference: cuBLAS reads (out, R) bf16 factors much faster when R is a "
            "multiple of 8 (benchmarks/gpu_align.py). The budget is still respected; ranks are a little lower."
        },
    )
    stage_dtypes: list[str] | None = field(
        default=None,
        metadata={
            "help": "How each stage is stored, e.g. ['float32', 'int8'] (the last repeats up to submatrices): "
            "float32/float16/bfloat16, int8, int4[g128|g64|g32], or full-int8/full-int4 for a full-rank "
            "quantized first stage. The budget then counts bytes. Default: every stage in the model's dtype."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.budget, bool) or not isinstance(self.budget, numbers.Real):
            raise SvdloraError(f"budget must be a number in (0, 1], got {self.budget!r}")
        if not 0 < self.budget <= 1:
            raise SvdloraError(f"budget must be in (0, 1], got {self.budget}: pass e.g. --budget 0.5")
        if isinstance(self.submatrices, bool) or not isinstance(self.submatrices, numbers.Integral):
            raise SvdloraError(f"submatrices must be an integer >= 1, got {self.submatrices!r}")
        if self.submatrices < 1:
            raise SvdloraError(f"submatrices must be >= 1, got {self.submatrices}: pass e.g. --submatrices 3")
        if self.rank is not None and (
            isinstance(self.rank, bool) or not isinstance(self.rank, numbers.Integral) or self.rank < 1
        ):
            raise SvdloraError(f"rank must be an integer >= 1, got {self.rank!r}")
        # split_rank drops stages of rank 0: a fixed rank below the stage count would drop them in every matrix
        # (a budget's ranks differ per matrix: only the small ones hold fewer stages, which the report shows)
        if self.rank is not None and self.rank < self.submatrices:
            raise SvdloraError(
                f"rank {self.rank} cannot be split into {self.submatrices} submatrices (each stage holds rank 1 or "
                f"more): pass --submatrices {self.rank} or fewer, or --rank {self.submatrices} or more"
            )
        multiple = self.rank_multiple
        if isinstance(multiple, bool) or not isinstance(multiple, numbers.Integral) or multiple < 1:
            raise SvdloraError(f"rank_multiple must be an integer >= 1, got {multiple!r}")
        if multiple > 1 and self.rank is not None:
            raise SvdloraError(
                f"rank_multiple applies to budget modes; with a fixed rank pass a multiple of {multiple} as the rank"
            )
        if multiple > 1 and self.stage_dtypes:
            raise SvdloraError("rank_multiple cannot be combined with stage_dtypes (their ranks are priced in bytes)")
        if self.svd_method not in SVD_METHODS:
            raise SvdloraError(f"svd_method must be one of {SVD_METHODS}, got {self.svd_method!r}")
        for name, allowed in (("method", METHODS), ("allocation", ALLOCATIONS), ("heal_loss", HEAL_LOSSES)):
            if getattr(self, name) not in allowed:
                raise SvdloraError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("calibration_samples", "calibration_length", "refit_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise SvdloraError(f"{name} must be an integer >= 1, got {value!r}")
        steps = self.heal_steps
        check_heal_steps(steps, minimum=0)  # 0: no healing
        seconds = self.heal_seconds
        if seconds is not None and not (isinstance(seconds, numbers.Real) and seconds > 0):
            raise SvdloraError(f"heal_seconds must be a number > 0, got {self.heal_seconds!r}")
        if seconds is not None and not steps:  # else no step runs, and nothing says so
            raise SvdloraError(
                "--heal-seconds only stops healing early: pass --heal-steps N as well (the learning-rate "
                "schedule is laid out over the steps)"
            )
        check_heal_lr(self.heal_lr)
        if self.rank is not None and self.allocation == "global":
            raise SvdloraError(
                "allocation 'global' chooses ranks from the budget: drop --rank, or use --allocation uniform"
            )
        # torch: the CLI builds its flags from this module without it
        from .quantize import FULL_PREFIX, parse_stage_dtypes

        self.stage_dtypes = parse_stage_dtypes(self.stage_dtypes)
        if self.stage_dtypes and len(self.stage_dtypes) > self.submatrices:
            raise SvdloraError(
                f"{len(self.stage_dtypes)} stage dtypes ({','.join(self.stage_dtypes)}) for {self.submatrices} "
                f"submatrices: pass --submatrices {len(self.stage_dtypes)} or fewer dtypes"
            )
        full_only = self.stage_dtypes and self.submatrices == 1 and self.stage_dtypes[0].startswith(FULL_PREFIX)
        if self.heal_steps and full_only:
            raise SvdloraError(
                f"healing trains the low-rank factors and --stage-dtypes {self.stage_dtypes[0]} with --submatrices 1 "
                "stores none (the full-rank stage stays as stored): pass --submatrices 2 for a low-rank repair "
                "stage, or drop --heal-steps"
            )
        if self.pivot and self.stage_dtypes:
            raise SvdloraError("--pivot stores float factors: it does not combine with --stage-dtypes; drop one")
        require_bool("pivot", self.pivot)
        if self.stage_dtypes and self.rank is not None:
            raise SvdloraError("--stage-dtypes works with a byte --budget, not a fixed --rank: drop one of them")
        self.budget = float(self.budget)
        self.submatrices = int(self.submatrices)
        if self.include is not None and not _pattern_list(self.include):  # not "no filter": every layer
            raise SvdloraError(
                f"include={self.include!r} names no layer: pass module name patterns (e.g. include=['*.mlp.*']), "
                "or include=None to target every Linear/Conv1D"
            )
        self.include = _pattern_list(self.include) or None
        self.exclude = _pattern_list(self.exclude)
        for flag, patterns in (("--include", self.include or []), ("--exclude", self.exclude)):
            _check_patterns(flag, patterns)  # before the slow load, not at the first module name

    def to_dict(self) -> dict:
        return asdict(self)


def config_or_options(config: CompressionConfig | None, options: dict) -> CompressionConfig:
    """The run's config, given whole (``config=``) or as keyword options (compress, extract), not both."""
    if config is None:
        return CompressionConfig(**options)
    if options:
        raise SvdloraError(f"pass either a config or keyword options, not both (got {sorted(options)})")
    return config


def check_heal_steps(steps, minimum: int) -> None:
    """Healing's step count (``heal_steps``, ``heal.heal(steps=)``, which needs one: 2.5 ran 3 steps)."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < minimum:
        raise SvdloraError(f"heal_steps must be an integer >= {minimum}, got {steps!r}")


def check_heal_lr(lr) -> None:
    """Healing's peak rate (``heal_lr``, ``heal.heal(lr=)``): 0 trains nothing, and inf passed '> 0' and
    diverged at healing's second step, after the whole compression."""
    if not (isinstance(lr, numbers.Real) and 0 < lr < math.inf):
        raise SvdloraError(f"heal_lr must be a finite number > 0, got {lr!r}")


def _pattern_list(patterns) -> list:
    """A lone string is one pattern (``include="*.mlp.*"``): list() of it would give one pattern per character."""
    return [patterns] if isinstance(patterns, str) else list(patterns or [])


def _check_patterns(flag: str, patterns: list[str]) -> None:
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise SvdloraError(f"{flag} takes module name patterns (strings), got {pattern!r}")
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as err:
                raise SvdloraError(
                    f"{flag}: invalid regex pattern {pattern!r}: {err} (after 're:' comes a Python regex matched "
                    r"against the whole module name, e.g. 're:.*\.mlp\..*'; or pass a glob such as '*.mlp.*')"
                ) from None
