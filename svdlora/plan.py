"""What a compression run calibrates on, and the method and allocation that follow from it.

``plan_calibration`` resolves ``method="auto"`` / ``allocation="auto"`` against the data the user
gave (none: the sources' plain SVD, uniform budget), reads the data into batches and collects
the statistics once; the plan then hands each layer its ``Weighting``, computed once per
distinct layer input (q/k/v share one whitening) and kept with the statistics (``Statistics``) for
the compressions that reuse them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .calibration import MAX_OUTPUT_GRAM, LayerStats, collect_statistics
from .config import CompressionConfig
from .errors import SvdloraError
from .heal import check_heal_batches, check_heal_outputs
from .methods.weighting import (
    INPUT_DAMPING,
    OUTPUT_DAMPING,
    Weighting,
    output_weights,
    warn_unreached,
    whitening,
)
from .targets import Target

logger = logging.getLogger(__name__)

# method "auto" picks kfac while its (out, out) Grams fit here (SmolLM2-135M: 1.3 GiB; a
# Llama-3.2-1B, ~17.6 GiB, gets fisher): a bound a laptop can hold beside the model.
KFAC_AUTO_BYTES = 4 * 2**30


class Statistics(dict):
    """Layer statistics by layer name (``calibration.collect_statistics``'s), holding what a plan computes from
    them: the input whitening S per Gram (q/k/v share one) and the output weights D per layer (for kfac a
    Cholesky factor each). Neither depends on the budget, so the compressions given one ``Statistics``
    (``calibration_plan``'s ``plan.stats``: a sweep's budgets) compute each once; SmolLM2-135M, kfac, global:
    9-11 s of a budget's 39 s. The statistics are read as given: changed in place, pass a new dict."""

    def __init__(self, stats: Mapping[str, LayerStats] = ()) -> None:
        super().__init__(stats)
        self._factors: dict[tuple, tuple[Any, Any]] = {}  # (kind, id of its source, dtype) -> (the source, the factor)

    def factor(
        self, kind: str, source: Any, compute: Callable[[], torch.Tensor | None], dtype: torch.dtype = torch.float32
    ) -> torch.Tensor | None:
        """``compute()`` in ``dtype`` (None as None) once per ``kind``, ``source`` and ``dtype``; the source is held
        with it, so its id is not reused while cached (an entry replaced since computes again)."""
        key = (kind, id(source), dtype)
        if key not in self._factors:
            value = compute()
            self._factors[key] = (source, None if value is None else value.to(dtype))
        return self._factors[key][1]

    def readers(self, gram: torch.Tensor) -> list[str]:
        """The layers whose statistics hold ``gram`` (q/k/v, or gate/up, share one: ``collect_statistics``)."""
        return [name for name, stats in self.items() if stats.gram is gram]


def factor_dtype(targets: list[Target]) -> torch.dtype:
    """The precision a plan keeps S and D in: float64 where a weight is (factorized in float64, it would otherwise
    be whitened with a float32 S, ~1e-7 off), float32 for the rest (half the memory of float64 statistics)."""
    return torch.float64 if any(t.module.weight.dtype == torch.float64 for t in targets) else torch.float32


@dataclass
class CalibrationPlan:
    method: str  # "svd", "whiten" (SVD-LLM), "fisher" (+ output weights) or "kfac" (+ output whitening)
    allocation: str  # "uniform" or "global"
    batches: list[dict] = field(default_factory=list)
    stats: Statistics | None = None  # a dict given is wrapped: its weightings are computed once per plan
    source: str | None = None  # what the batches came from, for the report
    refit: bool = False  # refit the factors to the compressed model's own inputs (``refit``)
    gradients: bool | None = None  # collected loss gradients (None: as ``stats`` say)
    dtype: torch.dtype = torch.float32  # of the weightings' S and D (``factor_dtype``)

    def __post_init__(self) -> None:
        if self.stats is not None and not isinstance(self.stats, Statistics):
            self.stats = Statistics(self.stats)

    def weighting(self, name: str, for_allocation: bool = False) -> Weighting | None:
        """The metric layer ``name`` is factorized under (allocation always uses the loss weights)."""
        stats = (self.stats or {}).get(name)
        if stats is None or (self.method == "svd" and not for_allocation):
            return None
        # unwhiten solves with S, so its inverse is not computed; once per Gram, whose warning names all its readers
        right = self.stats.factor(
            "input",
            stats.gram,
            lambda: whitening(stats.gram, INPUT_DAMPING, inverse=False, layer=self.stats.readers(stats.gram))[0],
            self.dtype,
        )
        left = None
        if for_allocation or self.method in ("fisher", "kfac"):  # asked for again by the factorization
            full = self.method == "kfac"
            kind = "output " + ("kfac" if full else "diagonal")
            # each unusable layer is said here, under global allocation too: the allocator's grouped line
            # (allocate._APART) comes only where spectra of other units are set apart
            left = self.stats.factor(kind, stats, lambda: output_weights(stats, OUTPUT_DAMPING, full, name), self.dtype)
        return Weighting(left=left, right=right)

    @property
    def collected_gradients(self) -> bool:
        """Whether loss gradients were collected: as ``gradients`` says, else as the statistics do (any layer's)."""
        if self.gradients is not None:
            return self.gradients
        return bool(self.stats) and any(s.has_gradients for s in self.stats.values())

    def unreached(self, targets: list[Target]) -> list[str]:
        """The ``targets`` the loss never reached: gradients were collected, none for them (a layer that never ran
        has no statistics, and is not one). Empty where no gradients were collected (method whiten, uniform)."""
        if not self.collected_gradients:
            return []
        return [t.name for t in targets if t.name in self.stats and not self.stats[t.name].has_gradients]

    def describe(self) -> dict | None:
        if self.source is None:
            return None
        tokens = sum(_real_tokens(b) for b in self.batches if "input_ids" in b)
        return {
            **source_description(self.source),
            "batches": len(self.batches),
            "tokens": tokens or None,
            "gradients": self.collected_gradients,
            "refit": self.refit,
        }


SELF_SOURCE = "self: text sampled from the model"  # how data_source names 'self' (a file may be named self…)


def data_source(model: nn.Module, calibration: Any) -> str:
    """How a report names calibration data: batches given in memory, a path or dataset, or 'self' (text
    generated by ``model``)."""
    from .calibration_data import SELF, model_kind  # reads data with svdlora.evaluation, which imports compress

    if isinstance(calibration, list):
        return f"{len(calibration)} batches given in memory"
    if calibration == SELF:
        return f"{SELF_SOURCE} ({model_kind(model)}, data-free)"
    return str(calibration)


def source_description(source: str) -> dict:
    """A report's name for its calibration data (``data_source``'s) and whether it is data-free ('self')."""
    return {"source": source, "data_free": source.startswith(SELF_SOURCE)}


def check_statistics_calibrated(statistics: dict | None, calibration: Any, why: str) -> None:
    """Refuse ``statistics`` without the ``calibration`` they were collected on: without data the method is
    plain SVD, which would ignore them, while the caller meant them to weigh the layers. ``why``: what else
    reads the batches."""
    if statistics is not None and calibration is None:
        raise SvdloraError(
            f"statistics were given without calibration: pass calibration= the batches they were collected on "
            f"too ({why}), or statistics=None for plain SVD"
        )


def check_calibration(calibration: Any) -> None:
    """Refuse calibration that is no data (one batch without its list, a number, a tuple of batches) before
    anything is read for it: streaming loads the checkpoint's tokenizer first, whose refusal for a folder
    without one would otherwise name the tokenizer, not the value. A list is checked as it is read."""
    from .calibration_data import check_data  # reads data with svdlora.evaluation, which imports compress

    if isinstance(calibration, Mapping) and not calibration:  # all() below holds for it too
        raise SvdloraError(
            f"calibration is empty ({type(calibration).__name__} with no splits or inputs): pass a file, a dataset "
            "with rows, or a list of model batches"
        )
    if isinstance(calibration, Mapping) and all(isinstance(v, torch.Tensor) for v in calibration.values()):
        # not a DatasetDict (datasets by split): one batch of model inputs, read as a path before
        raise SvdloraError("calibration is one batch (a dict of model inputs): pass a list of batches, [batch]")
    if not isinstance(calibration, list):
        check_data(calibration)


def read_calibration(
    model: nn.Module,
    calibration: Any,
    processor: Any,
    config: CompressionConfig,
    progress: bool,
    device: str | torch.device | None = None,
) -> tuple[list[dict], str]:
    """The model batches of the calibration data given to ``compress`` or ``compress_checkpoint``, and how
    the report names it: a list of batches (checked), or a path, dataset or 'self' read into batches on
    ``device`` (default: the model's; ``calibration_data.calibration_batches``)."""
    from .calibration_data import calibration_batches  # reads data with svdlora.evaluation, which imports compress

    check_calibration(calibration)
    if isinstance(calibration, list):
        batches = model_batches(calibration)
    else:
        batches = calibration_batches(
            model, calibration, processor, config.calibration_samples, config.calibration_length,
            seed=config.seed, progress=progress, device=device,
        )  # fmt: skip
    return batches, data_source(model, calibration)


def output_gram_bytes(targets: list[Target]) -> int:
    """Memory of the float64 (out, out) output-gradient Grams that method "kfac" collects."""
    return sum(8 * t.out_features**2 for t in targets if t.out_features <= MAX_OUTPUT_GRAM)


def auto_method(targets: list[Target]) -> str:
    """``kfac`` (measured best: SmolLM2-135M at budget 0.8, 1.24x dense perplexity against fisher's
    1.28x) where its output Grams fit in ``KFAC_AUTO_BYTES``, else ``fisher`` (a diagonal per layer)."""
    needed = output_gram_bytes(targets)
    if needed <= KFAC_AUTO_BYTES:
        return "kfac"
    logger.info("method auto: fisher, as kfac's output Grams would take %.1f GiB", needed / 2**30)
    return "fisher"


def resolved_allocation(config: CompressionConfig) -> str:
    """``auto``: global where a budget sets the ranks, uniform under a fixed ``rank``."""
    if config.allocation != "auto":
        return config.allocation
    return "global" if config.rank is None else "uniform"


# plain SVD with uniform allocation reads W only: given calibration data is then left unread (as streamed)
UNUSED = "calibration data is not used by method 'svd' with uniform allocation (nor read)"


def uses_calibration(config: CompressionConfig) -> bool:
    """Whether a run given calibration data uses it: not plain SVD with uniform allocation and no healing
    (method ``auto`` with data is kfac or fisher; --refit is not run with method 'svd')."""
    return not (config.method == "svd" and resolved_allocation(config) == "uniform" and not config.heal_steps)


def check_without_calibration(config: CompressionConfig, streamed: bool = False) -> None:
    """Refuse the settings that need calibration data, for a run without any (the CLI: before the load).
    --refit with method 'svd' is not refused: data would not make it run (``plan_calibration`` warns), and
    a run given data that 'svd' leaves unread (``uses_calibration``) goes on without it. A ``streamed`` run
    (--stream, torchrun) is not pointed at 'self': generating the text needs the whole model in memory."""
    data = "a causal LM's text: streamed, it calibrates block by block" if streamed else "or 'self' for a causal LM"
    hint = f"needs calibration data: pass --calibration DATA ({data})"
    for name, value in (("method", config.method), ("allocation", config.allocation)):
        if value not in ("auto", "svd", "uniform"):
            raise SvdloraError(f"{name} {value!r} {hint}")
    refit = config.refit and config.method != "svd"
    for what, given in (("healing", config.heal_steps), ("the refit pass (--refit)", refit)):
        if given:
            raise SvdloraError(f"{what} {hint}")


def warn_unrun_refit(config: CompressionConfig) -> None:
    """--refit with method 'svd', data or none, in memory or streamed: there are no weighted statistics to refit
    to, so it does not run (not refused: ``check_without_calibration``)."""
    if config.refit and config.method == "svd":
        logger.warning("the refit pass is not run with method 'svd' (it refits to weighted statistics)")


def plan_calibration(
    model: nn.Module,
    targets: list[Target],
    config: CompressionConfig,
    calibration: Any,
    processor: Any,
    progress: bool,
    statistics: dict[str, LayerStats] | None = None,
) -> CalibrationPlan:
    """Resolve method and allocation, read the calibration data, collect the statistics."""
    warn_unrun_refit(config)
    check_statistics_calibrated(statistics, calibration, "the report counts them; healing and the refit run on them")
    if calibration is None:
        check_without_calibration(config)
        return CalibrationPlan(method="svd", allocation="uniform")
    if not uses_calibration(config):  # warned before the data is read (or, for 'self', generated): it is not used
        logger.warning(UNUSED)
        return CalibrationPlan(method="svd", allocation="uniform")
    method = auto_method(targets) if config.method == "auto" else config.method
    allocation = resolved_allocation(config)
    batches, source = read_calibration(model, calibration, processor, config, progress)
    if config.heal_steps:  # before the statistics and the factorization, which healing would follow
        check_heal_batches(batches, config.heal_loss)
        check_heal_outputs(model, batches[0], config.heal_loss)
    gradients = method in ("fisher", "kfac") or allocation == "global"
    stats = statistics
    if stats is not None and not any(t.name in stats for t in targets):  # else every layer would get plain SVD
        raise SvdloraError(
            f"statistics holds none of the {len(targets)} targeted layers ({len(stats)} entries): pass "
            "calibration.collect_statistics(model, targets, batches) of this model, or statistics=None to collect them"
        )
    if stats is None:
        stats = collect_statistics(
            model, targets, batches, gradients=gradients, progress=progress, seed=config.seed,
            output_gram=method == "kfac",
        )  # fmt: skip
    if method == "kfac" and not any(s.out_grad_gram is not None for s in stats.values()):
        logger.warning("method kfac: the statistics hold no output-gradient Grams; using their diagonal (fisher)")
    refit = config.refit and method != "svd"  # method 'svd': warned above
    plan = CalibrationPlan(
        method, allocation, batches=batches, stats=stats, source=source, refit=refit, dtype=factor_dtype(targets),
        gradients=gradients if statistics is None else None,  # given statistics say whether they hold them
    )  # fmt: skip
    if unreached := unweighted_by_the_loss(plan, targets):
        warn_unreached(unreached)
    return plan


def unweighted_by_the_loss(plan: CalibrationPlan, targets: list[Target]) -> list[str]:
    """The ``targets`` the loss never reached whose output weights fisher/kfac were to give them, under uniform
    allocation (global allocation says it of the spectra, ``allocate._APART``): ``warn_unreached`` says them."""
    if plan.method in ("fisher", "kfac") and plan.allocation == "uniform":
        return plan.unreached(targets)
    return []


def model_batches(calibration: list) -> list[dict]:
    """A list given as calibration data: the model's keyword inputs, one dict per batch (``model(**batch)``)."""
    for i, batch in enumerate(calibration):
        if not isinstance(batch, Mapping):
            raise SvdloraError(
                f"calibration given as a list must hold model batches, dicts of keyword inputs such as "
                f"{{'input_ids': tensor}}; item {i} is a {type(batch).__name__}: tokenize it first, or pass a text "
                "file or dataset (with processor=) instead of a list"
            )
    return calibration


def _real_tokens(batch: dict) -> int:
    """The input tokens of a batch, without its padding (the statistics skip it: ``padding.unpadded_rows``)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if isinstance(mask, torch.Tensor) else int(batch["input_ids"].numel())
