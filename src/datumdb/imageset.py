"""``convert_imageset`` parity: images + a list file -> the LMDB Caffe's own tool would write.

Caffe semantics reproduced exactly (checked against the real tool's output in
tests/fixtures/caffe):

* a list line is split at its **last** space into path and label, so paths may contain spaces;
* keys are ``%08d_<path as written>`` with the line's index after shuffling;
* images are read with OpenCV (BGR, or ``IMREAD_GRAYSCALE`` for ``gray``) and resized with
  ``cv::resize`` bilinear to (width, height) only when **both** sizes are > 0;
* ``encoded``: the original file bytes when nothing needs changing (no resize, extension
  matches the encoding), otherwise ``cv::imencode`` of the loaded image; the Datum then leaves
  channels/height/width unset. An ``encode_type`` implies ``encoded``, as in Caffe.

Where Caffe is lax we are strict, because a silent skip is a dataset bug found weeks later: an
unreadable image, a bad label or a path escaping ROOT is an error naming the list file and line
(Caffe logs and skips, or parses "cat" as label 0). Skipping unreadable images, Caffe's way, is
``on_error="skip"``, and then every skipped image is listed in the manifest. Caffe's ``--shuffle`` is unseeded; ours
takes ``seed`` (default 0) so a shuffled database is reproducible.

Inputs are files, and bounded (:mod:`datumdb.limits`): the list file and every image must be
regular files of at most ``max_input_bytes()`` (2 GiB), so a FIFO in the list cannot hang the
build nor a link to ``/dev/zero`` exhaust memory; symlinks are resolved before the ROOT check, so
a link inside ROOT cannot lead outside it unless ``allow_outside_root``; and no OpenCV failure
(a forged header over the pixel bound, say) escapes as anything but an :class:`InputError`.

Decoding is the cost (a JPEG photo takes milliseconds, writing its record microseconds), so it
runs in ``workers`` processes (all usable cores by default; :mod:`datumdb.decodepool`), with
an optional time bound per image. Images can also come as ``root/<class>/<image>`` folders
(:func:`read_class_folders`, torchvision's ``ImageFolder`` convention).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from datumdb._progress import progress as progress_bar
from datumdb.codec import (
    INT32_MAX,
    INT32_MIN,
    encode_image,
    encode_image_into,
    encode_opencv_image,
    encode_opencv_image_into,
    hwc_to_chw,
    imdecode,
    imencode,
    resize,
)
from datumdb.decodepool import Failure, Placed, ordered_results, shared_ring_bytes, usable_cores
from datumdb.errors import DatumError, InputError, UnsafeInputError
from datumdb.keys import MAX_KEY_BYTES, imageset_key
from datumdb.limits import read_regular_file
from datumdb.writer import DEFAULT_BATCH_SIZE, DEFAULT_MAP_SIZE, DatabaseWriter, sniff_encoding

__all__ = [
    "ImagesetOptions",
    "ListEntry",
    "convert_imageset",
    "entry_key",
    "keeps_file_bytes",
    "load_image",
    "ordered_entries",
    "read_list_file",
    "resolve_file",
    "usable_cores",
]


_LABEL = re.compile(r"[+-]?[0-9]+", re.ASCII)

Shape = tuple[int, int, int]
ImagePath = str | os.PathLike[str]  # a resolved image file: a string where it is one of a long list


@dataclass(frozen=True)
class ListEntry:
    """One line of a list file: the path as written, its label, and the 1-based line number."""

    path: str
    label: int
    line: int


@dataclass(frozen=True)
class ImagesetOptions:
    """The flags of Caffe's convert_imageset (``resize_*`` = 0 means no resize)."""

    gray: bool = False
    shuffle: bool = False
    seed: int = 0
    resize_height: int = 0
    resize_width: int = 0
    check_size: bool = False
    encoded: bool = False
    encode_type: Literal["", "png", "jpg"] = ""
    allow_outside_root: bool = False

    @property
    def is_encoded(self) -> bool:
        return self.encoded or bool(self.encode_type)

    @property
    def resizes(self) -> bool:
        return self.resize_height > 0 and self.resize_width > 0


def read_list_file(list_file: str | os.PathLike[str]) -> list[ListEntry]:
    """Parse a Caffe list file; every malformed line is an error naming the file and line."""
    list_file = Path(list_file)
    try:
        text = read_regular_file(list_file, "list file").decode("utf-8")
    except FileNotFoundError:
        raise InputError(f"{list_file}: list file not found") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{list_file}: not UTF-8 text ({exc})") from None
    except OSError as exc:  # not UnsafeInputError (a FIFO, too large...): that one already says it all
        raise InputError(f"{list_file}: cannot read the list file ({exc.strerror or exc})") from None
    entries = []
    # Lines end at "\n" only, as for Caffe's getline (str.splitlines would also split at \x0c,
    # \x85, \u2028...); a Windows "\r" before it is dropped.
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for number, line in enumerate((line.removesuffix("\r") for line in lines), start=1):
        if not line.strip():
            raise InputError(f"{list_file}:{number}: empty line (Caffe would read it as an image named '')")
        path, space, label_text = line.rpartition(" ")
        if not space or not path:
            raise InputError(f"{list_file}:{number}: expected '<path> <label>', got {line!r}")
        if "\0" in path:
            raise InputError(f"{list_file}:{number}: path {path!r} contains a NUL byte")
        # ASCII digits only: Python's int() also takes "1_000", " 3" and non-ASCII digits, which
        # Caffe's atoi reads differently (1, 3, 0); a label the two tools disagree on is an error.
        if not _LABEL.fullmatch(label_text):
            raise InputError(f"{list_file}:{number}: label {label_text[:40]!r} is not an integer")
        # More than 10 significant digits is outside int32 (and int() refuses over 4300 digits).
        if len(label_text.lstrip("+-").lstrip("0")) > 10 or not INT32_MIN <= int(label_text) <= INT32_MAX:
            raise InputError(f"{list_file}:{number}: label {label_text[:40]} is outside int32")
        label = int(label_text)
        entries.append(ListEntry(path, label, number))
    if not entries:
        raise InputError(f"{list_file}: no images listed")
    return entries


def resolve_file(
    root: Path,
    entry: ListEntry,
    list_file: Path,
    allow_outside_root: bool = False,
    *,
    real_root: str | None = None,
    folders: dict[str, str] | None = None,
) -> str:
    """The image file of a list entry; paths leading outside ``root`` are errors unless allowed.

    The check is textual (absolute paths, ``..``) and then real: each component below ROOT is
    ``lstat``-ed and, where one is a symlink, the whole path is resolved and must still lie under
    the resolved ROOT, so a symlink inside ROOT cannot lead anywhere. The path returned has no
    symlinks left in it below ROOT, so what is read is what was checked. ``real_root``
    (``os.path.realpath(root)``) saves resolving ROOT again for every entry of a long list;
    ``folders`` (a dict the caller keeps for one list) saves checking the same folders again:
    a list of a million photos in a thousand class folders costs one ``lstat`` per photo, and
    the path comes back as a string (a ``Path`` per photo cost more than its ``lstat``).
    """
    if allow_outside_root:
        return os.path.join(root, entry.path)
    if os.path.isabs(entry.path):
        raise InputError(
            f"{list_file}:{entry.line}: absolute path {entry.path!r} (pass --allow-outside-root to accept it)"
        )
    if ".." in entry.path.split("/"):  # Path(...).parts, without pathlib's cost per entry
        raise InputError(
            f"{list_file}:{entry.line}: path {entry.path!r} escapes ROOT (pass --allow-outside-root to accept it)"
        )
    real_root = real_root or os.path.realpath(root)
    try:
        real = _below_root(real_root, entry.path, folders)
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long
        raise InputError(f"{list_file}:{entry.line}: cannot resolve path {entry.path!r} ({exc})") from None
    if real is None:
        target = os.path.realpath(os.path.join(real_root, entry.path))
        raise UnsafeInputError(
            f"{list_file}:{entry.line}: path {entry.path!r} leads through a symlink to {target}, outside ROOT "
            f"{real_root} (pass --allow-outside-root to accept it)"
        )
    return real


def _below_root(real_root: str, relative: str, folders: dict[str, str] | None = None) -> str | None:
    """``real_root/relative`` without symlinks if it stays under ``real_root``, else None.

    Usually one ``lstat`` per component and no symlink found (cheaper than ``realpath``, which
    also walks every component of ROOT); a missing component ends the walk (the read reports it).
    ``folders``: relative folder -> its checked path, for folders found to be real directories
    under ``real_root`` with no symlink on the way (only those are remembered).
    """
    parts = [part for part in relative.split("/") if part not in ("", ".")]
    folder = "/".join(parts[:-1])
    start, current = 0, real_root
    if folders is not None and folder in folders:
        start, current = len(parts) - 1, folders[folder]
    for index in range(start, len(parts)):
        part = parts[index]
        candidate = os.path.join(current, part)
        try:
            info = os.lstat(candidate)
        except FileNotFoundError:
            return os.path.join(candidate, *parts[index + 1 :])
        if stat.S_ISLNK(info.st_mode):
            real = os.path.realpath(os.path.join(candidate, *parts[index + 1 :]))
            inside = real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)
            return real if inside else None
        if folders is not None and index == len(parts) - 2 and stat.S_ISDIR(info.st_mode):
            folders[folder] = candidate  # every component up to here a real directory
        current = candidate
    return current


def _matches_extension(path: str, encoding: str) -> bool:
    extension = path.rpartition(".")[2].lower() if "." in path else path.lower()
    return extension == encoding or (encoding == "jpg" and extension == "jpeg")


def entry_key(number: int, entry: ListEntry, where: Path) -> bytes:
    """Caffe's key of ``entry`` numbered ``number`` (:func:`~datumdb.keys.imageset_key`); a key
    over LMDB's limit is an error naming ``where`` (the list file, or ROOT) and the line."""
    key = imageset_key(number, entry.path)
    if len(key) > MAX_KEY_BYTES:
        raise InputError(
            f"{where}:{entry.line}: key for {entry.path!r} is {len(key)} bytes; LMDB allows {MAX_KEY_BYTES}"
        )
    return key


def keeps_file_bytes(path: str, options: ImagesetOptions) -> bool:
    """Whether Caffe stores the listed file's own bytes: encoded, not resized, and the file
    already of the wanted type (with no ``encode_type``, its own extension's type: always)."""
    encoding = options.encode_type or path.rpartition(".")[2].lower()
    return options.is_encoded and not options.resizes and _matches_extension(path, encoding)


def load_image(
    image_path: ImagePath, entry: ListEntry, options: ImagesetOptions, list_file: Path
) -> tuple[np.ndarray, bytes]:
    """Read one listed image as convert_imageset does: (H x W [x C] BGR or gray image, file bytes).

    OpenCV decodes it (``IMREAD_COLOR``, or ``IMREAD_GRAYSCALE`` with ``gray``: libpng's own
    conversion, as Caffe) and ``cv::resize`` bilinear applies when both sizes are given.
    """
    line = f"{list_file}:{entry.line}"
    if not str(image_path).endswith(entry.path):  # name the path as written, then where it led
        line = f"{line}: {entry.path}"
    where = f"{line}: {image_path}"
    flag = cv2.IMREAD_GRAYSCALE if options.gray else cv2.IMREAD_COLOR
    try:
        raw = read_regular_file(image_path, "image")
    except UnsafeInputError as exc:
        raise UnsafeInputError(f"{line}: {exc}") from None
    except OSError as exc:
        raise InputError(f"{where}: cannot read image ({exc.strerror or exc})") from None
    try:
        image = imdecode(raw, flag)
    except DatumError as exc:
        raise InputError(f"{where}: not an image OpenCV can decode ({exc})") from None
    if options.resizes:
        try:
            image = resize(image, options.resize_width, options.resize_height)
        except DatumError as exc:
            raise InputError(f"{where}: {exc}") from None
    return image, raw


def _serialize(
    image_path: ImagePath, entry: ListEntry, options: ImagesetOptions, list_file: Path
) -> tuple[bytes, Shape]:
    image, data, shape = _prepare(image_path, entry, options, list_file)
    if data is None:
        return encode_opencv_image(image, entry.label, key=entry.path), shape
    return encode_image(data, entry.label, key=entry.path), shape


def _serialize_into(
    image_path: ImagePath, entry: ListEntry, options: ImagesetOptions, list_file: Path, out: memoryview
) -> tuple[int, Shape, str] | tuple[bytes, Shape]:
    """:func:`_serialize`'s record made at the start of ``out``: (length, shape, encoding), or
    the record itself when it does not fit there."""
    image, data, shape = _prepare(image_path, entry, options, list_file)
    if data is None:
        if image.dtype != np.uint8 or not image.size:  # (OpenCV's IMREAD_COLOR/GRAYSCALE give uint8)
            return encode_opencv_image(image, entry.label, key=entry.path), shape
        length = encode_opencv_image_into(image, entry.label, out, key=entry.path)
        if length is None:
            return encode_opencv_image(image, entry.label, key=entry.path), shape
        return length, shape, "none"
    length = encode_image_into(data, entry.label, out, key=entry.path)
    if length is None:
        return encode_image(data, entry.label, key=entry.path), shape
    return length, shape, sniff_encoding(data)


def _prepare(
    image_path: ImagePath, entry: ListEntry, options: ImagesetOptions, list_file: Path
) -> tuple[np.ndarray, bytes | None, Shape]:
    """The loaded image, the image bytes an encoded record stores (None: a raw record), its (C, H, W)."""
    image, raw = load_image(image_path, entry, options, list_file)
    shape = hwc_to_chw(image).shape
    if not options.is_encoded:
        return image, None, shape
    if keeps_file_bytes(entry.path, options):
        return image, raw, shape
    encoding = options.encode_type or entry.path.rpartition(".")[2].lower()
    try:
        encoded = imencode("." + encoding, image)
    except DatumError as exc:
        raise InputError(f"{list_file}:{entry.line}: {image_path}: {exc}") from None
    return image, encoded, shape


def ordered_entries(entries: list[ListEntry], options: ImagesetOptions) -> list[ListEntry]:
    """The list in writing order: as given, or permuted by ``default_rng(seed)`` with ``shuffle``."""
    if not options.shuffle:
        return entries
    order = np.random.default_rng(options.seed).permutation(len(entries))
    return [entries[i] for i in order]


def convert_imageset(
    root: str | os.PathLike[str],
    list_file: str | os.PathLike[str] | None,
    db_path: str | os.PathLike[str],
    options: ImagesetOptions = ImagesetOptions(),
    *,
    overwrite: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    map_size: int = DEFAULT_MAP_SIZE,
    workers: int | None = None,
    progress: bool | None = None,
    on_error: Literal["stop", "skip"] = "stop",
    decode_timeout: float | None = None,
) -> Path:
    """Build ``db_path`` from the images under ``root`` listed in ``list_file``.

    ``list_file`` None reads ``root/<class>/<image>`` instead (:func:`read_class_folders`); the
    manifest then names the classes. Images are decoded, resized and serialized in ``workers``
    processes (default :func:`usable_cores`; 1 with no ``decode_timeout`` decodes in this
    process), in runs of consecutive entries; this process takes the runs in list order and is
    the only writer, so records, keys, commit boundaries and hence ``data.mdb`` do not depend on
    ``workers``, and the error reported is the one a single process would meet first (see
    :mod:`datumdb.decodepool`). ``on_error="skip"`` leaves out an image that cannot be read,
    decoded or encoded (or takes over ``decode_timeout`` seconds), as Caffe does, but records its
    path, list line and reason in the manifest (``metadata.skipped``); keys keep the line's
    index, so the numbers of the others do not move.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: ROOT folder not found")
    classes = None
    if list_file is None:
        listed, classes = read_class_folders(root, allow_outside_root=options.allow_outside_root)
        where = root
    else:
        where = Path(list_file)
        listed = read_list_file(where)
    entries = ordered_entries(listed, options)
    real_root = os.path.realpath(root)
    folders: dict[str, str] = {}
    paths = [
        resolve_file(root, entry, where, options.allow_outside_root, real_root=real_root, folders=folders)
        for entry in entries
    ]
    metadata: dict[str, Any] = {
        "source": "imageset",
        # A name that is not UTF-8 (surrogate escapes) is kept as \\xNN: the manifest is UTF-8 JSON.
        "list_file": None if list_file is None else os.fsencode(where.name).decode("utf-8", "backslashreplace"),
        "options": {k: v for k, v in vars(options).items() if k != "allow_outside_root"},
    }
    if classes is not None:
        metadata["classes"] = classes
    if on_error == "skip":
        metadata["skipped"] = []  # (present and empty: nothing was left out)
    channel_order = "gray" if options.gray else "BGR"
    job = _Job(paths, entries, options, where)
    shared_bytes = shared_ring_bytes(batch_size, job.record_bytes() or _record_bytes_guess(paths, options))
    with (
        ordered_results(
            job,
            workers or usable_cores(),
            skip_errors=on_error == "skip",
            timeout=decode_timeout,
            shared_bytes=shared_bytes,
        ) as records,
        DatabaseWriter(
            db_path,
            overwrite=overwrite,
            batch_size=batch_size,
            map_size=map_size,
            channel_order=channel_order,
            metadata=metadata,
        ) as writer,
    ):
        expected_size = None
        for line_id, (entry, record) in enumerate(
            progress_bar(
                zip(entries, records, strict=True),
                enabled=progress,
                total=len(entries),
                desc="convert-imageset",
                unit="img",
            )
        ):
            if isinstance(record, Failure):
                writer.metadata["skipped"].append({"path": entry.path, "line": entry.line, "reason": record.reason})
                continue
            value, shape = (record.value, record.shape) if isinstance(record, Placed) else record
            if options.check_size:
                size = shape[0] * shape[1] * shape[2]
                if expected_size is None:
                    expected_size = size
                elif size != expected_size:
                    raise InputError(
                        f"{where}:{entry.line}: {entry.path} has {size} values, the first image had "
                        f"{expected_size} (--check-size)"
                    )
            key = entry_key(line_id, entry, where)
            if isinstance(record, Placed):  # made by a worker that knows what it holds
                writer.add_described(key, value, label=entry.label, shape=shape, encoding=record.encoding)
            else:
                writer.add_serialized(value, key, shape=shape)
    return Path(db_path)


_GUESS_SAMPLE = 64  # files whose sizes guess the record size of an unresized build


def _record_bytes_guess(paths: Sequence[ImagePath], options: ImagesetOptions) -> int:
    """About how large a record will be when the options do not fix it, with a quarter's margin:
    the listed files' mean size (a sample), times 8 for decoded pixels (a JPEG photo is about a
    tenth of its pixels)."""
    sizes = []
    for path in paths[:_GUESS_SAMPLE]:
        with contextlib.suppress(OSError):  # a missing file is reported when it is read
            sizes.append(os.stat(path).st_size)
    mean = sum(sizes) // len(sizes) if sizes else 1 << 20
    return (mean if options.is_encoded else 8 * mean) * 5 // 4


# --------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class _Job:
    """What the decoding workers make: each listed image's record (:class:`~datumdb.decodepool.DecodeTask`)."""

    paths: Sequence[ImagePath]
    entries: list[ListEntry]
    options: ImagesetOptions
    list_file: Path

    def __len__(self) -> int:
        return len(self.entries)

    def run(self, index: int) -> tuple[bytes, Shape]:
        return _serialize(self.paths[index], self.entries[index], self.options, self.list_file)

    def run_into(self, index: int, out: memoryview) -> tuple[int, Shape, str] | tuple[bytes, Shape]:
        return _serialize_into(self.paths[index], self.entries[index], self.options, self.list_file, out)

    def where(self, index: int) -> str:
        entry = self.entries[index]
        return f"{self.list_file}:{entry.line}: {entry.path}"

    def reason(self, exc: InputError, index: int) -> str:
        """The error without its ``list:line: [path:] file:`` prefix (a report has columns for those)."""
        entry = self.entries[index]
        text = str(exc).removeprefix(f"{self.list_file}:{entry.line}: ").removeprefix(f"{entry.path}: ")
        return text.removeprefix(f"{self.paths[index]}: ")

    def record_bytes(self) -> int | None:
        """The size of every record, where the options fix it (resized raw Datums), else None."""
        options = self.options
        if options.resizes and not options.is_encoded:
            return options.resize_height * options.resize_width * (1 if options.gray else 3)
        return None


# ----------------------------------------------------------------------------- class folders

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""What counts as an image in a class folder: torchvision's ``IMG_EXTENSIONS`` (any case)."""


def read_class_folders(
    root: str | os.PathLike[str], *, allow_outside_root: bool = False
) -> tuple[list[ListEntry], list[str]]:
    """The images of ``root/<class>/...`` as list entries, and the class names (label = index).

    torchvision's ``ImageFolder`` convention, in its order, so a model trained on either sees the
    same labels: the classes are the sub-folders of ``root`` sorted by name (labels 0..n-1);
    each class's files are found recursively (folders in ``sorted(os.walk(...))`` order, then
    sorted names), those with an :data:`IMAGE_EXTENSIONS` extension kept. Paths are relative to
    ``root`` with ``/``, as a list file would give them; ``line`` is the 1-based position in this
    listing. A class folder without images is an error, as in torchvision; hidden folders are
    classes too, as in torchvision (so the labels agree with a model trained through ``ImageFolder``).

    Unlike ``ImageFolder`` (``followlinks=True``), the listing is always finite and stays in
    ROOT (:class:`_FolderWalk`): every real folder is listed once, at its real place, so a link
    to ``.`` or to a sibling class adds nothing; a folder link leading outside ROOT is refused
    unless ``allow_outside_root`` (then followed, each folder still once). Symlinked *files* are
    listed; where they lead is checked when they are read (:func:`resolve_file`).
    """
    root = Path(root)
    try:
        classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    except FileNotFoundError:
        raise InputError(f"{root}: ROOT folder not found") from None
    except NotADirectoryError:
        raise InputError(f"{root}: ROOT is not a folder") from None
    if not classes:
        raise InputError(f"{root}: no class folders (expected ROOT/<class>/<image>)")
    walk = _FolderWalk(root, classes, allow_outside_root)
    entries: list[ListEntry] = []
    for label, name in enumerate(classes):
        found = 0
        for relative, names in sorted(walk.listed[name]):
            for file_name in names:
                if file_name.lower().endswith(IMAGE_EXTENSIONS):
                    entries.append(ListEntry(f"{relative}/{file_name}", label, len(entries) + 1))
                    found += 1
        if not found:
            repeated = walk.repeated[name]
            why = f"; its folder link {repeated[0]} leads to a folder listed already" if repeated else ""
            kinds = ", ".join(IMAGE_EXTENSIONS)
            raise InputError(f"{root / name}: class folder {name!r} holds no image ({kinds}){why}")
    return entries, classes


class _FolderWalk:
    """Every folder of ROOT's classes, each real folder (``(st_dev, st_ino)``) listed once.

    The real folders are walked first, without following links, so each is listed at its real
    place; the folder links met on the way are followed afterwards, the smallest path first (a
    fixed order), and only to a folder not listed yet: a link to ``.``, to a parent or to another
    class adds nothing, and no loop of links can grow the listing. A link whose target lies
    outside ROOT is refused unless ``allow_outside_root``. ``listed[class]`` holds
    ``(folder relative to ROOT, sorted file names)``; ``repeated[class]`` the links skipped there.
    """

    def __init__(self, root: Path, classes: list[str], allow_outside_root: bool) -> None:
        self.root = root
        self.real_root = os.path.realpath(root)
        self.allow_outside_root = allow_outside_root
        self.listed: dict[str, list[tuple[str, list[str]]]] = {name: [] for name in classes}
        self.repeated: dict[str, list[str]] = {name: [] for name in classes}
        self.visited = {self._identity(root)}
        links: list[tuple[str, str]] = []  # (relative path of a folder link, its class), found on the way
        for name in classes:
            if os.path.islink(root / name):
                links.append((name, name))
            else:
                self._walk(name, name, links)
        while links:  # the link nearest ROOT first (a class that is a link before a link inside a class)
            links.sort(key=lambda link: (link[0].count("/"), link[0]), reverse=True)
            relative, name = links.pop()
            self._follow(relative, name, links)

    @staticmethod
    def _identity(path: str | os.PathLike[str]) -> tuple[int, int]:
        info = os.stat(path)
        return info.st_dev, info.st_ino

    def _walk(self, top: str, name: str, links: list[tuple[str, str]]) -> None:
        """List the real folders under ``top`` (relative to ROOT), noting the folder links met."""
        pending = [top]
        while pending:
            relative = pending.pop()
            folder = self.root / relative
            try:
                identity = self._identity(folder)
                if identity in self.visited:  # the same folder again (a bind mount, say)
                    continue
                self.visited.add(identity)
                files = []
                with os.scandir(folder) as scan:
                    for entry in scan:
                        if entry.is_dir(follow_symlinks=False):
                            pending.append(f"{relative}/{entry.name}")
                        elif entry.is_symlink() and _is_folder(entry):
                            links.append((f"{relative}/{entry.name}", name))
                        else:  # a file, a link to one, or a dangling link (reading it reports that)
                            files.append(entry.name)
            except OSError as exc:  # os.walk would skip the folder silently
                raise InputError(f"{folder}: cannot list the class folder ({exc.strerror or exc})") from None
            self.listed[name].append((relative, sorted(files)))

    def _follow(self, relative: str, name: str, links: list[tuple[str, str]]) -> None:
        """Walk the folder a link leads to, if inside ROOT (or allowed) and not listed yet."""
        link = self.root / relative
        target = os.path.realpath(link)
        inside = target == self.real_root or target.startswith(self.real_root.rstrip(os.sep) + os.sep)
        if not inside and not self.allow_outside_root:
            raise UnsafeInputError(
                f"{link}: a symlink to the folder {target}, outside ROOT {self.real_root}; class folders "
                "are followed only inside ROOT (pass --allow-outside-root to accept it)"
            )
        try:
            identity = self._identity(link)
        except OSError:  # gone since it was listed, or a loop of links: nothing to list
            return
        if identity in self.visited:
            self.repeated[name].append(relative)
            return
        self._walk(relative, name, links)


def _is_folder(entry: os.DirEntry[str]) -> bool:
    """Whether a symlink leads to a folder (False for a dangling link or a loop of links)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


# ----------------------------------------------------------------------------- for the pipeline


def serialize_images(
    paths: Sequence[ImagePath],
    entries: list[ListEntry],
    options: ImagesetOptions,
    list_file: Path,
    *,
    skip_errors: bool = False,
    timeout: float | None = None,
    workers: int = 1,
    progress: bool | None = None,
) -> Iterator[tuple[bytes, Shape] | ImageFailure]:
    """Each entry's serialized Datum and decoded shape, in order; or, with ``skip_errors``, its
    :class:`ImageFailure` (unreadable, undecodable, or over ``timeout`` seconds to decode).

    With a ``timeout`` the images are decoded in ``workers`` processes (at least one), whose
    watchdogs end a decode stuck in a broken file; otherwise in this process when ``workers`` is 1.
    ``progress``: a bar on a terminal, lines in a log (:mod:`datumdb._progress`).
    """
    job = _Job(paths, entries, options, list_file)
    with ordered_results(job, workers, skip_errors=skip_errors, timeout=timeout) as results:
        where = f"images {entries[0].line}-{entries[-1].line}" if entries else "images"  # this shard's, in a log
        for result in progress_bar(results, enabled=progress, total=len(entries), desc=where, unit="img"):
            if isinstance(result, Failure):
                yield ImageFailure(entries[result.index], result.reason)
            else:
                yield result


@dataclass(frozen=True)
class ImageFailure:
    """A listed image that could not be read, decoded or encoded in time, and why."""

    entry: ListEntry
    reason: str
