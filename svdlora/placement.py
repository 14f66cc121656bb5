"""device_map loading: which device each tensor of a compressed model goes to (accelerate).

``"auto"`` / ``"balanced"`` / ... are planned by ``accelerate.infer_auto_device_map`` on the
meta skeleton, which already holds the low-rank layers (so it plans with factor sizes, or
with dense sizes when merging); a dict is used as given, and one device (``"cpu"``,
``"cuda:1"``, ``torch.device``, a GPU index) means ``{"": device}``, as in transformers. Tensors
are then read one at a time onto their device, and ``accelerate.dispatch_model`` adds the hooks
that move activations between devices.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import SvdloraError
from .io.writer import parse_size
from .models import default_device

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DEVICES = ("cpu", "mps", "disk")  # the max_memory keys accelerate takes besides GPU indices


def parse_max_memory(max_memory: dict | None, device_map=None) -> dict[int | str, int] | None:
    """``max_memory`` checked before the load, as a new dict in bytes: accelerate raised its own
    ValueError on a size or device it cannot read (and rewrote the caller's dict in place). Sizes
    read as --max-shard-size reads them ('500mb' is 500e6 bytes, as everywhere in svdlora)."""
    if max_memory is None:
        return None
    if not (isinstance(device_map, str) and device_map in STRATEGIES):  # was ignored without a word
        raise SvdloraError(
            f"max_memory caps what a device_map strategy ({', '.join(STRATEGIES)}) puts on each device; "
            f"device_map={device_map!r} places the layers itself: pass device_map='auto' or drop max_memory"
        )
    if not isinstance(max_memory, dict):
        raise SvdloraError(f"max_memory must be a dict such as {{0: '20GiB', 'cpu': '60GB'}}, got {max_memory!r}")
    for key in max_memory:
        if isinstance(key, int) and not isinstance(key, bool):
            default_device(key)  # a GPU this machine lacks: accelerate prints, then asserts
        elif key not in DEVICES:  # "cuda:0" too: accelerate wants the index
            raise SvdloraError(f"max_memory keys must be GPU indices or {', '.join(map(repr, DEVICES))}, got {key!r}")
    return {key: parse_size(size, f"max_memory[{key!r}]") for key, size in max_memory.items()}


def resolve_device_map(
    model: nn.Module, device_map: str | dict, max_memory: dict | None, dtype: torch.dtype | None
) -> dict[str, str | int | torch.device]:
    """The device of each module; ``max_memory`` as ``parse_max_memory`` returns it."""
    if isinstance(device_map, str) and device_map not in STRATEGIES:
        try:  # one device, as from_pretrained(device_map="cpu") takes it
            device_map = torch.device(device_map)
        except RuntimeError:
            raise SvdloraError(
                f"device_map must be 'auto', 'balanced', 'balanced_low_0', 'sequential', a device or a dict, "
                f"got {device_map!r}"
            ) from None
    if isinstance(device_map, (torch.device, int)) and not isinstance(device_map, bool):
        plan = {"": device_map if isinstance(device_map, int) else str(device_map)}
    elif isinstance(device_map, dict):
        plan = _checked_names(model, dict(device_map))
    elif isinstance(device_map, str):
        from accelerate import infer_auto_device_map
        from accelerate.utils import get_balanced_memory

        no_split = list(getattr(model, "_no_split_modules", None) or [])
        if device_map in ("balanced", "balanced_low_0") or (device_map == "auto" and max_memory is None):
            max_memory = get_balanced_memory(
                model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype,
                low_zero=device_map == "balanced_low_0",
            )  # fmt: skip
        plan = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    else:
        raise SvdloraError(f"device_map must be a string, a device or a dict, got {type(device_map).__name__}")
    if any(d == "disk" for d in plan.values()):
        raise SvdloraError("device_map puts layers on 'disk': svdlora does not offload to disk; raise max_memory")
    for device in set(plan.values()):
        default_device(device)  # one this machine has
    return plan


def _checked_names(model: nn.Module, plan: dict) -> dict:
    """A dict's keys must name the model's modules or tensors ('' for the rest): a typo's layers went, without a
    word, to the device of the module holding them (or of '')."""
    modules = {name for name, _ in model.named_modules(remove_duplicate=False)}
    names = modules | {name for name, _ in model.named_parameters(remove_duplicate=False)}
    names |= {name for name, _ in model.named_buffers(remove_duplicate=False)}
    unknown = [key for key in plan if key not in names]
    if unknown:
        # a dense model's tensor name ('...gate_proj.weight') of a layer that holds factors here: name the layer
        held = [key.rpartition(".")[0] for key in unknown if key.rpartition(".")[0] in modules]
        fix = f"name the layer instead ({held[0]!r}: its tensors here are factors)" if held else "fix the name"
        raise SvdloraError(
            f"device_map names {', '.join(map(repr, unknown[:3]))}, which the model does not have (its top-level "
            f"modules: {', '.join(list(dict(model.named_children()))[:4])}): {fix}"
        )
    return plan


def device_for(plan: dict, key: str) -> torch.device:
    """The device of a tensor name under a device map (longest matching module prefix)."""
    name = key
    while True:
        if name in plan:
            d = plan[name]
            return torch.device(f"cuda:{d}" if isinstance(d, int) else d)
        if not name:
            raise SvdloraError(f"device_map places no module holding {key!r}: add it (or '' for a default)")
        name = name.rpartition(".")[0]


def dispatch(model: nn.Module, plan: dict) -> nn.Module:
    from accelerate import dispatch_model

    devices = {str(device_for(plan, "")) if "" in plan else None, *map(str, plan.values())} - {None}
    if len(devices) == 1:  # one device: a plain .to(), no hooks
        model = model.to(next(iter(plan.values())) if "" not in plan else plan[""])
        model.hf_device_map = dict(plan)  # as dispatch_model and from_pretrained(device_map=...) set it
        return model
    return dispatch_model(model, device_map=plan)
