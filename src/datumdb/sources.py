"""NumPy arrays into a database: ``datumdb convert-arrays``, streaming in bounded memory.

(The pipeline's sources, which also read CIFAR-10, MNIST and image lists, are in
:mod:`datumdb.pipeline.sources`.)

``convert-arrays`` must handle an images file larger than memory. ``np.load(mmap_mode="r")``
maps it without reading it, but every page touched stays resident (and counted in RSS) until the
kernel needs it back; we walk the file in chunks and ``madvise(MADV_DONTNEED)`` each chunk once
its records are written, so resident memory stays at about one chunk whatever the file size.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np

from datumdb._progress import progress as progress_bar
from datumdb.codec import INT32_MAX, INT32_MIN
from datumdb.errors import InputError
from datumdb.writer import DEFAULT_BATCH_SIZE, DatabaseWriter, Encoding

__all__ = ["Layout", "convert_arrays", "iter_array_samples", "load_labels"]

Layout = Literal["chw", "hwc"]
CHUNK_BYTES = 32 << 20


def _load(path: Path, what: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{path}: {what} file not found") from None
    except (ValueError, OSError) as exc:
        raise InputError(f"{path}: not a readable .npy {what} file ({exc})") from None


def load_labels(path: str | os.PathLike[str], count: int | None = None) -> np.ndarray:
    """Read a 1-D integer label array and check every label fits Caffe's int32 field."""
    path = Path(path)
    labels = _load(path, "labels")
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
    images_path: str | os.PathLike[str], *, layout: Layout = "chw", bgr_from_rgb: bool = False
) -> tuple[int, tuple[int, int, int], Iterator[np.ndarray]]:
    """Open an images .npy and return (count, CHW shape, iterator of CHW samples).

    Accepts (N, H, W) gray images or (N, C, H, W) / (N, H, W, C) by ``layout``. ``bgr_from_rgb``
    reverses the channel axis of 3-channel images, since Caffe expects BGR.
    """
    path = Path(images_path)
    images = _load(path, "images")
    if images.ndim not in (3, 4):
        raise InputError(f"{path}: images must be (N, H, W) or (N, C, H, W)/(N, H, W, C), got shape {images.shape}")
    if images.dtype.kind not in "uif" or images.dtype == np.bool_:
        raise InputError(f"{path}: images must be uint8 or a real number type, got dtype {images.dtype}")
    if images.ndim == 3:
        sample_shape = (1, *images.shape[1:])
    elif layout == "hwc":
        sample_shape = (images.shape[3], images.shape[1], images.shape[2])
    elif layout == "chw":
        sample_shape = tuple(images.shape[1:])
    else:
        raise InputError(f"layout must be 'chw' or 'hwc', got {layout!r}")
    if bgr_from_rgb and sample_shape[0] != 3:
        raise InputError(f"{path}: --bgr-from-rgb needs 3-channel images, these have {sample_shape[0]}")
    if 0 in sample_shape:
        raise InputError(f"{path}: images have an empty dimension: {images.shape}")
    return len(images), sample_shape, _samples(path, images, layout, bgr_from_rgb)


def _samples(path: Path, images: np.ndarray, layout: Layout, bgr_from_rgb: bool) -> Iterator[np.ndarray]:
    row_bytes = max(1, images[0].nbytes if len(images) else 1)
    rows_per_chunk = max(1, CHUNK_BYTES // row_bytes)
    backing = getattr(images, "_mmap", None)
    for start in range(0, len(images), rows_per_chunk):
        chunk = np.asarray(images[start : start + rows_per_chunk])
        if chunk.dtype.kind == "f" and not np.isfinite(chunk).all():
            bad_rows = ~np.isfinite(chunk.reshape(len(chunk), -1)).all(axis=1)
            bad = start + int(np.flatnonzero(bad_rows)[0])
            raise InputError(f"{path}: image {bad} contains NaN or infinity")
        for sample in chunk:
            if sample.ndim == 2:
                sample = sample[np.newaxis]
            elif layout == "hwc":
                sample = sample.transpose(2, 0, 1)
            if bgr_from_rgb:
                sample = sample[::-1]
            yield sample
        if backing is not None:
            _drop_pages(backing, images, start, len(chunk))


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
    layout: Layout = "chw",
    bgr_from_rgb: bool = False,
    encoding: Encoding = "none",
    overwrite: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    map_size: int | None = None,
    progress: bool | None = None,
) -> Path:
    """Build ``db_path`` from an images .npy and a labels .npy, streaming with bounded memory."""
    count, shape, samples = iter_array_samples(images_path, layout=layout, bgr_from_rgb=bgr_from_rgb)
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
    with DatabaseWriter(
        db_path,
        overwrite=overwrite,
        batch_size=batch_size,
        encoding=encoding,
        channel_order=channel_order,
        key_width=max(8, len(str(max(count - 1, 0)))),
        metadata=metadata,
        **options,
    ) as writer:
        for sample, label in progress_bar(
            zip(samples, labels.tolist(), strict=True), enabled=progress, total=count, desc="convert-arrays", unit="rec"
        ):
            writer.add(sample, label)
    return Path(db_path)
