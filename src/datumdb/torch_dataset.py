"""PyTorch adapter (the optional extra ``datumdb[torch]``): a Dataset over a Datum LMDB.

The dataset holds only a :class:`~datumdb.reader.DatumReader`, so a ``DataLoader`` may use any
number of workers with the ``fork`` or ``spawn`` start method: each worker opens its own
read-only, lock-free environment.

The reader is pinned when the dataset is created (not on first use), so the length the sampler
sees in the main process and every record every worker reads come from one version of the
database. If the database is rebuilt in place afterwards, workers started later (each epoch,
unless ``persistent_workers``) raise :class:`~datumdb.errors.DatabaseChangedError` instead of
reading the new version: an epoch never mixes two versions, and ``len`` never goes stale.
Create a new dataset to train on the new version.
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
        # Pinned now: left unpinned, forked workers would each pin whatever version they found.
        self.reader = DatumReader(path, imread=imread).pin()  # type: ignore[arg-type]
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
