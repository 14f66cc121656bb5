"""Where evaluation data comes from: plain local files and folders, or a ``datasets`` dataset.

Plain formats need nothing but the file system (they work offline). Anything else given as
``--data`` is opened with the ``datasets`` library: a folder written by ``save_to_disk``, a
``.json``/``.jsonl``/``.csv``/``.parquet`` file, a local folder ``load_dataset`` understands,
or a hub name (which needs network access unless it is cached).
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path
from typing import Any

from ..errors import SvdloraError, first_line

logger = logging.getLogger(__name__)

DATASET_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def dataset_builder(path: str | Path) -> str | None:
    """The ``datasets`` builder that reads a table file, gzipped or not (``x.jsonl``, ``x.jsonl.gz``: datasets
    decompresses it), or None for a plain text file (``x.txt``, ``x.txt.gz``). Judged by the last suffix alone,
    a gzipped JSON-lines file was read as text: the perplexity of its JSON syntax."""
    suffixes = [s.lower() for s in Path(path).suffixes[-2:]]
    if suffixes[-1:] == [".gz"]:
        suffixes.pop()
    return DATASET_FILE_BUILDERS.get(suffixes[-1]) if suffixes else None


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def looks_like_path(data: str | Path) -> bool:
    """True for things a user meant as a path (so a missing one is reported as missing)."""
    text = str(data)
    return (
        isinstance(data, Path)
        or text.startswith((".", "/", "~"))
        or text.count("/") > 1
        or "\\" in text
        or Path(text).suffix.lower() in (".txt", ".gz", *DATASET_FILE_BUILDERS)
    )


def check_exists(data: str | Path, flag: str = "--data") -> Path:
    """The path, or an error that names the flag and the value."""
    path = Path(data).expanduser()
    if not path.exists():
        raise SvdloraError(f"{flag} {str(data)!r} does not exist: check the path")
    return path


def is_dataset(data: Any) -> bool:
    """True when ``data`` is an in-memory ``datasets.Dataset`` / ``DatasetDict``."""
    try:
        import datasets
    except ImportError:
        return False
    return isinstance(data, datasets.Dataset | datasets.DatasetDict)


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return path.is_dir() and any((path / name).is_file() for name in ("state.json", "dataset_dict.json"))


def is_image_folder(path: Path) -> bool:
    """A folder of images, directly or in class subfolders, with no text or table files anywhere below
    it (those would make it a folder ``datasets`` reads as text or as a table, e.g. captions in
    metadata.csv, or a hub dataset's data/<split>/*.parquet beside an assets/ folder of pictures)."""
    if not path.is_dir() or is_saved_dataset(path):
        return False
    data_suffixes = (".txt", ".gz", *DATASET_FILE_BUILDERS)
    images = False
    try:
        for file in path.rglob("*"):  # datasets reads a folder's files at any depth
            suffix = file.suffix.lower()
            if suffix in data_suffixes:
                return False
            images = images or (suffix in IMAGE_SUFFIXES and len(file.relative_to(path).parts) <= 2)
    except OSError:  # unreadable: let the reader that opens it say so
        return False
    return images


def refuse_image_folder(data: Any, task: str, needs: str) -> None:
    """An error naming what ``--data`` is when a task that reads text is given an image folder.

    Without it ``datasets`` opens the folder as an image dataset and the error is about a missing
    text column, which does not say that the data is of the wrong kind."""
    if not is_dataset(data) and is_image_folder(Path(str(data)).expanduser()):
        raise SvdloraError(
            f"--data {str(data)!r} is an image folder, but {task} needs {needs}; "
            "image folders are data for --task image-classification"
        )


def refuse_model_folder(data: Any, flag: str = "--data") -> None:
    """An error naming what ``data`` is when it is a model folder (config.json, not a saved dataset)."""
    path = Path(str(data)).expanduser()
    if not is_dataset(data) and path.is_dir() and (path / "config.json").is_file() and not is_saved_dataset(path):
        where = "pass models as MODEL or --baseline, and --data" if flag == "--data" else "pass"
        raise SvdloraError(
            f"{flag} {str(data)!r} is a model folder (config.json), not data: {where} a text file, an image "
            "folder, a sentence file or a dataset"
        )


def dataset_options(opts: Any, columns: dict[str, Any]) -> dict[str, Any]:
    """The options only a dataset reads, {flag: value} (None where not given): --split, --data-config
    and the task's ``columns``."""
    return {"--split": opts.split, "--data-config": opts.data_config, **columns}


def refuse_dataset_options(data: Any, given: dict[str, Any], what: str) -> None:
    """Options only a dataset reads ({flag: value}, None where not given), given with plain data that
    would ignore them: refused rather than silently ignored."""
    named = [flag for flag, value in given.items() if value is not None]
    if named:
        raise SvdloraError(
            f"{' and '.join(named)} {'apply' if len(named) > 1 else 'applies'} to datasets, and --data "
            f"{str(data)!r} is {what}: drop {'them' if len(named) > 1 else 'it'}"
        )


def read_lines(path: str | Path, flag: str) -> list[str]:
    """Lines of a UTF-8 text file (gzipped when it ends in .gz), without line endings."""
    path = check_exists(path, flag)
    if path.is_dir():
        raise SvdloraError(f"{flag} {str(path)!r} is a folder: pass a text file with one sentence per line")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            lines = [line.rstrip("\r\n") for line in f]
    except (UnicodeDecodeError, OSError, EOFError) as err:
        raise SvdloraError(f"{flag} {str(path)!r} is not a readable UTF-8 text file ({err})") from None
    while lines and not lines[-1].strip():  # a trailing blank line is not a sentence
        lines.pop()
    if not lines:
        raise SvdloraError(f"{flag} {str(path)!r} is empty: it needs one sentence per line")
    return lines


def read_text(path: str | Path, flag: str = "--data") -> str:
    """Whole content of a UTF-8 text file (gzipped when it ends in .gz)."""
    path = check_exists(path, flag)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (UnicodeDecodeError, OSError, EOFError) as err:
        raise SvdloraError(f"{flag} {str(path)!r} is not a readable UTF-8 text file ({err})") from None
    if not text.strip():
        raise SvdloraError(f"{flag} {str(path)!r} is empty: pass a text file with the evaluation text")
    return text


def open_dataset(data: Any, split: str | None, config: str | None, flag: str = "--data"):
    """A single ``datasets.Dataset`` split from any of the accepted dataset forms (``flag``: the option
    that gave ``data``, named in the errors)."""
    return _open_split(data, split, config, flag)[0]


def _open_split(data: Any, split: str | None, config: str | None, flag: str) -> tuple[Any, str | None]:
    """``open_dataset``'s dataset and the name of the split it is (``split``, or the one chosen)."""
    if not is_dataset(data):  # a missing path or a model folder is said as such, with or without datasets
        if looks_like_path(data):
            check_exists(data, flag)
        refuse_model_folder(data, flag)  # else datasets reads the weights and says only "An error occurred ..."
    try:
        import datasets
    except ImportError:
        raise SvdloraError(f"{flag} {data!r} needs the `datasets` package: pip install datasets") from None
    split_read = False  # whether the loader itself took ``split`` (a hub dataset's)
    if is_dataset(data):
        loaded = data
    else:
        path = Path(str(data)).expanduser()
        try:
            if is_saved_dataset(path):
                loaded = datasets.load_from_disk(str(path))
            elif path.is_file() and (builder := dataset_builder(path)) is not None:
                loaded = datasets.load_dataset(builder, data_files=str(path))
            else:
                loaded, split_read = datasets.load_dataset(str(data), config, split=split), True
        except Exception as err:  # noqa: BLE001 - datasets raises many types; all mean "cannot load"
            if path.exists():
                message = f"{flag} {str(data)!r} is not a file or folder this task reads, nor a dataset folder"
            else:
                message = (
                    f"{flag} {str(data)!r} does not exist as a local file or folder, and `datasets` could not "
                    "load it as a hub dataset (offline, or no such dataset?)"
                )
            raise SvdloraError(f"{message}: {first_line(err)}") from None
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        chosen = split or ("test" if "test" in loaded else names[0] if len(names) == 1 else None)
        if chosen not in loaded:
            raise SvdloraError(f"--split {split!r} is not a split of {str(data)!r}: pass --split one of {names}")
        loaded, split = loaded[chosen], chosen
    elif split is not None and not split_read and str(getattr(loaded, "split", None)) != split:
        # one split already (a Dataset in memory, a save_to_disk of one split): --split was ignored, and
        # the result named a split that was not read
        raise SvdloraError(f"--split {split!r}: {flag} is one split of a dataset, not a set of splits: drop --split")
    if len(loaded) == 0:
        raise SvdloraError(f"{flag} {str(data)!r} (split {split!r}) has no rows")
    return loaded, split


def open_eval_dataset(opts: Any):
    """``open_dataset`` with the eval options; where no --split was given, ``opts.split`` becomes the
    split read (test when present, or a dataset's only one), so the result names it."""
    dataset, opts.split = _open_split(opts.data, opts.split, opts.data_config, "--data")
    return dataset


def pick_column(dataset, wanted: str | None, candidates: tuple[str, ...], flag: str | None) -> str:
    """``wanted`` when the dataset has it, else the first of ``candidates`` that it has; ``flag`` is the
    option that names a column, None where there is none (calibration data)."""
    columns = list(dataset.column_names)
    if wanted is not None:
        root = wanted.split(".", 1)[0]
        if root not in columns:
            raise SvdloraError(f"{flag} {wanted!r} is not a column of the dataset: pass {flag} one of {columns}")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    if flag is None:
        raise SvdloraError(
            f"the dataset has none of the columns {list(candidates)} (it has {columns}): rename the one to read "
            f"(datasets' rename_column, then save_to_disk) or pass a file"
        )
    raise SvdloraError(f"the dataset has none of the columns {list(candidates)}: pass {flag} one of {columns}")


def text_values(
    values: list,
    column: str,
    flag: str,
    *,
    parallel: bool = False,
    several: bool = False,
    column_flag: str | None = None,
) -> list:
    """A text column's strings, empty rows (None) left out; any other value was read as its str() ("{'de': ...}",
    "['a', 'b']", "3"): refused, naming the column and the row (``flag``: the option that gave the data).

    ``parallel``: the rows pair up with another column's (a translation's sources and references), so an empty
    row is refused rather than left out. ``several``: a row may hold a list of strings (a reference column's
    references). ``column_flag``: the option that names the column, offered for a dict column's key."""
    for row, value in enumerate(values):
        listed = several and isinstance(value, list | tuple) and value and all(isinstance(v, str) for v in value)
        if isinstance(value, str) or listed or (value is None and not parallel):
            continue
        shown = "None" if value is None else f"a {type(value).__name__}"
        if isinstance(value, dict) and column_flag:
            fix = f"name its key, {column_flag} {column}.<key>"
        elif value is None:
            fix = "its rows pair up with the other column's, so every row needs text"
        else:
            fix = "pass a dataset whose text column holds strings, or a text file"
        raise SvdloraError(
            f"{flag} reads the dataset's column {column!r}, which holds {shown} (row {row}), not text: {fix}"
        )
    return [value if isinstance(value, str) else list(value) for value in values if value is not None]


def column_values(dataset, column: str) -> list:
    """Values of ``column``; ``'translation.de'`` reads key ``de`` of a dict column."""
    root, _, key = column.partition(".")
    values = dataset[root]
    if not key:
        return list(values)
    try:
        return [row[key] for row in values]
    except (KeyError, TypeError):
        raise SvdloraError(f"column {root!r} has no key {key!r}: pass e.g. {root}.<key> with an existing key") from None
