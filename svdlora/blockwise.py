"""Streamed calibration: one decoder block in memory at a time ("sequential onloading").

Whitening (SVD-LLM, method "whiten") needs only each layer's input Gram E[x xᵀ], and a decoder
block's inputs are the previous block's outputs. So the calibration batches run through the
embeddings once, then block by block: each block is read from the checkpoint, run on the
hidden states with the same hooks as in-memory calibration (``calibration._Accumulator``), its
matrices factorized and written, its outputs kept as the next block's inputs, and the block
dropped. Memory holds one block, the calibration hidden states (samples × length × hidden,
twice) with each window's other block arguments, and one block's Grams, never the model (the
embeddings are dropped after the first pass, KV caches are not kept); the factors equal
in-memory compression's with ``method="whiten", allocation="uniform"`` bit for bit (tested).

Fisher / K-FAC output weights and global allocation also need the loss gradient at every
layer: ``block_gradients`` runs that backward pass block by block, with the pieces here. What
does not stream, and why: self-generated calibration text needs the whole model to generate;
the refit feeds each layer the compressed model's inputs, healing trains the whole model, and
stage dtypes are built in memory (none of them built block-wise yet).
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging

import torch
from accelerate import init_empty_weights
from torch import nn
from tqdm.auto import tqdm
from transformers.cache_utils import Cache

from .calibration import _Accumulator, _hooks
from .distributed import Context
from .errors import StreamingRefusal
from .io.load import _no_weight_init
from .models import model_class
from .padding import calibration_runs
from .plan import CalibrationPlan, factor_dtype, resolved_allocation, uses_calibration

logger = logging.getLogger(__name__)

CACHE_ARGUMENTS = ("past_key_values", "past_key_value", "layer_past", "cache")


class _Captured(Exception):
    """Raised by the hook on the first block once it has its inputs: nothing after it runs."""


def resolve(config) -> tuple[str, str] | None:
    """The method and allocation a streamed calibrated run uses, resolved as in memory (method
    ``auto`` is resolved once the targets are known: ``plan.auto_method``); None: plain SVD, which
    does not use the data. Settings built in memory only raise an SvdloraError that says so."""
    if config.heal_steps or config.refit or config.stage_dtypes:
        raise StreamingRefusal(
            "healing, --refit and --stage-dtypes cannot stream with calibration: drop them, or {in_memory}"
        )
    if not uses_calibration(config):  # (healing is refused above) plain SVD with uniform allocation
        return None
    return config.method, resolved_allocation(config)


def find_blocks(model: nn.Module, names: list[str]) -> tuple[str, nn.ModuleList]:
    """The ModuleList of repeated blocks that holds every targeted layer (a decoder's layers)."""
    best, holds = None, -1
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            count = sum(n.startswith(f"{name}.") for n in names)
            if count > holds:
                best, holds = (name, module), count
    if best is None or holds < len(names):
        outside = [n for n in names if best is None or not n.startswith(f"{best[0]}.")]
        raise StreamingRefusal(
            "streamed calibration runs one stack of blocks at a time; {outside!r} is outside it: drop "
            "--compress-head if it is the head, else --exclude it; or {in_memory}",
            outside=outside[0],
        )
    return best


def check(model, hf_config, target_names: list[str]) -> None:
    """Refuse, before any data is read, a checkpoint whose layers cannot be calibrated block by block
    (from its meta model, config and targets: a plan's, or the config's alone before a download)."""
    from .calibration_data import kind_article, model_kind

    kind = model_kind(model)
    if kind != "causal-lm":
        raise StreamingRefusal(
            "streamed calibration runs a causal LM's decoder block by block; this is {kind} model: calibrate it in "
            "memory ({in_memory}), or pass --calibration none",
            kind=kind_article(kind),
        )
    kinds = getattr(hf_config, "layer_types", None) or []
    if len(set(kinds)) > 1:  # every block is fed the keyword arguments captured at the first one
        raise StreamingRefusal(
            "this model's decoder blocks differ in attention type ({kinds}: their masks differ), which streamed "
            "calibration does not handle yet: {in_memory}, or pass --calibration none",
            kinds=", ".join(sorted(set(kinds))),
        )
    find_blocks(model, target_names)


def never_ran(name: str) -> StreamingRefusal:
    """A target the calibration's forward passes never reached (whitening's or the gradients' pass)."""
    return StreamingRefusal("{name!r} never ran on the calibration data: --exclude it, or {in_memory}", name=name)


def calibrate_and_factorize(
    plan,
    batches: list[dict],
    config,
    factorize_into,
    progress: bool,
    device=None,
    ctx=None,
    owned=None,
    whole: bool = True,
) -> dict:
    """Whiten (method "whiten", uniform allocation): run ``batches`` block by block through the
    checkpoint of ``plan`` (a ``streaming.Plan``) and call ``factorize_into(target, weight,
    weighting)`` for each of the plan's factorize jobs (weight and weighting on the CPU); returns
    their report lines. ``device`` (e.g. "cuda") runs the blocks and the whitening there.

    Under torchrun (``ctx``, a ``distributed.Context``) each rank passes its own windows: the
    Gram sums are added over the ranks block by block, and a rank factorizes only the layers
    named in ``owned``. ``whole``: a padded batch runs in one pass where it can (``run_batches``)."""
    ctx = ctx if ctx is not None else Context()
    model = meta_model(plan, device)
    batches, masks = run_batches(batches, device, whole)
    jobs = {what.name: what for kind, _, what in plan.jobs if kind == "factorize"}
    blocks_name, blocks = find_blocks(model, list(jobs))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = {id(p) for p in head.parameters()} if head is not None else set()
    skip -= {id(p) for p in model.get_input_embeddings().parameters()}  # a tied head is the embedding
    outside = _materialize(plan, model, "", exclude=(f"{blocks_name}.",), skip=skip, device=device)
    inputs = _capture_inputs(model, blocks[0], batches)
    _release(outside)  # the embeddings are not needed again: one block at a time from here
    reports = {}
    for i, block in enumerate(tqdm(blocks, desc="calibrating block by block", disable=not progress)):
        prefix = f"{blocks_name}.{i}."
        filled = _materialize(plan, block, prefix, device=device)
        targets = [
            dataclasses.replace(what, module=model.get_submodule(name))
            for name, what in jobs.items()
            if name.startswith(prefix)
        ]
        accumulator = _Accumulator(targets, gradients=False)
        with _hooks(targets, accumulator), torch.no_grad():
            for entry, real in zip(inputs, masks, strict=True):
                accumulator.new_batch(real)
                entry.run(block)
        accumulator.new_batch()
        accumulator.sum_over_ranks(ctx)
        stats = CalibrationPlan("whiten", "uniform", stats=accumulator.result(), dtype=factor_dtype(targets))
        moved = {}  # q/k/v's S and S⁻¹ copied to the CPU once
        for target in targets:
            if target.name not in stats.stats:
                raise never_ran(target.name)
            if owned is not None and target.name not in owned:
                continue  # another rank's
            weighting = on_cpu(stats.weighting(target.name), moved)
            reports[target.name] = factorize_into(jobs[target.name], target.module.weight.detach().cpu(), weighting)
        del stats, accumulator, targets
        _release(filled)  # drop this block's weights before reading the next one
    return reports


def meta_model(plan, device=None) -> nn.Module:
    """The checkpoint's model on the meta device (tied as ``from_pretrained`` ties it), in eval
    mode; the buffers its code builds (rotary frequencies) on ``device``, where the blocks will run."""
    with init_empty_weights(), _no_weight_init():
        model = model_class(plan.hf_config)(plan.hf_config)
    if getattr(plan.hf_config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    if device is not None:
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.device.type != "meta":
                    module._buffers[name] = buffer.to(device)
    return model.eval()


def on_device(batches: list[dict], device) -> list[dict]:
    """The calibration batches on ``device`` (unchanged for None)."""
    if device is None:
        return batches
    return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]


def on_cpu(weighting, moved: dict | None = None):
    """A weighting computed on the calibration device, on the CPU (the factorization moves it to
    ``--device`` itself); the same object when it is there already. ``moved`` (id -> CPU copy)
    keeps a matrix shared by several layers (q/k/v's whitening) one tensor on the CPU too."""
    if weighting is None:
        return None
    parts = {k: getattr(weighting, k) for k in ("left", "right", "right_inverse")}
    if all(t is None or t.device.type == "cpu" for t in parts.values()):
        return weighting
    moved = {} if moved is None else moved
    for k, t in parts.items():
        if t is not None:
            if id(t) not in moved:
                moved[id(t)] = t.cpu()
            parts[k] = moved[id(t)]
    return dataclasses.replace(weighting, **parts)


class _BlockInputs:
    """One batch's arguments to a block; ``run`` replaces the hidden states with the block's output."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        self.args, self.kwargs = args, kwargs
        self.tuple_output = False  # the block returns (hidden, ...) (older transformers), not hidden

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    @hidden.setter
    def hidden(self, value: torch.Tensor) -> None:
        if self.args:
            self.args = (value, *self.args[1:])
        else:
            self.kwargs["hidden_states"] = value

    def call(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The block's output hidden states for ``hidden`` in place of this batch's."""
        args, kwargs = self.args, self.kwargs
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs = {**kwargs, "hidden_states": hidden}
        out = block(*args, **kwargs)
        self.tuple_output = isinstance(out, tuple)
        return out[0] if self.tuple_output else out

    def run(self, block: nn.Module) -> None:
        self.hidden = self.call(block, self.hidden)


def run_batches(batches: list[dict], device, whole: bool = True) -> tuple[list[dict], list[list[torch.Tensor]]]:
    """The forward passes of ``batches`` and each one's real positions, as in-memory calibration runs
    them (``padding.calibration_runs``: padding is no tokens), on ``device``."""
    runs = calibration_runs(batches, encoder_decoder=False, whole=whole)  # the streamed passes run decoder-only LMs
    masks = [[m if device is None else m.to(device) for m in real] for _, real in runs]
    return on_device([batch for batch, _ in runs], device), masks


def _capture_inputs(model: nn.Module, first: nn.Module, batches: list[dict]) -> list[_BlockInputs]:
    captured = []

    def hook(module, args, kwargs):
        # no KV cache, by keyword (Llama) or by position (GPT-2): each batch's would grow by every
        # block's keys and values (2.5 GB on SmolLM2)
        args = tuple(None if isinstance(a, Cache) else a for a in args)
        kwargs = {k: None if isinstance(v, Cache) or k in CACHE_ARGUMENTS else v for k, v in kwargs.items()}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        captured.append(_BlockInputs(args, kwargs))
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model(**batch)
                except _Captured:
                    pass
                else:
                    raise StreamingRefusal("the model's forward never reached its first block: {in_memory}")
    finally:
        handle.remove()
    return captured


def _materialize(
    plan, module: nn.Module, prefix: str, exclude: tuple[str, ...] = (), skip=frozenset(), device=None
) -> list:
    """Read ``module``'s meta parameters from the checkpoint (named ``prefix`` + their local name,
    or a name tied to it), in the dtype in-memory loading gives them (``plan.out_dtype``), onto
    ``device`` (None: the CPU).

    Buffers are built by the model's code (``init_empty_weights`` leaves them real) and used as
    built, as in memory for non-persistent ones. Returns the (module, name) pairs it filled.
    """
    filled = []
    for local, tensor in module.named_parameters():
        name = prefix + local
        if name.startswith(exclude) or id(tensor) in skip or tensor.device.type != "meta":
            continue
        key = plan.source_key(name)
        if key is None:
            raise StreamingRefusal("the checkpoint has no tensor for {name!r}: {in_memory}", name=name)
        value = plan.checkpoint.read(key)
        owner, _, attr = local.rpartition(".")
        parent = module.get_submodule(owner) if owner else module
        value = value.to(plan.out_dtype(value.dtype, name))
        parent._parameters[attr] = nn.Parameter(value if device is None else value.to(device), requires_grad=False)
        filled.append((parent, attr))
    return filled


def pin_mmap_threshold() -> None:
    """Serve every allocation of 128 KiB or more by mmap (glibc's ``mallopt``; a no-op elsewhere).

    glibc raises its mmap threshold after large frees, so the windows' hidden states, allocated
    and freed once per block, then come from the heap, whose freed pages stay resident: on SmolLM2
    with 64 windows the peak RSS was 1.8-2.2 GB, against 0.8 GB with the threshold pinned. It is
    process-wide, so the CLI pins it (a library caller can set ``MALLOC_MMAP_THRESHOLD_=131072``).
    """
    try:
        ctypes.CDLL(None).mallopt(-3, 128 * 1024)  # -3: M_MMAP_THRESHOLD
    except (AttributeError, OSError):
        pass


def _release(filled: list) -> None:
    """Put parameters ``_materialize`` read back on the meta device (their memory is freed)."""
    for parent, attr in filled:
        parent._parameters[attr] = nn.Parameter(parent._parameters[attr].to("meta"), requires_grad=False)
