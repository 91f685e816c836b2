"""Writing files so that no reader ever sees half of one, and nobody else's file is replaced.

Every file datumdb writes goes to a temporary name in the target's folder and is renamed over
the target only when complete (a killed process leaves no half file under the real name; the
temporary is removed on any error). :func:`check_new_outputs` refuses to replace an existing
file unless the caller was told to (``--overwrite``): datumdb cannot know it wrote that file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from datumdb.errors import DatabaseExistsError

__all__ = ["atomic_write", "check_new_outputs", "replacing"]


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A file handle on a temporary name beside ``path``, renamed over it only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename."""
    with replacing(path) as handle:
        handle.write(data)
    return Path(path)


def check_new_outputs(paths: Iterable[str | os.PathLike[str] | None], *, overwrite: bool) -> None:
    """Refuse outputs that exist (unless ``overwrite``) or that are not files, naming them."""
    for path in paths:
        if path is None:
            continue
        path = Path(path)
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise DatabaseExistsError(f"{path}: exists and is not a regular file; not replacing it")
        if path.exists() and not overwrite:
            raise DatabaseExistsError(f"{path}: exists; pass --overwrite to replace it")
