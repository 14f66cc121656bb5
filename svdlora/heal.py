"""Healing: a short fine-tune of the factors only (A, B of every low-rank layer).

``distill`` (the default) trains the compressed model to reproduce the dense model's output
distribution (KL divergence per token) on the calibration batches: it restores the original
model rather than adapting it to the calibration text. ``lm`` trains on the batches' own labels
(next-token loss), which also adapts the model to that text, so compare it with the dense model
given the same fine-tune.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .calibration import labelled_forward
from .chain import requantize
from .config import HEAL_LOSSES, check_heal_lr, check_heal_steps
from .errors import SvdloraError, first_line
from .layers import LowRankLinear
from .modes import eval_mode
from .padding import is_causal_lm, is_encoder_decoder, is_left_padded, masked_labels, padding_masks, unpadded_rows
from .report import loss_text
from .siblings import check_unstacked

logger = logging.getLogger(__name__)

HALF_DTYPES = (torch.float16, torch.bfloat16)  # trained through float32 masters (``_step``)
WARMUP_STEPS = 10  # Adam's first steps are its noisiest: ramp the rate up over these (a tenth of a shorter run)
FINAL_LR_FRACTION = 0.1  # cosine decay to this fraction of the peak by the end of the run


@dataclass
class HealResult:
    steps: int
    seconds: float
    loss: str
    first_loss: float  # mean over the first steps (up to 8)
    last_loss: float  # the healed model's mean loss on those steps' batches (``_loss_after``)

    def to_dict(self) -> dict:
        return asdict(self)


def trained_factors(model: nn.Module) -> list[nn.Parameter]:
    """The factors healing trains. Empty ones (a layer whose only stage is a full-rank quantized one) take
    no part in the forward pass: with nothing else to train, backward() would fail on a loss without gradient."""
    return [p for m in model.modules() if isinstance(m, LowRankLinear) for p in m.factor_parameters() if p.numel()]


def state_bytes(factors: list[nn.Parameter]) -> int:
    """What healing holds beside ``factors`` during a step: per value, Adam's two float32 moments and the
    float32 gradient, and for a half-precision factor its float32 master (``_step``): 12 bytes a float32
    value, 16 a half one (8x its 2 bytes). Works on meta tensors (the CLI's estimate before loading)."""
    return sum(p.numel() * torch.float32.itemsize * (3 + (p.dtype in HALF_DTYPES)) for p in factors)


def check_heal_batches(batches: list[dict], loss: str) -> None:
    """Refuse batches the ``loss`` cannot train on (compress asks before its calibration, not after it)."""
    if not batches:  # else no step runs, and "raise --heal-steps" would be the advice
        raise SvdloraError("healing has no data: the list of batches is empty; pass calibration batches")
    if loss == "lm" and not all("labels" in b for b in batches):
        raise SvdloraError("healing with loss 'lm' needs labelled batches (text for a causal LM)")


def _logits(outputs) -> torch.Tensor:
    logits = getattr(outputs, "logits", None)
    if logits is None:
        hidden = getattr(outputs, "last_hidden_state", None)
        if hidden is None:
            raise SvdloraError("healing needs a model that returns logits or hidden states")
        return hidden
    return logits


def check_heal_outputs(model: nn.Module, batch: dict, loss: str) -> None:
    """Refuse a model whose outputs the ``loss`` cannot read (a plain module returning a bare tensor) from one
    forward on ``batch``, in eval mode and without gradients: compress asks before its calibration and
    factorization, which healing follows; the healing's own steps are forwards and backwards, many more."""
    inputs = _distill_inputs(model, batch, is_encoder_decoder(model)) if loss == "distill" else batch
    with eval_mode(model), torch.no_grad():  # no dropout, no BatchNorm statistics updated by the check
        try:
            outputs = labelled_forward(model, inputs)
        except TypeError as err:  # a plain forward(x) given labels: its signature, not a bug in the model
            raise SvdloraError(
                f"healing with loss {loss!r} calls the model with {sorted(inputs)}, which its forward does not "
                f"take ({first_line(err)}): use --heal-loss distill, or batches that fit its forward"
            ) from None
        if loss == "distill":
            _logits(outputs)
        elif getattr(outputs, "loss", None) is None:
            raise SvdloraError("healing with loss 'lm' needs a model that returns a loss from labels")


def _distill_inputs(model: nn.Module, batch: dict, encoder_decoder: bool) -> dict:
    """``batch`` without its labels (distillation needs none); an encoder-decoder's decoder is fed
    them shifted right instead, as the model does itself when given labels, where the batch has
    no decoder inputs (a translator's calibration batches: source, mask and labels)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch.get("labels")
    if labels is not None and "decoder_input_ids" not in batch and encoder_decoder:
        inputs["decoder_input_ids"] = _shifted_right(model, labels)
    return inputs


def _shifted_right(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """The decoder inputs ``model`` builds from ``labels``: its own ``prepare_decoder_input_ids_from_labels``,
    or for models that shift inside ``forward`` only (M2M100 / NLLB, Blenderbot, Whisper) the same shift:
    the decoder start token, then the labels but the last, -100 read as padding."""
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if prepare is not None:
        return prepare(labels=labels)
    start, pad = (getattr(model.config, k, None) for k in ("decoder_start_token_id", "pad_token_id"))
    if start is None or pad is None:
        raise SvdloraError(
            f"distillation healing of {type(model).__name__} needs decoder inputs, and its config has no "
            "decoder_start_token_id or pad_token_id to build them from the labels: put decoder_input_ids in the "
            'calibration batches, or pass --heal-loss lm (heal_loss="lm")'
        )
    shifted = labels.new_full(labels.shape, start)
    shifted[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == -100, pad)
    return shifted


def _real_positions(batch: dict, encoder_decoder: bool) -> torch.Tensor | None:
    """1 at the real tokens of the positions the loss is taken at (a decoder's for an encoder-decoder,
    else the input's), 0 at padding (``padding.padding_masks``); None where nothing says."""
    source, target = padding_masks(batch, encoder_decoder)
    return target if encoder_decoder else source


def _distill_loss(student_out, teacher_out, mask: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """The mean over the real positions (``mask``, where it fits) of the per-token KL divergence, or of
    a bare encoder's squared hidden-state error: padding is no token to match; and their number."""
    student, teacher = _logits(student_out).float(), _logits(teacher_out).float()
    if getattr(student_out, "logits", None) is None:  # bare encoder: match the hidden states
        per_token = (student - teacher).square().mean(-1)
    else:
        log_p, log_q = student.log_softmax(-1), teacher.log_softmax(-1)
        per_token = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
    if mask is not None and mask.shape == per_token.shape:
        mask = mask.to(per_token.dtype)
        return (per_token * mask).sum() / mask.sum().clamp_min(1), int(mask.sum())
    return per_token.mean(), per_token.numel()


def _batch_loss(
    model: nn.Module, teacher: nn.Module | None, batch: dict, loss: str, encoder_decoder: bool
) -> tuple[torch.Tensor, int]:
    """The loss of one batch, a mean over its real positions, and their number."""
    mask = _real_positions(batch, encoder_decoder)
    if loss == "distill":
        inputs = _distill_inputs(model, batch, encoder_decoder)
        with torch.no_grad():
            target = teacher(**inputs)
        return _distill_loss(model(**inputs), target, mask)
    batch = masked_labels(batch, [mask])
    labels = batch["labels"]
    if labels.dim() > 1 and is_causal_lm(model):  # a causal LM's token labels: t predicts t + 1
        labels = labels[:, 1:]  # (a sequence classifier's are one per row, a token classifier's one per token)
    return model(**batch).loss, int((labels != -100).sum())


def _loss(model: nn.Module, teacher: nn.Module | None, batch: dict, loss: str, encoder_decoder: bool) -> torch.Tensor:
    """``_batch_loss``'s mean; a left-padded batch (``is_left_padded``) runs row by row without its padding
    (``padding.unpadded_rows``) and the rows' means are weighted by their positions: the padded batch's
    mean, as if it had been padded on the right. ``encoder_decoder``: ``padding.is_encoder_decoder(model)``,
    asked once a run."""
    left = is_left_padded(batch)
    rows = unpadded_rows(batch, encoder_decoder) if left else [batch]
    runs = (_batch_loss(model, teacher, r, loss, encoder_decoder) for r in rows)
    parts = [(value, count) for value, count in runs if count]
    if not parts:  # no position (a one-token row predicts nothing): the mean would be nan, or 0 not a tensor
        raise SvdloraError(
            "a healing batch has no position to learn from (its rows one token long, or padding only): "
            "drop it or pass longer texts"
        )
    if not left:
        return parts[0][0]
    return sum(value * count for value, count in parts) / sum(count for _, count in parts)


def learning_rate(peak: float, step: int, steps: int, elapsed: float, seconds: float | None) -> float:
    """Linear warm-up over ``WARMUP_STEPS``, or a tenth of a run of fewer than 10 times as many steps
    (at least one: a run of 3 steps starts at ``peak``), then cosine decay to ``FINAL_LR_FRACTION`` of
    ``peak`` at the end of the run, whichever of the step limit or the time limit ends it first."""
    progress = step / steps if steps else 0.0
    if seconds:
        progress = max(progress, elapsed / seconds)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    warmup = min(WARMUP_STEPS, max(1, steps // 10))
    return peak * min(1.0, (step + 1) / warmup) * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * cosine)


def _restore(params: list[nn.Parameter], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, value in zip(params, values, strict=True):
            p.copy_(value)


def _step(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], masters: list[torch.Tensor]) -> None:
    """One optimizer step on ``masters``: half-precision ``params`` take their gradient into their float32
    master and its updated value back; the others are their own masters. Adam on float16 tensors divides
    0 by 0 at its first step (its second moment underflows and its eps, 1e-8, rounds to 0: nan whatever
    the rate), and in bfloat16 most updates of the default rate round away."""
    for p, master in zip(params, masters, strict=True):
        if master is not p:  # one gradient held at a time: the half one is dropped once copied
            master.grad, p.grad = (None if p.grad is None else p.grad.float()), None
    optimizer.step()
    with torch.no_grad():
        for p, master in zip(params, masters, strict=True):
            if master is not p:
                p.copy_(master)
                master.grad = None


def _check_finite(value: float, step: int, factors: list[nn.Parameter], before: list[torch.Tensor] | None) -> None:
    """Refuse a loss that is not finite: the update before ``step`` wrecked the factors, so the caller gets
    them back as they were before healing (``before``, where kept)."""
    if math.isfinite(value):
        return
    if before is not None:
        _restore(factors, before)
    raise SvdloraError(f"healing diverged at step {step} (loss {value}): lower --heal-lr")


def _loss_after(model: nn.Module, teacher: nn.Module | None, batches: list[dict], loss: str, enc_dec: bool) -> float:
    """The healed model's mean loss on ``batches``, those of the first steps: compared with their losses it
    tells what healing did. The last steps' own losses were of other batches (on SmolLM2 '0.0198 -> 0.0162'
    where the four calibration batches' mean KL had gone from 0.018 to 0.148)."""
    with torch.no_grad():
        return sum(_loss(model, teacher, b, loss, enc_dec).item() for b in batches) / len(batches)


def heal(
    model: nn.Module,
    batches: list[dict],
    steps: int,
    *,
    teacher: nn.Module | None = None,
    loss: str = "distill",
    seconds: float | None = None,
    lr: float = 1e-4,
    parameters: list[nn.Parameter] | None = None,
    progress: bool = True,
    restore_on_divergence: bool = True,
) -> HealResult:
    """Fine-tune the factors of ``model`` in place for ``steps`` steps (or ``seconds``), one batch a step,
    with Adam at peak rate ``lr`` (``learning_rate``: warm-up, then cosine decay).

    Args:
        model: a compressed model (its ``LowRankLinear`` factors are trained, nothing else).
        batches: model inputs, cycled through; ``lm`` needs ``labels`` in them.
        teacher: the dense model, for ``loss="distill"``.
        parameters: what to train instead of the factors (e.g. all of a dense model, as the
            control that a healed model is compared with).
        restore_on_divergence: keep a CPU copy of the trained parameters, put back if the loss
            diverges; ``compress`` turns it off (it puts the dense layers back itself), since the copy
            costs host memory the size of the factors.
    Returns:
        A ``HealResult``: the loss of the first steps (up to 8) as trained, and the healed model's on their batches.
    Raises:
        SvdloraError: the loss diverged (not finite); with ``restore_on_divergence`` the trained
            parameters are first put back as they were before healing.
    """
    if loss not in HEAL_LOSSES:  # else any other name trained on the labels as "lm"
        raise SvdloraError(f"heal_loss must be one of {HEAL_LOSSES}, got {loss!r}")
    check_heal_steps(steps, minimum=1)
    check_heal_lr(lr)
    if loss == "distill" and teacher is None:
        raise SvdloraError("distillation healing needs the dense model as teacher")
    check_heal_batches(batches, loss)
    check_unstacked(model, "heal")
    factors = trained_factors(model) if parameters is None else list(parameters)
    if not factors:
        raise SvdloraError(
            "healing found no low-rank factor to train: compress the model first (a full-… stage dtype alone "
            "has none: add a low-rank repair stage, e.g. --submatrices 2)"
        )
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in factors:
        p.requires_grad_(True)
    masters = [p.detach().float() if p.dtype in HALF_DTYPES else p for p in factors]
    optimizer = torch.optim.Adam(masters, lr=lr)
    encoder_decoder = is_encoder_decoder(model)  # the model's kind does not change between steps
    losses: list[float] = []
    start = time.perf_counter()
    before = [p.detach().to("cpu", copy=True) for p in factors] if restore_on_divergence else None  # host memory
    # no dropout in the student (the target is the deterministic dense model) nor in the teacher: one in training
    # mode (compress copies the model as given) drew dropout into every target
    with eval_mode(model, teacher), tqdm(total=steps, desc=f"healing ({loss})", disable=not progress) as bar:
        try:
            for step, batch in enumerate(itertools.cycle(batches)):
                if step >= steps or (seconds is not None and time.perf_counter() - start >= seconds):
                    break
                value = _loss(model, teacher, batch, loss, encoder_decoder)
                current = value.item()
                _check_finite(current, step, factors, before)
                for p in factors:
                    p.grad = None
                value.backward()
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(lr, step, steps, time.perf_counter() - start, seconds)
                _step(optimizer, factors, masters)
                losses.append(current)
                bar.update(1)
                bar.set_postfix(loss=loss_text(losses[-1]))
            if parameters is None and losses:
                _requantize_stages(model)  # the model in memory is then the one its folder will hold
            ends = min(8, len(losses))
            seen = list(itertools.islice(itertools.cycle(batches), ends))  # the first steps' batches
            after = _loss_after(model, teacher, seen, loss, encoder_decoder) if losses else None
            if after is not None:  # the last update, which no step's loss checked, may have wrecked them too
                _check_finite(after, len(losses), factors, before)
        finally:
            for p, flag in saved.items():
                p.requires_grad_(flag)
            for p in factors:
                p.grad = None
    if not losses:
        raise SvdloraError("healing ran no step: raise --heal-steps or --heal-seconds")
    result = HealResult(
        steps=len(losses),
        seconds=time.perf_counter() - start,
        loss=loss,
        first_loss=sum(losses[:ends]) / ends,
        last_loss=after,
    )
    logger.info(
        "healed %d steps in %.0f s: loss %s -> %s",
        result.steps,
        result.seconds,
        loss_text(result.first_loss),
        loss_text(result.last_loss),
    )
    if result.last_loss > result.first_loss:  # the same batches: healing made the model worse on its own data
        logger.warning(
            "healing raised the loss on its first batches (%s -> %s): the healed model is worse there; "
            "lower --heal-lr (heal_lr) or raise --heal-steps",
            loss_text(result.first_loss),
            loss_text(result.last_loss),
        )
    return result


def _requantize_stages(model: nn.Module) -> None:
    """Layers with stage dtypes were trained in full precision: their stages take the values they will be
    stored as (``chain.requantize``), so what is measured after healing, and any output, is what a save keeps."""
    for layer in model.modules():
        if isinstance(layer, LowRankLinear) and layer.stage_dtypes:
            requantize(layer)
