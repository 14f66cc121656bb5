"""Write an ``Extraction`` as a PEFT LoRA folder that ``PeftModel.from_pretrained(base, folder)`` loads.

peft itself writes the folder: the tuned model is wrapped by ``get_peft_model`` with a
``LoraConfig`` that names every module (``target_modules``), its rank (``rank_pattern``) and
``lora_alpha`` equal to that rank (``alpha_pattern``), so peft's scaling alpha/r is exactly 1;
the LoRA weights are set to the factors, ``modules_to_save`` wrappers copy the tuned modules,
``save_pretrained`` writes ``adapter_config.json`` and ``adapter_model.safetensors``, and
``unload`` gives the tuned model back unchanged. Writing through peft keeps the files in the
format of the installed peft release.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from .. import card
from ..config import CompressionConfig
from ..errors import SvdloraError
from ..extract import extract_adapter
from ..extract.checks import check_one_kind
from ..extract.records import Extraction
from ..io.outputs import atomic_folder, check_output_folder, readable_as_umask
from ..layers import CONV1D
from ..models import folder_bytes
from ..version import __version__

logger = logging.getLogger(__name__)

TASK_TYPES = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"))
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def require_peft():
    try:
        import peft
    except ImportError:
        raise SvdloraError("peft is not installed, and adapters are written in its format: pip install peft") from None
    return peft


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    task = next((task for suffix, task in TASK_TYPES if name.endswith(suffix)), None)
    if task is None and getattr(getattr(model, "config", None), "is_encoder_decoder", False) and model.can_generate():
        task = "SEQ_2_SEQ_LM"  # MarianMTModel, T5ForConditionalGeneration: peft's Seq2SeqLM wrapper generates
    return task


def lora_config(extraction: Extraction, model: nn.Module, base_name: str | None):
    """The ``LoraConfig``: one explicit rank and alpha per module, scaling 1 everywhere."""
    peft = require_peft()
    ranks = {m.name: m.rank for m in extraction.lora}
    common = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    kinds = {m.kind for m in extraction.lora}
    check_one_kind([(m.name, m.kind) for m in extraction.lora])
    return peft.LoraConfig(
        r=common,
        lora_alpha=common,
        rank_pattern=ranks,
        alpha_pattern=dict(ranks),
        target_modules=sorted(ranks) or None,
        modules_to_save=sorted(extraction.modules_to_save) or None,
        fan_in_fan_out=kinds == {CONV1D},  # GPT-2's Conv1D stores (in, out)
        lora_dropout=0.0,
        bias="none",
        lora_bias=extraction.lora_bias,
        task_type=_task_type(model),
        base_model_name_or_path=base_name,
        inference_mode=True,
        **_weight_tying(extraction, model),
    )


def _weight_tying(extraction: Extraction, model: nn.Module) -> dict:
    """``ensure_weight_tying`` where ``model`` ties its head to an input embedding the adapter saves whole (a
    fine-tune that moved them): peft then saves and loads them as one module and keeps them tied when merged, where
    it otherwise warns, on writing and on every load, that they are not (peft issue 2777), and merging unties them.
    Left unset where peft (0.21) cannot tie them: an embedding it does not know by name on load (EMBEDDING_LAYER_NAMES:
    Llama's embed_tokens, not GPT-2's wte; it warns then that nothing is tied), a weight more than the two modules
    share (an encoder-decoder's shared, encoder and decoder embeddings: get_peft_model fails), a peft without it, and a
    head that holds LoRA layers (keep_head=False): peft would wrap that LoRA layer as a module to save, and fail."""
    peft = require_peft()
    if "ensure_weight_tying" not in {f.name for f in dataclasses.fields(peft.LoraConfig)}:
        return {}
    from peft.utils.constants import EMBEDDING_LAYER_NAMES

    try:
        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):  # not a transformers model: nothing it ties
        return {}
    if embedding is None or head is None or head.weight is not embedding.weight:
        return {}
    sharing = [n for n, m in model.named_modules() if getattr(m, "weight", None) is embedding.weight]
    name = next((n for n, m in model.named_modules() if m is embedding), "")
    known = name.rpartition(".")[2] in EMBEDDING_LAYER_NAMES
    saved = all(n in extraction.modules_to_save for n in sharing)  # the embedding and the head both whole
    return {"ensure_weight_tying": True} if len(sharing) == 2 and known and saved else {}


def _head_hint(extraction: Extraction, tuned: nn.Module) -> str:
    """Where the output head is among the modules saved whole because keep_head left it out of the targets."""
    head = tuned.get_output_embeddings() if hasattr(tuned, "get_output_embeddings") else None
    name = next((n for n, m in tuned.named_modules() if m is head), None) if head is not None else None
    if not extraction.config.get("keep_head", True) or name not in extraction.modules_to_save:
        return ""
    return f" (the output head {name} is saved whole by default: --compress-head, keep_head=False, gives it LoRA)"


def save_adapter(
    extraction: Extraction,
    tuned: nn.Module,
    output: str | Path,
    base_name: str | None = None,
    *,
    tuned_name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``extraction`` as an adapter folder, whole or not at all, as every svdlora output
    (``svdlora.io.outputs``): peft's files, the card and ``svdlora_adapter.json``.

    Args:
        extraction: what ``extract_adapter`` returned.
        tuned: the fine-tuned model it came from (wrapped while saving, then unwrapped).
        output: the folder to create.
        base_name: recorded as ``base_model_name_or_path``.
        tuned_name: the tuned model's folder or hub id (default: its ``name_or_path``).
        overwrite: replace an earlier svdlora output (only once the new folder is complete).
    Returns:
        The output path.
    """
    require_peft()
    base_name, tuned_name = _model_reference(base_name), _name_of(tuned, tuned_name)
    with atomic_folder(output, overwrite, [base_name, tuned_name]) as tmp:  # never into, over or around a model
        _write_peft_files(extraction, tuned, tmp, base_name)
        _fix_base_name(tmp, base_name)
        record = extraction_record(extraction, base_name, tuned_name)
        (tmp / "svdlora_adapter.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        weights = tmp / ADAPTER_WEIGHTS
        readable_as_umask(weights)
        tuned_bytes = folder_bytes(tuned_name) if tuned_name and Path(tuned_name).is_dir() else None
        card.write(tmp, card.adapter_card(extraction, base_name, tuned_name, weights.stat().st_size, tuned_bytes))
    return Path(output)


def _write_peft_files(extraction: Extraction, tuned: nn.Module, output: Path, base_name: str | None) -> None:
    """peft's adapter files in ``output`` (a new, empty folder: ``save_adapter``'s temporary one)."""
    peft = require_peft()
    if not extraction.lora and not extraction.modules_to_save:
        raise SvdloraError("nothing to write: no LoRA module and no module to save")
    config = lora_config(extraction, tuned, base_name)
    if not extraction.lora:
        # peft needs a LoRA target; an empty-rank adapter is impossible, so say so.
        whole = list(extraction.modules_to_save)
        raise SvdloraError(
            f"no LoRA module to write: all {len(whole)} changed modules would be saved whole ({', '.join(whole[:3])}"
            f"{', …' if len(whole) > 3 else ''}): the fine-tune moved no targeted matrix, --include/--exclude "
            "target none of them, or --rank/--budget keeps each delta whole; lower the rank or fix the patterns"
            + _head_hint(extraction, tuned)
        )
    # peft freezes every parameter, and its unload puts copies where modules_to_save were (which unties
    # a tied embedding and head): both are undone after saving, so the caller's model is as it was.
    trainable = {id(p): p.requires_grad for p in tuned.parameters()}
    originals = {name: tuned.get_submodule(name) for name in extraction.modules_to_save}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft on transformers 5
        wrapped = peft.get_peft_model(tuned, config)
    try:
        inner = wrapped.base_model.model
        with torch.no_grad():
            for m in extraction.lora:
                layer = inner.get_submodule(m.name)
                lora_a, lora_b = layer.lora_A["default"], layer.lora_B["default"]
                if lora_a.weight.shape != m.lora_A.shape or lora_b.weight.shape != m.lora_B.shape:
                    raise SvdloraError(f"peft built {m.name!r} with another rank: update peft (rank_pattern)")
                lora_a.weight.copy_(m.lora_A)
                lora_b.weight.copy_(m.lora_B)
                if lora_b.bias is not None:
                    lora_b.bias.copy_(m.bias_delta if m.bias_delta is not None else torch.zeros_like(lora_b.bias))
                scaling = layer.scaling["default"]
                if scaling != 1:
                    raise SvdloraError(f"peft scales {m.name!r} by {scaling}, expected 1: update peft (alpha_pattern)")
        with warnings.catch_warnings():  # peft notes it records the tuned model's path: fixed after saving
            warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*")
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft on transformers 5
            # peft (0.21) takes lora_bias's 1-D lora_B.bias for an unsharded ZeRO-3 / FSDP tensor and warns
            # that the adapter is incomplete; these factors were never sharded, so that alarm is false here
            warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape.*")
            # peft's "auto" also saves the base weight of a LoRA layer it takes for an embedding (lm_head, with
            # keep_head=False) and loads it over the base's: the tuned head's, so the delta would count twice
            wrapped.save_pretrained(str(output), save_embedding_layers=False)
    finally:
        wrapped.unload()  # the LoRA layers' own base layers back in place
        for name, module in originals.items():
            tuned.set_submodule(name, module)
        for param in tuned.parameters():
            param.requires_grad_(trainable.get(id(param), param.requires_grad))


def _model_reference(name: str | None) -> str | None:
    """A model (base or tuned) as the adapter records it: a local folder by its absolute path (a relative one
    would be found only from the folder it was typed in); a hub id ('gpt2', 'org/name') as given."""
    if name is None:
        return None
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def _name_of(model: nn.Module, given: str | None) -> str | None:
    """``given``, else the model's ``name_or_path``, as the adapter records it (``_model_reference``)."""
    return _model_reference(given or getattr(getattr(model, "config", None), "name_or_path", None) or None)


def _fix_base_name(output: Path, base_name: str | None) -> None:
    # peft records the wrapped model's name_or_path (the *tuned* model); the adapter belongs to the base.
    path = output / ADAPTER_CONFIG
    data = json.loads(path.read_text())
    data["base_model_name_or_path"] = base_name
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def extraction_record(extraction: Extraction, base_name: str | None, tuned_name: str | None) -> dict:
    """``svdlora_adapter.json``: what ``adapter_config.json`` does not say (errors, stages, reasons)."""
    return {
        "svdlora_version": __version__,
        "base_model": base_name,
        "tuned_model": tuned_name,
        "method": extraction.method,
        "calibration": extraction.calibration,
        "config": extraction.config,
        "lora_params": extraction.lora_params,
        "delta_params": extraction.delta_params,
        "modules_to_save_params": extraction.modules_to_save_params,
        "seconds": extraction.seconds,
        "modules": [
            {
                "name": m.name,
                "kind": m.kind,
                "shape": list(m.shape),
                "ranks": m.ranks,
                "rel_error": m.rel_error,
                "weighted_error": m.weighted_error,
            }
            for m in extraction.lora
        ],
        "modules_to_save": extraction.modules_to_save,
        "left_out": extraction.left_out,
        "unchanged_targets": extraction.unchanged,
    }


def write_adapter(
    base: nn.Module,
    tuned: nn.Module,
    output: str | Path,
    config: CompressionConfig | None = None,
    *,
    method: str | None = None,
    calibration=None,
    processor=None,
    statistics=None,
    base_name: str | None = None,
    tuned_name: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **options,
) -> Extraction:
    """Extract the adapter and write the whole folder (atomically): peft files, card, svdlora record.

    Example:
        >>> write_adapter(base, tuned, "out/adapter", budget=0.1, base_name="HuggingFaceTB/SmolLM2-135M")
        >>> write_adapter(base, tuned, "out/adapter", budget=0.1, calibration="train.txt", processor=tok)
    """
    require_peft()
    base_name, tuned_name = _name_of(base, base_name), _name_of(tuned, tuned_name)
    check_output_folder(output, overwrite, [base_name, tuned_name])  # before the extraction
    extraction = extract_adapter(
        base,
        tuned,
        config,
        method=method,
        calibration=calibration,
        processor=processor,
        statistics=statistics,
        progress=progress,
        **options,
    )
    save_adapter(extraction, tuned, output, base_name, tuned_name=tuned_name, overwrite=overwrite)
    return extraction
