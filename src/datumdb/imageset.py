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
(Caffe logs and skips, or parses "cat" as label 0). Caffe's ``--shuffle`` is unseeded; ours
takes ``seed`` (default 0) so a shuffled database is reproducible.

Inputs are files, and bounded (:mod:`datumdb.limits`): the list file and every image must be
regular files of at most ``max_input_bytes()`` (2 GiB), so a FIFO in the list cannot hang the
build nor a link to ``/dev/zero`` exhaust memory; symlinks are resolved before the ROOT check, so
a link inside ROOT cannot lead outside it unless ``allow_outside_root``; and no OpenCV failure
(a forged header over the pixel bound, say) escapes as anything but an :class:`InputError`.

Decoding is the cost (a JPEG photo takes milliseconds, writing its record microseconds), so it
runs in ``workers`` processes (all usable cores by default): threads reached only about 1.3 of
2 cores, because the GIL is held between OpenCV calls. See :func:`convert_imageset` for how the
pool keeps the output identical for any worker count and never shares the LMDB environment.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import re
import signal
import stat
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from datumdb._progress import progress as progress_bar
from datumdb.codec import INT32_MAX, INT32_MIN, encode_array, encode_image, hwc_to_chw, imdecode, imencode, resize
from datumdb.errors import DatumDBError, DatumError, DecodeWorkerError, InputError, UnsafeInputError
from datumdb.keys import MAX_KEY_BYTES, imageset_key
from datumdb.limits import read_regular_file
from datumdb.writer import DEFAULT_BATCH_SIZE, DEFAULT_MAP_SIZE, DatabaseWriter

__all__ = [
    "ImagesetOptions",
    "ListEntry",
    "convert_imageset",
    "load_image",
    "ordered_entries",
    "read_list_file",
    "resolve_path",
    "usable_cores",
]


_LABEL = re.compile(r"[+-]?[0-9]+", re.ASCII)

# A task for a decoding worker is a run of consecutive list entries ("chunk") whose records add
# up to about CHUNK_BYTES: enough images that the per-task IPC (~0.2 ms) is noise next to the
# decoding, few enough that the last chunk does not leave the other workers idle for long.
# Chunks are submitted ahead while the records in flight are estimated under WINDOW_BYTES, and
# always WINDOW_PER_WORKER per worker: the window lets the workers go on decoding while this
# process commits a batch to LMDB (about 0.2 s per 1000 records of 256x256), and bounds memory
# (a record larger than CHUNK_BYTES, an unresized photo, goes alone: 2 per worker in flight).
CHUNK_BYTES = 4 << 20
MAX_CHUNK_IMAGES = 32
WINDOW_BYTES = 64 << 20
WINDOW_PER_WORKER = 2
_PR_SET_PDEATHSIG = 1  # linux/prctl.h: the signal a process gets when its parent dies
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_CAN_MASK = hasattr(signal, "pthread_sigmask")

Shape = tuple[int, int, int]


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


def resolve_path(
    root: Path,
    entry: ListEntry,
    list_file: Path,
    allow_outside_root: bool = False,
    *,
    real_root: str | None = None,
) -> Path:
    """The image file of a list entry; paths leading outside ``root`` are errors unless allowed.

    The check is textual (absolute paths, ``..``) and then real: each component below ROOT is
    ``lstat``-ed and, where one is a symlink, the whole path is resolved and must still lie under
    the resolved ROOT, so a symlink inside ROOT cannot lead anywhere. The path returned has no
    symlinks left in it below ROOT, so what is read is what was checked. ``real_root``
    (``os.path.realpath(root)``) saves resolving ROOT again for every entry of a long list.
    """
    if allow_outside_root:
        return root / entry.path
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
        real = _below_root(real_root, entry.path)
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long
        raise InputError(f"{list_file}:{entry.line}: cannot resolve path {entry.path!r} ({exc})") from None
    if real is None:
        target = os.path.realpath(os.path.join(real_root, entry.path))
        raise UnsafeInputError(
            f"{list_file}:{entry.line}: path {entry.path!r} leads through a symlink to {target}, outside ROOT "
            f"{real_root} (pass --allow-outside-root to accept it)"
        )
    return Path(real)


def _below_root(real_root: str, relative: str) -> str | None:
    """``real_root/relative`` without symlinks if it stays under ``real_root``, else None.

    Usually one ``lstat`` per component and no symlink found (cheaper than ``realpath``, which
    also walks every component of ROOT); a missing component ends the walk (the read reports it).
    """
    parts = [part for part in relative.split("/") if part not in ("", ".")]
    current = real_root
    for index, part in enumerate(parts):
        candidate = os.path.join(current, part)
        try:
            info = os.lstat(candidate)
        except FileNotFoundError:
            return os.path.join(candidate, *parts[index + 1 :])
        if stat.S_ISLNK(info.st_mode):
            real = os.path.realpath(os.path.join(candidate, *parts[index + 1 :]))
            inside = real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)
            return real if inside else None
        current = candidate
    return current


def _matches_extension(path: str, encoding: str) -> bool:
    extension = path.rpartition(".")[2].lower() if "." in path else path.lower()
    return extension == encoding or (encoding == "jpg" and extension == "jpeg")


def load_image(
    image_path: Path, entry: ListEntry, options: ImagesetOptions, list_file: Path
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


def _serialize(image_path: Path, entry: ListEntry, options: ImagesetOptions, list_file: Path) -> tuple[bytes, Shape]:
    image, raw = load_image(image_path, entry, options, list_file)
    chw = hwc_to_chw(image)
    key = entry.path
    if not options.is_encoded:
        return encode_array(chw, entry.label, key=key), chw.shape
    encoding = options.encode_type or entry.path.rpartition(".")[2].lower()
    if not options.resizes and _matches_extension(entry.path, encoding):
        return encode_image(raw, entry.label, key=key), chw.shape
    try:
        encoded = imencode("." + encoding, image)
    except DatumError as exc:
        raise InputError(f"{list_file}:{entry.line}: {image_path}: {exc}") from None
    return encode_image(encoded, entry.label, key=key), chw.shape


def ordered_entries(entries: list[ListEntry], options: ImagesetOptions) -> list[ListEntry]:
    """The list in writing order: as given, or permuted by ``default_rng(seed)`` with ``shuffle``."""
    if not options.shuffle:
        return entries
    order = np.random.default_rng(options.seed).permutation(len(entries))
    return [entries[i] for i in order]


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which ``taskset`` and schedulers set)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def convert_imageset(
    root: str | os.PathLike[str],
    list_file: str | os.PathLike[str],
    db_path: str | os.PathLike[str],
    options: ImagesetOptions = ImagesetOptions(),
    *,
    overwrite: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    map_size: int = DEFAULT_MAP_SIZE,
    workers: int | None = None,
    progress: bool | None = None,
) -> Path:
    """Build ``db_path`` from the images under ``root`` listed in ``list_file``.

    Images are decoded, resized and serialized in ``workers`` processes (default
    :func:`usable_cores`; 1 decodes in this process). Each worker takes runs of consecutive
    entries and returns their serialized Datums; this process consumes the runs in list order
    and is the only writer, so records, keys, commit boundaries and hence ``data.mdb`` do not
    depend on ``workers``, and the error reported is the one a single process would meet first.
    The workers are started before the writer opens its LMDB environment (a forked environment
    is undefined behaviour in LMDB), and are stopped whatever ends the build (an error, Ctrl-C,
    SIGTERM); on Linux they also die with this process if it is killed outright.
    """
    root, list_file = Path(root), Path(list_file)
    if not root.is_dir():
        raise InputError(f"{root}: ROOT folder not found")
    entries = ordered_entries(read_list_file(list_file), options)
    real_root = os.path.realpath(root)
    paths = [resolve_path(root, entry, list_file, options.allow_outside_root, real_root=real_root) for entry in entries]
    metadata = {
        "source": "imageset",
        # A name that is not UTF-8 (surrogate escapes) is kept as \\xNN: the manifest is UTF-8 JSON.
        "list_file": os.fsencode(list_file.name).decode("utf-8", "backslashreplace"),
        "options": {k: v for k, v in vars(options).items() if k != "allow_outside_root"},
    }
    channel_order = "gray" if options.gray else "BGR"
    job = _Job(paths, entries, options, list_file)
    with (
        _serialized(job, workers or usable_cores()) as records,
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
        for line_id, (entry, (value, shape)) in enumerate(
            progress_bar(
                zip(entries, records, strict=True),
                enabled=progress,
                total=len(entries),
                desc="convert-imageset",
                unit="img",
            )
        ):
            if options.check_size:
                size = shape[0] * shape[1] * shape[2]
                if expected_size is None:
                    expected_size = size
                elif size != expected_size:
                    raise InputError(
                        f"{list_file}:{entry.line}: {entry.path} has {size} values, the first image had "
                        f"{expected_size} (--check-size)"
                    )
            key = imageset_key(line_id, entry.path)
            if len(key) > MAX_KEY_BYTES:
                raise InputError(
                    f"{list_file}:{entry.line}: key for {entry.path!r} is {len(key)} bytes; LMDB allows {MAX_KEY_BYTES}"
                )
            writer.add_serialized(value, key, shape=shape)
    return Path(db_path)


# --------------------------------------------------------------------------- decoding workers


@dataclass(frozen=True)
class _Job:
    """Everything a worker needs, given to it once at start (inherited through fork, not sent per task)."""

    paths: list[Path]
    entries: list[ListEntry]
    options: ImagesetOptions
    list_file: Path

    def serialize(self, start: int, stop: int) -> tuple[list[tuple[bytes, Shape]], DatumDBError | None]:
        """Records of entries ``start:stop``; at a bad image, those before it and its error.

        The error is returned, not raised, so the records before it still reach the writer and
        a ``--check-size`` or key error among them is reported first, as in one process.
        """
        records = []
        for index in range(start, stop):
            try:
                records.append(_serialize(self.paths[index], self.entries[index], self.options, self.list_file))
            except DatumDBError as exc:
                return records, exc
        return records, None

    def known_record_bytes(self) -> int | None:
        """The size of every record, where the options fix it (resized raw Datums), else None."""
        options = self.options
        if options.resizes and not options.is_encoded:
            return options.resize_height * options.resize_width * (1 if options.gray else 3)
        return None


def _chunk_size(record_bytes: int | None) -> int:
    """Images per chunk for records of about ``record_bytes`` (unknown: one, until some are seen)."""
    if record_bytes is None:
        return 1
    return max(1, min(MAX_CHUNK_IMAGES, CHUNK_BYTES // max(1, record_bytes)))


@contextlib.contextmanager
def _serialized(job: _Job, workers: int) -> Iterator[Iterator[tuple[bytes, Shape]]]:
    """The records of ``job`` in list order, made in ``workers`` processes (1: in this one)."""
    workers = min(workers, len(job.entries))
    if workers <= 1:
        yield (_serialize(p, e, job.options, job.list_file) for p, e in zip(job.paths, job.entries, strict=True))
        return
    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context(_start_method()),
        initializer=_start_worker,
        initargs=(job, os.getpid(), cv2.utils.logging.getLogLevel()),
    )
    try:
        # With fork, the first task forks every worker: now, before the caller opens LMDB, and
        # with SIGINT and SIGTERM held so that none reaches a worker before _start_worker has
        # set its own handlers (the parent's, inherited, would swallow or misread it).
        held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS) if _CAN_MASK else None
        try:
            started = pool.submit(os.getpid)
        finally:
            if held is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
        started.result()
        yield _in_order(pool, job, workers)
    except BaseException:
        _stop(pool)
        raise
    pool.shutdown()


def _start_method() -> str:
    """fork where it is safe (Linux): workers start at once and inherit the job without pickling."""
    return "fork" if sys.platform.startswith("linux") else "spawn"


def _in_order(pool: ProcessPoolExecutor, job: _Job, workers: int) -> Iterator[tuple[bytes, Shape]]:
    """Submit chunks ahead (a bounded window) and yield their records in list order."""
    count = len(job.entries)
    window: deque[tuple[int, int, Future[tuple[list[tuple[bytes, Shape]], DatumDBError | None]]]] = deque()
    submitted = in_flight = made = made_bytes = 0
    known = job.known_record_bytes()
    while window or submitted < count:
        record_bytes = known or (made_bytes // made if made else None)
        while submitted < count and (
            len(window) < WINDOW_PER_WORKER * workers
            or (record_bytes is not None and in_flight * record_bytes < WINDOW_BYTES)
        ):
            stop = min(count, submitted + _chunk_size(record_bytes))
            window.append((submitted, stop, _submit(pool, job, submitted, stop)))
            in_flight += stop - submitted
            submitted = stop
        start, stop, future = window.popleft()
        try:
            records, error = future.result()
        except BrokenProcessPool:
            raise _worker_died(job, start, submitted) from None
        in_flight -= stop - start
        made += len(records)
        made_bytes += sum(len(value) for value, _ in records)
        yield from records
        if error is not None:
            raise error


def _submit(
    pool: ProcessPoolExecutor, job: _Job, start: int, stop: int
) -> Future[tuple[list[tuple[bytes, Shape]], DatumDBError | None]]:
    try:
        return pool.submit(_serialize_chunk, start, stop)
    except BrokenProcessPool:
        raise _worker_died(job, start, stop) from None


def _worker_died(job: _Job, start: int, stop: int) -> DecodeWorkerError:
    """A worker was killed (out of memory, a signal) or crashed inside a decoder: name the images."""
    first = job.entries[start]
    return DecodeWorkerError(
        f"{job.list_file}:{first.line}: a decoding worker process died (killed, out of memory, or a crash "
        f"in OpenCV) while reading {first.path} or one of the {stop - start - 1} images after it in writing "
        "order; nothing was written"
    )


def _stop(pool: ProcessPoolExecutor) -> None:
    """Stop the workers now, mid-image: an error or Ctrl-C must not wait for the chunks in flight.

    ``shutdown`` alone lets each worker finish its current task. SIGKILL, because a worker has
    nothing to clean up (the database is this process's) and no signal must be lost: a worker
    killed while it waits for a task holds the task queue's lock, so one that survived would
    wait for that lock forever and ``shutdown`` with it. Python 3.14 has ``kill_workers`` for
    this; before it the executor's own process table is the only exact list of its workers.
    """
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        process.kill()
    for process in processes:
        process.join()
    pool.shutdown(wait=True, cancel_futures=True)


# Set in each worker by _start_worker: the job whose chunks it serializes.
_WORKER_JOB: _Job | None = None


def _start_worker(job: _Job, parent: int, log_level: int) -> None:
    """Make a worker process: one OpenCV thread, the parent's signals are the parent's business.

    Ctrl-C reaches the whole process group; the parent turns it into an orderly stop and
    kills the workers, so they ignore SIGINT and take SIGTERM's default (the CLI's SIGTERM
    handler, inherited through fork, would raise KeyboardInterrupt here). On Linux a
    worker also gets SIGKILL when its parent dies, so even ``kill -9`` leaves no orphans.
    """
    global _WORKER_JOB
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if _CAN_MASK:  # held by the parent while it forked
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    cv2.setNumThreads(1)  # the parallelism is the processes; OpenCV's own pool would oversubscribe
    cv2.utils.logging.setLogLevel(log_level)  # as quiet as the parent (spawn does not inherit it)
    _WORKER_JOB = job


def _serialize_chunk(start: int, stop: int) -> tuple[list[tuple[bytes, Shape]], DatumDBError | None]:
    if _WORKER_JOB is None:
        raise RuntimeError("_serialize_chunk runs only in a worker started by _start_worker")
    return _WORKER_JOB.serialize(start, stop)
