"""What the quantizer reads of an svdlora folder before transformers loads a tensor: whether a hub snapshot lacks
svdlora's config, the factor layouts and ties from the safetensors headers, and their names in the model."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from torch import nn

from ..errors import SvdloraError

STAGE_KEY = re.compile(r"^(?P<module>.+)\.stage(?P<stage>\d+)\.(?P<side>[AB])$")
PIVOT_KEY = re.compile(r"^(?P<module>.+)\.pivoted\.(?P<side>B|C|rows)$")  # svdlora.pivoted (format 3)


def check_hub_snapshot(folder: Path) -> None:
    """A hub id's snapshot in the Hugging Face cache (``models--ORG--NAME/snapshots/COMMIT``) holds the files
    from_pretrained downloaded: config.json and the weights, not svdlora_config.json, which the checks read. With
    ``subfolder=``, ``folder`` lies below the snapshot."""
    from ..io.writer import CONFIG_NAME  # io imports this module

    snapshot = next((path for path in (folder, *folder.parents) if path.parent.name == "snapshots"), None)
    repo = snapshot.parent.parent.name if snapshot is not None else ""
    if repo.startswith("models--") and not (folder / CONFIG_NAME).is_file():
        repo_id = repo.removeprefix("models--").replace("--", "/")
        raise SvdloraError(
            f"{repo_id!r} from the hub: from_pretrained downloads its weights and config.json but not {CONFIG_NAME}, "
            f"which svdlora reads; download the whole repository first (huggingface_hub.snapshot_download("
            f"{repo_id!r}), or `hf download {repo_id}`), then load it again"
        )


def factor_layouts(shapes: dict[str, list[int]]) -> dict[str, tuple[list[int], bool]]:
    """{module name in the file: (stage ranks, pivoted)}, from the safetensors headers' {tensor: shape} (no
    tensor is read). A pivoted module stores its stages summed: one rank, the pivot rows' count."""
    ranks: dict[str, dict[int, int]] = defaultdict(dict)
    pivoted: dict[str, int] = {}
    for key, shape in shapes.items():
        match = STAGE_KEY.match(key)
        if match and match["side"] == "A":
            ranks[match["module"]][int(match["stage"])] = shape[1]
        match = PIVOT_KEY.match(key)
        if match and match["side"] == "B":
            pivoted[match["module"]] = shape[0]
    layouts = {name: ([stages[j] for j in sorted(stages)], False) for name, stages in ranks.items()}
    return layouts | {name: ([rank], True) for name, rank in pivoted.items()}


def stores_factors(keys) -> bool:
    """Whether a shard with these tensors stores factors: the quantizer reads only such shards again."""
    return any(STAGE_KEY.match(key) or PIVOT_KEY.match(key) for key in keys)


def model_name(model: nn.Module, file_name: str, prefix: str, strict: bool = True) -> str | None:
    """The module's name in this model: a base model (AutoModel) lacks the head class's prefix.
    None where the model has no such module and ``strict`` is off."""
    candidates = [file_name]
    if prefix:
        candidates += [file_name.removeprefix(prefix + "."), f"{prefix}.{file_name}"]
    for name in candidates:
        try:
            model.get_submodule(name)
            return name
        except AttributeError:
            continue
    if not strict:
        return None
    raise ValueError(f"the svdlora folder factorizes {file_name!r}, which {type(model).__name__} does not have")


def untie_factorized(model: nn.Module, factorized: set[str]) -> None:
    """Drop from transformers' tie map (``all_tied_weights_keys``, transformers >= 5) every pair with a
    factorized side, which has no ``weight`` parameter to tie: T5's config ties lm_head to shared whatever
    tie_word_embeddings says. The file's own ties are applied after loading (``tie_as_stored``)."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        model.all_tied_weights_keys = {
            target: source
            for target, source in tied.items()
            if not {target.rpartition(".")[0], source.rpartition(".")[0]} & factorized
        }


def tied_names(model: nn.Module, metadata: dict[str, str], prefix: str) -> dict[str, str]:
    """The first shard's header ``metadata``'s {dropped tied name: stored name}, as this model names both
    parameters (pairs it lacks left out); an unreadable map is left to load_compressed's checks."""
    try:
        tied = json.loads(metadata.get("tied", "{}"))
    except ValueError:
        return {}
    names = {}
    for alias, stored in tied.items() if isinstance(tied, dict) else ():
        pair = []
        for name in (alias, stored):
            module, _, leaf = str(name).rpartition(".")
            found = model_name(model, module, prefix, strict=False) if module else None
            if found is None or not isinstance(getattr(model.get_submodule(found), leaf, None), nn.Parameter):
                break
            pair.append(f"{found}.{leaf}")
        if len(pair) == 2:
            names[pair[0]] = pair[1]
    return names
