"""Progress bars for long operations (tqdm), on stderr, only where someone can see them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], *, enabled: bool | None, **kwargs: Any) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar: ``enabled=None`` shows it only on a terminal."""
    return iter(tqdm(iterable, disable=None if enabled is None else not enabled, dynamic_ncols=True, **kwargs))


def counter(*, enabled: bool | None, **kwargs: Any) -> tqdm:
    """A bar advanced by hand (``bar.update(n)``), for work done a chunk at a time; a context manager."""
    return tqdm(disable=None if enabled is None else not enabled, dynamic_ncols=True, **kwargs)
