"""The keys datumdb gives records, and LMDB's limit on them: one home for each formula.

* **Index keys** (``convert-arrays``, the writer's default, the pipeline): the record's
  position, zero-padded to at least ``KEY_WIDTH`` (8) digits as Caffe's tools do, and wider when
  the count needs it, so keys sort in record order (LMDB sorts bytes, not numbers).
* **Imageset keys** (Caffe's ``convert_imageset``): ``%08d_<path as listed>``, so every record
  names its file.
* **MAX_KEY_BYTES**: LMDB's compiled-in key limit (511 with the default page size); a longer key
  can be neither stored nor found.
"""

from __future__ import annotations

__all__ = ["KEY_WIDTH", "MAX_KEY_BYTES", "imageset_key", "index_key", "key_width"]

KEY_WIDTH = 8
MAX_KEY_BYTES = 511


def key_width(count: int) -> int:
    """Digits of the index keys of a database of ``count`` records."""
    return max(KEY_WIDTH, len(str(max(count - 1, 0))))


def index_key(position: int, count: int) -> bytes:
    """The key of record ``position`` in a database of ``count`` records."""
    return b"%0*d" % (key_width(count), position)


def imageset_key(line_id: int, path: str) -> bytes:
    """Caffe's convert_imageset key: ``%08d_`` of the line's index, then the path as listed."""
    return b"%08d_" % line_id + path.encode("utf-8")
