"""Check the B-tree of a ``data.mdb`` before LMDB walks it, so that damage is an error, not a signal.

LMDB checks a page number against the last page, and little else: a damaged node offset, key
size, page type or node flag makes it read outside the page, ``assert`` (which aborts the
process: py-lmdb builds LMDB with assertions) or follow a null pointer. So before any cursor or
look-up, :func:`check_tree` walks the tree LMDB will walk (from the root of the meta page LMDB
uses) in the file's bytes, level by level and vectorised with NumPy, and checks what LMDB relies
on (see lmdb.h and mdb.c of LMDB 0.9):

* every page is visited once, lies inside the file and past the two meta pages, and has the
  type its level needs (branch pages above, leaf pages at the bottom), with sane bounds
  (``16 <= lower <= upper <= page size``) and at least one node (two in a branch page: LMDB
  asserts it);
* every node header and key lies inside its page, between ``upper`` and the page's end;
* leaf nodes carry no flag but ``F_BIGDATA`` (``F_DUPDATA`` makes LMDB use a cursor for sorted
  duplicates this database does not have: a null pointer); a value lies inside its page, or in
  the overflow pages LMDB reads it from (as many as its size needs, counted from the leaf: the
  overflow page's own header, which LMDB does not read to serve a value, is never touched);
* no two values share an overflow page, and no overflow page is a branch or leaf page (a
  damaged overflow page number would otherwise serve another record's value);
* the leaves hold exactly the records the meta page counts.

The cost is one pass over the branch and leaf pages' node headers (not over overflow pages,
where large values live): about what listing the keys costs, which the reader does anyway.
"""

from __future__ import annotations

import numpy as np

__all__ = ["check_tree"]

P_BRANCH, P_LEAF, P_OVERFLOW, P_META, P_LEAF2, P_SUBP = 0x01, 0x02, 0x04, 0x08, 0x20, 0x40
_TYPE_BITS = P_BRANCH | P_LEAF | P_OVERFLOW | P_META | P_LEAF2 | P_SUBP
F_BIGDATA = 0x01
PAGE_HEADER = 16  # page number (8), pad (2), flags (2), lower and upper (2 + 2) or overflow page count (4)
NODE_HEADER = 8  # data size or child page number (4), flags or its high 16 bits (2), key size (2)
_PAGES_AT_ONCE = 1 << 14  # pages checked in one vectorised step: bounded memory for any file


def _u16(data: np.ndarray, at: np.ndarray) -> np.ndarray:
    return data[at].astype(np.int64) | data[at + 1].astype(np.int64) << 8


def _u32(data: np.ndarray, at: np.ndarray) -> np.ndarray:
    return _u16(data, at) | _u16(data, at + 2) << 16


def _u64(data: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Little-endian 64-bit words, saturated to 2**62 (any page number that large is out of range)."""
    high = _u32(data, at + 4)
    return np.where(high >= 1 << 30, 1 << 62, _u32(data, at) | high << 32)


def check_tree(data: np.ndarray, page_size: int, last_page: int, root: int, depth: int, entries: int) -> str | None:
    """None if the tree rooted at ``root`` is sound (see the module docstring), else what is wrong.

    ``data`` is the whole file (uint8); ``last_page``, ``root``, ``depth`` and ``entries`` are
    those of the meta page LMDB uses (``data`` must hold pages up to ``last_page``).
    """
    if entries == 0 and depth == 0:
        return None
    if not 1 <= depth <= 32:  # LMDB's cursor holds at most 32 levels
        return f"the tree has depth {depth}"
    if not 2 <= root <= last_page:
        return f"its root is page {root}, outside the file"
    visited = np.zeros(last_page + 1, dtype=bool)
    level = np.array([root], dtype=np.int64)
    records = 0
    overflows: list[tuple[np.ndarray, np.ndarray]] = []
    for height in range(depth):
        leaves = height == depth - 1
        children = []
        for begin in range(0, len(level), _PAGES_AT_ONCE):
            pages = level[begin : begin + _PAGES_AT_ONCE]
            found = _check_pages(data, pages, visited, page_size, last_page, leaves, records)
            if isinstance(found, str):
                return found
            if leaves:
                records += found[0]
                overflows.append(found[1])
            else:
                children.append(found)
        if not leaves:
            level = np.concatenate(children)
    if records != entries:
        return f"its leaves hold {records} records, its meta page counts {entries}"
    return _check_overflows(overflows, visited)


def _check_overflows(overflows: list[tuple[np.ndarray, np.ndarray]], tree: np.ndarray) -> str | None:
    """Each value's overflow pages are its own: no two values share one, and no tree page is one.

    A damaged overflow page number can point at another record's pages, which LMDB would
    serve as this record's value without a word: refused.
    """
    first = np.concatenate([pages for pages, _ in overflows])
    if not len(first):
        return None
    end = np.concatenate([first + counts for (first, counts) in overflows])
    order = np.argsort(first, kind="stable")
    first, end = first[order], end[order]
    shared = first[1:] < end[:-1]
    if shared.any():
        return f"two values share overflow page {int(first[1:][shared][0])}"
    tree_pages = np.flatnonzero(tree)
    inside = np.searchsorted(tree_pages, end) != np.searchsorted(tree_pages, first)
    if inside.any():
        return f"the overflow pages from page {int(first[inside][0])} hold a branch or leaf page"
    return None


def _check_pages(
    data: np.ndarray,
    pages: np.ndarray,
    visited: np.ndarray,
    page_size: int,
    last_page: int,
    leaves: bool,
    records_before: int,
) -> np.ndarray | tuple[int, tuple[np.ndarray, np.ndarray]] | str:
    """Check one level's ``pages``: their children (branch pages), or for leaves the record count
    and the values' overflow pages (first page, page count); or what is wrong (naming the record,
    by its position in key order and its key, where the damage is in a leaf node)."""

    def record(bad: np.ndarray) -> str:
        """The first bad leaf node as 'record N (key K)'."""
        row = int(np.flatnonzero(bad)[0])
        at = int(node[row]) + NODE_HEADER
        key = bytes(data[at : at + int(key_size[row])]).decode("utf-8", "backslashreplace")
        return f"record {records_before + row} (key {key!r}, page {int(pages[page_of[row]])})"

    outside = (pages < 2) | (pages > last_page)
    if outside.any():
        return f"a {'leaf' if leaves else 'branch'} points to page {int(pages[outside][0])}, outside the file"
    if visited[pages].any() or len(np.unique(pages)) != len(pages):
        return f"page {int(pages[visited[pages]][0]) if visited[pages].any() else int(pages[0])} is reached twice"
    visited[pages] = True
    base = pages * page_size
    kind = P_LEAF if leaves else P_BRANCH
    flags, lower, upper = _u16(data, base + 10), _u16(data, base + 12), _u16(data, base + 14)
    bad = (flags & _TYPE_BITS) != kind
    if bad.any():
        return (
            f"page {int(pages[bad][0])} is not a {'leaf' if leaves else 'branch'} page (flags {int(flags[bad][0]):#x})"
        )
    keys = (lower - PAGE_HEADER) // 2
    bad = (lower < PAGE_HEADER) | (lower > upper) | (upper > page_size) | (keys < (1 if leaves else 2))
    if bad.any():
        return f"page {int(pages[bad][0])} has bounds {int(lower[bad][0])}..{int(upper[bad][0])}"
    # One row per node: its page, and where its pointer is.
    page_of = np.repeat(np.arange(len(pages)), keys)
    index = np.arange(len(page_of)) - np.repeat(np.cumsum(keys) - keys, keys)
    start = base[page_of]
    pointer = _u16(data, start + PAGE_HEADER + 2 * index)
    bad = (pointer < upper[page_of]) | (pointer + NODE_HEADER > page_size)
    if bad.any():
        return f"page {int(pages[page_of[bad][0]])} has a node at offset {int(pointer[bad][0])}"
    node = start + pointer
    low, high, node_flags, key_size = _u16(data, node), _u16(data, node + 2), _u16(data, node + 4), _u16(data, node + 6)
    key_end = pointer + NODE_HEADER + key_size
    bad = key_end > page_size
    if bad.any():
        return f"page {int(pages[page_of[bad][0]])} has a {int(key_size[bad][0])}-byte key past its end"
    if not leaves:
        return low | high << 16 | node_flags << 32  # the children, in key order
    size = low | high << 16
    big = node_flags == F_BIGDATA
    bad = ((node_flags != 0) & ~big) | (~big & (key_end + size > page_size)) | (big & (key_end + 8 > page_size))
    if bad.any():
        return f"{record(bad)}: its value (flags {int(node_flags[bad][0]):#x}) runs past the end of its page"
    overflow = _u64(data, (start + key_end)[big])
    size = size[big]
    rows = np.flatnonzero(big)
    outside = (overflow < 2) | (overflow > last_page)
    if outside.any():
        where = record(np.isin(np.arange(len(big)), rows[outside]))
        return f"{where}: its value lies in page {int(overflow[outside][0])}, outside the file"
    # The pages LMDB reads the value from: OVPAGES(size) from the page the node names. Computed
    # from the leaf alone, never from the overflow page's own header (LMDB does not read that to
    # serve a value): checking it would touch one page per large value, scattered over the whole
    # file (about 100 s cold for an ImageNet-sized split, at every open in every process).
    count = (PAGE_HEADER - 1 + size) // page_size + 1
    bad = overflow + count > last_page + 1
    if bad.any():
        where = record(np.isin(np.arange(len(big)), rows[bad]))
        return f"{where}: overflow page {int(overflow[bad][0])} does not hold its {int(size[bad][0])}-byte value"
    return len(page_of), (overflow, count)
