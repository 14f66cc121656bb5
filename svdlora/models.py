"""Loading dense models by hub id or folder, with errors a user can act on."""

from __future__ import annotations

import logging
import os
import pickle
import re
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import torch
import transformers
from safetensors import SafetensorError
from torch import nn

from .choices import DTYPE_ALIASES, DTYPE_ERROR, DTYPES
from .errors import SvdloraError, first_line
from .io.checkpoint import CHECKPOINT_REMEDY, read_header
from .io.writer import weight_files

try:  # transformers 5's configs are strict dataclasses: a field of the wrong type ('n_layer': "two") raises this
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # an older huggingface_hub, whose configs check their fields with ValueError
    StrictDataclassError = ValueError
# what AutoConfig.from_pretrained raises for a config.json it cannot read (OSError: none there, not JSON,
# unreadable, a hub id neither cached nor downloadable) or refuses (an unknown model_type, a wrong field)
_CONFIG_ERRORS = (OSError, ValueError, StrictDataclassError)


def read_hf_config(
    source: str | Path,
    refusal: Callable[[str], str] | None = None,
    missing: Callable[[str], str] | None = None,
    **kwargs,
) -> transformers.PretrainedConfig:
    """``AutoConfig.from_pretrained(source, **kwargs)``; a config it cannot read or refuses is one
    SvdloraError line: ``refusal(why)`` (by default 'cannot read the config of SOURCE: why'), or
    ``missing(why)`` for an OSError (no config.json there), where the caller says more of that."""
    try:
        return transformers.AutoConfig.from_pretrained(str(source), **kwargs)
    except _CONFIG_ERRORS as err:
        say = missing if missing is not None and isinstance(err, OSError) else refusal
        why = _config_refusal(err)
        raise SvdloraError(say(why) if say else f"cannot read the config of {str(source)!r}: {why}") from None


def _config_refusal(err: Exception) -> str:
    """A config's refusal in a line: a strict field's is two, the field's name and then what it holds."""
    return " ".join(str(err).split()) if isinstance(err, StrictDataclassError) else first_line(err)


logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")

# Files that make a folder usable on its own besides weights and config.json.
PREPROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "tokenizer.model",
    "source.spm",
    "target.spm",
    "sentencepiece.bpe.model",
    "preprocessor_config.json",
    "processor_config.json",
    "image_processor_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def folder_bytes(path: str | Path) -> int:
    """Bytes of the weight files a loader would read from a model folder.

    safetensors shards when present, else ``pytorch_model*.bin``, else any weight-like file;
    so a Trainer checkpoint's optimizer.pt or a second copy in another format is not counted.
    """
    files = [f for f in Path(path).iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES]
    for pattern in ("model*.safetensors", "pytorch_model*.bin"):
        chosen = [f for f in files if f.match(pattern)]
        if chosen:
            return sum(f.stat().st_size for f in chosen)
    return sum(f.stat().st_size for f in files)


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """'float16' / 'bf16' / torch.float32 / None -> a torch dtype (None keeps the stored one)."""
    if name is None:
        return None
    dtype = name if isinstance(name, torch.dtype) else getattr(torch, DTYPE_ALIASES.get(name, name), None)
    # a torch.dtype too: an integer one failed the load as 'the folder was edited', a float8 one the forward
    if dtype not in tuple(getattr(torch, n) for n in DTYPES):
        raise SvdloraError(DTYPE_ERROR.format(name))
    return dtype


def set_config_dtype(config, dtype: torch.dtype) -> None:
    """Record ``dtype`` on a transformers config and its sub-configs, as from_pretrained(dtype=...) does:
    config.json then says what the weights are (from_pretrained's default "auto" reads it back)."""
    config.dtype = dtype
    for key in getattr(config, "sub_configs", {}):
        if (sub := getattr(config, key, None)) is not None:
            sub.dtype = dtype


def keep_in_fp32(model: torch.nn.Module, dtype: torch.dtype | None) -> Callable[[str], bool]:
    """Which parameters ``from_pretrained(dtype=dtype)`` keeps in float32: the model's
    ``_keep_in_fp32_modules`` under float16, ``_keep_in_fp32_modules_strict`` under float16 and
    bfloat16, matched as transformers matches them (a glob searched in the parameter's name)."""
    names = set()
    if dtype == torch.float16:
        names.update(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        names.update(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if not names:
        return lambda name: False
    pattern = re.compile("|".join(sorted(n.replace("*", ".*") for n in names)))
    return lambda name: pattern.search(name) is not None


_WARNED_NO_ARCHITECTURE: set[tuple] = set()  # (folder, architectures) already warned about


def model_class(config: transformers.PretrainedConfig) -> type:
    """The transformers class named by ``config.architectures`` (AutoModel when it names none)."""
    for arch in config.architectures or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    key = (getattr(config, "name_or_path", ""), tuple(config.architectures or ()))
    if key not in _WARNED_NO_ARCHITECTURE:  # the checks before a load ask too: one warning per folder
        _WARNED_NO_ARCHITECTURE.add(key)
        logger.warning(
            "config.json names no known architecture (%s): loading with AutoModel, which has no task head",
            config.architectures,
        )
    return transformers.AutoModel


def build_model(cls: type, config: transformers.PretrainedConfig, trust_remote_code: bool = False) -> nn.Module:
    """``cls`` (``model_class(config)``) built from ``config``, under the caller's device context (meta):
    AutoModel, the class where the config names no known architecture, builds only through from_config."""
    if cls is transformers.AutoModel:
        return cls.from_config(config, trust_remote_code=trust_remote_code)
    return cls(config)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co (or HF_ENDPOINT) can be reached at all: a TCP connection to it, or to the
    proxy the environment names for it (HTTPS_PROXY, ALL_PROXY, unless NO_PROXY lists the host), opens.
    Without it, hub loads retry for ~30 s before failing."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    if not endpoint.hostname:
        return False
    address = (endpoint.hostname, _port(endpoint))
    proxies = urllib.request.getproxies()
    proxy = proxies.get(endpoint.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(endpoint.hostname):
        proxied = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        address = (proxied.hostname, _port(proxied))
    return _connects(address, timeout)


def _port(url) -> int:
    """A parsed URL's port, else its scheme's usual one (socks4, socks5, socks5h: 1080)."""
    return url.port or (1080 if url.scheme.startswith("socks") else {"https": 443}.get(url.scheme, 80))


_PROBES: dict[tuple, tuple[float, bool]] = {}  # address -> (when, answer)


def _connects(address: tuple[str, int], timeout: float, ttl: float = 60.0) -> bool:
    """Whether a TCP connection to ``address`` opens; asked again after ``ttl`` seconds, so that one
    command asks once and a long-lived process sees the network come and go."""
    asked = _PROBES.get(address)
    if asked is not None and time.monotonic() - asked[0] < ttl:
        return asked[1]
    try:
        with socket.create_connection(address, timeout=timeout):
            answer = True
    except OSError:
        answer = False
    _PROBES[address] = (time.monotonic(), answer)
    return answer


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def check_model_path(name: str) -> Path | None:
    """The checks a dense model's name gets before anything is read: an existing path must be a model
    folder (returned); a missing one is an error where it looks like a path (``looks_like_path``), else
    it may be a hub id (None). The message leaves the name to the caller, who knows the flag."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SvdloraError("is a file, not a model folder: pass the folder that holds config.json")
        check_dense_folder(path)
        return path
    if looks_like_path(name):
        raise SvdloraError("does not exist: check the path, or pass a hub id such as 'gpt2'")
    return None


def load_pretrained(
    name_or_path: str | Path, dtype: str | torch.dtype | None = None, trust_remote_code: bool = False
) -> nn.Module:
    """A dense transformers model from a local folder or a hub id.

    Raises:
        SvdloraError: the path is missing or not a model folder, or the hub id cannot be fetched.
    """
    name = str(name_or_path)
    torch_dtype = parse_dtype(dtype)
    try:
        folder = check_model_path(name)
    except SvdloraError as err:
        raise SvdloraError(f"model {name!r} {err}") from None
    source = str(folder) if folder is not None else name
    if folder is not None:  # a damaged index, refused as a streamed run refuses it, not transformers' TypeError
        weight_files(folder, remedy=CHECKPOINT_REMEDY)
    # Offline, only the local hub cache can serve a hub id; asking it directly fails fast.
    local_only = source is name and not hub_reachable()
    config = read_hf_config(
        source,
        lambda why: f"cannot read the config of {name!r}: {why}",
        not_on_the_hub(name, local_only) if source is name else None,
        trust_remote_code=trust_remote_code,
        local_files_only=local_only,
    )
    cls = model_class(config)
    try:
        # Mismatched shapes are reported below, naming the tensor, rather than as transformers' RuntimeError.
        model, info = cls.from_pretrained(
            source,
            dtype=torch_dtype or "auto",
            trust_remote_code=trust_remote_code,
            local_files_only=local_only,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
        )
    except pickle.UnpicklingError:
        raise SvdloraError(
            f"{name!r} holds a pickle checkpoint that torch refuses to load safely (it could run code): "
            "convert it to safetensors where you trust it, or use the original safetensors files"
        ) from None
    except (OSError, ValueError, RuntimeError, SafetensorError, EOFError, KeyError) as err:
        raise SvdloraError(f"cannot load the weights of {name!r} as {cls.__name__}: {_clean(err)}") from None
    check_loading_info(info, name, cls.__name__)
    return model


def not_on_the_hub(name: str, local_only: bool, subject: str | None = None) -> Callable[[str], str]:
    """The refusal of a hub id whose config.json cannot be fetched (``read_hf_config``'s ``missing``); ``subject``
    names it where a flag already does ("it")."""
    return lambda why: (
        f"{subject or f'model {name!r}'} is neither a local folder nor downloadable from the Hugging Face hub "
        f"({'hub unreachable and not in the local cache' if local_only else why}). Pass a local folder saved "
        "with save_pretrained, or check the id and your network (HF_HUB_OFFLINE must be unset)."
    )


def _clean(err: BaseException) -> str:
    """First line of a loading error, without advice to disable torch's safe unpickling."""
    text = first_line(err)
    if "weights_only" in text or "Unpickl" in text or isinstance(err.__cause__, pickle.UnpicklingError):
        return "a pickle checkpoint that torch refuses to load safely (it could run code); convert it to safetensors"
    return text


def check_loading_info(info: dict, name: str, cls_name: str) -> None:
    """Refuse a checkpoint that does not fill the model exactly: never random weights in a result."""
    for key, what in (("missing_keys", "lacks"), ("unexpected_keys", "holds tensors the model does not have:")):
        keys = sorted(info.get(key) or [])
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            raise SvdloraError(
                f"{name!r} {what} {keys[:3]}{more} for {cls_name}: the checkpoint is incomplete or belongs to "
                "another architecture; pass the complete folder written by save_pretrained"
            )
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        key, stored, wanted = mismatched[0]
        raise SvdloraError(
            f"{name!r}: tensor {key!r} has shape {list(stored)} but {cls_name} needs {list(wanted)}: "
            "config.json and the weights do not match"
        )


def check_dense_folder(path: Path, name: str | None = None) -> None:
    """Refuse svdlora folders and unfinished outputs before transformers fills gaps with random weights.
    The messages start with ``name`` (quoted); without it, with the verb, for a caller that names the
    folder its own way (``check_model_path``)."""
    from .io.outputs import SVDLORA_CONFIG, is_incomplete

    who = f"{name!r} " if name is not None else ""
    if is_incomplete(path):
        raise SvdloraError(
            f"{who}is the unfinished temporary folder of an interrupted svdlora run: pass a finished folder"
        )
    if (path / SVDLORA_CONFIG).is_file():
        raise SvdloraError(
            f"{who}is already compressed by svdlora: compress the original model, or load this folder "
            "with svdlora.load_compressed"
        )
    if not (path / "config.json").is_file():
        raise SvdloraError(f"{who}is not a model folder (no config.json): pass a folder written by save_pretrained")
    if not any(f.suffix in WEIGHT_SUFFIXES for f in path.iterdir()):
        raise SvdloraError(f"{who}has a config.json but no weight files: the folder is incomplete")
    for file in sorted(path.glob("*.safetensors")):
        try:
            _, metadata = read_header(file)  # not safe_open: it maps the whole file (ulimit -v)
        except (OSError, ValueError) as err:
            raise SvdloraError(
                f"{who}has a file {file.name!r} that is corrupted or truncated ({first_line(err)}): "
                "restore or re-download it"
            ) from None
        if "svdlora_format_version" in metadata:
            raise SvdloraError(
                f"{who}holds svdlora factors but no {SVDLORA_CONFIG}: the folder is incomplete; "
                "restore that file or re-run `svdlora compress`"
            )


def load_model(
    name_or_path: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    merge: bool = False,
    trust_remote_code: bool = False,
    runtime: str | None = None,
) -> nn.Module:
    """Any model svdlora can take: a compressed folder, a dense folder, or a hub id; in eval mode."""
    from .io.folder import is_compressed_folder  # io imports this module
    from .io.load import load_compressed

    if is_compressed_folder(name_or_path):
        return load_compressed(name_or_path, device=device, dtype=dtype, merge=merge, runtime=runtime)
    model = load_pretrained(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.to(default_device(device)).eval()


def default_device(device: str | int | torch.device | None) -> torch.device:
    """CUDA when available and nothing else is asked for; else the device asked for, if this machine has
    it (torch fails later with an AssertionError or a pinned-memory error, once the load has begun)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = f"cuda:{device}" if isinstance(device, int) else device  # an int: a GPU index (device maps)
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise SvdloraError(f"device must be like 'cpu', 'cuda' or 'cuda:0', got {device!r}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise SvdloraError(f"device {str(device)!r} asked for, but CUDA is not available here: pass --device cpu")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise SvdloraError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if resolved.type == "meta":
        raise SvdloraError("device 'meta' holds no values: pass 'cpu' or 'cuda'")
    return resolved
