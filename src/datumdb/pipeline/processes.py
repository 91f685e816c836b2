"""A step's independent units of work (a plan's parts, the splits) in parallel processes.

Snakemake runs a job per part or per split and fills the cores itself; DVC runs one stage at a
time, so a DVC stage over every part or split spreads them over the cores here. The workers are
forked (the config and the plan are inherited, not read again).

Stopping is the parent's business, as in :mod:`~datumdb.decodepool`: Ctrl-C reaches the whole
process group, so the workers ignore SIGINT; the parent's KeyboardInterrupt (or any failure)
cancels what has not started and sends the workers SIGTERM, which unwinds a call in progress
(its writer removes its build folder) and ends an idle worker quietly. A worker also gets
SIGKILL when its parent dies, so even ``kill -9`` of the step leaves no worker writing.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from datumdb.decodepool import STOP_SIGNALS, die_with_parent, usable_cores
from datumdb.errors import DatumDBError
from datumdb.writer import note_interrupt

__all__ = ["in_processes"]

T = TypeVar("T")

_EXIT_STOPPED = 130  # a worker stopped by its parent (the CLI's exit code for an interrupt)
_in_call = False  # in a worker: a call is running (SIGTERM unwinds it) or not (SIGTERM exits)


def in_processes(function: Callable[..., T], calls: Sequence[tuple[Any, ...]], jobs: int | None = None) -> list[T]:
    """``function(*args)`` for each ``args`` of ``calls``, in up to ``jobs`` processes (default:
    the usable cores), the results in the order of ``calls``; in this process when one suffices.
    The first failing call's exception (in the order of ``calls``) is raised here, once the calls
    in progress have been stopped."""
    jobs = max(1, min(jobs or usable_cores(), len(calls)))
    if jobs == 1:
        return [function(*args) for args in calls]
    context = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_worker, initargs=(os.getpid(),))
    try:
        # The first submit forks the workers: SIGINT and SIGTERM wait until each has its handlers.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            futures: list[Future[T]] = [pool.submit(_call, function, args) for args in calls]
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        results = [future.result() for future in futures]
    except BrokenProcessPool as exc:
        _stop(pool)
        raise DatumDBError(f"a worker process died ({exc}); was it killed, or out of memory?") from None
    except BaseException:
        _stop(pool)
        raise
    pool.shutdown()
    return results


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel the calls not started, stop the ones in progress (SIGTERM) and wait for the
    workers, so that no build folder outlives the step."""
    workers = list((getattr(pool, "_processes", None) or {}).values())  # the pool's own pid -> Process
    pool.shutdown(wait=False, cancel_futures=True)
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.join()


def _start_worker(parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _terminated)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    die_with_parent(parent)


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM in a worker: once. The pool sends its own when a worker ends (it takes the pool
    for broken), and a second KeyboardInterrupt would cut the first one's clean-up short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if not _in_call:
        os._exit(_EXIT_STOPPED)
    note_interrupt()  # the writer checks it before it commits or publishes, should this one be lost
    raise KeyboardInterrupt


def _call(function: Callable[..., T], args: tuple[Any, ...]) -> T:
    global _in_call
    _in_call = True
    try:
        return function(*args)
    except KeyboardInterrupt:
        os._exit(_EXIT_STOPPED)  # unwound (build folders removed); the parent is stopping
    finally:
        _in_call = False
