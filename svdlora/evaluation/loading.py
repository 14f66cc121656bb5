"""Turn what the user passed (folder, hub id, module, module + processor) into a model to measure."""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SvdloraError, first_line
from ..layers import LowRankLinear
from ..models import default_device
from ..modes import restore, training_flags
from .measure import disk_bytes
from .options import DEFAULT_DTYPE, IMAGES, TASKS, TEXT, TRANSLATION, EvalOptions

logger = logging.getLogger(__name__)


@dataclass
class Candidate:
    """One model under evaluation, with what is reported about where it came from."""

    model: nn.Module
    processor: Any  # tokenizer (text tasks) or image processor
    name: str
    compressed: bool
    bytes_on_disk: int | None
    load_seconds: float | None  # None for a model passed in memory
    owned: bool  # loaded here, so freed here after its evaluation
    modes: dict[nn.Module, bool] = field(default_factory=dict)  # a model passed in: its modules' own modes

    def release(self) -> None:
        """Drop a model this module loaded, and give its memory back before the next one; give a model
        passed in its modes back (evaluated in eval mode, it went on in a training loop without dropout)."""
        restore(self.modes)
        if self.owned:
            self.model = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def load_processor(source: str, task: str):
    """The model's tokenizer, or for ``task`` image-classification its image processor, as transformers
    loads it. Without torchvision some releases (5.17) refuse ``AutoImageProcessor`` outright where
    newer ones fall back to the PIL backend; the class the folder names is then loaded directly, which
    falls back there too."""
    import transformers

    local = Path(source).expanduser()  # '~/model' (quoted, or from Python): the model's load expands it too
    source = str(local) if local.is_dir() else source
    if task != IMAGES:
        return transformers.AutoTokenizer.from_pretrained(source)
    try:
        return transformers.AutoImageProcessor.from_pretrained(source)
    except ImportError:
        from transformers.image_processing_utils import ImageProcessingMixin

        named = ImageProcessingMixin.get_image_processor_dict(source)[0].get("image_processor_type") or ""
        cls = getattr(transformers, named.removesuffix("Fast"), None)
        if cls is None:
            raise
        return cls.from_pretrained(source)


def checked_processor(source: str, task: str):
    """``load_processor``, refusing what would measure or calibrate on nothing: a tokenizer without
    a vocabulary, or a folder without processor files (one SvdloraError that says what to save)."""
    what = "image processor" if task == IMAGES else "tokenizer"
    try:
        processor = load_processor(source, task)
        if _no_vocabulary(processor):
            raise ValueError("no tokenizer files: its vocabulary holds only special tokens")
        return processor
    except (OSError, ValueError, KeyError, TypeError) as err:
        first = first_line(err)
        raise SvdloraError(
            f"cannot load the {what} of {source!r} ({first}): save it into the model folder "
            f"(e.g. tokenizer.save_pretrained(folder)); in Python, a model in memory can be passed as (model, {what})"
        ) from None


def _no_vocabulary(processor: Any) -> bool:
    """transformers >= 5 builds a tokenizer with an empty vocabulary (GPT-2: no token at all; BERT:
    every word [UNK]) from a folder without tokenizer files, where 4.x raised: perplexity then
    said 'the text is 0 token(s) long', and calibration or BERT's eval ran on unknown tokens."""
    if not hasattr(processor, "get_vocab"):
        return False
    return set(processor.get_vocab()) <= set(processor.all_special_tokens)


def same_vocabulary(a: Any, b: Any) -> bool:
    """Whether two tokenizers map text to the same ids (image processors: always)."""
    if not (hasattr(a, "get_vocab") and hasattr(b, "get_vocab")):
        return True
    return a.get_vocab() == b.get_vocab()


def prepare(spec: Any, opts: EvalOptions, processor: Any = None, flag: str = "MODEL") -> Candidate:
    """Load or adopt ``spec``: a path / hub id, an ``nn.Module``, or ``(nn.Module, processor)``.

    Loaded models go to ``opts.device`` (default: CUDA when present) in ``opts.dtype``
    (default float32). In-memory models are evaluated where they are, in their dtype, unless
    ``device`` / ``dtype`` is given, in which case they are moved in place. ``processor``: the one
    checked before the load (a local folder's, ``early_processor``), or None: loaded after it.
    """
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], nn.Module):
        spec, processor = spec
    if isinstance(spec, nn.Module):
        return _adopt(spec, opts, processor)
    if not isinstance(spec, str | Path):
        raise SvdloraError(
            f"{flag} must be a folder, a hub id, an nn.Module or (nn.Module, tokenizer/processor); "
            f"got {type(spec).__name__}"
        )
    from ..io.folder import is_compressed_folder
    from ..models import load_model

    name = str(spec)
    _preimport(name)
    start = time.perf_counter()
    model = load_model(
        name, device=default_device(opts.device), dtype=opts.dtype or DEFAULT_DTYPE, runtime=opts.runtime
    )
    load_seconds = time.perf_counter() - start
    check_task(model, opts.task, name)
    if processor is None:
        processor = checked_processor(name, opts.task)
    return Candidate(
        model=model.eval(),
        processor=processor,
        name=name,
        compressed=is_compressed_folder(name),
        bytes_on_disk=disk_bytes(name),
        load_seconds=load_seconds,
        owned=True,
    )


def preflight(spec: Any, opts: EvalOptions, flag: str = "--baseline") -> tuple[nn.Module | None, Any]:
    """Cheap checks of a model named by path or hub id, so a broken ``--baseline`` fails before
    the main evaluation rather than after it: files and headers readable, config and class fit
    the task, tokenizer / processor present. Missing tensors are found when it is loaded.

    Returns:
        (the model without weights (``skeleton``), or the in-memory module ``spec`` holds; the
        processor checked, for ``prepare`` to take rather than load again: None for a module).
    """
    if not isinstance(spec, str | Path):
        module = outline(spec)
        check_runtime(module, opts)
        return module, None

    name = str(spec)
    try:
        model = skeleton(name)
        check_task(model, opts.task, name)
        processor = checked_processor(name, opts.task)
    except SvdloraError as err:
        raise SvdloraError(f"{flag} {name!r}: {err}") from None
    return model, processor


def early_processor(source: str, task: str | None = None, model: nn.Module | None = None) -> tuple[str | None, Any]:
    """(task, processor) of a local model folder, from its config on the meta device and its processor
    files, before the model is loaded: a wrong task or a folder without tokenizer files is refused in a
    second, not after minutes of loading. ``(task, None)`` for a hub id, whose files come with the model
    (unless ``model`` is given: its processor is then fetched, or read from the cache), and for a folder
    whose config only its load can judge.

    Args:
        task: the task, where the caller knows it (None: the one the meta model fits, ``infer_task``).
        model: the folder's or hub id's ``skeleton``, built by the caller (``outline``); None where none
            could be built, which is not tried again: the checks are left to the load.
    """
    if model is None:
        return task, None
    task = task or infer_task(model)
    check_task(model, task, source)
    return task, checked_processor(source, task)


def local_folder(spec: Any) -> bool:
    """Whether ``spec`` names a local folder (rather than a hub id or an in-memory model)."""
    return isinstance(spec, str | Path) and Path(spec).expanduser().is_dir()


def local_outline(source: str, trust_remote_code: bool = False) -> nn.Module | None:
    """The ``skeleton`` of a local folder, built once for the checks before its load; None for a hub id
    (its files come with the model) and for a config only its load can judge."""
    return outline(source, trust_remote_code) if local_folder(source) else None


def outline(spec: Any, trust_remote_code: bool = False, required: bool = False) -> nn.Module | None:
    """The module ``spec`` holds, or for a path / hub id its ``skeleton`` (no weights); None where
    neither is there (its load says what is wrong). ``required``: the task cannot be told without it,
    so a path's or hub id's failure to build it is raised (as ``infer_task`` raises it), not None."""
    if isinstance(spec, tuple) and spec and isinstance(spec[0], nn.Module):
        return spec[0]
    if isinstance(spec, nn.Module):
        return spec
    if not isinstance(spec, str | Path):
        return None
    if required:
        return _model_skeleton(str(spec), trust_remote_code)
    try:
        return skeleton(str(spec), trust_remote_code)
    except Exception:  # noqa: BLE001  only an early check: the model's load says what is wrong, if anything
        return None


def skeleton(name: str, trust_remote_code: bool = False) -> nn.Module:
    """The model a folder (svdlora or dense) or hub id holds, built on the meta device (no weights);
    ``trust_remote_code`` as its load gets it (left unset, transformers asks on the terminal)."""
    from ..io.folder import check_folder, is_compressed_folder
    from ..io.load import _build_skeleton

    path = Path(name).expanduser()
    if is_compressed_folder(path):
        return _build_skeleton(path, check_folder(path).get("base_model", {}))
    return _dense_skeleton(name, trust_remote_code)


def infer_task(spec: Any, model: nn.Module | None = None) -> str:
    """The task a model fits (``fitting_task``), for a folder, a hub id, an nn.Module or (module, processor);
    ``model``: a folder's or hub id's ``skeleton`` already built."""
    if isinstance(spec, str | Path):
        name = str(spec)
        model = model if model is not None else _model_skeleton(name)
    else:
        model = spec[0] if isinstance(spec, tuple) else spec
        name = type(model).__name__
    task = fitting_task(model)
    # a transformers model none of the tasks runs: no --task would help
    if task is None and getattr(model, "config", None) is not None:
        raise SvdloraError(
            f"{name!r} is a {type(model).__name__}, and svdlora eval measures causal LMs (text-generation), image "
            "classifiers (image-classification) and translators from text (translation)"
        )
    if task is None:
        raise SvdloraError(f"cannot tell which task {name!r} is for: pass --task ({', '.join(TASKS)})")
    return task


def _model_skeleton(name: str, trust_remote_code: bool = False) -> nn.Module:
    """``skeleton``, its refusal naming MODEL."""
    try:
        return skeleton(name, trust_remote_code)
    except SvdloraError as err:
        raise SvdloraError(f"MODEL {name!r}: {err}") from None


def _dense_skeleton(name: str, trust_remote_code: bool = False) -> nn.Module:
    from accelerate import init_empty_weights

    from ..models import build_model, check_model_path, hub_reachable, model_class, not_on_the_hub, read_hf_config

    folder = check_model_path(name)  # the local folder (its '~' expanded), or None for a hub id
    source = str(folder) if folder is not None else name
    local = folder is None and not hub_reachable()
    config = read_hf_config(
        source,
        lambda why: f"cannot read its config ({why})",
        not_on_the_hub(name, local, subject="it") if folder is None else None,
        local_files_only=local,
        trust_remote_code=trust_remote_code,
    )
    cls = model_class(config)
    try:
        with init_empty_weights():
            return build_model(cls, config, trust_remote_code)
    except ValueError as err:  # transformers' refusal of a config: heads that do not divide the width, a class
        # AutoModel has no model for; its load says the same (load_pretrained), but the task is told from this build
        raise SvdloraError(
            f"its config.json builds no {cls.__name__} ({first_line(err).rstrip('.')}): fix config.json, or save "
            "the model again with save_pretrained"
        ) from None


def _preimport(name: str) -> None:
    """Import the model's transformers class before the load is timed.

    transformers imports model code lazily, on first use: without this, whichever model is
    loaded first pays seconds of imports and its load_time_s is not comparable.
    """
    try:
        from transformers import AutoConfig

        from ..models import model_class

        model_class(AutoConfig.from_pretrained(name))
    except Exception:  # noqa: BLE001 - load_model reports real problems with a proper message
        pass


def _is_compressed(model: nn.Module) -> bool:
    return any(isinstance(m, LowRankLinear) for m in model.modules())


def check_runtime(model: nn.Module | None, opts: EvalOptions) -> None:
    """``opts.runtime`` refused for a compressed model in memory: it lays out folders as they load, so that
    model would run as it is, its figures labelled with the runtime (before either model runs)."""
    if model is not None and opts.runtime is not None and _is_compressed(model):
        raise SvdloraError(
            f"runtime={opts.runtime!r} lays out svdlora folders as they load, and the compressed "
            f"{type(model).__name__} is in memory: drop runtime=, or evaluate the folder it was saved to"
        )


def _adopt(model: nn.Module, opts: EvalOptions, processor: Any) -> Candidate:
    check_runtime(model, opts)
    if opts.device is not None or opts.dtype is not None:
        model.to(device=default_device(opts.device) if opts.device else None, dtype=opts.dtype)
    config = getattr(model, "config", None)
    source = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    name = source or type(model).__name__
    check_task(model, opts.task, name)
    if processor is None:
        if not source or not Path(source).is_dir():
            what = "image processor" if opts.task == IMAGES else "tokenizer"
            raise SvdloraError(
                f"the in-memory {type(model).__name__} needs its {what}: pass processor=<{what}> "
                f"or (model, {what}) to evaluate()"
            )
        processor = checked_processor(source, opts.task)
    modes = training_flags(model)
    return Candidate(
        model=model.eval(),
        processor=processor,
        name=f"{name} (in memory)",
        compressed=_is_compressed(model),
        bytes_on_disk=None,
        load_seconds=None,
        owned=False,
        modes=modes,
    )


def fitting_task(model: nn.Module) -> str | None:
    """The task a transformers model can run (text-generation, image-classification, translation), or None."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    inputs = getattr(model, "main_input_name", "input_ids")
    can_generate = bool(getattr(model, "can_generate", lambda: False)())
    if inputs == "pixel_values":
        return IMAGES if "ImageClassification" in type(model).__name__ else None
    if getattr(config, "is_encoder_decoder", False):  # from text: not Whisper's audio features
        return TRANSLATION if can_generate and inputs == "input_ids" else None
    return TEXT if inputs == "input_ids" and can_generate else None


def check_task(model: nn.Module, task: str, name: str) -> None:
    """An error when ``task`` cannot run on ``model``, saying which task fits it instead."""
    if getattr(model, "config", None) is None:  # a plain nn.Module: nothing to check against, trust the caller
        return
    fits = fitting_task(model)
    if fits == task:
        return
    cls = type(model).__name__
    instead = f"; use --task {fits}" if fits else ""
    needs = {
        TEXT: "a causal language model (e.g. GPT2LMHeadModel, LlamaForCausalLM)",
        IMAGES: "an image classifier (e.g. ViTForImageClassification)",
        TRANSLATION: "an encoder-decoder model that generates (e.g. MarianMTModel)",
    }[task]
    raise SvdloraError(f"--task {task} needs {needs}, but {name!r} is a {cls}{instead}")
