"""A hub id as a local folder, for the code that reads files itself (streamed compression, the
memory check): the snapshot of the files it reads, downloaded or, offline, from the local cache."""

from __future__ import annotations

from pathlib import Path

from .errors import SvdloraError, first_line
from .models import _looks_like_path, hub_reachable

# What a streamed run reads: config and index (json), weights, tokenizer files; the model's own
# code only with trust_remote_code. Never the .bin / .pth / .h5 / .msgpack copies of the weights.
SNAPSHOT_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]


def local_checkpoint(name: str | Path, trust_remote_code: bool = False) -> Path:
    """The local folder of ``name``: itself, or the snapshot of a hub model id (downloaded, or from
    the local Hugging Face cache when the hub cannot be reached)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists() or _looks_like_path(str(name)):
        raise SvdloraError(f"model {str(name)!r} is not a folder: pass a model folder or a hub id")
    return _snapshot(str(name), trust_remote_code, local_only=not hub_reachable())


def cached_checkpoint(name: str | Path) -> Path | None:
    """The local folder of ``name`` without any download: itself, its snapshot in the local cache, or None."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists() or _looks_like_path(str(name)):
        return None
    try:
        return _snapshot(str(name), False, local_only=True)
    except SvdloraError:
        return None


def _snapshot(repo_id: str, trust_remote_code: bool, local_only: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    patterns = SNAPSHOT_FILES + (["*.py"] if trust_remote_code else [])
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local_only))
    except (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OSError, ValueError) as err:
        why = "the hub is unreachable and the model is not in the local cache" if local_only else first_line(err)
        raise SvdloraError(
            f"model {repo_id!r} is neither a local folder nor downloadable from the Hugging Face hub ({why}): "
            "pass a local folder, or check the id and your network (HF_HUB_OFFLINE must be unset)"
        ) from None
    if not any(folder.glob("*.safetensors")):
        raise SvdloraError(
            f"model {repo_id!r} has no safetensors weights on the hub: streaming reads safetensors only; "
            "compress without --stream"
        )
    return folder
