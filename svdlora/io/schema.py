"""Checks that a compressed folder is what it claims, before any tensor is trusted.

``svdlora_config.json`` is validated field by field (types, ranks >= 1, one entry per layer),
the factor shapes in the safetensors header are checked against the ranks and layer shapes,
and ``base_model.class`` may only name a transformers model class: a hand-edited file can
make loading fail, never build something else or a model with the wrong weights.
"""

from __future__ import annotations

import numbers
from pathlib import Path

from ..errors import SvdloraError
from ..quantize import parse_format, stored_shapes

KINDS = ("linear", "conv1d")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_num(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def validate_config(data, where: Path) -> None:
    """Raise SvdloraError naming the first field of ``svdlora_config.json`` that is wrong."""

    def bad(field: str, value, want: str):
        return SvdloraError(
            f"{str(where)!r}: field {field} is {value!r}, expected {want}: the file was edited or corrupted; "
            "re-run `svdlora compress`"
        )

    if not isinstance(data, dict):
        raise bad("(top level)", type(data).__name__, "an object")
    base = data.get("base_model", {})
    if not isinstance(base, dict):
        raise bad("base_model", base, "an object")
    for key in ("name_or_path", "class", "model_type"):
        if base.get(key) is not None and not isinstance(base.get(key), str):
            raise bad(f"base_model.{key}", base.get(key), "a string or null")
    if data.get("dtype") is not None and not isinstance(data["dtype"], str):  # the loader's dtype (null: as stored)
        raise bad("dtype", data["dtype"], "a dtype name or null")
    if "world_size" in data and (not _is_int(data["world_size"]) or data["world_size"] < 1):
        raise bad("world_size", data["world_size"], "an integer >= 1")
    report = data.get("report")
    if not isinstance(report, dict):
        raise bad("report", report, "an object")
    if not isinstance(report.get("config"), dict):
        raise bad("report.config", report.get("config"), "an object")
    for key in ("model_params_before", "model_params_after"):
        if not _is_int(report.get(key)) or report[key] < 0:
            raise bad(f"report.{key}", report.get(key), "an integer >= 0")
    for key in ("bytes_before", "bytes_after"):
        if report.get(key) is not None and (not _is_int(report[key]) or report[key] < 0):
            raise bad(f"report.{key}", report.get(key), "an integer >= 0 or null")
    if not _is_num(report.get("seconds", 0.0)):
        raise bad("report.seconds", report.get("seconds"), "a number")
    for key in ("calibration", "heal"):
        if report.get(key) is not None and not isinstance(report[key], dict):
            raise bad(f"report.{key}", report.get(key), "an object or null")
    _validate_run_records(report, bad)
    for key in ("method", "allocation"):
        if report.get(key) is not None and not isinstance(report[key], str):
            raise bad(f"report.{key}", report.get(key), "a string or null")
    unknown = set(report) - {
        "config", "modules", "model_params_before", "model_params_after", "seconds", "bytes_before", "bytes_after",
        "calibration", "method", "allocation", "heal",
    }  # fmt: skip
    if unknown:
        raise bad("report", sorted(unknown), "no unknown keys")
    modules = report.get("modules")
    if not isinstance(modules, list):
        raise bad("report.modules", modules, "a list")
    names = set()
    for i, m in enumerate(modules):
        _validate_module(m, f"report.modules[{i}]", bad)
        if m["name"] in names:
            raise bad(f"report.modules[{i}].name", m["name"], "a layer listed once")
        names.add(m["name"])


def _validate_run_records(report: dict, bad) -> None:
    """The figures ``svdlora info`` formats as numbers from the calibration and healing records."""
    tokens = (report.get("calibration") or {}).get("tokens")
    if tokens is not None and (not _is_int(tokens) or tokens < 0):
        raise bad("report.calibration.tokens", tokens, "an integer >= 0 or null")
    heal = report.get("heal")
    for key in ("steps", "seconds", "first_loss", "last_loss") if heal is not None else ():
        if not _is_num(heal.get(key)):
            raise bad(f"report.heal.{key}", heal.get(key), "a number")


def _validate_module(m, at: str, bad) -> None:
    fields = {
        "name", "kind", "shape", "bias", "ranks", "stage_dtypes", "rel_error", "dense_reason", "est_loss",
        "svd_method", "exact_error", "stored_bytes", "dense_bytes", "pivoted",
    }  # fmt: skip
    if not isinstance(m, dict):
        raise bad(at, m, "an object")
    if set(m) - fields or not {"name", "kind", "shape", "bias"} <= set(m):
        raise bad(at, sorted(m), f"the keys {sorted(fields)}")
    if not isinstance(m["name"], str) or not m["name"]:
        raise bad(f"{at}.name", m["name"], "a layer name")
    if m["kind"] not in KINDS:
        raise bad(f"{at}.kind", m["kind"], f"one of {KINDS}")
    shape = m["shape"]
    if not isinstance(shape, list) or len(shape) != 2 or not all(_is_int(s) and s >= 1 for s in shape):
        raise bad(f"{at}.shape", shape, "[out_features, in_features], integers >= 1")
    if not isinstance(m["bias"], bool):
        raise bad(f"{at}.bias", m["bias"], "true or false")
    ranks = m.get("ranks", [])
    dtypes = m.get("stage_dtypes", [])
    if not isinstance(dtypes, list) or not all(isinstance(d, str) for d in dtypes):
        raise bad(f"{at}.stage_dtypes", dtypes, "a list of dtype names")
    full = bool(dtypes) and dtypes[0].startswith("full-")  # issue 9: a full-rank first stage has rank 0
    if not isinstance(ranks, list) or not all(
        _is_int(r) and r >= (0 if full and j == 0 else 1) for j, r in enumerate(ranks)
    ):
        raise bad(f"{at}.ranks", ranks, "a list of integers >= 1 (0 only for a full-rank first stage)")
    if ranks and dtypes and len(dtypes) != len(ranks):
        raise bad(f"{at}.stage_dtypes", dtypes, f"one dtype per stage ({len(ranks)})")
    for key in ("stored_bytes", "dense_bytes"):
        if m.get(key) is not None and (not _is_int(m[key]) or m[key] < 0):
            raise bad(f"{at}.{key}", m[key], "an integer >= 0 or null")
    if m.get("rel_error") is not None and not _is_num(m["rel_error"]):
        raise bad(f"{at}.rel_error", m["rel_error"], "a number or null (not measured)")
    if m.get("est_loss") is not None and not _is_num(m["est_loss"]):
        raise bad(f"{at}.est_loss", m["est_loss"], "a number or null")
    if m.get("exact_error") is not None and not _is_num(m["exact_error"]):
        raise bad(f"{at}.exact_error", m["exact_error"], "a number or null")
    if m.get("svd_method") not in (None, "exact", "randomized"):
        raise bad(f"{at}.svd_method", m["svd_method"], "'exact', 'randomized' or null")
    if m.get("dense_reason") is not None and not isinstance(m["dense_reason"], str):
        raise bad(f"{at}.dense_reason", m["dense_reason"], "a string or null")
    # before pivoted's check, which a factorized layer whose ranks were removed would fail, naming pivoted
    if not ranks and m.get("dense_reason") is None:
        raise bad(f"{at}.ranks", m.get("ranks"), "ranks, or a dense_reason for a layer kept dense")
    if not isinstance(m.get("pivoted", False), bool):
        raise bad(f"{at}.pivoted", m["pivoted"], "true or false")
    if m.get("pivoted") and (dtypes and any(_stage_kind(d) != "float" for d in dtypes) or not ranks):
        raise bad(f"{at}.pivoted", m["pivoted"], "false for a dense layer or quantized stages")


def check_factor_shapes(modules, shapes: dict[str, list[int]], weights: Path) -> None:
    """Each stored stage must be (out, r_j) / (r_j, in) (a quantized one: its parts as ``quantize`` lays them
    out) and each bias (out,), as the config says."""
    stages_stored: dict[str, list[str]] = {}  # module name -> its "<name>.stage<j>." keys, read once
    for key in shapes:
        head, sep, tail = key.rpartition(".stage")
        if sep and tail.split(".", 1)[0].isdigit():
            stages_stored.setdefault(head, []).append(key)
    for m in modules:
        out_f, in_f = m.shape
        expected = {}
        if m.pivoted:  # svdlora.pivoted: pivot rows, coefficients, pivot indices
            total = sum(m.ranks)
            expected = {f"{m.name}.pivoted.B": [total, in_f], f"{m.name}.pivoted.C": [out_f - total, total]}
            expected[f"{m.name}.pivoted.rows"] = [total]
        for j, r in enumerate([] if m.pivoted else m.ranks):
            fmt = _stage_format(m, j, weights)  # an unknown name refused as such, not read as a float stage
            if not fmt.quantized:
                expected[f"{m.name}.stage{j}.A"] = [out_f, r]
                expected[f"{m.name}.stage{j}.B"] = [r, in_f]
                continue
            # quantized (issue 9): q / scales [/ zeros] per factor (A stored as Aᵀ), or of the whole matrix W
            stored = {"W": (out_f, in_f)} if fmt.full else {"A": (r, out_f), "B": (r, in_f)}
            for key, (rows, cols) in stored.items():
                parts = stored_shapes(fmt, rows, cols)
                expected.update({f"{m.name}.stage{j}.{key}.{p}": list(shape) for p, shape in parts.items()})
        if m.bias:
            expected[f"{m.name}.bias"] = [out_f]
        for key, shape in expected.items():
            if key not in shapes:
                raise SvdloraError(
                    f"{str(weights)!r} lacks tensor {key!r}: the file is incomplete or was edited; "
                    "re-run `svdlora compress`"
                )
            if list(shapes[key]) != shape:
                raise SvdloraError(
                    f"{str(weights)!r}: tensor {key!r} has shape {list(shapes[key])}, but svdlora_config.json "
                    f"says {shape}: the folder was edited or mixed with another; re-run `svdlora compress`"
                )
        stray = next((k for k in stages_stored.get(m.name, []) if k.startswith(f"{m.name}.stage{len(m.ranks)}.")), None)
        if stray is not None:
            raise SvdloraError(
                f"{str(weights)!r} holds {stray!r}, a stage svdlora_config.json does not list: "
                "the folder was edited; re-run `svdlora compress`"
            )


def _stage_format(m, j: int, weights: Path):
    """Stage ``j``'s format (float32 where the config lists none: folders from before stage dtypes), or the
    one-line refusal of a name svdlora does not write (e.g. int4g7, int9)."""
    name = m.stage_dtypes[j] if j < len(m.stage_dtypes) else "float32"
    try:
        return parse_format(name)
    except SvdloraError as err:
        raise SvdloraError(
            f"{str(weights)!r}: {m.name} stage {j} has stage dtype {name!r} ({err}): the folder was "
            "edited; re-run `svdlora compress`"
        ) from None


def _stage_kind(dtype: str) -> str:
    """'float', 'int8', 'int4', or with a 'full-' prefix (names as in svdlora.quantize)."""
    base = dtype.removeprefix("full-")
    kind = "int4" if base.startswith("int4") else "int8" if base == "int8" else "float"
    return f"full-{kind}" if dtype.startswith("full-") else kind


def model_class_named(name: str | None, where: Path):
    """The transformers model class ``name``, or None; anything else in transformers is refused."""
    if name is None:
        return None
    import transformers

    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise SvdloraError(
            f"{str(where)!r}: base_model.class {name!r} is not a transformers model class: "
            "the file was edited or corrupted; re-run `svdlora compress`"
        )
    return cls
