"""A hub id as a local folder, for the code that reads files itself (streamed compression, the
memory check): the snapshot of the files it reads, downloaded or, offline, from the local cache;
and, for the memory check, its size before the download."""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from .errors import StreamingRefusal, SvdloraError, first_line
from .io.checkpoint import CHECKPOINT_REMEDY
from .io.writer import INDEX_NAME, weight_files
from .models import PREPROCESSOR_FILES, hub_reachable, looks_like_path

# What a streamed run reads besides the weights, by exact top-level name (a pattern such as
# "*.json" would also match "onnx/config.json" or "original/params.json").
SIDE_FILES = ["config.json", INDEX_NAME, *PREPROCESSOR_FILES]


def local_checkpoint(
    name: str | Path, trust_remote_code: bool = False, revision: str | None = None, local_only: bool | None = None
) -> Path:
    """The local folder of ``name``: itself, or the snapshot of a hub model id at ``revision``
    (default: main), downloaded, or from the local Hugging Face cache (``local_only``; by default
    when the hub cannot be reached)."""
    folder, repo_id = _folder_or_hub_id(name)
    if folder is not None:
        return folder
    if repo_id is None:
        raise SvdloraError(f"model {str(name)!r} is not a folder: pass a model folder or a hub id")
    local_only = not hub_reachable() if local_only is None else local_only
    return _snapshot(repo_id, trust_remote_code, revision, local_only)


def cached_checkpoint(name: str | Path) -> Path | None:
    """The local folder of ``name`` without any download: itself, its snapshot in the local cache, or None."""
    try:
        return local_checkpoint(name, local_only=True)
    except SvdloraError:
        return None


def side_folder(name: str | Path, trust_remote_code: bool = False) -> Path | None:
    """The folder of ``name``'s side files (config, tokenizer, index): itself, or a hub id's snapshot at
    one commit (the hub's latest, or offline the cache's), downloaded or from the cache: the folder a
    streamed run reads, its weights added to it; None for another path and where neither serves them."""
    folder, repo_id = _folder_or_hub_id(name)
    if repo_id is None:
        return folder
    try:
        return _download(repo_id, _side_files(trust_remote_code), None, not hub_reachable())
    except SvdloraError:
        return None


def remote_parameters(name: str | Path, trust_remote_code: bool = False) -> tuple[Path, dict[str, int]] | None:
    """A hub model not in the local cache, sized before its weights are downloaded: (the folder of its
    side files: config, index, tokenizer; downloaded) and the element count of its safetensors tensors
    per dtype, from the hub's copies of their headers (``get_safetensors_metadata``: about 100 kB read
    per file). None where ``name`` is a path, the hub cannot be reached, or it has no safetensors there."""
    repo_id = _folder_or_hub_id(name)[1]
    if repo_id is None or not hub_reachable():
        return None
    from huggingface_hub import get_safetensors_metadata

    try:
        folder = _download(repo_id, _side_files(trust_remote_code), None, False)
        counts = get_safetensors_metadata(repo_id, revision=folder.name).parameter_count  # the same commit
    except Exception:  # noqa: BLE001  only an estimate: the run itself says what is wrong, if anything
        return None
    return folder, dict(counts)


def _folder_or_hub_id(name: str | Path) -> tuple[Path | None, str | None]:
    """(the local folder, None) where ``name`` is one; (None, the hub id) where it names no existing path and is
    not written as one (``models.looks_like_path``); (None, None) for another path: a file, or a missing folder."""
    path = Path(name).expanduser()
    if path.exists() or looks_like_path(str(name)):
        return (path if path.is_dir() else None), None
    return None, str(name)


def _side_files(trust_remote_code: bool) -> list[str]:
    return SIDE_FILES + (["*.py"] if trust_remote_code else [])


def _snapshot(repo_id: str, trust_remote_code: bool, revision: str | None, local_only: bool) -> Path:
    """The side files first, at one commit; then exactly the weight files its index names."""
    folder = _download(repo_id, _side_files(trust_remote_code), revision, local_only)
    weights = _weight_files(folder)
    folder = _download(repo_id, weights, folder.name, local_only)  # the same commit
    missing = [w for w in weights if not (folder / w).is_file()]
    if missing:
        where = "the local cache (the hub is unreachable)" if local_only else "the hub"
        raise StreamingRefusal(
            "model {repo_id!r} has no {file} in {where}: streaming reads safetensors only; {in_memory}"
            + ("" if not local_only else ", or download it while online"),
            repo_id=repo_id, file=missing[0], where=where,
        )  # fmt: skip
    return folder


def _weight_files(folder: Path) -> list[str]:
    """The safetensors files of a snapshot: those its index names, else the one model.safetensors; its index
    checked and refused as a local folder's is (``io.checkpoint``), before any weight is downloaded."""
    return [str(file.relative_to(folder)) for file in weight_files(folder, remedy=CHECKPOINT_REMEDY)]


def holds_weights(folder: Path) -> bool:
    """Whether a snapshot folder (``side_folder``'s) holds its safetensors files, all of them."""
    try:
        return all((folder / w).is_file() for w in _weight_files(folder))
    except SvdloraError:
        return False


@contextmanager
def one_download_each():
    """Within it, each set of a hub id's files is asked of the hub (or of the cache, offline) once: the steps of
    one run (compress's --eval check, memory check, load or streamed run) take the snapshot folder the first
    answer named, at its commit, rather than asking again (a round trip to the hub each). Outside it, every
    call asks (a library caller's next call may want the hub's newer commit)."""
    token = _DOWNLOADED.set({})
    try:
        yield
    finally:
        _DOWNLOADED.reset(token)


# (repo id, patterns, local only, revision) -> the snapshot folder, within ``one_download_each``
_DOWNLOADED: ContextVar[dict[tuple, Path] | None] = ContextVar("svdlora_hub_downloaded", default=None)


def _download(repo_id: str, patterns: list[str], revision: str | None, local_only: bool) -> Path:
    downloaded, asked = _DOWNLOADED.get(), (repo_id, tuple(patterns), local_only)
    if downloaded is not None and (*asked, revision) in downloaded:
        return downloaded[(*asked, revision)]
    folder = _snapshot_download(repo_id, patterns, revision, local_only)
    if downloaded is not None:  # the same answer when asked again at its commit (revision=folder.name)
        downloaded[(*asked, revision)] = downloaded[(*asked, folder.name)] = folder
    return folder


def _snapshot_download(repo_id: str, patterns: list[str], revision: str | None, local_only: bool) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=local_only))
    except Exception as err:  # noqa: BLE001  hub, cache and network errors alike: the download failed
        why = "the hub is unreachable and the model is not in the local cache" if local_only else first_line(err)
        raise SvdloraError(
            f"model {repo_id!r} is neither a local folder nor downloadable from the Hugging Face hub ({why}): "
            "pass a local folder, or check the id and your network (HF_HUB_OFFLINE must be unset)"
        ) from None
