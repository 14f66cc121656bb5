"""Every benchmark command BENCHMARKS.md and README.md quote still parses with its script's flags, and
every `svdlora CMD --flag value` README.md quotes (in code or its flag tables) exists in the CLI, and every
keyword its Python examples pass to an svdlora function is one that function takes.

A flag renamed or removed in a script leaves the recorded commands (the reproduction recipe of each
figure) unrunnable without anything failing; this parses each one against its script's parser, stopping
right after parsing, so nothing is measured. BENCHMARKS.md holds every benchmarks/results/*.md fragment.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("BENCHMARKS.md", "README.md")
# `python -m benchmarks.NAME`, `python -m benchmarks NAME` and `[python3|bash] benchmarks/NAME.py|.sh`.
COMMAND = re.compile(r"python3?\s+-m\s+benchmarks(?:\.(\w+)|\s+(\w+))|benchmarks/(\w+)\.(py|sh)")


def code_spans(text: str):
    """(line, code) of each fenced-block line (backslash continuations joined) and inline code span."""
    line = 1
    for k, part in enumerate(re.split(r"^```.*$", text, flags=re.M)):
        if k % 2:
            lines, i = part.split("\n"), 0
            while i < len(lines):
                start, code = i, lines[i]
                while code.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    code = code.rstrip()[:-1] + " " + lines[i].strip()
                yield line + start, code
                i += 1
        else:
            for m in re.finditer(r"`([^`]+)`", part):  # an inline span may wrap over lines
                yield line + part[: m.start()].count("\n"), m.group(1).replace("\n", " ")
        line += part.count("\n")


def argv_variants(rest: str) -> list[list[str]]:
    """The flags after the command: ``[optional]`` kept, ``{a,b}`` each choice."""
    rest = re.sub(r"\[([^\]]*)\]", r"\1", rest)
    choice = re.search(r"\{([^}]*)\}", rest)
    if choice is None:
        return [shlex.split(rest)]
    return [v for c in choice.group(1).split(",") for v in argv_variants(rest.replace(choice.group(0), c, 1))]


def recorded_commands() -> list[tuple[str, str, str, list[str]]]:
    """(where, script name, kind, argv) of every quoted command with arguments; kind "elided" where the
    quote leaves arguments out (``...``), so that only its flags' names can be checked."""
    found = []
    for doc in DOCS:
        for line, code in code_spans((ROOT / doc).read_text()):
            for m in COMMAND.finditer(code):
                name, kind = m.group(1) or m.group(2) or m.group(3), m.group(4) or "module"
                rest = re.split(r"\s#|;|&&|\||>", code[m.end() :])[0].strip()
                if kind != "sh" and re.search(r"\.\.\.|…", rest):
                    kind, rest = "elided", re.sub(r"\.\.\.|…", " ", rest)
                found += [(f"{doc}:{line}", name, kind, argv) for argv in argv_variants(rest) if argv or kind == "sh"]
    return found


class Parsed(Exception):
    """Raised by the patched parser instead of parsing: the script stops before doing anything."""


WITHOUT_PARSER = {"gpu_gemv"}  # a snippet file dispatching on sys.argv[1], no main


def script_parser(name: str, argv: list[str], monkeypatch) -> argparse.ArgumentParser | None:
    """The parser the script ``name`` builds, caught at its parse call; None for a file without ``main``
    (gpu_gemv, a snippet file dispatching on sys.argv[1]) or one that parses nothing."""
    module = importlib.import_module("benchmarks.__main__" if name == "all" else f"benchmarks.{name}")
    if not hasattr(module, "main"):
        return None

    def stop(self, args=None, namespace=None):
        raise Parsed(self)

    with monkeypatch.context() as patch:  # undone here; the caller's own patches stay
        patch.setattr(argparse.ArgumentParser, "parse_known_args", stop)
        patch.setattr(sys, "argv", [f"benchmarks/{name}.py", *argv])  # the GPU scripts parse sys.argv
        try:
            module.run_all(argv) if name == "all" else module.main() if name.startswith("gpu_") else module.main(argv)
        except Parsed as caught:
            return caught.args[0]
    return None


def parse_error(name: str, kind: str, argv: list[str], monkeypatch) -> str | None:
    """Why ``argv`` does not parse with the script ``name``'s own parser, or None."""
    if kind == "sh":
        return None if (ROOT / "benchmarks" / f"{name}.sh").is_file() else "no such script"
    parser = script_parser(name, argv, monkeypatch)
    if parser is None:  # only a script known to parse no flags: a main renamed later must not pass unchecked
        return None if name in WITHOUT_PARSER else "its parser was not found"
    if kind == "elided":
        flags = [a.split("=")[0] for a in argv if a.startswith("--")]
        unknown = [f for f in flags if f not in parser._option_string_actions]
    else:
        try:
            _, unknown = parser.parse_known_args(argv)
        except SystemExit as e:  # argparse's error: a required flag missing, a value missing, a wrong choice
            return f"exit {e.code}"
    return f"unrecognized {unknown}" if unknown else None


def test_the_recorded_commands_are_found():
    names = {name for _, name, _, _ in recorded_commands()}
    assert {"mnist_blog", "nnsvd", "vit_cifar", "translation", "language_models", "speed", "all", "gpu_align"} <= names
    assert "memory_choice" in names  # the shell script


def test_every_recorded_benchmark_command_parses(monkeypatch, capsys):
    failures = [
        f"{where}: {name} {shlex.join(argv)}: {error}"
        for where, name, kind, argv in recorded_commands()
        if (error := parse_error(name, kind, argv, monkeypatch))
    ]
    assert not failures, "\n".join(failures) + "\n" + capsys.readouterr().err[-2000:]


@pytest.mark.parametrize(
    ("kind", "argv", "error"),
    [("module", ["--quick"], None), ("module", ["--quik"], "unrecognized ['--quik']"), ("module", ["--data"], "exit 2"),
     ("elided", ["--data"], None), ("elided", ["--quik"], "unrecognized ['--quik']")],
)  # fmt: skip
def test_a_flag_the_parser_does_not_take_is_reported(kind, argv, error, monkeypatch):
    assert parse_error("mnist_blog", kind, argv, monkeypatch) == error


# `svdlora CMD` in a code span (not `from svdlora import`); the flags after it up to a comment, pipe or redirect.
SVDLORA_COMMAND = re.compile(r"(?<![\w./-])(?<!from )(?<!import )svdlora\s+([a-z][\w-]*)")
# The flag tables: each README section's flags are one command's.
TABLE_COMMAND = {"Command line": "compress", "Python API": "compress", "Evaluation": "eval"}


def svdlora_parsers() -> dict[str, argparse.ArgumentParser]:
    from svdlora.cli import build_parser

    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


def flag_errors(parser: argparse.ArgumentParser, words: list[str]) -> list[str]:
    """The flags among ``words`` that ``parser`` lacks, and the literal values (``a|b``: each) outside a
    flag's choices; placeholders (FOLDER, N, ...) and elided values are not checked."""
    errors = []
    for k, word in enumerate(words):
        if not word.startswith("--"):
            continue
        flag, _, value = word.partition("=")
        action = parser._option_string_actions.get(flag)
        if action is None:
            errors.append(f"no flag {flag}")
            continue
        value = value or (words[k + 1] if k + 1 < len(words) and not words[k + 1].startswith("-") else "")
        if action.choices is not None and value:
            errors += [
                f"{flag} {v}: not one of {list(action.choices)}"
                for v in value.split("|")
                if v.islower() and v not in action.choices
            ]
    return errors


def readme_svdlora_uses() -> list[tuple[str, str, list[str]]]:
    """(where, command, words after it) of each `svdlora CMD ...` in README.md's code, and of each flag
    table row (its first cell) with the command of the table's section."""
    text = (ROOT / "README.md").read_text()
    found = []
    for line, code in code_spans(text):
        for m in SVDLORA_COMMAND.finditer(code):
            rest = re.split(r"\s#|;|&&|\s\|\s|>", code[m.end() :])[0]
            words = [w for w in rest.split() if "..." not in w and "…" not in w]
            found.append((f"README.md:{line}", m.group(1), words))
    section = None
    for line, row in enumerate(text.splitlines(), 1):
        section = row[3:].strip() if row.startswith("## ") else section
        if row.startswith("| `--"):
            cell = row.split(" | ")[0].replace("\\|", "|")
            words = [w for span in re.findall(r"`([^`]+)`", cell) for w in span.replace(",", " ").split()]
            found.append((f"README.md:{line}", TABLE_COMMAND.get(section, f"(a table in '{section}')"), words))
    return found


def test_every_svdlora_command_and_flag_the_readme_quotes_exists():
    """A flag or option value renamed in the CLI leaves README's examples and tables wrong without
    anything failing; each quoted `svdlora CMD --flag value` is checked against CMD's parser."""
    parsers, uses = svdlora_parsers(), readme_svdlora_uses()
    assert {"compress", "info", "eval", "export", "convert-gguf", "extract", "sweep"} <= {c for _, c, _ in uses}
    failures = [
        f"{where}: svdlora {command}: {error}"
        for where, command, words in uses
        for error in (flag_errors(parsers[command], words) if command in parsers else ["no such command"])
    ]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    ("words", "errors"),
    [(["--runtime", "auto|merged"], []), (["--runtime", "auto|merge"], ["--runtime merge: not one of"]),
     (["--runtim"], ["no flag --runtim"]), (["--runtime=FOLDER", "--json", "out.json"], [])],
)  # fmt: skip
def test_a_flag_or_value_the_cli_lacks_is_reported(words, errors):
    found = flag_errors(svdlora_parsers()["eval"], words)
    assert len(found) == len(errors) and all(e.startswith(x) for e, x in zip(found, errors, strict=True))


def readme_python_calls() -> list[tuple[str, str, str]]:
    """(where, svdlora function, keyword) of every keyword argument README.md's Python passes to an
    svdlora function: its ```python blocks and inline calls, names resolved through the README's own
    ``from svdlora... import`` lines (commented ones too) and svdlora's top-level names."""
    text = (ROOT / "README.md").read_text()
    names = dict.fromkeys(importlib.import_module("svdlora").__all__, "svdlora")
    for m in re.finditer(r"from (svdlora[\w.]*) import ([\w, ]+)", text):
        names |= {n.strip(): m.group(1) for n in m.group(2).split(",")}
    blocks = [
        (text[: m.start()].count("\n") + 2, m.group(1))
        for m in re.finditer(r"^```python\n(.*?)^```", text, re.M | re.S)
    ]
    found = []
    for line, code in blocks + list(code_spans(text)):
        try:
            tree = ast.parse(code.strip())
        except SyntaxError:  # shell, prose, one line of a block's multi-line call
            continue
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
            dotted = ast.unparse(call.func)
            module, _, name = (
                dotted.rpartition(".") if dotted.startswith("svdlora.") else (names.get(dotted), "", dotted)
            )
            if module:
                found += [(f"README.md:{line}", f"{module}:{name}", k.arg) for k in call.keywords if k.arg]
    return found


def accepted_keywords(function) -> set[str] | None:
    """The keywords ``function`` takes; its ``**options`` are a settings dataclass's fields (compress and
    write_adapter: CompressionConfig, evaluate: EvalOptions); None where it takes any."""
    from svdlora.config import CompressionConfig
    from svdlora.evaluation.options import EvalOptions

    parameters = inspect.signature(function).parameters
    named = {n for n, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    if all(p.kind != p.VAR_KEYWORD for p in parameters.values()):
        return named
    options = {"compress": CompressionConfig, "write_adapter": CompressionConfig, "evaluate": EvalOptions}.get(
        function.__name__
    )
    return None if options is None else named | {f.name for f in dataclasses.fields(options)}


def test_every_keyword_the_readme_passes_to_svdlora_exists():
    """A keyword renamed in the API leaves README's examples failing with TypeError only when run."""
    calls = readme_python_calls()
    assert {"svdlora:load_compressed", "svdlora:compress", "svdlora.evaluation:evaluate"} <= {f for _, f, _ in calls}
    failures = []
    for where, function, keyword in calls:
        module, _, name = function.partition(":")
        accepted = accepted_keywords(getattr(importlib.import_module(module), name))
        if accepted is not None and keyword not in accepted:
            failures.append(f"{where}: {module}.{name}() takes no {keyword}=")
    assert not failures, "\n".join(failures)
