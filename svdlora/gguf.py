"""Turn a GGUF checkpoint into a normal transformers folder that svdlora (and anyone) can load.

transformers reads GGUF (dequantizing to float) but refuses ``save_pretrained`` on such a
model, so the folder is written by hand: safetensors shards of ``max_shard_size`` (tied tensors
stored once; svdlora's shard writer), the config without its GGUF ``quantization_config``, and
the tokenizer.
"""

from __future__ import annotations

import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .bars import quiet_bars
from .choices import DEFAULT_MAX_SHARD_SIZE
from .errors import SvdloraError, first_line
from .io.outputs import atomic_folder, check_output_folder
from .io.writer import parse_size, write_tensors

GGUF_MAGIC = b"GGUF"  # every GGUF file's first four bytes


def gguf_to_folder(
    gguf_file: str | Path,
    output: str | Path,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
) -> Path:
    """Dequantize ``gguf_file`` to float32 and save it as a transformers folder at ``output``, its weights in
    shards of at most ``max_shard_size`` ("5GB", bytes) with a ``model.safetensors.index.json`` when several.

    Memory: one float32 copy of the model (transformers dequantizes it whole), written without a second one.
    ``progress``: show the dequantization bar and transformers' own load bars (transformers' switch for these is
    left as it was)."""
    from transformers import AutoModelForCausalLM

    gguf_file = Path(gguf_file).expanduser()  # as the output and every other command's paths
    if gguf_file.is_dir():
        raise SvdloraError(f"{str(gguf_file)!r} is a folder: pass the .gguf file itself")
    if not gguf_file.is_file():
        raise SvdloraError(f"GGUF file {str(gguf_file)!r} does not exist")
    _check_magic(gguf_file)
    try:
        import gguf  # noqa: F401  (transformers needs it to parse the file)
    except ImportError:
        raise SvdloraError("reading GGUF needs the `gguf` package: pip install gguf") from None
    check_output_folder(output, overwrite, inputs=[gguf_file])  # before the slow dequantization
    parse_size(max_shard_size)
    kwargs = {"gguf_file": gguf_file.name}
    try:
        with _alone(gguf_file) as folder, _load_bars(progress):
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **_unpacked(), **kwargs)
            tokenizer = _tokenizer(folder, gguf_file, kwargs)
    except struct.error as err:  # transformers' metadata reader unpacked past the end of the file
        raise SvdloraError(
            f"GGUF file {str(gguf_file)!r} ends inside its metadata ({first_line(err)}): the file is incomplete; "
            "download or copy it again"
        ) from None
    except (OSError, ValueError, KeyError, IndexError, TypeError, RuntimeError) as err:
        raise SvdloraError(
            f"GGUF file {str(gguf_file)!r} cannot be read ({type(err).__name__}: {first_line(err)}): "
            "check that it is a complete GGUF checkpoint of a model transformers supports"
        ) from None
    state = model.state_dict()
    packed = next((k for k, v in state.items() if not v.is_floating_point()), None)
    if packed is not None:  # a folder of GGUF blocks under the dense names would load as nonsense or not at all
        raise SvdloraError(
            f"GGUF file {str(gguf_file)!r}: transformers kept {packed} as {state[packed].dtype} blocks instead of "
            "float values: upgrade or downgrade transformers to one that dequantizes GGUF files"
        )
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # re-tied from the input embedding at load time
    with atomic_folder(output, overwrite=overwrite, inputs=[gguf_file]) as tmp:
        write_tensors(tmp, list(state.items()), {"format": "pt"}, max_shard_size, str(output))
        model.config.architectures = [type(model).__name__]  # GGUF configs lack it; loaders need it
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(output)


def _check_magic(gguf_file: Path) -> None:
    """Another file given as the GGUF, refused here: transformers' error names the link it reads in
    ``_alone``'s temporary folder, not the user's file."""
    with gguf_file.open("rb") as f:
        start = f.read(len(GGUF_MAGIC))
    if start != GGUF_MAGIC:
        found = f"it starts with {start!r}, not {GGUF_MAGIC!r}" if start else "it is empty"
        raise SvdloraError(f"{str(gguf_file)!r} is not a GGUF file ({found}): pass the .gguf checkpoint itself")


def _tokenizer(folder: Path, gguf_file: Path, kwargs: dict):
    """The GGUF's own tokenizer; the ``tokenizers`` library raises a bare Exception for a vocabulary it cannot
    build (a merge whose result is no token), a fault of the file, not of svdlora."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, **kwargs)
    except Exception as err:  # noqa: BLE001  (tokenizers' Rust errors are plain Exception)
        if type(err) is not Exception:
            raise  # a subclass: the caller's read errors, or a bug
        raise SvdloraError(
            f"GGUF file {str(gguf_file)!r}: its tokenizer cannot be built ({first_line(err)}): the file's vocabulary "
            "is damaged or not one transformers reads"
        ) from None


@contextmanager
def _alone(gguf_file: Path) -> Iterator[Path]:
    """A folder holding only ``gguf_file`` (a link to it), for transformers to read it from: given the
    file's own folder, it takes a tokenizer.json there over the GGUF's tokenizer, so another model's
    files next to it (the original checkpoint's) would be written with these weights."""
    with tempfile.TemporaryDirectory(prefix="svdlora-gguf-") as folder:
        (Path(folder) / gguf_file.name).symlink_to(gguf_file.resolve())
        yield Path(folder)


@contextmanager
def _load_bars(shown: bool) -> Iterator[None]:
    """Unless ``shown``, no bar during the load: transformers' own ("Loading weights") are off by
    ``bars.quiet_bars``; its GGUF reader draws with plain tqdm, which that switch does not reach: that module gets
    a disabled tqdm."""
    if shown:
        yield
        return
    from contextlib import nullcontext
    from functools import partial
    from unittest.mock import patch  # here: only a quiet conversion pays its import

    from transformers import modeling_gguf_pytorch_utils as reader

    quiet_reader = patch.object(reader, "tqdm", partial(reader.tqdm, disable=True)) if hasattr(reader, "tqdm") else None
    with quiet_bars(False), quiet_reader or nullcontext():
        yield


def _unpacked() -> dict:
    """``from_pretrained`` arguments that unpack every GGUF block into floats. transformers >= 5 keeps
    quantized weights packed (uint8 blocks in ``GgufLinear``) for some architectures wherever a GGUF
    matmul kernel is installed; older versions always dequantize and have no ``GgufConfig``."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}
