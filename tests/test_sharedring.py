"""datumdb.decodepool.SharedRing: the shared memory convert-imageset's workers make records in."""

from __future__ import annotations

import gc
import mmap

import numpy as np
import pytest

from datumdb.decodepool import SharedRing, shared_ring_bytes

pytestmark = pytest.mark.unit


def test_space_is_reserved_in_order_and_reused_once_every_view_is_gone() -> None:
    ring = SharedRing(100)
    first, second = ring.reserve(40), ring.reserve(40)
    assert (first, second) == ((0, 40), (40, 80))
    assert ring.reserve(30) is None  # 20 left at the end, and the start is in use: no waiting
    view = memoryview(ring.view(first))[5:10]  # a record the writer still holds
    view[:] = b"hello"
    ring.give_back(second[0])  # given back out of order: the first still holds the start
    assert ring.reserve(30) is None
    del view
    gc.collect()
    assert ring.reserve(30) == (0, 30)  # the oldest is free: the ring wraps to the start
    ring.close()


def test_wrapped_ring_uses_only_the_gap_before_the_oldest_region() -> None:
    ring = SharedRing(100)
    regions = [ring.reserve(30) for _ in range(3)]  # 0-30, 30-60, 60-90
    ring.give_back(regions[0][0])
    assert ring.reserve(20) == (0, 20)  # 10 left at the end is too little: wrap
    assert ring.reserve(15) is None  # only 10 bytes between the newest (0-20) and the oldest (30-60)
    assert ring.reserve(10) == (20, 30)
    for start in (30, 60, 0, 20):
        ring.give_back(start)
    assert ring.reserve(100) == (0, 100)  # all free again
    ring.close()


@pytest.mark.parametrize("size", [0, -1, 101])
def test_impossible_sizes_get_no_space(size: int) -> None:
    ring = SharedRing(100)
    assert ring.reserve(size) is None
    ring.close()


def test_views_keep_their_bytes_and_the_ring_closes_while_views_live() -> None:
    ring = SharedRing(64)
    array = ring.view(ring.reserve(8))
    array[:] = np.arange(8, dtype=np.uint8)
    ring.close()  # a view is still held: unmapped when it goes, no error now
    assert array.tolist() == list(range(8))


def test_ring_size_covers_two_batches_and_the_window_and_is_bounded() -> None:
    assert shared_ring_bytes(1000, 196_608) > 2 * 1000 * 196_608
    assert shared_ring_bytes(10**6, 10**7) == 1 << 30


def test_freed_pages_go_back_to_the_kernel_and_a_page_shared_with_a_live_region_is_kept() -> None:
    """Given back, a region's whole pages are released (they read as zeros), so the writer's
    next commit can use them; a page it shares with a region still in use keeps its bytes."""
    page = mmap.PAGESIZE
    ring = SharedRing(8 * page)
    first, second = ring.reserve(2 * page + 100), ring.reserve(page)
    held = ring.view(second)
    held[:] = 7
    written = ring.view(first)
    written[:] = 5
    del written
    gc.collect()  # the first region's last view is gone: given back
    memory = np.frombuffer(ring.memory, np.uint8)
    assert not memory[: 2 * page].any()
    assert (memory[2 * page : 2 * page + 100] == 5).all() and (held == 7).all()
    # Once no more records will come: every page not in use (before and after the live region).
    assert ring.release_free() == 2 * page + 4 * page
    assert (held == 7).all()
    del memory, held
    ring.close()
