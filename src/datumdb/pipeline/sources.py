"""The pipeline's dataset sources: synthetic data, NumPy arrays, CIFAR-10, MNIST, image lists.

:func:`open_source` turns the ``dataset`` section of the params into a :class:`Source`: the
sample count, the (C, H, W) shape, the channel order, ``read(start, stop)`` of one range (so each
shard job reads only its part of the input), and ``labels()`` of all samples without decoding a
pixel (what verify needs for the label histogram). An imageset source also has its
:class:`ImageFiles`: image files are serialized one by one (sizes may vary, the original bytes
may be stored), never stacked. Everything is read from local files under
``dataset.input_dir``; nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datumdb.codec import hwc_to_chw
from datumdb.errors import InputError
from datumdb.imageset import (
    ImagesetOptions,
    ListEntry,
    entry_key,
    load_image,
    ordered_entries,
    read_class_folders,
    read_list_file,
    resolve_file,
)
from datumdb.limits import open_regular_file, read_regular_file
from datumdb.pipeline.config import SOURCES, DatasetConfig
from datumdb.sources import check_image_chunk, iter_array_samples, load_labels, load_npy

__all__ = [
    "SOURCES",
    "ImageFiles",
    "LazyPaths",
    "Source",
    "imageset_options",
    "listed_entries",
    "listed_images",
    "open_source",
    "read_cifar10",
    "read_idx",
    "read_mnist",
    "resolve_entries",
]

CIFAR10_RECORD = 1 + 3 * 32 * 32  # one label byte, then 32x32 R, G and B planes


@dataclass(frozen=True)
class Source:
    """A dataset the pipeline can cut into shards.

    ``read(start, stop)`` -> images ``(n, C, H, W)`` (uint8, or float32 for float arrays) and
    int64 labels ``(n,)``; ``labels()`` -> all labels, int64 ``(count,)``.
    """

    name: str
    count: int
    shape: tuple[int, int, int] | None  # None: the samples' sizes vary (encoded image files)
    channel_order: str
    read: Callable[[int, int], tuple[np.ndarray, np.ndarray]]
    labels: Callable[[], np.ndarray]
    sample: Callable[[int], np.ndarray] | None = None  # one (C, H, W) sample, whatever its size
    files: ImageFiles | None = None  # an imageset's files: keys, serialization, class names

    def load(self, index: int) -> np.ndarray:
        """Sample ``index`` as (C, H, W)."""
        if self.sample is not None:
            return self.sample(index)
        return self.read(index, index + 1)[0][0]


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
            handle = open_regular_file(path, "CIFAR-10 batch file")
        except FileNotFoundError:
            raise InputError(f"{path}: CIFAR-10 batch file not found") from None
        with handle:
            size = os.fstat(handle.fileno()).st_size
            if size == 0 or size % CIFAR10_RECORD:
                raise InputError(
                    f"{path}: {size} bytes is not a whole number of {CIFAR10_RECORD}-byte CIFAR-10 records"
                )
            records = np.memmap(handle, dtype=np.uint8, mode="r").reshape(-1, CIFAR10_RECORD)
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
        handle = open_regular_file(path, "idx file")
    except FileNotFoundError:
        raise InputError(f"{path}: idx file not found") from None
    with handle:
        head = handle.read(4)
        if len(head) != 4 or head[:2] != b"\0\0" or head[2] not in _IDX_TYPES or not 1 <= head[3] <= 4:
            raise InputError(f"{path}: not an idx file (magic {head.hex()})")
        dims = np.frombuffer(handle.read(4 * head[3]), dtype=">u4")
        if len(dims) != head[3]:
            raise InputError(f"{path}: truncated idx header")
        dtype = np.dtype(_IDX_TYPES[head[2]])
        offset = 4 + 4 * head[3]
        expected = offset + int(np.prod(dims.astype(np.int64))) * dtype.itemsize
        size = os.fstat(handle.fileno()).st_size
        if size != expected:
            raise InputError(f"{path}: {size} bytes, but its header {list(dims)} needs {expected}")
        return np.memmap(handle, dtype=dtype, mode="r", offset=offset, shape=tuple(int(d) for d in dims))


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


def _array_source(name: str, channel_order: str, images: object, labels: np.ndarray, where: str) -> Source:
    if len(images) == 0:  # type: ignore[arg-type]
        raise InputError(f"{where}: no samples")
    shape = tuple(int(d) for d in images.shape[1:4])  # type: ignore[attr-defined]

    def read(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return np.ascontiguousarray(images[start:stop]), np.asarray(labels[start:stop], dtype=np.int64)  # type: ignore[index]

    return Source(name, len(images), shape, channel_order, read, lambda: np.asarray(labels, dtype=np.int64))  # type: ignore[arg-type]


def _arrays(dataset: DatasetConfig) -> Source:
    options = dataset.arrays
    folder = Path(dataset.input_dir)
    images_path, labels_path = folder / options.images, folder / options.labels
    layout = options.layout
    count, shape, _ = iter_array_samples(images_path, layout=layout, bgr_from_rgb=options.bgr_from_rgb)  # validates
    label_array = load_labels(labels_path, count)  # checks there is one label per image
    data = load_npy(images_path, "images")
    if data.ndim == 3:
        data = data[:, np.newaxis]
    elif layout == "hwc":
        data = data.transpose(0, 3, 1, 2)
    if options.bgr_from_rgb:
        data = data[:, ::-1]
    if data.dtype != np.uint8:  # floats become float_data Datums; check them as convert-arrays does
        data = _FloatView(data, images_path)  # type: ignore[assignment]
    order = "gray" if shape[0] == 1 else ("BGR" if options.bgr_from_rgb else "as given")
    return _array_source("arrays", order, data, label_array, str(images_path))


class _FloatView:
    """Non-uint8 images: checked as convert-arrays checks them (finite, integers float32 can hold), then float32."""

    def __init__(self, data: np.ndarray, path: Path) -> None:
        self.data, self.path, self.shape = data, path, data.shape

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: slice) -> np.ndarray:
        chunk = np.asarray(self.data[index])
        check_image_chunk(self.path, chunk, index.start or 0)
        with np.errstate(over="ignore"):  # float64 beyond float32 becomes inf: refused just below
            chunk = chunk.astype(np.float32)
        if not np.isfinite(chunk).all():
            bad = int(np.argmin(np.isfinite(chunk.reshape(len(chunk), -1)).all(axis=1)))
            raise InputError(f"{self.path}: image {(index.start or 0) + bad} is beyond float32's range")
        return chunk


@dataclass(frozen=True)
class ImageFiles:
    """The files behind an imageset source, in sample order (the list after the seeded shuffle).

    What the pipeline needs beyond pixels: each sample's Caffe key (``%08d_<path as listed>``,
    numbered within its split), its file, how to serialize it in the chosen encoding (original
    bytes, re-encoded, or raw pixels; Caffe's convert_imageset rules, see :mod:`datumdb.imageset`),
    and the class names of a folder-per-class layout.
    """

    entries: list[ListEntry]
    paths: Sequence[str]  # (LazyPaths: resolved when read)
    options: ImagesetOptions
    where: Path  # the list file, or ROOT for class folders: what messages name
    classes: list[str] | None
    on_error: str
    decode_timeout: float

    def key(self, index: int, position: int) -> bytes:
        """Caffe's key of sample ``index`` at ``position`` within its split."""
        return entry_key(position, self.entries[index], self.where)

    def describe(self, index: int) -> dict[str, Any]:
        """What a report says of a sample: its path as listed and its list line (or listing position)."""
        entry = self.entries[index]
        return {"path": entry.path, "line": entry.line}

    def file_bytes(self, index: int) -> bytes:
        return read_regular_file(self.paths[index], "image")


def imageset_options(dataset: DatasetConfig, seed: int, encoding: str) -> ImagesetOptions:
    """convert_imageset's flags for the params: ``original`` is Caffe's ``--encoded`` (type from the extension)."""
    options = dataset.imageset
    return ImagesetOptions(
        gray=options.gray,
        shuffle=options.shuffle,
        seed=seed,
        resize_height=options.resize_height,
        resize_width=options.resize_width,
        encoded=encoding != "none",
        encode_type=encoding if encoding in ("png", "jpg") else "",
    )


def listed_entries(dataset: DatasetConfig) -> tuple[list[ListEntry], Path, list[str] | None]:
    """An imageset's entries as listed (no shuffle), what messages name, and the class names."""
    options = dataset.imageset
    folder = Path(dataset.input_dir)
    if options.layout == "folders":
        root_path = folder / options.root
        listed, classes = read_class_folders(root_path)
        return listed, root_path, classes
    where = folder / options.list_file
    return read_list_file(where), where, None


def resolve_entries(dataset: DatasetConfig, entries: Sequence[ListEntry], where: Path) -> list[str]:
    """The files of ``entries``, resolved and checked as the build resolves them (strings: a
    ``Path`` for each of a million photos would cost more than checking them)."""
    root_path = Path(dataset.input_dir) / dataset.imageset.root
    real_root = os.path.realpath(root_path)
    folders: dict[str, str] = {}
    return [resolve_file(root_path, entry, where, real_root=real_root, folders=folders) for entry in entries]


class LazyPaths(Sequence[str]):
    """The files of ``entries``, each resolved and checked (as :func:`resolve_entries` does) when
    first asked for: a step that reads a sample of a million listed files resolves the sample."""

    def __init__(self, dataset: DatasetConfig, entries: Sequence[ListEntry], where: Path) -> None:
        self._root = Path(dataset.input_dir) / dataset.imageset.root
        self._real_root = os.path.realpath(self._root)
        self._entries, self._where = entries, where
        self._resolved: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = range(len(self))[index]  # (negative indices; IndexError past the end)
        if index not in self._resolved:
            entry = self._entries[index]
            self._resolved[index] = resolve_file(self._root, entry, self._where, real_root=self._real_root)
        return self._resolved[index]


def listed_images(
    dataset: DatasetConfig, *, lazy: bool = False
) -> tuple[list[ListEntry], Sequence[str], Path, list[str] | None]:
    """An imageset's entries as listed, their files, what messages name, and the class names.

    ``lazy``: the files are resolved when first read (:class:`LazyPaths`), not all now."""
    entries, where, classes = listed_entries(dataset)
    paths = LazyPaths(dataset, entries, where) if lazy else resolve_entries(dataset, entries, where)
    return entries, paths, where, classes


def _imageset(dataset: DatasetConfig, seed: int, encoding: str) -> Source:
    options = dataset.imageset
    imageset = imageset_options(dataset, seed, encoding)
    listed, where, classes = listed_entries(dataset)
    entries = ordered_entries(listed, imageset)
    paths = resolve_entries(dataset, entries, where)
    files = ImageFiles(entries, paths, imageset, where, classes, options.on_error, options.decode_timeout)

    def load(index: int) -> np.ndarray:
        image, _ = load_image(paths[index], entries[index], imageset, where)
        return hwc_to_chw(image)

    channels = 1 if options.gray else 3
    shape: tuple[int, int, int] | None
    if options.resizes:
        shape = (channels, options.resize_height, options.resize_width)
    elif encoding == "none":  # raw pixels: every image must have the first one's shape
        first = load(0)
        shape = (int(first.shape[0]), int(first.shape[1]), int(first.shape[2]))
    else:
        shape = None  # encoded without resize: every file keeps its own size

    def read(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Stacked samples: raw pixels of one shape (encoded files are serialized one by one instead)."""
        images = [load(index) for index in range(start, stop)]
        expected = shape or (images[0].shape if images else (channels, 0, 0))
        for offset, image in enumerate(images):
            if image.shape != expected:
                raise InputError(
                    f"{where}:{entries[start + offset].line}: image is {image.shape}, the first is {expected}; "
                    "set dataset.imageset.resize_height and resize_width so all samples have one shape"
                )
        stacked = np.stack(images) if images else np.empty((0, *expected), dtype=np.uint8)
        return stacked, np.array([entries[i].label for i in range(start, stop)], dtype=np.int64)

    def labels() -> np.ndarray:
        return np.array([entry.label for entry in entries], dtype=np.int64)

    return Source("imageset", len(entries), shape, "gray" if options.gray else "BGR", read, labels, load, files)


def _synthetic(dataset: DatasetConfig, seed: int) -> Source:
    from datumdb import synthetic

    shape, classes = dataset.shape, dataset.classes
    synthetic.class_patterns(seed, shape, classes)  # validates shape and classes

    def read(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return synthetic.generate(seed, start, stop, shape, classes)

    def labels() -> np.ndarray:
        return np.array([synthetic.sample_label(seed, i, classes) for i in range(dataset.count)], dtype=np.int64)

    return Source("synthetic", dataset.count, shape, "gray" if shape[0] == 1 else "BGR", read, labels)


def open_source(dataset: DatasetConfig, seed: int, encoding: str = "none") -> Source:
    """The source the params name; input paths are relative to ``dataset.input_dir``.

    ``encoding`` (the params' ``encoding``) matters to an imageset only: without a resize, raw
    pixels need one common shape, encoded files keep their own.

    Input problems (missing file, wrong format, bad option) raise :class:`InputError` naming
    the file or parameter, before anything is written.
    """
    folder = Path(dataset.input_dir)
    if dataset.source == "synthetic":
        return _synthetic(dataset, seed)
    if dataset.source == "arrays":
        return _arrays(dataset)
    if dataset.source == "imageset":
        return _imageset(dataset, seed, encoding)
    if dataset.source == "cifar10":
        images, labels = read_cifar10([folder / b for b in dataset.cifar10.batches])
        return _array_source("cifar10", "BGR", images, labels, "cifar10")
    if dataset.source == "mnist":
        images_path = folder / dataset.mnist.images
        images, labels = read_mnist(images_path, folder / dataset.mnist.labels)
        return _array_source("mnist", "gray", images, labels, str(images_path))
    raise InputError(f"dataset.source must be one of {', '.join(SOURCES)}; got {dataset.source!r}")
