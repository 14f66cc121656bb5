"""What ``svdlora extract`` refuses before the slow part: a base/tuned pair that is not one model
before and after fine-tuning (architecture, vocabulary, tensor shapes, dtypes), and changed layers
that one peft adapter cannot hold together (Linear beside GPT-2 Conv1D)."""

from __future__ import annotations

from torch import nn

from ..errors import SvdloraError
from ..layers import CONV1D


def check_pair(base: nn.Module, tuned: nn.Module) -> None:
    """Base and tuned must be the same architecture with the same tensor shapes."""
    if type(base) is not type(tuned):
        raise SvdloraError(
            f"base and tuned models differ in architecture ({type(base).__name__} vs {type(tuned).__name__}): "
            "pass the model the fine-tune started from as --base"
        )
    base_type = getattr(getattr(base, "config", None), "model_type", None)
    tuned_type = getattr(getattr(tuned, "config", None), "model_type", None)
    if base_type != tuned_type:
        raise SvdloraError(f"base is a {base_type!r} model and tuned a {tuned_type!r} one: they must match")
    vocab = [_vocabulary_size(base), _vocabulary_size(tuned)]
    if vocab[0] != vocab[1]:
        raise SvdloraError(
            f"base and tuned have different vocabulary sizes ({vocab[0]} vs {vocab[1]} tokens): a LoRA adapter "
            "cannot add tokens; resize the base first (base.resize_token_embeddings) and save it, or pass the "
            "matching base"
        )
    base_shapes = {k: v.shape for k, v in base.state_dict().items()}
    tuned_shapes = {k: v.shape for k, v in tuned.state_dict().items()}
    if base_shapes.keys() != tuned_shapes.keys():
        extra = sorted(base_shapes.keys() ^ tuned_shapes.keys())[:3]
        raise SvdloraError(f"base and tuned hold different tensors (e.g. {extra}): they must be the same architecture")
    for key, shape in base_shapes.items():
        if tuned_shapes[key] != shape:
            raise SvdloraError(
                f"tensor {key!r} is {tuple(shape)} in base and {tuple(tuned_shapes[key])} in tuned: "
                "they must be the same architecture and size"
            )


def check_dtypes(base: nn.Module, tuned: nn.Module) -> None:
    """The loaded pair must hold each floating tensor in one dtype: a float32 base and a bfloat16 fine-tune
    differ in every tensor by the rounding, which the delta (and whole untouched embeddings) would carry.
    Not part of ``check_pair``, which also compares skeletons built on the meta device in a default dtype."""
    tuned_state = tuned.state_dict()
    for key, tensor in base.state_dict().items():
        other = tuned_state[key]
        if tensor.is_floating_point() and other.is_floating_point() and tensor.dtype != other.dtype:
            raise SvdloraError(
                f"tensor {key!r} is {tensor.dtype} in base and {other.dtype} in tuned: the delta would carry the "
                "rounding between them; load both in one dtype (--dtype, or dtype= in from_pretrained), the one the "
                "fine-tune ran in"
            )


def _vocabulary_size(model: nn.Module) -> int | None:
    """Rows of the input embedding; None for a model without one (transformers raises NotImplementedError
    for models such as ResNet, whose input is pixels)."""
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return embedding.weight.shape[0] if isinstance(embedding, nn.Embedding) else None


def check_one_kind(layers: list[tuple[str, str]]) -> None:
    """The adapter's (name, kind) layers are all Linear or all GPT-2 Conv1D: one peft LoraConfig has one
    fan_in_fan_out, so GPT-2's Conv1D blocks and a Linear layer (its head) cannot share it. Checked before
    the factorizations, and again on the Extraction written."""
    linear = [name for name, kind in layers if kind != CONV1D]
    conv1d = [name for name, kind in layers if kind == CONV1D]
    if not linear or not conv1d:
        return
    fewer = min(linear, conv1d, key=len)

    def listed(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f", … {len(names)} in all" if len(names) > 3 else "")

    fix = f"exclude={fewer!r} (--exclude {' '.join(fewer)})" if len(fewer) <= 3 else "--exclude patterns for them"
    raise SvdloraError(
        f"the changed targets mix Linear ({listed(linear)}) and GPT-2 Conv1D ({listed(conv1d)}) layers, and one "
        f"peft adapter holds one fan_in_fan_out for all: store the {'Linear' if fewer is linear else 'Conv1D'} "
        f"ones whole, {fix}"
    )


__all__ = ["check_dtypes", "check_one_kind", "check_pair"]
