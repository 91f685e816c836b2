"""The split names, in the order every step lists them.

Which split a sample belongs to is decided by a hash of its identity and the seed alone
(:func:`datumdb.shardset.split_of`), so an appended sample never moves an existing one: the
fractions in ``params.yaml`` are the expected shares, not exact counts. A pure module (no
pipeline code runs on import), so :mod:`datumdb.shardset` can name the splits too.
"""

from __future__ import annotations

__all__ = ["SPLITS"]

SPLITS = ("train", "val", "test")
