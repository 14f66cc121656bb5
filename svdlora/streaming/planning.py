"""What is known before a tensor is read: the meta model with its low-rank layers, the output
layout, and the jobs that fill it (factorize a matrix, copy a tensor, write a code-built buffer)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights

from .. import distributed
from ..allocate import allocate_ranks
from ..compress import count_parameters
from ..config import CompressionConfig
from ..errors import StreamingRefusal, SvdloraError, first_line
from ..io.checkpoint import Checkpoint
from ..io.load import _no_weight_init
from ..io.writer import TensorSpec, file_layout
from ..layers import LowRankLinear
from ..models import (
    build_model,
    check_dense_folder,
    keep_in_fp32,
    model_class,
    parse_dtype,
    read_hf_config,
    set_config_dtype,
)
from ..pivoted import PivotedLowRankLinear
from ..swap import restore_dense, untie_factorized_head
from ..targets import compression_targets


@dataclass
class Plan:
    """Everything known before a tensor is read: the meta model with its low-rank layers, the
    output layout, and the jobs (factorize a matrix, copy a tensor, write a code-built buffer)."""

    checkpoint: Checkpoint
    hf_config: object
    model: torch.nn.Module  # meta skeleton, targets swapped for meta LowRankLinear
    specs: list[TensorSpec]
    tied: dict[str, str]
    jobs: list[tuple[str, str | None, object]]  # (kind, checkpoint key, Target or output key)
    dense: dict[str, str]  # layer -> why it stays dense
    params_before: int
    target_dtype: torch.dtype | None
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    keeps_fp32: Callable[[str], bool] = lambda name: False
    names_of: dict[str, list[str]] = field(default_factory=dict)  # parameter -> every name tied to it
    targets: list = field(default_factory=list)  # every targeted layer (a Target), dense ones included
    untied_head: bool = False  # the config's tie_word_embeddings was turned off: the head is factorized

    def unswapped(self) -> torch.nn.Module:
        """The meta model as it was built: each target's dense layer back in place, the config's head tied
        again where the plan untied it. For another plan of the same checkpoint (another allocation's),
        which takes it over rather than building one; this plan is read no more."""
        originals = {t.name: t.module for t in self.targets}
        restore_dense(self.model, originals, self.hf_config, tied=True if self.untied_head else None)
        return self.model

    @property
    def target_names(self) -> list[str]:
        return [t.name for t in self.targets]

    def source_key(self, name: str) -> str | None:
        """The checkpoint's key for parameter ``name``, under any name a tied parameter has."""
        return self.first_key(self.names_of.get(name, [name]))

    def first_key(self, names: list[str]) -> str | None:
        """The checkpoint's key for the first of ``names`` it stores (with or without the model's prefix).
        A name ``Checkpoint.resolve`` refuses (filled by converting tensors, or from two) gives way to a
        later name of the tied group that the checkpoint stores as it is; its refusal stands where none does."""
        prefix = getattr(self.model, "base_model_prefix", "")
        refused = None
        for name in names:
            try:
                key = self.checkpoint.resolve(name, prefix)
            except SvdloraError as err:
                refused = refused or err
                continue
            if key is not None:
                return key
        if refused is not None:
            raise refused
        return None

    def out_dtype(self, stored: torch.dtype, name: str) -> torch.dtype:
        """The dtype ``from_pretrained(dtype=target)`` gives parameter ``name``: the model's
        keep-in-float32 modules (T5's ``wo``, MoE routers) stay float32, as in memory."""
        if self.target_dtype is None or not stored.is_floating_point:
            return stored
        return torch.float32 if self.keeps_fp32(name) else self.target_dtype

    def weight_dtype(self, layer: str) -> torch.dtype | None:
        """The dtype ``layer``'s weight is loaded in (and its factors written in); None where it is not stored."""
        key = self.source_key(f"{layer}.weight")
        return None if key is None else self.out_dtype(self.checkpoint.spec[key].dtype, f"{layer}.weight")

    def cost(self, job) -> float:
        kind, src, what = job
        if kind == "factorize":
            return distributed.svd_cost(what.out_features, what.in_features)
        return float(self.checkpoint.spec[src].nbytes) if kind == "copy" else 0.0


def meta_model(
    source: str | Path, trust_remote_code: bool = False, built: torch.nn.Module | None = None
) -> tuple[object, torch.nn.Module]:
    """(config, model) of a folder's config.json, the model built on the meta device (no memory), its
    tied weights tied as ``from_pretrained`` ties them. ``built``: the model already built from it
    (``evaluation.loading.local_outline``, untied), tied here rather than built again where it was built
    from ``source`` (a hub id's cached snapshot that the memory check read may be older than the one read now)."""
    if built is not None and _built_from(built, source):
        hf_config, model = built.config, built
    else:
        hf_config, model = _build(source, trust_remote_code)
    if getattr(hf_config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()  # as from_pretrained does: find_targets and the layout see the tie
    return hf_config, model


def _built_from(model: torch.nn.Module, source: str | Path) -> bool:
    """Whether ``model`` was built from the folder ``source`` (its config names the path it was read from)."""
    read = getattr(model.config, "name_or_path", None)
    return bool(read) and Path(read).expanduser().resolve() == Path(source).expanduser().resolve()


def _build(source: str | Path, trust_remote_code: bool) -> tuple[object, torch.nn.Module]:
    hf_config = read_hf_config(source, trust_remote_code=trust_remote_code)
    cls = model_class(hf_config)
    try:
        with init_empty_weights(), _no_weight_init():  # AutoModel (no known class named): from_config
            return hf_config, build_model(cls, hf_config, trust_remote_code)
    except (OSError, ValueError, TypeError, ImportError, AttributeError) as err:
        raise StreamingRefusal(
            "{source!r}: {cls} cannot be built from config.json on the meta device ({why}): {in_memory}",
            source=str(source), cls=cls.__name__, why=first_line(err),
        ) from None  # fmt: skip


def plan(
    source: str | Path,
    config: CompressionConfig,
    dtype=None,
    trust_remote_code: bool = False,
    allocation=None,
    model: torch.nn.Module | None = None,
) -> Plan:
    """Targets, ranks and the output layout of a checkpoint, from its config and headers alone
    (or from ``allocation``, the (ranks, dense) a global allocation chose). ``model``: the folder's
    meta model already built (``evaluation.loading.local_outline``), taken over (its targets are
    swapped for low-rank layers) rather than built again."""
    if not Path(source).is_dir():
        raise SvdloraError(f"streaming needs a local folder, got {str(source)!r}: see hub.local_checkpoint")
    check_dense_folder(Path(source), str(source))  # issue 7's checks: no svdlora folder, no truncated file
    ckpt = Checkpoint(source)
    hf_config, model = meta_model(source, trust_remote_code, built=model)
    ckpt.follow_renames(model)
    target_dtype = load_dtype(parse_dtype(dtype), hf_config, ckpt)
    params_before = count_parameters(model)
    same: dict[int, list[str]] = {}  # a checkpoint may store a tied parameter under any of its names
    for name, param in model.named_parameters(remove_duplicate=False):
        same.setdefault(id(param), []).append(name)
    names_of = {n: group for group in same.values() for n in group}
    out = Plan(ckpt, hf_config, model, [], {}, [], {}, params_before, target_dtype)
    out.keeps_fp32, out.names_of = keep_in_fp32(model, target_dtype), names_of
    # the meta weights are not in the load's dtype, which the factors are stored in and prices the pivot indices
    targets, dense = compression_targets(model, config, dtype_of=out.weight_dtype)
    out.targets, out.dense = targets, dense
    ranks, allocator_dense = allocation or allocate_ranks(targets, config)
    dense.update(allocator_dense)
    weight_dtype = {t.name: t.dtype for t in targets}
    for t in targets:
        if t.name not in ranks:
            continue
        key = out.source_key(f"{t.name}.weight")
        if key is None:
            raise StreamingRefusal(
                "{source!r} has no tensor for {key}: {in_memory}", source=str(source), key=f"{t.name}.weight"
            )
        _check_shape(source, key, ckpt.spec[key].shape, t.module.weight.shape, model)
        layer = (PivotedLowRankLinear if config.pivot else LowRankLinear)(
            t.in_features, t.out_features, ranks[t.name], bias=t.module.bias is not None,
            base_kind=t.kind, device="meta", dtype=weight_dtype[t.name],
        )  # fmt: skip
        model.set_submodule(t.name, layer)
        out.jobs.append(("factorize", key, t))
    out.untied_head = untie_factorized_head(model, config, hf_config)  # as compress() does
    layout, out.tied = file_layout(model)
    buffers = out.buffers = dict(model.named_buffers())
    stage_owner = {  # factor tensors -> their layer: written by the factorize jobs
        key: name
        for name, layer in model.named_modules()
        if isinstance(layer, LowRankLinear)
        for key in factor_keys(name, layer)
    }
    aliases: dict[str, list[str]] = {}
    for alias, stored in out.tied.items():
        aliases.setdefault(stored, []).append(alias)
    for key, tensor in layout:
        if key in stage_owner:
            kind = tensor.dtype if not tensor.is_floating_point() else weight_dtype[stage_owner[key]]
            out.specs.append(TensorSpec(key, tuple(tensor.shape), kind))  # pivot indices stay int64
        elif (src := out.first_key([key, *aliases.get(key, [])])) is not None:
            _check_shape(source, src, ckpt.spec[src].shape, tensor.shape, model)
            out.specs.append(TensorSpec(key, ckpt.spec[src].shape, out.out_dtype(ckpt.spec[src].dtype, key)))
            out.jobs.append(("copy", src, key))
        elif key in buffers and buffers[key].device.type != "meta":  # built by the model's code
            out.specs.append(TensorSpec(key, tuple(tensor.shape), tensor.dtype))
            out.jobs.append(("buffer", None, key))
        else:
            raise StreamingRefusal("{source!r} has no tensor {key!r}: {in_memory}", source=str(source), key=key)
    return out


def _check_shape(source, key: str, stored, wanted, model) -> None:
    """Refuse a stored tensor whose shape is not the model's, as loading it in memory does (a copy
    would make a folder that does not load, a factorization fail midway)."""
    if tuple(stored) != tuple(wanted):
        raise SvdloraError(
            f"{str(source)!r}: tensor {key!r} has shape {list(stored)} but {type(model).__name__} needs "
            f"{list(wanted)}: config.json and the weights do not match"
        )


def load_dtype(dtype: torch.dtype | None, hf_config, ckpt: Checkpoint) -> torch.dtype:
    """The dtype ``from_pretrained(dtype=dtype or "auto")`` loads the model in, set on ``hf_config`` (and its
    sub-configs) as it sets it, so config.json records it: ``dtype``, else config.json's, else the first
    floating tensor's of the first checkpoint file (by name, as ``safe_open`` lists them); every floating
    tensor is then cast to it (but the keep-in-float32 ones)."""
    dtype = dtype or parse_dtype(getattr(hf_config, "dtype", None))
    if dtype is None:
        first = [ckpt.spec[k].dtype for k in sorted(ckpt.spec) if ckpt.file_of[k] == ckpt.files[0]]
        floating = [d for d in first if d.is_floating_point and "float8_" not in str(d) and "float4_" not in str(d)]
        dtype = (floating or first or [torch.float32])[0]
    set_config_dtype(hf_config, dtype)
    return dtype


def factor_keys(name: str, layer: LowRankLinear) -> list[str]:
    if isinstance(layer, PivotedLowRankLinear):
        return [f"{name}.pivoted.{part}" for part in ("B", "C", "rows")]
    return [f"{name}.stage{j}.{part}" for j in range(len(layer.ranks)) for part in "AB"]
