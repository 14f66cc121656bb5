"""What ``extract_adapter`` returns: the LoRA pair of each changed layer (``LoraModule``) and the
whole ``Extraction`` (those pairs, what is stored whole or left out, and the summary ``svdlora extract``
prints); ``integrations.peft_adapter`` writes it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoraModule:
    name: str
    kind: str  # "linear" or "conv1d" (GPT-2; peft needs fan_in_fan_out)
    shape: tuple[int, int]  # (out, in)
    ranks: list[int]  # per residual stage; lora rank = sum
    lora_B: torch.Tensor  # (out, r): the stacked A_j
    lora_A: torch.Tensor  # (r, in): the stacked B_j
    bias_delta: torch.Tensor | None
    rel_error: float  # ‖ΔW − BA‖_F / ‖ΔW‖_F
    # under the calibration metric, ‖(ΔW − BA)·S‖_F / ‖ΔW·S‖_F (S·Sᵀ = damped E[x xᵀ]): the relative
    # output error of the delta on the calibration inputs; None without calibration
    weighted_error: float | None = None

    @property
    def rank(self) -> int:
        return sum(self.ranks)

    @property
    def params(self) -> int:
        return self.rank * (self.shape[0] + self.shape[1])


@dataclass
class Extraction:
    """What ``extract_adapter`` found; ``save_adapter`` writes it."""

    config: dict
    method: str
    lora: list[LoraModule]
    modules_to_save: dict[str, str]  # module name -> why it is stored whole
    left_out: dict[str, str]  # parameter name -> why the adapter cannot carry its change
    unchanged: int  # targeted matrices whose delta is exactly zero
    delta_params: int  # parameters of the changed targeted matrices
    modules_to_save_params: int
    seconds: float = 0.0
    calibration: dict | None = None  # what the metric came from (``CalibrationPlan.describe``)

    @property
    def lora_params(self) -> int:
        return sum(m.params for m in self.lora)

    @property
    def lora_bias(self) -> bool:
        return any(m.bias_delta is not None for m in self.lora)

    def summary_rows(self) -> list[tuple[str, str]]:
        ranks = sorted({m.rank for m in self.lora})
        rank_text = f"{ranks[0]}..{ranks[-1]}" if len(ranks) > 1 else (str(ranks[0]) if ranks else "-")
        budget = self.config.get("budget") if self.config.get("rank") is None else f"rank {self.config['rank']}"
        share = self.lora_params / self.delta_params if self.delta_params else 0.0
        return [
            ("budget / submatrices / method", f"{budget} / {self.config.get('submatrices')} / {self.method}"),
            ("LoRA modules", f"{len(self.lora)} (rank {rank_text}); {self.unchanged} targeted matrices unchanged"),
            ("LoRA params", f"{self.lora_params:,} for a delta of {self.delta_params:,} ({share:.1%})"),
            # what peft's file holds for them: a tied one per module, buffers (BatchNorm statistics) too
            ("modules_to_save", f"{len(self.modules_to_save)} ({self.modules_to_save_params:,} values stored)"),
            ("calibration", (self.calibration or {}).get("source") or "none (plain SVD of the delta)"),
            ("left out", f"{len(self.left_out)}" + (" (see warnings)" if self.left_out else "")),
            ("extract time", f"{self.seconds:.1f} s"),
        ]

    def format(self) -> str:
        width = max(len(k) for k, _ in self.summary_rows())
        return "\n".join(f"{k:<{width}}  {v}" for k, v in self.summary_rows())


__all__ = ["Extraction", "LoraModule"]
