"""`svdlora` command line: a thin shell over the Python API, one module per command."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import threading

from .. import card
from ..errors import SvdloraError, first_line
from ..io import outputs
from ..io.outputs import describe
from ..launcher import launched
from ..version import __version__
from . import compress_cmd, convert_cmd, eval_cmd, export_cmd, extract_cmd, info_cmd, sweep_cmd

COMMANDS = (compress_cmd, info_cmd, export_cmd, eval_cmd, convert_cmd, extract_cmd, sweep_cmd)
DISTRIBUTED = ("compress",)  # the commands that split their work over a launcher's processes


class _OneLineParser(argparse.ArgumentParser):
    """A bad flag value is one line naming it and the fix, as every other input error (argparse's
    default prints the whole usage first: twenty lines above the one that matters). The subcommands'
    parsers are of this class too (add_subparsers builds them with the parent's class)."""

    def error(self, message: str):
        self.exit(2, f"{_speaker(self.prog)}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="svdlora",
        description="Compress Hugging Face / PyTorch checkpoints with residual truncated SVD.",
        epilog="Set SVDLORA_TRACEBACK=1 to see full tracebacks of errors.",
    )
    parser.add_argument("--version", action="version", version=f"svdlora {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure is one line on stderr (the traceback with SVDLORA_TRACEBACK=1).

    Exit status: 0 done, 2 a problem with the input or the environment (SvdloraError, a write
    error such as a full or read-only disk), 1 a bug in svdlora, 130 Ctrl-C, 141 a closed pipe.
    """
    args = build_parser().parse_args(argv)
    card.set_cli_argv(sys.argv[1:] if argv is None else argv)  # the exact command, for model cards
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    previous = _exit_on_sigterm()
    outputs.FINISHED.clear()  # this command's, not an earlier main()'s in the same process
    try:
        _check_launcher(args.command)
        return args.func(args) or 0
    except BrokenPipeError:
        # `svdlora info X | head -1`: the reader left, which is no error. Point stdout at devnull so
        # the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print(f"{_speaker(f'svdlora {args.command}')}: interrupted ({_written()})", file=sys.stderr)
        return 130
    except Exception as err:
        if os.environ.get("SVDLORA_TRACEBACK"):
            raise
        # a later step failed (compress --eval's evaluation out of memory): what is in place, whole (an OSError's says)
        done = f" ({_written()})" if outputs.finished_outputs() and not isinstance(err, OSError) else ""
        print(f"{_speaker(f'svdlora {args.command}')}: error: {_one_line(err)}{done}", file=sys.stderr)
        return 2 if isinstance(err, SvdloraError | OSError) or out_of_memory(err) else 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _speaker(prog: str) -> str:
    """``prog`` ('svdlora compress'), and this process's rank where a launcher runs several: each prints its own
    error, so one that every rank hits is repeated, each line telling whose it is."""
    return f"{prog} [rank {os.environ['RANK']}/{os.environ['WORLD_SIZE']}]" if launched() else prog


def _check_launcher(command: str) -> None:
    """Under torchrun / accelerate launch every process runs the command: one that does not split its work
    would run it once per process, each writing the same output (export: one wrote it, the others failed)."""
    if command not in DISTRIBUTED and launched():
        raise SvdloraError(
            f"svdlora {command} runs as one process (only compress splits its work over a launcher's processes): "
            "run it without torchrun / accelerate launch"
        )


def _exit_on_sigterm():
    """`kill PID` unwinds like Ctrl-C, so temporary folders are removed (only kill -9 leaves them,
    and the next run for the same output removes those)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, stop)


def out_of_memory(err: Exception) -> bool:
    """An allocation that failed (host or GPU): the environment's limit, not a bug."""
    text = str(err)
    return (
        isinstance(err, MemoryError)
        or _gpu_out_of_memory(err)
        or (isinstance(err, RuntimeError) and ("can't allocate memory" in text or "DefaultCPUAllocator" in text))
    )


def _gpu_out_of_memory(err: Exception) -> bool:
    torch = sys.modules.get("torch")  # not imported: no GPU error either (the CLI imports torch on use)
    return torch is not None and isinstance(err, torch.OutOfMemoryError)


def _written() -> str:
    """What a failed or interrupted command leaves: the outputs it finished before (each whole), or nothing."""
    done = outputs.finished_outputs()
    if not done and launched() and os.environ["RANK"] != "0":  # only rank 0 writes, and knows what it wrote
        return "rank 0 writes the output and says what was written"
    if not done:
        return "nothing was written"
    return f"{', '.join(map(str, done))} {'was' if len(done) == 1 else 'were'} written whole before this"


def _one_line(err: Exception) -> str:
    if isinstance(err, SvdloraError):
        return " ".join(str(err).split())
    if out_of_memory(err):
        detail = first_line(err).rpartition("DefaultCPUAllocator: ")[2].strip() or type(err).__name__
        if _gpu_out_of_memory(err):
            return f"out of GPU memory ({detail}): free the GPU, or run on the CPU (--device cpu)"
        return (
            f"out of memory ({detail}): free memory, or raise the limit this "
            "process runs under (ulimit -v, the memory cgroup)"
        )
    if isinstance(err, OSError):  # e.g. the disk filled up while writing: the output was not created
        where = f" ({err.filename})" if err.filename else ""
        if err.errno == errno.ENAMETOOLONG:  # read or written: neither space nor permissions make it fit
            return f"{describe(err)}{where}: a name in this path is longer than the filesystem allows: shorten it"
        return f"{describe(err)}{where}: {_written()}; free space or fix permissions and retry"
    return (
        f"internal error {type(err).__name__}: {first_line(err)} - a bug in svdlora; "
        "rerun with SVDLORA_TRACEBACK=1 and report the traceback"
    )
