"""PyTorch adapter (the optional extra ``datumdb[torch]``): a Dataset over a Datum LMDB.

The dataset holds only a :class:`~datumdb.reader.DatumReader`, which opens nothing until it is
used and re-opens in each process, so a ``DataLoader`` may use any number of workers with the
``fork`` or ``spawn`` start method: each worker opens its own read-only, lock-free environment.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from datumdb.codec import ImreadMode
from datumdb.reader import DatumReader

__all__ = ["DatumDataset"]


class DatumDataset(Dataset):
    """``dataset[i]`` is ``(tensor, label)``: a (C, H, W) tensor (uint8, or float32 for
    ``float_data``) that owns its memory, and the int label. ``transform`` is applied to the
    tensor, ``target_transform`` to the label."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        transform: Callable[[torch.Tensor], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
        imread: ImreadMode | str = "auto",
    ) -> None:
        self.reader = DatumReader(path, imread=imread)  # type: ignore[arg-type]
        self.transform = transform
        self.target_transform = target_transform

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        array, label = self.reader[index]
        # The reader returns a read-only view of the record; torch wants memory it may write.
        tensor = torch.from_numpy(np.array(array))
        image = self.transform(tensor) if self.transform is not None else tensor
        return image, self.target_transform(label) if self.target_transform is not None else label
