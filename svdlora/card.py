"""The README.md model card written into every output folder (compressed model, adapter, dense export).

It records what a reader needs to reproduce or trust the folder: the base model, the exact
command, the svdlora version, the settings, parameters and bytes before and after, and the
evaluation figures when there are some. The machine-readable record stays in the JSON files
beside it (``svdlora_config.json``, ``adapter_config.json`` + ``svdlora_adapter.json``).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from .io.outputs import write_file_atomic
from .report import budget_text
from .version import __version__

CARD_NAME = "README.md"

# Set by the CLI's main() to the argv it parses, so cards written under it show `svdlora ...`.
_cli_argv: list[str] | None = None


def set_cli_argv(argv: list[str]) -> None:
    global _cli_argv
    _cli_argv = list(argv)


def current_command(world_size: int = 1) -> str:
    """The exact command: `svdlora <args>` under the CLI, else the Python process's own argv. A run of
    ``world_size`` processes (svdlora_config.json records it) is shown under torchrun: the argv alone would
    run one process, not the launcher's (whose other flags, a rendezvous across nodes, are not known here)."""
    if world_size <= 1:
        if _cli_argv is not None:
            return shlex.join(["svdlora", *_cli_argv])
        return shlex.join(["python", *sys.argv]) + "  # Python API"
    # -m svdlora: torchrun runs the module, as `python -m svdlora` does; `$(which svdlora)` fails where it is a shell
    # shim (pyenv: README, Several processes). accelerate's --multi_gpu: without it, accelerate launch starts one
    # process where there is at most one GPU
    program = "-m svdlora " + shlex.join(_cli_argv) if _cli_argv is not None else shlex.join(sys.argv)
    return (
        f"torchrun --nproc_per_node {world_size} {program}  # {world_size} processes in all (or accelerate "
        f"launch --multi_gpu --num_processes {world_size}; over several nodes: --nnodes and its rendezvous flags)"
    )


def _size(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _eval_rows(result: dict | None) -> list[str]:
    if not result:
        return []
    from .evaluation.report import measured_on  # torch is loaded where a model was evaluated

    lines = [
        "",
        "## Evaluation",
        "",
        f"Task `{result.get('task')}` on {measured_on(result, quote='`')}.",
        "",
    ]
    lines += [
        "| | " + " | ".join(sorted(result["model"]["metrics"])) + " |",
        "|---" * (1 + len(result["model"]["metrics"])) + "|",
    ]
    for role in ("model", "baseline"):
        entry = result.get(role)
        if entry:
            values = [entry["metrics"][k] for k in sorted(result["model"]["metrics"])]
            cells = [f"{v:.4g}" if isinstance(v, float) else _cell(v) for v in values]
            lines.append(f"| {role} ({_cell(entry.get('name'))}) | " + " | ".join(cells) + " |")
    return lines


def _cell(value) -> str:
    """A table cell's text: a '|' in it (sacrebleu's signatures: 'nrefs:1|case:mixed|...') would split the cell."""
    return str(value).replace("|", "\\|")


def render(
    title: str,
    base_model: str | None,
    rows: list[tuple[str, str]],
    *,
    tags: list[str],
    library: str,
    eval_result: dict | None = None,
    notes: list[str] | None = None,
    usage: str | None = None,
    world_size: int = 1,
    hub_base: bool | None = None,
) -> str:
    """The card's text: YAML front matter for the Hub, then the settings table, eval and usage;
    ``world_size``: the processes the run was launched as (``current_command``); ``hub_base``: whether
    ``base_model`` is a hub id (None: ``_is_hub_id`` judges it here)."""
    front = ["---", f"library_name: {library}", f"tags: [{', '.join(tags)}]"]
    if hub_base is None:
        hub_base = bool(base_model) and _is_hub_id(str(base_model))
    if base_model and hub_base:
        front.append(f"base_model: {_yaml_value(str(base_model))}")
    front.append("---")
    body = [
        f"# {title}",
        "",
        f"Made with svdlora {__version__} from `{base_model}`." if base_model else f"Made with svdlora {__version__}.",
        "",
        "Command:",
        "",
        "```bash",
        current_command(world_size),
        "```",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
    ]
    body += _eval_rows(eval_result)
    if notes:
        body += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    if usage:
        body += ["", "## Use", "", "```python", usage.strip(), "```"]
    return "\n".join(front + body) + "\n"


def _is_hub_id(name: str) -> bool:
    """Whether ``name`` may be the front matter's base_model, which the Hub takes as a model id: it refuses
    to upload a folder whose card names a local folder there (400, '"base_model" ... is not valid. Use a
    model id'); the card's text still names the folder."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(name).expanduser().exists():  # 'gpt2' can be a local folder too
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _yaml_value(text: str) -> str:
    """``text`` (the front matter's base_model, a hub id: ``_is_hub_id``) as a YAML string: plain where it
    reads back as itself ('gpt2', 'org/name'), else double-quoted (JSON's escapes are YAML's): a valid id
    such as 'true', 'null' or '1.0' would read back as a bool, None or number."""
    import yaml  # a dependency of transformers and huggingface_hub

    try:
        plain = yaml.safe_load(f"value: {text}") == {"value": text}
    except yaml.YAMLError:
        plain = False
    return text if plain else json.dumps(text)


def _model_cell(name: str | None) -> str:
    """A model's table cell: a model given through the Python API may have no name (rather than `None`)."""
    return f"`{name}`" if name else "unknown"


def write(folder: Path, text: str) -> Path:
    """README.md in ``folder``, through a temporary file: a rewrite in a finished folder (after --eval)
    killed midway leaves the old card, not half of one."""
    path = Path(folder) / CARD_NAME
    write_file_atomic(path, text)
    return path


def compressed_card(
    report,
    base_model: str | None,
    eval_result: dict | None = None,
    class_name: str | None = None,
    world_size: int = 1,
) -> str:
    """The card of a folder written by ``save_compressed``; ``class_name``: the model's transformers class;
    ``world_size``: the processes that wrote it (torchrun)."""
    fac = report.factorized
    before, after = sum(m.params_before for m in fac), sum(m.params_after for m in fac)
    config = report.config
    rows = [
        ("tool", f"svdlora {__version__}"),
        ("base model", _model_cell(base_model)),
        ("method", _method_text(report)),
        ("calibration", _calibration_source(report)),
        ("budget", budget_text(config)),
        ("factorized matrices", f"{len(fac)} of {len(report.modules)} Linear/Conv1D layers"),
        ("factorized params before / after", f"{before:,} / {after:,}"),
        ("model params before / after", f"{report.model_params_before:,} / {report.model_params_after:,}"),
        ("weight bytes before / after", f"{_size(report.bytes_before)} / {_size(report.bytes_after)}"),
    ]
    auto = class_name if class_name and _is_transformers_class(class_name) else None
    usage = f"""import svdlora  # registers the loader with transformers
from transformers import {auto or "AutoModel  # or the AutoModelFor... class of the base"}
model = {auto or "AutoModel"}.from_pretrained("<this folder>")  # factors kept
model = svdlora.load_compressed("<this folder>", merge=True)  # or dense A·B"""
    if config.get("stage_dtypes"):  # format 2: plain from_pretrained refuses it (integrations.hf_quantizer)
        usage = """import svdlora  # stages in their own dtypes (--stage-dtypes): load_compressed only
model = svdlora.load_compressed("<this folder>")  # factors kept
model = svdlora.load_compressed("<this folder>", merge=True)  # or dense A·B"""
    return render(
        "svdlora compressed model", base_model, rows, tags=["svdlora", "compressed", "low-rank"],
        library="transformers", eval_result=eval_result, usage=usage, world_size=world_size,
    )  # fmt: skip


def _is_transformers_class(name: str) -> bool:
    import transformers

    try:
        return isinstance(getattr(transformers, name), type)
    except (AttributeError, ImportError):
        return False


def _method_text(report) -> str:
    """The resolved method of the run (issue 8): plain SVD, whitened, or Fisher-weighted."""
    config = report.config
    method = {"svd": "truncated SVD", "whiten": "whitened SVD (SVD-LLM)", "fisher": "Fisher-weighted whitened SVD",
              "kfac": "Kronecker-factored Fisher-whitened SVD"}  # fmt: skip
    text = f"residual {method.get(report.method or 'svd', report.method)} ({config.get('svd_method')} SVD)"
    count = config.get("submatrices")
    text += f", {count} submatri{'x' if count == 1 else 'ces'}, {report.allocation or 'uniform'} allocation"
    if report.heal:
        text += f", healed {report.heal.get('steps')} steps"
    return text


def _calibration_source(report) -> str:
    return (report.calibration or {}).get("source") or "none (plain SVD)"


def dense_export_card(source_folder: str, data: dict) -> str:
    """The card of ``svdlora export --dense``: the compressed folder's record, merged."""
    report = data.get("report", {})
    config = report.get("config", {})
    base = data.get("base_model", {}).get("name_or_path")
    rows = [
        ("tool", f"svdlora {__version__}"),
        ("exported from", f"`{source_folder}` (svdlora {data.get('svdlora_version')})"),
        ("base model", _model_cell(base)),
        ("budget / submatrices", f"{budget_text(config)} / {config.get('submatrices')}"),
        ("model params of the factorized form", f"{report.get('model_params_after', 0):,}"),
        ("format", "dense: every A·B merged back into a plain weight (no size saving on disk)"),
    ]  # fmt: skip
    return render(
        "svdlora dense export", base, rows, tags=["svdlora", "dense-export"], library="transformers",
        hub_base=_card_names_hub_base(Path(source_folder)),
    )  # fmt: skip


def _card_names_hub_base(folder: Path) -> bool:
    """Whether ``folder``'s own card named its base as a hub id: judged where compress ran, since a relative
    base folder ('models/gpt2', recorded as given) is not found from another directory and reads as an id."""
    import yaml

    text = (folder / CARD_NAME).read_text(encoding="utf-8") if (folder / CARD_NAME).is_file() else ""
    parts = text.split("---\n")
    try:
        front = yaml.safe_load(parts[1]) if text.startswith("---\n") and len(parts) > 2 else None
    except yaml.YAMLError:
        return False
    return isinstance(front, dict) and "base_model" in front


def adapter_card(
    extraction,
    base_model: str | None,
    tuned_model: str | None,
    adapter_bytes: int | None,
    tuned_bytes: int | None = None,
) -> str:
    """The card of ``svdlora extract``'s PEFT folder."""
    rows = [
        ("tool", f"svdlora {__version__}"),
        ("base model", _model_cell(base_model)),
        ("fine-tuned model", _model_cell(tuned_model)),
        *extraction.summary_rows(),
        ("weight bytes: fine-tuned model / adapter", f"{_size(tuned_bytes)} / {_size(adapter_bytes)}"),
    ]
    notes = [f"left out: `{name}` ({why})" for name, why in extraction.left_out.items()]
    base_ref = base_model or "<the base model>"  # a model given through the Python API may have no name
    usage = f"""from peft import PeftModel
from transformers import AutoModelForCausalLM  # or the AutoModelFor... class of the base
base = AutoModelForCausalLM.from_pretrained("{base_ref}")
model = PeftModel.from_pretrained(base, "<this folder>")"""
    return render(
        "LoRA adapter extracted with svdlora", base_model, rows, tags=["svdlora", "lora", "peft"],
        library="peft", notes=notes, usage=usage,
    )  # fmt: skip
