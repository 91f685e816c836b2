"""Decode images in worker processes, results in input order, each image's time bounded.

Decoding is the cost of an image build (milliseconds a photo; its record takes microseconds to
write), and threads reach only about 1.3 of 2 cores because the GIL is held between OpenCV calls,
so images are decoded in processes. What this module guarantees:

* **Order.** Results come back in input order, however many workers: the one writer that
  consumes them (an LMDB, a record file) makes the same bytes for any worker count, and the
  error reported is the one a single process would meet first.
* **Bounded memory.** Work goes out in runs of consecutive items (chunks) of about CHUNK_BYTES
  of records, and only while the records in flight are estimated under WINDOW_BYTES.
* **No LMDB across a fork.** The first workers are forked when the pool opens, before the caller
  opens anything; workers started later (after a failure) are spawned, not forked.
* **Bounded decode time.** Caffe hangs on some broken ImageNet files. With ``timeout``, a
  watchdog thread in each worker ends the worker if one image takes longer; the pool is then
  replaced and the image is the error (``skip_errors=False``) or a :class:`Failure` in its place.
  A worker that dies in a decoder (a crash, the OOM killer) is handled the same way: every
  worker marks the item it is working on in shared memory, so the image is named, not guessed.
* **No records through pipes, where asked.** With ``shared_bytes``, the first (forked) workers
  make each record straight into a ring of shared memory (:class:`SharedRing`) and send back
  only where it lies; the caller gets a :class:`Placed` view of it, and the ring reuses that
  space (its pages given back to the kernel meanwhile) once the last view is gone (the writer
  has hashed and committed it). A record that does not fit where its chunk was given
  space, and every record of a replacement pool (spawned: it cannot share the fork's
  memory), comes back pickled as before. Pickling a photo-sized record through a pipe and
  copying it out again cost more CPU than everything else the writer does.
* **Clean stops.** Ctrl-C and SIGTERM stop the workers (they ignore SIGINT and take SIGTERM's
  default; the caller kills them); on Linux they get SIGKILL when their parent dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import mmap
import multiprocessing
import os
import signal
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import Synchronized
from typing import Any, Protocol

import cv2
import numpy as np

from datumdb.errors import DatumDBError, DecodeWorkerError, InputError

__all__ = [
    "CHUNK_BYTES",
    "STOP_SIGNALS",
    "WINDOW_BYTES",
    "DecodeTask",
    "Failure",
    "Placed",
    "SharedRing",
    "die_with_parent",
    "ordered_results",
    "shared_ring_bytes",
    "tune_malloc",
    "usable_cores",
]

Shape = tuple[int, int, int]
Record = tuple[bytes, Shape]

# A task for a worker is a run of consecutive items ("chunk") whose records add up to about
# CHUNK_BYTES: enough images that the per-task IPC (~0.2 ms) is noise next to the decoding, few
# enough that the last chunk does not leave the other workers idle for long. Chunks are submitted
# ahead while the records in flight are estimated under WINDOW_BYTES, and always
# WINDOW_PER_WORKER per worker: the window lets the workers go on decoding while the caller
# commits a batch, and bounds memory (a record larger than CHUNK_BYTES goes alone).
CHUNK_BYTES = 4 << 20
MAX_CHUNK_IMAGES = 32
WINDOW_BYTES = 64 << 20
WINDOW_PER_WORKER = 2
# The largest SharedRing: a bound on the records it holds at once (what a build of photo-sized
# records holds anyway in two batches); beyond it, records come through the pipe.
MAX_RING_BYTES = 1 << 30
_PR_SET_PDEATHSIG = 1  # linux/prctl.h: the signal a process gets when its parent dies
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}  # what stops a build (Ctrl-C, a scheduler)
_CAN_MASK = hasattr(signal, "pthread_sigmask")
_TIMED_OUT_EXIT = 75  # a worker's exit status when its watchdog ended it
WATCHDOG_LOOKS = 10  # looks per time bound: an item over it is ended within 1.1 times the bound
_RING_SLACK = 64 << 10  # ring space a chunk of records of unknown size gets beyond its estimate
_MADV_REMOVE: int | None = getattr(mmap, "MADV_REMOVE", None)  # frees a shared mapping's pages (Linux)
_RECORD_FRAMING = 64  # a Datum's bytes around a payload of known size: shape fields, label, flags
# glibc's mallopt parameters, and what tune_malloc sets them to.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 << 20
_TRIM_THRESHOLD = 128 << 20

# Item states in shared memory: what a dead worker was doing.
_WAITING, _DECODING, _DONE = 0, 1, 2


class DecodeTask(Protocol):
    """What the pool decodes: picklable (spawned workers get a copy), item by index."""

    def __len__(self) -> int: ...

    def run(self, index: int) -> Record:
        """Item ``index``'s serialized record and decoded shape; a bad item raises InputError."""
        ...

    def where(self, index: int) -> str:
        """How messages name item ``index`` (e.g. ``list.txt:12: cat/1.jpg``)."""
        ...

    def reason(self, exc: InputError, index: int) -> str:
        """``exc`` without the item's name (a report has columns for that)."""
        ...

    def record_bytes(self) -> int | None:
        """The size of every record when the options fix it, else None (learnt as records come)."""
        ...


class SharedTask(DecodeTask, Protocol):
    """A task whose records can be made in place (``ordered_results(..., shared_bytes=...)``)."""

    def run_into(self, index: int, out: memoryview) -> tuple[int, Shape, str] | Record:
        """Make item ``index``'s record at the start of ``out``: (its length, shape, encoding);
        or, if it does not fit there, the record itself (nothing written)."""
        ...


@dataclass(frozen=True, slots=True)
class Placed:
    """A record made in shared memory: ``value`` a view of its bytes, valid while referenced.

    ``encoding`` is what the image bytes of an encoded record are ("png", "jpg", "other"), or
    "none" for a raw one: what the worker knew, so the writer need not parse the record again.
    """

    value: memoryview
    shape: Shape
    encoding: str


class SharedRing:
    """Shared memory for records in flight: space reserved per chunk, in order, reused in a ring.

    An anonymous shared mapping, made before the workers are forked (they inherit it), so
    nothing is left on disk or in ``/dev/shm`` whatever kills the build. A chunk's space is
    reserved when it is submitted and given back when the last view of its records is gone
    (``weakref.finalize`` on the array they are views of): the caller needs no protocol, and a
    record is never overwritten while the writer still holds it for a commit or its digest.
    :meth:`reserve` never waits: with no room, the chunk's records come back pickled.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.memory = mmap.mmap(-1, size)  # MAP_SHARED | MAP_ANONYMOUS
        self._lock = threading.Lock()
        self._live: deque[list[int]] = deque()  # [start, stop, given back] in reserving order

    def reserve(self, size: int) -> tuple[int, int] | None:
        """``(start, stop)`` of ``size`` free bytes after the last reserved ones, or None."""
        if not 0 < size <= self.size:
            return None
        with self._lock:
            if not self._live:
                start = 0
            else:
                first, last_start, last_stop = self._live[0][0], self._live[-1][0], self._live[-1][1]
                if last_start >= first:  # in use: first .. last_stop; free: after it, and before first
                    if self.size - last_stop >= size:
                        start = last_stop
                    elif first >= size:
                        start = 0
                    else:
                        return None
                elif first - last_stop >= size:  # wrapped; free: last_stop .. first
                    start = last_stop
                else:
                    return None
            self._live.append([start, start + size, False])
            return start, start + size

    def view(self, region: tuple[int, int]) -> np.ndarray:
        """The bytes of ``region`` as an array whose end (last view gone) gives the region back."""
        start, stop = region
        array = np.frombuffer(self.memory, np.uint8, stop - start, start)
        weakref.finalize(array, self.give_back, start)
        return array

    def give_back(self, start: int) -> None:
        """Region starting at ``start`` is free again (out of order too: the oldest first).

        The pages of the regions that leave the ring go back to the kernel at once
        (:meth:`_release`): the writer's next commit needs as many new page-cache pages as the
        records it just committed held, and pages freed a moment ago are the cheap ones to get.
        """
        freed = []
        with self._lock:
            for region in self._live:
                if region[0] == start and not region[2]:
                    region[2] = True
                    break
            while self._live and self._live[0][2]:
                freed.append(self._live.popleft())
        for region_start, region_stop, _ in freed:
            self._release(region_start, region_stop)

    def _release(self, start: int, stop: int) -> int:
        """Free the whole pages within ``start:stop`` (their bytes read as zeros after); the bytes
        freed. Pages shared with a neighbouring region are kept: it may be in use."""
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        last = stop // mmap.PAGESIZE * mmap.PAGESIZE
        if _MADV_REMOVE is None or last <= first:
            return 0
        try:
            self.memory.madvise(_MADV_REMOVE, first, last - first)
        except (OSError, ValueError):  # closed meanwhile, or a kernel without it: only a saving lost
            return 0
        return last - first

    def release_free(self) -> int:
        """Give the pages of the space not in use back to the kernel; the bytes released.

        For when no more records will come: a page freed just now is one the kernel can hand
        out again cheaply (a virtual machine's host still backs it), and the writer is about to
        need hundreds of MB of new ones for its last commit's page cache. Measured here: writing
        256 MB to a new file took 0.59 s of CPU after 3 s idle, 0.08 s right after 300 MB of
        shared memory was released.
        """
        with self._lock:
            live = sorted((start, stop) for start, stop, given_back in self._live if not given_back)
        released, position = 0, 0
        for start, stop in [*live, (self.size, self.size)]:
            released += self._release(position, start)  # the gap before each region in use
            position = max(position, stop)
        return released

    def close(self) -> None:
        """Unmap, unless views are still held somewhere (then the mapping goes with the last)."""
        with contextlib.suppress(BufferError):
            self.memory.close()


@dataclass(frozen=True)
class Failure:
    """Item ``index`` could not be made, and why (in place of its record, with ``skip_errors``)."""

    index: int
    reason: str


def tune_malloc() -> bool:
    """Keep photo-sized blocks in this process's heap instead of returning each to the kernel.

    glibc serves a block over its mmap threshold (128 KiB at first) with a fresh mapping and
    unmaps it when freed, so every decoded photo, resized image and record of an image build
    would fault in every one of its pages again: measured here, serializing one 256x256 record
    took 190 µs that way and 44 µs with the thresholds raised. Called in decoding workers and
    by the image-building commands (their own processes); a no-op off glibc. True if set.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def shared_ring_bytes(batch_size: int, record_bytes: int) -> int:
    """The :class:`SharedRing` a writer of ``batch_size``-record commits needs for records of
    ``record_bytes`` (payload): the batch being filled, the one being committed (the writer
    holds both until committed) and the records in flight; at most MAX_RING_BYTES (beyond,
    records are pickled)."""
    return min(MAX_RING_BYTES, 2 * batch_size * (record_bytes + _RECORD_FRAMING) + 2 * WINDOW_BYTES)


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a SLURM or cgroup allotment)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def ordered_results(
    task: DecodeTask,
    workers: int,
    *,
    skip_errors: bool = False,
    timeout: float | None = None,
    shared_bytes: int = 0,
) -> Iterator[Iterator[Record | Placed | Failure]]:
    """The records of ``task`` in order, made in ``workers`` processes; use as a context manager.

    Open it before opening an LMDB environment: its first workers are forked on entry. With
    ``workers`` 1 and no ``timeout`` the items are made in this process. ``skip_errors`` turns a
    bad item (an :class:`InputError`, a decode over ``timeout`` seconds, a worker dying in it) into
    a :class:`Failure` in its place; otherwise the first one is raised. ``shared_bytes`` (for a
    :class:`SharedTask`, where workers are forked) is the size of the :class:`SharedRing` the
    workers make records in; those come as :class:`Placed` views, the others as records.
    """
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        # NaN or infinity would switch the bound off (and infinity kills the watchdog thread).
        raise InputError(f"decode_timeout must be a finite number of seconds greater than 0, got {timeout!r}")
    if len(task) == 0:
        yield iter(())
        return
    if workers <= 1 and timeout is None:
        yield _here(task, skip_errors)
        return
    pools = _Pools(task, max(1, min(workers, len(task))), skip_errors, timeout)
    method = _start_method()
    if shared_bytes > 0 and method == "fork" and callable(getattr(task, "run_into", None)):
        pools.ring = SharedRing(shared_bytes)
    try:
        pools.start(method)
        yield pools.results()
    finally:
        pools.stop()
        if pools.ring is not None:
            pools.ring.close()


def _here(task: DecodeTask, skip_errors: bool) -> Iterator[Record | Failure]:
    for index in range(len(task)):
        try:
            yield task.run(index)
        except InputError as exc:
            if not skip_errors:
                raise
            yield Failure(index, task.reason(exc, index))


def _start_method() -> str:
    """fork where it is safe (Linux): workers start at once and inherit the task without pickling."""
    return "fork" if sys.platform.startswith("linux") else "spawn"


@dataclass
class _Pools:
    """The current pool of workers, and what survives replacing it: progress and known bad items."""

    task: DecodeTask
    workers: int
    skip_errors: bool
    timeout: float | None
    state: Any = None  # RawArray of _WAITING/_DECODING/_DONE per item
    timed_out: Synchronized | None = None  # the item a watchdog ended its worker on, or -1
    bad: dict[int, str] = field(default_factory=dict)  # items known bad: index -> reason
    pool: ProcessPoolExecutor | None = None
    careful_until: int = -1  # one item at a time, one worker, up to this index (to find a crash)
    ring: SharedRing | None = None  # where the forked workers make records, if asked
    ring_live: bool = False  # whether the current pool's workers share the ring (forked ones only)

    def start(self, method: str) -> None:
        if self.state is None:
            context = multiprocessing.get_context(method)
            self.state = context.RawArray("b", len(self.task))
            self.timed_out = context.RawValue("q", -1)
        workers = 1 if self.careful_until >= 0 else self.workers
        self.ring_live = self.ring is not None and method == "fork"
        self.pool = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context(method),
            initializer=_start_worker,
            initargs=(
                self.task,
                os.getpid(),
                cv2.utils.logging.getLogLevel(),
                self.state,
                self.timed_out,
                self.timeout,
                self.skip_errors,
                dict(self.bad),
                self.ring.memory if self.ring_live and self.ring is not None else None,
            ),
        )
        # With fork, the first task forks every worker: now, before the caller opens LMDB, and
        # with SIGINT and SIGTERM held so that none reaches a worker before _start_worker has
        # set its own handlers (the parent's, inherited, would swallow or misread it).
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS) if _CAN_MASK else None
        try:
            started = self.pool.submit(os.getpid)
        finally:
            if held is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
        started.result()

    def stop(self) -> None:
        """Stop the workers now, mid-image: an error or Ctrl-C must not wait for the chunks in flight.

        ``shutdown`` alone lets each worker finish its current task. SIGKILL, because a worker
        has nothing to clean up and no signal must be lost: a worker killed while it waits for a
        task holds the task queue's lock, so one that survived would wait for that lock forever
        and ``shutdown`` with it. Python 3.14 has ``kill_workers`` for this; before it the
        executor's own process table is the only exact list of its workers.
        """
        if self.pool is None:
            return
        processes = list((getattr(self.pool, "_processes", None) or {}).values())
        for process in processes:
            process.kill()
        for process in processes:
            process.join()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pool = None

    def results(self) -> Iterator[Record | Placed | Failure]:
        position = 0
        while position < len(self.task):
            assert self.pool is not None
            broke: _Broke | None = None
            try:
                for result in self._generation(position):
                    yield result
                    position += 1
            except _Broke as exc:
                broke = exc
            if broke is None:
                # Every result is in: the workers go now, not when the caller is done writing,
                # so the memory they held is free (and recently used: cheap to fault in again)
                # for the caller's last commit.
                self.stop()
                if self.ring is not None:
                    self.ring.release_free()
                return
            self._after(broke, position)

    def _generation(self, first: int) -> Iterator[Record | Placed | Failure]:
        """Submit chunks from ``first`` ahead (a bounded window); yield their results in order."""
        assert self.pool is not None
        count = len(self.task)
        careful = self.careful_until >= 0
        window: deque[tuple[int, int, tuple[int, int] | None, Future[Any]]] = deque()
        in_flight = made = made_bytes = 0
        submitted = first
        known = self.task.record_bytes()
        while window or submitted < count:
            record_bytes = known or (made_bytes // made if made else None)
            while submitted < count and (
                len(window) < (1 if careful else WINDOW_PER_WORKER * self.workers)
                or (not careful and record_bytes is not None and in_flight * record_bytes < WINDOW_BYTES)
            ):
                stop = min(count, submitted + (1 if careful else _chunk_size(record_bytes)))
                region = self._reserve(stop - submitted, known, record_bytes)
                try:
                    window.append((submitted, stop, region, self.pool.submit(_run_chunk, submitted, stop, region)))
                except BrokenProcessPool:
                    raise _Broke(window[0][0] if window else submitted, stop) from None
                in_flight += stop - submitted
                submitted = stop
                if careful and submitted > self.careful_until:
                    careful = False  # past the suspects: full speed again (the next pool)
            start, stop, region, future = window.popleft()
            try:
                results, error = future.result()
            except BrokenProcessPool:
                raise _Broke(start, submitted) from None
            in_flight -= stop - start
            if region is not None:
                results = self._placed(results, region)
            for result in results:
                if isinstance(result, Placed):
                    made += 1
                    made_bytes += len(result.value)
                elif not isinstance(result, Failure):
                    made += 1
                    made_bytes += len(result[0])
            yield from results
            if error is not None:
                raise error

    def _reserve(self, items: int, known: int | None, mean: int | None) -> tuple[int, int] | None:
        """Ring space for a chunk of ``items`` records: of ``known`` payload bytes each (exactly,
        give or take a header), else of about ``mean`` bytes (a quarter more); None: no ring."""
        if not self.ring_live or self.ring is None:
            return None
        if known is not None:
            estimate = items * (known + _RECORD_FRAMING)
        elif mean is not None:
            estimate = items * (mean + mean // 4) + _RING_SLACK
        else:
            estimate = CHUNK_BYTES
        return self.ring.reserve(estimate)

    def _placed(self, results: list[Any], region: tuple[int, int]) -> list[Record | Placed | Failure]:
        """A chunk's results with each record made in the ring as a :class:`Placed` view of it."""
        assert self.ring is not None
        if not any(isinstance(result, _InRing) for result in results):
            self.ring.give_back(region[0])
            return results
        whole = memoryview(self.ring.view(region))  # the region is given back when the last view goes
        base = region[0]
        return [
            Placed(whole[r.start - base : r.start - base + r.length], r.shape, r.encoding)
            if isinstance(r, _InRing)
            else r
            for r in results
        ]

    def _after(self, broke: _Broke, position: int) -> None:
        """A worker died: find the item it died on, note or raise it, and start a new pool."""
        assert self.timed_out is not None
        timed = int(self.timed_out.value)
        self.stop()
        if timed >= 0:
            culprit: int | None = timed
            reason = f"decoding took longer than {self.timeout:g} s (a broken file? the time bound is decode_timeout)"
        else:
            suspects = [i for i in range(broke.start, broke.stop) if self.state[i] == _DECODING]
            culprit = suspects[0] if len(suspects) == 1 else None
            reason = "the decoder crashed (its worker process died: a broken file, or out of memory)"
            if culprit is None:
                if self.careful_until >= 0 or not suspects:  # one item at a time and still no single suspect
                    raise DecodeWorkerError(
                        f"{self.task.where(broke.start)}: a decoding worker process died (killed, out of memory, "
                        f"or a crash in OpenCV) while reading it or one of the {broke.stop - broke.start - 1} "
                        "images after it in writing order; nothing was written"
                    )
                self.careful_until = max(suspects)  # redo them one at a time: the next death names one
        if culprit is not None:
            if not self.skip_errors:
                error_type = InputError if timed >= 0 else DecodeWorkerError
                raise error_type(f"{self.task.where(culprit)}: {reason}; nothing was written")
            self.bad[culprit] = reason
            self.careful_until = -1
        for index in range(position, len(self.task)):
            self.state[index] = _WAITING
        self.timed_out.value = -1
        self.start("spawn")  # the caller may have an LMDB environment open by now: no fork


@dataclass(frozen=True, slots=True)
class _InRing:
    """What a worker sends back for a record it made in the ring: where it is, and what it is."""

    start: int
    length: int
    shape: Shape
    encoding: str


class _Broke(Exception):
    """The pool broke while items ``start:stop`` were in flight."""

    def __init__(self, start: int, stop: int) -> None:
        super().__init__(start, stop)
        self.start, self.stop = start, stop


def _chunk_size(record_bytes: int | None) -> int:
    """Items per chunk for records of about ``record_bytes`` (unknown: one, until some are seen)."""
    if record_bytes is None:
        return 1
    return max(1, min(MAX_CHUNK_IMAGES, CHUNK_BYTES // max(1, record_bytes)))


# ----------------------------------------------------------------------------- in a worker


@dataclass
class _Worker:
    task: DecodeTask
    state: Any
    timed_out: Synchronized
    skip_errors: bool
    bad: dict[int, str]
    watchdog: _Watchdog | None
    memory: mmap.mmap | None  # the SharedRing's memory, inherited through fork (None: pickle records)


_WORKER: _Worker | None = None  # set in each worker by _start_worker


def _start_worker(
    task: DecodeTask,
    parent: int,
    log_level: int,
    state: Any,
    timed_out: Synchronized,
    timeout: float | None,
    skip_errors: bool,
    bad: dict[int, str],
    memory: mmap.mmap | None = None,
) -> None:
    """Make a worker process: one OpenCV thread, the parent's signals are the parent's business.

    Ctrl-C reaches the whole process group; the parent turns it into an orderly stop and kills
    the workers, so they ignore SIGINT and take SIGTERM's default (the CLI's SIGTERM handler,
    inherited through fork, would raise KeyboardInterrupt here). On Linux a worker also gets
    SIGKILL when its parent dies, so even ``kill -9`` leaves no orphans.
    """
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if _CAN_MASK:  # held by the parent while it forked
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    die_with_parent(parent)
    cv2.setNumThreads(1)  # the parallelism is the processes; OpenCV's own pool would oversubscribe
    cv2.utils.logging.setLogLevel(log_level)  # as quiet as the parent (spawn does not inherit it)
    tune_malloc()
    watchdog = _Watchdog(timeout, timed_out) if timeout is not None else None
    _WORKER = _Worker(task, state, timed_out, skip_errors, bad, watchdog, memory)


def die_with_parent(parent: int) -> None:
    """In a worker process: get SIGKILL when the parent (pid ``parent``) dies (Linux), so even a
    ``kill -9`` of the parent leaves no orphan blocked on its queue; exit now if it already died."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)


def _run_chunk(
    start: int, stop: int, region: tuple[int, int] | None = None
) -> tuple[list[Record | _InRing | Failure], DatumDBError | None]:
    """Results of items ``start:stop``; at a bad item (not skipped), those before it and its error.

    The error is returned, not raised, so the records before it still reach the writer and an
    error the caller finds among them (a key too long, a size check) is reported first, as in
    one process. With a ``region`` of the shared ring, records are made there, one after the
    other, as long as they fit; the others come back as records.
    """
    worker = _WORKER
    if worker is None:
        raise RuntimeError("_run_chunk runs only in a worker started by _start_worker")
    results: list[Record | _InRing | Failure] = []
    out = memoryview(worker.memory)[region[0] : region[1]] if region and worker.memory is not None else None
    position = 0
    for index in range(start, stop):
        if index in worker.bad:  # found bad by an earlier pool (it timed out or crashed a worker)
            results.append(Failure(index, worker.bad[index]))
            continue
        worker.state[index] = _DECODING
        if worker.watchdog is not None:
            worker.watchdog.arm(index)
        try:
            if out is None:
                results.append(worker.task.run(index))
            else:
                made = worker.task.run_into(index, out[position:])  # type: ignore[attr-defined]
                if isinstance(made[0], int):
                    results.append(_InRing(region[0] + position, *made))  # type: ignore[index]
                    position += made[0]
                else:
                    results.append(made)
        except InputError as exc:
            if not worker.skip_errors:
                return results, exc
            results.append(Failure(index, worker.task.reason(exc, index)))
        except DatumDBError as exc:
            return results, exc
        finally:
            if worker.watchdog is not None:
                worker.watchdog.disarm()
            worker.state[index] = _DONE
    return results, None


class _Watchdog:
    """Ends this worker process if one item takes longer than ``timeout`` seconds.

    A decoder stuck in C cannot be interrupted from Python; ``os._exit`` from another thread
    ends the process at once. The item is written to shared memory first, so the parent knows
    which one it was. The watchdog looks every ``timeout / WATCHDOG_LOOKS`` seconds, so an item
    is ended at most that much after its bound: arming it for an item is one store, where a
    condition variable woke the watchdog thread for every image (a thread switch each, 4% of
    a worker's time on 256x256 photos).
    """

    def __init__(self, timeout: float, timed_out: Synchronized) -> None:
        self.timeout, self.timed_out = timeout, timed_out
        self._armed: tuple[int, float] | None = None  # (item, deadline): replaced whole, read whole
        threading.Thread(target=self._watch, name="datumdb-decode-watchdog", daemon=True).start()

    def arm(self, index: int) -> None:
        self._armed = (index, time.monotonic() + self.timeout)

    def disarm(self) -> None:
        self._armed = None

    def _watch(self) -> None:
        period = self.timeout / WATCHDOG_LOOKS
        while True:
            time.sleep(period)
            armed = self._armed
            if armed is not None and time.monotonic() >= armed[1]:  # still on that item, past its bound
                self.timed_out.value = armed[0]
                os._exit(_TIMED_OUT_EXIT)
