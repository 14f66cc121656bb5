"""argparse types whose error messages say what is wrong and what to pass instead."""

from __future__ import annotations

import argparse
import math

from ..choices import DEFAULT_MAX_SHARD_SIZE, DEFAULT_TEXT_COLUMN, DTYPE_ALIASES, DTYPE_ERROR, DTYPES


def budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"budget must be in (0, 1], got {value} (e.g. 0.5 keeps half the parameters)")
    return value


def int_at_least(name: str, low: int):
    """An argparse type for integers >= ``low``, its errors naming ``name``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{name} must be >= {low}, got {value}")
        return value

    parse.__name__ = name
    return parse


def dtype_name(text: str) -> str:
    """A --dtype value, refused by the parser (before torch loads); models.parse_dtype turns it into a dtype."""
    if text not in DTYPES and text not in DTYPE_ALIASES:
        raise argparse.ArgumentTypeError(DTYPE_ERROR.format(text))
    return text


def positive_int(name: str):
    return int_at_least(name, 1)


def non_negative_int(name: str):
    return int_at_least(name, 0)


def positive_float(name: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number > 0, got {text!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be a finite number > 0, got {text!r}")
        return value

    parse.__name__ = name
    return parse


def data_name(name: str):
    """An argparse type for a data flag's value: a blank one would be read as no data (compress --eval '' skipped
    the evaluation) or as the working directory (Path('')); refused as ``EvalOptions`` refuses its data."""

    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"{name} must name a file, folder or dataset, got {text!r}")
        return text

    parse.__name__ = name
    return parse


# How a datasets dataset given as evaluation data is read: the flags the evaluation's errors name, each setting
# the evaluation option argparse names it by (--text-column: text_column).
DATASET_FLAGS = {
    "--split": {"help": "dataset split (default: test when present)"},
    "--data-config": {"help": "dataset configuration name, e.g. wikitext-2-raw-v1"},
    "--text-column": {"help": f"text-generation column (default: {DEFAULT_TEXT_COLUMN})"},
    "--image-column": {"help": "image column (default: image or img)"},
    "--label-column": {"help": "label column (default: label or labels)"},
    "--source-column": {"help": "translation source column; translation.de reads a dict column"},
    "--target-column": {"help": "translation reference column, e.g. translation.en"},
}


def add_dataset_flags(parser: argparse.ArgumentParser, title: str = "dataset options") -> None:
    """``DATASET_FLAGS``, in a group of the help headed ``title``."""
    group = parser.add_argument_group(title)
    for flag, settings in DATASET_FLAGS.items():
        group.add_argument(flag, **settings)


def dataset_options(args: argparse.Namespace) -> dict:
    """The evaluation options ``add_dataset_flags`` set, as ``evaluate`` takes them."""
    return {_dest(flag): getattr(args, _dest(flag)) for flag in DATASET_FLAGS}


def given_dataset_flags(args: argparse.Namespace) -> list[str]:
    """The dataset flags given a value other than their default."""
    return [flag for flag, settings in DATASET_FLAGS.items() if getattr(args, _dest(flag)) != settings.get("default")]


def _dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")  # as argparse names it


# how targets.matches reads --include / --exclude (README's options table says the same)
MODULE_PATTERNS = "glob on the full name (*.mlp.*), a bare last name (q_proj), or re:REGEX"


def add_patterns_flag(parser: argparse.ArgumentParser, flag: str, help: str) -> None:
    """--include / --exclude: module name patterns after the flag; given again, the flag adds its patterns
    (argparse's nargs alone kept the last: --exclude q_proj --exclude k_proj factorized q_proj)."""
    default = [] if flag == "--exclude" else None  # no --include: every layer
    parser.add_argument(flag, nargs="+", action="extend", metavar="PATTERN", default=default, help=help)


def add_overwrite_flag(parser: argparse.ArgumentParser) -> None:
    """--overwrite as ``outputs`` applies it: only a folder svdlora wrote, or an empty one, is replaced."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output folder that svdlora wrote, or an empty one (any other is refused)",
    )


def add_max_shard_size_flag(parser: argparse.ArgumentParser) -> None:
    """--max-shard-size of the commands that write weights shard by shard (``writer.parse_size`` reads it)."""
    parser.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help=f"split the output weights into shards of at most this size, e.g. 5GB (default {DEFAULT_MAX_SHARD_SIZE}, "
        "as transformers)",
    )


def add_compress_head_flag(parser: argparse.ArgumentParser, help: str) -> None:
    """--compress-head: ``keep_head`` off (the output head and layers tied to embeddings are targets too)."""
    parser.add_argument("--compress-head", dest="keep_head", action="store_false", help=help)


def add_progress_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def add_pivot_flag(parser: argparse.ArgumentParser, stage_dtypes: bool = True) -> None:
    """--pivot / --no-pivot (default: None, read by ``pivot_option``); ``stage_dtypes``: the command has
    --stage-dtypes, which turns the default off."""
    default = "on, except with --stage-dtypes (factor pairs)" if stage_dtypes else "on"
    parser.add_argument(
        "--pivot",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="store each matrix as its R pivot rows plus the coefficients of the other rows (PIFA): "
        "R·(out+in−R) values and R int64 indices (the budget counts both) instead of R·(out+in), so the budget "
        "buys more rank (SmolLM2 at budget 0.5: "
        f"perplexity 2.25x dense instead of 2.60x, measured before the indices counted). Default: {default}; "
        "--no-pivot writes the factor pairs A_j, B_j of every stage",
    )


def pivot_option(args: argparse.Namespace) -> bool:
    """The CLI's default: pivoted factors, unless stage dtypes store factor pairs."""
    if args.pivot is not None:
        return args.pivot
    return not getattr(args, "stage_dtypes", None)
