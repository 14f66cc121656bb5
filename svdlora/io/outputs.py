"""The one policy for everything svdlora writes: it never destroys or fakes the user's files.

- Never write into, over, or around an input: paths are compared after resolving symlinks,
  so ``--output`` equal to the input, inside it, containing it, or the current folder is refused.
- ``--overwrite`` replaces only a folder svdlora wrote (it holds ``.svdlora-output`` or
  ``svdlora_config.json``) or an empty one, checked before the slow work and again before the
  rename; ``--json`` replaces only an earlier svdlora result.
- Writability is checked by creating (and removing) a probe before any slow work, under the output's
  temporary name (below): a name the filesystem refuses there is refused then, not once the work is done.
- A folder is written under a temporary name and renamed into place when complete. The
  temporary name carries the host and pid (``.NAME.svdlora-tmp-HOST-PID-XXXX``) and holds
  ``.svdlora-incomplete``, so svdlora refuses to read it, and the next run for the same output
  removes what a killed run left, finished or not (or puts back an output that a kill caught mid-swap).
- ``--overwrite`` swaps the new folder in with one ``renameat2(RENAME_EXCHANGE)`` where the system has it (Linux, a
  filesystem that supports it), so the output path always holds the old folder or the new one; elsewhere by two
  renames (old aside, new in), where a kill between them leaves the old one aside until the next run for it.
  A finished folder that cannot be renamed into place (the output appeared meanwhile) is kept for
  the user under a visible name, ``NAME.svdlora-finished-XXXX``, that no clean-up touches.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import logging
import os
import secrets
import shutil
import socket
import sys
from collections.abc import Iterable
from contextlib import contextmanager, suppress
from pathlib import Path

from ..errors import SvdloraError
from ..version import __version__

logger = logging.getLogger(__name__)

MARKER = ".svdlora-output"  # in every folder svdlora completes: --overwrite may replace it
INCOMPLETE = ".svdlora-incomplete"  # in a temporary folder until it is renamed into place
SVDLORA_CONFIG = "svdlora_config.json"  # writer.CONFIG_NAME; writer imports torch, the CLI this module
TMP_TAG, OLD_TAG = ".svdlora-tmp-", ".svdlora-old-"
KEPT_TAG = ".svdlora-finished-"  # a finished folder left for the user (atomic_folder)

# what this process put in place (atomic_folder, write_file_atomic): a later step that fails or is interrupted
# (compress --eval's evaluation, sweep's pick) then names them rather than saying nothing was written
FINISHED: list[Path] = []


def _resolve(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _local_inputs(inputs: Iterable) -> list[Path]:
    """The inputs that are local files or folders (hub ids and None are skipped)."""
    out = []
    for item in inputs:
        if item is None or not isinstance(item, str | os.PathLike):
            continue
        path = Path(item).expanduser()
        if path.exists():
            out.append(path.resolve())
    return out


def _same(a: Path, b: Path) -> bool:
    """The same file or folder, also where resolving leaves two spellings of it (a case-insensitive filesystem's
    'Out' and 'out', a folder mounted at two paths)."""
    try:
        return a == b or os.path.samefile(a, b)
    except OSError:  # one does not exist (yet)
        return False


def check_not_input(target: Path, shown: str, inputs: Iterable, flag: str) -> None:
    """Refuse a path that is an input, inside one, or holds one (or the current folder)."""
    for inp in _local_inputs(inputs):
        if _same(target, inp):
            raise SvdloraError(f"{flag} {shown!r} is the input {str(inp)!r}: write to another path")
        if any(_same(parent, inp) for parent in target.parents):
            raise SvdloraError(f"{flag} {shown!r} is inside the input {str(inp)!r}: write outside it")
        if any(_same(target, parent) for parent in inp.parents):
            raise SvdloraError(f"{flag} {shown!r} contains the input {str(inp)!r}: write to another path")
    cwd = Path.cwd().resolve()
    if any(_same(target, folder) for folder in (cwd, *cwd.parents)):
        raise SvdloraError(f"{flag} {shown!r} is the current folder or one above it: pass a new folder name")


def written_by_svdlora(folder: Path) -> bool:
    return (folder / MARKER).is_file() or (folder / SVDLORA_CONFIG).is_file()


def is_incomplete(folder: str | Path) -> bool:
    """A temporary folder of a run that has not finished (or was killed)."""
    return (Path(folder) / INCOMPLETE).exists()


def check_writable(target: Path, flag: str, shown: str) -> None:
    """Create and remove a probe beside ``target`` (in the nearest existing folder): catches EACCES, EROFS, a file
    parent, and a name whose temporary one (the longest svdlora writes beside it) the filesystem refuses."""
    existing = target.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SvdloraError(f"{flag} {shown!r}: {str(existing)!r} is a file, not a folder")
    probe = existing / _leftover_name(target, TMP_TAG).name  # a kill leaves it to clean_leftovers
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as err:
        if err.errno == errno.ENAMETOOLONG:  # the name itself fits: the run would fail only once done
            longer = len(os.fsencode(probe.name)) - len(os.fsencode(target.name))
            raise SvdloraError(
                f"{flag} {shown!r}: svdlora writes it first under a temporary name {longer} bytes longer, past this "
                "filesystem's limit on a name: shorten the name"
            ) from None
        raise SvdloraError(f"{flag} {shown!r}: cannot write in {str(existing)!r} ({describe(err)})") from None


def check_output_folder(output: str | Path, overwrite: bool = False, inputs: Iterable = (), flag="--output") -> Path:
    """Refuse an output folder that would destroy user files; call before any slow work."""
    path = Path(output).expanduser()
    shown = str(output)
    if path.is_symlink():
        raise SvdloraError(f"{flag} {shown!r} is a symbolic link: pass a real folder path")
    target = path.resolve()
    check_not_input(target, shown, inputs, flag)
    clean_leftovers(target)  # first: it may put back an output that a killed --overwrite had moved aside
    check_replaceable(target, shown, overwrite, flag)
    check_writable(target, flag, shown)
    return path


def check_replaceable(target: Path, shown: str, overwrite: bool, flag: str = "--output") -> None:
    """Refuse an existing ``target`` unless --overwrite may replace it (an svdlora output or an empty folder)."""
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink():
        raise SvdloraError(f"{flag} {shown!r} is a symbolic link: pass a real folder path")
    if not target.is_dir():
        raise SvdloraError(f"{flag} {shown!r} is a file: pass a folder path")
    if not overwrite:
        raise SvdloraError(f"output folder {shown!r} already exists: pass --overwrite or choose another path")
    if any(target.iterdir()) and not written_by_svdlora(target):
        raise SvdloraError(
            f"{flag} {shown!r} holds files svdlora did not write: --overwrite only replaces svdlora "
            "outputs or empty folders; choose another path or remove it yourself"
        )


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead_leftover(path: Path, prefix: str) -> bool:
    """Whether ``path`` was left by a process of this host that no longer runs."""
    try:
        host, pid, _ = path.name[len(prefix) :].split("-")
        pid = int(pid)
    except ValueError:
        return False
    return host == _host() and pid != os.getpid() and not _alive(pid)


def clean_leftovers(output: Path) -> None:
    """Remove the temporary folders (or result files) of killed runs for ``output``; restore an output
    caught mid-swap."""
    parent = output.parent
    if not parent.is_dir():
        return
    tmp_prefix, old_prefix = f".{output.name}{TMP_TAG}", f".{output.name}{OLD_TAG}"
    for path in sorted(parent.iterdir()):
        # finished or not: a kill between the INCOMPLETE unlink and the rename leaves a finished one
        if path.name.startswith(tmp_prefix) and _dead_leftover(path, tmp_prefix):
            logger.warning("removing %s, left by an interrupted run", path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:  # a result file's (write_file_atomic)
                path.unlink(missing_ok=True)
        elif path.name.startswith(old_prefix) and _dead_leftover(path, old_prefix):
            if not output.exists() and not output.is_symlink():
                logger.warning("restoring %s from %s (a run was interrupted while replacing it)", output, path)
                with suppress(FileNotFoundError):  # another rank of the same rerun restored it first
                    os.replace(path, output)
            else:
                logger.warning("removing %s, the replaced output of an interrupted run", path)
                shutil.rmtree(path, ignore_errors=True)


def _leftover_name(output: Path, tag: str) -> Path:
    return output.parent / f".{output.name}{tag}{_host()}-{os.getpid()}-{secrets.token_hex(4)}"


@contextmanager
def atomic_folder(output: str | Path, overwrite: bool = False, inputs: Iterable = ()):
    """Yield a temporary folder that becomes ``output`` only if the block succeeds."""
    output = check_output_folder(output, overwrite, inputs).absolute()
    tmp = _leftover_name(output, TMP_TAG)
    keep = False
    with folders_made_for(output.parent):  # a kept folder is not empty: its parents stay
        try:
            tmp.mkdir()
            (tmp / INCOMPLETE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
            yield tmp
            (tmp / MARKER).write_text(json.dumps({"svdlora_version": __version__}) + "\n")
            (tmp / INCOMPLETE).unlink()
            try:  # again: the output may have appeared (a user's folder, another run's) while this run wrote
                check_replaceable(output, str(output), overwrite)
            except SvdloraError as err:
                keep = True  # finished, and maybe hours of work: left for the user to move
                # renamed: a visible name is seen in a listing, and no later run's clean_leftovers (which
                # removes the hidden temporary folders of dead runs) takes it for a killed run's
                kept = output.parent / f"{output.name}{KEPT_TAG}{secrets.token_hex(4)}"
                os.replace(tmp, kept)
                raise SvdloraError(
                    f"{err} (it appeared during this run; the finished folder is {str(kept)!r})"
                ) from None
            if output.exists():  # overwrite: swap only after the new folder is complete
                _swap_in(tmp, output)
            else:
                os.replace(tmp, output)
            FINISHED.append(output)
        finally:
            if not keep:
                shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def folders_made_for(folder: Path):
    """Create ``folder`` and the missing folders above it for the block; where the block fails (or is interrupted),
    remove again those it created and left empty: a failed run leaves no folders of its own behind."""
    made = _make_folders(folder)
    try:
        yield
    except BaseException:
        _remove_empty(made)
        raise


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and the missing folders above it; those this call created, deepest first (one that another
    process creates meanwhile is not counted: only what this run made is removed again)."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    made = []
    for path in reversed(missing):
        try:
            path.mkdir()
            made.insert(0, path)
        except FileExistsError:
            pass
        except OSError:  # e.g. no permission one level down
            _remove_empty(made)
            raise
    return made


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) up to the first that is not empty: the user's files stay."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _swap_in(new: Path, output: Path) -> None:
    """Put the finished folder ``new`` at ``output`` in place of the folder there, which is then removed."""
    try:
        _swap(new, output)
    except FileNotFoundError:
        if output.exists() or not new.exists():
            raise
        os.replace(new, output)  # the old folder went meanwhile (another run removed it): nothing to swap, moved in


def _swap(new: Path, output: Path) -> None:
    if _exchange(new, output):  # one step: the old folder is now under new's temporary name
        shutil.rmtree(new, ignore_errors=True)  # a kill first leaves it to clean_leftovers, as any temporary folder
        return
    old = _leftover_name(output, OLD_TAG)
    try:
        os.replace(output, old)
        os.replace(new, output)
    except BaseException:  # Ctrl-C or SIGTERM too: else the output is gone until the next run
        if old.exists() and not output.exists():
            os.replace(old, output)  # put the previous folder back
        raise
    shutil.rmtree(old, ignore_errors=True)


AT_FDCWD, RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


@functools.cache
def _renameat2():
    """libc's renameat2 (Linux, glibc 2.28 or later), or None: ``os`` does not expose it."""
    if not sys.platform.startswith("linux"):
        return None
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one step; False, nothing done, where this system or filesystem cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):  # no such call, or not on this filesystem
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def remove_folder(folder: Path) -> None:
    """Remove an output whole: renamed to a temporary name first, so that a kill midway leaves no part of it under
    its name that reads as an svdlora folder (what is left, hidden, goes as a killed run's does: clean_leftovers)."""
    aside = _leftover_name(folder, TMP_TAG)
    os.replace(folder, aside)
    shutil.rmtree(aside, ignore_errors=True)


def readable_as_umask(*files: Path) -> None:
    """Give ``files`` the mode ``open()`` gives (0666 less the umask), as the rest of the output has:
    safetensors >= 0.8 and peft write weights owner-only (0600), unreadable to a group sharing the folder."""
    umask = os.umask(0)  # the only way to read it: set, then put back at once
    os.umask(umask)
    for file in files:
        os.chmod(file, 0o666 & ~umask)


# ---------------------------------------------------------------- single files (eval --json)
def check_output_file(path: str | Path, inputs: Iterable = (), flag: str = "--json") -> Path:
    """Refuse a result file that is a folder, an input, or a file svdlora did not write."""
    file = Path(path).expanduser()
    shown = str(path)
    target = file.resolve()
    if target.is_dir():
        raise SvdloraError(f"{flag} {shown!r} is a folder: pass a file name such as result.json")
    check_not_input(target, shown, inputs, flag)
    if not target.parent.is_dir():
        raise SvdloraError(f"{flag} {shown!r}: folder {str(file.parent)!r} does not exist")
    if target.exists() and not _is_svdlora_result(target):
        raise SvdloraError(
            f"{flag} {shown!r} exists and is not an svdlora result: choose another file or remove it yourself"
        )
    check_writable(target, flag, shown)
    return file


def json_keys(path: Path) -> set[str]:
    """The top-level keys of a JSON object file; empty where it is unreadable or not an object (a file
    svdlora wrote says so by its keys, which is what the --overwrite checks read)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return set()
    return set(data) if isinstance(data, dict) else set()


def _is_svdlora_result(path: Path) -> bool:
    return {"svdlora_version", "schema_version"} <= json_keys(path)


def write_file_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so a failure leaves the old file."""
    with files_replaced_together([path]) as (tmp,):
        tmp.write_text(text)


@contextmanager
def files_replaced_together(paths: list[Path]):
    """Yield a temporary path for each of ``paths`` (one set, such as sweep's files) to write; once the block
    succeeds, each one written replaces its path and each one not written removes it (an earlier set's), one
    rename after another with no work between them. A failure or kill before then leaves the earlier set whole
    (the next write for those paths removes a killed one's temporary files: clean_leftovers)."""
    paths = [Path(path).absolute() for path in paths]
    for path in paths:
        clean_leftovers(path)
    tmps = [_leftover_name(path, TMP_TAG) for path in paths]
    try:
        yield tmps
        for tmp, path in zip(tmps, paths, strict=True):
            if tmp.exists():
                os.replace(tmp, path)
                FINISHED.append(path)
            else:
                path.unlink(missing_ok=True)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


def finished_outputs() -> list[Path]:
    """``FINISHED`` still in place (not the card of a temporary folder, since renamed), once each; a file written
    into a finished folder (its card, after --eval) named by that folder."""
    kept = [path for path in dict.fromkeys(FINISHED) if path.exists()]
    return [path for path in kept if not any(folder in path.parents for folder in kept)]


def ensure_space(folder: Path, needed: int, shown: str) -> None:
    """Refuse before writing ``needed`` bytes that the disk does not have (no half-written file)."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise SvdloraError(
            f"output {shown!r} needs {needed / 2**20:,.1f} MiB but its disk has {free / 2**20:,.1f} MiB free: "
            "free space or write to another disk"
        )


def describe(err: OSError) -> str:
    """'No space left on device' rather than '[Errno 28] ...: path' (the caller names the path)."""
    if err.errno is not None:
        return os.strerror(err.errno)
    return str(err) or type(err).__name__
