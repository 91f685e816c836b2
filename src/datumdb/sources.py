"""Where samples come from: NumPy arrays, CIFAR-10 batches, MNIST idx files, image lists.

The pipeline (``datumdb generate-shard``) reads any source through :func:`open_source`, which
returns a :class:`Source`: the sample count, the (C, H, W) shape and a ``read(start, stop)`` of
one range, so each shard job reads only its own part of the input. Everything is read from
local files; nothing is downloaded.

``convert-arrays`` must handle an images file larger than memory. ``np.load(mmap_mode="r")``
maps it without reading it, but every page touched stays resident (and counted in RSS) until the
kernel needs it back; we walk the file in chunks and ``madvise(MADV_DONTNEED)`` each chunk once
its records are written, so resident memory stays at about one chunk whatever the file size.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from datumdb._progress import progress as progress_bar
from datumdb.codec import INT32_MAX, INT32_MIN
from datumdb.errors import InputError
from datumdb.writer import DEFAULT_BATCH_SIZE, DatabaseWriter, Encoding

__all__ = [
    "SOURCES",
    "Layout",
    "Source",
    "convert_arrays",
    "iter_array_samples",
    "load_labels",
    "open_source",
    "read_cifar10",
    "read_idx",
    "read_mnist",
]

Layout = Literal["chw", "hwc"]
CHUNK_BYTES = 32 << 20


def _load(path: Path, what: str) -> np.ndarray:
    try:
        with np.errstate(over="ignore"):  # a huge shape in the header: a ValueError, no warning first
            return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{path}: {what} file not found") from None
    except (ValueError, OSError, EOFError, OverflowError) as exc:  # EOFError: an empty header
        raise InputError(f"{path}: not a readable .npy {what} file ({exc or type(exc).__name__})") from None


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


# ------------------------------------------------------------------ pipeline sources

SOURCES = ("synthetic", "arrays", "imageset", "cifar10", "mnist")
CIFAR10_RECORD = 1 + 3 * 32 * 32  # one label byte, then 32x32 R, G and B planes


@dataclass(frozen=True)
class Source:
    """A dataset the pipeline can cut into shards: ``read(start, stop)`` -> (images, labels).

    Images are ``(n, C, H, W)`` (uint8, or float32 for float arrays), labels int64 ``(n,)``.
    """

    name: str
    count: int
    shape: tuple[int, int, int]
    channel_order: str
    read: Callable[[int, int], tuple[np.ndarray, np.ndarray]]


def read_cifar10(paths: Sequence[str | os.PathLike[str]]) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 binary batches as (images (N, 3, 32, 32) uint8 **BGR**, labels (N,) int64).

    Each record is 1 label byte and 3072 bytes of RGB planes (CHW). Images are returned BGR, the
    channel order Caffe's OpenCV-based tools use (Caffe's own convert_cifar_data keeps RGB).
    The arrays are memory-mapped views, so reading a slice touches only that slice.
    """
    if not paths:
        raise InputError("cifar10: no batch files given")
    images, labels = [], []
    for path in map(Path, paths):
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise InputError(f"{path}: CIFAR-10 batch file not found") from None
        if size == 0 or size % CIFAR10_RECORD:
            raise InputError(f"{path}: {size} bytes is not a whole number of {CIFAR10_RECORD}-byte CIFAR-10 records")
        records = np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, CIFAR10_RECORD)
        if int(records[:, 0].max()) > 9:
            bad = int(np.argmax(records[:, 0] > 9))
            raise InputError(f"{path}: record {bad} has label {int(records[bad, 0])}; CIFAR-10 labels are 0..9")
        labels.append(records[:, 0])
        images.append(records[:, 1:].reshape(-1, 3, 32, 32)[:, ::-1])
    image_array = images[0] if len(images) == 1 else np.concatenate(images)
    return image_array, np.concatenate(labels).astype(np.int64)


_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4")}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """An idx file (MNIST's format: big-endian magic 0 0 type ndim, ndim uint32 sizes, data), mapped."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
            if len(head) != 4 or head[:2] != b"\0\0" or head[2] not in _IDX_TYPES or not 1 <= head[3] <= 4:
                raise InputError(f"{path}: not an idx file (magic {head.hex()})")
            dims = np.frombuffer(handle.read(4 * head[3]), dtype=">u4")
    except FileNotFoundError:
        raise InputError(f"{path}: idx file not found") from None
    if len(dims) != head[3]:
        raise InputError(f"{path}: truncated idx header")
    dtype = np.dtype(_IDX_TYPES[head[2]])
    offset = 4 + 4 * head[3]
    expected = offset + int(np.prod(dims.astype(np.int64))) * dtype.itemsize
    if path.stat().st_size != expected:
        raise InputError(f"{path}: {path.stat().st_size} bytes, but its header {list(dims)} needs {expected}")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(int(d) for d in dims))


def read_mnist(
    images_path: str | os.PathLike[str], labels_path: str | os.PathLike[str]
) -> tuple[np.ndarray, np.ndarray]:
    """MNIST idx files as (images (N, 1, H, W) uint8, labels (N,) int64), as convert_mnist_data reads them."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise InputError(f"{images_path}: MNIST images must be a 3-D uint8 idx file, got {images.dtype} {images.shape}")
    if labels.ndim != 1:
        raise InputError(f"{labels_path}: MNIST labels must be a 1-D idx file, got shape {labels.shape}")
    if len(labels) != len(images):
        raise InputError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}")
    return images[:, np.newaxis], np.asarray(labels, dtype=np.int64)


def _array_source(name: str, channel_order: str, images: np.ndarray, labels: np.ndarray, where: str) -> Source:
    if len(images) == 0:
        raise InputError(f"{where}: no samples")
    shape = (int(images.shape[1]), int(images.shape[2]), int(images.shape[3]))

    def read(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return np.ascontiguousarray(images[start:stop]), np.asarray(labels[start:stop], dtype=np.int64)

    return Source(name, len(images), shape, channel_order, read)


def _arrays(input_dir: Path, images: str, labels: str, layout: Layout, bgr_from_rgb: bool) -> Source:
    images_path, labels_path = input_dir / images, input_dir / labels
    count, shape, _ = iter_array_samples(images_path, layout=layout, bgr_from_rgb=bgr_from_rgb)  # validates
    label_array = load_labels(labels_path, count)  # checks there is one label per image
    data = np.load(images_path, mmap_mode="r", allow_pickle=False)
    if data.ndim == 3:
        data = data[:, np.newaxis]
    elif layout == "hwc":
        data = data.transpose(0, 3, 1, 2)
    if bgr_from_rgb:
        data = data[:, ::-1]
    if data.dtype != np.uint8:  # floats become float_data Datums; check them as convert-arrays does
        data = _FloatView(data, images_path)  # type: ignore[assignment]
    order = "gray" if shape[0] == 1 else ("BGR" if bgr_from_rgb else "as given")
    return _array_source("arrays", order, data, label_array, str(images_path))


class _FloatView:
    """Float images: read as float32 and rejected if not finite, naming the sample."""

    def __init__(self, data: np.ndarray, path: Path) -> None:
        self.data, self.path, self.shape = data, path, data.shape

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: slice) -> np.ndarray:
        chunk = np.asarray(self.data[index], dtype=np.float32)
        finite = np.isfinite(chunk.reshape(len(chunk), -1)).all(axis=1)
        if not finite.all():
            raise InputError(f"{self.path}: image {index.start + int(np.argmin(finite))} contains NaN or infinity")
        return chunk


def _imageset(
    input_dir: Path,
    root: str,
    list_file: str,
    *,
    gray: bool,
    shuffle: bool,
    seed: int,
    resize_height: int,
    resize_width: int,
) -> Source:
    from datumdb.imageset import ImagesetOptions, load_image, ordered_entries, read_list_file, resolve_path

    list_path, root_path = input_dir / list_file, input_dir / root
    options = ImagesetOptions(
        gray=gray, shuffle=shuffle, seed=seed, resize_height=resize_height, resize_width=resize_width
    )
    entries = ordered_entries(read_list_file(list_path), options)

    def load(index: int) -> np.ndarray:
        entry = entries[index]
        image, _ = load_image(resolve_path(root_path, entry, list_path), entry, options, list_path)
        return image[np.newaxis] if image.ndim == 2 else image.transpose(2, 0, 1)

    first = load(0)
    shape = (int(first.shape[0]), int(first.shape[1]), int(first.shape[2]))

    def read(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        images = np.empty((stop - start, *shape), dtype=np.uint8)
        for row, index in enumerate(range(start, stop)):
            image = load(index)
            if image.shape != shape:
                raise InputError(
                    f"{list_path}:{entries[index].line}: image is {image.shape}, the first is {shape}; "
                    "set imageset.resize_height and resize_width so all samples have one shape"
                )
            images[row] = image
        labels = np.array([entries[i].label for i in range(start, stop)], dtype=np.int64)
        return images, labels

    return Source("imageset", len(entries), shape, "gray" if gray else "BGR", read)


def open_source(
    source: str,
    input_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    count: int = 0,
    shape: Sequence[int] = (3, 32, 32),
    classes: int = 10,
    arrays: dict[str, object] | None = None,
    imageset: dict[str, object] | None = None,
    cifar10: dict[str, object] | None = None,
    mnist: dict[str, object] | None = None,
) -> Source:
    """Open the pipeline's dataset source by name; input paths are relative to ``input_dir``.

    Input problems (missing file, wrong format, bad option) raise :class:`InputError` naming
    the file or parameter, before anything is written.
    """
    input_dir = Path(input_dir)
    if source == "synthetic":
        from datumdb import synthetic

        chw = tuple(int(d) for d in shape)
        if count < 1:
            raise InputError(f"dataset.count must be >= 1 for the synthetic source, got {count}")
        synthetic.class_patterns(seed, chw, classes)  # validates shape and classes  # type: ignore[arg-type]
        order = "gray" if chw[0] == 1 else "BGR"

        def read(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
            return synthetic.generate(seed, start, stop, chw, classes)  # type: ignore[arg-type]

        return Source("synthetic", count, chw, order, read)  # type: ignore[arg-type]
    if source == "arrays":
        a = arrays or {}
        return _arrays(
            input_dir,
            str(a.get("images", "X.npy")),
            str(a.get("labels", "y.npy")),
            a.get("layout", "chw"),  # type: ignore[arg-type]
            bool(a.get("bgr_from_rgb", False)),
        )
    if source == "imageset":
        o = imageset or {}
        return _imageset(
            input_dir,
            str(o.get("root", "images")),
            str(o.get("list_file", "list.txt")),
            gray=bool(o.get("gray", False)),
            shuffle=bool(o.get("shuffle", False)),
            seed=seed,
            resize_height=int(o.get("resize_height", 0)),  # type: ignore[call-overload]
            resize_width=int(o.get("resize_width", 0)),  # type: ignore[call-overload]
        )
    if source == "cifar10":
        batches = (cifar10 or {}).get("batches") or []
        images, labels = read_cifar10([input_dir / str(b) for b in batches])  # type: ignore[union-attr]
        return _array_source("cifar10", "BGR", images, labels, "cifar10")
    if source == "mnist":
        m = mnist or {}
        images, labels = read_mnist(input_dir / str(m.get("images")), input_dir / str(m.get("labels")))
        return _array_source("mnist", "gray", images, labels, str(input_dir / str(m.get("images"))))
    raise InputError(f"dataset.source must be one of {', '.join(SOURCES)}; got {source!r}")
