"""One error hierarchy for datumdb.

Every error datumdb raises on purpose derives from :class:`DatumDBError`, and also from the
built-in exception a caller would naturally catch (``ValueError``, ``FileNotFoundError``...),
so code that does not know datumdb still handles it sensibly. Messages always name the file,
line, key or parameter at fault: a user with a million-record dataset needs to know *which*.
"""

from __future__ import annotations


class DatumDBError(Exception):
    """Base class of every error raised by datumdb."""


class DatumError(DatumDBError, ValueError):
    """A serialized Datum (or BlobProto) is malformed, or a value cannot be encoded as one."""

    def __init__(self, message: str, key: bytes | str | None = None) -> None:
        self.key = key
        if key is not None:
            shown = key.decode("utf-8", "backslashreplace") if isinstance(key, bytes) else key
            message = f"key {shown!r}: {message}"
        super().__init__(message)


class InputError(DatumDBError, ValueError):
    """Bad user input: a list file line, an image, an array file, a parameter."""


class DatabaseNotFoundError(DatumDBError, FileNotFoundError):
    """The database folder or its ``data.mdb`` does not exist."""


class DatabaseExistsError(DatumDBError, FileExistsError):
    """The build target already holds a database and overwriting was not asked for."""


class DatabaseError(DatumDBError):
    """The LMDB environment could not be opened, read or written."""


class WriteError(DatumDBError):
    """A record could not be stored: a key out of order, a duplicate, a dropped put."""


class VerificationError(DatumDBError):
    """A database does not match its manifest, or a record does not decode."""


class UnsafeInputError(InputError):
    """An input is not a regular file (a FIFO, device, socket or folder), leaves ROOT through a
    symlink, or exceeds a documented size bound (see :mod:`datumdb.limits`)."""


class OutputTooLargeError(DatumDBError, ValueError):
    """An output would exceed a documented size bound that the caller did not raise."""


class UnsafeTargetError(DatabaseExistsError):
    """The build target is not a folder datumdb may publish into or replace.

    datumdb replaces only what it made itself: a folder holding ``data.mdb``, ``datumdb.json``
    and optionally ``lock.mdb``. Anything else (other files, sub-folders, the working directory,
    ``.``, ``..``, a symlink, a file) is refused, because a mistyped ``--overwrite`` target must
    never delete a user's files.
    """


class DatabaseChangedError(DatabaseError):
    """The database at a reader's path is no longer the version the reader is pinned to.

    A rebuild publishes a new ``data.mdb`` over the old one. A reader that has been used is
    pinned to the file it first opened; when it has to open the path again (in a worker process
    it was pickled or forked into, or after :meth:`~datumdb.reader.DatumReader.close`) and finds
    another file there, it raises this instead of reading records of a second version.
    """


class DecodeWorkerError(DatumDBError, RuntimeError):
    """A process decoding images died (killed, out of memory, a crash in a decoder) mid-build.

    The message names the first list line of the images it may have been reading; nothing is
    published, as for any other failed build.
    """
