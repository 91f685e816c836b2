"""NumPy arrays into a database: ``datumdb convert-arrays``, streaming in bounded memory.

(The pipeline's sources, which also read CIFAR-10, MNIST and image lists, are in
:mod:`datumdb.pipeline.sources`.)

``convert-arrays`` must handle an images file larger than memory. A memory map reads nothing
up front, but every page touched stays resident (and counted in RSS) until the kernel needs it
back; we walk the file in chunks and ``madvise(MADV_DONTNEED)`` each chunk once its records are
written, so resident memory stays at about one chunk whatever the file size. That holds for any
layout ``np.save`` writes: a Fortran-order file keeps each pixel of all samples together, so a
chunk of samples is gathered column block by column block, each block dropped once copied (see
:func:`_fortran_chunk`); a non-native byte order is converted sample by sample by the encoder.

An ``.npy`` must be a regular file (a FIFO or a device would hang or never end), and its header is
parsed by numpy's own reader from the very file descriptor that was checked.

Ambiguous input is refused rather than guessed: with the default layout an (N, 32, 32, 3) array
would silently become 32-channel images, so an array whose last axis looks like channels (1, 3
or 4) while axis 1 does not needs an explicit ``layout``; and integer pixels beyond 2**24, which
float32 ``float_data`` cannot hold exactly, are refused naming the image.
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np

from datumdb._progress import counter as progress_counter
from datumdb.codec import INT32_MAX, INT32_MIN, nhwc_to_nchw
from datumdb.errors import InputError
from datumdb.keys import key_width
from datumdb.limits import open_regular_file
from datumdb.writer import DEFAULT_BATCH_SIZE, DatabaseWriter, Encoding

__all__ = [
    "Layout",
    "check_image_chunk",
    "convert_arrays",
    "iter_array_chunks",
    "iter_array_samples",
    "load_labels",
    "load_npy",
    "resolve_layout",
]

Layout = Literal["chw", "hwc"]
CHUNK_BYTES = 32 << 20
FLOAT32_EXACT_INTEGERS = 1 << 24  # every integer of magnitude <= 2**24 is exactly a float32
_CHANNEL_COUNTS = (1, 3, 4)


def load_npy(path: Path, what: str) -> np.ndarray:
    """Memory-map a .npy (any order, any byte order) after checking it is a regular file.

    numpy's header reader runs on the checked descriptor and ``np.memmap`` maps that same
    descriptor, so the file mapped is the file checked (``np.load(mmap_mode=...)`` would reopen
    the path). Object arrays and truncated files are refused.
    """
    try:
        handle = open_regular_file(path, f"{what} file")
    except FileNotFoundError:
        raise InputError(f"{path}: {what} file not found") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot open the {what} file ({exc.strerror or exc})") from None
    with handle:
        try:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported")
        except Exception as exc:  # numpy parses a hostile header with ast/tokenize: any error is bad input
            raise InputError(f"{path}: not a readable .npy {what} file ({type(exc).__name__}: {exc})") from None
        if dtype.hasobject:
            raise InputError(f"{path}: the {what} array holds Python objects; datumdb reads only numbers")
        offset = handle.tell()
        needed = offset + math.prod(shape) * dtype.itemsize  # exact: a hostile shape cannot wrap around
        size = os.fstat(handle.fileno()).st_size
        if size < needed:
            raise InputError(f"{path}: {size} bytes, but its header ({dtype} {shape}) needs {needed}")
        if needed == offset:  # nothing to map (mmap refuses zero bytes)
            try:
                return np.empty(shape, dtype=dtype, order="F" if fortran else "C")
            except ValueError as exc:  # (0, 2**62): empty, yet more elements per row than numpy allows
                raise InputError(
                    f"{path}: the {what} array's shape {shape} is not one numpy can hold ({exc})"
                ) from None
        return np.memmap(handle, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def resolve_layout(shape: tuple[int, ...], layout: Layout | None, path: str | os.PathLike[str]) -> Layout:
    """The axis order of a 4-D images array: ``layout`` when given, else "chw" unless that looks wrong.

    Given no layout, an (N, A, B, C) array with C in (1, 3, 4) and A not is refused: as CHW it
    would be A-channel images of B x C pixels (an (N, 32, 32, 3) array: 32 channels of 32 x 3),
    which verify would happily accept. Any explicit layout is used as given.
    """
    if layout is not None:
        if layout not in ("chw", "hwc"):
            raise InputError(f"layout must be 'chw' or 'hwc', got {layout!r}")
        return layout
    if len(shape) == 4 and shape[3] in _CHANNEL_COUNTS and shape[1] not in _CHANNEL_COUNTS:
        raise InputError(
            f"{path}: images of shape {tuple(shape)} look like (N, H, W, C) with {shape[3]} channel(s), not "
            f"(N, C, H, W) with {shape[1]}; pass --layout hwc (or --layout chw if {shape[1]} channels is right)"
        )
    return "chw"


def load_labels(path: str | os.PathLike[str], count: int | None = None) -> np.ndarray:
    """Read a 1-D integer label array and check every label fits Caffe's int32 field."""
    path = Path(path)
    labels = load_npy(path, "labels")
    if labels.ndim != 1:
        raise InputError(f"{path}: labels must be 1-D, got shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise InputError(f"{path}: labels must be integers, got dtype {labels.dtype}")
    if count is not None and len(labels) != count:
        raise InputError(f"{path}: {len(labels)} labels for {count} images")
    if len(labels):
        low, high = int(labels.min()), int(labels.max())
        for bound in (low, high):
            if not INT32_MIN <= bound <= INT32_MAX:
                index = int(np.argmax(labels == bound))
                raise InputError(f"{path}: label {bound} at index {index} is outside int32")
    return np.asarray(labels, dtype=np.int64)


def iter_array_samples(
    images_path: str | os.PathLike[str], *, layout: Layout | None = None, bgr_from_rgb: bool = False
) -> tuple[int, tuple[int, int, int], Iterator[np.ndarray]]:
    """Open an images .npy and return (count, CHW shape, iterator of CHW samples).

    Accepts (N, H, W) gray images or (N, C, H, W) / (N, H, W, C) by ``layout`` (None: "chw"
    unless ambiguous, see :func:`resolve_layout`). ``bgr_from_rgb`` reverses the channel axis of
    3-channel images, since Caffe expects BGR.
    """
    count, shape, chunks = iter_array_chunks(images_path, layout=layout, bgr_from_rgb=bgr_from_rgb)
    return count, shape, (sample for chunk in chunks for sample in chunk)


def iter_array_chunks(
    images_path: str | os.PathLike[str], *, layout: Layout | None = None, bgr_from_rgb: bool = False
) -> tuple[int, tuple[int, int, int], Iterator[np.ndarray]]:
    """:func:`iter_array_samples` a chunk at a time: (count, CHW shape, iterator of (n, C, H, W) chunks).

    Each chunk is a view of about :data:`CHUNK_BYTES` of the file, checked by
    :func:`check_image_chunk`; its pages are dropped from memory when the next one is asked for.
    """
    path = Path(images_path)
    images = load_npy(path, "images")
    if images.ndim not in (3, 4):
        raise InputError(f"{path}: images must be (N, H, W) or (N, C, H, W)/(N, H, W, C), got shape {images.shape}")
    if images.dtype.kind not in "uif" or images.dtype == np.bool_:
        raise InputError(f"{path}: images must be uint8 or a real number type, got dtype {images.dtype}")
    layout = resolve_layout(images.shape, layout, path)
    if images.ndim == 3:
        sample_shape = (1, *images.shape[1:])
    elif layout == "hwc":
        sample_shape = (images.shape[3], images.shape[1], images.shape[2])
    else:
        sample_shape = tuple(images.shape[1:])
    if bgr_from_rgb and sample_shape[0] != 3:
        raise InputError(f"{path}: --bgr-from-rgb needs 3-channel images, these have {sample_shape[0]}")
    if 0 in sample_shape:
        raise InputError(f"{path}: images have an empty dimension: {images.shape}")
    return len(images), sample_shape, _nchw_chunks(path, images, layout, bgr_from_rgb)


def _nchw_chunks(path: Path, images: np.ndarray, layout: Layout, bgr_from_rgb: bool) -> Iterator[np.ndarray]:
    for start, chunk in _chunks(images):
        check_image_chunk(path, chunk, start)
        if chunk.ndim == 3:
            chunk = chunk[:, np.newaxis]
        elif layout == "hwc":
            chunk = nhwc_to_nchw(chunk)
        if bgr_from_rgb:
            chunk = chunk[:, ::-1]
        yield chunk


def check_image_chunk(path: Path, chunk: np.ndarray, start: int) -> None:
    """Refuse what would not be stored faithfully: NaN/infinity, integers float32 cannot hold."""
    if chunk.dtype.kind == "f" and not np.isfinite(chunk).all():
        bad_rows = ~np.isfinite(chunk.reshape(len(chunk), -1)).all(axis=1)
        bad = start + int(np.flatnonzero(bad_rows)[0])
        raise InputError(f"{path}: image {bad} contains NaN or infinity")
    if chunk.dtype.kind in "iu" and chunk.dtype.itemsize >= 4:  # int8/16 and uint8/16 always fit
        flat = chunk.reshape(len(chunk), -1)
        too_big = flat > FLOAT32_EXACT_INTEGERS
        if chunk.dtype.kind == "i":
            too_big |= flat < -FLOAT32_EXACT_INTEGERS
        if too_big.any():
            row = int(np.flatnonzero(too_big.any(axis=1))[0])
            position = int(np.flatnonzero(too_big[row])[0])
            where = np.unravel_index(position, chunk.shape[1:])
            raise InputError(
                f"{path}: image {start + row} holds {int(flat[row, position])} at index {tuple(map(int, where))}; "
                f"float32 (Caffe's float_data) holds integers exactly only up to 2**24 = {FLOAT32_EXACT_INTEGERS}"
            )


def _chunks(images: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(start row, rows) of about CHUNK_BYTES each, with the pages read dropped after each chunk."""
    row_bytes = max(1, images[0].nbytes if len(images) else 1)
    rows_per_chunk = max(1, CHUNK_BYTES // row_bytes)
    backing = getattr(images, "_mmap", None)
    fortran = images.ndim > 1 and images.flags.f_contiguous and not images.flags.c_contiguous
    for start in range(0, len(images), rows_per_chunk):
        stop = min(start + rows_per_chunk, len(images))
        if fortran:
            yield start, _fortran_chunk(images, start, stop, backing)
            continue
        chunk = np.asarray(images[start:stop])
        yield start, chunk
        if backing is not None:
            _drop_pages(backing, images, start, len(chunk))


def _fortran_chunk(images: np.ndarray, start: int, stop: int, backing: mmap.mmap | None) -> np.ndarray:
    """Rows ``start:stop`` of a Fortran-order array, gathered in bounded memory.

    In Fortran order the first axis varies fastest: each value position of a sample (a "column")
    holds all N samples in a row of the file, so the rows of a chunk are spread over the whole
    file. They are copied one block of columns (about CHUNK_BYTES of file) at a time, and each
    block's pages are dropped once copied: resident memory is the chunk plus one block, as for a
    C-order file.
    """
    count, per_sample = len(images), int(np.prod(images.shape[1:]))
    columns = images.reshape(count, per_sample, order="F")  # a view: value (i, p) at byte (i + p * N) * itemsize
    out = np.empty((stop - start, per_sample), dtype=images.dtype)
    column_bytes = count * images.dtype.itemsize
    block = max(1, CHUNK_BYTES // column_bytes)
    offset = getattr(images, "offset", 0)
    for first in range(0, per_sample, block):
        last = min(first + block, per_sample)
        out[:, first:last] = columns[start:stop, first:last]
        if backing is not None:
            _drop_range(backing, offset + first * column_bytes, offset + last * column_bytes)
    # out[i] holds sample i's values in Fortran order: view them with the sample's axes back in place
    sample_axes = images.shape[1:]
    return out.reshape(stop - start, *sample_axes[::-1]).transpose(0, *range(len(sample_axes), 0, -1))


def _drop_range(backing: mmap.mmap, begin: int, end: int) -> None:
    """Drop the pages covering bytes [begin, end) of a read-only map (they are re-read if touched again)."""
    page = mmap.PAGESIZE
    begin = (begin // page) * page
    end = min(-(-end // page) * page, len(backing))
    if end > begin and hasattr(backing, "madvise"):
        backing.madvise(mmap.MADV_DONTNEED, begin, end - begin)


def _drop_pages(backing: mmap.mmap, images: np.ndarray, start: int, rows: int) -> None:
    """Tell the kernel we are done with these rows, so they leave our resident set."""
    offset = images.offset if hasattr(images, "offset") else 0
    begin = offset + start * images[0].nbytes
    end = begin + rows * images[0].nbytes
    page = mmap.PAGESIZE
    begin_aligned = (begin // page) * page
    end_aligned = (end // page) * page
    if end_aligned > begin_aligned and hasattr(backing, "madvise"):
        backing.madvise(mmap.MADV_DONTNEED, begin_aligned, end_aligned - begin_aligned)


def convert_arrays(
    images_path: str | os.PathLike[str],
    labels_path: str | os.PathLike[str],
    db_path: str | os.PathLike[str],
    *,
    layout: Layout | None = None,
    bgr_from_rgb: bool = False,
    encoding: Encoding = "none",
    overwrite: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    map_size: int | None = None,
    progress: bool | None = None,
) -> Path:
    """Build ``db_path`` from an images .npy and a labels .npy, streaming with bounded memory.

    ``layout`` None means "chw" unless the array looks like (N, H, W, C) (see :func:`resolve_layout`).
    """
    count, shape, chunks = iter_array_chunks(images_path, layout=layout, bgr_from_rgb=bgr_from_rgb)
    layout = layout or "chw"  # iter_array_chunks refused the ambiguous case
    labels = load_labels(labels_path, count)
    if shape[0] == 1:
        channel_order = "gray"
    else:  # we only know the order when we converted it ourselves
        channel_order = "BGR" if bgr_from_rgb else "as given"
    metadata = {
        "source": "arrays",
        "images": Path(images_path).name,
        "labels": Path(labels_path).name,
        "layout": layout,
        "bgr_from_rgb": bgr_from_rgb,
    }
    options = {} if map_size is None else {"map_size": map_size}
    with (
        DatabaseWriter(
            db_path,
            overwrite=overwrite,
            batch_size=batch_size,
            encoding=encoding,
            channel_order=channel_order,
            key_width=key_width(count),
            metadata=metadata,
            **options,
        ) as writer,
        progress_counter(enabled=progress, total=count, desc="convert-arrays", unit="rec") as bar,
    ):
        start = 0
        for chunk in chunks:  # uint8 raw: framed in bulk; anything else: record by record (add_batch decides)
            writer.add_batch(chunk, labels[start : start + len(chunk)])
            start += len(chunk)
            bar.update(len(chunk))
    return Path(db_path)
