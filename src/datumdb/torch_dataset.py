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

A ``DataLoader`` with automatic batching asks for whole batches through
:meth:`DatumDataset.__getitems__`: one :meth:`~datumdb.reader.DatumReader.read_batch` gather (for
a uniform raw database, one vectorised copy from the map, as for a ``.npy`` memmap) instead of a
Python call per record. Nothing to configure::

    loader = DataLoader(DatumDataset("data/lmdb/train"), batch_size=256, shuffle=True,
                        num_workers=4, pin_memory=True)

The default collate then stacks the batch into one contiguous tensor (what ``pin_memory`` wants).

For a uniform raw database the dataset builds the reader's offset index when it is created (one
scan of the file), so ``fork`` workers inherit it and read from their first batch on, every
epoch, without scanning the file again (``spawn`` workers build their own: about 0.6 µs a record).

``dataset[indices]`` with a list, tuple, array or tensor of indices is a whole batch: exactly
what the default collate makes of ``__getitems__(indices)``, ``(images, labels)``, but gathered
straight into one contiguous tensor (in shared memory inside a worker, so nothing is copied to
send it to the main process). Hand a DataLoader whole batches of indices to use it::

    sampler = BatchSampler(RandomSampler(dataset), batch_size=256, drop_last=False)
    loader = DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=4, pin_memory=True)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from datumdb.codec import ImreadMode
from datumdb.errors import DatumDBError
from datumdb.reader import DatumReader

__all__ = ["DatumDataset"]


class DatumDataset(Dataset):
    """``dataset[i]`` is ``(tensor, label)``: a (C, H, W) tensor (uint8, or float32 for
    ``float_data``) that owns its memory, and the int label. ``transform`` is applied to the
    tensor, ``target_transform`` to the label. ``dataset[indices]`` (a list, tuple, array or
    tensor of indices) is a whole collated batch (see the module docstring)."""

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
        self._uniform = _one_shape(self.reader)
        if self._uniform:  # built here, in the main process: fork workers inherit it
            self.reader.build_index()

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int | Sequence[int] | np.ndarray | torch.Tensor) -> tuple[Any, Any]:
        if isinstance(index, (list, tuple)) or (isinstance(index, (np.ndarray, torch.Tensor)) and index.ndim):
            return self._batch(index)
        array, label = self.reader[index]
        # The reader returns a read-only view of the record; torch wants memory it may write.
        return self._sample(torch.from_numpy(np.array(array)), label)

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Any, Any]]:
        """The samples ``[self[i] for i in indices]``, read with one batch gather.

        Every image is a view into one tensor that owns the batch's memory. A database whose
        records do not all have one shape (per its manifest) is read record by record, as the
        gather needs one shape.
        """
        if not self._uniform:
            return [self[index] for index in indices]
        images, labels = self.reader.read_batch(np.fromiter(indices, dtype=np.int64, count=len(indices)))
        batch = torch.from_numpy(images)  # read_batch's array is new and writable: no copy
        return [self._sample(batch[row], label) for row, label in enumerate(labels.tolist())]

    def _sample(self, tensor: torch.Tensor, label: int) -> tuple[Any, Any]:
        image = self.transform(tensor) if self.transform is not None else tensor
        return image, self.target_transform(label) if self.target_transform is not None else label

    def _batch(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> tuple[Any, Any]:
        """``default_collate(self.__getitems__(indices))``, gathered into one tensor when it can be."""
        given = np.asarray(indices)
        if not self._uniform or self.transform is not None or self.target_transform is not None or not given.size:
            return default_collate(self.__getitems__(given.tolist()))
        first, _ = self.reader[given.reshape(-1)[0]]  # the records' shape and dtype (one per database)
        images = torch.empty((given.size, *first.shape), dtype=torch.from_numpy(np.empty(0, first.dtype)).dtype)
        if get_worker_info() is not None:  # what default_collate does in a worker: no copy to send it
            images.share_memory_()
        _, labels = self.reader.read_batch(given, out=images.numpy())
        return images, torch.from_numpy(labels)


def _one_shape(reader: DatumReader) -> bool:
    """One shape for every record, per the pinned version's manifest (none: not known)."""
    try:
        shapes = reader.manifest.get("shapes")
    except DatumDBError:  # no manifest: read record by record
        return False
    return isinstance(shapes, dict) and len(shapes) == 1 and "unknown" not in shapes
