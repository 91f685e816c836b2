"""Writing files so that no reader ever sees half of one, and nobody else's file is replaced.

Every file datumdb writes goes to a temporary name in the target's folder and is renamed over
the target only when complete (a killed process leaves no half file under the real name; the
temporary is removed on any error). The temporary is created exclusively under a random name
(``mkstemp``: ``O_CREAT | O_EXCL``), so a symlink planted at a name we would use is never
followed, and the rename replaces the directory entry at the target, never a file a link there
leads to. :func:`check_new_outputs` refuses to replace an existing file unless the caller was
told to (``--overwrite``): datumdb cannot know it wrote that file. :func:`check_output_names`
refuses outputs that would destroy an input (an output that is, or lies inside, an input
database) or each other (two outputs naming one file): both would lose data without a word.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from datumdb.errors import DatabaseExistsError, InputError

__all__ = ["atomic_write", "check_new_outputs", "check_output_names", "replacing", "sync_folder"]

OUTPUT_MODE = 0o644  # what a written file may be read as (mkstemp creates 0600)


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str], *, durable: bool = False) -> Iterator[BinaryIO]:
    """A file handle on a temporary name beside ``path``, renamed over it only if the block succeeds.

    ``durable`` also flushes the file to disk before the rename (an export a user keeps), so a
    crash right after leaves the old file or the whole new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fchmod(handle.fileno(), OUTPUT_MODE)  # on the open file: never through a name swapped meanwhile
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sync_folder(path: str | os.PathLike[str]) -> None:
    """Flush everything written to the file system holding ``path`` (Linux ``syncfs``), once.

    For a job that wrote many small databases without an fsync each (``durable=False``): one
    call before it reports success, where ``os.sync`` would flush every file system.
    """
    import ctypes
    import ctypes.util

    fd = os.open(path, os.O_RDONLY)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if getattr(libc, "syncfs", None) is None or libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename."""
    with replacing(path) as handle:
        handle.write(data)
    return Path(path)


def _entry(path: str | os.PathLike[str]) -> str:
    """The directory entry ``path`` names: its folder resolved, its own name kept.

    That entry is what a rename replaces (a symlink there is replaced, not followed), so two
    outputs collide exactly when their entries are equal, whatever spelling reached them.
    """
    path = Path(path)
    return os.path.join(os.path.realpath(path.parent), path.name)


def check_output_names(
    outputs: Iterable[str | os.PathLike[str] | None], inputs: Iterable[str | os.PathLike[str]] = ()
) -> None:
    """Refuse two outputs naming one file, and an output that is, or lies inside, an input.

    ``inputs`` are the databases (folders) and files the command reads: writing into a database
    folder would replace its ``data.mdb`` or leave a file that makes it foreign; writing over an
    input file loses it. Run before any work, so nothing is half done.
    """
    seen: dict[str, str | os.PathLike[str]] = {}
    resolved_inputs = [(source, os.path.realpath(source)) for source in inputs]
    for output in outputs:
        if output is None:
            continue
        entry = _entry(output)
        if entry in seen:
            raise InputError(f"{output}: named twice as an output (also as {seen[entry]}); each needs its own file")
        seen[entry] = output
        for source, real in resolved_inputs:
            if entry == real or entry.startswith(real.rstrip(os.sep) + os.sep):
                where = "is" if entry == real else "lies inside"
                raise InputError(f"{output}: {where} the input {source}; writing it would destroy that input")


def check_new_outputs(
    paths: Iterable[str | os.PathLike[str] | None],
    *,
    overwrite: bool,
    inputs: Iterable[str | os.PathLike[str]] = (),
) -> None:
    """Refuse outputs that exist (unless ``overwrite``) or that are not files, naming them; and
    outputs :func:`check_output_names` refuses."""
    paths = list(paths)
    check_output_names(paths, inputs)
    for path in paths:
        if path is None:
            continue
        path = Path(path)
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise DatabaseExistsError(f"{path}: exists and is not a regular file; not replacing it")
        if path.exists() and not overwrite:
            raise DatabaseExistsError(f"{path}: exists; pass --overwrite to replace it")
