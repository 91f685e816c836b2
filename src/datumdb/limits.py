"""Bounds on what datumdb reads and decodes, in one place.

A dataset tool is fed files nobody looked at: a list line naming a FIFO hangs a plain
``open()`` forever, a symlink to ``/dev/zero`` makes ``read()`` fill memory, and a 100-byte JPEG
can claim 60000 x 60000 pixels. Every input is therefore opened through :func:`open_regular_file`
(regular files only, at most a known size) and every decode is bounded, from the image's header,
before the decoder runs (pixels, bytes to decode, JPEG scans).

The bounds (each a named constant; the first can be changed through the environment):

* :data:`DEFAULT_MAX_INPUT_BYTES` (2 GiB): images, list files, other whole-file reads;
  ``DATUMDB_MAX_INPUT_BYTES`` overrides it (read by :func:`max_input_bytes`, only there).
  ``.npy`` arrays are memory-mapped and streamed, never read whole, so they have no size bound,
  only the regular-file check.
* :data:`MAX_MANIFEST_BYTES` (64 MiB): ``datumdb.json`` (a million-record manifest is < 1 MiB).
* :data:`MAX_IMAGE_PIXELS` (2**27, about 134 megapixels, 400 MB as BGR): what an encoded image
  may declare. OpenCV reads ``OPENCV_IO_MAX_IMAGE_PIXELS`` once, when ``cv2`` is imported, so
  :func:`configure_opencv` sets it and :mod:`datumdb.codec` calls that just before its
  ``import cv2``; ``datumdb``'s ``__init__`` imports the codec (through the reader) before any
  other module can import ``cv2``. A value the user set wins.
* :data:`DECODED_BYTES_PER_PIXEL` (4): the bytes an encoded image may cost to decode are at most
  this times the pixel bound (:func:`max_decoded_bytes`, 512 MiB by default), counted from its
  header as width x height x channels x bytes per sample plus the decoder's buffers, before any
  decoder runs (:mod:`datumdb.imageheader`). An 8-bit image within the pixel bound passes unless
  its decoder holds more besides (a progressive JPEG's coefficients, 2 bytes a sample, so about
  60 megapixels in colour; a TIFF's strip buffer); a float64 RGBA TIFF has 16 megapixels.
* :data:`MAX_JPEG_SCANS` (100): scans a JPEG may hold. libjpeg sweeps every block of the image
  once per scan, however few bytes the scan has; real files have 1 (baseline) to about 10
  (libjpeg's progressive script: 10 in colour, 6 in grey; Photoshop's: 3 to 5).
* :data:`DEFAULT_MAX_EXPORT_BYTES` (4 GiB): decoded pixels ``datumdb export`` will hold and write
  unless ``--max-bytes`` says otherwise.
* Open files: a reader of a shard set holds each shard's files open (:data:`FILES_PER_OPEN_SHARD`);
  :func:`make_room_for_open_files` raises the process's soft ``RLIMIT_NOFILE`` towards its hard
  limit for them, or refuses with one line naming the set before LMDB fails half-way.
* The ranges of numeric options (:data:`SEED_MAX`, :data:`MAX_RESIZE`, :data:`MAX_RESIZE_PIXELS`,
  :data:`INT31_MAX`, :data:`MAX_TIMEOUT`): the command line checks its options against them, and
  ``datumdb.pipeline.config`` adds them to the params schema, so both refuse the same values.
"""

from __future__ import annotations

import functools
import os
import re
import stat
from typing import BinaryIO

from datumdb.errors import DatabaseError, InputError, UnsafeInputError

__all__ = [
    "DECODED_BYTES_PER_PIXEL",
    "DEFAULT_MAX_EXPORT_BYTES",
    "DEFAULT_MAX_INPUT_BYTES",
    "FILES_PER_OPEN_SHARD",
    "INT31_MAX",
    "MAX_IMAGE_PIXELS",
    "MAX_INPUT_BYTES_ENV",
    "MAX_JPEG_SCANS",
    "MAX_MANIFEST_BYTES",
    "MAX_MAP_SIZE",
    "MAX_RESIZE",
    "MAX_RESIZE_PIXELS",
    "MAX_TIMEOUT",
    "SEED_MAX",
    "check_regular_file",
    "configure_opencv",
    "make_room_for_open_files",
    "max_decoded_bytes",
    "max_image_pixels",
    "max_input_bytes",
    "open_regular_file",
    "read_regular_file",
]

DEFAULT_MAX_INPUT_BYTES = 2 << 30
MAX_INPUT_BYTES_ENV = "DATUMDB_MAX_INPUT_BYTES"
MAX_MANIFEST_BYTES = 64 << 20
MAX_MAP_SIZE = 1 << 44  # LMDB map, bytes (16 TiB): a runaway record fails instead of exhausting address space
MAX_IMAGE_PIXELS = 1 << 27
DECODED_BYTES_PER_PIXEL = 4
MAX_JPEG_SCANS = 100
DEFAULT_DECODE_TIMEOUT = 60.0
"""Seconds one image may take to decode (``convert-imageset --decode-timeout``, the pipeline's
``dataset.imageset.decode_timeout``): a broken file can hang a decoder, and a photo decodes in
milliseconds, so a minute only ever stops a stuck decode."""
DEFAULT_MAX_EXPORT_BYTES = 4 << 30

# Ranges of numeric options, shared by the command line and params.yaml (datumdb.pipeline.config)
SEED_MAX = 2**32 - 1  # numpy's legacy seeds; default_rng takes these too
MAX_RESIZE = 65535  # per side (OpenCV's JPEG encoder stops at 65500; PNG and raw at 2**31)
MAX_RESIZE_PIXELS = 1 << 26  # height * width of a resized image: 8192 x 8192, 192 MiB in colour
INT31_MAX = 2**31 - 1  # counts, labels, batch sizes: the int32 of Caffe's Datum and LMDB's batches
MAX_TIMEOUT = 1e6  # seconds (11.5 days): beyond it a time limit is a typo

FILES_PER_OPEN_SHARD = 2  # an open DatumReader: LMDB's descriptor of data.mdb and the dup its offset map keeps
_SPARE_FILES = 64  # beyond what is counted: logs, pipes, the files a step opens besides


def make_room_for_open_files(count: int, what: str) -> None:
    """Make sure this process may open ``count`` more files, or refuse in one clear line.

    A shard set of 10^4 shards needs 2 x 10^4 descriptors, and the usual soft limit is 1024
    (the hard one is often 2^19 or more): the soft limit is raised as far as needed, which any
    process may do up to its hard limit. Past the hard limit, LMDB would fail on some shard in
    the middle of a read ("Too many open files"); the error here says why and what to change.
    """
    try:
        import resource
    except ImportError:  # not a Unix: nothing to raise
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:  # no /proc: count nothing in use beyond the spare ones
        in_use = 0
    needed = in_use + count + _SPARE_FILES
    if soft == resource.RLIM_INFINITY or needed <= soft:
        return
    if hard == resource.RLIM_INFINITY or needed <= hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
            return
        except (OSError, ValueError):  # a kernel cap below the hard limit (fs.nr_open)
            pass
    raise DatabaseError(
        f"{what}: reading it needs {needed} open files and this process may open {soft} (at most {hard}); "
        "raise the limit (ulimit -n) or build larger shards (build.shard_size)"
    )


def available_memory() -> int | None:
    """Bytes the kernel says new work can use without swapping (``MemAvailable``, which counts
    the page cache it can drop); None where /proc/meminfo does not say (not Linux)."""
    try:
        with open("/proc/meminfo", "rb") as handle:
            for line in handle:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def configure_opencv() -> None:
    """Set OpenCV's pixel bound unless the user did; :mod:`datumdb.codec` calls it before ``import cv2``."""
    os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_IMAGE_PIXELS))


@functools.cache
def max_image_pixels() -> int:
    """The pixel bound OpenCV applies: ``$OPENCV_IO_MAX_IMAGE_PIXELS`` as OpenCV parses it (digits,
    optionally followed by KB or MB), read once as OpenCV reads it once; :data:`MAX_IMAGE_PIXELS`
    if unset or unreadable."""
    text = os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", "").strip()
    found = re.fullmatch(r"([0-9]{1,19})(KB|Kb|kb|MB|Mb|mb)?", text)
    if found is None:
        return MAX_IMAGE_PIXELS
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20}[(found.group(2) or "")[:1].lower()]
    return int(found.group(1)) * scale


def max_decoded_bytes() -> int:
    """The bytes one encoded image may cost to decode: :data:`DECODED_BYTES_PER_PIXEL` x the pixel bound."""
    return DECODED_BYTES_PER_PIXEL * max_image_pixels()


def max_input_bytes() -> int:
    """The size bound of whole-file reads: ``$DATUMDB_MAX_INPUT_BYTES`` or 2 GiB."""
    text = os.environ.get(MAX_INPUT_BYTES_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_INPUT_BYTES
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise InputError(f"${MAX_INPUT_BYTES_ENV} must be a positive number of bytes, got {text!r}")
    return value


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _check(path: str | os.PathLike[str], what: str, info: os.stat_result, limit: int | None) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeInputError(f"{os.fspath(path)}: {what} is {_kind(info.st_mode)}, not a regular file")
    if limit is not None and info.st_size > limit:
        raise UnsafeInputError(f"{os.fspath(path)}: {what} is {info.st_size} bytes, over the bound of {limit} bytes")


def check_regular_file(path: str | os.PathLike[str], what: str, limit: int | None = None) -> os.stat_result:
    """``os.stat`` ``path`` (following symlinks) and refuse anything but a regular file within ``limit``.

    Checked before anything opens the file: opening a device can have side effects (a tape
    rewinds) and opening a FIFO blocks until a writer appears. Raises ``FileNotFoundError`` (or
    another ``OSError``) as ``os.stat`` does, :class:`UnsafeInputError` for the rest.
    """
    info = os.stat(path)
    _check(path, what, info, limit)
    return info


def open_regular_file(path: str | os.PathLike[str], what: str, limit: int | None = None) -> BinaryIO:
    """Open a regular file for binary reading, refusing FIFOs, devices, sockets and folders.

    ``os.stat`` first (see :func:`check_regular_file`); then the open uses ``O_NONBLOCK`` so a
    FIFO swapped in after the stat cannot block it, and ``fstat`` of the opened descriptor must
    show the same regular file: what is read is what was checked.
    """
    before = check_regular_file(path, what, limit)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        after = os.fstat(fd)
        _check(path, what, after, limit)
        if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
            raise UnsafeInputError(f"{os.fspath(path)}: {what} was replaced while it was being opened")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_file(path: str | os.PathLike[str], what: str, limit: int | None = None) -> bytes:
    """All bytes of a regular file of at most ``limit`` bytes (default :func:`max_input_bytes`).

    The read asks for the file's size plus one byte, never for the bound: ``read(n)`` allocates
    ``n`` bytes up front, and 2 GiB per image would be a lot. A file that grew after the size
    check (the extra byte arrived) is refused rather than read half-old, half-new.
    """
    limit = max_input_bytes() if limit is None else limit
    with open_regular_file(path, what, limit) as handle:
        size = os.fstat(handle.fileno()).st_size  # <= limit: open_regular_file checked it
        data = handle.read(size + 1)
    if len(data) > size:
        raise UnsafeInputError(f"{os.fspath(path)}: {what} grew while being read (it was {size} bytes)")
    return data
