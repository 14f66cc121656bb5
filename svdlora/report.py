"""What a compression did, per module and for the whole model; saved in the folder, shown by `info`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class ModuleReport:
    name: str
    kind: str  # "linear" or "conv1d"
    shape: tuple[int, int]  # (out_features, in_features)
    bias: bool
    ranks: list[int] = field(default_factory=list)  # one per stage; empty when dense
    stage_dtypes: list[str] = field(default_factory=list)
    # ‖W − Σ A_j B_j‖_F / ‖W‖_F of the stored factors; None: not measured on them (cast to another
    # dtype after compression, e.g. loaded with dtype=torch.bfloat16 and saved again: W is not in the folder)
    rel_error: float | None = 0.0
    dense_reason: str | None = None
    est_loss: float | None = None  # global allocation: estimated loss left by the truncation (Σ dropped σ²)
    svd_method: str | None = None  # "exact" or "randomized" (what --svd auto chose)
    exact_error: float | None = None  # rel_error of the exact SVD at the same rank, when computed
    pivoted: bool = False  # stored as pivot rows + coefficients (svdlora.pivoted), R·(out+in−R) values

    @property
    def svd_cost(self) -> float | None:
        """How much the SVD method added to the error: rel_error − exact_error (0 for exact)."""
        return None if self.exact_error is None or self.rel_error is None else self.rel_error - self.exact_error

    stored_bytes: int | None = None  # the factorized matrix as stored (scales included), bias excluded
    dense_bytes: int | None = None  # the same matrix dense in the model's dtype (the byte budget's unit)

    @property
    def factorized(self) -> bool:
        return bool(self.ranks)

    @property
    def params_before(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def params_after(self) -> int:
        if not self.factorized:
            return self.params_before
        full = self.params_before if self.stage_dtypes and self.stage_dtypes[0].startswith("full-") else 0
        total = sum(self.ranks)
        if self.pivoted:
            return total * (self.shape[0] + self.shape[1] - total)
        return full + total * (self.shape[0] + self.shape[1])

    @property
    def bits_per_weight(self) -> float | None:
        return None if self.stored_bytes is None else 8 * self.stored_bytes / self.params_before


@dataclass
class CompressionReport:
    config: dict
    modules: list[ModuleReport]
    model_params_before: int
    model_params_after: int
    seconds: float = 0.0
    bytes_before: int | None = None  # weight files of the source, when known
    bytes_after: int | None = None  # model.safetensors of the output, once saved
    calibration: dict | None = None  # what the statistics came from (None: no calibration)
    method: str | None = None  # resolved factorization method
    allocation: str | None = None  # resolved rank allocation
    heal: dict | None = None  # healing steps, time and loss, when it ran

    @property
    def factorized(self) -> list[ModuleReport]:
        return [m for m in self.modules if m.factorized]

    def to_dict(self) -> dict:
        data = asdict(self)
        for m in data["modules"]:  # written only where true: folders without pivots stay readable by older svdlora
            if not m["pivoted"]:
                del m["pivoted"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> CompressionReport:
        modules = [ModuleReport(**{**m, "shape": tuple(m["shape"])}) for m in data["modules"]]
        return cls(**{**data, "modules": modules})

    def summary_rows(self) -> list[tuple[str, str]]:
        fac = self.factorized
        before = sum(m.params_before for m in fac)
        after = sum(m.params_after for m in fac)
        multiple = self.config.get("rank_multiple")
        multiple = multiple if isinstance(multiple, int) else 1  # an edited config must not break info
        in_bytes = bool(self.config.get("stage_dtypes"))  # stage dtypes: the budget counts bytes, not values
        rows = [
            (
                "budget / submatrices",
                f"{budget_text(self.config)} / {self.config.get('submatrices')}"
                + (" (of the targeted matrices' bytes: --stage-dtypes)" if in_bytes else "")
                + (f" (ranks of {multiple} or more rounded to multiples of {multiple})" if multiple > 1 else ""),
            ),
            ("method / allocation", f"{self.method or 'svd'} / {self.allocation or 'uniform'}"),
            (
                "how ranks were chosen",
                _allocation_why(self.allocation or "uniform", "byte" if in_bytes else "parameter", self.config)
                + self._loss_left_note(),
            ),
            ("calibration", _calibration_text(self.calibration)),
            ("factorized matrices", f"{len(fac)} of {len(self.modules)} Linear/Conv1D layers"),
            (
                "factorized params",
                f"{before:,} -> {after:,} ({_ratio(after, before)})"
                + (" (in fewer bits: the bytes below are the size)" if after > before and in_bytes else ""),
            ),
            *_bytes_rows(fac),
            *(
                [("factor form", "pivoted: R pivot rows + coefficients, R·(out+in−R) values (PIFA)")]
                if any(m.pivoted for m in fac)
                else []
            ),
            (
                "model params",
                f"{self.model_params_before:,} -> {self.model_params_after:,} "
                f"({_ratio(self.model_params_after, self.model_params_before)})",
            ),
        ]
        if self.bytes_before is not None and self.bytes_after is not None:
            rows.append(
                (
                    "bytes on disk",
                    f"{_size(self.bytes_before)} -> {_size(self.bytes_after)} "
                    f"({_ratio(self.bytes_after, self.bytes_before)})",
                )
            )
        if fac:
            rows.append(("relative Frobenius error", _error_text(fac)))
        if self.heal:
            h = self.heal
            rows.append(
                (
                    "healing",
                    f"{h['steps']} steps ({h['loss']}), {h['seconds']:.0f} s, "
                    f"loss {loss_text(h['first_loss'])} -> {loss_text(h['last_loss'])}",
                )
            )
        if fac:
            rand = [m for m in fac if m.svd_method == "randomized"]
            if rand:
                costs = [m.svd_cost for m in rand if m.svd_cost is not None]
                cost = f", error vs exact +{sum(costs) / len(costs):.4f} mean, +{max(costs):.4f} max" if costs else ""
                rows.append(("randomized SVD", f"{len(rand)} of {len(fac)} matrices{cost}"))
        rows.append(("compress time", f"{self.seconds:.1f} s"))
        return rows

    def _loss_left_note(self) -> str:
        """'loss left' is the allocation's estimate for the truncated SVD; a refit or healing then changed the
        factors (rel.err is measured again after them, the estimate is not): said where the column is shown."""
        after = [
            what for what, ran in (("the refit", (self.calibration or {}).get("refit")), ("healing", self.heal)) if ran
        ]
        if not after or all(m.est_loss is None for m in self.modules):
            return ""
        changed = " and ".join(after)
        return f"; 'loss left' is that of the truncation, before {changed} changed the factors (rel.err is after)"

    def format(self, modules: bool = True) -> str:
        """A plain-text summary, then one line per layer."""
        width = max(len(k) for k, _ in self.summary_rows())
        lines = [f"{k:<{width}}  {v}" for k, v in self.summary_rows()]
        if modules:
            name_w = max([len(m.name) for m in self.modules] + [6])
            loss = any(m.est_loss is not None for m in self.modules)
            exact = any(m.svd_method == "randomized" for m in self.modules)
            bits = any(m.bits_per_weight is not None for m in self.modules)
            header = f"{'module':<{name_w}}  {'shape':>11}  {'ranks':<14} {'params':>21}  {'rel.err':>7}"
            header += f"  {'vs exact':>8}" * exact + f"  {'loss left':>9}" * loss + f"  {'bits/w':>6}" * bits
            lines += ["", header]
            for m in self.modules:
                shape = f"{m.shape[0]}x{m.shape[1]}"
                if m.factorized:
                    ranks = "+".join("full" if r == 0 else str(r) for r in m.ranks)
                    params = f"{m.params_before:,}->{m.params_after:,}"
                    error = "n/a" if m.rel_error is None else f"{m.rel_error:7.4f}"
                    line = f"{m.name:<{name_w}}  {shape:>11}  {ranks:<14} {params:>21}  {error:>7}"
                    if exact:
                        cost = (
                            ""
                            if m.svd_method != "randomized"
                            else "n/a"
                            if m.svd_cost is None
                            else f"{m.svd_cost:+.4f}"
                        )
                        line += f"  {cost:>8}"
                    if loss:
                        line += f"  {m.est_loss:9.3g}" if m.est_loss is not None else " " * 11
                    if bits:
                        line += f"  {m.bits_per_weight:6.2f}" if m.bits_per_weight is not None else " " * 8
                    lines.append(line.rstrip())
                else:
                    lines.append(f"{m.name:<{name_w}}  {shape:>11}  dense: {m.dense_reason}")
        return "\n".join(lines)


def loss_text(value: float) -> str:
    """A healing loss as shown: 4 decimals, or 4 significant digits below 0.001, where the distillation KL of a
    near-exact model (full-int8 + a repair stage: 7.2e-08) read 'loss 0.0000 -> 0.0000'."""
    return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.4g}"


def budget_text(config: dict) -> str:
    """The budget a run used: none where a fixed rank set the ranks (the budget in the config, its
    default, was not applied: ``--rank`` and ``--budget`` exclude each other)."""
    return f"none (fixed rank {config['rank']})" if config.get("rank") else f"{config.get('budget')}"


_ALLOCATION_WHY = {
    "uniform": "every matrix keeps the same share of its {unit}s (the sources' rule)",
    "global": "together, from the calibration loss: each matrix stops where one more rank would buy less "
    "loss per {unit} than any other; 'loss left' = its estimated loss from truncation (Σ dropped "
    "weighted σ²); a matrix is kept dense where that is the better use of its {unit}s",
}


def _allocation_why(allocation: str, unit: str, config: dict) -> str:
    """How the ranks were chosen, in the budget's unit ("parameter", or "byte" with stage dtypes); a fixed
    rank (--rank) chose them without a budget."""
    if config.get("rank"):
        rank = config["rank"]
        return f"the fixed rank {rank} for every matrix (--rank); one whose factors would not be smaller stays dense"
    return _ALLOCATION_WHY.get(allocation, "").format(unit=unit)


def _calibration_text(calibration: dict | None) -> str:
    if not calibration:  # the report does not record whether the run streamed: the hint fits both kinds
        return (
            "none (plain truncated SVD; pass --calibration DATA for better quality, or 'self' for a causal LM "
            "compressed in memory: --stream and torchrun refuse 'self')"
        )
    tokens = f", {calibration['tokens']:,} tokens in all" if calibration.get("tokens") else ""
    refit = ", refit to the compressed model's inputs" if calibration.get("refit") else ""
    return f"{calibration['source']} ({calibration['batches']} batches{tokens}{refit})"


def _error_text(fac: list[ModuleReport]) -> str:
    """Mean and max relative error over the factorized matrices whose stored factors were measured."""
    errs = [m.rel_error for m in fac if m.rel_error is not None]
    why = "factors cast to another dtype after compression"
    if not errs:
        return f"not measured ({why})"
    text = f"mean {sum(errs) / len(errs):.4f}, max {max(errs):.4f}"
    return text if len(errs) == len(fac) else f"{text}; not measured for {len(fac) - len(errs)} of {len(fac)} ({why})"


def _bytes_rows(fac: list[ModuleReport]) -> list[tuple[str, str]]:
    """Bytes of the factorized matrices and bits per original weight (folders from before bytes: none)."""
    if not fac or any(m.stored_bytes is None or m.dense_bytes is None for m in fac):
        return []
    stored, dense = sum(m.stored_bytes for m in fac), sum(m.dense_bytes for m in fac)
    bits = 8 * stored / sum(m.params_before for m in fac)
    dtypes = sorted({",".join(m.stage_dtypes) for m in fac})
    return [
        ("factorized bytes", f"{_size(dense)} -> {_size(stored)} ({_ratio(stored, dense)}), scales included"),
        ("bits per weight", f"{bits:.2f} (stage dtypes {' | '.join(dtypes)})"),
    ]


def _ratio(after: int, before: int) -> str:
    return f"{after / before:.1%}" if before else "n/a"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"
