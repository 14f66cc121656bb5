"""What a compression run calibrates on, and the method and allocation that follow from it.

``plan_calibration`` resolves ``method="auto"`` / ``allocation="auto"`` against the data the user
gave (none: the sources' plain SVD, uniform budget), reads the data into batches and collects
the statistics once; the plan then hands each layer its ``Weighting``, computed once per
distinct layer input (q/k/v share one whitening).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .calibration import MAX_OUTPUT_GRAM, LayerStats, collect_statistics
from .config import CompressionConfig
from .errors import SvdloraError
from .heal import check_heal_batches
from .methods.weighting import INPUT_DAMPING, OUTPUT_DAMPING, Weighting, output_weights, whitening
from .targets import Target

logger = logging.getLogger(__name__)

# method "auto" picks kfac while its (out, out) Grams fit here (SmolLM2-135M: 1.3 GiB; a
# Llama-3.2-1B, ~17.6 GiB, gets fisher): a bound a laptop can hold beside the model.
KFAC_AUTO_BYTES = 4 * 2**30


@dataclass
class CalibrationPlan:
    method: str  # "svd", "whiten" (SVD-LLM), "fisher" (+ output weights) or "kfac" (+ output whitening)
    allocation: str  # "uniform" or "global"
    batches: list[dict] = field(default_factory=list)
    stats: dict[str, LayerStats] | None = None
    source: str | None = None  # what the batches came from, for the report
    refit: bool = False  # refit the factors to the compressed model's own inputs (``refit``)
    gradients: bool | None = None  # collected loss gradients (None: as ``stats`` say)
    _right: dict[int, Any] = field(default_factory=dict)  # S (float32) per Gram object, shared by q/k/v
    _left: dict[str, Any] = field(default_factory=dict)  # D per layer (for kfac an eigendecomposition each)

    def weighting(self, name: str, for_allocation: bool = False) -> Weighting | None:
        """The metric layer ``name`` is factorized under (allocation always uses the loss weights)."""
        stats = (self.stats or {}).get(name)
        if stats is None or (self.method == "svd" and not for_allocation):
            return None
        key = id(stats.gram)
        if key not in self._right:
            right = whitening(stats.gram, INPUT_DAMPING, inverse=False)[0]  # unwhiten solves with S
            self._right[key] = None if right is None else right.float()
        right = self._right[key]
        left = None
        if for_allocation or self.method in ("fisher", "kfac"):
            if name not in self._left:  # asked for again by the factorization after the allocation
                left = output_weights(stats, OUTPUT_DAMPING, full=self.method == "kfac")
                self._left[name] = None if left is None else left.float()
            left = self._left[name]
        return Weighting(left=left, right=right)

    def describe(self) -> dict | None:
        if self.source is None:
            return None
        tokens = sum(_real_tokens(b) for b in self.batches if "input_ids" in b)
        return {
            "source": self.source,
            "batches": len(self.batches),
            "tokens": tokens or None,
            "data_free": self.source.startswith("self"),
            "gradients": self.gradients
            if self.gradients is not None
            else bool(self.stats) and any(s.has_gradients for s in self.stats.values()),
            "refit": self.refit,
        }


def source_name(calibration: Any) -> str:
    """How a report names calibration data given as a path or dataset, or as batches in memory."""
    return f"{len(calibration)} batches given in memory" if isinstance(calibration, list) else str(calibration)


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


def check_without_calibration(config: CompressionConfig) -> None:
    """Refuse the settings that need calibration data, for a run without any (the CLI: before the load).
    --refit with method 'svd' is not refused: data would not make it run (``plan_calibration`` warns), and
    a run given data that 'svd' leaves unread (``uses_calibration``) goes on without it."""
    hint = "needs calibration data: pass --calibration DATA (or 'self' for a causal LM)"
    for name, value in (("method", config.method), ("allocation", config.allocation)):
        if value not in ("auto", "svd", "uniform"):
            raise SvdloraError(f"{name} {value!r} {hint}")
    refit = config.refit and config.method != "svd"
    for what, given in (("healing", config.heal_steps), ("the refit pass (--refit)", refit)):
        if given:
            raise SvdloraError(f"{what} {hint}")


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
    # imported here: calibration_data reads data with svdlora.evaluation, which imports compress
    from .calibration_data import SELF, calibration_batches, model_kind

    if config.refit and config.method == "svd":  # data or none: there are no weighted statistics to refit to
        logger.warning("the refit pass is not run with method 'svd' (it refits to weighted statistics)")
    if calibration is None:
        check_without_calibration(config)
        return CalibrationPlan(method="svd", allocation="uniform")
    if not uses_calibration(config):  # warned before the data is read (or, for 'self', generated): it is not used
        logger.warning(UNUSED)
        return CalibrationPlan(method="svd", allocation="uniform")
    method = auto_method(targets) if config.method == "auto" else config.method
    allocation = resolved_allocation(config)
    if isinstance(calibration, Mapping) and all(isinstance(v, torch.Tensor) for v in calibration.values()):
        # not a DatasetDict (datasets by split): one batch of model inputs, read as a path before
        raise SvdloraError("calibration is one batch (a dict of model inputs): pass a list of batches, [batch]")
    if isinstance(calibration, list):
        batches, source = model_batches(calibration), source_name(calibration)
    else:
        batches = calibration_batches(
            model, calibration, processor, config.calibration_samples, config.calibration_length,
            seed=config.seed, progress=progress,
        )  # fmt: skip
        source = "self-generated text (data-free)" if calibration == SELF else str(calibration)
        if calibration == SELF:
            source = f"self: text sampled from the model ({model_kind(model)}, data-free)"
    if config.heal_steps:  # before the statistics and the factorization, which healing would follow
        check_heal_batches(batches, config.heal_loss)
    gradients = method in ("fisher", "kfac") or allocation == "global"
    stats = statistics
    if stats is None:
        stats = collect_statistics(
            model, targets, batches, gradients=gradients, progress=progress, seed=config.seed,
            output_gram=method == "kfac",
        )  # fmt: skip
    if method == "kfac" and not any(s.out_grad_gram is not None for s in stats.values()):
        logger.warning("method kfac: the statistics hold no output-gradient Grams; using their diagonal (fisher)")
    refit = config.refit and method != "svd"  # method 'svd': warned above
    return CalibrationPlan(method, allocation, batches=batches, stats=stats, source=source, refit=refit)


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
